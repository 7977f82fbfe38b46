#!/bin/sh
# flock /work/wt/.bench.lock sh docs/results/attack/session18/run_probes.sh BEFORE_ROOT > docs/results/attack/session18/probes.txt
# BEFORE_ROOT: a checkout of main before session 18 (9f12c68: git archive 9f12c68 | tar -x -C DIR). Each probe
# against that server and this checkout's, side by side, one after another, nothing else of ours running.
set -u
D=docs/results/attack/session18
PY="env PYTHONPATH=$PWD .venv/bin/python"
echo "# $(date -u +%H:%M) $(uptime | sed 's/.*load/load/'), this = $(git rev-parse --short HEAD), before = $1"
echo "## F5: 5 DefineSlices of 8000 distinct tril ops from one tenant, default flags: before"
PROBE_ROOT=$1 timeout 200 $PY $D/validation_probe.py 5 8000
echo "## F5: the same: this (--slice-cpu-s 10 --slice-cpu-share 0.2, the defaults)"
timeout 200 $PY $D/validation_probe.py 5 8000
echo "## bursts: 200 Hello calls of 7 MiB at once from one token (this checkout; the variants as named)"
timeout 300 $PY $D/burst_probe.py 200 7 plain nobdp flag:--max-reading-calls=4 nobdp+flag:--max-reading-calls=4
echo "## the gate's cost per call (Hello, --auth-tokens, sequential)"
timeout 300 $PY $D/gate_cost.py --calls 3000 --rounds 3 --before $1 --json $D/gate_cost.json
echo "# end $(date -u +%H:%M) $(uptime | sed 's/.*load/load/')"
