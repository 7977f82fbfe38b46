#!/bin/sh
# flock /work/wt/.bench.lock sh docs/results/attack/session20/run_probes.sh S19_ROOT MAIN_ROOT > docs/results/attack/session20/probes.txt
# S19_ROOT: main at the start of session 20 (git archive 3b2af4e | tar -x -C DIR); MAIN_ROOT: main just before
# bound20 landed (d46a2a8: with review20 F6's validation turns, none of bound20). Each probe's server is a child
# process (server RSS only; session 19's validation_memory_probe.py ran client and server in one process).
set -u
D=docs/results/attack/session20
PY="env PYTHONPATH=$PWD .venv/bin/python"
J=$D/probes.jsonl
: > $J
echo "# $(date -u +%H:%M) $(uptime | sed 's/.*load/load/'), this = $(git rev-parse --short HEAD), s19 = $1, main = $2"
for sc in "tenants 16" "tenants 64" "one 64" "seq 48"; do
  echo "## $sc"
  PROBE_ROOT=$1 timeout 400 $PY $D/intake_probe.py $sc --json $J | head -n 1 | sed 's|^|s19:  |'
  PROBE_ROOT=$2 timeout 400 $PY $D/intake_probe.py $sc --json $J | head -n 1 | sed 's|^|main: |'
  timeout 400 $PY $D/intake_probe.py $sc --json $J | head -n 1 | sed 's|^|this: |'
  timeout 400 $PY $D/intake_probe.py $sc --flags "--max-reading-mb 32" --json $J | head -n 1 \
    | sed 's|^|this --max-reading-mb 32: |'
done
echo "## honest tenant: resnet18 full offload, loopback (before = main)"
timeout 900 $PY $D/honest_probe.py $2 --rounds 3 --warm 20 --json $D/honest.json
echo "# end $(date -u +%H:%M) $(uptime | sed 's/.*load/load/')"
