"""The UE's compute and its sending on one CPU budget (partitioner.uecpu): equal to the plain simulator
when sending is free, no overlap gain on a CPU-bound uplink, monotone in the send cost, lower bounds,
closed forms on chains."""

from __future__ import annotations

import random

import pytest

from partitioner.costgraph import CostGraph, Link, OpCost
from partitioner.prep import prepare
from partitioner.simulate import MODES, Rates, run
from partitioner.state import ServerState, Shares
from partitioner.synthetic import KINDS, random_dag
from partitioner.uecpu import UeCpu, run_shared, simulate_cpu

LINKS = (Link(2.0, rtt_ms=20.0), Link(40.0, 80.0, rtt_ms=8.0), Link(400.0, rtt_ms=20.0), Link(1000.0, rtt_ms=1.0))
SENDS = (0.0, 1e-7, 1e-6, 5e-6, 2e-5, 5e-5, 2e-4, 1e-3)  # ms per byte: free .. 8 Mbps of CPU


def close(x: float, y: float, tol: float = 1e-9) -> bool:
    return abs(x - y) <= tol * max(1.0, abs(x), abs(y))


def cases(seeds=range(120), per: int = 4):
    """(graph, prepared, server mask) over random DAGs and random successor-closed server sets."""
    for seed in seeds:
        g = random_dag(seed, 4 + seed % 13, KINDS[seed % len(KINDS)])
        P = prepare(g)
        rng = random.Random(seed)
        masks = {0, (1 << P.n) - 1}
        for _ in range(4 * per):
            if len(masks) >= per + 2:
                break
            m = 0
            for i in rng.sample(range(P.n), rng.randint(1, 3)):
                m |= P.desc[i]
            masks.add(m)
        for m in sorted(masks):
            yield g, P, m


def state_for(P, mask: int, seed: int) -> ServerState | None:
    """Sometimes the server already holds some weights or has a partial one in flight."""
    rng = random.Random(seed)
    ws = sorted(P.weight_bytes)
    if not ws or rng.random() < 0.5:
        return None
    held = frozenset(w for w in ws if rng.random() < 0.3)
    rest = [w for w in ws if w not in held]
    infl = {rest[0]: P.weight_bytes[rest[0]] // 2} if rest else {}
    return ServerState(held=held, in_flight=infl)


def chain(n: int = 6, ue_ms: float = 50.0, wbytes: int = 2_000_000, server_ms: float = 2.0) -> CostGraph:
    ops, prev = [], "x"
    for i in range(n):
        ops.append(OpCost(f"op{i}", (prev,), (f"w{i}",), out_bytes=100_000 - 10_000 * i, ue_ms=ue_ms,
                          server_ms=server_ms))
        prev = f"op{i}"
    return CostGraph(ops, {"x": 600_000}, (prev,), {f"w{i}": wbytes for i in range(n)})


def test_free_sending_is_the_plain_simulator():
    """No send cost, no shared CPU or a share of the link: exactly the plain simulator on the effective
    uplink; the shared engine with s = 0 reproduces the plain simulator."""
    for k, (g, P, m) in enumerate(cases()):
        names = P.names_of(m)
        st = state_for(P, m, k)
        for link in LINKS:
            share = Shares(compute=0.5, uplink=0.25) if k % 3 == 0 else None
            r = Rates.of(link, share)
            for mode in MODES:
                ref = run(P, m, r, mode, st)
                for cpu in (None, UeCpu(0.0), UeCpu(0.0, shared=False)):
                    got = simulate_cpu(g, link, names, cpu, mode=mode, state=st, share=share)
                    assert got.latency_ms == ref.latency_ms == got.sim_ms and got.steal_ms == 0.0
                    assert got.ue_finish_ms == ref.ue_finish_ms
                    assert (got.upload_bytes, got.sent_tensor_bytes, got.upload_order) == \
                        (ref.upload_bytes, ref.sent_tensor_bytes, ref.upload_order)
                apart = simulate_cpu(g, link, names, UeCpu(2e-5, shared=False), mode=mode, state=st, share=share)
                eff = Rates(up=min(r.up, 1 / 2e-5), dn=r.dn, L=r.L, phi=r.phi)
                assert apart.latency_ms == run(P, m, eff, mode, st).latency_ms and apart.steal_ms == 0.0
                if share is None:
                    sh, steal = run_shared(P, m, r, 0.0, mode, st)
                    assert steal == 0.0
                    assert close(sh.latency_ms, ref.latency_ms) and close(sh.ue_finish_ms, ref.ue_finish_ms)
                    assert (sh.upload_bytes, sh.sent_tensor_bytes, sh.upload_order) == \
                        (ref.upload_bytes, ref.sent_tensor_bytes, ref.upload_order)
                    tiny, _ = run_shared(P, m, r, 1e-15, mode, st)
                    assert close(tiny.latency_ms, ref.latency_ms, 1e-6)


def test_monotone_and_bounds():
    """More send cost never lowers the latency; the shared CPU never beats the plain simulator on the
    effective uplink; the CPU and the link give lower bounds:
    latency >= UE compute + s x (bytes sent), latency >= bytes / min(R, 1/s) + 2L + results / R_dn,
    and the UE finishes exactly steal_ms after its compute alone."""
    for k, (g, P, m) in enumerate(cases(range(90))):
        names = P.names_of(m)
        st = state_for(P, m, k)
        A = sum(P.a[i] for i in range(P.n) if not m >> i & 1)
        res = sum(P.result_bytes[i] for i in range(P.n) if m >> i & 1)
        for link in LINKS:
            r = Rates.of(link)
            for mode in MODES:
                prev = -1.0
                for s in SENDS:
                    cpu = UeCpu(s)
                    got = simulate_cpu(g, link, names, cpu, mode=mode, state=st)
                    lat = got.latency_ms
                    assert lat >= prev - 1e-9 * max(1.0, lat), (k, link, mode, s, lat, prev)
                    prev = lat
                    assert lat >= got.sim_ms - 1e-9 * max(1.0, lat), (k, link, mode, s)
                    if not m:
                        assert lat == A and got.steal_ms == 0.0
                        continue
                    sent = got.upload_bytes + got.sent_tensor_bytes
                    assert lat >= A + s * sent - 1e-9 * max(1.0, lat)
                    alone = min(r.up, 1 / s) if s else r.up
                    assert lat >= sent / alone + 2 * r.L + res / r.dn - 1e-9 * max(1.0, lat)
                    t_w = got.upload_bytes / alone if mode == "serial" else 0.0
                    assert close(got.ue_finish_ms, t_w + A + got.steal_ms, 1e-7), (k, mode, s)
                    assert -1e-9 <= got.steal_ms <= s * sent * (1 + 1e-9)


def test_cpu_bound_uplink_gains_nothing_from_parallel_upload():
    """CPU-bound sending (link rate >= CPU send rate): every byte costs the UE the same CPU time during
    the prefix or after it, so on a chain the parallel (cold) upload is never worse than serial and
    gains at most the server compute it overlaps: serial - C_server <= cold <= serial."""
    for seed in range(60):
        g = random_dag(seed, 5 + seed % 10, "chain" if seed % 2 else "heavy_tail")
        n = len(g.ops)
        for link in (Link(400.0, rtt_ms=20.0), Link(1000.0, rtt_ms=2.0)):
            r = Rates.of(link)
            for s in (1.0 / r.up, 2.0 / r.up, 10.0 / r.up):  # CPU send rate = R, R/2, R/10
                cpu = UeCpu(s)
                for k in range(n):
                    srv = [o.name for o in g.ops[k:]]
                    cold = simulate_cpu(g, link, srv, cpu).latency_ms
                    serial = simulate_cpu(g, link, srv, cpu, mode="serial").latency_ms
                    C = sum(o.server_ms for o in g.ops[k:])
                    assert serial - C - 1e-9 * serial <= cold <= serial * (1 + 1e-9), (seed, k, s, cold, serial)


def test_chain_worked_examples():
    g = chain()  # 6 ops x 50 ms, 2 MB of weights each, cut tensors 100..50 kB
    link = Link(400.0, rtt_ms=20.0)  # 50 000 B/ms, L = 10 ms
    srv = ["op3", "op4", "op5"]  # prefix F = 150 ms, 6 MB of weights, 80 kB cut tensor
    plain = simulate_cpu(g, link, srv, None)
    assert plain.latency_ms == pytest.approx(150 + 80_000 / 50_000 + 10 + 6 + 10 + 1)  # upload hidden
    # CPU-bound: 40 000 B/ms of CPU. The prefix runs at half speed while the sender takes the other
    # half (20 000 B/ms): it ends at 300 ms with the 6 MB sent, then the cut tensor at 40 000 B/ms.
    cpu = UeCpu(2.5e-5)
    cold = simulate_cpu(g, link, srv, cpu)
    assert cold.ue_finish_ms == pytest.approx(300.0) and cold.steal_ms == pytest.approx(150.0)
    assert cold.latency_ms == pytest.approx(300 + 80_000 / 40_000 + 10 + 6 + 10 + 1)
    serial = simulate_cpu(g, link, srv, cpu, mode="serial")
    assert serial.latency_ms == pytest.approx(cold.latency_ms)  # no overlap gain at all
    # Link-bound (the sender needs 20 % of the CPU to fill the link): the prefix slows to F / (1 - 0.2)
    # while the upload goes on, and a long upload hides that slowdown completely.
    big = chain(wbytes=20_000_000)
    lb = simulate_cpu(big, link, srv, UeCpu(4e-6))
    assert lb.ue_finish_ms == pytest.approx(150 / 0.8) and lb.steal_ms == pytest.approx(150 / 0.8 - 150)
    assert lb.latency_ms == pytest.approx(lb.sim_ms) == pytest.approx((60e6 + 80_000) / 50_000 + 10 + 2 + 10 + 1)
    # ... but a short one does not: 1 MB of weights, sent within the slowed prefix
    small = chain(wbytes=333_334)
    sm = simulate_cpu(small, link, srv, UeCpu(4e-6))
    assert sm.steal_ms == pytest.approx(4e-6 * 3 * 333_334)
    assert sm.latency_ms == pytest.approx(sm.sim_ms + sm.steal_ms)


def test_sender_share_is_capped_while_computing():
    """A UE op that starts while a long upload runs gets at least 1 - SEND_SHARE of the CPU."""
    from partitioner.uecpu import SEND_SHARE

    g = chain(n=2, ue_ms=100.0, wbytes=50_000_000)
    P = prepare(g)
    r = Rates.of(Link(1000.0, rtt_ms=2.0))
    res, steal = run_shared(P, P.mask_of(["op1"]), r, 1e-3, "cold")
    assert res.ue_finish_ms == pytest.approx(100.0 / (1 - SEND_SHARE))
    assert steal == pytest.approx(res.ue_finish_ms - 100.0)
    with pytest.raises(ValueError):
        run_shared(P, P.mask_of(["op1"]), r, 1e-3, "cold", send_share=1.0)
