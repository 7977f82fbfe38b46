#!/bin/bash
# The real client's decisions before / after session 30 (bench/bench_request_plan.py, as session 29's ab.sh):
# "before" = a worktree at 388306e0 (git worktree add --detach /tmp/wt_old 388306e0), 3 rounds alternating;
# then `python3 docs/results/decisions/session29/summarize.py` reads the JSONs given.
cd "$(git rev-parse --show-toplevel)"
out=docs/results/decisions/session30/request_plan
for i in 1 2 3; do
  for side in before after; do
    root=$PWD; [ $side = before ] && root=/tmp/wt_old
    .venv/bin/python bench/bench_request_plan.py --models googlenet,resnet18 --policies auto --requests 5 \
      --uplink-mbps 400 --root "$root" --json $out/$side$i.json > /dev/null 2>&1
  done
done
