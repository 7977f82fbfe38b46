#!/bin/bash
# Session 18 (replan18): the same real-client bench under a 10 % CPU quota (10 ms CFS period), before / after,
# interleaved, two rounds. Roots as in ab.sh.
set -e
cd "$(dirname "$0")/../../../.."
OUT=docs/results/plan_ms/session18
PY=.venv/bin/python
uptime
for round in 1 2; do
  for mbps in 400 100; do
    for root in /tmp/r18/before /tmp/r18/after; do
      $PY bench/bench_request_plan.py --root $root --models resnet18,mobilenet_v2,googlenet --policies auto,ionn \
        --requests 8 --uplink-mbps $mbps --cpus 0.1 \
        --json $OUT/q_${mbps}_$(basename $root)_$round.json > $OUT/q_${mbps}_$(basename $root)_$round.txt 2>&1
    done
  done
done
uptime
