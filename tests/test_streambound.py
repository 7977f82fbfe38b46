"""partitioner.streambound: the stream lower bound is the model's minimum and below every simulated strategy."""

from __future__ import annotations

import random

import pytest

from partitioner import CostGraphError, Link
from partitioner.prep import prepare
from partitioner.simulate import Rates
from partitioner.state import ServerState
from partitioner.streambound import (
    BYTES_PER_MS_PER_MBPS,
    Target,
    first_remote_ms,
    local_ms_with_upload,
    stream_bound,
)
from partitioner.synthetic import random_dag
from partitioner.uecpu import SEND_SHARE, UeCpu, simulate_cpu


def _model_total(K, ell, t, R, rtt, c, j, X):
    """One strategy's total in the bound's own model (X spread evenly over the j - 1 local requests)."""
    n = j - 1
    tot = sum(local_ms_with_upload(ell, X / n, R, c) for _ in range(n)) if n else 0.0
    return tot + first_remote_ms(t, t.weight_bytes - X, R, c, rtt) + (K - j) * t.warm_ms


def test_resnet18_cell_by_hand():
    """The lead's cell (resnet18, UE 10 %, 400 Mbit/s, session 8's rows): local first while the weights go up,
    then the first remote request: 0.89x of the best baseline's 195 ms mean, by a hair."""
    b = stream_bound(8, 316.0, [Target(46.7e6, 73.4)], 400.0, 20.0, 8.1e-6)
    R = 400 * BYTES_PER_MS_PER_MBPS
    assert b.first_remote == 2 and b.target == 0
    # the link is busy from the start: W / R + rtt + 6 warm requests
    assert b.total_ms == pytest.approx(46.7e6 / R + 20.0 + 6 * 73.4, rel=1e-9)
    assert sum(b.per_request_ms) == pytest.approx(b.total_ms)
    assert 0.89 < b.mean_ms / 195.0 < 0.9
    # investing in request 1 is dearer: the whole upload inside it
    assert b.total_ms < 46.7e6 / R + 20.0 + 7 * 73.4


def test_all_local_when_remote_never_pays():
    b = stream_bound(5, 10.0, [Target(1e9, 50.0)], 10.0, 20.0, 1e-6)
    assert b.first_remote is None and b.total_ms == 50.0 and b.per_request_ms == (10.0,) * 5


def test_held_target_is_warm_from_the_first_request():
    b = stream_bound(4, 100.0, [Target(0.0, 30.0)], 100.0, 10.0, 1e-6)
    assert b.first_remote == 1 and b.total_ms == 120.0


@pytest.mark.parametrize("bad", [dict(requests=0), dict(local_ms=float("nan")), dict(uplink_mbps=0.0),
                                 dict(rtt_ms=-1.0), dict(send_ms_per_byte=float("inf"))])
def test_bad_inputs_raise(bad):
    args = dict(requests=3, local_ms=10.0, targets=[Target(1e6, 5.0)], uplink_mbps=10.0, rtt_ms=1.0,
                send_ms_per_byte=1e-6)
    with pytest.raises(CostGraphError):
        stream_bound(**{**args, **bad})


@pytest.mark.parametrize("seed", range(300))
def test_bound_is_the_models_minimum(seed):
    """Exact: no strategy of the model (any j, target and prefetch X on a fine grid) is below the bound, and
    the bound's own strategy reaches it."""
    rng = random.Random(seed)
    K = rng.randint(1, 10)
    ell = rng.uniform(1, 1000)
    R_mbps = 10 ** rng.uniform(0, 3)
    rtt = rng.choice([0.0, rng.uniform(0, 100)])
    c = rng.choice([0.0, 10 ** rng.uniform(-7, -4)])
    targets = [Target(rng.choice([0.0, 10 ** rng.uniform(4, 8.5)]), rng.uniform(1, 1.2 * ell),
                      rng.choice([0.0, rng.uniform(0, ell)])) for _ in range(rng.randint(1, 3))]
    b = stream_bound(K, ell, targets, R_mbps, rtt, c)
    R = R_mbps * BYTES_PER_MS_PER_MBPS
    assert b.total_ms <= K * ell + 1e-9
    assert sum(b.per_request_ms) == pytest.approx(b.total_ms, rel=1e-9, abs=1e-9)
    for t in targets:
        for j in range(1, K + 1):
            xs = [0.0] if j == 1 else [t.weight_bytes * k / 400 for k in range(401)]
            for X in xs:
                assert _model_total(K, ell, t, R, rtt, c, j, X) >= b.total_ms - 1e-6 * max(1.0, b.total_ms)


def _target_weights(g, target):
    seen = {}
    for op in g.ops:
        if op.name in target:
            for w in op.weights:
                seen.setdefault(w, g.weights[w])
    return seen


def _simulated_stream(g, link, cpu, target, K, j, frac):
    """A strategy as the partitioner's simulator runs it: requests 1 .. j-1 local, sending the target's
    weights in need order in the background at the processor-sharing rate (``uecpu``: the sender takes at
    most ``SEND_SHARE`` of the CPU while the UE computes) until ``frac`` of them went; request j cold on the
    target with what is held (a weight cut mid-way is in flight); the rest warm."""
    P = prepare(g)
    ell = float(sum(P.a))
    s = cpu.send_ms_per_byte
    R = Rates.of(link).up
    both = min(R, SEND_SHARE / s) if s > 0 else R
    order = simulate_cpu(g, link, target, None, mode="cold").upload_order
    sizes = _target_weights(g, target)
    order = [w for w in order if w in sizes]
    budget = frac * sum(sizes.values())
    sent, total = 0.0, 0.0
    for _ in range(j - 1):
        x_max = both * ell / (1.0 - both * s) if s > 0 else both * ell
        x = max(0.0, min(budget - sent, x_max))
        total += ell + s * x if s > 0 else max(ell, x / R)
        sent += x
    if j > K:
        return total
    held, in_flight, acc = set(), {}, 0.0
    for w in order:
        if acc + sizes[w] <= sent + 1e-6:
            held.add(w)
        elif acc < sent:
            in_flight[w] = int(sizes[w] - (sent - acc)) + 1
        acc += sizes[w]
    state = ServerState(held=frozenset(held), in_flight=in_flight)
    total += simulate_cpu(g, link, target, cpu, mode="cold", state=state).latency_ms
    total += (K - j) * simulate_cpu(g, link, target, cpu, mode="warm").latency_ms
    return total


@pytest.mark.parametrize("seed", range(120))
def test_bound_below_every_simulated_strategy(seed):
    """Property: on random graphs, links and send costs, the bound built from the simulator's own numbers
    (local latency, the target's warm latency and UE compute, its weight bytes) is at most the simulated
    stream total of every strategy tried (any first remote request, any prefetch fraction, all local)."""
    rng = random.Random(1000 + seed)
    g = random_dag(seed, rng.randint(3, 24))
    link = Link(uplink_mbps=10 ** rng.uniform(0, 3), rtt_ms=rng.uniform(0, 40))
    cpu = UeCpu(rng.choice([0.0, 10 ** rng.uniform(-8, -5)]))
    names = [op.name for op in g.ops]
    targets = []
    for k in sorted({0, rng.randrange(len(names)), rng.randrange(len(names))}):
        targets.append(frozenset(names[k:]))  # a suffix: the UE part is closed under predecessors
    P = prepare(g)
    ell = float(sum(P.a))
    bound_targets = []
    for t in targets:
        w = simulate_cpu(g, link, t, cpu, mode="warm").latency_ms
        p = float(sum(op.ue_ms for op in g.ops if op.name not in t))
        bound_targets.append(Target(float(sum(_target_weights(g, t).values())), w, p))
    K = rng.randint(1, 8)
    b = stream_bound(K, ell, bound_targets, link.uplink_mbps, link.rtt_ms, cpu.send_ms_per_byte)
    for t in targets:
        for j in range(1, K + 2):
            for frac in (0.0, 0.3, 1.0, rng.random()):
                sim = _simulated_stream(g, link, cpu, t, K, j, frac)
                assert b.total_ms <= sim + 1e-6 * max(1.0, sim), (t, j, frac, b, sim)
