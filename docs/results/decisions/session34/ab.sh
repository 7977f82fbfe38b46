#!/bin/bash
# Session 34: the real client's decisions before / after, alternating processes (B A, A B, ...), each run under the
# bench lock. before / after: trees made by mktrees.sh (git archive of the commits).
#   bash docs/results/decisions/session34/ab.sh ROUNDS OUTDIR BEFORE_ROOT AFTER_ROOT [POLICIES]
set -e
cd /work/main
rounds=${1:-6}; out=${2:-docs/results/decisions/session34/runs}; before=${3:-/work/wt/s34/before}
after=${4:-/work/wt/s34/after}; policies=${5:-auto,mjoa}
mkdir -p "$out"
for i in $(seq 1 "$rounds"); do
  order="before after"; [ $((i % 2)) -eq 0 ] && order="after before"
  for side in $order; do
    root=$before; [ "$side" = after ] && root=$after
    echo "$(date -u +%T) round $i $side load $(cut -d' ' -f1-3 /proc/loadavg)" | tee -a "$out/log.txt"
    flock /work/wt/.bench.lock .venv/bin/python bench/bench_request_plan.py --models resnet18,googlenet,mobilenet_v2 \
      --policies "$policies" --requests 8 --uplink-mbps 400 --root "$root" --json "$out/$side$i.json" > "$out/$side$i.txt" 2>&1
  done
done
echo "$(date -u +%T) done load $(cut -d' ' -f1-3 /proc/loadavg)" | tee -a "$out/log.txt"
