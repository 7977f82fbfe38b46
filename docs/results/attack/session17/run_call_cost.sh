#!/bin/sh
# flock /work/wt/.bench.lock sh docs/results/attack/session17/run_call_cost.sh BEFORE_ROOT > docs/results/attack/session17/call_cost.txt
# bench/bench_call_cost.py (server CPU per call) of the checkout before the call gate and of this one, back to back.
set -u
echo "# $(date -u +%H:%M) $(uptime | sed 's/.*load/load/'), this = $(git rev-parse --short HEAD), before = $1"
for round in 1 2; do
  echo "## before (round $round)"
  (cd "$1" && timeout 280 env PYTHONPATH="$1" /work/wt/attack17/.venv/bin/python bench/bench_call_cost.py --calls 2000 --rounds 1)
  echo "## this (round $round)"
  timeout 280 env PYTHONPATH=$PWD .venv/bin/python bench/bench_call_cost.py --calls 2000 --rounds 1
done
echo "# end $(date -u +%H:%M) $(uptime | sed 's/.*load/load/')"
