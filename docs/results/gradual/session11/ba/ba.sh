#!/bin/bash
# before (088a8a8) and after (the gradual planner) on the same cells, back to back under one lock hold
OUT=/work/invest-runs/ba
mkdir -p $OUT
for side in before after; do
  if [ $side = before ]; then D=/work/invest-clone; else D=/work/invest-after; fi
  echo "$side $(cd $D && git log --oneline -1) start $(date -u +%T) $(uptime)" >> $OUT/uptime.txt
  (cd $D && PYTHONPATH=$D /work/main/.venv/bin/python -m testbed.cli bench --scenarios stream --models googlenet --cpus 0.25,0.1 --uplinks 100 --policies local,ionn,coinfer --out $OUT/$side-googlenet) > $OUT/$side-googlenet.log 2>&1
  (cd $D && PYTHONPATH=$D /work/main/.venv/bin/python -m testbed.cli bench --scenarios stream --models mobilenet_v2 --cpus 0.1 --uplinks 400 --policies local,ionn,coinfer --out $OUT/$side-mobilenet) > $OUT/$side-mobilenet.log 2>&1
  echo "$side end $(date -u +%T) $(uptime)" >> $OUT/uptime.txt
done
