#!/bin/sh
# A/B of the connect-time probe's sample: old = 1690d8e, new = d6e4783 (session 12, sendcost helper)
for v in old new; do
  if [ $v = old ]; then d=/work/sendcost-old; else d=/work/sendcost-clone; fi
  echo "$v start: $(uptime)" >> /work/sendcost-runs/uptime.txt
  cd $d && PYTHONPATH=$d timeout 600 /work/main/.venv/bin/python -m testbed.cli bench --scenarios stream \
    --models googlenet,mobilenet_v2 --cpus 0.1 --uplinks 400 --policies local,dads-serial,coinfer \
    --out /work/sendcost-runs/$v > /work/sendcost-runs/$v.log 2>&1
  echo "$v rc=$? end: $(uptime)" >> /work/sendcost-runs/uptime.txt
done
