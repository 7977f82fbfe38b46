#!/bin/bash
# Session 20 (plan20): testbed stream cells at a 10 % UE (10 ms CFS period), before / after, one after the other
# under one bench lock. before = main at 4823624 with this session's two plan20 changes off (cc6fcc8 reverted, the
# send-cost rule disabled; the held-answer diagnostic kept), after = main at 4823624. Roots are detached worktrees.
#   flock /work/wt/.bench.lock docs/results/plan_ms/session20/ab_testbed.sh
set -e
OUT=${OUT:-/tmp/p20/ab}
for root in /tmp/p20/before /tmp/p20/after; do
  name=$(basename $root)
  uptime
  (cd $root && PYTHONPATH=$root .venv/bin/coinfer-testbed bench --scenarios stream \
      --models mobilenet_v2,resnet50,googlenet,resnet18 --uplinks 400,20 --cpus 0.1 --policies local,coinfer \
      --out $OUT/$name) > $OUT.$name.log 2>&1
done
uptime
