#!/bin/sh
# review19 F4/F5 probes before (BEFORE: a worktree at d4747cb, before both fixes) and after (this tree), one after
# the other under the bench lock, each probe run in its tree (the probe scripts are this tree's).
# Usage, from the repository root: sh docs/results/attack/session19/run_attack19b.sh BEFORE_DIR
BEFORE=$1
HERE=$(pwd)
D=$HERE/docs/results/attack/session19
for tree in "$BEFORE" "$HERE"; do
  echo "== $(git -C "$tree" rev-parse --short HEAD)"
  (cd "$tree" && PYTHONPATH=$tree "$HERE/.venv/bin/python" "$D/validation_memory_probe.py" 16)
  (cd "$tree" && PYTHONPATH=$tree "$HERE/.venv/bin/python" "$D/sandbox_budget_probe.py")
done
