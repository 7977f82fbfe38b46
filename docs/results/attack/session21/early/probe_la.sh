#!/bin/sh
set -u
D=docs/results/attack/session20
PY="env PYTHONPATH=$PWD .venv/bin/python"
echo "# $(date -u +%H:%M) $(uptime | sed 's/.*load/load/')"
for sc in "tenants 64" "one 64"; do
  echo "## $sc"
  timeout 400 $PY $D/intake_probe.py $sc | head -n 1 | sed 's|^|default: |'
  timeout 400 $PY $D/intake_probe.py $sc --flags "--max-reading-mb 32" | head -n 1 | sed 's|^|mb32: |'
  B21_LOOKAHEAD=1048576 timeout 400 $PY $D/intake_probe.py $sc --flags "--max-reading-mb 32" | head -n 1 | sed 's|^|mb32 la1: |'
  B21_LOOKAHEAD=4194304 timeout 400 $PY $D/intake_probe.py $sc --flags "--max-reading-mb 32" | head -n 1 | sed 's|^|mb32 la4: |'
done
echo "# end $(date -u +%H:%M) $(uptime | sed 's/.*load/load/')"
