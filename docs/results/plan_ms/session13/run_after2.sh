set -e
R=/work/closedloop-after2
OUT=/work/closedloop-runs/after2
PY=/work/main/.venv/bin/python
run() {  # label model json [ue args...]
  label=$1; model=$2; json=$3; shift 3
  echo "== $label $(date -u +%H:%M:%S) $(uptime)"
  PYTHONPATH=$R $PY $R/bench/bench_plan_ms.py --root "$R" --cpus 0.1 --model "$model" --requests 8 \
    --label "$label" --json "$OUT/$json" -- "$@" | tail -14
}
run "after2, 300 ms pauses" torchvision:mobilenet_v2 ue10_mobilenet_v2_20mbps_after2_open300.json --uplink-mbps 20 --rtt-ms 20 --interval-ms 300
run "after2, 300 ms pauses" torchvision:googlenet ue10_googlenet_400mbps_after2_open300.json --uplink-mbps 400 --rtt-ms 20 --interval-ms 300
echo "== done $(date -u +%H:%M:%S) $(uptime)"
