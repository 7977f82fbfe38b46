#!/bin/bash
cd /work/wt/replan17
uptime
for root in /tmp/r17/before /tmp/r17/after; do
  PYTHONPATH=$root /work/wt/replan17/.venv/bin/python /work/wt/replan17/bench/bench_replan_paths.py --repeats 30 --json /tmp/r17/paths_$(basename $root).json > /tmp/r17/paths_$(basename $root).txt 2>&1
done
for root in /tmp/r17/before /tmp/r17/after; do
  PYTHONPATH=$root /work/wt/replan17/.venv/bin/python /work/wt/replan17/bench/bench_replan_paths.py --policy ionn --repeats 10 --json /tmp/r17/paths_ionn_$(basename $root).json > /tmp/r17/paths_ionn_$(basename $root).txt 2>&1
done
uptime
