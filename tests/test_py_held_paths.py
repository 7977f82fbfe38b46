"""Session 33's Python passes for a state with weights held or in flight (``online.PY_WEIGHTS``) give numpy's
floats: ``_group_bytes`` of a compiled partition (each group's bytes as ``bincount`` adds them, the kept groups'
cumulative bytes as ``cumsum``), ``OnlineTable._cold_bounds`` (every candidate's lower bound),
``OnlineTable.background`` and ``StateSent.at``, against the numpy passes (``PY_WEIGHTS`` = 0), float for float and
type for type, on random DAGs with random held / in-flight sets and cut points, and on the captured resnet18 and
mobilenet_v2 graphs; and ``choose`` (auto, mjoa) field by field with either. (The answers against the code before
the session, read from git: ``docs/results/decisions/session33``.)"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest

from partitioner import online
from partitioner.costgraph import CostGraph, Link
from partitioner.simulate import Rates
from partitioner.state import Shares
from partitioner.synthetic import KINDS, random_dag
from partitioner.uecpu import UeCpu, effective_link, effective_rates
from tests.decision_grid import held_states
from ue_client import planning

DATA = Path(__file__).parent / "data" / "costgraphs"


def _same_groups(got, ref) -> None:
    assert got[0] == ref[0] and got[1] == ref[1], (got, ref)
    assert all(type(x) is float for x in got[0]) and all(type(x) is int for x in got[1])
    for a, b in ((got[2], ref[2]), (got[3], ref[3])):
        assert a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b), (a, b)


def _cut_points(sizes) -> list[float]:
    xs = {0.0, 0.5}
    acc = 0.0
    for _, b in sizes:
        acc += b
        xs |= {acc, acc - 1.0, acc + 0.5, acc - b / 3}
    xs.add(acc * 2 + 7)
    return sorted(x for x in xs if x >= 0)


def _groups_both(monkeypatch, cp, st, wb):
    out = []
    for py in (10**6, 0):
        monkeypatch.setattr(online, "PY_WEIGHTS", py)
        cp.__dict__.pop("_gb_state", None)
        out.append(online._group_bytes(cp, st, wb))
    monkeypatch.undo()
    return out


def _check_graph(monkeypatch, g: CostGraph, link: Link, rng: random.Random, cuts: bool = True) -> int:
    n = 0
    py_limit = 10**6  # (every graph's passes in Python)
    for st in held_states(rng, g, in_flight=3):
        score = planning._Score(g, link, UeCpu(send_ms_per_byte=1e-5), st, Shares(), True)
        table, wb = score.table, score.table.weight_bytes
        su, ss = table.scales(score.P)
        for s in (0.0, 2e-5):
            rb = effective_rates(score.r, s) if s else score.r
            got = []
            for py in (py_limit, 0):
                monkeypatch.setattr(online, "PY_WEIGHTS", py)
                monkeypatch.setattr(online, "PY_COLD_BOUNDS", 10**9)  # (every table's, in Python where PY_WEIGHTS)
                got.append(table._cold_bounds(rb, su, ss, st))
            monkeypatch.setattr(online, "PY_WEIGHTS", py_limit)
            assert got[0] == got[1] and all(type(x) is float for x in got[0]), (got[0], got[1])
            n += 1
        masks = {cp.mask for cp in table.candidates}
        masks |= {score.mask(t) for t in table.suffix_targets(score.P, score.r, st)}
        for t in masks:  # the background stream of target t beside each request's server set
            for m in masks:
                got = []
                for py in (py_limit, 0):
                    monkeypatch.setattr(online, "PY_WEIGHTS", py)
                    got.append(table.background(score.P, t, m, st))
                monkeypatch.setattr(online, "PY_WEIGHTS", py_limit)
                assert got[0] == got[1] and type(got[0]) is tuple, (got[0], got[1])
                n += 1
        for m in masks:
            cp = table._compiled(score.P, m)
            a, b = _groups_both(monkeypatch, cp, st, wb)
            _same_groups(a, b)
            n += 1
            if not cuts or st is None or not (st.held or st.in_flight):
                continue
            order = score.weight_order(score.names(m))
            sizes = [(w, 0 if w in st.held else int(st.in_flight.get(w, g.weights[w]))) for w in order]
            for x in _cut_points(sizes):
                state_x = planning.prefetched_state(st, sizes, x)
                ps = online.prefix_sent(cp, st, wb, sizes)
                ref = None
                for py in (py_limit, 0):
                    monkeypatch.setattr(online, "PY_WEIGHTS", py)
                    cp.__dict__.pop("_gb_state", None)
                    got_at = ps.at(x)
                    got_ref = online._group_bytes(cp, state_x, wb)
                    _same_groups(got_at, got_ref)
                    if ref is not None:
                        _same_groups(got_ref, ref)
                    ref = got_ref
                monkeypatch.setattr(online, "PY_WEIGHTS", py_limit)
                n += 1
    return n


@pytest.mark.parametrize("chunk", [0, 1])
def test_python_passes_are_numpys_on_random_dags(chunk, monkeypatch):
    n = 0
    for seed in range(chunk * 80, chunk * 80 + 80):
        rng = random.Random(seed)
        g = random_dag(seed, 6 + seed % 20, KINDS[seed % len(KINDS)])
        n += _check_graph(monkeypatch, g, Link(rng.choice([1.0, 20.0, 400.0]), rtt_ms=5.0), rng)
    assert n > 1000


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2"])
def test_python_passes_are_numpys_on_captured_graphs(name, monkeypatch):
    g = CostGraph.from_json(DATA / f"{name}.json")
    rng = random.Random(3)
    for up in (20.0, 400.0):
        _check_graph(monkeypatch, g.scaled(ue=10.0), Link(up, rtt_ms=5.0), rng, cuts=up == 400.0)


def _fields(c: planning.PlanChoice) -> dict:
    d = dict(vars(c))
    d.pop("decision_ms")
    return d


def test_choose_is_the_same_with_python_or_numpy_passes(monkeypatch):
    """``choose`` auto and mjoa with the Python passes and with numpy's, over random DAGs, links, send costs, held
    sets and horizons: every field the same."""
    n = 0
    for seed in range(60):
        rng = random.Random(seed)
        g = random_dag(seed, 6 + seed % 20, KINDS[seed % len(KINDS)]).scaled(ue=rng.choice([1.0, 10.0]))
        wsum = sum(g.weights.values()) or 1
        ue = sum(o.ue_ms for o in g.ops) or 1.0
        link = Link(max(1e-3, wsum / ue / 125.0 * rng.choice([0.1, 1.0, 5.0])), rtt_ms=rng.choice([2.0, 20.0]))
        cpu = UeCpu(send_ms_per_byte=rng.choice([2e-6, 2e-5, 2e-4]) * ue / wsum * 1e3)
        for st in held_states(rng, g, in_flight=3):
            for pol, h in (("auto", 3), ("auto", 12), ("mjoa", None)):
                got = []
                for py in (10**6, 0):
                    monkeypatch.setattr(online, "PY_WEIGHTS", py)
                    got.append(_fields(planning.choose(pol, g, link, state=st, ue_cpu=cpu, horizon=h)))
                monkeypatch.undo()
                assert got[0] == got[1], {k: (got[0][k], got[1][k]) for k in got[0] if got[0][k] != got[1][k]}
                n += 1
    assert n > 300
    assert Rates and effective_link  # (imported for the grid's helpers)
