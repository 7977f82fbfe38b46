"""Session 34's cuts of a search's CPU with weights held or in flight keep every answer they replace:

- ``ServerState.lacking`` is ``names - held``, whatever the state was told of a larger set (``with_lacking``, as the
  client's ``UploadScheduler.server_state`` makes it), with or without ``within``;
- the sparse passes over the weights the server lacks (``online.SPARSE``: ``_group_bytes``, ``StateSent.at``,
  ``OnlineTable._cold_bounds``, ``OnlineTable.background``, ``Compiled.need_order``) give the ordered passes'
  floats, types and names, and step aside for a state whose in-flight counts are not whole numbers;
- ``held_mask`` through the ops each op is reachable from equals its pass over the offloadable ops;
- the warm predictions kept per table, the shared evaluations ``OnlineTable.decide`` hands the scorer and the spreads
  kept per ``Spread`` equal fresh ones;
- ``_prefetch_bound`` is below every total ``_prefetch_best`` weighs, and its ``limit`` changes no answer below it;
- ``choose`` (auto, mjoa) is the same field by field with the sparse passes on and off, and with states told what
  they lack, on random DAGs and the captured resnet18 / mobilenet_v2 graphs over links, send costs, held sets and
  horizons. (The answers against the code before the session, read from git, in
  ``docs/results/decisions/session34/ab_choose.py``.)
"""

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
from partitioner.uecpu import UeCpu, effective_rates
from tests.decision_grid import held_states
from ue_client import planning

DATA = Path(__file__).parent / "data" / "costgraphs"


def _fields(c: planning.PlanChoice) -> dict:
    d = dict(vars(c))
    d.pop("decision_ms")
    return d


def _same_groups(got, ref) -> None:
    assert list(got[0]) == list(ref[0]) and got[1] == ref[1], (got, ref)
    assert all(type(x) is float for x in got[0]) and all(type(x) is int for x in got[1])
    for a, b in ((got[2], ref[2]), (got[3], ref[3])):
        assert a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b), (a, b)


def _states(rng: random.Random, g: CostGraph):
    """``held_states`` and most weights held with a few in flight (what a real client's second request meets; some
    with nothing left), each also told what it lacks of the graph's weights and one more name."""
    ws = sorted(g.weights)
    out = [st for st in held_states(rng, g, in_flight=3) if st is not None]
    for k in range(3):
        if not ws:
            break
        lack = rng.sample(ws, min(len(ws), rng.randint(1, 5)))
        infl = {w: rng.randint(0, g.weights[w]) for w in lack[: rng.randint(0, len(lack))] if g.weights[w] > 0}
        if k == 2:  # (some in flight with nothing left: sent, not acknowledged yet)
            half = max(1, len(lack) // 2)
            infl = {w: 0 for w in lack[:half]} | {w: g.weights[w] // 2 for w in lack[half:]}
        out.append(ServerState(held=frozenset(ws) - frozenset(lack), in_flight=infl))
    told = [ServerState(held=st.held, in_flight=st.in_flight).with_lacking(frozenset(g.weights) | {"not.a.weight"})
            for st in out]
    return out + told


def _off(monkeypatch, fn, *a, clear=()):
    """``fn(*a)`` with the sparse passes off, every ``_group_bytes`` / ``need_order`` answer the sparse run kept on the
    arguments (and on ``clear``) dropped first: else the dense run reads the sparse one's (review34)."""
    for o in (*a, *clear):
        if hasattr(o, "__dict__") and not isinstance(o, type):
            o.__dict__.pop("_gb_state", None)
            o.__dict__.pop("_order_memo", None)
    monkeypatch.setattr(online, "SPARSE", False)
    try:
        return fn(*a)
    finally:
        monkeypatch.setattr(online, "SPARSE", True)


def test_lacking_is_the_set_difference():
    rng = random.Random(34)
    names = [f"w{i}" for i in range(60)]
    for _ in range(400):
        universe = frozenset(rng.sample(names, rng.randint(0, 60)))
        held = frozenset(rng.sample(names, rng.randint(0, 60)))
        st = ServerState(held=held)
        told = ServerState(held=held).with_lacking(universe, universe - held if rng.random() < 0.5 else None)
        for _ in range(6):
            sub = frozenset(rng.sample(names, rng.randint(0, 60)))
            inside = frozenset(w for w in sub if w in universe)
            for s in (st, told):
                assert s.lacking(sub) == sub - held
                assert s.lacking(inside, universe) == inside - held
                assert s.lacking(sub) == sub - held  # (kept)
        assert told.lacking(universe) == universe - held


def _check_passes(monkeypatch, g: CostGraph, rng: random.Random) -> int:
    n = 0
    for st in _states(rng, g):
        score = planning._Score(g, Link(rng.choice([20.0, 400.0]), rtt_ms=5.0), UeCpu(send_ms_per_byte=1e-5), st,
                                Shares(), True)
        table, wb, P = score.table, score.table.weight_bytes, score.P
        su, ss = table.scales(P)
        for s in (0.0, 2e-5):
            rb = effective_rates(score.r, s) if s else score.r
            for py in (10**6, 0):  # (the ordered pass in Python and in numpy)
                monkeypatch.setattr(online, "PY_WEIGHTS", py)
                got = table._cold_bounds(rb, su, ss, st)
                ref = _off(monkeypatch, table._cold_bounds, rb, su, ss, st)
                assert got == ref and all(type(x) is float for x in got), (got, ref)
            monkeypatch.undo()
            n += 1
        masks = {cp.mask for cp in table.candidates} | {score.mask(t) for t in table.suffix_targets(P, score.r, st)}
        for t in masks:
            cp = table._compiled(P, t)
            for m in masks:
                assert table.background(P, t, m, st) == _off(monkeypatch, table.background, P, t, m, st)
            cp.__dict__.pop("_gb_state", None)
            got = online._group_bytes(cp, st, wb)
            cp.__dict__.pop("_gb_state", None)
            _same_groups(got, _off(monkeypatch, online._group_bytes, cp, st, wb))
            cp.__dict__.pop("_gb_state", None)
            cp.__dict__.pop("_order_memo", None)
            order = cp.need_order(st, "cold")
            cp.__dict__.pop("_order_memo", None)
            assert order == _off(monkeypatch, cp.need_order, st, "cold")
            cp.__dict__.pop("_order_memo", None)
            assert online.lower_bound(cp, rb, su, ss, "cold", st, wb) == _off(
                monkeypatch, online.lower_bound, cp, rb, su, ss, "cold", st, wb)
            cp.__dict__.pop("_gb_state", None)
            sizes = [(w, 0 if w in st.held else int(st.in_flight.get(w, g.weights[w])))
                     for w in score.weight_order(score.names(t))]
            acc = 0.0
            xs = {0.0, 0.5}
            for _, b in sizes:
                acc += b
                xs |= {acc, acc - 1.0, acc + 0.5, acc - b / 3}
            ps = online.prefix_sent(cp, st, wb, sizes)
            for x in sorted(v for v in xs if v >= 0):
                cp.__dict__.pop("_gb_state", None)
                _same_groups(ps.at(x), _off(monkeypatch, ps.at, x, clear=(cp,)))
                n += 1
    return n


@pytest.mark.parametrize("chunk", [0, 1])
def test_sparse_passes_are_the_ordered_ones_on_random_dags(chunk, monkeypatch):
    n = 0
    for seed in range(chunk * 60, chunk * 60 + 60):
        rng = random.Random(seed)
        g = random_dag(seed, 6 + seed % 20, KINDS[seed % len(KINDS)])
        n += _check_passes(monkeypatch, g, rng)
    assert n > 1000


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2"])
def test_sparse_passes_are_the_ordered_ones_on_captured_graphs(name, monkeypatch):
    g = CostGraph.from_json(DATA / f"{name}.json").scaled(ue=10.0)
    assert _check_passes(monkeypatch, g, random.Random(5)) > 100


def test_a_fractional_in_flight_count_keeps_the_ordered_pass():
    g = CostGraph.from_json(DATA / "resnet18.json")
    w = sorted(g.weights)[3]
    st = ServerState(held=frozenset(g.weights) - {w}, in_flight={w: g.weights[w] / 3 + 0.25})
    assert online._missing_left(dict(g.weights), st) is None
    whole = ServerState(held=st.held, in_flight={w: 7.0})
    assert online._missing_left(dict(g.weights), whole) == {w: 7.0}


def test_held_mask_through_the_ops_reaching_each_is_the_pass():
    """``held_mask`` (few ops reading a missing weight: ``all_ok`` less what reaches them) against its pass over the
    offloadable ops, and with the lacking weights given."""
    rng = random.Random(9)
    n = 0
    for seed in range(120):
        g = random_dag(seed, 6 + seed % 25, KINDS[seed % len(KINDS)])
        P = prepare(g)
        okv = np.array([rng.random() < 0.8 for _ in range(P.n)], dtype=bool)
        bits = online.held_bits(P, online._closure_weights(P, okv, [], [], 0)[0] if P.n else okv)
        readers, all_bits, ok_reach, _ = bits
        ws = sorted(readers)
        for _ in range(8):
            held = frozenset(rng.sample(ws, rng.randint(max(0, len(ws) - 3), len(ws)))) if ws else frozenset()
            bad = 0
            for w in readers.keys() - held:
                bad |= readers[w]
            want = sum(bit for bit, reach in ok_reach if not reach & bad) if bad else all_bits
            assert online.held_mask(bits, held) == want
            assert online.held_mask(bits, held, frozenset(readers) - held) == want
            n += 1
    assert n > 500


def test_kept_predictions_and_spreads_are_fresh_ones():
    g = CostGraph.from_json(DATA / "mobilenet_v2.json").scaled(ue=10.0)
    rng = random.Random(2)
    for st in _states(rng, g)[:6]:
        for cpu in (UeCpu(send_ms_per_byte=1e-5), UeCpu(send_ms_per_byte=1e-5, shared=False), None):
            score = planning._Score(g, Link(100.0, rtt_ms=5.0), cpu, st, Shares(compute=0.5), True)
            table, P = score.table, score.P
            s = 0.0 if cpu is None else cpu.send_ms_per_byte
            for cp in table.candidates:
                for plain in (True, False):
                    a = table.predict(P, cp.mask, score.r, "warm", st, s, cpu is None or cpu.shared, False, plain)
                    table._warm_kept.clear()
                    b = table.predict(P, cp.mask, score.r, "warm", st, s, cpu is None or cpu.shared, False, plain)
                    assert _same_sim(a, b)
            if cpu is not None and cpu.shared:  # the decision's shared evaluations, read by the scorer
                m, _ = table.decide(P, score.r, st, "cold", send_ms_per_byte=s, evals=score.evals)
                got = score(score.names(m))
                fresh = table.predict(P, m, score.r, "cold", st, s, True, order=False, plain=False)
                assert m in score.evals and _same_sim(got, fresh)
            sp = Spread(P)
            for cp in table.candidates:
                first = sp.std_parts(cp.mask, 1234.0, score.r, ue_cv=0.1, send_ms_per_byte=s)
                assert sp.std_parts(cp.mask, 1234.0, score.r, ue_cv=0.1, send_ms_per_byte=s) == first
                assert Spread(P).std_parts(cp.mask, 1234.0, score.r, ue_cv=0.1, send_ms_per_byte=s) == first
                want = math.sqrt(max(0.0, sp.var_server(cp.mask, score.r.phi))) if cp.mask else 0.0
                assert first[3] == want, (first[3], want)  # the kept server part against var_server itself


def _same_sim(a, b) -> bool:
    return all(x == y or (isinstance(x, float) and math.isnan(x) and math.isnan(y))
               for x, y in zip(vars(a).values(), vars(b).values(), strict=True))


def test_the_prefetch_bound_is_below_what_it_bounds_and_its_limit_changes_no_answer():
    """Over random DAGs, links, send costs, held sets and horizons: every total ``_prefetch_best`` weighs is at least
    ``_prefetch_bound`` (its best is), and with ``limit`` at, above and below that best the answer below the limit is
    the same (None where nothing is below it)."""
    n = 0
    for seed in range(150):
        rng = random.Random(seed)
        g = random_dag(seed, 6 + seed % 20, KINDS[seed % len(KINDS)]).scaled(ue=rng.choice([1.0, 10.0]))
        wsum = sum(g.weights.values()) or 1
        ue = sum(o.ue_ms for o in g.ops) or 1.0
        link = Link(max(1e-3, wsum / ue / 125.0 * rng.choice([0.2, 1.0, 5.0])), rtt_ms=rng.choice([2.0, 20.0]))
        cpu = UeCpu(send_ms_per_byte=rng.choice([2e-6, 2e-5, 2e-4]) * ue / wsum * 1e3)
        for st in _states(rng, g)[:4]:
            score = planning._Score(g, link, cpu, st, Shares(), True)
            t = score.names(score.table.decide(score.P, Rates.of(link), None, "warm")[0])
            if not t:
                continue
            for h in (2, 3, 8):
                now = score.local_ms
                best = planning._prefetch_best(score, [t], now, h, 0.2)
                if best is None:
                    continue
                warm = score(t, "warm").latency_ms
                W = planning._prefetch_prep(score, t)[2]
                assert planning._prefetch_bound(score, W, warm, h) <= best["total_ms"] * (1 + 1e-12)
                for lim in (best["total_ms"] * 0.99, best["total_ms"], best["total_ms"] * 1.01, math.inf):
                    got = planning._prefetch_best(score, [t], now, h, 0.2, limit=lim)
                    if best["total_ms"] < lim:
                        assert got == best, (got, best)
                    else:
                        assert got is None or got["total_ms"] >= lim
                n += 1
    assert n > 100


def _choose_both(monkeypatch, g, link, **kw) -> None:
    for pol in ("auto", "mjoa"):
        a = planning.choose(pol, g.scaled(ue=1.0), link, **kw)
        monkeypatch.setattr(online, "SPARSE", False)
        st = kw.get("state")  # a fresh state: answers are kept per state object (review34: the dense run read them)
        kw_off = kw if st is None else {**kw, "state": ServerState(held=st.held, in_flight=dict(st.in_flight))}
        try:
            b = planning.choose(pol, g.scaled(ue=1.0), link, **kw_off)
        finally:
            monkeypatch.setattr(online, "SPARSE", True)
        fa, fb = _fields(a), _fields(b)
        assert fa == fb, {k: (fa[k], fb[k]) for k in fa if fa[k] != fb[k]}


def test_choose_is_the_same_with_the_sparse_passes_on_random_dags(monkeypatch):
    for seed in range(80):
        rng = random.Random(seed)
        g = random_dag(seed, 6 + seed % 20, KINDS[seed % len(KINDS)]).scaled(ue=rng.choice([1.0, 10.0, 30.0]))
        wsum = sum(g.weights.values()) or 1
        ue = sum(o.ue_ms for o in g.ops) or 1.0
        link = Link(max(1e-3, wsum / ue / 125.0 * rng.choice([0.05, 0.5, 4.0])), rtt_ms=rng.choice([2.0, 20.0]))
        cpu = UeCpu(send_ms_per_byte=rng.choice([2e-6, 2e-5, 2e-4]) * ue / wsum * 1e3)
        for st in _states(rng, g):
            for h in (2, 8, None):
                _choose_both(monkeypatch, g, link, state=st, share=Shares(compute=rng.choice([1.0, 0.5])),
                             ue_cpu=cpu, horizon=h)


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2"])
def test_choose_is_the_same_with_the_sparse_passes_on_captured_graphs(name, monkeypatch):
    g0 = CostGraph.from_json(DATA / f"{name}.json").scaled(ue=10.0)
    rng = random.Random(8)
    for up in (100.0, 400.0):
        for st in _states(rng, g0):
            for h in (2, 7):
                _choose_both(monkeypatch, g0, Link(up, rtt_ms=5.0), state=st, ue_cpu=UeCpu(send_ms_per_byte=1e-5),
                             horizon=h)


def test_the_gradual_front_kept_is_the_fresh_one(monkeypatch):
    """``_gradual_front`` (its splits kept for the last split costs and target, its bytes from what the state lacks)
    against one made afresh, sparse passes off, nothing kept: targets and states interleaved on one table, two
    links."""
    n = 0
    for name in ("resnet18", "mobilenet_v2"):
        g = CostGraph.from_json(DATA / f"{name}.json").scaled(ue=10.0)
        rng = random.Random(4)
        states = [*_states(rng, g), ServerState()]
        for up in (50.0, 400.0):
            link = Link(up, rtt_ms=5.0)
            score0 = planning._Score(g, link, UeCpu(send_ms_per_byte=1e-5), None, Shares(), True)
            table = score0.table
            targets = [cp.mask for cp in table.candidates if cp.mask]
            targets += [score0.mask(t) for t in table.suffix_targets(score0.P, score0.r)]
            for _ in range(40):
                st, t = rng.choice(states), rng.choice(targets)
                score = planning._Score(g, link, UeCpu(send_ms_per_byte=1e-5), st, Shares(), True)
                got = planning._gradual_front(score, t, Rates.of(link), st)
                kept = {k: table.__dict__.pop(k, None) for k in ("_gradual_ks", "_gradual_orders", "_gradual_pos",
                                                                 "_gradual_empty")}
                ref = _off(monkeypatch, planning._gradual_front, score, t, Rates.of(link), st)
                for k, v in kept.items():
                    if v is not None:
                        table.__dict__[k] = v
                assert got == ref, (name, up, t)
                n += 1
    assert n == 160


def test_the_client_state_knows_what_it_lacks():
    """``UploadScheduler.server_state`` tells each state it makes the graph's weight names (``with_lacking``): along
    random streams of acknowledgements, queued weights, bytes sent and new sessions (``tests/test_plan_cpu22.py``'s),
    ``lacking`` of any set of names is that set less the held names."""
    from types import SimpleNamespace

    from tests.test_plan_cpu22 import _by_definition, _graph
    from ue_client.uploads import UploadScheduler

    g = _graph()
    shas = sorted({g.weight_sha256(w) for w in g.weights})
    names = sorted(g.weights)
    rng = random.Random(34)
    n = 0
    for _ in range(30):
        sess = SimpleNamespace(held=set())
        ups = UploadScheduler(g, SimpleNamespace(session=sess))
        for _ in range(30):
            r = rng.random()
            if r < 0.4:
                sess.held.add(rng.choice([*shas, "f" * 64]))
            elif r < 0.6:
                ups.queued.setdefault(rng.choice(shas), SimpleNamespace(remaining=rng.randint(0, 99)))
            elif r < 0.8 and ups.queued:
                it = ups.queued[rng.choice(list(ups.queued))]
                it.remaining = max(0, it.remaining - rng.randint(0, 40))
            elif r < 0.85:
                sess = SimpleNamespace(held=set())
                ups.conn.session = sess
                ups.reset(set(rng.sample(shas, rng.randint(0, 2))))
            st = ups.server_state()
            assert st.held == _by_definition(ups).held
            every = frozenset(g.weights)
            for sub in (every, frozenset(rng.sample(names, rng.randint(0, len(names)))), frozenset({"other"})):
                assert st.lacking(sub) == sub - st.held
                if sub <= every:
                    assert st.lacking(sub, every) == sub - st.held
                n += 1
    assert n > 2000
