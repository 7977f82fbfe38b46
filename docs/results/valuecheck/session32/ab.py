"""Side by side in one process: the value check's ``changed()`` before (f5d2e9a1: ``torch.equal`` on the uint8
samples) and after (0e4bd735: ``memcmp`` of their host bytes), per model's parameters and buffers, at a full core,
one torch thread; 5 alternating rounds of 100 calls each, thread CPU ms per call (median of the rounds).

Usage (from the repository root): PYTHONPATH=$PWD .venv/bin/python docs/results/valuecheck/session32/ab.py
"""
from __future__ import annotations

import importlib.util
import os
import statistics
import subprocess
import tempfile
import time
import warnings
from pathlib import Path

import torch

from modelgraph.tv_compat import import_torchvision
from ue_client.weight_values import ValueCheck as After

ROOT = Path(__file__).resolve().parents[4]
BEFORE = "f5d2e9a1"
"""The commit whose ``ue_client/weight_values.py`` is "before" (read from git at run time)."""


def _before():
    """The ``weight_values`` module as of ``BEFORE``."""
    src = subprocess.check_output(["git", "show", f"{BEFORE}:ue_client/weight_values.py"], cwd=ROOT, text=True)
    path = Path(tempfile.mkdtemp()) / "weight_values_before.py"
    path.write_text(src)
    spec = importlib.util.spec_from_file_location("weight_values_before", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def per_call(check, calls: int = 100) -> float:
    t = time.thread_time()
    for _ in range(calls):
        assert check.changed() is None
    return (time.thread_time() - t) / calls * 1e3


def main() -> None:
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    tv = import_torchvision()
    before = _before()
    print(f"load {os.getloadavg()[0]:.2f}")
    print("| model | watched tensors | samples | before, ms CPU per call | after | after / before |")
    print("|---|---|---|---|---|---|")
    for name in ("resnet18", "mobilenet_v2", "googlenet", "densenet121", "vit_b_16"):
        m = getattr(tv.models, name)(weights=None).eval()
        tensors = [(n, t) for n, t in (*m.named_parameters(), *m.named_buffers())]
        old, new = before.ValueCheck(tensors), After(tensors)
        for c in (old, new):
            per_call(c, 20)
        a, b = [], []
        for _ in range(5):
            a.append(per_call(old))
            b.append(per_call(new))
        ma, mb = statistics.median(a), statistics.median(b)
        n = sum(v.numel() for vs in new._views.values() for v in vs)
        print(f"| {name} | {len(tensors)} | {n} | {ma:.3f} | {mb:.3f} | {mb / ma:.2f} |")
    print(f"load {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
