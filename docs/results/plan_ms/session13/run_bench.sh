#!/bin/sh
# plan_ms per request on a 10 % UE (session 13, closedloop helper); run under the bench lock:
#   flock /work/wt/.bench.lock sh docs/results/plan_ms/session13/run_bench.sh OUTDIR ROOT LABEL
# ROOT: the checkout whose code runs (a clone of main before, of wt-closedloop after); LABEL names the JSONs.
# mobilenet_v2 at a 20 Mbit/s planning link and googlenet at 400 (sessions 11-12's cells), 8 requests each,
# closed loop and with 300 ms pauses, on a UE with 10 % of a core (10 ms CFS periods).
set -e
OUT=$1
R=$2
L=$3
PY=/work/main/.venv/bin/python
B=$(dirname "$0")/../../../..
run() {  # label model json [ue args...]
  label=$1; model=$2; json=$3; shift 3
  echo "== $label $(date -u +%H:%M:%S) $(uptime)"
  PYTHONPATH=$R $PY $R/bench/bench_plan_ms.py --root "$R" --cpus 0.1 --model "$model" --requests 8 \
    --label "$label" --json "$OUT/$json" -- "$@" | tail -14
}
run "$L, closed loop" torchvision:mobilenet_v2 ue10_mobilenet_v2_20mbps_${L}_closed.json --uplink-mbps 20 --rtt-ms 20
run "$L, 300 ms pauses" torchvision:mobilenet_v2 ue10_mobilenet_v2_20mbps_${L}_open300.json --uplink-mbps 20 --rtt-ms 20 --interval-ms 300
run "$L, closed loop" torchvision:googlenet ue10_googlenet_400mbps_${L}_closed.json --uplink-mbps 400 --rtt-ms 20
run "$L, 300 ms pauses" torchvision:googlenet ue10_googlenet_400mbps_${L}_open300.json --uplink-mbps 400 --rtt-ms 20 --interval-ms 300
echo "== done $(date -u +%H:%M:%S) $(uptime)"
