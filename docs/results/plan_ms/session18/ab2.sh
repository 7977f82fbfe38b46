#!/bin/bash
# Session 18 (replan18): split_sent_bytes kept per profile. after (a45b4a8) / after2 (this commit), IONN, real
# client, full core, interleaved, two rounds.
set -e
cd "$(dirname "$0")/../../../.."
OUT=docs/results/plan_ms/session18
PY=.venv/bin/python
uptime
for round in 1 2; do
  for root in /tmp/r18/after /tmp/r18/after2; do
    $PY bench/bench_request_plan.py --root $root --models resnet18,mobilenet_v2,googlenet --policies ionn \
      --requests 8 --uplink-mbps 400 --json $OUT/ionn2_$(basename $root)_$round.json > $OUT/ionn2_$(basename $root)_$round.txt 2>&1
  done
done
uptime
