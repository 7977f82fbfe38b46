#!/usr/bin/env bash
# The GPU checks, run from the repo root on a machine with CUDA (a session lent a GPU machine runs this there):
# the GPU tests, the CUDA server beside a CPU one (bench/bench_gpu_server.py) and the quick bench's stream scenario
# with the edge server on CUDA. Python packages the machine lacks may be given as wheels in .whl/ (installed into
# /tmp/site, first on PYTHONPATH). Writes its logs and results under $OUT (default /tmp/gpu_checks).
# Each step has its own time limit and the script goes on after a failed step.
set -u
OUT=${OUT:-/tmp/gpu_checks}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    > "$OUT/pip.log" 2>&1 || echo "wheel install failed (pip.log)"
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
{
  date -u; nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv; nproc
  python3 -c "import torch, grpc, google.protobuf as p; from modelgraph.tv_compat import import_torchvision as t; torchvision = t(); print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.is_available(), 'grpc', grpc.__version__, 'protobuf', p.__version__, 'torchvision', torchvision.__version__)"
} > "$OUT/env.txt" 2>&1
step() { # name, limit_s, command...
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS
  timeout -k 10 "$limit" "$@" > "$OUT/$name.log" 2>&1
  echo "$name: exit $? in $((SECONDS - t0)) s" | tee -a "$OUT/env.txt"
}
step gpu_tests "${GPU_TESTS_S:-200}" python3 -m pytest -v -m gpu -p no:cacheprovider -o addopts="" --timeout 150 \
  -o faulthandler_timeout=120 tests/test_gpu.py tests/test_profiler.py tests/test_server.py -rA
# the frozen-heap walk on the machine's own Python (session 29: it segfaulted a client's construction on 3.12)
step frozen_walk "${FROZEN_WALK_S:-120}" python3 -m pytest -v -p no:cacheprovider -o addopts="" --timeout 100 \
  tests/test_frozen_walk.py tests/test_gc_freeze.py -rA
step gpu_server "${GPU_SERVER_S:-150}" python3 bench/bench_gpu_server.py --requests 10 --json "$OUT/gpu_server.json"
if [ "${QUICK_S:-300}" -gt 0 ]; then
  rm -rf /tmp/quick_cuda  # (an earlier run's results are not copied as this one's)
  step quick_cuda "${QUICK_S:-300}" python3 -m testbed.cli bench --quick --scenarios stream --server-device cuda \
    --uplinks "${QUICK_UPLINKS:-100,400}" --out /tmp/quick_cuda
  for f in results.md results.json meta.json; do cp /tmp/quick_cuda/$f "$OUT/quick_cuda_$f" 2>/dev/null; done
fi
