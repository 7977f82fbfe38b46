#!/bin/bash
# before / after, side by side, one locked run
cd /work/wt/replan17
uptime
for i in 1; do
  for root in /tmp/r17/before /tmp/r17/after; do
    PYTHONPATH=$root /work/wt/replan17/.venv/bin/python /work/wt/replan17/bench/bench_request_plan.py --root $root --models mobilenet_v2,googlenet,resnet18 --policies auto,ionn --requests 8 --uplink-mbps 100 --json /tmp/r17/rp_$(basename $root).json > /tmp/r17/rp_$(basename $root).txt 2>&1
    uptime
  done
done
/tmp/r17/ab2.sh
