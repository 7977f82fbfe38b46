"""Which open call gives its receive window to a newer one when the budget cannot hold both (the health service's
gate, session 26).

Why (break25b F1): a health call holds its receive window in a budget from its start until its request is read (a
``Check``) or its client closes its side (a ``Watch``): what its client may send unread into grpc's buffers
(``edge_server.call_memory``). An honest probe holds it for a round trip; a client that opens calls and sends
nothing (or a Watch's request and keeps its side open) holds it until the first message's deadline or the Watch's
half-close wait, and opens the next as soon as one ends. Five such calls from 127.0.0.1 held that host's share of the
health budget: 60 of 60 tokenless Checks from the same address were RESOURCE_EXHAUSTED (silent Checks and held
Watches alike, ``b/hold.py 5 12 1.0``), and from four addresses (each at its host's share, a quarter) every host's
were. A probe refused is a pod restarted by its orchestrator.

The rule: a new call whose window does not fit takes the window of an open call in the same budget, which is ended
UNAVAILABLE ("retry") and its window given back at once: the oldest call of the key holding the most windows when that
key holds at least two more than the newcomer's (a host at its share gives way to a host holding one or none,
whatever its calls' age: a client reopening its calls as they end keeps them all young), else the newcomer's own
oldest call that has held its window ``min_age_s`` (a host at its own share: its idle calls make room for its probe;
an honest call gives its window back within a round trip and the server's queueing). What it leaves: on the probe's
own host, a client that closes and reopens each of its calls within ``min_age_s`` keeps them too young to be taken
(``share / min_age_s`` calls per second; each still admitted, counted and paced as any call), and nothing tells its
calls from the probe's; a probe that waits longer than ``min_age_s`` for a reading slot can itself be the oldest.
Used only on the server's event loop.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

from edge_server.call_state import Call
from edge_server.errors import ResourceExhausted, Unavailable
from edge_server.tarpit import PEER_KEY

if TYPE_CHECKING:
    from edge_server.call_memory import CallMemory
    from edge_server.memory import Reservation

__all__ = ["IDLE_WINDOW_S", "idle_victim", "take_window"]

IDLE_WINDOW_S = 0.1
"""How long a health call holds its receive window before a newer call may take it (s): the health gate's slots
take a silent holder's reading slot back after the same 0.25 s (``edge_server.wire.health_gate``)."""


def idle_victim(open_calls: dict[str, Iterable[Call]], key: str, now: float, min_age_s: float) -> Call | None:
    """The call whose window a new call of ``key`` takes (module docstring), or None.

    ``open_calls``: the gate's calls by key; ``now``: the event loop's time. Only calls of the same budget as ``key``
    (``peer:`` keys', or the others'), holding a window and not ended, count. First choice: the oldest call of the key
    holding the most windows, if it holds at least two more than ``key`` does (whatever its calls' age: a bigger
    holder gives way to a smaller one, never to an equal, so two hosts do not take windows back and forth). Else
    ``key``'s own oldest call that has held its window ``min_age_s`` seconds (its own share is what is full: which of
    its calls is the probe nothing tells, and the oldest has been silent longest)."""
    peer = key.startswith(PEER_KEY)
    held: dict[str, list[Call]] = {}
    for k, calls in open_calls.items():
        if k.startswith(PEER_KEY) == peer:
            mine = [c for c in calls if c.window is not None and c.reason is None]
            if mine:
                held[k] = mine
    own = held.get(key, [])
    biggest = max((k for k in held if k != key), key=lambda k: len(held[k]), default=None)
    if biggest is not None and len(held[biggest]) >= len(own) + 2:
        return min(held[biggest], key=lambda c: c.opened)
    old = [c for c in own if now - c.opened >= min_age_s]
    return min(old, key=lambda c: c.opened) if old else None


def take_window(open_calls: dict[str, Iterable[Call]], holds: CallMemory, key: str, holder: str, method: str,
                now: float, min_age_s: float) -> Reservation | None:
    """Give back the window of the call :func:`idle_victim` names, reserve the new call's (``holds.window(holder,
    method)``), then end that call UNAVAILABLE ("retry"; its answer is counted where it is answered,
    ``edge_server.wire._answer_now``). Returns the new call's reservation; None when no call is old enough or the
    new call still does not fit (its own holder's share full, not the budget: the other call's window is then
    counted again and that call goes on)."""
    victim = idle_victim(open_calls, key, now, min_age_s)
    if victim is None:
        return None
    window, victim.window = victim.window, None
    window.release()
    try:
        mine = holds.window(holder, method)
    except ResourceExhausted:
        victim.window = holds.memory.charge(victim.tenant or victim.key, window.nbytes)
        return None
    victim.end(Unavailable(f"{victim.method}: this call held its receive window without its request (or its "
                           "half-close) while a newer call needed one; it was given to the newer call: retry"))
    return mine
