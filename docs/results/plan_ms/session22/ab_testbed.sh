#!/bin/bash
# Session 22 (plan22): testbed stream cells at a 10 % UE, before then after, one after the other under one bench
# lock; roots as in ab_request_plan.sh. COINFER_BENCH_THREAD_CPU=1: per-thread CPU per request.
#   flock /work/wt/.bench.lock docs/results/plan_ms/session22/ab_testbed.sh [ROUND]
set -e
OUT=${OUT:-/tmp/p22/ab}
R=${1:-1}
mkdir -p $OUT
for root in /tmp/p22/b2 /tmp/p22/a2; do
  name=$(basename $root)_$R
  uptime
  (cd $root && COINFER_BENCH_THREAD_CPU=1 PYTHONPATH=$root nice -n 5 /work/main/.venv/bin/python -m testbed.cli bench \
      --scenarios stream --models googlenet,resnet18 --uplinks 100,400 --cpus 0.1 \
      --policies local,neurosurgeon-serial,coinfer --out $OUT/$name) > $OUT/$name.log 2>&1
done
uptime
