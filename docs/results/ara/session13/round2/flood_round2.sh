#!/bin/sh
# Round 2: inline and child (nice +10) alternated, 3 each, then equal once; from a clone of the landed commit.
cd /work/araproc-clone
OUT=docs/results/ara/session13/round2
PY="env PYTHONPATH=/work/araproc-clone /work/main/.venv/bin/python"
echo "commit $(git rev-parse --short HEAD)"
for run in "child 1" "inline 1" "inline 2" "child 2" "child 3" "inline 3"; do
  set -- $run
  echo "== $1 run $2: $(uptime)"
  $PY bench/bench_profile_flood.py --allocator ara --updates 1 --planner $1 --json $OUT/flood_$1_run$2.json 2>&1 | grep -E "^(phase|before|during|3 attackers|honest)"
done
echo "== equal: $(uptime)"
$PY bench/bench_profile_flood.py --allocator equal --json $OUT/flood_equal.json 2>&1 | grep -E "^(phase|before|during|3 attackers)"
echo "== end: $(uptime)"
