#!/bin/bash
# one locked run: before (main at 8b8bce8, without the shared decision) and after (wt-prefix17) side by side
set -x
uptime
run() {  # tree out models
  (cd "$1" && COINFER_BENCH_THREAD_CPU=1 PYTHONPATH="$1" /work/main/.venv/bin/python -m testbed.cli bench --scenarios stream \
     --models "$3" --cpus 0.1 --uplinks 400 --policies local,neurosurgeon-serial,coinfer --out "$2")
}
B=/tmp/prefix17/before; A=/work/wt/prefix17; O=/tmp/prefix17/ab
date; run $B $O/r18_before_1 resnet18; date
run $A $O/r18_after_1 resnet18; date
uptime
run $B $O/mnv2_before_1 mobilenet_v2; date
run $A $O/mnv2_after_1 mobilenet_v2; date
uptime
(cd $A && PYTHONPATH=$A timeout 120 /work/main/.venv/bin/python /tmp/prefix17/dec_bench.py $O/dec_bench.json)
date; uptime
