#!/bin/sh
# Session 15 experiment (coldauto): the worker's send cost from its connect-time probe (A) or fixed at the value
# grid 14's stream bound measured in the same cell (B: COLDAUTO_SEND_MS_PER_MB, send_cost_knob.patch): resnet18
# 10 %/400 (9.69 ms/MB) alternated twice, then mobilenet_v2 10 %/100 (46.28 ms/MB) once each.
# Run from a clone of the branch with the patch applied, under the bench lock.
set -e
OUT=${1:-/work/coldauto-runs}
run() {  # name model uplink send_ms_per_mb|""
  uptime > "$OUT/uptime_$1.txt"
  if [ -n "$4" ]; then export COLDAUTO_SEND_MS_PER_MB=$4; else unset COLDAUTO_SEND_MS_PER_MB; fi
  PYTHONPATH=$PWD /work/main/.venv/bin/python -m testbed.cli bench --scenarios stream --models "$2" --cpus 0.1 \
    --uplinks "$3" --policies local,neurosurgeon-serial,coinfer --out "$OUT/$1" > "$OUT/$1.log" 2>&1
  uptime >> "$OUT/uptime_$1.txt"
}
run r18_A1 resnet18 400 ""
run r18_B1 resnet18 400 9.69
run r18_A2 resnet18 400 ""
run r18_B2 resnet18 400 9.69
run mnv2_A1 mobilenet_v2 100 ""
run mnv2_B1 mobilenet_v2 100 46.28
