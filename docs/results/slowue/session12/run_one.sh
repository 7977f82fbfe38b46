#!/bin/sh
# One locked run: a resnet50 10 %/400 stream cell (local, coinfer) and multi-UE N = 1, from the clone $1,
# results under $2; extra environment (e.g. COINFER_BENCH_GC_FREEZE=0) from the caller.
# Usage: flock /work/wt/.bench.lock sh run_one.sh CLONE OUT
set -e
cd "$1"
mkdir -p "$2"
{ date -u; uptime; git log --oneline -1; env | grep '^COINFER_' || true; } > "$2/load_before.txt"
t=$(date +%s)
PYTHONPATH=$PWD /work/main/.venv/bin/python -m testbed.cli bench --out "$2/cell" --scenarios stream \
  --models resnet50 --cpus 0.1 --uplinks 400 --policies local,coinfer > "$2/cell.console" 2>&1
t2=$(date +%s)
PYTHONPATH=$PWD /work/main/.venv/bin/python -m testbed.cli bench --out "$2/multi" --scenarios multi \
  --models resnet18,mobilenet_v2 --cpus 0.1,0.25 --uplinks 20,400 --multi-n 1 > "$2/multi.console" 2>&1
t3=$(date +%s)
{ date -u; uptime; echo "cell_s $((t2 - t)) multi_s $((t3 - t2))"; } > "$2/load_after.txt"
