"""The calls of the EdgeService from their first byte to their answer: bounded per caller, ended on revocation.

What a call costs the server before any of our checks runs: grpc's call state, the handler's task and its frames,
~22 KB (session 17: 6000 calls that sent headers and no message held 352 -> 484 MiB RSS, every one still open
25 s later, `docs/results/attack/session17/`). Before this gate nothing bounded how many a token (or, refused in
the tarpit, a stranger) could hold, nor how long a call may wait for its first message (the servicer awaited
OpenSession / the UploadHeader / a unary call's one message with no deadline, and the idle timeout starts only
once a session exists). And a call runs on past its token's revocation: the token is checked at the call's start.

:class:`CallGate`, per caller key (:func:`edge_server.tarpit.caller_key`: the tenant of a valid bearer token, else
the peer's address):

- ``max_calls`` calls open at once (a call's answer waiting in the tarpit included): one more is refused at once,
  RESOURCE_EXHAUSTED (it holds nothing while refused; waiting in the tarpit it would be one more open call);
- ``max_peer_calls`` calls open at once over all keys that are addresses (callers without a valid token, e.g.
  strangers refused in the tarpit, at as many addresses as they have: 127.0.0.0/8 on loopback): one more is refused
  at once, as above (a tenant's calls are not counted there);
- ``max_waiting`` of them waiting for their first message: one more ends the key's *oldest* such call
  RESOURCE_EXHAUSTED (as the data channel's ticketless connections: an honest call sends its first message at once,
  so it is never the oldest for long, while silent ones are evicted);
- a call's first message within ``first_message_s`` seconds, else it ends DEADLINE_EXCEEDED;
- ``max_reading`` calls of a key, and ``server_reading`` calls over all keys, reading their request (a unary call's
  message, a stream's first) at once (:meth:`CallGate.reading`; ``--max-reading-calls``, ``--max-reading-mb``; the
  server-wide slots and who gets them: :class:`edge_server.reading_slots.ReadingSlots`);
- a decoded request of ``hold_min_bytes`` or more held in the server's memory budget while its call uses it, refused
  RESOURCE_EXHAUSTED when it does not fit (:meth:`CallGate.hold_request`, session 20), beside each call's receive
  window and a stream's next read (what a call holds of the budget: :class:`edge_server.call_memory.CallMemory`);
- :meth:`CallGate.revoke` (the tokens file reloaded, SIGHUP) ends with UNAUTHENTICATED every call whose bearer
  token the new file no longer maps to its tenant, wherever it is (an UploadWeights mid-weight, a ProfileGraph
  running, a refusal in the tarpit); an opened Session is ended by its session's own path
  (``EdgeRuntime.reload_tokens``).

A call is ended by cancelling its handler's task with the reason recorded (:meth:`Call.end`); the wire handler
(``edge_server.wire``) catches the cancellation and answers the reason's status. Used only on the server's event
loop (no locks).
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from collections.abc import Callable
from typing import TYPE_CHECKING

from edge_server.call_memory import HOLD_MIN_BYTES, REQUEST_HOLD_FACTOR, CallMemory
from edge_server.call_state import Call
from edge_server.errors import DeadlineExceeded, EdgeError, ResourceExhausted, Unauthenticated, Unavailable
from edge_server.idle_windows import TakenFrom, crowded_victim, take_window
from edge_server.reading_slots import CONTENDED_FIRST_MESSAGE_S, READING_GRACE_S, ReadingSlots
from edge_server.tarpit import PEER_KEY

if TYPE_CHECKING:
    from edge_server.memory import MemoryBudget, Trimmer

logger = logging.getLogger(__name__)

__all__ = ["CONTENDED_FIRST_MESSAGE_S", "HOLD_MIN_BYTES", "READING_GRACE_S", "RECEIVE_COPIES", "REQUEST_HOLD_FACTOR",
           "Call", "CallGate"]

RECEIVE_COPIES = 2
"""Copies of a message the server holds while receiving and decoding it: grpc's received buffer and the bytes handed
to the deserializer (upb's message then aliases the latter, +0). Each of the server-wide reading slots
(``ServerConfig.max_reading_bytes``) takes this many times the message limit off the budget for work in flight."""


class CallGate:
    """Bounds on the calls open per caller key and on their first message, and revocation (module docstring); the
    server-wide reading slots and what calls hold of the memory budget are its parts' (:attr:`slots`, :attr:`holds`).

    ``max_calls``: calls one key may have open at once (>= 1); ``max_waiting``: of them, waiting for their first
    message (>= 1); ``first_message_s``: the deadline of a call's first message (s; 0: none); ``max_peer_calls``:
    calls open at once over all ``peer:`` keys (>= 1); ``max_reading``: calls of one key reading their request (a
    unary call's one message, a stream's first) at once (0: no bound; :meth:`reading`); ``server_reading``: calls
    reading their request at once over all keys (0: no bound; :meth:`reading`); ``memory``: the budget a decoded
    request is held in while its call uses it (None: not counted; :meth:`hold_request`), ``hold_min_bytes`` the
    smallest request counted; ``trimmer``: told of each held request dropped (``edge_server.memory.Trimmer``): these
    three are :class:`~edge_server.call_memory.CallMemory`'s (:attr:`holds`).
    ``on_refused(method, code)``: called for each call the gate refuses or ends (the server's metrics);
    ``reading_grace_s``: how long a call keeps a server-wide slot its key holds beyond its share while another key
    waits (s); ``contended_s``: how long a call keeps one within its key's share without its first message arriving
    while another key waits (s; <= 0: until ``first_message_s``): both :class:`~edge_server.reading_slots.ReadingSlots`
    (:attr:`slots`); ``idle_window_s``: a new call whose receive window does not fit takes the window of a call that
    has held its own this long (s; 0: never; ``edge_server.idle_windows``: the health service's gate); ``take_calls``:
    with ``max_peer_calls`` reached, a new call of a ``peer:`` key ends a call silent for ``idle_window_s`` or
    paced, else the oldest of a key holding two more (``edge_server.idle_windows.crowded_victim``; the health
    gates); ``stranger_contended_s``:
    ``contended_s`` for ``peer:`` keys' calls (None: the same)."""

    def __init__(
        self,
        max_calls: int = 256,
        max_waiting: int = 32,
        first_message_s: float = 120.0,
        on_refused: Callable[[str, str], None] | None = None,
        max_peer_calls: int = 4096,
        max_reading: int = 0,
        memory: MemoryBudget | None = None,
        trimmer: Trimmer | None = None,
        hold_min_bytes: int = HOLD_MIN_BYTES,
        server_reading: int = 0,
        reading_grace_s: float = READING_GRACE_S,
        contended_s: float = CONTENDED_FIRST_MESSAGE_S,
        idle_window_s: float = 0.0,
        take_calls: bool = False,
        stranger_contended_s: float | None = None,
    ) -> None:
        if max_calls < 1 or max_waiting < 1 or first_message_s < 0 or max_peer_calls < 1 or server_reading < 0:
            raise ValueError("CallGate needs max_calls >= 1, max_waiting >= 1, first_message_s >= 0, max_peer_calls "
                             f">= 1 (got {max_calls}, {max_waiting}, {first_message_s}, {max_peer_calls})")
        self.max_calls, self.max_waiting, self.first_message_s = max_calls, max_waiting, first_message_s
        self.max_peer_calls = max_peer_calls
        self.max_reading = max_reading
        """Calls of one key reading their request (a unary call's message, a stream's first) at once (0: no bound;
        :meth:`reading`)."""
        self.holds = CallMemory(memory, trimmer, hold_min_bytes)
        """What each call holds of the memory budget (``memory``; None: nothing counted): its receive window,
        decoded request and a stream's next read."""
        self.slots = ReadingSlots(server_reading, reading_grace_s, contended_s, on_granted=self._restart_deadline,
                                  stranger_contended_s=stranger_contended_s)
        """The ``server_reading`` server-wide reading slots and who gets them (0: no bound; ``ServerConfig.
        max_reading_bytes``), taken after the key's in :meth:`reading`."""
        self._readers: dict[str, list] = {}
        """Key -> [its semaphore of ``max_reading`` slots, calls holding or waiting for one]."""
        self._peer_calls = 0
        """Calls open now under ``peer:`` keys."""
        self._open: dict[str, set[Call]] = {}
        self._waiting: dict[str, OrderedDict[Call, None]] = {}
        self._all_waiting: OrderedDict[Call, None] = OrderedDict()
        """Every call waiting for its first message, oldest first (whose deadline comes first)."""
        self._sweep: asyncio.TimerHandle | None = None
        """The one timer of the first-message deadlines: at the oldest waiting call's (:meth:`_expire`). Before, a
        timer per call cost ~40 us of the server's CPU per call (asyncio's TimerHandle and its heap, cancelled
        handles kept 120 s; cProfile of 3000 Hellos, session 18): a tenth of a Hello."""
        self.on_refused = on_refused
        """Called with (method, status name) for each call the gate refuses or ends (the server's metrics)."""
        self.refused = 0
        """Calls refused over ``max_calls``, since start."""
        self.evicted = 0
        """Calls ended waiting for their first message (evicted or past the deadline), since start."""
        self.revoked = 0
        """Calls ended by :meth:`revoke`, since start."""
        self.idle_window_s = idle_window_s
        """A call holding its receive window this long gives it to a new call that needs it (0: never)."""
        self.windows_taken = 0
        """Calls ended to give their window to a newer call (``idle_window_s``), since start."""
        self.take_calls = take_calls
        """With the calls over all ``peer:`` keys at ``max_peer_calls``, a new call ends the call
        ``edge_server.idle_windows.crowded_victim`` names (the health gates)."""
        self.taken_from = TakenFrom()
        """Which hosts had a call ended for another host's lately: they take only from their own calls for a while."""
        self.answered_now = 0
        """Calls the gate refused or ended, answered at once (``edge_server.wire._answer_now``, which logs the first
        and every 1000th at INFO), since start."""
        self.calls_taken = 0
        """Calls ended to make room for a new call at ``max_peer_calls`` (``take_calls``), since start."""

    def open_calls(self, key: str | None = None) -> int:
        """Calls open now (of ``key``, or all)."""
        if key is not None:
            return len(self._open.get(key, ()))
        return sum(len(s) for s in self._open.values())

    def open_by_key(self) -> dict[str, int]:
        """Key -> its calls open now."""
        return {k: len(v) for k, v in self._open.items() if v}

    def enter(self, key: str, tenant: str = "", digest: str = "", method: str = "") -> Call:
        """Register the current task's call. Raises ResourceExhausted (nothing registered) if ``key`` already has
        ``max_calls`` open; ends the key's oldest call still waiting for its first message if it has
        ``max_waiting`` of them."""
        calls = self._open.get(key, ())
        peer = key.startswith(PEER_KEY)
        if len(calls) >= self.max_calls or (peer and self._peer_calls >= self.max_peer_calls
                                            and not self._take_call(key)):
            self.refused += 1
            whose = key if len(calls) >= self.max_calls else "callers without a token"
            if self.refused == 1 or self.refused % 1000 == 0:
                logger.info("calls: %s have the most calls open: refusing more (%d refused so far)", whose,
                            self.refused)
            if len(calls) >= self.max_calls:
                raise ResourceExhausted(f"{len(calls)} calls of this caller open at once; at most {self.max_calls}")
            raise ResourceExhausted(f"{self._peer_calls} calls of callers without a token open at once; at most "
                                    f"{self.max_peer_calls}")
        try:
            window = self.holds.window(tenant or key, method)
        except ResourceExhausted:
            window = self._take_idle_window(key, tenant, method)
            if window is None:
                self.refused += 1
                raise
        loop = asyncio.get_running_loop()
        call = Call(key, tenant, digest, method, asyncio.current_task())
        call.window = window
        call.opened = loop.time()
        self._open.setdefault(key, set()).add(call)
        if peer:
            self._peer_calls += 1
        waiting = self._waiting.setdefault(key, OrderedDict())
        if len(waiting) >= self.max_waiting:
            oldest, _ = waiting.popitem(last=False)
            oldest.waiting = False
            self._all_waiting.pop(oldest, None)
            self.evicted += 1
            oldest.end(ResourceExhausted(f"{self.max_waiting} calls of this caller waited for their first message: "
                                         "the oldest is ended (send the first message when the call starts)"))
        waiting[call] = None
        if self.first_message_s > 0:
            self._all_waiting[call] = None
            call.since = call.opened
            if self._sweep is None:
                self._sweep = loop.call_at(call.since + self.first_message_s, self._expire)
        return call

    def _candidates(self, key: str, now: float) -> dict[str, set[Call]]:
        """The open calls a new call of ``key`` may take from: all, or its own while one of its calls was ended for
        another host lately (``edge_server.idle_windows.TakenFrom``)."""
        if self.taken_from.blocked(key, now):
            return {key: self._open.get(key, set())}
        return self._open

    def _take_call(self, key: str) -> bool:
        """The ``peer:`` calls are at their cap: with ``take_calls``, end the call
        ``edge_server.idle_windows.crowded_victim`` names (UNAVAILABLE, "retry") so that a new call of ``key`` may
        enter; True if one was ended (it leaves the count when its handler unwinds, within the loop's next turns)."""
        if not self.take_calls:
            return False
        now = asyncio.get_running_loop().time()
        victim = crowded_victim(self._candidates(key, now), key, now, self.idle_window_s)
        if victim is None:
            return False
        self.taken_from.note(victim, key, now)
        why = ("it waited for its host's turn (past its burst)" if victim.paced_since > 0 else
               "its request had not come" if victim.waiting else "its host held the most of them")
        victim.end(Unavailable(f"{victim.method}: the server's {self.max_peer_calls} calls of callers without a "
                               f"token were open and {why}; it was ended for a newer call: retry"))
        self.calls_taken += 1
        if self.calls_taken == 1 or self.calls_taken % 1000 == 0:
            logger.info("calls: a call of %s ended for a new call of %s at the cap (%d so far)", victim.key, key,
                        self.calls_taken)
        return True

    def _take_idle_window(self, key: str, tenant: str, method: str):
        """A new call of ``key`` did not fit its receive window: ``edge_server.idle_windows.take_window`` (a
        ``Reservation``, or None: ``idle_window_s`` 0 or nothing to take)."""
        if self.idle_window_s <= 0:
            return None
        now = asyncio.get_running_loop().time()
        mine, victim = take_window(self._candidates(key, now), self.holds, key, tenant or key, method, now,
                                   self.idle_window_s)
        self.taken_from.note(victim, key, now)
        if mine is not None:
            self.windows_taken += 1
            if self.windows_taken == 1 or self.windows_taken % 1000 == 0:
                logger.info("calls: a call's receive window given to a new call of %s (%d so far)", key,
                            self.windows_taken)
        return mine

    async def reading(self, call: Call) -> bool:
        """Wait for one of ``call``'s key's ``max_reading`` slots before its first message (a unary call's request,
        a Session's OpenSession, an UploadHeader) is read: grpc receives a message whole (up to the message limit)
        once its read is asked for, so a key's calls reading at once bound the request bytes it has in flight,
        provided grpc's BDP probing is off (the server turns it off with this bound:
        ``ServerConfig.max_reading_calls_per_caller``). The wire handler (``edge_server.wire``) gives a unary call's
        slot back once its message is decoded (held for a whole unary handler, a tenant's Hellos waited behind its
        slow ProfileGraphs, review18 F9) and a stream's once its handler asks for the second message (the first
        processed: an OpenSession's slice waits for the validation slot, and 48 of them, 4 MiB each, decoded and
        waiting, were +315 MiB); :meth:`leave` gives it back at the latest. A call waiting here still waits for its
        first message (the deadline and the bound on waiting calls apply).

        With ``server_reading`` (``ServerConfig.max_reading_bytes``), the call then also waits for one of the
        server's ``server_reading`` slots (:meth:`ReadingSlots.take <edge_server.reading_slots.ReadingSlots.take>`,
        which says who gets them): the key's bound limits one caller, not 64 tenants at once (session 20).

        Raises the call's end (CancelledError) if it is ended while it waits. Returns True when a slot was taken
        (give them back with :meth:`read_done`), False without a bound."""
        if self.max_reading <= 0 and self.slots.count <= 0:
            if not call.read_since:  # it may read from now (``edge_server.idle_windows.idle_since``)
                call.read_since = asyncio.get_running_loop().time()
            return False
        if self.max_reading > 0:
            entry = self._readers.get(call.key)
            if entry is None:
                entry = self._readers[call.key] = [asyncio.Semaphore(self.max_reading), 0]
            entry[1] += 1
            call.queued = "key"
            try:
                await entry[0].acquire()
            except BaseException:
                self._drop_reader(call.key, entry)
                raise
            finally:
                call.queued = ""
            call.reading = True
        if self.slots.count > 0:
            try:
                await self.slots.take(call)  # (gives the server's slot back if it was granted just before)
            except BaseException:
                self.read_done(call)  # the key's slot
                raise
        return True

    def server_read_done(self, call: Call) -> None:
        """Give back the server-wide slot :meth:`reading` took for ``call``, if it holds one (idempotent; its key's
        stays until :meth:`read_done`): ``ReadingSlots.give_back``, which hands it on. The wire handler calls it
        once a stream's first message is decoded."""
        self.slots.give_back(call)

    def _restart_deadline(self, call: Call) -> None:
        """``call`` just got its server-wide slot: its first message's deadline counts from now (it could not send
        before), its place among the waiting calls the newest (``ReadingSlots.on_granted``)."""
        if call in self._all_waiting:
            call.since = call.read_since
            self._all_waiting.move_to_end(call)

    # -- the server-wide slots' state (ReadingSlots), by the names the server's stats and tests read -----------

    @property
    def server_reading(self) -> int:
        """Requests received at once server-wide (0: no bound): ``slots.count``."""
        return self.slots.count

    @property
    def server_free(self) -> int:
        """Server-wide reading slots free now: ``slots.free``."""
        return self.slots.free

    @property
    def server_share(self) -> int:
        """Server-wide reading slots one key may hold at once while it is alone: ``slots.max_share``."""
        return self.slots.max_share

    @property
    def taken_back(self) -> int:
        """Calls ended to give their server-wide slot to another key, since start: ``slots.taken_back``."""
        return self.slots.taken_back

    @property
    def slot_timeouts(self) -> int:
        """Calls ended at ``first_message_s`` still waiting for a reading slot, since start: ``slots.timeouts``."""
        return self.slots.timeouts

    def reading_held(self) -> dict[str, int]:
        """Key -> server-wide reading slots its calls hold now (``slots.held``)."""
        return self.slots.held()

    def reading_queued(self) -> dict[str, int]:
        """Key -> its calls waiting for a server-wide reading slot now (``slots.queued``)."""
        return self.slots.queued()

    # -- what calls hold of the memory budget (CallMemory), by the names the wire handler, runtime and tests use --

    def hold_request(self, call: Call, nbytes: int) -> None:
        """Hold ``call``'s decoded request (``nbytes`` on the wire) in the memory budget until :meth:`drop_request`
        or :meth:`leave` (``CallMemory.hold_request``, which says why). Raises ResourceExhausted."""
        self.holds.hold_request(call, nbytes)

    def hold_next_reads(self, call: Call) -> None:
        """Reserve a stream's next read (:attr:`next_read_bytes`) until :meth:`leave` (``CallMemory.hold_next_reads``,
        which says why). Raises ResourceExhausted."""
        self.holds.hold_next_reads(call)

    def drop_request(self, call: Call) -> None:
        """The handler no longer holds ``call``'s decoded request: give its reservation back (idempotent)."""
        self.holds.drop_request(call)

    @property
    def hold_refused(self) -> int:
        """Calls refused because their decoded request did not fit the memory budget, since start."""
        return self.holds.hold_refused

    @property
    def window_bytes(self) -> int:
        """Bytes of the memory budget a call holds from its start to its end (``CallMemory.window_bytes``)."""
        return self.holds.window_bytes

    @window_bytes.setter
    def window_bytes(self, nbytes: int) -> None:
        self.holds.window_bytes = nbytes

    @property
    def next_read_bytes(self) -> int:
        """Bytes of the memory budget a stream holds from its second read to its end
        (``CallMemory.next_read_bytes``)."""
        return self.holds.next_read_bytes

    @next_read_bytes.setter
    def next_read_bytes(self, nbytes: int) -> None:
        self.holds.next_read_bytes = nbytes

    def read_done(self, call: Call) -> None:
        """Give back the slots :meth:`reading` took for ``call``, if it holds any (idempotent)."""
        self.server_read_done(call)
        if not call.reading:
            return
        call.reading = False
        entry = self._readers.get(call.key)
        if entry is not None:
            entry[0].release()
            self._drop_reader(call.key, entry)

    def _drop_reader(self, key: str, entry: list) -> None:
        entry[1] -= 1
        if entry[1] <= 0:
            del self._readers[key]

    def started(self, call: Call) -> None:
        """``call``'s first message arrived: no longer waiting (idempotent). Its receive window stays reserved
        (:meth:`leave` gives it back): past its first message a call whose handler is not reading (a unary method
        running, a Session's handler busy) still lets its client fill the window (session 22)."""
        if call.waiting:
            call.waiting = False
            self._all_waiting.pop(call, None)
            w = self._waiting.get(call.key)
            if w is not None:
                w.pop(call, None)
                if not w:
                    del self._waiting[call.key]

    def leave(self, call: Call) -> None:
        """``call`` ended (its handler returns or raises): forget it, its reading slots, receive window, request
        and read reservations given back (idempotent; the memory's: ``CallMemory.leave``, which tells the trimmer)."""
        self.holds.leave(call)
        self.started(call)
        self.slots.leave(call)  # if it left while waiting for a server-wide slot
        self.read_done(call)
        calls = self._open.get(call.key)
        if calls is not None and call in calls:
            calls.discard(call)
            if call.key.startswith(PEER_KEY):
                self._peer_calls -= 1
            if not calls:
                del self._open[call.key]
        call.task = None

    def revoke(self, holds: Callable[[str, str], bool]) -> int:
        """End with UNAUTHENTICATED every revocable call with a token for which ``holds(tenant, digest)`` is
        False (``edge_server.auth.Authenticator.holds`` after a reload); returns how many."""
        n = 0
        for calls in list(self._open.values()):
            for c in list(calls):
                if c.digest and c.revocable and c.reason is None and not holds(c.tenant, c.digest):
                    c.end(Unauthenticated(f"{c.method}: this call's bearer token was revoked (tokens file reloaded)"))
                    n += 1
        if n:
            self.revoked += n
            logger.info("calls: %d call(s) of revoked tokens ended", n)
        return n

    def _expire(self) -> None:
        """End DEADLINE_EXCEEDED every call whose first message is past its deadline (oldest first), then set the
        timer again for the oldest still waiting, if any."""
        self._sweep = None
        loop = asyncio.get_running_loop()
        now, limit = loop.time(), self.first_message_s
        while self._all_waiting:
            call = next(iter(self._all_waiting))
            if call.since + limit > now + 1e-3:  # the loop may run a timer up to its clock's resolution early
                self._sweep = loop.call_at(call.since + limit, self._expire)
                return
            self._all_waiting.popitem(last=False)
            w = self._waiting.get(call.key)
            if w is not None:
                w.pop(call, None)
                if not w:  # a key per caller that timed out would otherwise stay forever (review17 F3)
                    del self._waiting[call.key]
            call.waiting = False
            self.evicted += 1
            call.end(self._late(call, now))
            # its server-wide slot goes on now, not when its task unwinds: a call waiting for it whose deadline
            # falls in this sweep gets it (and a new deadline) instead of being ended as if no slot had come
            self.server_read_done(call)

    def _late(self, call: Call, now: float) -> EdgeError:
        """Why ``call`` is ended at its first message's deadline: it waited for a reading slot (its key's:
        RESOURCE_EXHAUSTED, its own calls hold them; the server's: UNAVAILABLE, other callers hold them, retry), or
        it had its slot and its message did not arrive whole (DEADLINE_EXCEEDED)."""
        limit = self.first_message_s
        if call.queued == "key":
            return ResourceExhausted(
                f"{call.method}: waited {limit:g} s for one of this caller's {self.max_reading} reading slots "
                "(--max-reading-calls), all held by its other calls still receiving their first message; send fewer "
                "calls at once")
        late = self.slots.late(call, limit)
        if late is not None:
            return late
        if call.server_reading:
            return DeadlineExceeded(
                f"{call.method}: no first message within {limit:g} s of the call's start (it held a reading slot "
                f"for the last {now - call.read_since:.1f} s of them)")
        return DeadlineExceeded(f"{call.method}: no first message within {limit:g} s of the call's start")
