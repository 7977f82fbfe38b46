"""What giving a local call's outputs back as the caller's kind of tensor costs (break41 F4): a graph runs under
``torch.inference_mode`` (``Program.run``), so its outputs are inference tensors, which refuse an in-place write or
``requires_grad_()`` outside it where eager's outputs take them. Options, side by side on one client (no server),
interleaved, one torch thread, medians of the client's call:

- ``before``: inference tensors returned as they are (``as_callers`` off);
- ``as_callers``: what coinfer does: a normal tensor over the same storage per output (``modelgraph.out_layout``);
- ``clone``: each returned inference tensor copied outside ``inference_mode``;
- ``no_grad``: the graph run under ``torch.no_grad()`` instead of ``inference_mode`` (outputs normal tensors);
- ``eager``: the user's module under ``torch.no_grad()``, for scale.

    flock /work/wt/.bench.lock .venv/bin/python bench/bench_output_kind.py [--models torchvision:resnet18 ...]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import time
import timeit
from pathlib import Path

import torch

import modelgraph.pytree_io as pytree_io
from modelgraph.execute import Program
from ue_client import CoinferClient


def _off(leaves, computed, inputs):
    return leaves


def _clone(leaves, computed, inputs):
    return [t.clone() if isinstance(t, torch.Tensor) and t.is_inference() else t for t in leaves]


def _run_no_grad(self, env, weights, *, on_output=None, watch=frozenset(), timings=None, after_op=None):
    assert timings is None and after_op is None
    with torch.no_grad():
        return self._run_plain(env, weights, on_output, watch)


@contextlib.contextmanager
def variant(name: str):
    kept_callers, kept_run = pytree_io.as_callers, Program.run
    if name in ("before", "no_grad"):
        pytree_io.as_callers = _off
    elif name == "clone":
        pytree_io.as_callers = _clone
    if name == "no_grad":
        Program.run = _run_no_grad
    try:
        yield
    finally:
        pytree_io.as_callers, Program.run = kept_callers, kept_run


VARIANTS = ("before", "as_callers", "clone", "no_grad", "eager")


def measure(spec: str, rounds: int) -> dict:
    c = CoinferClient(spec)
    m, x = c.model.module, c.example_inputs
    times: dict[str, list[float]] = {v: [] for v in VARIANTS}
    kinds = {}
    for r in range(rounds + 3):
        order = VARIANTS[r % len(VARIANTS):] + VARIANTS[:r % len(VARIANTS)]
        for v in order:
            with variant(v):
                t = time.perf_counter()
                if v == "eager":
                    with torch.no_grad():
                        y = m(*x)
                else:
                    y = c(*x)
                ms = (time.perf_counter() - t) * 1e3
            if r >= 3:
                times[v].append(ms)
            kinds[v] = y.is_inference()
    med = {v: statistics.median(ts) for v, ts in times.items()}
    q = {v: statistics.quantiles(ts, n=4) for v, ts in times.items()}
    return {"model": spec, "rounds": rounds, "median_ms": med, "quartiles_ms": q, "output_is_inference": kinds}


def per_output_us() -> dict:
    """``as_callers`` alone: us per call on 1 and 8 inference outputs (each changed), and on 8 already normal."""
    x = torch.randn(4, 3)
    with torch.inference_mode():
        inf = [torch.randn(4, 1000) for _ in range(8)]
    normal = [torch.randn(4, 1000) for _ in range(8)]
    out = {}
    for name, leaves in (("1 changed", inf[:1]), ("8 changed", inf), ("8 kept", normal)):
        flags = [True] * len(leaves)
        best = min(timeit.repeat(lambda lv=leaves, f=flags: pytree_io.as_callers(list(lv), f, [x]), number=2000,
                                 repeat=5))
        out[name] = best / 2000 * 1e6
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["torchvision:resnet18", "torchvision:mobilenet_v2"])
    p.add_argument("--rounds", type=int, default=60)
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    torch.set_num_threads(1)
    load = os.getloadavg()[0]
    rows = [measure(spec, args.rounds) for spec in args.models]
    micro = per_output_us()
    print(f"torch {torch.__version__}, 1 thread, {args.rounds} interleaved rounds, load {load:.1f} -> "
          f"{os.getloadavg()[0]:.1f}; median ms [quartiles]; vs before")
    for r in rows:
        base = r["median_ms"]["before"]
        print(r["model"])
        for v in VARIANTS:
            q1, _, q3 = r["quartiles_ms"][v]
            print(f"  {v:<11} {r['median_ms'][v]:8.2f} [{q1:.2f} {q3:.2f}]  {r['median_ms'][v] / base - 1:+6.1%}"
                  f"  inference output: {r['output_is_inference'][v]}")
    print("as_callers alone (min of 5 x 2000): " + ", ".join(f"{k} {v:.1f} us" for k, v in micro.items()))
    if args.out:
        args.out.write_text(json.dumps({"rows": rows, "as_callers_us": micro}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
