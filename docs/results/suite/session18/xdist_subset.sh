#!/usr/bin/env bash
# The same test files in one process and under pytest-xdist (-n 2 --dist loadfile), back to back, with the
# machine's load before each; run under `flock /work/wt/.bench.lock` from the repository root.
set -u
FILES="tests/test_ue_client.py tests/test_send_rate.py tests/test_refusals.py tests/test_attack16.py
tests/test_server.py tests/test_background_plan.py tests/test_user_zoo.py tests/test_ue_threads.py
tests/test_prefix_beside_upload.py tests/test_server_cli.py tests/test_ue_client_parts.py tests/test_modelgraph_split.py
tests/test_profiler.py tests/test_plan_process.py tests/test_bench.py tests/test_e2e_runtime.py tests/test_tarpit.py
tests/test_attack17.py tests/test_zoo.py tests/test_partitioner_props.py"
PY=.venv/bin/python
for mode in serial xdist; do
  args=""; [ "$mode" = xdist ] && args="-n 2 --dist loadfile"
  echo "== $mode: load $(cut -d' ' -f1-3 /proc/loadavg) at $(date -u +%T)"
  s=$(date +%s.%N)
  PYTHONPATH=$PWD $PY -m pytest -q -p no:cacheprovider $args $FILES 2>&1 | grep -E "passed|failed" | tail -1
  e=$(date +%s.%N)
  echo "$mode wall_s $(echo "$e - $s" | bc)  load after $(cut -d' ' -f1-3 /proc/loadavg)"
done
