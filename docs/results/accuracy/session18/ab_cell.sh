#!/bin/bash
# Before (main at 9f12c68, session 17's runtime) and after (this session's) on one testbed cell, alternating
# (ABAB), under the bench lock as one measurement. BEFORE / AFTER: checkouts of the two commits (each with .venv).
# Usage: [ROUNDS="1 2"] [MODEL=resnet18] flock /work/wt/.bench.lock bash ab_cell.sh BEFORE AFTER OUTDIR
set -e
B=$1; A=$2; OUT=$3
ARGS="bench --cpus 0.1 --uplinks 400 --scenarios stream,warm --models ${MODEL:-resnet18} --policies local,coinfer --requests 16 --warm-requests 18"
for k in ${ROUNDS:-1 2}; do
  for side in before after; do
    dir=$B; [ $side = after ] && dir=$A
    (cd "$dir" && .venv/bin/python -m testbed.cli $ARGS --out "$OUT/$side$k") 2>&1 | tail -2
  done
done
