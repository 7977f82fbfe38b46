"""``OnlineTable._held_candidates`` by the reachability closure (session 30b) is the walk it replaced.

The held candidate (every offloadable op reading held weights only whose successors are all in the set, walked
from the last op back) is now one boolean matrix-vector product with the held vector over what each op's
reachable ops read (``online._closure_weights``, built once per table and weights dict beside the other held
vectors). Checked here: on random DAGs with random offloadable masks (not only ``can_serve_mask``'s, which is
closed under successors on these graphs and so would not see a dropped ``all_ok``) and random held sets, the
closure's mask is the walk's, bit for bit; and the table's kept closure is rebuilt for a new weights dict (its
input) rather than reused.
"""

from __future__ import annotations

import random

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from partitioner import online
from partitioner.prep import prepare
from partitioner.state import ServerState
from tests.test_partitioner_online import SETTINGS, small_dag


def walk(P, okv: np.ndarray, held: frozenset[str]) -> int:
    """The walk ``_held_candidates`` made before: from the last op back, an op qualifying (offloadable, every
    weight held) joins when all its successors did."""
    m = 0
    for i in range(P.n - 1, -1, -1):
        if not okv[i] or any(w not in held for w in P.op_weights[i]):
            continue
        if all(m >> s & 1 for s in P.succs[i]):
            m |= 1 << i
    return m


def closure_mask(P, okv: np.ndarray, held: frozenset[str], weight_bytes: dict[str, int]) -> int:
    index = online._weight_index(weight_bytes)[0]
    w_idx = [index[w] for i in range(P.n) for w in P.op_weights[i]]
    w_op = [i for i in range(P.n) for _ in P.op_weights[i]]
    all_ok, reads = online._closure_weights(P, okv, w_idx, w_op, len(index))
    hv = np.array([w in held for w in index], dtype=bool)
    q = all_ok & ~(reads @ ~hv) if reads.shape[1] else all_ok
    return int.from_bytes(np.packbits(q, bitorder="little").tobytes(), "little")


def bits_mask(P, okv: np.ndarray, held: frozenset[str], weight_bytes: dict[str, int]) -> int:
    """Session 33's Python-int reading of the closure (``online.held_bits`` / ``held_mask``)."""
    index = online._weight_index(weight_bytes)[0]
    w_idx = [index[w] for i in range(P.n) for w in P.op_weights[i]]
    w_op = [i for i in range(P.n) for _ in P.op_weights[i]]
    all_ok, _ = online._closure_weights(P, okv, w_idx, w_op, len(index))
    return online.held_mask(online.held_bits(P, all_ok), held)


@SETTINGS
@given(seed=st.integers(0, 10_000))
def test_closure_is_the_walk_on_random_dags_and_offloadable_masks(seed):
    g = small_dag(seed)
    P = prepare(g)
    rng = random.Random(seed)
    ws = sorted(g.weights)
    for _ in range(8):
        okv = np.array([rng.random() < 0.8 for _ in range(P.n)], dtype=bool)
        held = frozenset(w for w in ws if rng.random() < rng.choice((0.3, 0.7, 1.0)))
        assert closure_mask(P, okv, held, g.weights) == walk(P, okv, held), (seed, okv.tolist(), sorted(held))
        assert bits_mask(P, okv, held, g.weights) == walk(P, okv, held), (seed, okv.tolist(), sorted(held))


def test_table_closure_is_rebuilt_for_a_new_weights_dict():
    g = small_dag(7)
    P = prepare(g)
    table = online.predictor(g)
    first = table._held_vectors(P)
    assert first[5] is not None and table._held_vectors(P) is first  # kept while the weights dict is the same
    table.weight_bytes = dict(table.weight_bytes)  # a new dict (the same weights): built again, not reused
    again = table._held_vectors(P)
    assert again is not first and again[0] is table.weight_bytes
    held = frozenset(sorted(g.weights)[: len(g.weights) // 2])
    okv = first[3]
    assert table._held_candidates(P, ServerState(held=held)) == ((walk(P, okv, held),) if walk(P, okv, held) else ())


def test_table_held_candidates_with_python_ints_are_the_product(monkeypatch):
    """``_held_candidates`` with ``HELD_BITS`` (session 33) and without it (the product), over random held sets."""
    for seed in range(40):
        g = small_dag(seed)
        P = prepare(g)
        rng = random.Random(seed)
        ws = sorted(g.weights)
        for _ in range(6):
            held = frozenset(w for w in ws if rng.random() < rng.choice((0.3, 0.7, 0.9, 1.0)))
            got = {}
            for flag in (True, False):
                monkeypatch.setattr(online, "HELD_BITS", flag)
                table = online.predictor(g)
                table._memo.pop(("held", held), None)
                got[flag] = table._held_candidates(P, ServerState(held=held))
            assert got[True] == got[False], (seed, sorted(held))
