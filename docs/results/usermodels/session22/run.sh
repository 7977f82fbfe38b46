#!/bin/sh
# Before (BEFORE: a tree at main before models22, 6e48fb2) and after (AFTER: a tree at the change), each run from
# its tree's root: the repro once each (repro22_out.jsonl), then capture's CPU and wall time (capture_cpu.py) and the
# recorder's per-forward cost (recorder_cost.py), before and after alternated twice, all under one hold of the
# machine's bench lock (cpu_out.jsonl, recorder_out.jsonl). loaded_run_3401f04/ and first_run_d52893b/ hold earlier
# runs with session 21's capture_cost.py in place of capture_cpu.py (cost_out.jsonl).
# usage: sh docs/results/usermodels/session22/run.sh BEFORE_TREE AFTER_TREE
set -u
here=$(cd "$(dirname "$0")" && pwd)
if [ "${SKIP_REPRO:-0}" != 1 ]; then
  for tree in "$1" "$2"; do
    (cd "$tree" && PYTHONPATH=$tree nice -n 5 .venv/bin/python "$here/repro22.py" "$(basename "$tree")" 2>/dev/null)
  done > "$here/repro22_out.jsonl"
fi
flock ${LOCK_WAIT:+-w $LOCK_WAIT} /work/wt/.bench.lock sh -c '
for i in 1 2; do
  for tree in "$2" "$3"; do
    (cd "$tree" && PYTHONPATH=$tree .venv/bin/python "$1/capture_cpu.py" "$tree" 2>/dev/null | tail -1) >> "$1/cpu_out.jsonl"
    (cd "$tree" && PYTHONPATH=$tree .venv/bin/python "$1/recorder_cost.py" "$tree" 2>/dev/null | tail -1) >> "$1/recorder_out.jsonl"
  done
done' sh "$here" "$1" "$2"
