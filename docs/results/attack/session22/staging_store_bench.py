"""Session 22 (staging22): the store's side of an upload alone (no gRPC), before/after side by side.

For each source tree (``--tree NAME=PATH``), in a subprocess importing that tree's ``edge_server.weight_store``:
resnet18's 122 state-dict tensors (46.8 MB) written into a fresh ``WeightStore`` in 1 MiB chunks and committed
(``begin_upload``, ``write``, ``commit``: buffer, copy, hash), ``--repeats`` times; the trees alternate per round.
Prints each run's milliseconds and the medians' ratio::

    flock /work/wt/.bench.lock python docs/results/attack/session22/staging_store_bench.py \\
        --tree before=/tmp/stg22_before --tree after=/tmp/stg22_after --rounds 4
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

CHILD = r"""
import hashlib, json, sys, time
sys.path.insert(0, sys.argv[1])
from edge_server.weight_store import WeightStore
from modelgraph.tv_compat import import_torchvision
import torch
torch.manual_seed(0)
sd = import_torchvision().models.resnet18(weights=None).state_dict()
ws = [t.contiguous().numpy().tobytes() for t in sd.values()]
shas = [hashlib.sha256(w).hexdigest() for w in ws]
out = []
for _ in range(int(sys.argv[2])):
    s = WeightStore(1 << 30, staging_bytes=256 << 20)
    t0 = time.perf_counter()
    for sha, w in zip(shas, ws):
        up = s.begin_upload("t", sha, len(w))
        for off in range(0, max(len(w), 1), 1 << 20):
            up.write(off, w[off : off + (1 << 20)])
        up.commit()
        up.abort()
    out.append((time.perf_counter() - t0) * 1e3)
    del s
print(json.dumps(out))
"""


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tree", action="append", required=True)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    trees = [t.split("=", 1) for t in args.tree]
    ms: dict[str, list[float]] = {n: [] for n, _ in trees}
    for r in range(args.rounds):
        for name, path in (trees if r % 2 == 0 else trees[::-1]):
            env = dict(os.environ, PYTHONPATH=path)
            res = subprocess.run([sys.executable, "-c", CHILD, path, str(args.repeats)], env=env, cwd=path,
                                 capture_output=True, text=True, check=True)
            runs = json.loads(res.stdout.strip().splitlines()[-1])
            ms[name] += runs
            print(name, " ".join(f"{x:.1f}" for x in runs), flush=True)
    med = {n: statistics.median(v) for n, v in ms.items()}
    print(json.dumps({"median_ms": med, "min_ms": {n: min(v) for n, v in ms.items()}}))
    if len(trees) == 2:
        a, b = (n for n, _ in trees)
        print(f"ratio {b}/{a} median {med[b] / med[a]:.3f}, min {min(ms[b]) / min(ms[a]):.3f}")


if __name__ == "__main__":
    main()
