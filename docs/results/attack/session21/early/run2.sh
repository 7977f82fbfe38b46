#!/bin/sh
set -u
D=docs/results/attack/session20
PY="env PYTHONPATH=$PWD .venv/bin/python"
echo "# $(date -u +%H:%M) $(uptime | sed 's/.*load/load/')"
B21_LOOKAHEAD=2097152 timeout 400 $PY $D/intake_probe.py tenants 64 --flags "--max-reading-mb 32" | head -n 1 | sed 's|^|tenants 64 mb32 la2: |'
timeout 400 $PY $D/intake_probe.py tenants 64 --flags "--max-reading-mb 32" | head -n 1 | sed 's|^|tenants 64 mb32: |'
$PY docs/results/attack/session21/bdp_cost.py --repeats 3 --rtt-ms 40 --lookahead-mib 1 2 --json /tmp/b21/bdp40.json
$PY docs/results/attack/session21/bdp_cost.py --repeats 3 --rtt-ms 20 --lookahead-mib 1 2 --json /tmp/b21/bdp20.json
echo "# end $(date -u +%H:%M) $(uptime | sed 's/.*load/load/')"
