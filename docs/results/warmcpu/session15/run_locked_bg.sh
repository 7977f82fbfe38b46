#!/bin/sh
# Under flock /work/wt/.bench.lock, after run_locked.sh: the same testbed cells on this branch's clone with the
# clients' background planner on (COINFER_BENCH_PLAN_BACKGROUND=1: each next decision made on the worker thread
# after a request returned, while the paired local request runs).
set -u
B=/work/uecpu-clone; R=/work/uecpu-runs; mkdir -p $R
cd $B
echo "== branch-bg $(git log --oneline -1 | cut -c1-12) $(date -u +%H:%M:%S) load: $(cat /proc/loadavg)"
COINFER_BENCH_PLAN_BACKGROUND=1 COINFER_BENCH_THREAD_CPU=1 PYTHONPATH=$PWD timeout 900 /work/main/.venv/bin/python \
  -m testbed.cli bench --scenarios stream --models resnet18,mobilenet_v2 --cpus 0.1 --uplinks 400 --requests 12 \
  --policies local,neurosurgeon-serial,coinfer --out $R/branch-bg > $R/branch-bg.log 2>&1
echo "== branch-bg done rc=$? $(date -u +%H:%M:%S) load: $(cat /proc/loadavg)"
