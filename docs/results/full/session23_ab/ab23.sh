#!/bin/bash
# A/B of googlenet's local stream at a 10 % UE, 100 Mbps: session 21's commit (4bee309) vs this session's (629d318)
for round in 1 2; do
  for tree in ab21 grid23; do
    cd /work/$tree && t0=$(date +%s)
    flock /work/wt/.bench.lock env PYTHONPATH=$PWD /work/main/.venv/bin/coinfer-testbed bench --out /tmp/ab23/$tree-$round \
      --scenarios stream --models googlenet --cpus 0.1 --uplinks 100 --policies local,coinfer --requests 8 > /tmp/ab23/$tree-$round.log 2>&1
    echo "$tree round $round rc=$? $(( $(date +%s) - t0 )) s: $(grep '^\[' /tmp/ab23/$tree-$round.log | tail -1 | cut -c1-160)"
  done
done
