#!/bin/bash
# Session 21 (plan21): testbed stream cells at a 10 % UE (10 ms CFS period), before / after, one after the other
# under one bench lock. after = main at 2566785 (c303a0b: the backlog read skipped when no weights were handed over
# within quiet_s; 2566785: OnlineTable.warm), before = the same tree with those two commits reverted (git revert
# --no-commit 2566785 c303a0b). Roots are detached worktrees.
#   flock /work/wt/.bench.lock docs/results/plan_ms/session21/ab_testbed.sh [ROUND]
set -e
OUT=${OUT:-/tmp/p21/ab}
R=${1:-1}
mkdir -p $OUT
for root in /tmp/p21/before /tmp/p21/after; do
  name=$(basename $root)$R
  uptime
  (cd $root && PYTHONPATH=$root nice -n 5 /work/main/.venv/bin/python -m testbed.cli bench --scenarios stream \
      --models mobilenet_v2,resnet50,googlenet,resnet18 --uplinks 400,100 --cpus 0.1 --policies local,coinfer \
      --out $OUT/$name) > $OUT/$name.log 2>&1
done
uptime
