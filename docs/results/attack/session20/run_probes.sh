#!/bin/sh
# flock /work/wt/.bench.lock sh docs/results/attack/session20/run_probes.sh BEFORE_ROOT > docs/results/attack/session20/probes.txt
# BEFORE_ROOT: main before bound20 (git archive 3b2af4e | tar -x -C DIR). Each probe's server is a child process
# (server RSS only; session 19's validation_memory_probe.py ran client and server in one process).
set -u
D=docs/results/attack/session20
PY="env PYTHONPATH=$PWD .venv/bin/python"
J=$D/probes.jsonl
: > $J
echo "# $(date -u +%H:%M) $(uptime | sed 's/.*load/load/'), this = $(git rev-parse --short HEAD), before = $1"
for sc in "tenants 16" "tenants 64" "one 64" "seq 48"; do
  echo "## $sc"
  PROBE_ROOT=$1 timeout 400 $PY $D/intake_probe.py $sc --json $J | head -n 1 | sed 's|^|before: |'
  timeout 400 $PY $D/intake_probe.py $sc --json $J | head -n 1 | sed 's|^|this:   |'
  timeout 400 $PY $D/intake_probe.py $sc --flags "--max-reading-mb 32" --json $J | head -n 1 | sed 's|^|this --max-reading-mb 32: |'
  timeout 400 $PY $D/intake_probe.py $sc --flags "--max-reading-mb 32 --max-reading-calls 2" --json $J | head -n 1 \
    | sed 's|^|this --max-reading-mb 32 --max-reading-calls 2: |'
done
echo "## honest tenant: resnet18 full offload, loopback"
timeout 900 $PY $D/honest_probe.py $1 --rounds 3 --warm 20 --json $D/honest.json
echo "# end $(date -u +%H:%M) $(uptime | sed 's/.*load/load/')"
