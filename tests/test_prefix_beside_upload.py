"""A split whose UE prefix runs beside an upload on a CPU-shared UE: the online decision weighs each split with
the CPU the upload takes from its prefix (``OnlineTable.decide(..., send_ms_per_byte=s)``), so the plan is the
one whose prediction (``partitioner.uecpu``'s shared model, what the runtime does) is least, and a real client
on the server runs it with the user's eager answer.

Measured case (session 16, resnet18, UE 10 %, 400 Mbit/s): after a prefetch left 13 MB of the model in flight,
the plain decision chose a 26-op split (its prefix 234 ms of compute) as if the prefix hid behind the 13 MB
upload; both drew on the same 10 % of a core, the prefix ran 502 ms and the request took 626 ms against 406
predicted."""

from __future__ import annotations

import random
from dataclasses import replace

from hypothesis import given
from hypothesis import strategies as st

from partitioner import CostGraph, Link
from partitioner.online import compile_partition, evaluate, evaluate_shared, lower_bound, precompute
from partitioner.oracle import partitions
from partitioner.prep import prepare
from partitioner.simulate import Rates
from partitioner.uecpu import UeCpu, effective_rates, simulate_cpu
from tests.checks import checked_call
from tests.test_partitioner_online import DATA, SETTINGS, close, rates, small_dag, some_state
from ue_client import planning
from ue_client.planning import prefetched_state


@SETTINGS
@given(seed=st.integers(0, 10_000))
def test_plain_evaluation_on_the_capped_uplink_bounds_the_shared_one(seed):
    """The pruning of the shared decision is valid: on random DAGs, links, send costs and held / in-flight
    states, the lower bound and the plain latency on the CPU-capped uplink are at most the shared latency."""
    rng = random.Random(seed)
    g = small_dag(seed)
    P = prepare(g)
    masks = list(partitions(P, limit=3000))
    for m in rng.sample(masks, min(6, len(masks))):
        cp = compile_partition(P, m)
        r, state, s = rates(rng, 1e4), some_state(rng, g), 10 ** rng.uniform(-7, -3)
        re = effective_rates(r, s)
        shared = evaluate_shared(cp, r, s, "cold", state, weight_bytes=P.weight_bytes)[0].latency_ms
        plain = evaluate(cp, re, "cold", state, weight_bytes=P.weight_bytes).latency_ms
        lb = lower_bound(cp, re, 1.0, 1.0, "cold", state, P.weight_bytes)
        assert lb <= plain * (1 + 1e-9) + 1e-9 and plain <= shared * (1 + 1e-9) + 1e-9, (seed, m, lb, plain, shared)


@SETTINGS
@given(seed=st.integers(0, 10_000))
def test_shared_decision_is_the_least_shared_latency_among_the_candidates(seed):
    """``decide(..., send_ms_per_byte=s)`` returns the shared latency of its mask, no more than the shared
    latency of any table candidate (branch and bound over them is exact) nor of the plain decision's mask."""
    rng = random.Random(seed)
    g = small_dag(seed)
    P = prepare(g)
    table = precompute(g, use_cache=False)
    base = (sum(P.weight_bytes.values()) or 1) / max(sum(P.a), 1e-9)
    wb = P.weight_bytes
    for _ in range(3):
        r, state = rates(rng, base), some_state(rng, g)
        s = rng.choice([0.3, 1.0, 3.0]) / max(r.up, 1e-12)  # the CPU-bound send rate around the link's
        m, v = table.decide(P, r, state, "cold", send_ms_per_byte=s)
        assert close(v, evaluate_shared(compile_partition(P, m), r, s, "cold", state, weight_bytes=wb)[0].latency_ms)
        for cp in table.candidates:
            got = evaluate_shared(cp, r, s, "cold", state, weight_bytes=wb)[0].latency_ms
            assert v <= got * (1 + 1e-9) + 1e-9, (seed, cp.mask, got, v)
        pm, _ = table.decide(P, effective_rates(r, s), state, "cold")
        plain_pick = evaluate_shared(compile_partition(P, pm), r, s, "cold", state, weight_bytes=wb)[0].latency_ms
        assert v <= plain_pick * (1 + 1e-9) + 1e-9
        assert table.decide(P, r, state, "cold", send_ms_per_byte=0.0) == table.decide(P, r, state, "cold")


def _ten_percent_resnet18() -> CostGraph:
    """The captured resnet18 profile with the UE's ops 380 ms in all (a 10 % UE, as in the testbed's cell)."""
    g = CostGraph.from_json(DATA / "resnet18.json")
    k = 380.0 / sum(o.ue_ms for o in g.ops)
    return replace(g, ops=tuple(replace(o, ue_ms=o.ue_ms * k) for o in g.ops))


def test_a_split_beside_the_uploads_tail_is_predicted_and_chosen_with_its_send_cpu():
    """resnet18 at 10 %, 400 Mbit/s, 1.3e-5 ms of the UE's budget per byte (1.3 ns/B of CPU at 10 %, what the
    session-16 prefetch measured), 33.5 MB of the model's need order held and the rest in flight: the chosen
    plan's prediction is the shared simulator's (UE finish includes the CPU its upload takes), no split
    predicts less by that simulator, and the split the plain decision picks would have predicted more."""
    g = _ten_percent_resnet18()
    link, cpu = Link(400.0, rtt_ms=20.0), UeCpu(send_ms_per_byte=1.3e-5)
    everything = frozenset(o.name for o in g.ops)
    score = planning._scorer(g, link, cpu, None, None, True)
    order = score.weight_order(everything)
    state = prefetched_state(None, [(w, g.weights[w]) for w in order], 33.5e6)
    assert state.in_flight or len(state.held) < len(g.weights)
    P, table = prepare(g), score.table
    r = Rates.of(link)
    for policy in ("mjoa", "auto"):
        c = planning.choose(policy, g, link, ue_cpu=cpu, state=state, horizon=7)
        ref = simulate_cpu(g, link, c.server_ops, cpu, state=state)
        assert close(c.predicted_ms, ref.latency_ms, 1e-6), (policy, c.predicted_ms, ref.latency_ms)
        best = min(simulate_cpu(g, link, score.names(cp.mask), cpu, state=state).latency_ms
                   for cp in table.candidates)
        assert c.predicted_ms <= best * (1 + 1e-9), (policy, c.predicted_ms, best)
    # the plain decision's split (its prefix "hidden" behind the upload) and what it costs with the send CPU
    pm, plain_ms = table.decide(P, effective_rates(r, cpu.send_ms_per_byte), state, "cold")
    plain = simulate_cpu(g, link, score.names(pm), cpu, state=state)
    chosen = planning.choose("mjoa", g, link, ue_cpu=cpu, state=state, horizon=7)
    # on this profile the plain pick is a 27-op split (plain 290 ms, 433 with the send CPU: 173 ms of the
    # prefix's budget went to 13 MB of upload); the shared decision offloads all 69 ops (298 ms)
    assert pm and pm != (1 << P.n) - 1, "the plain decision no longer splits here: the case is gone"
    prefix = sum(P.a[i] for i in range(P.n) if not pm >> i & 1)
    assert plain.steal_ms > 0 and close(plain.ue_finish_ms, prefix + plain.steal_ms, 1e-6)
    assert plain.latency_ms > plain_ms  # the plain evaluation left the send CPU out
    assert chosen.predicted_ms < plain.latency_ms and chosen.server_ops != score.names(pm)


def test_a_cold_split_on_a_cpu_shared_ue_runs_the_shared_plan(server, prefetching_client, monkeypatch):
    """On a real server: a CPU-shared UE (10x slower than this CPU, 2e-6 ms of its budget per byte sent) on a
    cold server plans with the shared decision: every plan that uploads weights is one that no table candidate
    beats by the shared simulator (for the state, link and send cost it planned with), and the answers, cold
    and warm, are the user's eager model's."""
    calls = []
    choose = planning.choose

    def recording(policy, costs, link, **kw):
        c = choose(policy, costs, link, **kw)
        calls.append((costs, link, kw, c))
        return c

    monkeypatch.setattr(planning, "choose", recording)
    with prefetching_client(server.address, policy="mjoa", send_cpu=UeCpu(send_ms_per_byte=2e-6, shared=True),
                            link={"uplink_mbps": 400.0, "rtt_ms": 2.0}) as c:
        reps = [checked_call(c, i) for i in range(3)]
    assert reps[0].server_ops > 0 and reps[0].uploaded_weight_bytes > 0, reps[0]
    assert not any(r.fallback for r in reps), reps
    checked = 0
    for costs, link, kw, ch in calls:
        state = kw.get("state")
        cpu, share = kw["ue_cpu"], kw.get("share")
        score = planning._scorer(costs, link, cpu, state, share, True)
        if not ch.server_ops or not score(ch.server_ops).upload_bytes:
            continue
        mine = score(ch.server_ops).latency_ms
        for cp in score.table.candidates:
            assert mine <= score(score.names(cp.mask)).latency_ms * (1 + 1e-9), (len(ch.server_ops), cp.mask)
        checked += 1
    assert checked, [(len(ch.server_ops), ch.reason) for *_, ch in calls]
