#!/bin/bash
# before = /tmp/pm/before (e408dfc3), after = /work/main; 3 rounds alternating
cd /work/main
out=docs/results/decisions/session30/plan_path
for i in 1 2 3; do
  for side in before after; do
    root=$PWD; [ $side = before ] && root=/tmp/pm/before
    .venv/bin/python bench/bench_request_plan.py --models resnet18 --policies auto --requests 5 \
      --uplink-mbps 400 --root "$root" --json $out/$side$i.json > /dev/null 2>&1
  done
done
