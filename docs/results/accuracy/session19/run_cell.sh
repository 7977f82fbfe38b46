#!/bin/bash
# Session 19's runtime (the call's time before its run forecast, not measured) on session 18's A/B cell, ROUNDS
# runs of MODEL, under the bench lock as one measurement. Each request's row carries both the new prediction
# (predicted_ms: forecast + run prediction + after-term) and what session 18's formula gave for the same request
# (call_before_ms measured + run_predicted_ms + call_after_ms): summary.py scores both on the same requests.
# Usage: [ROUNDS="1 2 3 4"] [MODEL=resnet18] flock /work/wt/.bench.lock bash run_cell.sh REPO OUTDIR
set -e
R=$1; OUT=$2
ARGS="bench --cpus 0.1 --uplinks 400 --scenarios stream,warm --models ${MODEL:-resnet18} --policies local,coinfer --requests 16 --warm-requests 18"
for k in ${ROUNDS:-1 2 3 4}; do
  (cd "$R" && .venv/bin/python -m testbed.cli $ARGS --out "$OUT/run$k") 2>&1 | tail -2
done
