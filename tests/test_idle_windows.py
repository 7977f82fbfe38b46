"""The call gate's rule for a new call whose receive window does not fit (``edge_server.idle_windows``, session 26):
which call gives its window, and that nothing is taken when the new call would not fit anyway. On the gate itself,
in an event loop, with a real ``MemoryBudget`` (the servers and clients are in ``tests/test_health_admission.py``)."""

from __future__ import annotations

import asyncio

import pytest

from edge_server.call_state import Call
from edge_server.calls import CallGate
from edge_server.errors import ResourceExhausted
from edge_server.idle_windows import crowded_victim, idle_victim
from edge_server.memory import MemoryBudget

W = 1 << 20


def _call(key: str, opened: float, window=True, ended=False, slot_at: float = 0.0, read=False) -> Call:
    """A plain call opened at ``opened``; ``slot_at``: when it took its reading slot (0: never), ``read``: its first
    message is in."""
    c = Call(key, "", "", "Check", None)
    c.opened, c.window = opened, object() if window else None
    c.read_since, c.server_reading, c.waiting = slot_at, bool(slot_at) and not read, not read
    if ended:
        c.reason = RuntimeError("ended")
    return c


def test_idle_victim_prefers_a_bigger_holder_then_the_longest_idle_call():
    """The oldest call (any state) of the key holding the most windows when it holds two more than the newcomer's key;
    else the call idle longest (from its reading slot, at least ``min_age_s``) of a key holding at least as many as
    the newcomer's; never a call of the other budget (a tenant's for a ``peer:`` newcomer), an ended call, one without
    a window, or one waiting for its slot."""
    a = [_call("peer:A", t, slot_at=t) for t in (0.5, 0.9, 0.95)]
    b = [_call("peer:B", 0.1, slot_at=0.3), _call("peer:B", 0.2, slot_at=0.4)]
    t = [_call("tenant:t", t, slot_at=t) for t in (0.0, 0.1, 0.2)]
    calls = {"peer:A": set(a), "peer:B": set(b), "tenant:t": set(t)}
    assert idle_victim(calls, "peer:C", 1.0, 0.1) is a[0]  # A holds 3 >= 0 + 2, its oldest whatever its state
    assert idle_victim(calls, "peer:C", 1.0, 0.9) is a[0]
    assert idle_victim(calls, "tenant:u", 1.0, 0.1) is t[0]  # the tenants' budget
    assert idle_victim(calls, "peer:B", 1.0, 0.1) is b[0]  # A holds one more than B: the longest idle of A's and B's
    assert idle_victim(calls, "peer:B", 1.0, 0.75) is None  # ... none idle that long
    assert idle_victim(calls, "peer:A", 1.0, 0.1) is a[0]  # the biggest holder: its own
    calls = {"peer:A": {_call("peer:A", 0.0, ended=True), _call("peer:A", 0.0, window=False),
                        _call("peer:A", 0.0, slot_at=0.95)}}
    assert idle_victim(calls, "peer:C", 1.0, 0.1) is None  # one live window, in its slot 0.05 s: too young


def test_one_silent_call_on_each_of_many_hosts_gives_way_to_a_host_holding_none():
    """break26 F1: one silent call per host, many hosts, the budget full: no host holds two more than the prober's
    none; the call in its slot longest goes."""
    calls = {f"peer:H{i}": {_call(f"peer:H{i}", 0.0, slot_at=0.5 + i / 100)} for i in range(30)}
    victim = idle_victim(calls, "peer:P", 1.0, 0.1)
    assert victim is not None and victim.key == "peer:H0"
    assert idle_victim(calls, "peer:P", 1.0, 0.6) is None  # none in its slot that long


def test_calls_waiting_on_the_server_are_not_taken_by_their_own_hosts_newer_calls():
    """break26 F3: an honest host's calls queued for a reading slot (behind strangers' silent calls) or done with their
    request are not idle; counted from their start they were, and its newer calls ended them (70 of 75 Checks)."""
    queued = [_call("peer:A", 0.0), _call("peer:A", 0.1)]  # no slot yet, however old
    watch = _call("peer:A", 0.0, slot_at=0.05, read=True)  # a Watch past its request, waiting for its half-close
    calls = {"peer:A": set(queued)}
    assert idle_victim(calls, "peer:A", 1.0, 0.1) is None
    calls["peer:A"].add(watch)
    assert idle_victim(calls, "peer:A", 1.0, 0.1) is watch


def test_a_call_waiting_for_its_hosts_pacing_turn_is_taken_first_at_any_age():
    """break26b F1: a call waiting for its pacing turn (its host past its burst) is taken before any idle call and
    however young, by a newcomer of a key holding no more windows than its own; never by a bigger holder's newcomer."""
    idle = _call("peer:A", 0.0, slot_at=0.2)  # in its slot 0.8 s without its request
    paced = _call("peer:B", 0.95)
    paced.paced_since = 0.99  # began to wait 10 ms ago
    calls = {"peer:A": {idle}, "peer:B": {paced}}
    assert idle_victim(calls, "peer:C", 1.0, 0.1) is paced
    assert idle_victim(calls, "peer:B", 1.0, 0.1) is paced
    calls["peer:C"] = {_call("peer:C", 0.0, slot_at=0.5, read=True), _call("peer:C", 0.0, slot_at=0.5, read=True)}
    assert idle_victim(calls, "peer:C", 1.0, 0.1).key == "peer:C"  # C holds more than B: its own idle call goes
    paced.paced_since = 0.0  # its turn came: it waits on the server for a reading slot, not takeable
    assert idle_victim({"peer:B": {paced}}, "peer:C", 1.0, 0.1) is None


def test_crowded_victim_is_the_oldest_call_of_the_host_holding_two_more_else_the_longest_silent_one():
    """At the cap on calls over all hosts: the oldest live call of the ``peer:`` key with the most live calls when it
    holds two more than the newcomer's key (of equals, the key that opened a call last: break27 F2b); else a paced
    call, else the call silent longest (no request yet, past ``min_age_s``) of a key holding at least as many as the
    newcomer's (break27 F1: 530 hosts x 1 silent Check); never a Watch past its request, nor a tenant's call."""
    a = [_call("peer:A", t) for t in (0.3, 0.1, 0.2)]
    b = [_call("peer:B", 0.0), _call("peer:B", 0.0, ended=True)]
    calls = {"peer:A": set(a), "peer:B": set(b), "tenant:t": {_call("tenant:t", 0.0)}}
    assert crowded_victim(calls, "peer:C", 1.0, 0.1) is a[1]  # A: 3 >= 0 + 2
    assert crowded_victim(calls, "peer:B", 1.0, 0.1) is a[1]  # B holds one live call: 3 >= 1 + 2
    calls["peer:C"] = {_call("peer:C", 0.0), _call("peer:C", 0.0)}
    assert crowded_victim(calls, "peer:C", 1.0, 0.1) is None  # A holds one more than C, nobody silent
    assert crowded_victim(calls, "tenant:u", 1.0, 0.1) is None
    # one call per host: a silent one in its read past min_age goes, a Watch past its request does not
    silent = _call("peer:S", 0.5, slot_at=0.5)
    young = _call("peer:Y", 0.95, slot_at=0.95)
    watch = _call("peer:W", 0.0, slot_at=0.1, read=True)
    calls = {"peer:S": {silent}, "peer:Y": {young}, "peer:W": {watch}}
    assert crowded_victim(calls, "peer:P", 1.0, 0.1) is silent
    assert crowded_victim(calls, "peer:P", 1.0, 0.6) is None
    # ties for the most: the host that opened a call last gives way, not the longest-standing one
    honest = {_call("peer:H", 0.0, slot_at=0.01, read=True), _call("peer:H", 0.0, slot_at=0.01, read=True)}
    churn = {_call("peer:X", 0.9), _call("peer:X", 0.95)}
    victim = crowded_victim({"peer:H": honest, "peer:X": churn}, "peer:P", 1.0, 0.1)
    assert victim is not None and victim.key == "peer:X"


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
