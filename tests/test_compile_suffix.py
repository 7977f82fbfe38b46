"""``partitioner.online.compile_partition``'s suffix path (``_compile_suffix``, session 29b) gives the same compiled
partition as the general one (``_compile_general``), field by field and type by type, for every suffix of the op
order (k = 0..n: all on the server .. local) of random DAGs and of the captured graphs, calibrated copies included;
and a set that is no suffix still takes the general path."""

from __future__ import annotations

import dataclasses
import random
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from partitioner import online
from partitioner.costgraph import CostGraph
from partitioner.prep import prepare
from partitioner.synthetic import KINDS, random_dag

DATA = Path(__file__).parent / "data" / "costgraphs"


def fields(cp: online.Compiled) -> list:
    return [(type(v), v) for v in dataclasses.astuple(cp)]


def check_every_suffix(P) -> None:
    n = P.n
    full = (1 << n) - 1
    for k in range(n + 1):
        mask = full & ~((1 << k) - 1)
        assert fields(online.compile_partition(P, mask)) == fields(online._compile_general(P, mask)), k


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 10_000))
def test_suffix_path_is_the_general_one_on_random_dags(seed):
    g = random_dag(seed, 3 + seed % 20, KINDS[seed % len(KINDS)], pinned_prob=0.1 if seed % 5 == 0 else 0.0)
    check_every_suffix(prepare(g))
    check_every_suffix(prepare(g.scaled(ue=1.37, server=0.61)))


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2"])
def test_suffix_path_is_the_general_one_on_captured_graphs(name):
    g = CostGraph.from_json(DATA / f"{name}.json")
    check_every_suffix(prepare(g))
    check_every_suffix(prepare(g.scaled(ue=10.0).scaled(ue=1.39)))


def test_other_sets_take_the_general_path(monkeypatch):
    g = random_dag(7, 12, KINDS[0])
    P = prepare(g)
    n = P.n
    calls = []
    monkeypatch.setattr(online, "_compile_suffix", lambda P, k: calls.append(k))
    rng = random.Random(3)
    for _ in range(50):
        mask = rng.getrandbits(n)
        k = n - mask.bit_count()
        if mask != ((1 << n) - 1) & ~((1 << k) - 1):
            assert fields(online.compile_partition(P, mask)) == fields(online._compile_general(P, mask))
    assert calls == []
