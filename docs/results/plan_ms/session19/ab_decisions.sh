#!/bin/bash
# Session 19 (replan19): the decision-time table (bench/bench_decisions.py) before (/tmp/r19/before, main at 6ee5729)
# and after (/tmp/r19/after, this branch), one after the other in one locked run:
#   flock /work/wt/.bench.lock docs/results/plan_ms/session19/ab_decisions.sh
set -e
cd "$(dirname "$0")/../../../.."
OUT=docs/results/plan_ms/session19
uptime
for root in /tmp/r19/before /tmp/r19/after; do
  PYTHONPATH=$root .venv/bin/python bench/bench_decisions.py --captured docs/results/cold/session10/costgraphs \
    --repeats 1 --json $OUT/decisions_$(basename $root).json > $OUT/decisions_$(basename $root).txt 2>&1
done
uptime
