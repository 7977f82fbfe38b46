#!/bin/sh
# Interleaved A/B of the uplink backlog change (session 20, backlog20), each run under the bench lock:
#   before = main at e8d0e74 (worktree /work/wt/backlog20-before), after = main with 53ad9c5 + d205907.
# Usage: sh run_ab.sh OUT_ROOT   (writes OUT_ROOT/{before1,after1,before2,after2})
set -e
OUT=${1:?OUT_ROOT}
for pair in 1 2; do
  for side in before after; do
    if [ $side = before ]; then WT=/work/wt/backlog20-before; else WT=/work/wt/backlog20; fi
    (cd $WT && flock /work/wt/.bench.lock env PYTHONPATH=$WT $WT/.venv/bin/coinfer-testbed bench --cpus 0.1 \
      --uplinks 400 --scenarios stream --models mobilenet_v2,resnet18 --out $OUT/$side$pair)
  done
done
