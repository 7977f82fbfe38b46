#!/bin/sh
cd /work/araproc-clone
OUT=docs/results/ara/session13
PY="env PYTHONPATH=/work/araproc-clone /work/main/.venv/bin/python"
for run in "inline 1" "child 1" "child_nice0 1" "inline 2" "child 2"; do
  set -- $run
  kind=$1; k=$2
  case $kind in
    inline) args="--planner inline";;
    child) args="--planner child";;
    child_nice0) args="--planner child --plan-nice 0";;
  esac
  echo "== $kind run $k: $(uptime)"
  $PY bench/bench_profile_flood.py --allocator ara --updates 1 $args --json $OUT/flood_${kind}_run$k.json 2>&1 | grep -v "^request\|^server trouble" | tail -8
done
echo "== equal: $(uptime)"
$PY bench/bench_profile_flood.py --allocator equal --json $OUT/flood_equal.json 2>&1 | tail -4
echo "== end: $(uptime)"
