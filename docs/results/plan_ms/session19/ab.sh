#!/bin/bash
# Session 19 (replan19): before (main at 6ee5729, the session's start) / after (this branch), one locked run,
# interleaved. Roots are `git archive` snapshots: /tmp/r19/before, /tmp/r19/after. Run as
#   flock /work/wt/.bench.lock docs/results/plan_ms/session19/ab.sh
set -e
cd "$(dirname "$0")/../../../.."
OUT=docs/results/plan_ms/session19
PY=.venv/bin/python
uptime
# in process, the stream of bench_replan_paths with cold caches and state memos (--flush-mb 64), 400 and 100 Mbit/s
for mbps in 400 100; do
  for root in /tmp/r19/before /tmp/r19/after; do
    PYTHONPATH=$root $PY bench/bench_replan_paths.py --repeats 20 --uplink-mbps $mbps --flush-mb 64 \
      --json $OUT/paths_${mbps}_$(basename $root).json > $OUT/paths_${mbps}_$(basename $root).txt 2>&1
  done
done
# a real client and server, full core, three rounds, before and after alternating
for round in 1 2 3; do
  for mbps in 400 100; do
    for root in /tmp/r19/before /tmp/r19/after; do
      $PY bench/bench_request_plan.py --root $root --models resnet18,mobilenet_v2,googlenet --policies auto \
        --requests 8 --uplink-mbps $mbps --json $OUT/rp_${mbps}_$(basename $root)_$round.json \
        > $OUT/rp_${mbps}_$(basename $root)_$round.txt 2>&1
    done
  done
done
uptime
