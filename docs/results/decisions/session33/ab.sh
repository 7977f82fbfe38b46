#!/bin/bash
# Session 33: the real client's decisions before / after, alternating processes (B A B A ...).
# before = git archive of the base commit; after = the same tree with this session's four files
# (partitioner/online.py, ue_client/planning.py, ue_client/decider.py, ue_client/decisions.py).
#   bash docs/results/decisions/session33/ab.sh ROUNDS OUTDIR BEFORE_ROOT AFTER_ROOT
set -e
cd /work/main
rounds=${1:-6}; out=${2:-docs/results/decisions/session33/runs}; before=${3:-/tmp/s33/before}; after=${4:-/tmp/s33/after}
mkdir -p "$out"
for i in $(seq 1 "$rounds"); do
  for side in before after; do
    root=$before; [ "$side" = after ] && root=$after
    echo "$(date -u +%T) round $i $side load $(cut -d' ' -f1-3 /proc/loadavg)" | tee -a "$out/log.txt"
    .venv/bin/python bench/bench_request_plan.py --models resnet18,googlenet,mobilenet_v2 --policies auto,mjoa \
      --requests 8 --uplink-mbps 400 --root "$root" --json "$out/$side$i.json" > "$out/$side$i.txt" 2>&1
  done
done
echo "$(date -u +%T) done load $(cut -d' ' -f1-3 /proc/loadavg)" | tee -a "$out/log.txt"
