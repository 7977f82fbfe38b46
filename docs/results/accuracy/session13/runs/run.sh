#!/bin/bash
# before/after warm-scenario cells, interleaved, each pair under the shared lock
set -u
OUT=/work/warmacc-runs
cell() {  # name model cpus uplinks
  name=$1; shift
  flock /work/wt/.bench.lock bash -c "
    for v in before after; do
      cd /work/warmacc-\$v
      echo \"\$v $name start \$(date -u +%T) \$(uptime)\" >> $OUT/uptime.txt
      PYTHONPATH=\$PWD timeout 900 /work/main/.venv/bin/python -m testbed.cli bench --scenarios warm --models $1 --cpus $2 --uplinks $3 --out $OUT/\$v-$name > $OUT/\$v-$name.console 2>&1
      echo \"\$v $name end rc=\$? \$(date -u +%T) \$(uptime)\" >> $OUT/uptime.txt
    done"
}
cell googlenet googlenet 0.1 100,400
cell mobilenet_v2 mobilenet_v2 0.1 400
cell resnet50 resnet50 0.1 400
echo done >> $OUT/uptime.txt
