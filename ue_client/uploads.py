"""The upload scheduler of one device client: which weights go on the session's uplink, in what order,
and what the server holds.

Weights a request's split needs go in need order (FOREGROUND, position of the first op that reads
them), the warm target's other weights behind them (BACKGROUND, progressive offloading); background
weights are parked off the uplink while a CPU-shared UE computes. The server's view
(``server_state``) is what QueryWeights said, what the session acknowledged, and what is on its way.

Owned by the caller's thread (see ``ue_client.client.RemoteEngine``). The session's receiver thread
only posts weight acknowledgements (``ack_handler``: an append to a deque); the caller's thread
applies them (``drain``) when it next looks. The progress display calls ``upload_status`` only.
"""

from __future__ import annotations

import collections
import itertools
import time
from collections.abc import Callable, Sequence

from modelgraph import ModelGraph, Split, tensor_bytes
from partitioner.state import ServerState
from ue_client import wire
from ue_client.connection import Connection
from ue_client.session import BACKGROUND, FOREGROUND, UplinkItem

SENDER_BOUND = 0.95
"""A busy period is sender-bound when the UE handed its bytes to the transport at less than this fraction of
its pacing rate: it could not keep its pace (its CPU budget, or a path whose buffers filled), and the
goodput of the period is the rate it sustains. Measured (session 8, 8 UEs on an 8 Mbit/s cell, paced at
7.1-8.0 Mbit/s): UEs that kept their pace handed over at 0.95-1.06 of it; their goodput fell short of it by
the round trip, the server's commit and the acknowledgement (60-140 ms per sample), so goodput alone does
not tell a UE that cannot keep its pace."""
MIN_SEND_SAMPLE_S = 0.5
"""Shortest sender-bound sample that sets the UE's send rate (a shorter one is mostly the RTT and the
acknowledgement)."""
MIN_SEND_SAMPLE_BYTES = 256 << 10
"""Fewest bytes in a sender-bound sample that sets the UE's send rate."""
NEED_CACHE = 16
"""Splits whose weights' need order an ``UploadScheduler`` keeps."""
MAX_PERIODS = 256
"""Busy periods of the uplink an ``UploadScheduler`` keeps the samples of (the latest): a long-running client
re-uploading after the server evicted its weights must not grow without bound (a testbed stream has tens)."""
MAX_PERIOD_ACKS = 256
"""Acknowledgements a busy period's sample keeps in ``acks`` (the latest; ``first_ack`` keeps the first)."""
MAX_WEIGHT_ACKS = 4096
"""WeightStored messages ``UploadScheduler.weight_acks`` keeps (the latest)."""


def _sample(start: float, nbytes: int, t_ack: float, share_bps: float | None,
            handover: tuple[float, float | None] | None, first_ack: tuple[float, int] | None = None,
            acks: list[tuple[float, int, float | None]] | None = None) -> dict:
    """One goodput sample of a busy period (``UploadScheduler.uplink_samples``): ``start`` and ``t_ack``
    (perf_counter s) its first chunk and the acknowledgement of its last weight, ``nbytes`` handed over,
    ``share_bps`` the share rate paced to (bytes/s), ``handover`` (when the last chunk was handed over, the
    pacing rate then in bytes/s or None) from ``UplinkQueue.mark_handover``, ``first_ack`` (time, bytes
    handed over up to its weight) of the period's first acknowledgement (None: this is it), ``acks`` the
    period's acknowledgements so far as (time, bytes handed over up to its weight, when the weight's last
    chunk was handed over or None), this one last."""
    first_ack = first_ack if first_ack is not None else (t_ack, nbytes)
    acks = acks if acks is not None else [(t_ack, nbytes, handover[0] if handover is not None else None)]
    span, delivered = t_ack - first_ack[0], nbytes - first_ack[1]
    seconds = t_ack - start
    t_last, pace = handover if handover is not None else (None, None)
    mbps = nbytes * 8e-6 / seconds
    hand = nbytes * 8e-6 / (t_last - start) if t_last is not None and t_last > start else None
    pace_mbps = pace / 125_000.0 if pace else None
    return {"seconds": seconds, "bytes": nbytes, "mbps": mbps,
            "share_mbps": None if share_bps is None else share_bps / 125_000.0,
            "handover_mbps": hand,
            "pace_mbps": pace_mbps,
            "sender_bound": hand is not None and pace_mbps is not None and hand < SENDER_BOUND * pace_mbps,
            "first_ack": first_ack, "delivery_s": span, "delivery_bytes": delivered,
            "delivery_mbps": delivered * 8e-6 / span if span > 0 and delivered > 0 else None,
            "acks": acks}


class UploadScheduler:
    """Weights queued on the current session, parked background weights, and acknowledgements."""

    def __init__(self, graph: ModelGraph, conn: Connection):
        self.graph = graph
        self.conn = conn
        self.sha_names: dict[str, list[str]] = {}
        """sha256 -> the weight names with those bytes (shared weights upload once)."""
        for w in graph.weights:
            self.sha_names.setdefault(graph.weight_sha256(w), []).append(w)
        self._query_held: set[str] = set()
        self.queued: dict[str, UplinkItem] = {}
        """sha256 -> its uplink item, for every weight put on this session's uplink."""
        self.parked: list[UplinkItem] = []
        """Background weights held off the uplink while the UE computes (CPU-shared UE)."""
        self.shelved: dict[str, UplinkItem] = {}
        """sha256 -> a background weight taken off the uplink when the server refused a slice
        (``shelve_background``): it stays off until a later plan schedules it again (then it goes on from
        where it stopped)."""
        self._acks: collections.deque[wire.WeightAck] = collections.deque(maxlen=MAX_WEIGHT_ACKS)
        self.max_periods, self.max_period_acks = MAX_PERIODS, MAX_PERIOD_ACKS
        self._events: collections.deque = collections.deque(maxlen=MAX_WEIGHT_ACKS)
        """(session generation, WeightAck, perf_counter time) posted by receiver threads (the latest
        ``MAX_WEIGHT_ACKS``: a server repeating acknowledgements of the model's weights while the client idles must
        not grow it without bound; an older one lost costs a goodput sample, ``SessionStream.held`` keeps what the
        server holds)."""
        self._busy_mark: tuple[float, int] | None = None
        self._periods: dict[tuple[int, float], dict] = {}
        """(session generation, busy period start) -> the period's longest acknowledged sample (the latest
        ``max_periods`` periods)."""
        self._fresh: dict[tuple[int, float], None] = {}
        """Busy periods acknowledged since the last ``take_send_sample`` (in order; a dict as an ordered set;
        only periods still in ``_periods``)."""
        self._need: dict[frozenset[str], dict[str, int]] = {}
        """server ops of a split -> {sha256 of a weight it reads: 2 x position of its first reader + 1}, in
        need order (``_need_order``: the same on every request of a plan; the last ``NEED_CACHE`` splits)."""
        self._every: tuple[frozenset[str], frozenset[str], dict[str, int]] | None = None
        """(every weight sha256 of the graph, every weight name, sha256 -> its position in ``sha_names``):
        ``server_state``'s sets (built at its first call)."""
        self._state: tuple[tuple, ServerState] | None = None
        """(what it depends on, the ``server_state`` it gave) while no weight is on its way."""
        self._names_memo: tuple[frozenset[str], frozenset[str]] | None = None
        """(sha256s held, their weight names) of the last ``_held_and_waiting`` that held some but not all."""
        self._view: tuple | None = None
        """(``_key``, names held, (names, item) of the queued sha256s not held) of the last ``server_state``."""
        self._all_held: dict[frozenset[str], tuple] = {}
        """server ops of a split -> (``query_held``, session) under which the server held every weight the
        split reads. Both sets only grow, so it stays true while both are the same objects: a warm request
        then skips the per-weight checks (googlenet: 2 x 184 lookups, ~0.1 ms per request)."""

    @property
    def query_held(self) -> set[str]:
        """sha256 the server said it held when the session opened (or when it was suspended); add to it in
        place or assign a new set."""
        return self._query_held

    @query_held.setter
    def query_held(self, value: set[str]) -> None:
        self._query_held = value
        self._state = self._view = None

    def reset(self, held: set[str]) -> None:
        """A new session: nothing queued or parked on it; the server holds ``held``."""
        self.query_held = set(held)
        self.queued = {}
        self.parked = []
        self.shelved = {}

    # ---- acknowledgements (posted by the receiver thread) -------------------------------------------
    def ack_handler(self, generation: int):
        """The ``on_weight_ack(ack, t)`` callback of the session with this generation: posts, nothing else."""
        events = self._events

        def on_weight_ack(ack: wire.WeightAck, t: float) -> None:
            events.append((generation, ack, t))

        return on_weight_ack

    def drain(self) -> None:
        """Apply posted acknowledgements (caller's thread): record them, and take the uplink sample of
        the latest one whose session is still the current one (busy period start -> its last chunk)."""
        sess = self.conn.session
        while self._events:
            gen, ack, t = self._events.popleft()
            self._acks.append(ack)
            if sess is None or gen != self.conn.generation:
                continue  # the session that sent it is gone, and its busy periods with it
            rec = sess.queue.busy_marks.get(ack.sha256)
            if rec is not None:
                start, nbytes = rec
                self._busy_mark = (t - start, nbytes)
                cap = sess.queue.mark_share_bps.get(ack.sha256)
                if t > start:
                    key = (gen, start)
                    prev = self._periods.get(key)
                    first = (t, nbytes) if prev is None else prev["first_ack"]
                    acks = [] if prev is None else prev["acks"]
                    hand = sess.queue.mark_handover.get(ack.sha256)
                    acks.append((t, nbytes, hand[0] if hand is not None else None))
                    if len(acks) > 2 * self.max_period_acks:  # (amortised: trimmed to the latest once in a while)
                        del acks[:len(acks) - self.max_period_acks]
                    sample = _sample(start, nbytes, t, cap, hand, first, acks)
                    self._periods[key] = sample
                    self._fresh[key] = None
                    while len(self._periods) > self.max_periods:  # the oldest period goes
                        old = next(iter(self._periods))
                        del self._periods[old]
                        self._fresh.pop(old, None)

    @property
    def weight_acks(self) -> list[wire.WeightAck]:
        """The WeightStored messages the server sent (already_present=True would mean a wasted upload), the
        latest ``MAX_WEIGHT_ACKS``, oldest first."""
        self.drain()
        return list(self._acks)

    def uplink_samples(self) -> list[dict]:
        """Measured uplink goodput, one sample per busy period of the uplink (data queued without a
        break and under one share rate): ``seconds`` from the period's first chunk to the server's
        acknowledgement of its last weight, ``bytes`` handed over in between, ``mbps`` (1e6 bit/s) and
        ``share_mbps``, the rate the UE paced to (None: not paced to a share); ``handover_mbps``: the
        bytes over the time from the first to the last chunk handed to the transport, ``pace_mbps``: the
        pacing rate in force at the last one (None: unpaced), ``sender_bound``: the handover rate was below
        ``SENDER_BOUND`` x that pace (the UE could not keep it); ``delivery_mbps``: the bytes acknowledged
        after the period's first acknowledgement over the time between it and the last one
        (``delivery_bytes``, ``delivery_s``; None before two): the rate the bytes arrived at, without the
        fixed latency (the data queued ahead of the link, the round trip, the server's commit) that
        ``mbps`` counts once; ``acks``: the period's acknowledgements (the latest ``max_period_acks`` to twice
        that; ``first_ack`` is the first) as (perf_counter time, bytes
        handed over up to its weight, when that weight's last chunk was handed over), oldest first (the
        testbed lines the period up with what its cell carried: ``testbed.cellwatch.sample_window``).
        The latest ``max_periods`` periods (``MAX_PERIODS``), oldest first."""
        self.drain()
        return list(self._periods.values())

    def take_send_sample(self) -> dict | None:
        """The latest busy period acknowledged since the last call whose sample (``uplink_samples``, as it
        stands now: a period judged by all of it, not by its first weights) is sender-bound and at least
        ``MIN_SEND_SAMPLE_S`` and ``MIN_SEND_SAMPLE_BYTES``; None if there is none. Its ``mbps`` (goodput) is
        the rate this UE sustained when it could not keep its pace: the send rate it reports
        (``UeProfile.send_mbps``)."""
        self.drain()
        fresh, self._fresh = self._fresh, {}
        for key in reversed(fresh):
            sample = self._periods.get(key)
            if sample is not None and sample["sender_bound"] and sample["seconds"] >= MIN_SEND_SAMPLE_S \
                    and sample["bytes"] >= MIN_SEND_SAMPLE_BYTES:
                return sample
        return None

    def take_busy_mark(self) -> tuple[float, int] | None:
        """(seconds, bytes) of the latest acknowledged busy period, once."""
        self.drain()
        mark, self._busy_mark = self._busy_mark, None
        return mark

    # ---- the server's view --------------------------------------------------------------------------
    def held_shas(self) -> set[str]:
        s = set(self.query_held)
        sess = self.conn.session
        if sess is not None:
            s |= sess.held
        return s

    def _held(self, sha: str) -> bool:
        """Whether the server holds ``sha`` (``held_shas``, without building the set)."""
        if sha in self.query_held:
            return True
        sess = self.conn.session
        return sess is not None and sha in sess.held

    def _key(self) -> tuple:
        """What ``server_state``'s held set and its list of weights on their way depend on: the connect-time
        query's set (its object and size: it is added to in place or replaced), the session and its held set's
        size (acknowledgements only add to it), and the queued weights (their dict and size: a weight is queued
        once per session)."""
        sess = self.conn.session
        return (id(self.query_held), len(self.query_held), sess, 0 if sess is None else len(sess.held),
                id(self.queued), len(self.queued))

    def settled_key(self) -> tuple | None:
        """``server_state``'s key while the state it keeps is exact (nothing on its way: no bytes in flight
        move it, only what the key covers) and no acknowledgement waits to be applied; else None."""
        key = self._key()
        hit = self._state
        return key if hit is not None and hit[0] == key and not self._events else None

    def server_state(self) -> ServerState:
        """Weights (by name) the server holds, and bytes still to send of those on their way. Kept while
        nothing it depends on moved (``_key``) and no weight is on its way; with weights on their way, the held
        set and which weights are on their way are kept while the key stays (only their bytes left are read
        again: one attribute per queued weight not yet held, in the graph's weight order).

        Why: with weights queued (a prefetch stream's requests, the turning point) this looped over every
        weight of the graph in Python at each request (googlenet: 0.11-0.15 ms of a full core inside the
        request's plan window, session 21); now the key's parts are set operations at C speed, done once per
        acknowledgement, and a request whose key did not move reads only the queued weights' offsets."""
        key = self._key()
        hit = self._state
        if hit is not None and hit[0] == key:
            return hit[1]
        view = self._view
        if view is None or view[0] != key:
            view = self._view = (key, *self._held_and_waiting())
        _, names_held, waiting = view
        universe = self._every[1]  # (what the state lacks of the graph's weights: made where a decision asks)
        if not waiting:
            state = ServerState.trusted(names_held, {}).with_lacking(universe)
            self._state = (key, state)
            return state
        in_flight = {}
        for names, it in waiting:
            left = it.remaining
            for n in names:
                in_flight[n] = left
        self._state = None
        return ServerState.trusted(names_held, in_flight).with_lacking(universe)

    def _held_and_waiting(self) -> tuple[frozenset[str], tuple[tuple[list[str], UplinkItem], ...]]:
        """(the weight names the server holds, (names, uplink item) of each queued sha256 it does not hold, in
        the graph's weight order): ``server_state``'s parts that move only with its key."""
        # set operations at C speed, not one ``_held`` call per weight (densenet121: 0.38 ms of a request's plan
        # at a full core when the acknowledgements of its cold upload had moved the key)
        every = self._every
        if every is None:
            every = self._every = (frozenset(self.sha_names), frozenset(w for ns in self.sha_names.values()
                                                                        for w in ns),
                                   {sha: i for i, sha in enumerate(self.sha_names)})
        sess = self.conn.session
        shas = every[0].intersection(self.query_held)
        if sess is not None:
            shas |= every[0].intersection(sess.held)
        if len(shas) == len(every[0]):  # all of them: the same frozenset every time (identity comparisons hit)
            names_held = every[1]
        else:
            # the acknowledgements only add to what was held: the last names held and those of the new sha256s (a
            # set union copies the stored hashes; naming every held weight again touched every name: 0.05-0.08 ms
            # of googlenet's prefetch requests inside the window, the names' cache lines cold after the forward)
            last = self._names_memo
            if last is not None and last[0] <= shas:
                added = shas - last[0]
                names_held = last[1].union(itertools.chain.from_iterable(map(self.sha_names.__getitem__, added))) \
                    if added else last[1]
            else:
                names_held = frozenset(itertools.chain.from_iterable(map(self.sha_names.__getitem__, shas)))
            self._names_memo = (shas, names_held)
        waiting: tuple = ()
        if self.queued:
            order = every[2]
            pend = [sha for sha in self.queued.keys() - shas if sha in order]
            pend.sort(key=order.__getitem__)
            waiting = tuple((self.sha_names[sha], self.queued[sha]) for sha in pend)
        return names_held, waiting

    def _need_order(self, split: Split) -> dict[str, int]:
        """{sha256: 2 x position of its first reader in ``split.server_order`` + 1} for the weights the
        split's server part reads, in that order (cached per split; do not change the result)."""
        pos = self._need.get(split.server_ops)
        if pos is None:
            g = self.graph
            pos = {}
            for k, name in enumerate(split.server_order):
                for w in g.op_by_name[name].weight_inputs:
                    pos.setdefault(g.weight_sha256(w), 2 * k + 1)
            if len(self._need) >= NEED_CACHE:
                self._need.clear()
            self._need[split.server_ops] = pos
        return pos

    def settled(self) -> bool:
        """Nothing parked, queued, sending, or waiting for an answer, and every queued weight held."""
        sess = self.conn.session
        return (sess is not None and not self.parked and not sess.queue.pending() and not sess.queue.busy
                and not sess.pending_requests and all(sha in sess.held for sha in self.queued))

    # ---- scheduling ---------------------------------------------------------------------------------
    def schedule(self, split: Split, background: Sequence[str], rid: int) -> int:
        """Queue the weights this split needs (need order) and the background ones; re-key what waits
        (request ``rid``'s cut tensors first). Returns the bytes of needed weights the server did not hold.
        """
        g = self.graph
        pos = self._need_order(split)
        bg: dict[str, int] = {}
        for i, w in enumerate(background):
            bg.setdefault(g.weight_sha256(w), i)

        def key(it: UplinkItem) -> tuple:
            if it.kind == "tensor":
                return (FOREGROUND if it.request_id == rid else BACKGROUND, -1, it.request_id)
            if it.name in pos:
                return (FOREGROUND, pos[it.name], 0)
            return (BACKGROUND, bg.get(it.name, len(bg)), 0)

        sess = self.conn.session
        q = sess.queue
        if q.waiting():  # (an empty queue has nothing to re-key: a warm request's)
            q.rekey(key)
        needed = 0
        held = self._held
        if not self._split_held(split):
            missing = False
            for sha, p in pos.items():
                if held(sha):
                    continue
                missing = True
                if sha in self.queued:
                    self._unshelve(sha, (FOREGROUND, p, 0))
                    needed += self.queued[sha].remaining
                    continue
                needed += self._put_weight(sha, (FOREGROUND, p, 0))
            if not missing:
                if len(self._all_held) >= NEED_CACHE:
                    self._all_held.clear()
                self._all_held[split.server_ops] = (self.query_held, sess)
        for sha, p in bg.items():
            if held(sha) or sha in pos:
                continue
            if sha not in self.queued:
                self._put_weight(sha, (BACKGROUND, p, 0))
            elif sha in self.shelved:
                self._unshelve(sha, (BACKGROUND, p, 0))
        return needed

    def _unshelve(self, sha: str, key: tuple) -> None:
        """A plan wants the shelved weight ``sha`` again: back on the uplink under ``key``."""
        it = self.shelved.pop(sha, None) if self.shelved else None
        if it is not None and it.remaining > 0:
            it.key = key
            self.conn.session.queue.put(it)

    def _split_held(self, split: Split) -> bool:
        """The server held every weight ``split`` reads when a request on it was last scheduled (and still
        does: see ``_all_held``)."""
        mark = self._all_held.get(split.server_ops)
        return mark is not None and mark[0] is self.query_held and mark[1] is self.conn.session

    def missing_bytes(self, split: Split) -> int:
        """Bytes of ``split``'s server weights the server does not hold (of a queued one, what it has left)."""
        if self._split_held(split):
            return 0
        n = 0
        for sha in self._need_order(split):
            if self._held(sha):
                continue
            it = self.queued.get(sha)
            n += it.remaining if it is not None else self.graph.weights[self.sha_names[sha][0]].nbytes
        return n

    def doubt(self, split: Split, missing) -> int:
        """A request of ``split`` got no answer in time: the weights it reads that QueryWeights said the server held,
        that the server's answer to the slice's definition on this session listed as missing (``missing``:
        ``SliceDefined.missing_weights``), and that no acknowledgement on this session confirmed, are taken as missing
        from now on (the next plan of the split sends them). Returns how many. Before session 25 a server whose
        QueryWeights claimed every weight (a lie, once, at connect) and whose session said otherwise left every later
        request of the session waiting for weights the UE never sent: each fell back, for good
        (``tests/test_hostile_server25.py``). Only the session's own word moves the claim: an honest server that
        stalled once lists none of the weights it holds, and doubting every unacknowledged one re-sent resnet18's
        46.7 MB after one 2.5 s stall (session 25's fresh tester, ``tests/test_hostile_server25.py``)."""
        if not missing:
            return 0
        sess = self.conn.session
        acked = sess.held if sess is not None else ()
        doubted = {sha for sha in self._need_order(split)
                   if sha in missing and sha in self.query_held and sha not in acked}
        if doubted:
            self.query_held = self.query_held - doubted  # (a new set: the memos keyed on the old one let go)
        return len(doubted)

    def needed_items(self, split: Split) -> list[UplinkItem]:
        """The uplink items of ``split``'s server weights that the server did not hold when queued."""
        if self._split_held(split):
            return []
        queued, held = self.queued, self._held
        return [queued[sha] for sha in self._need_order(split) if sha in queued and not held(sha)]

    def _put_weight(self, sha: str, key: tuple) -> int:
        name = self.sha_names[sha][0]
        meta = self.graph.weights[name]
        it = UplinkItem("weight", sha, meta.dtype, meta.shape, tensor_bytes(self.graph.weight_values[name]), key)
        self.queued[sha] = it
        self.conn.session.queue.put(it)
        return it.total

    def park_background(self) -> None:
        """Take the background weights off the uplink (the UE is about to compute)."""
        sess = self.conn.session
        if sess is None or not sess.queue.waiting():  # (nothing to take off: a warm split request's, every time)
            return

        def bg(it: UplinkItem) -> bool:
            if it.kind == "weight" and it.key[0] == BACKGROUND:
                self.parked.append(it)
                return True
            return False

        sess.queue.drop(bg)

    def cap_background(self, nbytes: int | None) -> None:
        """At most ``nbytes`` more background weight bytes on the uplink (None: no cap; ``UplinkQueue.cap_background``):
        a prefetching local run's plan. No session: nothing to cap."""
        sess = self.conn.session
        if sess is not None:
            sess.queue.cap_background(nbytes)

    def hold_background(self) -> Callable[[], None]:
        """Take the background weights now on the uplink off it until the returned callable puts exactly those
        back (a bench's paired stream holds one client's idle-time upload while another request runs on the
        same UE); what was parked before stays parked (the client's own plan parked it)."""
        n0 = len(self.parked)
        self.park_background()
        held = self.parked[n0:]
        del self.parked[n0:]

        def release() -> None:
            sess = self.conn.session
            for it in held:
                if sess is not None and it.remaining > 0:
                    sess.queue.put(it)

        return release

    def shelve_background(self) -> int:
        """Take every background weight off the uplink, parked ones too, until a later plan schedules it
        again (``schedule``): called when the server refused a slice, whose warm target they were going up
        for (a slice quota: 30-41 MB of resnet18's stayed queued and went up in idle time for a target the
        session could not run). Returns the bytes they still had to send."""
        moved, self.parked = self.parked, []
        sess = self.conn.session
        if sess is not None:
            sess.queue.drop(lambda it: it.kind == "weight" and it.key[0] == BACKGROUND and (moved.append(it) or True))
        for it in moved:
            self.shelved[it.name] = it
        return sum(it.remaining for it in moved)

    def resume_background(self) -> None:
        """Put parked background weights back on the uplink (the UE waits or idles)."""
        parked, self.parked = self.parked, []
        sess = self.conn.session
        if sess is None:
            return
        for it in parked:
            if it.remaining > 0:
                sess.queue.put(it)

    # ---- progress -----------------------------------------------------------------------------------
    def upload_status(self) -> tuple[int, int]:
        """(weight bytes sent on this session, weight bytes still waiting): for progress bars. Any thread."""
        s = self.conn.session
        if s is None:
            return 0, 0
        return s.queue.sent.weight_bytes, sum(it.remaining for it in s.queue.pending() if it.kind == "weight")

    def wait_uploads(self, timeout_s: float) -> bool:
        """Wait until every queued weight was acknowledged by the server (tests, benchmarks)."""
        end = time.monotonic() + timeout_s
        while time.monotonic() < end:
            s = self.conn.session
            if s is None and self.conn.suspended is not None:
                return True  # suspended only after every queued weight was acknowledged
            if s is None or not s.alive:
                return False
            if all(sha in s.held for sha in self.queued):
                return True
            time.sleep(0.02)
        return False
