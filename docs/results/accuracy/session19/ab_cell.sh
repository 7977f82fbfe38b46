#!/bin/bash
# Two runtimes on session 18's A/B cell, alternating (ABAB), under the bench lock as one measurement: A = step 1
# (094e569: the time before the run forecast per kind of call, one mean of the time after it), B = step 2
# (c51be75: also the time after the run per plan kind, and the 'uploading' kind before it). Each request's row
# also carries session 18's formula for the same request (summary.py). A, B: checkouts of the two (with .venv).
# Usage: [ROUNDS="1 2"] [MODEL=resnet18] flock /work/wt/.bench.lock bash ab_cell.sh A B OUTDIR
set -e
A=$1; B=$2; OUT=$3
ARGS="bench --cpus 0.1 --uplinks 400 --scenarios stream,warm --models ${MODEL:-resnet18} --policies local,coinfer --requests 16 --warm-requests 18"
for k in ${ROUNDS:-1 2}; do
  for side in A B; do
    dir=$A; [ $side = B ] && dir=$B
    (cd "$dir" && .venv/bin/python -m testbed.cli $ARGS --out "$OUT/run${side}$k") 2>&1 | tail -1
  done
done
