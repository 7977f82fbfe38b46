#!/bin/sh
# Before/after of the background planner and the transport re-plan rule (session 12, bgplan helper); run under
# the bench lock: flock /work/wt/.bench.lock sh docs/results/bgplan/session12/run_bench.sh OUTDIR
# BEFORE: a clone of main at 1690d8e; AFTER: a clone of wt-bgplan. mobilenet_v2 at a 20 Mbit/s planning link
# and googlenet at 400 (session 11's cells), 8 requests each on a UE with 10 % of a core (10 ms CFS periods).
set -e
OUT=$1
B=/work/bgplan-before
A=/work/bgplan-clone
PY=/work/main/.venv/bin/python
run() {  # label root model json [ue args...]
  label=$1; root=$2; model=$3; json=$4; shift 4
  echo "== $label $(date -u +%H:%M:%S) $(uptime)"
  PYTHONPATH=$A $PY $A/bench/bench_plan_ms.py --root "$root" --cpus 0.1 --model "$model" --requests 8 \
    --label "$label" --json "$OUT/$json" -- "$@" | tail -6
}
run "before, closed loop" $B torchvision:mobilenet_v2 ue10_mobilenet_v2_20mbps_before_closed.json --uplink-mbps 20 --rtt-ms 20
run "after, background, closed loop" $A torchvision:mobilenet_v2 ue10_mobilenet_v2_20mbps_after_bg_closed.json --uplink-mbps 20 --rtt-ms 20 --plan background
run "after, background, open loop 300 ms" $A torchvision:mobilenet_v2 ue10_mobilenet_v2_20mbps_after_bg_open300.json --uplink-mbps 20 --rtt-ms 20 --plan background --interval-ms 300
run "after, inline, closed loop" $A torchvision:mobilenet_v2 ue10_mobilenet_v2_20mbps_after_inline_closed.json --uplink-mbps 20 --rtt-ms 20 --plan inline
run "before, open loop 300 ms" $B torchvision:mobilenet_v2 ue10_mobilenet_v2_20mbps_before_open300.json --uplink-mbps 20 --rtt-ms 20 --interval-ms 300
run "before, closed loop" $B torchvision:googlenet ue10_googlenet_400mbps_before_closed.json --uplink-mbps 400 --rtt-ms 20
run "after, background, closed loop" $A torchvision:googlenet ue10_googlenet_400mbps_after_bg_closed.json --uplink-mbps 400 --rtt-ms 20 --plan background
echo "== done $(date -u +%H:%M:%S) $(uptime)"
