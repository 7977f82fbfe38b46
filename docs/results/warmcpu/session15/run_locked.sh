#!/bin/sh
# Under flock /work/wt/.bench.lock: (1) bench_warm_cpu10 on this branch's clone, fixed / auto / auto-all in two UE
# processes each, 30 rounds; (2) the testbed's 10 % / 400 Mbit/s stream cell per model, main's clone then this
# branch's, back to back, 12 requests per stream, thread CPU on.
set -u
B=/work/uecpu-clone; M=/work/uecpu-main; R=/work/uecpu-runs; mkdir -p $R
OUT=/work/wt/uecpu/docs/results/warmcpu/session15
ROOTDIR=$B OUTDIR=$OUT sh $B/docs/results/warmcpu/session15/run_cpu10.sh steady --models resnet18,mobilenet_v2 \
  --variants fixed,auto,auto-all,fixed#2,auto#2,auto-all#2 --rounds 30
for k in main branch; do
  d=$B; [ $k = main ] && d=$M
  cd $d
  echo "== $k $(git log --oneline -1 | cut -c1-12) $(date -u +%H:%M:%S) load: $(cat /proc/loadavg)"
  COINFER_BENCH_THREAD_CPU=1 PYTHONPATH=$PWD timeout 900 /work/main/.venv/bin/python -m testbed.cli bench \
    --scenarios stream --models resnet18,mobilenet_v2 --cpus 0.1 --uplinks 400 --requests 12 \
    --policies local,neurosurgeon-serial,coinfer --out $R/$k > $R/$k.log 2>&1
  echo "== $k done rc=$? $(date -u +%H:%M:%S) load: $(cat /proc/loadavg)"
done
