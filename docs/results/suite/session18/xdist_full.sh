#!/usr/bin/env bash
# The whole default suite under pytest-xdist, 2 workers, --dist loadfile (what `make test` runs);
# run under `flock /work/wt/.bench.lock` from the repository root.
set -u
PY=.venv/bin/python
for dist in ${DISTS:-loadfile}; do
  echo "== $dist: load $(cut -d' ' -f1-3 /proc/loadavg) at $(date -u +%T) on $(git rev-parse --short HEAD)"
  s=$(date +%s.%N)
  PYTHONPATH=$PWD $PY -m pytest -q -p no:cacheprovider -n 2 --dist $dist --durations=15 --junitxml=/tmp/suite18_full_$dist.xml tests > /tmp/suite18_full_$dist.log 2>&1
  e=$(date +%s.%N)
  grep -E "^FAILED|^ERROR| passed| failed" /tmp/suite18_full_$dist.log | tail -5
  echo "$dist wall_s $(echo "$e - $s" | bc)  load after $(cut -d' ' -f1-3 /proc/loadavg)"
done
