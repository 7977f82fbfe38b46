#!/bin/bash
OUT=/work/invest-runs/dec
mkdir -p $OUT
CG=/work/wt/invest/docs/results/cold/session10/costgraphs
for side in before after; do
  if [ $side = before ]; then D=/work/invest-clone; else D=/work/invest-dec; fi
  echo "$side $(cd $D && git log --oneline -1) start $(date -u +%T) $(uptime)" >> $OUT/uptime.txt
  (cd $D && PYTHONPATH=$D /work/main/.venv/bin/python bench/bench_decisions.py --captured $CG --repeats 1 --json $OUT/bench_decisions_$side.json) > $OUT/$side.log 2>&1
  echo "$side end $(date -u +%T) $(uptime)" >> $OUT/uptime.txt
done
