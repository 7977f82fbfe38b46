#!/bin/sh
# The second review's reproductions (copied from /tmp/rv19p), run from the repository root:
#   sh docs/results/usermodels/session19/rv19p/run_all.sh
d=docs/results/usermodels/session19/rv19p
for p in p1_draw_fn p1b_client p5_compiled p9_profiler p11_thread_fp p12_state_left_moved; do
  echo "== $p"
  PYTHONPATH=$PWD .venv/bin/python $d/$p.py 2>&1 | grep -v -e Warning -e 'warnings.warn' -e '^  t='
done
