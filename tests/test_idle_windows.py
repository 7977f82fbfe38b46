"""The call gate's rule for a new call whose receive window does not fit (``edge_server.idle_windows``, session 26):
which call gives its window, and that nothing is taken when the new call would not fit anyway. On the gate itself,
in an event loop, with a real ``MemoryBudget`` (the servers and clients are in ``tests/test_health_admission.py``)."""

from __future__ import annotations

import asyncio

import pytest

from edge_server.call_state import Call
from edge_server.calls import CallGate
from edge_server.errors import ResourceExhausted
from edge_server.idle_windows import idle_victim
from edge_server.memory import MemoryBudget

W = 1 << 20


def test_idle_victim_prefers_a_bigger_holder_then_the_newcomers_own_old_calls():
    """The oldest call (any age) of the key holding the most windows when it holds two more than the newcomer's key;
    else the newcomer's own oldest call held ``min_age_s``; never a call of the other budget (a tenant's for a
    ``peer:`` newcomer), an ended call, or one without a window."""

    def call(key: str, opened: float, window=True, ended=False) -> Call:
        c = Call(key, "", "", "Check", None)
        c.opened, c.window = opened, object() if window else None
        if ended:
            c.reason = RuntimeError("ended")
        return c

    a = [call("peer:A", t) for t in (0.5, 0.9, 0.95)]
    b = [call("peer:B", t) for t in (0.2, 0.3)]
    t = [call("tenant:t", t) for t in (0.0, 0.1, 0.2)]
    calls = {"peer:A": set(a), "peer:B": set(b), "tenant:t": set(t)}
    assert idle_victim(calls, "peer:C", 1.0, 0.1) is a[0]  # A holds 3 >= 0 + 2, its oldest whatever its age
    assert idle_victim(calls, "peer:C", 1.0, 0.9) is a[0]
    assert idle_victim(calls, "tenant:u", 1.0, 0.1) is t[0]  # the tenants' budget
    assert idle_victim(calls, "peer:B", 1.0, 0.1) is b[0]  # A holds one more than B: B's own oldest, old enough
    assert idle_victim(calls, "peer:B", 1.0, 0.9) is None  # ... not when too young
    assert idle_victim(calls, "peer:A", 1.0, 0.1) is a[0]  # the biggest holder: its own
    calls = {"peer:A": {call("peer:A", 0.0, ended=True), call("peer:A", 0.0, window=False), call("peer:A", 0.95)}}
    assert idle_victim(calls, "peer:C", 1.0, 0.1) is None  # one live window: not two more than C's none


async def _open(gate: CallGate, key: str, n: int, age_s: float = 1.0) -> list[tuple[asyncio.Task, Call]]:
    """``n`` calls of ``key`` entered in the gate, each in a task of its own that waits until cancelled, made
    ``age_s`` old."""
    out = []
    for _ in range(n):
        entered: asyncio.Future = asyncio.get_running_loop().create_future()

        async def hold(fut=entered):
            try:
                fut.set_result(gate.enter(key, method="Check"))
            except ResourceExhausted as e:
                fut.set_exception(e)
                return
            await asyncio.sleep(3600)

        task = asyncio.create_task(hold())
        c = await entered
        c.opened -= age_s
        out.append((task, c))
    return out


def _gate(limit_windows: int, fraction: float) -> tuple[CallGate, MemoryBudget]:
    budget = MemoryBudget(limit_windows * W, holder_fraction=fraction)
    gate = CallGate(max_calls=16, max_waiting=16, first_message_s=0, memory=budget, idle_window_s=0.1)
    gate.window_bytes = W
    return gate, budget


def test_a_new_host_takes_the_biggest_holders_oldest_window_and_that_call_ends():
    async def main():
        gate, budget = _gate(4, 0.5)
        a = await _open(gate, "peer:A", 2)
        b = await _open(gate, "peer:B", 2, age_s=2.0)
        c = await _open(gate, "peer:C", 1, age_s=0.0)  # the budget was full: A's or B's (they tie at 2), its oldest
        await asyncio.sleep(0)
        ended = [(t, call) for t, call in a + b if t.done()]
        assert len(ended) == 1, ended
        same_key = a if ended[0][1].key == "peer:A" else b
        assert ended[0][1] is min((call for _, call in same_key), key=lambda x: x.opened)
        assert ended[0][1].window is None
        assert gate.windows_taken == 1 and c[0][1].window is not None
        assert budget.stats().reserved_bytes == 4 * W
        for t, _ in a + b + c:
            t.cancel()

    asyncio.run(main())


def test_nothing_is_taken_when_the_newcomer_would_not_fit_anyway():
    """The newcomer's own holder's share is full with reservations outside the gate (a tokenless server: its
    EdgeService calls under the same address key): giving it another host's window would not make it fit. The other
    call keeps its window and goes on; the newcomer is refused."""

    async def main():
        gate, budget = _gate(6, 0.5)  # a holder at most 3 windows
        outside = budget.reserve("peer:A", 3 * W, "A's sessions")
        b = await _open(gate, "peer:B", 3)  # full: 6 of 6
        with pytest.raises(ResourceExhausted):
            await _open(gate, "peer:A", 1)
        await asyncio.sleep(0)
        assert not any(t.done() for t, _ in b)
        assert all(c.window is not None for _, c in b) and gate.windows_taken == 0
        assert budget.stats().reserved_bytes == 6 * W and budget.held_by("peer:B") == 3 * W
        outside.release()
        for t, _ in b:
            t.cancel()

    asyncio.run(main())
