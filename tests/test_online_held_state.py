"""The online table's held-state helpers (session 19) are the reference loops they replaced.

``OnlineTable._held_candidates`` (the largest offloadable server set whose weights are all held) now finds the
ops lacking a weight in one numpy pass and walks only the others with successor bitmasks; ``_held_vec`` builds a
held set's vector from the last one built when the new set grows it (a client's next request), and
``_bytes_left`` zeroes the held weights through it. Each is compared here with the loop it replaced, over random
DAGs and held / in-flight sets (hypothesis) and over a captured graph's held sets in request order (growing,
then shrinking, then growing from another set): the same mask, the same vectors, exactly.
"""

from __future__ import annotations

import random

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from partitioner import online
from partitioner.costgraph import CostGraph
from partitioner.oracle import can_serve_mask
from partitioner.prep import prepare
from partitioner.state import ServerState
from tests.test_partitioner_online import DATA, SETTINGS, small_dag


def held_candidates_ref(g: CostGraph, held: frozenset[str]) -> tuple[int, ...]:
    """Session 18's ``_held_candidates``: a Python pass over every op and its weights."""
    P = prepare(g)
    ok = can_serve_mask(P)
    m = 0
    for i in range(P.n - 1, -1, -1):
        if not ok >> i & 1 or any(w not in held for w in P.op_weights[i]):
            continue
        if all(m >> s & 1 for s in P.succs[i]):
            m |= 1 << i
    return (m,) if m else ()


def bytes_left_ref(table: online.OnlineTable, state: ServerState) -> np.ndarray:
    """Session 18's ``_bytes_left``: every held weight's index looked up one by one."""
    index, full, _ = online._weight_index(table.weight_bytes)
    got = full.copy()
    for w in state.held:
        if w in index:
            got[index[w]] = 0.0
    for w, b in state.in_flight.items():
        if w in index and w not in state.held:
            got[index[w]] = float(b)
    return got


def held_vec_ref(table: online.OnlineTable, held: frozenset[str]) -> np.ndarray:
    index = online._weight_index(table.weight_bytes)[0]
    return np.array([w in held for w in index], dtype=bool)


def check(g: CostGraph, table: online.OnlineTable, state: ServerState) -> None:
    P = prepare(g)
    assert table._held_candidates(P, state) == held_candidates_ref(g, state.held), sorted(state.held)
    assert np.array_equal(online._held_vec(table.weight_bytes, state.held), held_vec_ref(table, state.held))
    assert np.array_equal(online._bytes_left(table.weight_bytes, state), bytes_left_ref(table, state))


def stream(rng: random.Random, ws: list[str]) -> list[frozenset[str]]:
    """Held sets as a client meets them: growing, a drop (a server that evicted), growing again, unrelated."""
    order = rng.sample(ws, len(ws))
    grow = [frozenset(order[:k]) for k in sorted({rng.randint(0, len(ws)) for _ in range(6)} | {0, len(ws)})]
    shrunk = frozenset(rng.sample(ws, len(ws) // 3))
    again = [shrunk | frozenset(order[:k]) for k in sorted(rng.randint(0, len(ws)) for _ in range(3))]
    return [*grow, shrunk, *again, frozenset(rng.sample(ws, len(ws) // 2)), frozenset()]


@SETTINGS
@given(seed=st.integers(0, 10_000))
def test_held_state_helpers_are_the_reference_loops_on_random_dags(seed):
    g = small_dag(seed)
    table = online.predictor(g)
    rng = random.Random(seed)
    ws = sorted(g.weights)
    for held in stream(rng, ws):
        left = [w for w in ws if w not in held]
        infl = {w: rng.randint(0, g.weights[w]) for w in rng.sample(left, min(2, len(left)))}
        check(g, table, ServerState(held=held))
        check(g, table, ServerState(held=held, in_flight=infl))


def test_held_state_helpers_are_the_reference_loops_on_a_captured_graph():
    g = CostGraph.from_json(DATA / "mobilenet_v2.json")
    table = online.predictor(g)
    rng = random.Random(19)
    ws = sorted(g.weights)
    for _ in range(3):
        for held in stream(rng, ws):
            check(g, table, ServerState(held=held))
    # the suffixes a split leaves on the server, in request order (the set grows towards the whole model)
    for k in range(len(g.ops) - 1, -1, -7):
        check(g, table, ServerState(held=frozenset(w for op in g.ops[k:] for w in op.weights)))
