"""Session 30's precomputed pieces of ``auto``'s online decision give the same answers as building everything per
search: ``partitioner.online.PrefixSent`` (a target's weight groups after X bytes of an upload list went up, no
state built) against ``_group_bytes`` on ``prefetched_state``'s state, float for float and type for type, for
need-ordered and last-op-first lists, every cut point and its neighbours; the Python pass of ``_groups_term``
against its numpy pass; and ``choose("auto")`` with the new path (``planning.PREFIX_SENT``, the prefetch
preparation kept per target) against the old one, field by field, on random DAGs and the captured graphs over links,
shares, send costs, held sets and horizons, and on the recorded real-client calls of sessions 29b and 30."""

from __future__ import annotations

import math
import random
from pathlib import Path

import numpy as np
import pytest

from partitioner import online
from partitioner.costgraph import CostGraph, Link
from partitioner.prep import prepare
from partitioner.robust import Spread
from partitioner.simulate import Rates
from partitioner.state import ServerState, Shares
from partitioner.synthetic import KINDS, random_dag
from partitioner.uecpu import UeCpu, effective_link
from tests.checks import chunks
from tests.decision_grid import captured_grid, held_states, recorded_calls
from ue_client import planning

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(__file__).parent / "data" / "costgraphs"
CALLS = ROOT / "docs/results/decisions/session30/calls.pkl"
RECORDED_COSTS = ROOT / "docs/results/cold/session10/costgraphs"


def _same_groups(got, ref) -> None:
    """Two ``_group_bytes`` answers identical: lists equal (Python floats / ints), arrays equal with their dtype."""
    assert got[0] == ref[0] and got[1] == ref[1], (got, ref)
    assert all(type(x) is float for x in got[0]) and all(type(x) is int for x in got[1])
    for a, b in ((got[2], ref[2]), (got[3], ref[3])):
        assert a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b), (a, b)


def _cut_points(sizes: list[tuple[str, int]]) -> list[float]:
    """0, every boundary of the list and 1 byte / half a byte either side of it, points inside, and beyond."""
    xs = {0.0, 0.5}
    acc = 0.0
    for _, b in sizes:
        acc += b
        xs |= {acc, acc - 1.0, acc + 1.0, acc - 0.5, acc + 0.5, acc - b / 3}
    xs.add(acc * 2 + 7)
    return sorted(x for x in xs if x >= 0)


def _check_prefix_sent(score, mask: int, state: ServerState | None) -> int:
    """PrefixSent of ``mask``'s partition for both lists ``auto`` sends (need order with bytes left; the gradual
    walk's last op first, bytes > 0) against ``_group_bytes`` of ``prefetched_state`` at every cut point."""
    table, g = score.table, score.costs
    cp = table._compiled(score.P, mask)
    st = state if state is not None else ServerState()
    order = score.weight_order(score.names(mask))
    need = [(w, 0 if w in st.held else int(st.in_flight.get(w, g.weights[w]))) for w in order]
    tmask_orders = [need]
    if mask:
        front_order, _ = planning._gradual_front(score, mask, score.r, st)
        tmask_orders.append(front_order)
    n = 0
    for sizes in tmask_orders:
        ps = online.PrefixSent(cp, state, table.weight_bytes, sizes)
        # (session 33: ``prefix_sent``'s ``StateSent`` with something held or in flight)
        fast = online.prefix_sent(cp, state, table.weight_bytes, sizes)
        if state is not None and (state.held or state.in_flight):
            assert isinstance(fast, online.StateSent)
        for x in _cut_points(sizes):
            ref = online._group_bytes(cp, planning.prefetched_state(state, sizes, x), table.weight_bytes)
            _same_groups(ps.at(x), ref)
            _same_groups(fast.at(x), ref)
            n += 1
    return n


@pytest.mark.parametrize("chunk", chunks(2))  # chunk 1 slow: chunk 0 is the same check on 100 other DAGs
def test_prefix_sent_is_the_built_states_groups_on_random_dags(chunk):
    """100 random DAGs per chunk x 3 held sets x (the warm target, every suffix target, a random valid server set):
    the groups after every cut point equal those of the state ``prefetched_state`` builds."""
    n = 0
    for seed in range(chunk * 100, chunk * 100 + 100):
        rng = random.Random(seed)
        g = random_dag(seed, 6 + seed % 20, KINDS[seed % len(KINDS)])
        link = Link(rng.choice([1.0, 20.0, 400.0]), rtt_ms=5.0)
        for st in held_states(rng, g, in_flight=3):
            score = planning._Score(g, link, UeCpu(send_ms_per_byte=1e-5), st, Shares(), True)
            table = score.table
            masks = {table.decide(score.P, score.r, None, "warm")[0]}
            masks |= {score.mask(t) for t in table.suffix_targets(score.P, score.r, st)}
            masks |= {cp.mask for cp in table.candidates}
            for m in masks:
                n += _check_prefix_sent(score, m, st)
    assert n > 5000


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2"])
def test_prefix_sent_is_the_built_states_groups_on_captured_graphs(name):
    g = CostGraph.from_json(DATA / f"{name}.json")
    rng = random.Random(5)
    for st in held_states(rng, g, in_flight=3):
        score = planning._Score(g, Link(100.0, rtt_ms=5.0), UeCpu(send_ms_per_byte=1e-5), st, Shares(), True)
        masks = {cp.mask for cp in score.table.candidates}
        masks |= {score.mask(t) for t in score.table.suffix_targets(score.P, score.r, st)}
        for m in masks:
            _check_prefix_sent(score, m, st)


def test_prefix_sent_catches_a_wrong_cut():
    """The check above is not vacuous: a PrefixSent whose cut weight keeps one byte too many differs."""
    g = CostGraph.from_json(DATA / "resnet18.json")
    score = planning._Score(g, Link(100.0, rtt_ms=5.0), UeCpu(send_ms_per_byte=1e-5), None, Shares(), True)
    mask = score.table.decide(score.P, score.r, None, "warm")[0]
    cp = score.table._compiled(score.P, mask)
    sizes = [(w, g.weights[w]) for w in score.weight_order(score.names(mask))]
    ps = online.PrefixSent(cp, None, score.table.weight_bytes, sizes)
    x = sizes[0][1] + sizes[1][1] / 2  # cuts the second weight
    ref = online._group_bytes(cp, planning.prefetched_state(None, sizes, x), score.table.weight_bytes)
    assert ps.at(x)[0] == ref[0]
    ps.cum = [c + (1.0 if i > 1 else 0.0) for i, c in enumerate(ps.cum)]
    assert ps.at(x)[0] != ref[0]


def test_groups_term_in_python_is_the_numpy_pass():
    """``_groups_term``'s loop (up to ``PY_GROUPS`` groups) and its numpy pass: the same float, with a rate per
    segment (shared sending) or one rate, over random segments and groups (some past the last segment)."""
    rng = random.Random(3)

    class _Cp:
        def __init__(self, csuf):
            self.csuf = csuf

    for trial in range(3000):
        G = rng.randint(1, online.PY_GROUPS)
        npos = 2 * G + rng.randint(1, 5)
        cp = _Cp(tuple(sorted((rng.uniform(0, 200) for _ in range(npos)), reverse=True)))
        ks = sorted(rng.sample(range(npos), G))
        cum = sorted(rng.uniform(1, 1e8) for _ in range(G))
        nseg = rng.randint(1, G + 2)
        ends = sorted(rng.uniform(0, cum[-1] * rng.choice([0.5, 1.0, 1.5])) for _ in range(nseg))
        x0 = [0.0, *ends[:-1]]
        t0 = sorted(rng.uniform(0, 1e3) for _ in range(nseg))
        rate = [rng.uniform(1e2, 1e5) for _ in range(nseg)] if trial % 2 else rng.uniform(1e2, 1e5)
        sphi = rng.uniform(0.1, 3.0)
        prio = [2 * k + 1 for k in ks]
        gk = np.array(ks, dtype=int)
        py = online._groups_term(cp, cum, gk, t0, x0, ends, rate, sphi, prio)
        ref = online._groups_term(cp, cum, gk, t0, x0, ends, rate, sphi)
        assert py == ref and type(py) is float, (trial, py, ref)


def _fields(c: planning.PlanChoice) -> dict:
    d = dict(vars(c))
    d.pop("decision_ms")
    return d


def _same_choice(monkeypatch, g: CostGraph, link: Link, **kw) -> planning.PlanChoice:
    """``choose("auto", ...)`` with the old path and the new (twice: the second takes what the first kept), each
    on its own fresh copy of the graph's table state as far as the memos go: the same fields, the same floats."""
    monkeypatch.setattr(planning, "PREFIX_SENT", False)
    a = planning.choose("auto", g, link, **kw)
    monkeypatch.setattr(planning, "PREFIX_SENT", True)
    b = planning.choose("auto", g, link, **kw)
    c = planning.choose("auto", g, link, **kw)
    fa, fb, fc = _fields(a), _fields(b), _fields(c)
    assert fa == fb, {k: (fa[k], fb[k]) for k in fa if fa[k] != fb[k]}
    assert fa == fc, {k: (fa[k], fc[k]) for k in fa if fa[k] != fc[k]}
    return b


@pytest.mark.parametrize("chunk", chunks(3))  # 1, 2 slow: chunk 0 is the same check on 60 other DAGs
def test_choose_is_the_same_with_the_precomputed_path_on_random_dags(chunk, monkeypatch):
    """60 random DAGs per chunk x 3 links x shares x send costs x 3 held sets x 5 horizons: every answer the same,
    and the new path ran (prefetch or gradual evaluations through PrefixSent) in some of them."""
    used = [0]
    real = online.PrefixSent.at

    def at(self, sent):
        used[0] += 1
        return real(self, sent)

    monkeypatch.setattr(online.PrefixSent, "at", at)
    for seed in range(chunk * 60, chunk * 60 + 60):
        rng = random.Random(seed)
        g = random_dag(seed, 6 + seed % 20, KINDS[seed % len(KINDS)]).scaled(ue=rng.choice([1.0, 10.0, 30.0]))
        wsum = sum(g.weights.values()) or 1
        ue = sum(o.ue_ms for o in g.ops) or 1.0
        base = wsum / ue / 125.0
        for f in (0.05, 0.5, 4.0):
            link = Link(max(1e-3, base * f * rng.uniform(0.5, 2.0)), rtt_ms=rng.choice([2.0, 20.0]))
            share = Shares(compute=rng.choice([1.0, 0.5, 0.2]))
            cpu = UeCpu(send_ms_per_byte=rng.choice([2e-6, 2e-5, 2e-4]) * ue / wsum * 1e3)
            for st in held_states(rng, g, in_flight=3):
                for h in (2, 3, 8, 40, None):
                    _same_choice(
                        monkeypatch,
                        g,
                        link,
                        state=st,
                        share=share,
                        ue_cpu=cpu,
                        horizon=h,
                        lost_ms=rng.choice([0.0, ue]),
                    )
    assert used[0] > 0


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2"])
def test_choose_is_the_same_with_the_precomputed_path_on_captured_graphs(name, monkeypatch):
    g0 = CostGraph.from_json(DATA / f"{name}.json")
    for g, link, kw in captured_grid(g0, random.Random(11), in_flight=3):
        _same_choice(monkeypatch, g, link, **kw)


def test_the_strategy_functions_are_the_same_with_the_precomputed_path(monkeypatch):
    """``_prefetch_best`` and ``_gradual_best`` (unpruned too: every switch point evaluated) with and without
    PrefixSent on random DAGs, request latencies and horizons: identical results."""
    n = 0
    for seed in range(120):
        rng = random.Random(seed)
        g = random_dag(seed, 6 + seed % 20, KINDS[seed % len(KINDS)]).scaled(ue=rng.choice([1.0, 10.0]))
        wsum = sum(g.weights.values()) or 1
        ue = sum(o.ue_ms for o in g.ops) or 1.0
        link = Link(max(1e-3, wsum / ue / 125.0 * rng.choice([0.1, 1.0, 5.0])), rtt_ms=rng.choice([2.0, 20.0]))
        cpu = UeCpu(send_ms_per_byte=rng.choice([2e-6, 2e-5, 2e-4]) * ue / wsum * 1e3)
        st = list(held_states(rng, g, in_flight=3))[seed % 3 if g.weights else 0]
        share = Shares(compute=rng.choice([1.0, 0.5]))
        r_plan = Rates.of(effective_link(link, cpu), share)
        for now_f in (1.0, 0.6):
            for h in (2, 5, 12):
                for prune in (True, False):
                    monkeypatch.setattr(planning, "PRUNE", prune)
                    out = []
                    for new in (False, True, True):
                        monkeypatch.setattr(planning, "PREFIX_SENT", new)
                        score = planning._Score(g, link, cpu, st, share, True)
                        t = score.names(score.table.decide(score.P, r_plan, None, "warm")[0])
                        if not t:
                            break
                        now = now_f * score.local_ms
                        out.append(
                            (
                                planning._prefetch_best(score, [t], now, h, 0.1),
                                planning._gradual_best(score, t, now, h, 0.1, r_plan),
                                planning._gradual_best(score, t, now, h, 0.1, r_plan, exhaustive=True),
                            )
                        )
                    if out:
                        assert out[0] == out[1] == out[2], (seed, now_f, h, prune)
                        n += 1
    assert n > 500


@pytest.mark.skipif(not CALLS.exists(), reason="session 30's calls are not in this checkout")
def test_the_recorded_calls_answer_the_same(monkeypatch):
    """Session 29b's six real-client calls and session 30's three googlenet calls (``make_calls.py``), in order on
    one graph per model (as a client: what a call keeps serves the next): old and new path equal field by field, and
    equal to the answers the calls hold (made by the checkout before session 30)."""
    for costs, link, kw, c in recorded_calls(CALLS, RECORDED_COSTS):
        got = _same_choice(monkeypatch, costs, link, **kw)
        assert sorted(got.server_ops) == c["server_ops"] and got.reason == c["reason"]
        assert got.predicted_ms == c["predicted_ms"] and got.background == c["background"]
        if "details" in c:  # (the table's own build time aside: it is the profile cache's)
            skip = ("precompute_ms",)
            assert {k: v for k, v in got.details.items() if k not in skip} == {
                k: v for k, v in c["details"].items() if k not in skip
            }
        assert not math.isnan(got.predicted_ms)


def test_prefetch_bounds_in_python_are_the_numpy_pass(monkeypatch):
    """``OnlineTable.prefetch_bounds`` with few groups x bytes (its Python pass) and with numpy forced: the same
    floats, over random DAGs, held sets, send costs and prefetched bytes."""
    n = 0
    for seed in range(150):
        rng = random.Random(seed)
        g = random_dag(seed, 6 + seed % 20, KINDS[seed % len(KINDS)])
        link = Link(rng.choice([1.0, 20.0, 400.0]), rtt_ms=rng.choice([2.0, 20.0]))
        for st in held_states(rng, g, in_flight=3):
            score = planning._Score(g, link, UeCpu(send_ms_per_byte=1e-5), st, Shares(), True)
            for cp in score.table.candidates:
                W = sum(g.weights.values())
                xs = sorted(rng.uniform(0, W * 1.2) for _ in range(rng.randint(0, 5)))
                for s in (0.0, rng.choice([2e-6, 2e-4])):
                    monkeypatch.setattr(online, "PY_GROUPS", 10**6)
                    py = score.table.prefetch_bounds(score.P, cp.mask, score.r, st, s, xs)
                    monkeypatch.setattr(online, "PY_GROUPS", 0)
                    ref = score.table.prefetch_bounds(score.P, cp.mask, score.r, st, s, xs)
                    assert py.dtype == ref.dtype and py.tolist() == ref.tolist(), (seed, py, ref)
                    n += 1
    assert n > 1000


def test_the_ue_variance_is_numpys():
    """``Spread.var_ue`` with per-run samples: numpy's ``var(ddof=1)`` float for float, on random samples of 2 to 60
    runs (the captured profiles' shapes) and every kind of UE set."""
    g = CostGraph.from_json(DATA / "resnet18.json")
    sp = Spread(prepare(g))
    assert sp.S is not None
    rng = np.random.default_rng(0)
    for trial in range(400):
        runs = int(rng.integers(2, 61))
        s2 = Spread.__new__(Spread)
        s2.__dict__.update(sp.__dict__)
        s2.S = rng.gamma(2.0, rng.uniform(0.01, 50.0), size=(sp.n, runs)) * rng.choice([1.0, 13.9, 1e-3])
        s2._ind = {}
        mask = random.Random(trial).getrandbits(sp.n) if trial % 3 else (0 if trial % 2 else (1 << sp.n) - 1)
        want = float((s2.ue_indicator(mask) @ s2.S).var(ddof=1))
        assert s2.var_ue(mask) == want, (trial, s2.var_ue(mask), want)


def test_split_terms_kept_for_the_last_inputs_are_the_fresh_ones():
    """``OnlineTable.split_ms`` keeps its last answer: over calibrated copies and links in turn (repeats and changes
    interleaved), it equals the terms computed afresh."""
    g0 = CostGraph.from_json(DATA / "resnet18.json")
    table = planning.online_table(g0)
    rng = random.Random(2)
    for _ in range(300):
        g = g0.scaled(ue=rng.choice([1.0, 1.39, 10.0]), server=rng.choice([1.0, 0.5]))
        P = prepare(g)
        r = Rates.of(
            Link(rng.choice([20.0, 400.0]), rtt_ms=rng.choice([2.0, 5.0])), Shares(compute=rng.choice([1.0, 0.5]))
        )
        got = table.split_ms(P, r)
        table.__dict__.pop("_split_last")
        assert got == table.split_ms(P, r)


def test_cold_bounds_with_nothing_held_are_the_formula():
    """``OnlineTable._cold_bounds`` with nothing held (its per-candidate bytes made once) equals the formula on the
    cumulative bytes computed in the call (the path a held set takes, fed the full bytes)."""
    for seed in range(60):
        rng = random.Random(seed)
        g = random_dag(seed, 6 + seed % 20, KINDS[seed % len(KINDS)])
        table = planning.online_table(g)
        for _ in range(4):
            r = Rates.of(Link(rng.choice([1.0, 20.0, 400.0]), rtt_ms=5.0), Shares(compute=rng.choice([1.0, 0.5])))
            su, ss = rng.choice([1.0, 1.39, 10.0]), rng.choice([1.0, 0.5])
            got = table._cold_bounds(r, su, ss, None)
            pre = table.__dict__["_cold_lb"]
            if not pre["ng"]:
                continue
            saved = pre.pop("rel_full")
            try:
                everything = ServerState(in_flight={w: b for w, b in table.weight_bytes.items()})
                want = table._cold_bounds(r, su, ss, everything)  # in flight in full: the bytes of nothing held
            finally:
                pre["rel_full"] = saved
            assert got == want, (seed, got, want)


def test_the_held_vector_is_the_held_set_whatever_came_before():
    """``_held_vec`` over a sequence of held sets (growing, every weight, shrinking, a superset with names the table
    does not know, random): the boolean vector of the set's weights, whichever shortcut it took (the last set's
    vector grown, every weight held, or a pass over the names)."""
    g = CostGraph.from_json(DATA / "resnet18.json")
    wb = planning.online_table(g).weight_bytes
    index = online._weight_index(wb)[0]
    names = sorted(wb)
    rng = random.Random(4)
    sets = [frozenset(names[:10]), frozenset(names), frozenset(names) | {"not-a-weight"}, frozenset(names[:5])]
    sets += [frozenset(rng.sample(names, rng.randint(0, len(names)))) for _ in range(40)]
    sets += [frozenset(names), frozenset(names[3:]), frozenset(names)]
    for held in sets:
        want = np.zeros(len(index), dtype=bool)
        want[[index[w] for w in held if w in index]] = True
        assert np.array_equal(online._held_vec(wb, held), want)
