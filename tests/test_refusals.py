"""A split whose slice the server refused (SliceRejected) is a planner exclusion (``ue_client.refusals``):
the next decision takes the best other partition, the refusal is kept per server and slice hash (a new
session does not ask again), and after ``MAX_REFUSALS`` only splits the server accepted are planned.

Before: the planner kept choosing the refused split and every later request ran locally as a flagged
fallback (session 9's attacker: ``max_slices_per_session=0``, resnet18, auto). Real server on port 0.
"""

from __future__ import annotations

import random
import time

import pytest
import torch

from edge_server.config import MiB, ServerConfig
from edge_server.testing import ServerThread
from partitioner import CostGraph, Link, chain
from partitioner.costgraph import OpCost
from partitioner.state import ServerState
from ue_client import CoinferClient, new_tenant, planning
from ue_client.refusals import MAX_REFUSALS, RefusedSlices


class TwoBig(torch.nn.Module):
    """Two 4 MiB linears and a small head: the whole model's slice needs ~8.5 MiB, its tail ~4.3 MiB."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.a = torch.nn.Linear(256, 4096)
        self.b = torch.nn.Linear(4096, 256)
        self.c = torch.nn.Linear(256, 10)
        for p in self.parameters():
            with torch.no_grad():
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)

    def forward(self, x):
        return self.c(torch.relu(self.b(torch.relu(self.a(x)))))


def refusing_server(**config) -> ServerThread:
    """A real edge server on a free port with 64 MiB of cache, 32 MiB of staging and ``config`` (the limit
    that refuses slices)."""
    return ServerThread(config=ServerConfig(cache_bytes=64 * MiB, staging_bytes=32 * MiB, **config))


def offloading_client(srv: ServerThread, module: torch.nn.Module, x: torch.Tensor) -> CoinferClient:
    """An ``offload`` client of ``module`` on ``srv`` (a new tenant, 1000 Mbit/s and 1 ms planned, no probe, a
    UE 200x slower than this CPU so that remote pays, the session kept open while plans stay local)."""
    return CoinferClient(module, (x,), server=srv.address, policy="offload", tenant=new_tenant(),
                         link={"uplink_mbps": 1000.0, "rtt_ms": 1.0}, ue_slowdown=200.0, probe=False,
                         suspend_idle=False)


def test_a_refused_split_is_left_out_and_the_next_best_runs_remote():
    """The server's ``max_slice_bytes`` (6 MiB) refuses the all-server slice of ``offload`` (~8.5 MiB of
    weights and tensors); the first request falls back, every later one runs the best split the server
    accepts (a tail), remote, bit-exact, with no fallback; a new session does not define the refused slice
    again (the refusal is kept per server and slice hash)."""
    module = TwoBig().eval()
    x = torch.randn(1, 256, generator=torch.Generator().manual_seed(1))
    with refusing_server(max_slice_bytes=6 * MiB) as srv, offloading_client(srv, module, x) as c:
        eng = c.engine
        with torch.no_grad():
            eager = module(x)  # the user's own module
        reps = []
        for _ in range(4):
            out = c(x)
            assert torch.equal(out, c.reference(x))
            torch.testing.assert_close(out, eager)
            reps.append(c.last_report)
        first = reps[0]
        assert first.fallback, first  # the refusal comes as an answer to the first request's DefineSlice
        full = eng.decisions.last[1]
        addr = eng.conn.address
        refused = [r for r in eng.path.refusals._refused[addr].values()]
        assert len(refused) == 1 and len(refused[0].slice_sha256) == 64, refused
        assert not any(r.fallback for r in reps[1:]), reps
        assert all(0 < r.server_ops < first.server_ops for r in reps[1:]), [r.server_ops for r in reps]
        assert full.server_ops != refused[0].server_ops
        assert full.details.get("refused_ops") == len(refused[0].server_ops)
        # a new session: the refused split is still left out, the accepted one is planned at once
        eng.conn.teardown()
        eng.path.reset()
        out = c(x)
        assert torch.equal(out, c.reference(x))
        torch.testing.assert_close(out, eager)
        assert not c.last_report.fallback and c.last_report.server_ops == reps[-1].server_ops
        assert refused[0].server_ops not in eng.conn.session.rejected
        assert refused[0].server_ops not in eng.path.slices


class HeavyTail(torch.nn.Module):
    """Light layers, then a heavy one last: every suffix split has it, so each plans remote on a slow UE."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b = torch.nn.Linear(256, 256), torch.nn.Linear(256, 256)
        self.c, self.d = torch.nn.Linear(256, 2048), torch.nn.Linear(2048, 2048)

    def forward(self, x):
        return self.d(torch.relu(self.c(torch.relu(self.b(torch.relu(self.a(x)))))))


def test_a_server_that_refuses_every_slice_stops_being_asked():
    """``max_slice_bytes`` of 1 KiB: every slice is INVALID_ARGUMENT (permanent); each refusal leaves out
    one split, and after ``MAX_REFUSALS`` the planner uses only splits the server accepted (none): local,
    no fallback, no more DefineSlice."""
    module = HeavyTail().eval()
    x = torch.randn(1, 256, generator=torch.Generator().manual_seed(1))
    with refusing_server(max_slice_bytes=1024) as srv, offloading_client(srv, module, x) as c:
        with torch.no_grad():
            eager = module(x)  # the user's own module
        reps = []
        for _ in range(MAX_REFUSALS + 3):
            out = c(x)
            assert torch.equal(out, c.reference(x))
            torch.testing.assert_close(out, eager)
            reps.append(c.last_report)
        eng = c.engine
        fallbacks = [r.fallback for r in reps]
        assert sum(fallbacks) == MAX_REFUSALS and not any(fallbacks[MAX_REFUSALS:]), fallbacks
        assert all(r.server_ops == 0 for r in reps[MAX_REFUSALS:]), reps
        exclude, allow = eng.path.exclusion()
        assert len(exclude) == MAX_REFUSALS and allow == frozenset()
        assert len(eng.conn.session.rejected) == MAX_REFUSALS  # nothing defined after the third refusal


def test_refused_slices_expire_and_an_acceptance_clears_a_refusal():
    now = [0.0]
    r = RefusedSlices(retry_s=10.0, max_refusals=2, clock=lambda: now[0])
    a, b, c = frozenset({"x"}), frozenset({"x", "y"}), frozenset({"z"})
    r.refused("s1", a, "sha-a", "FAILED_PRECONDITION", "no")
    assert r.exclusion("s1") == (frozenset({a}), None) and r.exclusion("s2") == (frozenset(), None)
    assert r.refusal("s1", a).code == "FAILED_PRECONDITION" and r.refusal("s2", a) is None
    r.accepted("s1", c, "sha-c")
    r.refused("s1", b, "sha-b", "INVALID_ARGUMENT", "bad")
    assert r.exclusion("s1") == (frozenset({a, b}), frozenset({c}))
    r.accepted("s1", a, "sha-a")  # asked again later and accepted
    assert r.exclusion("s1") == (frozenset({b}), None)
    now[0] = 11.0
    assert r.exclusion("s1") == (frozenset(), None) and not r.has_refused("s1")


def test_transient_refusals_back_off_and_never_count_toward_the_accepted_only_mode():
    """RESOURCE_EXHAUSTED (a busy server: its memory share, a slice cap in use now) makes the planner use
    only the splits that server accepted for a back-off that doubles per transient refusal in a row (5,
    10, 20 s, at most ``retry_s``; an acceptance starts it over), then plans freely again; transient
    refusals never count toward ``max_refusals``. Permanent ones (INVALID_ARGUMENT, FAILED_PRECONDITION)
    do: after ``max_refusals`` accepted-only for ``retry_s``."""
    now = [0.0]
    r = RefusedSlices(retry_s=300.0, max_refusals=3, backoff_s=5.0, clock=lambda: now[0])
    ok = frozenset({"op9"})
    r.accepted("srv", ok, "sha9")
    splits = [frozenset({f"op{i}"}) for i in range(5)]
    r.refused("srv", splits[0], "sha0", "RESOURCE_EXHAUSTED", "memory share in use")
    assert r.exclusion("srv") == (frozenset({splits[0]}), frozenset({ok}))
    assert r.exclusion("other") == (frozenset(), None)
    now[0] = 5.0  # the back-off is over: plan freely (the refused split too)
    assert r.exclusion("srv") == (frozenset(), None)
    for i, until in ((1, 15.0), (2, 35.0)):  # in a row: 10 s, then 20 s
        r.refused("srv", splits[i], f"sha{i}", "RESOURCE_EXHAUSTED", "again")
        assert r.refusal("srv", splits[i]).until == until and r.refusal("srv", splits[i]).repeats == i + 1
        now[0] = until
    assert r.exclusion("srv") == (frozenset(), None)  # three transient refusals: not accepted-only
    r.accepted("srv", ok, "sha9")  # the server accepted a slice: its back-off starts over
    r.refused("srv", splits[3], "sha3", "RESOURCE_EXHAUSTED", "again")
    assert r.refusal("srv", splits[3]).until == now[0] + 5.0
    now[0] += 5.0
    for i in (0, 1):
        r.refused("srv", splits[i], f"sha{i}", "INVALID_ARGUMENT", "too big")
    assert r.exclusion("srv")[1] is None  # two permanent ones: not yet
    r.refused("srv", splits[2], "sha2", "FAILED_PRECONDITION", "no")
    assert r.exclusion("srv") == (frozenset(splits[:3]), frozenset({ok}))  # three permanent: accepted only
    now[0] += 301.0
    assert r.exclusion("srv") == (frozenset(), None)


def test_a_busy_server_is_asked_again_after_its_back_off():
    """``max_slices_per_session=0``: every slice is RESOURCE_EXHAUSTED (transient). The first refusal falls
    back once; during the back-off the UE runs locally without asking (no fallback); after it the UE asks
    again (one more refusal, a doubled back-off), and never switches to accepted-only for ``RETRY_S``. Every
    answer equals the user's eager module."""
    module = HeavyTail().eval()
    x = torch.randn(1, 256, generator=torch.Generator().manual_seed(1))
    with refusing_server(max_slices_per_session=0) as srv, offloading_client(srv, module, x) as c:
        with torch.no_grad():
            eager = module(x)
        now = [0.0]
        path = c.engine.path
        path.refusals.clock = lambda: now[0]
        reps = []
        for _ in range(MAX_REFUSALS + 2):
            torch.testing.assert_close(c(x), eager)
            reps.append(c.last_report)
        # (the second request may still fall back: the connection's own retry delay after a failed request)
        assert reps[0].fallback and not any(r.fallback for r in reps[2:]), reps
        assert all(r.server_ops == 0 for r in reps[2:])
        path.sync_refusals()
        (ref,) = path.refusals._refused[c.engine.conn.address].values()
        assert ref.repeats == 1, ref  # not asked again during the back-off
        assert path.exclusion()[1] == frozenset()
        now[0] = 5.0  # the back-off is over: asked again, refused again, backed off for 10 s
        time.sleep(0.6)  # (past the connection's retry delay)
        torch.testing.assert_close(c(x), eager)
        assert c.last_report.fallback and c.last_report.server_ops > 0, c.last_report
        time.sleep(0.6)
        torch.testing.assert_close(c(x), eager)  # (its answers reach the refusals by the next decision)
        path.sync_refusals()
        (ref,) = path.refusals._refused[c.engine.conn.address].values()
        assert ref.code == "RESOURCE_EXHAUSTED" and ref.repeats == 2 and ref.until == 15.0, ref
        now[0] = 15.0
        assert path.exclusion() == (frozenset(), None)  # no 300 s exclusion


def _random_dag(rng: random.Random, n: int) -> CostGraph:
    ops = []
    for i in range(n):
        preds = tuple(f"o{j}" for j in rng.sample(range(i), min(i, rng.randint(1, 2)))) if i else ("x",)
        ops.append(OpCost(name=f"o{i}", inputs=preds, weights=(f"w{i}",) if rng.random() < 0.6 else (),
                          out_bytes=rng.randint(1_000, 400_000), ue_ms=rng.uniform(1, 30),
                          server_ms=rng.uniform(0.1, 3)))
    weights = {w: rng.randint(10_000, 3_000_000) for op in ops for w in op.weights}
    sinks = {op.name for op in ops} - {p for op in ops for p in op.inputs}
    return CostGraph(ops=tuple(ops), inputs={"x": 50_000}, outputs=tuple(sorted(sinks)), weights=weights)


@pytest.mark.parametrize("policy", ["offload", "neurosurgeon", "dads", "mjoa", "auto"])
def test_the_planner_never_returns_an_excluded_split_and_keeps_the_best_permitted(policy):
    """On random DAGs and links: with the policy's own choice (and its warm target) excluded, ``choose``
    returns neither, its server set is no worse than every permitted candidate ``next_best`` weighs, and
    with ``allow`` empty it plans locally."""
    rng = random.Random(7)
    for trial in range(12):
        g = _random_dag(rng, rng.randint(4, 14))
        link = Link(uplink_mbps=rng.choice([5.0, 50.0, 500.0]), rtt_ms=rng.choice([1.0, 20.0]))
        state = ServerState(held=frozenset(w for w in g.weights if rng.random() < 0.3))
        first = planning.choose(policy, g, link, state=state, budget_s=0.2)
        exclude = frozenset(s for s in (first.server_ops, first.warm_target) if s)
        if not exclude:
            continue
        got = planning.choose(policy, g, link, state=state, budget_s=0.2, exclude=exclude)
        assert got.server_ops not in exclude and (got.warm_target or frozenset()) not in exclude, trial
        none = planning.choose(policy, g, link, state=state, budget_s=0.2, exclude=exclude, allow=frozenset())
        assert none.server_ops == frozenset() and not none.background, trial
        if got.details.get("refused_ops") is not None and policy != "auto":  # replaced: no worse than the best
            # permitted of next_best's candidates (mjoa's local guard may then take local)
            score = planning._scorer(g, link, None, state, None, policy == "mjoa")
            best, best_v = planning.next_best(score, exclude)
            v = score(got.server_ops).latency_ms if got.server_ops else score.local_ms
            assert v <= best_v + 1e-9 and best_v <= score.local_ms + 1e-9, trial
            assert got.server_ops in (best, frozenset()), trial


def test_next_best_is_the_least_predicted_permitted_suffix_on_a_chain():
    """On a chain every suffix is a candidate: excluding the best one yields the least predicted of the
    others (brute force over every suffix and local)."""
    g = chain([(20.0, 1.0, 40_000, 200_000)] * 8, input_bytes=40_000)
    link = Link(uplink_mbps=200.0, rtt_ms=2.0)
    score = planning._scorer(g, link, None, None, None, False)
    names = [op.name for op in g.ops]
    every = {frozenset(names[k:]): score(frozenset(names[k:])).latency_ms for k in range(len(names))}
    every[frozenset()] = score.local_ms
    best = min(every, key=every.get)
    got, v = planning.next_best(score, frozenset({best}))
    rest = {s: t for s, t in every.items() if s != best}
    assert got == min(rest, key=rest.get) and v == pytest.approx(min(rest.values()))
