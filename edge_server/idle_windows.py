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
whatever its calls' state: a client reopening its calls as they end keeps them all young), else the call that has
held its window on its own account longest, at least ``min_age_s``, of any key holding at least as many windows as
the newcomer's (:func:`idle_since`: from taking its reading slot, so through a silent request or a Watch's wait for
its half-close; never while it waits on the server for a reading slot; an honest call is read within a round trip of
its slot), a call waiting for its host's pacing turn first, at any age (its host is past its burst of health calls: a
flood; break26b F1). A host's own idle calls make room for its probe, and strangers' silent calls spread one per
host over many addresses (break26 F1: 34 hosts) for another host's. What it leaves: on the probe's own host, a
client that closes and reopens each of its calls within ``min_age_s`` of their slot keeps them too young to be
taken, and nothing tells its calls from the probe's; one silent call on each of more hosts than the budget has
windows leaves a probe as many hosts holding one each (break26 F1: ``--health-port`` is the operator's way out,
``edge_server.health_listener``). :func:`crowded_victim` is the same first rule on calls instead of windows, for a
gate's cap on calls over all hosts (session 27).
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

__all__ = ["IDLE_WINDOW_S", "TAKE_COOLDOWN_S", "TakenFrom", "crowded_victim", "idle_since", "idle_victim",
           "take_window"]

IDLE_WINDOW_S = 0.1
"""How long a health call holds its receive window on its own account (:func:`idle_since`) before a newer call of a
host holding as many windows may take it (s); below the 0.25 s after which the health gate takes a silent holder's
reading slot back (``edge_server.wire.health_gate``), so a silent call can be taken before its slot goes round."""


def idle_since(call: Call) -> float | None:
    """When ``call`` began to hold its window on its own account (the event loop's time), or None while it waits on
    the server: from taking its server-wide reading slot (in a gate without such slots, from when it began to read:
    ``CallGate.reading``) (its request can then arrive: an honest one is read within a round trip) through its
    first message and after it (a Watch waiting for its client's half-close); while it waits for its host's pacing
    turn, from when it began to wait (``Call.paced_since``: only a host past its burst of health calls waits there;
    :func:`idle_victim` takes such a call at any age, before any other); None while it waits for a reading slot
    (break26 F3: counted from its start, an honest host's calls queued behind strangers' slots were taken by its own
    newer calls, 70 of 75 Checks ended)."""
    if call.paced_since > 0:
        return call.paced_since
    if call.read_since > 0 and not call.queued:
        return call.read_since
    return None


def _biggest_holders_call(held: dict[str, list[Call]], key: str) -> Call | None:
    """The first rule of :func:`idle_victim` over ``held`` (key -> its calls holding what is short)."""
    own = len(held.get(key, ()))
    # among keys holding equally many, the one that opened a call last (a client reopening its calls as they end),
    # not the one in ``held`` first, the longest-standing (break27 F2b: an honest host's two Watch streams)
    biggest = max((k for k in held if k != key), key=lambda k: (len(held[k]), max(c.opened for c in held[k])),
                  default=None)
    if biggest is not None and len(held[biggest]) >= own + 2:
        return min(held[biggest], key=lambda c: c.opened)
    return None


def _idle_call(held: dict[str, list[Call]], key: str, now: float, min_age_s: float,
               silent_only: bool = False) -> Call | None:
    """The second rule of :func:`idle_victim` over ``held``; ``silent_only``: idle calls count only while their
    request has not come (not a Watch past it)."""
    own = len(held.get(key, ()))
    victim, rank = None, (1, now - min_age_s)
    for calls in held.values():
        if len(calls) >= own:
            for c in calls:
                t = idle_since(c)
                r = (0, t) if c.paced_since > 0 else (1, t)  # a paced call at any age, before any idle one
                if t is not None and r <= rank and (c.waiting or not silent_only):
                    victim, rank = c, r
    return victim


def idle_victim(open_calls: dict[str, Iterable[Call]], key: str, now: float, min_age_s: float) -> Call | None:
    """The call whose window a new call of ``key`` takes (module docstring), or None.

    ``open_calls``: the gate's calls by key; ``now``: the event loop's time. Only calls of the same budget as ``key``
    (``peer:`` keys', or the others'), holding a window and not ended, count. First choice: the oldest call of the key
    holding the most windows (of equals, the key that opened a call last), if it holds at least two more than ``key``
    does (whatever its calls' state: a bigger holder gives way to a smaller one, never to an equal, so two hosts do
    not take windows back and forth). Else the call waiting longest for its host's pacing turn, at any age (its host
    is past its burst: a flood; break26b F1: 12 hosts each keeping two complete Checks open, paced, holding their
    windows there, left a prober only its own calls to take), else the call idle longest (:func:`idle_since`, at
    least ``min_age_s``), of any key holding at least as many windows as ``key`` (``key`` itself included: its own
    share may be what is full; a host holding fewer keeps its calls: break26 F1, one silent call from each of 34
    hosts left no host two windows over a prober's none)."""
    peer = key.startswith(PEER_KEY)
    held: dict[str, list[Call]] = {}
    for k, calls in open_calls.items():
        if k.startswith(PEER_KEY) == peer:
            mine = [c for c in calls if c.window is not None and c.reason is None]
            if mine:
                held[k] = mine
    return _biggest_holders_call(held, key) or _idle_call(held, key, now, min_age_s)


def crowded_victim(open_calls: dict[str, Iterable[Call]], key: str, now: float, min_age_s: float) -> Call | None:
    """The call a new call of ``key`` ends when the gate's calls over all ``peer:`` keys are at their cap
    (``CallGate(take_calls=True)``), or None: :func:`idle_victim`'s two rules on the live calls of ``peer:`` keys
    instead of their windows (a tenant's key takes none), the second first: a silent or paced call goes before a
    bigger holder's call that has sent its request (an honest host's Watch streams and its probe made it the biggest
    holder, and a silent host's newcomer ended its Watch). Why (session 27, the health port): the paced calls of 48
    hosts x 16 silent Checks held its 512 calls, and 19 of 20 probes from another host were refused; with the
    first rule alone, 530 hosts x 1 silent Check still had 53 of 75 refused (break27 F1: no host held two more than
    a prober), hence the second: a call silent past ``min_age_s`` (no request yet: a Watch past its request keeps
    its place, break27 F2) or paced."""
    if not key.startswith(PEER_KEY):
        return None
    live: dict[str, list[Call]] = {}
    for k, calls in open_calls.items():
        if k.startswith(PEER_KEY):
            mine = [c for c in calls if c.reason is None]
            if mine:
                live[k] = mine
    return _idle_call(live, key, now, min_age_s, silent_only=True) or _biggest_holders_call(live, key)


TAKE_COOLDOWN_S = 1.0
"""Seconds after one of its calls was ended for another host's during which a host may take only its own calls'
windows or places (:class:`TakenFrom`)."""


class TakenFrom:
    """When each host last had a call ended for another host's newcomer: for :data:`TAKE_COOLDOWN_S` after, that
    host's own newcomers may take only its own calls (``CallGate``'s takes pass ``own_only``). Why (break27 F1): one
    silent call on each of more hosts than places, each reopened as it ends, made the strangers' newcomers take every
    call as soon as it was old enough, a probe one host among them (16-18 of 20 answered); a host whose call was just
    taken has shown it holds places without using them, and a probe's host, whose calls send their request, is
    never taken from. Bounded: at most ``max_keys`` hosts remembered, the oldest forgotten first."""

    def __init__(self, cooldown_s: float = TAKE_COOLDOWN_S, max_keys: int = 4096) -> None:
        self.cooldown_s, self.max_keys = cooldown_s, max_keys
        self._at: dict[str, float] = {}

    def blocked(self, key: str, now: float) -> bool:
        """Whether ``key`` may take only its own calls now."""
        t = self._at.get(key)
        return t is not None and now - t < self.cooldown_s

    def note(self, victim: Call | None, key: str, now: float) -> None:
        """``victim`` (if any) was ended for a newcomer of ``key``; a host's own take does not count."""
        if victim is None or victim.key == key:
            return
        self._at.pop(victim.key, None)
        self._at[victim.key] = now
        if len(self._at) > self.max_keys:
            for k in list(self._at)[: len(self._at) - self.max_keys]:
                del self._at[k]


def take_window(open_calls: dict[str, Iterable[Call]], holds: CallMemory, key: str, holder: str, method: str,
                now: float, min_age_s: float) -> tuple[Reservation | None, Call | None]:
    """Give back the window of the call :func:`idle_victim` names, reserve the new call's (``holds.window(holder,
    method)``), then end that call UNAVAILABLE ("retry"; its answer is counted where it is answered,
    ``edge_server.wire._answer_now``). Returns the new call's reservation and the call ended; (None, None) when no
    call is old enough or the new call still does not fit (its own holder's share full, not the budget: the other
    call's window is then counted again and that call goes on)."""
    victim = idle_victim(open_calls, key, now, min_age_s)
    if victim is None:
        return None, None
    window, victim.window = victim.window, None
    window.release()
    try:
        mine = holds.window(holder, method)
    except ResourceExhausted:
        victim.window = holds.memory.charge(victim.tenant or victim.key, window.nbytes)
        return None, None
    why = ("waited for its host's turn (past its burst of health calls)" if victim.paced_since > 0 else
           "held its receive window without its request (or its half-close)")
    victim.end(Unavailable(f"{victim.method}: this call {why} while a newer call needed a receive window; its "
                           "window was given to the newer call: retry"))
    return mine, victim
