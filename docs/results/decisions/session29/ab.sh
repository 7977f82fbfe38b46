#!/bin/bash
# Before / after side by side (session 29): the "before" code in a worktree at the commit before the change
# (git worktree add --detach /tmp/rp/before a014a287~1), alternating 3 rounds; then `python3 summarize.py` here.
cd "$(git rev-parse --show-toplevel)"
out=docs/results/decisions/session29
for i in 1 2 3; do
  for side in before after; do
    root=$PWD; [ $side = before ] && root=/tmp/rp/before
    .venv/bin/python bench/bench_request_plan.py --models googlenet,resnet18 --policies auto --requests 5 \
      --uplink-mbps 400 --root "$root" --json $out/$side$i.json > /dev/null 2>&1
  done
done
