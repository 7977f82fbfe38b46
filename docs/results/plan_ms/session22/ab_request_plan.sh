#!/bin/bash
# Session 22 (plan22): bench/bench_request_plan.py before / after, interleaved B A B A, at a full core then under a
# 0.1-core quota. after = main at 6b00139 (90f67b8, 2e77f37, 6b00139), before = the same tree with those three
# reverted (git revert --no-commit 6b00139 2e77f37 90f67b8). Roots are detached worktrees.
#   flock /work/wt/.bench.lock docs/results/plan_ms/session22/ab_request_plan.sh [full|0.1]
set -e
OUT=${OUT:-/work/wt/plan22/docs/results/plan_ms/session22}
B=/work/wt/plan22/bench/bench_request_plan.py
cpus=${1:-full}
for k in 1 2; do
  for root in /tmp/p22/b2 /tmp/p22/a2; do
    name=rp_${cpus}_$(basename $root)_$k
    extra=""; [ $cpus = 0.1 ] && extra="--cpus 0.1"
    uptime
    nice -n 5 /work/main/.venv/bin/python $B --root $root --models resnet18,mobilenet_v2,googlenet --policies auto,fixed \
        --requests 12 --uplink-mbps 100 $extra --json $OUT/$name.json > $OUT/$name.txt 2>&1
  done
done
uptime
