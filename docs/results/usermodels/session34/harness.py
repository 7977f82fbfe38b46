"""Shared harness for session 34's user-model probes: a real server on loopback port 0, clients over several
partitions (local, fixed splits, all-server, fallen back), and a strict comparison with the user's eager module."""

from __future__ import annotations

import contextlib
import copy
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[4]))

import torch
from torch.utils import _pytree as pytree

FAST_LINK = {"uplink_mbps": 400.0, "rtt_ms": 2.0}


def server():
    from edge_server.testing import ServerThread

    return ServerThread(threads=1).start()


def remote(srv, module, args, server_ops, kwargs=None, **kw):
    from ue_client import CoinferClient, new_tenant

    return CoinferClient(
        module,
        args,
        example_kwargs=kwargs,
        server=srv.address,
        policy="offload",
        server_ops=server_ops,
        link=FAST_LINK,
        tenant=new_tenant(),
        profile_runs=2,
        probe=False,
        **kw,
    )


def clients(srv, module, args, kwargs=None, cuts=None):
    """(path, client): local; fixed splits; all-server."""
    from ue_client import CoinferClient

    c0 = CoinferClient(module, args, example_kwargs=kwargs)
    yield "local", c0
    n = len(c0.graph.ops)
    ks = sorted(set(cuts if cuts is not None else {1, n // 3, n // 2, n - 1}) - {0})
    for k in ks:
        if k < n:
            yield f"split{k}/{n}", remote(srv, module, args, k, kwargs, fallback=False)
    yield "all-server", remote(srv, module, args, None, kwargs, fallback=False)


def fallen_back(module, args, kwargs=None):
    s2 = server()
    try:
        c = remote(s2, module, args, None, kwargs, timeout_ms=20_000)
        c(*args, **(kwargs or {}))
    finally:
        s2.stop()
    return c


def leaf_desc(t):
    if isinstance(t, torch.Tensor):
        return (
            type(t).__name__,
            t.dtype,
            tuple(t.shape),
            t.stride() if t.layout == torch.strided else None,
            t.is_inference(),
        )  # requires_grad: README documents no autograd history
    return (type(t).__name__, t)


def diff(got, want, tol=1e-4):
    """A list of problems (empty: same as eager)."""
    probs = []
    gl, gs = pytree.tree_flatten(got)
    wl, ws = pytree.tree_flatten(want)
    if gs != ws:
        return [f"structure: got {gs} want {ws}"]
    if type(got) is not type(want):
        probs.append(f"top type {type(got)} vs {type(want)}")
    for i, (g, w) in enumerate(zip(gl, wl)):
        if type(g) is not type(w):
            probs.append(f"leaf {i} type {type(g)} vs {type(w)}")
            continue
        if not isinstance(w, torch.Tensor):
            if g != w and not (g != g and w != w):
                probs.append(f"leaf {i} const {g!r} vs {w!r}")
            continue
        dg, dw = leaf_desc(g), leaf_desc(w)
        if dg != dw:
            probs.append(f"leaf {i} meta got {dg} want {dw}")
        if g.shape == w.shape and g.dtype == w.dtype:
            if w.dtype.is_floating_point or w.dtype.is_complex:
                a, b = g.detach().double(), w.detach().double()
                if not torch.allclose(a, b, atol=tol, rtol=tol, equal_nan=True):
                    probs.append(f"leaf {i} values max|diff|={(a - b).abs().nan_to_num().max().item():.3g}")
            elif not torch.equal(g, w):
                probs.append(f"leaf {i} values differ ({w.dtype})")

    # aliasing among outputs
    def ptrs(leaves):
        return [
            (
                x.untyped_storage().data_ptr()
                if isinstance(x, torch.Tensor) and x.layout == torch.strided and x.numel()
                else None
            )
            for x in leaves
        ]

    pg, pw = ptrs(gl), ptrs(wl)
    for i in range(len(pg)):
        for j in range(i + 1, len(pg)):
            if pw[i] is not None and pg[i] is not None and (pw[i] == pw[j]) != (pg[i] == pg[j]):
                probs.append(f"aliasing of leaves {i},{j}: eager shares={pw[i] == pw[j]} coinfer={pg[i] == pg[j]}")
    return probs


def check_all(
    name,
    module,
    args,
    kwargs=None,
    calls=None,
    modes=("grad", "no_grad", "inference"),
    cuts=None,
    do_fallback=True,
    tol=1e-4,
):
    """Run ``calls`` (a list of (args, kwargs)) over every path and mode, cold and warm; print problems."""
    calls = calls or [(args, kwargs or {})]
    srv = server()
    bad = 0
    ctx = {"grad": contextlib.nullcontext, "no_grad": torch.no_grad, "inference": torch.inference_mode}
    try:
        paths = list(clients(srv, module, args, kwargs, cuts))
        if do_fallback:
            paths.append(("fallback", fallen_back(module, args, kwargs)))
        for path, c in paths:
            with c:
                for rep in ("cold", "warm"):
                    for mode in modes:
                        for ci, (a, k) in enumerate(calls):
                            a1, k1 = copy.deepcopy((a, k))
                            a2, k2 = copy.deepcopy((a, k))
                            try:
                                with ctx[mode]():
                                    want = module(*a2, **k2)
                            except Exception as e:
                                want = e
                            try:
                                with ctx[mode]():
                                    got = c(*a1, **k1)
                            except Exception as e:
                                got = e
                            tag = f"{name} {path} {rep} {mode} call{ci}"
                            if isinstance(want, Exception) or isinstance(got, Exception):
                                if isinstance(want, Exception) != isinstance(got, Exception):
                                    bad += 1
                                    print("MISMATCH", tag, "eager:", repr(want)[:200], "coinfer:", repr(got)[:300])
                                continue
                            p = diff(got, want, tol)
                            rp = c.last_report
                            if p:
                                bad += 1
                                print("MISMATCH", tag, rp and (rp.server_ops, rp.fallback), p[:4])
    finally:
        srv.stop()
    print(f"{name}: {'OK' if not bad else f'{bad} mismatches'}")
    return bad
