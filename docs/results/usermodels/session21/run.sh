#!/bin/sh
# Before (BEFORE: a tree at main before this change, 4bd5fad) and after (AFTER: a tree at the change), each run from
# its tree's root: the entropy repro once each (entropy_out.jsonl), then capture cost, before and after alternated
# twice, all four under one hold of the machine's bench lock (cost_out.jsonl).
# usage: sh docs/results/usermodels/session21/run.sh BEFORE_TREE AFTER_TREE
set -u
here=$(cd "$(dirname "$0")" && pwd)
if [ "${SKIP_REPRO:-0}" != 1 ]; then
  for tree in "$1" "$2"; do
    (cd "$tree" && PYTHONPATH=$tree nice -n 5 .venv/bin/python "$here/entropy_repro.py" "$tree" 2>/dev/null)
  done > "$here/entropy_out.jsonl"
fi
flock ${LOCK_WAIT:+-w $LOCK_WAIT} /work/wt/.bench.lock sh -c '
for i in 1 2; do
  for tree in "$2" "$3"; do
    (cd "$tree" && PYTHONPATH=$tree .venv/bin/python "$1/capture_cost.py" "$tree" 2>/dev/null | tail -1)
  done
done' sh "$here" "$1" "$2" > "$here/cost_out.jsonl"
