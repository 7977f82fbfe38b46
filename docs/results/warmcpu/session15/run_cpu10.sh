#!/bin/sh
# bench_warm_cpu10 under the shared lock (called as: flock /work/wt/.bench.lock sh run_cpu10.sh TAG [args...])
tag=$1; shift
cd "${ROOTDIR:-$(dirname "$0")/../../../..}" || exit 1
out=${OUTDIR:-docs/results/warmcpu/session15}
{ echo "uptime before: $(uptime)"; git log --oneline -1
  PYTHONPATH=$PWD timeout 1200 /work/main/.venv/bin/python bench/bench_warm_cpu10.py --json $out/cpu10_$tag.json "$@"
  echo "uptime after: $(uptime)"; } > $out/cpu10_$tag.txt 2>&1
