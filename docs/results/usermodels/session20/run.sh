#!/bin/sh
# Review20's repros (rv20p/, copied from /tmp/rv20p) and the watch's cost, before (BEFORE: a tree at 4823624, main
# before this session's fix) and after (AFTER: a tree at the fix), each run from its tree's root. Cost under the
# machine's bench lock, before and after alternated twice.
# usage: sh docs/results/usermodels/session20/run.sh BEFORE_TREE AFTER_TREE > out.txt
set -u
here=$(cd "$(dirname "$0")" && pwd)
for tree in "$1" "$2"; do
  echo "=== $tree"
  for p in p1_draw_bypass p2_restore_rewinds p5_frozen p7_tempfile_fp; do
    echo "--- $p"; (cd "$tree" && PYTHONPATH=$tree nice -n 5 .venv/bin/python "$here/rv20p/$p.py" 2>&1 | grep -v Traceback | tail -4)
  done
  for a in whole wrapper sub; do
    echo "--- p4_compiled_fp $a"; (cd "$tree" && PYTHONPATH=$tree nice -n 5 .venv/bin/python "$here/rv20p/p4_compiled_fp.py" $a 2>&1 | tail -1 | cut -c1-300)
  done
done
for i in 1 2; do
  for tree in "$1" "$2"; do
    (cd "$tree" && PYTHONPATH=$tree flock /work/wt/.bench.lock .venv/bin/python "$here/capture_cost.py" "$tree" 2>/dev/null | tail -1)
  done
done
