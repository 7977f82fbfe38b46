#!/bin/bash
# Session 20 (plan20): the plan window's clock order, before / after, one after the other under one bench lock:
# before = main at 4b071b3 (wall clock read first at the window's start), after = main at 8884a8b
# (client.window_clocks: the thread's CPU clock first at both ends). Roots are detached worktrees.
#   flock /work/wt/.bench.lock docs/results/plan_ms/session20/ab_window.sh
set -e
OUT=${OUT:-/tmp/p20/abw}
for root in /tmp/p20/w_before /tmp/p20/w_after; do
  name=$(basename $root)
  uptime
  (cd $root && PYTHONPATH=$root .venv/bin/coinfer-testbed bench --scenarios stream \
      --models mobilenet_v2,googlenet,resnet18 --uplinks 400,20 --cpus 0.1 --policies local,coinfer \
      --out $OUT/$name) > $OUT.$name.log 2>&1
done
uptime
