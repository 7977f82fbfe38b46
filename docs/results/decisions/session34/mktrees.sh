#!/bin/bash
# The two trees ab.sh, ab_choose.py and ab_replay.py compare: /work/wt/s34/before = git archive BEFORE_COMMIT,
# /work/wt/s34/after = git archive AFTER_COMMIT (each with its commit in .commit).
#   bash docs/results/decisions/session34/mktrees.sh BEFORE_COMMIT AFTER_COMMIT
set -e
for side in before after; do
  c=$1; [ "$side" = after ] && c=$2
  rm -rf "/work/wt/s34/$side" && mkdir -p "/work/wt/s34/$side"
  git -C /work/main archive "$c" | tar -x -C "/work/wt/s34/$side"
  git -C /work/main rev-parse --short "$c" > "/work/wt/s34/$side/.commit"
done
