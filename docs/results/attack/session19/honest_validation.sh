#!/bin/sh
# flock /work/wt/.bench.lock sh docs/results/attack/session19/honest_validation.sh BEFORE_ROOT > docs/results/attack/session19/honest_validation.txt
# One tenant alone (no contention): 8 DefineSlices of 1000 distinct tril ops (~0.5 CPU s each, under the default
# --slice-cpu-s 10) and 40 of 100, before and this, alternating twice: what the turns (a check per 16 meta-kernel
# runs, TORCH_TRACE_LOCK let go around it) and the validation pool cost an honest validation.
set -u
PY="env PYTHONPATH=$PWD .venv/bin/python"
P=docs/results/attack/session18/validation_probe.py
echo "# $(date -u +%H:%M) $(uptime | sed 's/.*load/load/'), this = $(git rev-parse --short HEAD), before = $1"
for r in 1 2; do
  PROBE_ROOT=$1 timeout 200 $PY $P 8 1000 | tail -n 1 | sed "s|^|before: |"
  timeout 200 $PY $P 8 1000 | tail -n 1 | sed "s|^|this:   |"
  PROBE_ROOT=$1 timeout 200 $PY $P 40 100 | tail -n 1 | sed "s|^|before: |"
  timeout 200 $PY $P 40 100 | tail -n 1 | sed "s|^|this:   |"
done
echo "# end $(date -u +%H:%M) $(uptime | sed 's/.*load/load/')"
