#!/bin/bash
# Session 18 (replan18): before (main at 9f12c68, the session's start) / after (this branch), one locked run,
# one after the other per bench. Roots are `git archive` snapshots: /tmp/r18/before, /tmp/r18/after.
set -e
cd "$(dirname "$0")/../../../.."
OUT=docs/results/plan_ms/session18
PY=.venv/bin/python
uptime
for root in /tmp/r18/before /tmp/r18/after; do
  PYTHONPATH=$root $PY bench/bench_replan_paths.py --policy ionn --repeats 20 \
    --json $OUT/paths_ionn_$(basename $root).json > $OUT/paths_ionn_$(basename $root).txt 2>&1
done
for mbps in 400 100; do
  for root in /tmp/r18/before /tmp/r18/after; do
    $PY bench/bench_request_plan.py --root $root --models resnet18,mobilenet_v2,googlenet --policies auto,ionn \
      --requests 8 --uplink-mbps $mbps --json $OUT/rp_${mbps}_$(basename $root).json > $OUT/rp_${mbps}_$(basename $root).txt 2>&1
  done
done
uptime
