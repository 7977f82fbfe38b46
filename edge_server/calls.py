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
  message, a stream's first) at once (:meth:`CallGate.reading`; ``--max-reading-calls``, ``--max-reading-mb``);
- a decoded request of ``hold_min_bytes`` or more held in the server's memory budget while its call uses it, refused
  RESOURCE_EXHAUSTED when it does not fit (:meth:`CallGate.hold_request`, session 20);
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

from edge_server.errors import DeadlineExceeded, EdgeError, ResourceExhausted, Unauthenticated, Unavailable
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

REQUEST_HOLD_FACTOR = 1
"""Bytes of the memory budget a decoded request holds per byte of its message on the wire, while its call holds it
(:meth:`CallGate.hold_request`): upb's message aliases the received bytes (+0 at parse), so the request holds its
wire size; a field the method reads out (a ProfileGraph's spec, an OpenSession's slice) is a copy the method counts
itself (``EdgeRuntime.profile``, ``Session.define_slice``)."""

HOLD_MIN_BYTES = 64 << 10
"""Requests under this size are not held in the memory budget (the HTTP/2 receive window an unread call may fill
anyway): a Hello, a small slice, an UploadHeader pass with no lock taken."""


CONTENDED_FIRST_MESSAGE_S = 30.0
"""Seconds a call keeps a server-wide reading slot within its caller's share without its first message arriving, once
another caller waits for one (:meth:`CallGate._take_back`): an 8 MiB first message at 2.2 Mbit/s, 4 MiB at 1.1.
Without it as many colluding callers as slots held them all until ``first_message_s`` (session 22)."""

READING_GRACE_S = 5.0
"""Seconds a call keeps a server-wide reading slot its caller holds beyond its share of them, once another caller
waits (:meth:`CallGate.reading`): a 4 MiB first message takes 1.7 s at 20 Mbit/s."""


class Call:
    """One call in the gate: its caller ``key``, the ``tenant`` and sha256 ``digest`` of its bearer token ("" if
    none), the handler's ``task``, and ``reason`` (the domain error it was ended with, None while it runs)."""

    __slots__ = ("digest", "held", "held_bytes", "key", "method", "next_read", "queued", "read_since", "reading",
                 "reason", "revocable", "server_reading", "since", "slot_taken", "task", "tenant", "wait_since",
                 "waiting", "window")

    def __init__(self, key: str, tenant: str, digest: str, method: str, task: asyncio.Task | None) -> None:
        self.key, self.tenant, self.digest, self.method, self.task = key, tenant, digest, method, task
        self.reason: EdgeError | None = None
        self.waiting = True
        """No first message yet."""
        self.since = 0.0
        """The event loop's time at its start (its first message's deadline is ``first_message_s`` later)."""
        self.revocable = True
        """False once an opened Session's own path answers for it (``EdgeRuntime.reload_tokens``)."""
        self.reading = False
        """It holds one of its key's reading slots (:meth:`CallGate.reading`)."""
        self.server_reading = False
        """It holds one of the server-wide reading slots (:meth:`CallGate.reading`)."""
        self.queued = ""
        """While it waits in :meth:`CallGate.reading`: "key" (for one of its key's slots) or "server" (for one of the
        server's); "" otherwise."""
        self.read_since = 0.0
        """The event loop's time it took its server-wide slot."""
        self.wait_since = 0.0
        """The event loop's time it began to wait for a server-wide slot (:meth:`CallGate.reading`)."""
        self.slot_taken = False
        """Ended to give its server-wide slot to another caller (:meth:`CallGate._take_back`), slot not back yet."""
        self.held = None
        """The memory budget's reservation of its decoded request (:meth:`CallGate.hold_request`), None if none."""
        self.held_bytes = 0
        """The decoded request's size on the wire (bytes), while ``held``."""
        self.window = None
        """The memory budget's reservation of its receive window for the call's life (what its client may have sent
        unread into grpc's buffers whenever its handler is not reading; :attr:`CallGate.window_bytes`), None if
        none."""
        self.next_read = None
        """A stream's: the memory budget's reservation of the message a read past its first may have grpc receive in
        part (:meth:`CallGate.hold_next_reads`), from its second read to its end; None if none."""

    def end(self, reason: EdgeError) -> None:
        """End the call with ``reason``'s status: cancel its handler's task (once; a finished call is left)."""
        if self.reason is None and self.task is not None and not self.task.done():
            self.reason = reason
            self.task.cancel()


class CallGate:
    """Bounds on the calls open per caller key and on their first message, and revocation (module docstring).

    ``max_calls``: calls one key may have open at once (>= 1); ``max_waiting``: of them, waiting for their first
    message (>= 1); ``first_message_s``: the deadline of a call's first message (s; 0: none); ``max_peer_calls``:
    calls open at once over all ``peer:`` keys (>= 1); ``max_reading``: calls of one key reading their request (a
    unary call's one message, a stream's first) at once (0: no bound; :meth:`reading`); ``server_reading``: calls
    reading their request at once over all keys (0: no bound; :meth:`reading`); ``memory``: the budget a decoded
    request is held in while its call uses it (None: not counted; :meth:`hold_request`), ``hold_min_bytes`` the
    smallest request counted; ``trimmer``: told of each held request dropped (``edge_server.memory.Trimmer``).
    ``on_refused(method, code)``: called for each call the gate refuses or ends (the server's metrics);
    ``reading_grace_s``: how long a call keeps a server-wide slot its key holds beyond its share while another key
    waits (s; :meth:`reading`); ``contended_s``: how long a call keeps one within its key's share without its first
    message arriving while another key waits (s; <= 0: until ``first_message_s``; :meth:`_take_back`)."""

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
    ) -> None:
        if max_calls < 1 or max_waiting < 1 or first_message_s < 0 or max_peer_calls < 1 or server_reading < 0:
            raise ValueError("CallGate needs max_calls >= 1, max_waiting >= 1, first_message_s >= 0, max_peer_calls "
                             f">= 1 (got {max_calls}, {max_waiting}, {first_message_s}, {max_peer_calls})")
        self.max_calls, self.max_waiting, self.first_message_s = max_calls, max_waiting, first_message_s
        self.max_peer_calls = max_peer_calls
        self.max_reading = max_reading
        """Calls of one key reading their request (a unary call's message, a stream's first) at once (0: no bound;
        :meth:`reading`)."""
        self.memory = memory
        """The server's memory budget for work in flight: a decoded request is held in it while its call uses it
        (:meth:`hold_request`); None: not counted."""
        self.trimmer = trimmer
        """Told of each big held request dropped (``edge_server.memory.Trimmer``); None: no trims."""
        self.hold_min_bytes = hold_min_bytes
        """Requests smaller than this are not counted (what an unread call's receive window holds anyway)."""
        self.hold_refused = 0
        """Calls refused because their decoded request did not fit the memory budget, since start."""
        self.server_reading = server_reading
        """Requests received at once server-wide (0: no bound; ``ServerConfig.max_reading_bytes``)."""
        self.server_free = server_reading
        """Server-wide reading slots free now."""
        self.server_share = max(1, server_reading // 2)
        """Server-wide reading slots one key may hold at once while it is alone (half of them, at least one: a
        newcomer finds one free). With more keys holding or waiting a key's share is smaller (:meth:`share`)."""
        self.reading_grace_s = reading_grace_s
        """Seconds a call keeps a server-wide slot its key holds beyond its :meth:`share` once another key waits
        for one (:meth:`_take_back`; < 0: never taken back)."""
        self.contended_s = contended_s
        """Seconds a call keeps a server-wide slot within its key's share without its first message arriving once
        another key waits for one (:meth:`_take_back`; <= 0: kept until ``first_message_s``)."""
        self._held: dict[str, OrderedDict[Call, None]] = {}
        """Key -> its calls holding server-wide slots, in the order they took them."""
        self._granted_at: dict[str, float] = {}
        """Key -> when it was last given a server-wide slot: among waiters whose keys hold equally few, the key served
        least recently goes first (a key whose silent call was just ended for another must not take the slot back
        with its next queued call)."""
        self._queue: OrderedDict[Call, asyncio.Future] = OrderedDict()
        """Calls waiting for a server-wide slot, oldest first, and the future each waits on."""
        self._taking = 0
        """Calls ended to give their slot to another key (:meth:`_take_back`) whose slot is not back yet."""
        self._take_timer: asyncio.TimerHandle | None = None
        """When the next slot held beyond its key's share passes ``reading_grace_s`` (while another key waits)."""
        self.taken_back = 0
        """Calls ended to give their server-wide slot to another key (UNAVAILABLE), since start."""
        self.slot_timeouts = 0
        """Calls ended at ``first_message_s`` still waiting for a reading slot, since start."""
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
        self.window_bytes = 0
        """Bytes of the memory budget a call holds from its start to its end (its receive window beyond grpc's
        default 64 KiB: what its client may have sent unread whenever its handler is not reading;
        ``ServerConfig.read_window_bytes``); 0: none. Until session 22 given back at the first message."""
        self.next_read_bytes = 0
        """Bytes of the memory budget a stream holds from its second read to its end (:meth:`hold_next_reads`: the
        message limit, what one of its reads past the first may have grpc receive in part); 0: none."""

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
        if len(calls) >= self.max_calls or (peer and self._peer_calls >= self.max_peer_calls):
            self.refused += 1
            whose = key if len(calls) >= self.max_calls else "callers without a token"
            if self.refused == 1 or self.refused % 1000 == 0:
                logger.info("calls: %s have the most calls open: refusing more (%d refused so far)", whose,
                            self.refused)
            if len(calls) >= self.max_calls:
                raise ResourceExhausted(f"{len(calls)} calls of this caller open at once; at most {self.max_calls}")
            raise ResourceExhausted(f"{self._peer_calls} calls of callers without a token open at once; at most "
                                    f"{self.max_peer_calls}")
        window = None
        if self.memory is not None and self.window_bytes > 0:
            try:
                window = self.memory.reserve(tenant or key, self.window_bytes, f"{method or 'a call'}'s receive "
                                             "window (--read-window-kb), held while the call is open")
            except ResourceExhausted:
                self.refused += 1
                raise
        call = Call(key, tenant, digest, method, asyncio.current_task())
        call.window = window
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
            loop = asyncio.get_running_loop()
            call.since = loop.time()
            if self._sweep is None:
                self._sweep = loop.call_at(call.since + self.first_message_s, self._expire)
        return call

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
        server's ``server_reading`` slots: the key's bound limits one caller, not 64 tenants at once (session 20:
        64 tenants' 6.45 MiB ProfileGraphs at once, every one received at once: +862 MiB RSS against a 722 MiB
        budget). A slot is held from the read's start to its message's decoding, however slowly the client sends
        (grpc tells nothing of a message's bytes before it is whole), and goes back once the message is decoded
        (:meth:`server_read_done`). Who gets the slots, so that callers that never send cannot keep them from
        others (review20b F2: one key's silent calls held all; session 20's tester: two keys holding half each did):

        - a free slot goes to the waiting call whose key holds fewest slots (the oldest of those), and only if its
          key holds fewer than its :meth:`share` (``server_reading`` over the keys holding or waiting, at least
          one; at most ``server_share``, half of them, so a key alone leaves a slot free for a newcomer);
        - while a key holding fewer than its share waits, a call whose key holds more than its share is ended
          UNAVAILABLE ("retry") once it has held its slot ``reading_grace_s`` (oldest first, one per such waiter):
          :meth:`_take_back`. A key's calls up to its share are ended for another only once they held their slot
          ``contended_s`` (30 s) without their first message arriving (an honest slow sender, one 4 MiB message at
          1 Mbit/s in 32 s, keeps its slot while nobody waits), so the first message of a newcomer waits at most
          ``reading_grace_s`` unless ``server_reading`` or more keys hold one slot each (with one slot: any one
          call), which hold them up to ``contended_s`` (until session 22: ``first_message_s``);
        - a call that gets a slot has its first message's deadline counted anew from then (it could not send
          before), and a call ended at its deadline gives its slot on at once (:meth:`_expire`); a call still
          waiting for a slot at its deadline is ended UNAVAILABLE saying so (:meth:`_late`), not DEADLINE_EXCEEDED
          as if it had not sent.

        Raises the call's end (CancelledError) if it is ended while it waits. Returns True when a slot was taken
        (give them back with :meth:`read_done`), False without a bound."""
        if self.max_reading <= 0 and self.server_reading <= 0:
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
        if self.server_reading > 0:
            loop = asyncio.get_running_loop()
            fut = loop.create_future()
            call.wait_since = loop.time()
            self._queue[call] = fut
            call.queued = "server"
            self._grant()
            try:
                await fut
            except BaseException:
                self._queue.pop(call, None)
                self.read_done(call)  # the key's slot, and the server's if it was granted just before
                self._grant()
                raise
            finally:
                call.queued = ""
        return True

    def share(self) -> int:
        """Server-wide reading slots a key may hold now: ``server_reading`` over the keys holding or waiting for
        one, at least one, at most ``server_share``."""
        keys = set(self._held)
        keys.update(c.key for c in self._queue)
        return max(1, min(self.server_share, self.server_reading // max(1, len(keys))))

    def reading_held(self) -> dict[str, int]:
        """Key -> server-wide reading slots its calls hold now."""
        return {k: len(v) for k, v in self._held.items()}

    def reading_queued(self) -> dict[str, int]:
        """Key -> its calls waiting for a server-wide reading slot now."""
        out: dict[str, int] = {}
        for c in self._queue:
            out[c.key] = out.get(c.key, 0) + 1
        return out

    def _grant_rank(self, c: Call) -> tuple[int, float]:
        """A waiter's place for a free slot: its key's slots held, then when its key was last given one (review22b:
        the key whose silent call was just taken back holds none, and its next queued call is older than anyone's)."""
        return len(self._held.get(c.key, ())), self._granted_at.get(c.key, float("-inf"))

    def _grant(self) -> None:
        """Hand free server-wide slots to waiting calls (:meth:`_grant_rank`: fewest slots held by their key, then the
        key served least recently, then the oldest call), then
        take slots back for the keys still waiting under their share (:meth:`_take_back`)."""
        loop = asyncio.get_running_loop()
        for c in [c for c, f in self._queue.items() if f.done()]:  # ended while waiting (Call.end's cancel
            del self._queue[c]  # cancelled its future), its task not unwound yet: no slot for it, nor a share
        while self.server_free > 0 and self._queue:
            share = self.share()
            last = self._granted_at
            under = [c for c in self._queue if len(self._held.get(c.key, ())) < share]
            best = min(under, key=self._grant_rank) if under else None  # min keeps the oldest of equal ranks
            if best is None:  # no waiter under its share: a free slot still goes to the one holding fewest (up to
                # server_share), else it stays idle while a call waits; taken back after the grace if a newcomer waits
                best = min(self._queue, key=lambda c: len(self._held.get(c.key, ())))
                if len(self._held.get(best.key, ())) >= self.server_share:
                    break
            fut = self._queue.pop(best)
            self.server_free -= 1
            best.server_reading = True
            best.read_since = loop.time()
            self._held.setdefault(best.key, OrderedDict())[best] = None
            last[best.key] = best.read_since
            if len(last) > 64 + 2 * len(self._held) + len(self._queue):  # keys neither holding nor waiting: forgotten
                live = set(self._held) | {c.key for c in self._queue}
                for k in [k for k in last if k not in live]:
                    del last[k]
            if best in self._all_waiting:  # its first message's deadline counts from now: it could not send before
                best.since = best.read_since
                self._all_waiting.move_to_end(best)
            fut.set_result(None)
        self._take_back()

    def _take_back(self) -> None:
        """End UNAVAILABLE, newest first, the calls holding a server-wide slot beyond their key's share, one for each
        slot the keys waiting under their share lack (beyond the free ones and those already being given back), once
        ``reading_grace_s`` passed both since the call took its slot and since the first of those keys began to
        wait; set the timer for the next one still in its grace. Newest first: an honest slow sender's oldest call
        has the most of its message received (review21b finding 4: three colluding keys ended another key's
        8-second-old upload 0.01 s after a fourth began to wait).

        Then, for the slots still lacking, a call holding its slot within its key's share is ended the same way once
        it has held it ``contended_s`` without its first message arriving and the first waiter has waited
        ``reading_grace_s`` (newest first, as above): as many colluding keys as slots, one silent call each, none over
        its share, held every slot until ``first_message_s`` (120 s; session 22: another tenant's Hello waited that
        long), now ``contended_s`` at most, and only while someone waits. Until session 23 the oldest went first and
        with no grace once a waiter came: an honest sender 30 s into an 8 MiB first message at 2 Mbit/s was ended the
        moment anyone queued (review23 F5)."""
        if self._take_timer is not None:
            self._take_timer.cancel()
            self._take_timer = None
        if not self._queue or (self.reading_grace_s < 0 and self.contended_s <= 0):
            return
        share = self.share()
        queued = self.reading_queued()
        under = [c for c in self._queue if len(self._held.get(c.key, ())) < share]
        lacking = sum(min(n, share - len(self._held.get(k, ()))) for k, n in queued.items()
                      if len(self._held.get(k, ())) < share)
        lacking -= self.server_free + self._taking
        if lacking <= 0 or not under:
            return
        contended = min(c.wait_since for c in under)
        loop = asyncio.get_running_loop()
        now = loop.time()
        over = {k: [c for c in v if not c.slot_taken] for k, v in self._held.items()}
        nxt = None  # when the next call still in its grace (or under contended_s) is due
        while lacking > 0 and self.reading_grace_s >= 0:
            victims = [v[-1] for v in over.values() if len(v) > share]
            if not victims:
                break
            victim = max(victims, key=lambda c: c.read_since)
            due = max(victim.read_since, contended) + self.reading_grace_s
            if due > now + 1e-3:
                nxt = due
                break
            over[victim.key].pop()
            held = len(self._held[victim.key])
            self._give(victim, f"this caller held {held} of the server's {self.server_reading} reading slots (its "
                               f"share: {share}) while {len(queued)} caller(s) waited, and this call's first message "
                               f"had not arrived {now - victim.read_since:.1f} s after it took the slot; retry (a "
                               "caller's calls up to its share are ended for another only after "
                               f"{self.contended_s:g} s)")
            lacking -= 1
        if lacking > 0 and self.contended_s > 0:
            grace = contended + max(self.reading_grace_s, 0.0)
            dues = [(max(c.read_since + self.contended_s, grace), c) for v in over.values() for c in v]
            ready = sorted((c for due, c in dues if due <= now + 1e-3), key=lambda c: c.read_since, reverse=True)
            for victim in ready[:lacking]:
                self._give(victim, f"its first message had not arrived {now - victim.read_since:.1f} s after it took "
                                   f"one of the server's {self.server_reading} reading slots while {len(queued)} "
                                   f"caller(s) waited for one (--contended-first-message-s {self.contended_s:g}); "
                                   "retry")
            lacking -= len(ready[:lacking])
            later = [due for due, _ in dues if due > now + 1e-3]
            if lacking > 0 and later:
                nxt = min(later) if nxt is None else min(nxt, min(later))
        if nxt is not None:
            self._take_timer = loop.call_at(nxt, self._grant)

    def _give(self, victim: Call, why: str) -> None:
        """End ``victim`` UNAVAILABLE to give its server-wide slot to a waiting caller (:meth:`_take_back`)."""
        victim.end(Unavailable(f"{victim.method}: this call's reading slot was given to another caller: {why}"))
        victim.slot_taken = True  # its slot comes back when its handler ends (or already ends)
        self._taking += 1
        if isinstance(victim.reason, Unavailable):  # (counted in the metrics when its answer goes)
            self.taken_back += 1

    def server_read_done(self, call: Call) -> None:
        """Give back the server-wide slot :meth:`reading` took for ``call``, if it holds one (idempotent), and hand
        it on (:meth:`_grant`); its key's slot (``max_reading``) stays until :meth:`read_done`. The wire handler
        calls it once a stream's first message is decoded: held until the handler asked for the second message,
        a tenant's OpenSessions waiting for the validation slot held every server slot (review20b finding 2)."""
        if not call.server_reading:
            return
        call.server_reading = False
        if call.slot_taken:
            call.slot_taken = False
            self._taking -= 1
        self.server_free += 1
        held = self._held.get(call.key)
        if held is not None:
            held.pop(call, None)
            if not held:
                del self._held[call.key]
        self._grant()

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

    def hold_request(self, call: Call, nbytes: int) -> None:
        """Count ``call``'s decoded request (``nbytes`` on the wire: a unary call's one message, a stream's first) in
        the memory budget, for the call's tenant (else its caller key), until :meth:`drop_request` (the wire handler
        calls it once the handler no longer holds the request: a unary call's end, a stream's second read) or
        :meth:`leave`. Raises ResourceExhausted (nothing held: the caller drops the request at once) when it does not
        fit the budget or the holder's share of it (``MemoryBudget.reserve``).

        Why (session 20, bound20): the budget saw a request only from when the method reserved what it makes of it
        (a ProfileGraph's spec bytes, a session's slice charge), not the received message the call holds beside it
        (``REQUEST_HOLD_FACTOR`` bytes per wire byte: upb's message keeps the received bytes), so 16 tenants' 6.45 MiB
        ProfileGraphs waiting for the validation slot held ~100 MiB outside the budget and the server's RSS rose over
        it (review19 F4: +740-841 MiB against a 709 MiB budget). Requests under ``hold_min_bytes`` are not counted."""
        if self.memory is None or nbytes < self.hold_min_bytes or call.held is not None:
            return
        what = f"{call.method or 'the call'}'s request ({nbytes / 2**20:.1f} MiB received, held while it is processed)"
        try:
            call.held = self.memory.reserve(call.tenant or call.key, REQUEST_HOLD_FACTOR * nbytes, what)
        except ResourceExhausted:
            self.hold_refused += 1
            raise
        call.held_bytes = nbytes

    def hold_next_reads(self, call: Call) -> None:
        """Reserve ``next_read_bytes`` of the memory budget for ``call``'s tenant (else its caller key) until
        :meth:`leave`: the wire handler calls it when a stream's handler asks for its second message (a Session's
        reader, an UploadWeights' chunks), before grpc is asked to read it. Idempotent. Raises ResourceExhausted
        (nothing reserved; the stream's handler answers it) when it does not fit the budget or the holder's share.

        Why (session 22): a pending read lets grpc take in the whole message its 5-byte prefix declares, up to the
        message limit, before anything reaches Python (HTTP/2 flow control opens the stream's window to the
        message's size: grpc's chttp2 ``StreamFlowControl`` min-progress size), and a message sent all but its
        last byte stays there. The reading slots bound a call's first message only: 16 UploadWeights calls of one
        token, each an UploadHeader then 8 MiB - 64 bytes of a chunk message less one byte, had the server take in
        128 MiB (RSS +144 MiB) with nothing reserved, and a tenant may have ``max_calls`` (256) such calls open: 2
        GiB (``tests/test_attack22.py``, ``docs/results/attack/session22/``). The budget now holds a message limit
        per stream past its first message, so a tenant's such streams are bounded by its share of the budget. A
        unary call never reads a second message: its window (:attr:`window_bytes`) is all its client can add."""
        if self.memory is None or self.next_read_bytes <= 0 or call.next_read is not None:
            return
        call.next_read = self.memory.reserve(
            call.tenant or call.key, self.next_read_bytes,
            f"{call.method or 'a stream'}'s next message ({self.next_read_bytes / 2**20:.0f} MiB: the message "
            "limit, which a read past the stream's first message lets the client send before it is whole; held "
            "while the stream is open)")

    def drop_request(self, call: Call) -> None:
        """The handler no longer holds ``call``'s decoded request: give its reservation back (idempotent)."""
        held, call.held = call.held, None
        if held is not None:
            held.release()
            if self.trimmer is not None:
                self.trimmer.note(call.held_bytes)
            call.held_bytes = 0

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
        """``call`` ended (its handler returns or raises): forget it, its reading slot, receive window and read
        reservations given back (idempotent). A stream past its first message tells the trimmer its next read's
        bytes (what grpc may have held of a message sent in part; a reset stream's handler may see its requests end
        and return as if they had, so every such end is noted): glibc kept them after the streams closed, +177 MiB
        after 24 such streams, -2 after one ``malloc_trim`` (session 22). Sessions and UploadWeights calls end
        seldom (weights go on the data channel by default); the trimmer trims at most every 0.2 s."""
        if call.next_read is not None and self.trimmer is not None:
            self.trimmer.note(self.next_read_bytes)
        self.started(call)
        for held in (call.window, call.next_read):
            if held is not None:
                held.release()
        call.window = call.next_read = None
        fut = self._queue.pop(call, None)
        if fut is not None:  # left while waiting for a server-wide slot (its handler's task ends elsewhere)
            fut.cancel()
        self.read_done(call)
        self.drop_request(call)
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
        if call in self._queue:
            self.slot_timeouts += 1
            held = self.reading_held()
            return Unavailable(
                f"{call.method}: waited {limit:g} s for one of the server's {self.server_reading} reading slots, all "
                f"held by {len(held)} other caller(s)' calls still receiving their first message (at most "
                f"{max(held.values(), default=0)} per caller); its message was not read: retry later")
        if call.server_reading:
            return DeadlineExceeded(
                f"{call.method}: no first message within {limit:g} s of the call's start (it held a reading slot "
                f"for the last {now - call.read_since:.1f} s of them)")
        return DeadlineExceeded(f"{call.method}: no first message within {limit:g} s of the call's start")
