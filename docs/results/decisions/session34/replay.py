"""Replay ``capture.py``'s recorded ``planning.choose`` calls in this fresh process, in order (what one call keeps
serves the next, as in the client), 64 MB written before each call to cool the caches (a decision follows a
forward pass). Per call: its thread CPU and whether its answer equals the recorded one, every field but
``decision_ms`` and ``details["precompute_ms"]`` / ``details["plan_cpu_ms"]``. Prints one JSON line.

    PYTHONPATH=ROOT python replay.py CALLS.pkl [--flush-mb 64] [--prof I --prof-out PATH]
"""

import argparse
import cProfile
import json
import pickle
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[4]
COST = ROOT / "docs/results/cold/session10/costgraphs"


def canon(x):
    """``x`` with every set sorted (a set's repr follows the process's hash seed)."""
    if isinstance(x, (set, frozenset)):
        return ("set", sorted(map(canon, x), key=repr))
    if isinstance(x, dict):
        return ("dict", sorted(((canon(k), canon(v)) for k, v in x.items()), key=repr))
    if isinstance(x, (list, tuple)):
        return type(x).__name__, [canon(v) for v in x]
    return x


def fields(choice) -> str:
    """Every field of a ``PlanChoice`` but ``decision_ms`` and the details' ``precompute_ms`` / ``plan_cpu_ms`` /
    ``compressed_now`` / ``compress_ms`` (times, and whether a kept graph was found), canonical."""
    d = dict(vars(choice))
    d.pop("decision_ms")
    det = dict(d.get("details", {}))
    det.pop("precompute_ms", None)
    det.pop("plan_cpu_ms", None)
    det.pop("compressed_now", None)  # (cic: whether this call built the compressed graph or found it kept, and
    det.pop("compress_ms", None)  # what that took)
    d["details"] = det
    return repr(canon(d))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("calls")
    ap.add_argument("--flush-mb", type=float, default=64)
    ap.add_argument("--prof", type=int, default=-1)
    ap.add_argument("--prof-out", default="")
    a = ap.parse_args()
    from partitioner.costgraph import CostGraph
    from ue_client import planning

    with open(a.calls, "rb") as fh:
        calls = pickle.load(fh)
    buf = np.zeros(int(a.flush_mb * 1e6 / 8)) if a.flush_mb else None
    bases: dict = {}
    out = []
    for i, c in enumerate(calls):
        m = c["model"]
        if m not in bases:
            bases[m] = CostGraph.from_json(COST / f"{m}.json").scaled(ue=10.0)
        costs = bases[m].scaled(ue=c["f"][0], server=c["f"][1]) if c["f"] != (1.0, 1.0) else bases[m]
        if buf is not None:
            buf += 1.0
        pr = cProfile.Profile() if i == a.prof else None
        c0 = time.thread_time()
        if pr:
            pr.enable()
        r = planning.choose(c["policy"], costs, c["link"], **c["kw"])
        if pr:
            pr.disable()
        dt = (time.thread_time() - c0) * 1e3
        if pr:
            pr.dump_stats(a.prof_out)
        out.append({"i": i, "model": m, "policy": c["policy"], "cpu_ms": dt, "same": fields(r) == fields(c["answer"])})
    print("REPLAY " + json.dumps(out))


if __name__ == "__main__":
    main()
