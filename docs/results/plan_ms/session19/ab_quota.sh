#!/bin/bash
# Session 19 (replan19): the same real-client bench under a 10 % CPU quota (10 ms CFS period), before / after,
# interleaved, one round, auto only. Roots as in ab.sh.
set -e
cd "$(dirname "$0")/../../../.."
OUT=docs/results/plan_ms/session19
PY=.venv/bin/python
uptime
for round in 1; do
  for mbps in 400 100; do
    for root in /tmp/r19/before /tmp/r19/after; do
      $PY bench/bench_request_plan.py --root $root --models resnet18,mobilenet_v2,googlenet --policies auto \
        --requests 8 --uplink-mbps $mbps --cpus 0.1 \
        --json $OUT/q_${mbps}_$(basename $root)_$round.json > $OUT/q_${mbps}_$(basename $root)_$round.txt 2>&1
    done
  done
done
uptime
