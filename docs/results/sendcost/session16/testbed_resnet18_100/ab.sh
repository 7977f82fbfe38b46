#!/bin/sh
# testbed cell A/B: main before (clone-before) then this branch (clone), one locked session
set -e
for side in before now; do
  d=/work/sendcpu16-clone; [ $side = before ] && d=/work/sendcpu16-clone-before
  echo "$side $(git -C $d rev-parse --short HEAD) start: $(uptime)"
  (cd $d && PYTHONPATH=$d /work/main/.venv/bin/python -m testbed.cli bench --scenarios stream --models torchvision:resnet18 --cpus 0.1 --uplinks 100 --policies local,neurosurgeon-serial,coinfer --requests 6 --out /tmp/sc16/ab_$side > /tmp/sc16/ab_$side.log 2>&1)
  echo "$side end: $(uptime)"
done
