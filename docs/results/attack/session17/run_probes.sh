#!/bin/sh
# flock /work/wt/.bench.lock sh docs/results/attack/session17/run_probes.sh BEFORE_ROOT > docs/results/attack/session17/probes.txt
# Each probe against the server before the fix (PROBE_ROOT=BEFORE_ROOT) and this checkout's, side by side.
set -u
P=docs/results/attack/session17/silent_calls_probe.py
echo "# $(date -u +%H:%M) $(uptime | sed 's/.*load/load/'), this = $(git rev-parse --short HEAD), before = $1"
for args in "silent 6000 4" "strangers 6000 4" "revoke"; do
  echo "## $args: before"
  PROBE_ROOT=$1 timeout 150 env PYTHONPATH=$PWD .venv/bin/python $P $args
  echo "## $args: this"
  timeout 150 env PYTHONPATH=$PWD .venv/bin/python $P $args
done
echo "# end $(date -u +%H:%M) $(uptime | sed 's/.*load/load/')"
