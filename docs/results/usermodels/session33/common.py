"""Helpers for session33's user-model probes (a tester's scripts, not project code)."""

import os
import sys

import torch
import torch.utils._pytree as pytree

sys.path.insert(
    0, os.environ.get("COINFER_ROOT") or os.path.abspath(os.path.join(os.path.dirname(__file__), "../../../.."))
)
from ue_client import CoinferClient, new_tenant

FAST = {"uplink_mbps": 400.0, "rtt_ms": 2.0}


def server_addr():
    with open(os.path.join(os.path.dirname(__file__), "server.log")) as f:
        for line in f:
            if line.startswith("listening on "):
                return line.split()[-1]
    raise SystemExit("no server")


def client(module, args, k=None, policy="offload", fallback=False, server=None, **kw):
    opts = dict(
        server=server or server_addr(), policy=policy, link=FAST, tenant=new_tenant(), profile_runs=2, fallback=fallback
    )
    if k is not None:
        opts["server_ops"] = k
    opts.update(kw)
    return CoinferClient(module, args, **opts)


def storage_key(t):
    return t.untyped_storage().data_ptr()


def describe(out, inputs=(), params=()):
    """Structure + per leaf (shape, dtype, stride, offset-group) with aliasing among leaves/inputs/params."""
    leaves, spec = pytree.tree_flatten(out)
    ins = [t for t in pytree.tree_leaves(inputs) if isinstance(t, torch.Tensor)]
    ps = list(params)
    info = []
    groups = {}
    for i, l in enumerate(leaves):  # noqa: E741
        if not isinstance(l, torch.Tensor):
            info.append(("const", repr(l)))
            continue
        s = storage_key(l)
        grp = groups.setdefault(s, len(groups))
        inp = [j for j, t in enumerate(ins) if storage_key(t) == s]
        par = [j for j, t in enumerate(ps) if storage_key(t) == s]
        same = [j for j in range(i) if leaves[j] is l]
        base = min(x.storage_offset() for x in leaves if isinstance(x, torch.Tensor) and storage_key(x) == s)
        info.append(
            (
                tuple(l.shape),
                str(l.dtype),
                tuple(l.stride()),
                grp,
                l.storage_offset() - base if not inp else l.storage_offset() - ins[inp[0]].storage_offset(),
                inp,
                par,
                same,
            )
        )
    return str(spec), info


def compare(name, got, want, inputs=(), params=(), tol=1e-4):
    problems = []
    gs, gi = describe(got, inputs, params)
    ws, wi = describe(want, inputs, params)
    if gs != ws:
        problems.append(f"structure {gs} vs {ws}")
    for i, (a, b) in enumerate(zip(gi, wi)):
        if a != b:
            problems.append(f"leaf {i}: got {a} want {b}")
    gl, wl = pytree.tree_leaves(got), pytree.tree_leaves(want)
    for i, (a, b) in enumerate(zip(gl, wl)):
        if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape:
            if a.is_floating_point():
                d = (a.double() - b.double()).abs().max().item() if a.numel() else 0.0
                if d > tol + tol * b.double().abs().max().item():
                    problems.append(f"leaf {i}: max diff {d:.3g}")
            elif not torch.equal(a, b):
                problems.append(f"leaf {i}: values differ")
    if type(got) is not type(want):
        problems.append(f"type {type(got).__name__} vs {type(want).__name__}")
    print(
        ("OK   " if not problems else "FAIL ") + name + ("" if not problems else ": " + "; ".join(problems)), flush=True
    )
    return problems
