"""Which allowlisted ops read memory they do not own on arguments a client can choose, unguarded and as the edge
server runs them (session 28: ``modelgraph.index_bounds`` and ``modelgraph.kernel_shapes``).

    .venv/bin/python bench/scan_kernel_reads.py [--cases NAME,...] [--json PATH]

Each case is one op call with one argument a client controls set wrong (a short parameter, a negative offset, an
unknown mode...). It runs in a forked child (a fault ends the child, not the scan), twice or more, each time after
freed memory was filled with a different canary value: outputs that differ between the canaries mean the kernel
read memory it does not own (outside its inputs, or an output it never wrote). Per case:

- ``unguarded``: the CPU kernel as ATen has it: ``fault`` (the child died on a signal), ``reads outside`` (outputs
  differ with the canary), ``refused`` (the kernel raised), ``same`` (no difference seen: a deterministic read
  outside would also show ``same``);
- ``meta``: the meta kernel the validator runs on the slice's declared shapes, without the shape rules: ``fault``,
  ``refused`` or ``passes`` (then the CPU kernel is what stands between the client and the memory);
- ``server``: what the edge server does with it: the slice's validation on meta tensors (the shape rules, then the
  meta kernel), then the run through the run-time guards (``runtime_guards.guarded``: ``refused at validation``,
  ``refused at run``, or the kernel's own verdict as above).

Prints a table and writes JSON (``cases``: per case the two verdicts and messages). A row whose ``server`` verdict
is ``fault`` or ``reads outside`` is a hole.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import sys
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from modelgraph.allowlist import resolve
from modelgraph.kernel_shapes import checked_shapes
from modelgraph.runtime_guards import guarded

CANARIES = (1e30, -7.0, 3.3e-20)


def R(*shape: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.randn(*shape, generator=g)


def I(*values: int) -> torch.Tensor:  # noqa: E743
    return torch.tensor(values)


X = R(2, 4, 3, 3)
Q = R(3, 4)
BN = "aten._native_batch_norm_legit_no_training.default"
NBN = "aten.native_batch_norm.default"
LSTM = "aten.lstm.input"
CASES: dict[str, tuple[str, Callable[[], tuple]]] = {
    "batch_norm legit: running_mean 1 of 4": (BN, lambda: (X, R(4), R(4), R(1), R(1).abs(), 0.1, 1e-5)),
    "batch_norm legit: weight 1 of 4": (BN, lambda: (X, R(1), R(4), R(4), R(4).abs(), 0.1, 1e-5)),
    "batch_norm legit: bias 1 of 4": (BN, lambda: (X, R(4), R(1), R(4), R(4).abs(), 0.1, 1e-5)),
    "native_batch_norm: running_mean 1 of 4": (NBN, lambda: (X, R(4), R(4), R(1), R(1).abs(), False, 0.1, 1e-5)),
    "native_batch_norm: weight 1 of 4 (training)": (NBN, lambda: (X, R(1), R(4), None, None, True, 0.1, 1e-5)),
    "batch_norm: running_mean 1 of 4": ("aten.batch_norm.default",
                                        lambda: (X, R(4), R(4), R(1), R(1).abs(), False, 0.1, 1e-5, False)),
    "layer_norm: weight 1 of 3": ("aten.native_layer_norm.default", lambda: (X, [3], R(1), R(3), 1e-5)),
    "rms_norm: weight 1 of 3": ("aten.rms_norm.default", lambda: (X, [3], R(1), 1e-5)),
    "native_group_norm: weight 1 of 4": ("aten.native_group_norm.default", lambda: (X, R(1), R(4), 2, 4, 9, 2, 1e-5)),
    "native_group_norm: N, C, HxW lie": ("aten.native_group_norm.default", lambda: (X, R(8), R(8), 2, 8, 9, 2, 1e-5)),
    "instance_norm: weight 1 of 4": ("aten.instance_norm.default",
                                     lambda: (X, R(1), R(4), None, None, True, 0.1, 1e-5, False)),
    "prelu: weight 2 of 4": ("aten._prelu_kernel.default", lambda: (X, R(2))),
    "grid_sampler_2d: interpolation mode 7": ("aten.grid_sampler_2d.default", lambda: (X, R(2, 3, 3, 2), 7, 0, False)),
    "grid_sampler_2d: padding mode 9": ("aten.grid_sampler_2d.default", lambda: (X, R(2, 3, 3, 2), 0, 9, False)),
    "lstm: weights 2 x 3, 2 x 4 for hidden 4": (LSTM, lambda: (R(2, 1, 3), [R(1, 1, 4), R(1, 1, 4)], [R(2, 3), R(2, 4)],
                                                        False, 1, 0.0, False, False, False)),
    "lstm: biases 1 of 16": (LSTM, lambda: (R(2, 1, 3), [R(1, 1, 4), R(1, 1, 4)],
                                            [R(16, 3), R(16, 4), R(1), R(1)], True, 1, 0.0, False, False, False)),
    "gru: weights 3 x 3, 3 x 4 for hidden 4": ("aten.gru.input", lambda: (R(2, 1, 3), R(1, 1, 4),
                                                                          [R(3, 3), R(3, 4)], False, 1, 0.0, False,
                                                                          False, False)),
    "rnn_tanh: weights 1 x 3, 1 x 4 for hidden 4": ("aten.rnn_tanh.input",
                                                     lambda: (R(2, 1, 3), R(1, 1, 4), [R(1, 3), R(1, 4)], False, 1, 0.0,
                                                      False, False, False)),
    "_weight_norm: g 1 of 4 (dim 0)": ("aten._weight_norm.default", lambda: (R(4, 3), R(1, 1), 0)),
    "embedding_bag: offsets [0, -1]": ("aten.embedding_bag.default", lambda: (Q, I(0, 1, 2), I(0, -1))),
    "embedding_bag: offsets [0, -1e8]": ("aten.embedding_bag.default", lambda: (Q, I(0, 1, 2), I(0, -100_000_000))),
    "embedding_bag: offsets decreasing": ("aten.embedding_bag.default", lambda: (Q, I(0, 1, 2), I(0, 2, 1))),
    "embedding_bag: index 3 of 3 rows": ("aten.embedding_bag.default", lambda: (Q, I(0, 3, 2), I(0, 1))),
    "embedding_bag: per_sample_weights 1 of 3": ("aten.embedding_bag.default",
                                                 lambda: (Q, I(0, 1, 2), I(0, 1), False, 0, False, R(1), False)),
    "embedding: index -1": ("aten.embedding.default", lambda: (Q, I(0, -1))),
    "embedding: index 3 of 3 rows": ("aten.embedding.default", lambda: (Q, I(0, 3))),
    "gather: index 4 of 4": ("aten.gather.default", lambda: (Q, 1, I(4).reshape(1, 1))),
    "scatter.src: index -1": ("aten.scatter.src", lambda: (Q, 1, I(-1).reshape(1, 1), R(1, 1))),
    "scatter_add: src 1 x 1 for index 2 x 2": ("aten.scatter_add.default", lambda: (Q, 1, I(0, 1, 1, 2).reshape(2, 2),
                                                                           R(1, 1))),
    "index_select: index 4 of 4": ("aten.index_select.default", lambda: (Q, 1, I(0, 4))),
    "index: index 3 of 3": ("aten.index.Tensor", lambda: (Q, [I(3)])),
    "index_put: index -4 of 3": ("aten.index_put.default", lambda: (Q, [I(-4)], torch.tensor(1.0))),
    "conv2d: bias 1 of 5": ("aten.conv2d.default", lambda: (X, R(5, 4, 1, 1), R(1))),
    "linear: bias 2 of 5": ("aten.linear.default", lambda: (R(2, 3), R(5, 3), R(2))),
    "addmm: bias 2 of 5": ("aten.addmm.default", lambda: (R(2), R(3, 4), R(4, 5))),
    "sdpa: mask 1 x 1 x 3": ("aten.scaled_dot_product_attention.default",
                             lambda: (R(1, 2, 4), R(1, 3, 4), R(1, 3, 4), R(1, 1, 3))),
    "upsample_bicubic2d.vec: scale -1": ("aten.upsample_bicubic2d.vec", lambda: (X, None, False, [-1.0, 2.0])),
    "upsample_nearest2d: scales -2, 1e30": ("aten.upsample_nearest2d.default", lambda: (X, [6, 6], -2.0, 1e30)),
    "max_pool2d_with_indices: dilation 0": ("aten.max_pool2d_with_indices.default",
                                            lambda: (X, [2, 2], [1, 1], [0, 0], [0, 0])),
    "adaptive_max_pool2d: 7 x 7 of 3 x 3": ("aten.adaptive_max_pool2d.default", lambda: (X, [7, 7])),
    "pixel_shuffle: 3 of 4 channels": ("aten.pixel_shuffle.default", lambda: (X, 3)),
    "channel_shuffle: groups 3 of 4": ("aten.channel_shuffle.default", lambda: (X, 3)),
    "slice_scatter: src 1 x 1": ("aten.slice_scatter.default", lambda: (Q, R(1, 1), 1, 0, 4, 1)),
    "copy: src 1 x 2 into 3 x 4": ("aten.copy.default", lambda: (Q, R(1, 2))),
    "masked_fill: mask 1 x 2": ("aten.masked_fill.Tensor", lambda: (Q, torch.ones(1, 2, dtype=torch.bool),
                                                           torch.tensor(5.0))),
    "roll: shift 2^62": ("aten.roll.default", lambda: (Q, [1 << 62], [1])),
    "tril: diagonal -2^62": ("aten.tril.default", lambda: (Q, -(1 << 62))),
    "topk: k 9 of 5": ("aten.topk.default", lambda: (R(5), 9)),
    "narrow: 3 + 1 of 4": ("aten.narrow.default", lambda: (Q, 1, 3, 1)),
    "constant_pad_nd: -5, -5": ("aten.constant_pad_nd.default", lambda: (X, [-5, -5], 0.0)),
    # break28 (a fresh tester past the first guards)
    "div trunc: int64 MIN / -1": ("aten.div.Tensor_mode", lambda: (torch.full((4,), -(2**63)), torch.full((4,), -1),
                                                                  {"rounding_mode": "trunc"})),
    "avg_pool2d: int64 MIN, divisor -1": ("aten.avg_pool2d.default",
                                          lambda: (torch.full((1, 1, 2, 2), -(2**63)), [1, 1], [1, 1], [0, 0], False,
                                                   True, -1)),
    "upsample_bicubic2d: uint8, 5 channels, scale 1e-20": ("aten.upsample_bicubic2d.default",
                                                           lambda: (torch.zeros(1, 5, 3, 3, dtype=torch.uint8),
                                                                    [7, 7], False, 1e-20, 1e-20)),
    "upsample_bicubic2d: uint8, 3 channels, scale 1e-20": ("aten.upsample_bicubic2d.default",
                                                           lambda: (torch.zeros(1, 3, 64, 64, dtype=torch.uint8),
                                                                    [300, 300], False, 1e-20, 1e-20)),
    # break28b (a second round)
    "div trunc: 0-dim int64 2^31 / int32 -1": ("aten.div.Tensor_mode",
                                               lambda: (torch.full((), 2**31), torch.full((4,), -1, dtype=torch.int32),
                                                        {"rounding_mode": "trunc"})),
    "upsample_bicubic2d: uint8 to 1 column, scale 1e-20": ("aten.upsample_bicubic2d.default",
                                                           lambda: (torch.zeros(1, 5, 3, 3, dtype=torch.uint8),
                                                                    [7, 1], False, None, 1e-20)),
    "to.dtype: dtype -1": ("aten.to.dtype", lambda: (R(3), -1, False, False)),
    "clone: memory_format -1": ("aten.clone.default", lambda: (R(3), {"memory_format": -1})),
    # break28c (a third round)
    "upsample_nearest2d: uint8, scale 1e-19": ("aten.upsample_nearest2d.default",
                                               lambda: (torch.zeros(1, 1, 3, 3, dtype=torch.uint8), [3, 7], None,
                                                        1e-19)),
    "upsample_bicubic2d: float64 channels_last, scales 1e-30": (
        "aten.upsample_bicubic2d.default",
        lambda: (torch.zeros(1, 64, 64, 64, dtype=torch.float64).contiguous(memory_format=torch.channels_last),
                 [64, 64], False, 1e-30, 1e-30)),
    "grid_sampler 5-D: interpolation mode 9": ("aten.grid_sampler.default",
                                               lambda: (torch.zeros(1, 1, 4, 4, 4), torch.zeros(1, 1, 1, 4096, 3), 9,
                                                        0, False)),
}


def _call(fn, args: tuple):
    """``fn(*args)``, a trailing dict of ``args`` passed as keyword arguments."""
    if args and isinstance(args[-1], dict):
        return fn(*args[:-1], **args[-1])
    return fn(*args)


def _flat(o) -> list[torch.Tensor]:
    if isinstance(o, torch.Tensor):
        return [o]
    if isinstance(o, tuple | list):
        return [t for x in o for t in _flat(x)]
    return []


def _fill_freed(value: float) -> None:
    bufs = [torch.full((n,), value) for n in (16, 64, 256, 1024, 4096, 16384, 65536, 262144)] * 4
    del bufs


def _canary_run(fn, make: Callable[[], tuple]) -> tuple[str, str]:
    """(verdict, message) of ``fn(*make())`` run once per canary, the arguments made after freed memory was filled
    with it (so that they lie beside it; see the module docstring)."""
    outs = []
    for v in CANARIES:
        _fill_freed(v)
        args = make()
        try:
            outs.append([t.clone() for t in _flat(_call(fn, args))])
        except Exception as e:
            return "refused", f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
    first = outs[0]
    for other in outs[1:]:
        for a, b in zip(first, other):
            if a.shape != b.shape or not torch.equal(torch.nan_to_num(a.double(), 1, 2, 3),
                                                     torch.nan_to_num(b.double(), 1, 2, 3)):
                return "reads outside", "outputs differ with the canary"
    return "same", ""


def _meta(a):
    if isinstance(a, torch.Tensor):
        return torch.empty(a.shape, dtype=a.dtype, device="meta")
    if isinstance(a, list):
        return [_meta(x) for x in a]
    if isinstance(a, dict):
        return {k: _meta(v) for k, v in a.items()}
    return a


def _meta_fn(target: str):
    """The kernel as the validator runs it on meta tensors (an RNN on one time step), without the shape rules."""
    from modelgraph.slice import _RNN_TARGETS, _rnn_one_step

    fn = resolve(target)
    return _rnn_one_step(fn) if target in _RNN_TARGETS else fn


def _on_meta(fn, make: Callable[[], tuple]) -> tuple[str, str]:
    try:
        _call(fn, tuple(_meta(a) for a in make()))
    except Exception as e:
        return "refused", f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
    return "passes", ""


def _server(target: str, make: Callable[[], tuple]) -> tuple[str, str]:
    """The edge server's handling: validation (the shape rule, then the meta kernel), then the checked run."""
    verdict, msg = _on_meta(checked_shapes(target, _meta_fn(target), "op"), make)
    if verdict == "refused":
        return "refused at validation", msg
    verdict, msg = _canary_run(guarded(target, resolve(target)), make)
    if verdict == "refused" and ((msg.startswith("IndexError") and ("outside" in msg or "offsets" in msg))
                                 or msg.startswith("ArithmeticError")):
        return "refused at run", msg
    return verdict, msg


def _child(conn, name: str, mode: str) -> None:
    torch.set_num_threads(1)
    target, make = CASES[name]
    if mode == "server":
        conn.send(_server(target, make))
    elif mode == "meta":
        conn.send(_on_meta(_meta_fn(target), make))
    else:
        conn.send(_canary_run(resolve(target), make))
    conn.close()


def forked(name: str, mode: str) -> tuple[str, str]:
    """Run one case in a forked child; ``fault`` when it dies on a signal."""
    ctx = mp.get_context("fork")
    parent, child = ctx.Pipe(duplex=False)
    p = ctx.Process(target=_child, args=(child, name, mode))
    p.start()
    child.close()
    try:
        got = parent.recv() if parent.poll(120) else None
    except EOFError:  # it died before it answered
        got = None
    p.join(10)
    if p.exitcode is None:
        p.kill()
        p.join()
        return "timeout", ""
    if got is None:
        return "fault", f"the process died (exit {p.exitcode})"
    return got


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", default="", help="comma list of case names (default: all)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    names = [n for n in args.cases.split(",") if n] or list(CASES)
    rows = []
    print("| case | op | kernel (CPU) | meta kernel (validation) | edge server |")
    print("|---|---|---|---|---|")
    for name in names:
        raw, meta, srv = forked(name, "cpu"), forked(name, "meta"), forked(name, "server")
        rows.append({"case": name, "op": CASES[name][0], "unguarded": raw[0], "unguarded_message": raw[1],
                     "meta": meta[0], "meta_message": meta[1], "server": srv[0], "server_message": srv[1]})
        print(f"| {name} | `{CASES[name][0]}` | {raw[0]} | {meta[0]} | {srv[0]} |", flush=True)
    holes = [r["case"] for r in rows if r["server"] in ("fault", "reads outside", "timeout")]
    unguarded = [r["case"] for r in rows if r["unguarded"] in ("fault", "reads outside") or r["meta"] == "fault"]
    print(f"\nunguarded: {len(unguarded)} of {len(rows)} cases fault or read outside; edge server: {len(holes)}"
          + (f" ({', '.join(holes)})" if holes else ""))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"torch": torch.__version__, "canaries": CANARIES, "cases": rows,
                                         "holes": holes}, indent=1))
        print(f"wrote {args.json}")
    return 1 if holes else 0


if __name__ == "__main__":
    raise SystemExit(main())
