#!/bin/sh
# flock /work/wt/.bench.lock sh docs/results/attack/session21/run_measurements.sh > docs/results/attack/session21/measurements.txt
# Ran from a git archive of bb031ab (/tmp/b21snap, REV holds the commit) at 08:55-09:00 UTC, the 20 ms RTT and "one 64" parts
# dropped to fit the lock queue (the first runs in early/ have 20 ms).
# (1) what BDP probing off costs an upload and a 256 KiB message on a 400 Mbit/s link, RTT 40 and 20 ms, by receive
# window; (2) server RSS under --memory-mb 1024 with 64 tenants' / one tenant's 64 x 6.45 MiB ProfileGraphs at once
# (session 20's intake probe): the old default (--max-reading-mb 0: BDP probing on, no slots), the new default (no
# flag: 4 slots, 1 MiB window), and 4 slots with a 2 MiB window.
set -u
D=docs/results/attack/session21
PY="env PYTHONPATH=$PWD .venv/bin/python"
echo "# $(date -u +%H:%M) $(uptime | sed 's/.*load/load/'), this = $(git rev-parse --short HEAD 2>/dev/null || cat REV)"
for rtt in 40; do
  timeout 900 $PY $D/bdp_cost.py --repeats 3 --rtt-ms $rtt --json $D/bdp_cost_rtt$rtt.json | sed -n '/^torchvision.*Mbit/,$p'
done
for sc in "tenants 64"; do
  echo "## $sc"
  timeout 400 $PY docs/results/attack/session20/intake_probe.py $sc --flags "--max-reading-mb 0" --json $D/probes.jsonl | head -n 1 | sed 's|^|old default (--max-reading-mb 0): |'
  timeout 400 $PY docs/results/attack/session20/intake_probe.py $sc --json $D/probes.jsonl | head -n 1 | sed 's|^|new default: |'
  timeout 400 $PY docs/results/attack/session20/intake_probe.py $sc --flags "--read-window-kb 2048" --json $D/probes.jsonl | head -n 1 | sed 's|^|--read-window-kb 2048: |'
done
echo "# end $(date -u +%H:%M) $(uptime | sed 's/.*load/load/')"
