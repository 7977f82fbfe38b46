#!/bin/bash
# Session 21 (plan21): bench/bench_request_plan.py (real client, one UE process, decisions inline) before / after,
# interleaved, at a full core and under a 0.1-core quota; roots as in ab_testbed.sh.
#   flock /work/wt/.bench.lock docs/results/plan_ms/session21/ab_request_plan.sh
set -e
OUT=${OUT:-/work/wt/plan21/docs/results/plan_ms/session21}
B=/work/wt/plan21/bench/bench_request_plan.py
for cpus in full 0.1; do
  for root in /tmp/p21/before /tmp/p21/after; do
    name=rp_${cpus}_$(basename $root)
    extra=""; [ $cpus = 0.1 ] && extra="--cpus 0.1"
    uptime
    nice -n 5 /work/main/.venv/bin/python $B --root $root --models resnet18,mobilenet_v2,googlenet --policies auto,fixed \
        --requests 12 --uplink-mbps 100 $extra --json $OUT/$name.json > $OUT/$name.txt 2>&1
  done
done
uptime
nice -n 5 /work/main/.venv/bin/python /work/wt/plan21/docs/results/plan_ms/session21/warm_cost.py --reps 15 > $OUT/warm_cost.txt 2>&1
uptime
