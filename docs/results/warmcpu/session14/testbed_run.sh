#!/bin/sh
# testbed: one 10 % / 400 Mbit/s cell per model, after (this branch) then before (7879fa9), back to back
for k in after before; do
  d=/work/cheapwarm-clone; [ $k = before ] && d=/work/cheapwarm-before
  cd $d
  echo "== $k $(git log --oneline -1 | cut -c1-12) $(date -u +%H:%M:%S) load: $(cat /proc/loadavg)"
  PYTHONPATH=$PWD timeout 900 /work/main/.venv/bin/python -m testbed.cli bench --scenarios stream --models mobilenet_v2,resnet18 --cpus 0.1 --uplinks 400 --policies local,neurosurgeon-serial,coinfer --out /work/cw-tb/$k > /work/cw-tb/$k.log 2>&1
  echo "== $k done rc=$? $(date -u +%H:%M:%S) load: $(cat /proc/loadavg)"
done
# (run under flock /work/wt/.bench.lock; results.json/md, meta.json, logs/ue*.json and the bench logs copied to testbed_after/ and testbed_before/ here, without logs/credentials)
