"""The server's reading slots: how many calls, over all callers, receive their request at once, and whose call gets
a free one (split out of ``edge_server.calls.CallGate`` in session 24, no behaviour change).

A caller's own bound (``CallGate.max_reading``, ``--max-reading-calls``) limits one caller, not 64 tenants at once
(session 20: 64 tenants' 6.45 MiB ProfileGraphs at once, every one received at once: +862 MiB RSS against a 722 MiB
budget): :class:`ReadingSlots` bounds them all (``ServerConfig.max_reading_bytes``) and shares the slots among the
caller keys, so that callers that never send cannot keep them from others. It keeps its state on the
:class:`~edge_server.call_state.Call` objects it is given (``server_reading``, ``queued``, ``read_since``,
``wait_since``, ``slot_taken``) and ends a call only through :meth:`Call.end <edge_server.call_state.Call.end>`. Used
only on the server's event loop (no locks).
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Callable
from typing import TYPE_CHECKING

from edge_server.errors import Unavailable
from edge_server.tarpit import PEER_KEY

if TYPE_CHECKING:
    from edge_server.call_state import Call

__all__ = ["CONTENDED_FIRST_MESSAGE_S", "READING_GRACE_S", "ReadingSlots"]

CONTENDED_FIRST_MESSAGE_S = 30.0
"""Seconds a call keeps a server-wide reading slot within its caller's share without its first message arriving, once
another caller waits for one (:meth:`ReadingSlots._take_back`): an 8 MiB first message at 2.2 Mbit/s, 4 MiB at 1.1.
Without it as many colluding callers as slots held them all until ``first_message_s`` (session 22)."""

READING_GRACE_S = 5.0
"""Seconds a call keeps a server-wide reading slot its caller holds beyond its share of them, once another caller
waits (:meth:`ReadingSlots._take_back`): a 4 MiB first message takes 1.7 s at 20 Mbit/s."""


class ReadingSlots:
    """The server-wide reading slots, shared among caller keys: a free slot goes to the waiting call whose key holds
    fewest, and a slot held beyond a key's share (or within it, silent too long) is taken back for a waiting key.

    ``count``: calls reading their request at once over all keys (0: no bound, :meth:`take` is not called);
    ``reading_grace_s``: how long a call keeps a slot its key holds beyond its share while another key waits (s;
    < 0: never taken back); ``contended_s``: how long a call keeps one within its key's share without its first
    message arriving while another key waits (s; <= 0: until the gate's ``first_message_s``; :meth:`_take_back`);
    ``on_granted(call)``: called as a waiting call gets its slot, before it is woken (the gate counts its first
    message's deadline anew from then: it could not send before).

    A slot is held from the read's start to its message's decoding, however slowly the client sends (grpc tells
    nothing of a message's bytes before it is whole), and goes back once the message is decoded (:meth:`give_back`).
    Who gets the slots, so that callers that never send cannot keep them from others (review20b F2: one key's silent
    calls held all; session 20's tester: two keys holding half each did):

    - a free slot goes to the waiting call whose key holds fewest slots (the oldest of those), and only if its
      key holds fewer than its :meth:`share` (``count`` over the keys holding or waiting, at least one; at most
      ``max_share``, half of them, so a key alone leaves a slot free for a newcomer);
    - while a key holding fewer than its share waits, a call whose key holds more than its share is ended
      UNAVAILABLE ("retry") once it has held its slot ``reading_grace_s`` (newest first, one per such waiter):
      :meth:`_take_back`. A key's calls up to its share are ended for another only once they held their slot
      ``contended_s`` (30 s) without their first message arriving (an honest slow sender, one 4 MiB message at
      1 Mbit/s in 32 s, keeps its slot while nobody waits), so the first message of a newcomer waits at most
      ``reading_grace_s`` unless ``count`` or more keys hold one slot each (with one slot: any one call), which
      hold them up to ``contended_s`` (until session 22: ``first_message_s``);
    - a call that gets a slot has its first message's deadline counted anew from then (it could not send
      before: ``on_granted``), and a call ended at its deadline gives its slot on at once (the gate's ``_expire``
      calls :meth:`give_back`); a call still waiting for a slot at its deadline is ended UNAVAILABLE saying so
      (:meth:`late`), not DEADLINE_EXCEEDED as if it had not sent."""

    def __init__(
        self,
        count: int = 0,
        reading_grace_s: float = READING_GRACE_S,
        contended_s: float = CONTENDED_FIRST_MESSAGE_S,
        on_granted: Callable[[Call], None] | None = None,
        stranger_contended_s: float | None = None,
    ) -> None:
        if count < 0:
            raise ValueError(f"ReadingSlots needs count >= 0 (got {count})")
        self.count = count
        """Requests received at once server-wide (0: no bound; ``ServerConfig.max_reading_bytes``)."""
        self.free = count
        """Server-wide reading slots free now."""
        self.max_share = max(1, count // 2)
        """Server-wide reading slots one key may hold at once while it is alone (half of them, at least one: a
        newcomer finds one free). With more keys holding or waiting a key's share is smaller (:meth:`share`)."""
        self.reading_grace_s = reading_grace_s
        """Seconds a call keeps a server-wide slot its key holds beyond its :meth:`share` once another key waits
        for one (:meth:`_take_back`; < 0: never taken back)."""
        self.contended_s = contended_s
        """Seconds a call keeps a server-wide slot within its key's share without its first message arriving once
        another key waits for one (:meth:`_take_back`; <= 0: kept until ``first_message_s``)."""
        self.on_granted = on_granted
        """Called with each call as it gets its slot, before it is woken (the gate's deadline restart)."""
        self.stranger_contended_s = contended_s if stranger_contended_s is None else stranger_contended_s
        """``contended_s`` for the calls of ``peer:`` keys (callers without a valid token): the health gate's are
        shorter (an honest probe's request comes with its headers; break26 F2: the slots went round 20 silent
        hosts at 0.25 s each and 1 s probes timed out), a tenant's keep ``contended_s`` (a UE's liveness ping
        ended by a take-back would give up its request)."""
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
        self.timeouts = 0
        """Calls ended at ``first_message_s`` still waiting for a reading slot, since start (:meth:`late`)."""

    async def take(self, call: Call) -> None:
        """Wait for one of the server's slots for ``call`` (after its key's, ``CallGate.reading``). Raises the
        call's end (CancelledError) if it is ended while it waits, its slot given back if it was granted just
        before."""
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
            self.give_back(call)  # if it was granted just before
            self._grant()
            raise
        finally:
            call.queued = ""

    def share(self) -> int:
        """Server-wide reading slots a key may hold now: ``count`` over the keys holding or waiting for
        one, at least one, at most ``max_share``."""
        keys = set(self._held)
        keys.update(c.key for c in self._queue)
        return max(1, min(self.max_share, self.count // max(1, len(keys))))

    def held(self) -> dict[str, int]:
        """Key -> server-wide reading slots its calls hold now."""
        return {k: len(v) for k, v in self._held.items()}

    def queued(self) -> dict[str, int]:
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
        while self.free > 0 and self._queue:
            share = self.share()
            last = self._granted_at
            under = [c for c in self._queue if len(self._held.get(c.key, ())) < share]
            best = min(under, key=self._grant_rank) if under else None  # min keeps the oldest of equal ranks
            if best is None:  # no waiter under its share: a free slot still goes to the one holding fewest (up to
                # max_share), else it stays idle while a call waits; taken back after the grace if a newcomer waits
                best = min(self._queue, key=lambda c: len(self._held.get(c.key, ())))
                if len(self._held.get(best.key, ())) >= self.max_share:
                    break
            fut = self._queue.pop(best)
            self.free -= 1
            best.server_reading = True
            best.read_since = loop.time()
            self._held.setdefault(best.key, OrderedDict())[best] = None
            last[best.key] = best.read_since
            if len(last) > 64 + 2 * len(self._held) + len(self._queue):  # keys neither holding nor waiting: forgotten
                live = set(self._held) | {c.key for c in self._queue}
                for k in [k for k in last if k not in live]:
                    del last[k]
            if self.on_granted is not None:  # (the gate's first-message deadline counts from now)
                self.on_granted(best)
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
        queued = self.queued()
        under = [c for c in self._queue if len(self._held.get(c.key, ())) < share]
        lacking = sum(min(n, share - len(self._held.get(k, ()))) for k, n in queued.items()
                      if len(self._held.get(k, ())) < share)
        lacking -= self.free + self._taking
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
            self._give(victim, f"this caller held {held} of the server's {self.count} reading slots (its "
                               f"share: {share}) while {len(queued)} caller(s) waited, and this call's first message "
                               f"had not arrived {now - victim.read_since:.1f} s after it took the slot; retry (a "
                               "caller's calls up to its share are ended for another only after "
                               f"{self.contended_s:g} s)")
            lacking -= 1
        if lacking > 0 and self.contended_s > 0:
            grace = contended + max(self.reading_grace_s, 0.0)
            dues = [(max(c.read_since + self._contended(c), grace), c) for v in over.values() for c in v]
            ready = sorted((c for due, c in dues if due <= now + 1e-3), key=lambda c: c.read_since, reverse=True)
            for victim in ready[:lacking]:
                self._give(victim, f"its first message had not arrived {now - victim.read_since:.1f} s after it took "
                                   f"one of the server's {self.count} reading slots while {len(queued)} "
                                   f"caller(s) waited for one ({self._contended_rule(victim)}); retry")
            lacking -= len(ready[:lacking])
            later = [due for due, _ in dues if due > now + 1e-3]
            if lacking > 0 and later:
                nxt = min(later) if nxt is None else min(nxt, min(later))
        if nxt is not None:
            self._take_timer = loop.call_at(nxt, self._grant)

    def _contended(self, call: Call) -> float:
        return self.stranger_contended_s if call.key.startswith(PEER_KEY) else self.contended_s

    def _contended_rule(self, call: Call) -> str:
        v = self._contended(call)
        if v == self.contended_s:
            return f"--contended-first-message-s {v:g}"
        return f"{v:g} s for a caller without a token"

    def _give(self, victim: Call, why: str) -> None:
        """End ``victim`` UNAVAILABLE to give its server-wide slot to a waiting caller (:meth:`_take_back`)."""
        victim.end(Unavailable(f"{victim.method}: this call's reading slot was given to another caller: {why}"))
        victim.slot_taken = True  # its slot comes back when its handler ends (or already ends)
        self._taking += 1
        if isinstance(victim.reason, Unavailable):  # (counted in the metrics when its answer goes)
            self.taken_back += 1

    def give_back(self, call: Call) -> None:
        """Give back the server-wide slot :meth:`take` took for ``call``, if it holds one (idempotent), and hand
        it on (:meth:`_grant`); its key's slot (``CallGate.max_reading``) stays until ``CallGate.read_done``. The
        wire handler calls it (``CallGate.server_read_done``) once a stream's first message is decoded: held until
        the handler asked for the second message, a tenant's OpenSessions waiting for the validation slot held every
        server slot (review20b finding 2)."""
        if not call.server_reading:
            return
        call.server_reading = False
        if call.slot_taken:
            call.slot_taken = False
            self._taking -= 1
        self.free += 1
        held = self._held.get(call.key)
        if held is not None:
            held.pop(call, None)
            if not held:
                del self._held[call.key]
        self._grant()

    def late(self, call: Call, limit: float) -> Unavailable | None:
        """Why ``call``, at its first message's deadline (``limit`` s), is ended if it still waits for a slot (other
        callers hold them: UNAVAILABLE, retry; counted in :attr:`timeouts`), else None."""
        if call not in self._queue:
            return None
        self.timeouts += 1
        held = self.held()
        return Unavailable(
            f"{call.method}: waited {limit:g} s for one of the server's {self.count} reading slots, all "
            f"held by {len(held)} other caller(s)' calls still receiving their first message (at most "
            f"{max(held.values(), default=0)} per caller); its message was not read: retry later")

    def leave(self, call: Call) -> None:
        """``call`` left while waiting for a slot (its handler's task ends elsewhere): out of the queue."""
        fut = self._queue.pop(call, None)
        if fut is not None:
            fut.cancel()
