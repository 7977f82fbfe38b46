#!/bin/sh
# flock /work/wt/.bench.lock sh docs/results/attack/session19/run_probes.sh BEFORE_ROOT > docs/results/attack/session19/probes.txt
# BEFORE_ROOT: a checkout of main before session 19's attack fixes (6ee5729: git archive 6ee5729 | tar -x -C DIR).
# Each probe against that server and this checkout's, one after another, nothing else of ours running.
set -u
D=docs/results/attack/session19
PY="env PYTHONPATH=$PWD .venv/bin/python"
echo "# $(date -u +%H:%M) $(uptime | sed 's/.*load/load/'), this = $(git rev-parse --short HEAD), before = $1"
echo "## F5: 48 calls of 4 MiB first messages from one token, --max-reading-calls 2"
for k in hello session session-seq; do
  PROBE_ROOT=$1 timeout 200 $PY $D/session_burst_probe.py $k
  timeout 200 $PY $D/session_burst_probe.py $k
done
echo "## F6: bob's 3-op slice 1 s into alice's 30000-op one (default budgets)"
PROBE_ROOT=$1 timeout 200 $PY $D/fair_probe.py 30000
timeout 200 $PY $D/fair_probe.py 30000
echo "## the gate's cost per call (Hello, --auth-tokens, sequential; session 18's script)"
timeout 300 $PY docs/results/attack/session18/gate_cost.py --calls 3000 --rounds 3 --before $1 --json $D/gate_cost.json
echo "# end $(date -u +%H:%M) $(uptime | sed 's/.*load/load/')"
