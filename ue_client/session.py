"""One Session stream to the edge server: a priority uplink and a receiver that assembles results.

Uplink: every message of the session goes through one queue. Control messages (OpenSession,
DefineSlice, BeginRequest) go first, in order; weight and tensor chunks are served by priority, one
chunk at a time, so a cut tensor that becomes ready jumps ahead of weights for later ops (the
preemption granularity is a chunk). gRPC pulls the next message only once the previous one was handed
to the transport, so the queue is the only place where data waits and the priority holds.

Pacing: bytes handed to gRPC go into socket buffers that can hold seconds of data on a slow link,
behind which a ready tensor would wait. When a rate estimate is available the uplink keeps at most
``ahead_s`` of data (by the estimate) in flight beyond what the link could have carried, which bounds
that head-of-line blocking to about ``ahead_s`` while keeping the link busy.

Share pacing (a shared cell, MJOA-MU's uplink allocation): when the UE knows the cell's uplink rate and
the server gives this session an uplink share beta (``SessionOpened``/``ShareChanged.uplink_share``),
``UplinkQueue.set_share_rate`` caps the pacing rate at beta x the cell rate. The same virtual clock is
then a token bucket of depth ``ahead_s`` x that rate: over any window the session hands over at most
rate x window + one chunk + the depth, and chunks shrink to ~``chunk_s`` of the paced rate (down to
``SHARE_MIN_CHUNK_BYTES``) so the share holds at a fine grain. Cut tensors keep priority over weights:
the choice of the next chunk is made after the wait.
"""

from __future__ import annotations

import collections
import heapq
import itertools
import logging
import math
import threading
import time
import weakref
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field

import grpc
import torch

from modelgraph.tensors import aligned_buffer
from ue_client import wire
from ue_client.deadline import OUTPUT_STEPS
from ue_client.errors import ProtocolError, RequestFailed, ServerError, ServerUnavailable
from ue_client.heap import retain_freed_buffers

log = logging.getLogger(__name__)

BACKGROUND = 1
FOREGROUND = 0
SHARE_MIN_CHUNK_BYTES = 16 << 10
"""Smallest chunk while share-paced (of weights: from 1.3 Mbit/s on): ~25 ms at 5 Mbit/s, a message
overhead well under 1 %. A cut tensor's chunks stay at least this big at any share: it is on a request's
critical path, and at the 1/64 floor of an 8 Mbit/s cell (where ARA leaves a UE whose upload is done) a
12 kB input in 2 KiB chunks is paced over 0.77 s: tried in session 9 (with control messages counted against
the pace too), the narrow UEs' warm requests took 665-800 ms instead of 62-152 ms for the first warm one,
and ARA / equal at N = 4 went from 0.67 to 0.74."""
SHARE_CHUNK_MAX_S = 0.1
"""Below 1.3 Mbit/s a share-paced chunk of weights is at most this much of the pace (down to
``SHARE_LOW_CHUNK_BYTES``): at the 1/64 floor of an 8 Mbit/s cell (0.125 Mbit/s) a 16 KiB chunk is 1.05 s
of the UE's share handed over at once, and seven UEs at the floor, each handing over a chunk as their
requests began, carried 1.63 Mbit/s (their shares: 0.875) over the 1.39 s sample of the UE holding the rest
(session 9, N = 8, ``testbed.cellwatch``: that UE's class carried 6.55 of its 7.12 Mbit/s)."""
SIDE_IDLE_CHUNK_S = 0.1
"""Link time (at the pacing rate) of one data-channel block, and of what its socket may hold unsent, while no
request is in flight (no cut tensor can become ready) and no share is paced: 4x ``chunk_s``, within the same
byte cap (the server's chunk limit, ``chunk_bytes``). Measured in the testbed (session 16, resnet18, a 10 % UE,
TLS, 100 Mbit/s: ``bench/bench_send_insitu.py``): 312 KB blocks (25 ms) cost the sending thread 99 ms of CPU
for 46.7 MB, 1 MiB blocks (84 ms) 52 ms; a throttled UE pays for each block's wake-ups, not for its bytes."""

MAX_UNSOLICITED_ACKS = 1024
"""Acknowledged weights a session keeps in ``held`` that were never put on its uplink (``SessionStream._dispatch``):
a client sends every weight through it, but a test or a benchmark may write some on a raw data-channel socket."""

SHARE_LOW_CHUNK_BYTES = 2 << 10
"""Smallest share-paced chunk of weights: 131 ms at 0.125 Mbit/s, a frame header (~100 bytes) 5 % of it."""


def _background(it: UplinkItem) -> bool:
    """``it`` is queued in the background class (its key starts with ``BACKGROUND``)."""
    k = it.key
    return isinstance(k, tuple) and bool(k) and k[0] == BACKGROUND


@dataclass
class UplinkItem:
    """A weight or a cut tensor waiting (maybe partly sent) on the uplink."""

    kind: str  # "weight" | "tensor"
    name: str
    """Weight sha256 for weights; the tensor ref for tensors."""
    dtype: str
    shape: tuple[int, ...]
    data: memoryview
    key: tuple
    request_id: int = 0
    offset: int = 0
    seq: int = 0
    first_sent: float | None = None
    owner: object = None
    """Keeps the tensor whose bytes ``data`` views alive."""
    side_mark: int = 0
    """Tensors: weight bytes the data channel had sent when this tensor became ready (was queued)."""
    side_waited: int | None = None
    """Tensors: weight bytes the data channel finished writing between this tensor becoming ready and its
    last chunk being handed to gRPC (None: not sent yet, or no data channel). The priority bound: at most
    the one block being written when it became ready."""

    @property
    def total(self) -> int:
        return self.data.nbytes

    @property
    def remaining(self) -> int:
        return self.total - self.offset


@dataclass
class SentRecord:
    """What went on the wire, for reports and the passive link estimate."""

    weight_bytes: int = 0
    tensor_bytes: int = 0
    control_bytes: int = 0
    weight_messages: int = 0
    """Messages that carried weight bytes (a message may pack several weights)."""
    weight_first_chunk: dict[str, float] = field(default_factory=dict)
    weight_last_chunk: dict[str, float] = field(default_factory=dict)


class UplinkQueue:
    """Thread-safe priority uplink; ``messages()`` is the request iterator handed to gRPC: serialised
    ``SessionRequest``s (bytes), each data chunk encoded straight from the weight's or tensor's memory."""

    def __init__(self, chunk_bytes: int = wire.MAX_CHUNK_BYTES,
                 rate_bps: Callable[[], float | None] | None = None, ahead_s: float = 0.03, chunk_s: float = 0.025):
        self.chunk_bytes = chunk_bytes
        self.message_bytes = chunk_bytes
        """Largest data in one message while no cut tensor can be waiting (:meth:`configure`)."""
        self.max_pack = 1
        """Weight chunks one message may pack (1: one chunk per message, what every server takes)."""
        self.tensors_expected: Callable[[], bool] = lambda: False
        """True while a request in flight may still make a cut tensor ready (its prefix runs: ``Pending.inputs_queued``
        unset): chunks stay small."""
        self.chunk_s = chunk_s
        self._rate_bps = rate_bps
        self.ahead_s = ahead_s
        self._lock = threading.RLock()
        self._cv = threading.Condition(self._lock)
        """gRPC's consumer (``messages``) waits on it."""
        self._side_cv = threading.Condition(self._lock)
        """The data channel's sender (``next_side_block``) waits on it (the same lock: one queue)."""
        self._handed = threading.Condition(self._lock)
        """Notified when cut-tensor bytes are handed to gRPC (``wait_tensors_handed`` waits on it)."""
        self._control: collections.deque[tuple[bytes, int]] = collections.deque()
        """(serialised control message, cut-tensor bytes inside it) in order."""
        self._control_tensors = 0
        """Control messages waiting that carry cut-tensor bytes (the data channel waits for them)."""
        self._heap: list[tuple[tuple, int, UplinkItem]] = []
        self._seq = itertools.count()
        self._closed = False
        self.sent = SentRecord()
        self._pace_t = 0.0  # virtual time at which the link finishes what was handed over
        self._busy_start: float | None = None
        self._busy_bytes = 0
        self.last_data_t = 0.0
        """``time.perf_counter()`` when the last chunk (weights or cut tensors) was handed over."""
        self.last_weight_t = 0.0
        """``time.perf_counter()`` when the last weight bytes were handed over (a gRPC message or a data-channel
        block); cut tensors do not move it. A request's cut tensors are delivered when its answer comes (the
        server computes on them), so at the next request's plan only weights handed over within ``quiet_s`` can
        still be on the link: the client reads the uplink's backlog only then
        (``backlog.UplinkBacklog.ms``; before session 21 every split request read it, stamped by its
        predecessor's tensors)."""
        self.quiet_s = 0.3
        """How long after the last chunk the uplink counts as idle (queues below us have drained)."""
        self.unpaced = False
        """No pacing while set (the uplink probe measures the link, not the pace of the last estimate)."""
        self.share_bps: float | None = None
        """Cap on the pacing rate (bytes/s): this session's uplink share x the cell rate; None: no cap."""
        self.tensor_share_bps: float | None = None
        """Cap on the pacing rate of cut tensors (bytes/s) where the server lets a request's cut tensors go
        faster than the share (``SessionOpened.request_uplink_share`` x the cell rate); None: ``share_bps``."""
        self.busy_marks: dict[str, tuple[float, int]] = {}
        """sha256 -> (start of the busy period its last chunk was sent in, bytes handed over in that period
        up to and including that chunk): with the weight's ack time this is a goodput sample."""
        self.mark_share_bps: dict[str, float | None] = {}
        """sha256 -> the share rate cap (bytes/s, None: none) in force over its busy-mark period."""
        self.mark_handover: dict[str, tuple[float, float | None]] = {}
        """sha256 -> (perf_counter time its last chunk was handed over, the pacing rate in force then, bytes/s;
        None: unpaced): whether the sender kept up with its pace over the busy-mark period, and the pace its
        goodput is judged against (``ue_client.uploads.UploadScheduler.uplink_samples``)."""
        # ---- the data channel (ue_client.data_channel): weights leave through another consumer ----
        self.side = False
        """Weights go to the data channel's sender (:meth:`next_side_block`), not into gRPC messages."""
        self.side_block_bytes = wire.LONE_MESSAGE_BYTES
        """The server's chunk limit: the data channel's frames stay within it. Its blocks are at most
        ``chunk_bytes`` even while no request is in flight (a request that begins and has its cut tensor
        ready at once then waits behind at most that; larger blocks saved nothing measurable), and its
        socket may hold this much unsent while no link rate is known (``side_unsent_bytes``)."""
        self.side_bytes = 0
        """Weight bytes the data channel's sender finished handing to its socket."""
        self._wheap: list[tuple[tuple, int, UplinkItem]] = []
        """Weights waiting for the data channel (while ``side``)."""
        self._side_block: list[tuple[UplinkItem, int, int]] | None = None
        """The spans (item, start, end) of the block the data channel's sender is writing."""
        self._tensor_handing = False
        """A tensor chunk was yielded to gRPC and gRPC has not come back for the next message yet."""
        self.weights_put = threading.Event()
        """Set when weights may have started to wait (a weight queued, or the background cap raised): the queue watch,
        asleep for its idle period, wakes on it (:class:`QueueWatch`)."""
        self.weights_queued: set[str] = set()
        """The sha256 of every weight ever put on this queue: the only weights the server may acknowledge
        (``SessionStream._dispatch``)."""
        self.background_cap: int | None = None
        """Weight bytes of the background class (key ``(BACKGROUND, ...)``) that may still be handed over (None: no
        cap; :meth:`cap_background`). While it is 0, waiting background weights are not sent (nor counted busy)."""

    def configure(self, max_chunk_bytes: int, max_pack: int) -> None:
        """The server's limits (``SessionOpened.limits``): a message may then carry up to
        ``max_chunk_bytes`` of data (its hard bound; at most ``wire.LONE_MESSAGE_BYTES``), a weight
        message in up to ``max_pack`` chunks."""
        with self._cv:
            if max_chunk_bytes > 0:
                self.message_bytes = min(max_chunk_bytes, max(self.chunk_bytes, wire.LONE_MESSAGE_BYTES))
            self.max_pack = max(1, max_pack)

    # ---- producers -----------------------------------------------------------------------------
    def put_control(self, msg: bytes, tensor_bytes: int = 0) -> None:
        """Queue a serialised control message (``wire.open_session``, ``wire.begin_request``, ...);
        ``tensor_bytes``: cut-tensor bytes it carries (a BeginRequest with inline inputs): counted as sent
        tensor bytes and against the pacing when it goes, and the data channel holds its next block
        until gRPC took it, as for a tensor chunk."""
        with self._cv:
            self._control.append((msg, tensor_bytes))
            if tensor_bytes:  # (the data channel's sender re-checks ``_tensor_first`` before its next block)
                self._control_tensors += 1
            self._cv.notify_all()

    def cap_background(self, nbytes: int | None) -> None:
        """Hand over at most ``nbytes`` more bytes of background weights (mid-weight: the rest of a weight waits
        with its offset), None: no cap. A prefetching local run sends the plan's bytes
        (``PlanChoice.details["prefetch_bytes"]``), not what the link carries until the run ends: session 20's
        testbed streams (10 % UE, 400 Mbit/s) sent 13.6 / 12.3, 30.4 / 23.2, 13.9 / 12.0, 26.2 / 23.7 MB (sent /
        planned), and the sender's CPU beside the run put those requests 33-77 ms over their prediction.
        Thread-safe; raises ValueError for a negative cap."""
        if nbytes is not None and nbytes < 0:
            raise ValueError(f"a background cap must be >= 0 bytes, got {nbytes!r}")
        with self._cv:
            self.background_cap = None if nbytes is None else int(nbytes)
            if nbytes != 0:
                self.weights_put.set()
            self._cv.notify_all()
            self._side_cv.notify_all()

    def _capped(self, heap: list) -> bool:
        """The most urgent item of ``heap`` is a background weight and the background cap is spent (under the
        lock): nothing of ``heap`` may go now."""
        if self.background_cap is None or self.background_cap > 0 or not heap:
            return False
        it = heap[0][2]
        return it.kind == "weight" and _background(it)

    def _idle_heaps(self) -> bool:
        """No weight or tensor may go now (under the lock): both heaps empty or held back by the background cap. A
        consumer waiting then starts a new busy period when data comes (a goodput sample spans no idle time)."""
        return (not self._heap or self._capped(self._heap)) and (not self._wheap or self._capped(self._wheap))

    def _cap_end(self, it: UplinkItem, off: int, end: int) -> int:
        """``end`` lowered to what the background cap allows for ``it`` from ``off``, the cap charged (under the
        lock)."""
        cap = self.background_cap
        if cap is not None and _background(it):
            end = min(end, off + cap)
            self.background_cap = cap - (end - off)
        return end

    def inline_bytes(self) -> int:
        """The most cut-tensor bytes one message may carry now (a BeginRequest's inline inputs): the
        largest message the uplink sends (``message_bytes``), or while share-paced the chunk size a cut
        tensor gets (about ``chunk_s`` of the paced rate), so the share's grain holds."""
        with self._cv:
            if self.share_bps is None:
                return self.message_bytes
            return self._chunk_size(min(self.chunk_bytes, self.message_bytes))

    def put(self, item: UplinkItem) -> None:
        with self._cv:
            item.seq = next(self._seq)
            if item.kind == "weight":
                self.weights_put.set()
                self.weights_queued.add(item.name)
            if item.kind == "weight" and self.side:
                heapq.heappush(self._wheap, (item.key, item.seq, item))
                self._side_cv.notify()
            else:
                if item.kind == "tensor":
                    item.side_mark = self.side_bytes
                heapq.heappush(self._heap, (item.key, item.seq, item))
                self._cv.notify_all()

    def rekey(self, fn: Callable[[UplinkItem], tuple]) -> None:
        """Give every waiting item a new priority (a new plan changed what is needed first)."""
        with self._cv:
            for heap in (self._heap, self._wheap):
                items = [e[2] for e in heap]
                for it in items:
                    it.key = fn(it)
                heap[:] = [(it.key, it.seq, it) for it in items]
                heapq.heapify(heap)

    def drop(self, pred: Callable[[UplinkItem], bool]) -> int:
        """Remove waiting items (whole or partly sent) matching ``pred``; returns how many."""
        with self._cv:
            n = 0
            for heap in (self._heap, self._wheap):
                keep = [e for e in heap if not pred(e[2])]
                n += len(heap) - len(keep)
                heap[:] = keep
                heapq.heapify(heap)
            return n

    def waiting(self) -> bool:
        """Whether any item waits (either heap, held back by the background cap or not), under the lock: a warm
        request's ``UploadScheduler.park_background`` / ``schedule`` skip their pass over the heaps when nothing
        does."""
        with self._cv:
            return bool(self._heap or self._wheap)

    def pending(self) -> list[UplinkItem]:
        with self._cv:
            return [e[2] for e in self._heap] + [e[2] for e in self._wheap]

    def pending_bytes(self) -> int:
        with self._cv:
            return sum(e[2].remaining for e in self._heap) + sum(e[2].remaining for e in self._wheap)

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        """Stop after the control messages already queued; waiting data is dropped."""
        with self._cv:
            self._closed = True
            self._cv.notify_all()
            self._side_cv.notify_all()
            self._handed.notify_all()

    # ---- the gRPC side ---------------------------------------------------------------------------
    def set_share_rate(self, bps: float | None, tensor_bps: float | None = None) -> None:
        """Pace at most at ``bps`` bytes/s from now on (None or <= 0: no cap), cut tensors at ``tensor_bps``
        where it is higher (None: ``bps``). Thread-safe; a waiting sender sees the new rate within 50 ms.
        Raises ValueError for a non-finite rate."""
        for r in (bps, tensor_bps):
            if r is not None and not math.isfinite(r):
                raise ValueError(f"share rate must be finite, got {r!r}")
        with self._cv:
            old = self.share_bps
            self.share_bps = bps if bps is not None and bps > 0 else None
            self.tensor_share_bps = (tensor_bps if self.share_bps is not None and tensor_bps is not None
                                     and tensor_bps > self.share_bps else None)
            if self.share_bps != old and self._busy_start is not None:
                # a new rate starts a new busy period: each goodput sample is taken under one rate
                self._busy_start, self._busy_bytes = time.perf_counter(), 0
            if old is not None and self.share_bps is not None and self._pace_t > time.perf_counter():
                # what is already scheduled at the old rate drains at the new one
                now = time.perf_counter()
                self._pace_t = now + (self._pace_t - now) * old / self.share_bps
            self._cv.notify_all()
            self._side_cv.notify_all()

    def _rate(self, tensor: bool = False) -> float | None:
        """The pacing rate (bytes/s; None: unpaced): the link estimate capped at the share rate (for a cut
        tensor ``tensor_share_bps`` where set)."""
        if self.unpaced:
            return None
        rate = self._rate_bps() if self._rate_bps is not None else None
        rate = rate if rate and rate > 0 else None
        cap = self.tensor_share_bps if tensor and self.tensor_share_bps is not None else self.share_bps
        if cap is not None:
            return cap if rate is None else min(rate, cap)
        return rate

    def _pace_wait(self) -> None:
        """Sleep while more than ``ahead_s`` of data (at the estimated rate) is ahead of the link.

        Called before a chunk is chosen, so a tensor that becomes ready meanwhile still goes first.
        """
        while self._rate() is not None and not self._closed:
            ahead = self._pace_t - time.perf_counter()
            if ahead <= self.ahead_s:
                return
            time.sleep(min(ahead - self.ahead_s, 0.05))

    def _paced(self, nbytes: int, now: float, tensor: bool = False) -> None:
        rate = self._rate(tensor)
        self._pace_t = max(self._pace_t, now) + (nbytes / rate if rate else 0.0)

    def defer(self, seconds: float) -> None:
        """Hold the uplink for ``seconds`` more: the network queue is longer than wanted (seen by pings)."""
        if seconds > 0:
            with self._cv:
                self._pace_t = max(self._pace_t, time.perf_counter()) + seconds

    def _chunk_size(self, lone: int | None = None, weights: bool = False) -> int:
        """About ``chunk_s`` of link time per message within [256 KiB, cap]: the preemption granularity
        stays small on slow links, the per-message overhead small on fast ones. The cap is
        ``chunk_bytes`` while a cut tensor may become ready (a request is in flight), else ``lone``
        (default ``message_bytes``): a lone upload goes in as few messages as pays
        (``wire.LONE_MESSAGE_BYTES``; the data channel's blocks: ``side_block_bytes``). Share-paced: at least
        ``SHARE_MIN_CHUNK_BYTES``, or for ``weights`` at a share below 1.3 Mbit/s ``SHARE_CHUNK_MAX_S`` of it
        (at least ``SHARE_LOW_CHUNK_BYTES``)."""
        lone = self.message_bytes if lone is None else lone
        cap = min(self.chunk_bytes, lone) if self.tensors_expected() else lone
        rate = self._rate()
        if rate is None:
            return cap
        if self.share_bps is not None and weights:
            floor = max(SHARE_LOW_CHUNK_BYTES, min(SHARE_MIN_CHUNK_BYTES, int(rate * SHARE_CHUNK_MAX_S)))
        elif self.share_bps is not None:
            floor = SHARE_MIN_CHUNK_BYTES
        else:
            floor = wire.MIN_CHUNK_BYTES
        return int(min(lone, max(floor, min(cap, rate * self.chunk_s))))

    @property
    def busy(self) -> bool:
        """Data waits, or the link may still be carrying what was handed over (with a margin)."""
        now = time.perf_counter()
        if self._side_block is not None or self._pace_t > now or now - self.last_data_t < self.quiet_s:
            return True
        with self._lock:  # (weights held back by the background cap wait, they do not keep the uplink busy)
            return any(heap and not self._capped(heap) for heap in (self._heap, self._wheap))

    @property
    def weights_busy(self) -> bool:
        """Weights wait (not held back by the background cap), one data-channel block is being written, or weights
        were handed over within ``quiet_s``: the link may carry weights a cut tensor could wait behind. A request's
        own cut tensors do not count (its answer comes after the server read them): the queue watch pings at its
        busy period only while this holds."""
        if self._side_block is not None or time.perf_counter() - self.last_weight_t < self.quiet_s:
            return True
        with self._lock:
            return (bool(self._wheap) and not self._capped(self._wheap)) or any(
                e[2].kind == "weight" for e in self._heap if not (self.background_cap == 0 and _background(e[2])))

    def messages(self) -> Iterator:
        while True:
            if self._tensor_handing:  # gRPC is back: the tensor chunk it took is with the transport
                with self._cv:
                    self._tensor_handing = False
                    if self._wheap:  # the data channel's sender waits only while weights wait
                        self._side_cv.notify_all()
            self._pace_wait()
            with self._cv:
                while not self._control and (not self._heap or self._capped(self._heap)) and not self._closed:
                    if (not self._wheap or self._capped(self._wheap)) and self._side_block is None:
                        self._busy_start = None  # the uplink idles: the next data starts a new busy period
                    self._cv.wait()
                if self._control:
                    msg, nbytes = self._control.popleft()
                    if nbytes:
                        self._control_tensors -= 1
                        self._inline_taken(len(msg), nbytes, time.perf_counter())
                    else:
                        self.sent.control_bytes += len(msg)
                elif self._closed:
                    return
                else:
                    msg = self._next_data(time.perf_counter())
            yield msg

    def _next_data(self, now: float) -> bytes:
        """The next data message (under the lock): a chunk of the most urgent item. A weight's message
        goes on with the following weights while they are next in priority order and the message has
        room (``max_pack`` chunks, ``_chunk_size()`` bytes): small weights travel together."""
        if self._busy_start is None:
            self._busy_start, self._busy_bytes = now, 0
        key, seq, it = heapq.heappop(self._heap)
        budget = self._chunk_size(weights=it.kind == "weight")
        if it.kind != "weight":
            off, end = it.offset, min(it.total, it.offset + budget)
            msg = wire.encode_tensor_chunk(it.request_id, it.name, it.dtype, it.shape, off, it.total, it.data[off:end])
            self.sent.tensor_bytes += end - off
            self._handed.notify_all()
            if end == it.total and self.side:
                it.side_waited = self.side_bytes - it.side_mark
            self._tensor_handing = self.side
            self._took(key, seq, it, end, now)
            return msg
        parts, used = [], 0
        while True:
            off = it.offset
            end = self._cap_end(it, off, min(it.total, off + budget - used))
            parts.append((it.name, it.dtype, it.shape, off, it.total, it.data[off:end]))
            used += end - off
            self._weight_taken(it, off, end, now)
            self._took(key, seq, it, end, now, count_busy=False)
            if end < it.total or len(parts) >= self.max_pack or used >= budget or not self._heap \
                    or self._heap[0][2].kind != "weight" or self._capped(self._heap):
                break
            key, seq, it = heapq.heappop(self._heap)
        self.sent.weight_messages += 1
        if len(parts) == 1:
            return wire.encode_weight_chunk(*parts[0])
        return wire.encode_weight_chunks(parts)

    def wait_tensors_handed(self, total: int, timeout_s: float) -> bool:
        """Block until ``sent.tensor_bytes`` reaches ``total`` (cut-tensor bytes handed to gRPC: what a request
        queued has left the UE's Python), the queue closes, or ``timeout_s`` passes; returns whether it reached it.
        No polling: woken by the hand-over itself."""
        with self._handed:
            return self._handed.wait_for(lambda: self.sent.tensor_bytes >= total or self._closed, timeout_s) \
                and self.sent.tensor_bytes >= total

    def _inline_taken(self, size: int, nbytes: int, now: float) -> None:
        """A control message of ``size`` bytes carrying ``nbytes`` of cut tensors was handed to gRPC (under
        the lock): accounted as a tensor chunk is."""
        if self._busy_start is None:
            self._busy_start, self._busy_bytes = now, 0
        self.sent.tensor_bytes += nbytes
        self._handed.notify_all()
        self.sent.control_bytes += size - nbytes
        self._busy_bytes += nbytes
        self._paced(nbytes, now, tensor=True)  # at the cut tensors' rate, as their chunks are
        self.last_data_t = now
        self._tensor_handing = self.side

    def _weight_taken(self, it: UplinkItem, off: int, end: int, now: float) -> None:
        """Account bytes [off, end) of weight ``it`` as handed over (a gRPC message or a data-channel
        block): what went out, and the busy-period mark its acknowledgement turns into a goodput sample."""
        self.sent.weight_bytes += end - off
        self.last_weight_t = now
        if off == 0:
            self.sent.weight_first_chunk[it.name] = now
        self._busy_bytes += end - off
        if end == it.total:
            self.sent.weight_last_chunk[it.name] = now
            self.busy_marks[it.name] = (self._busy_start, self._busy_bytes)
            self.mark_share_bps[it.name] = self.share_bps
            self.mark_handover[it.name] = (now, self._rate())

    # ---- the data channel's sender (ue_client.data_channel) ------------------------------------------
    def start_side(self, block_bytes: int) -> None:
        """Weights go to the data channel from now on (``block_bytes``: the server's chunk limit, see
        ``side_block_bytes``): the waiting ones not yet begun move over; one begun in-stream finishes
        there (the server assembles each weight from one stream)."""
        with self._cv:
            self.side = True
            self.side_block_bytes = block_bytes
            keep = []
            for e in self._heap:
                (heapq.heappush(self._wheap, e) if e[2].kind == "weight" and e[2].offset == 0 else keep.append(e))
            self._heap[:] = keep
            heapq.heapify(self._heap)
            self._cv.notify_all()
            self._side_cv.notify_all()

    def stop_side(self, resend: list[UplinkItem]) -> None:
        """The data channel is gone: every weight waiting for it goes in-stream, and so do ``resend``
        (weights it had begun or sent whose commit the server did not confirm), from their first byte."""
        with self._cv:
            self.side = False
            self._side_block = None
            for e in self._wheap:  # their bytes so far went on the data channel: the server dropped them
                e[2].offset = 0
                heapq.heappush(self._heap, e)
            waiting = {id(e[2]) for e in self._wheap}
            self._wheap.clear()
            for it in resend:
                if id(it) not in waiting:
                    it.offset = 0
                    it.seq = next(self._seq)
                    heapq.heappush(self._heap, (it.key, it.seq, it))
            if self._heap:
                self.weights_put.set()  # (weights to resend wait again: the queue watch watches them)
            self._cv.notify_all()
            self._side_cv.notify_all()

    def _tensor_first(self) -> bool:
        """A cut tensor must go before the next weight block (under the lock): one is being handed to
        gRPC, or one waits with a key before the most urgent weight's."""
        if self._tensor_handing or self._control_tensors:
            return True
        wkey = self._wheap[0][0] if self._wheap else None
        return any(e[2].kind == "tensor" and (wkey is None or e[0] < wkey) for e in self._heap)

    def next_side_block(self, timeout_s: float) -> list[tuple[UplinkItem, int, int]] | None:
        """The data channel's next block, as spans (item, start, end): the most urgent weight's next
        bytes, and while they complete their weight and the block has room (its byte budget, at most
        ``max_pack`` spans), the next weights' too (small weights go in one write). Taken only while no
        cut tensor waits (so one that becomes ready waits behind at most the block being written) and
        within the pacing (the share rate applies to these bytes too). None after ``timeout_s`` without
        one, or once the queue closed or the data channel stopped."""
        end_t = time.monotonic() + timeout_s
        while True:
            self._pace_wait()
            with self._cv:
                while not self._closed and self.side and (not self._wheap or self._capped(self._wheap)
                                                            or self._tensor_first()):
                    if (self._idle_heaps() and not self._control and self._side_block is None):
                        self._busy_start = None  # the uplink idles: the next data starts a new busy period
                    left = end_t - time.monotonic()
                    if left <= 0:
                        return None
                    self._side_cv.wait(left)
                if self._closed or not self.side:
                    return None
                if self._rate() is not None and self._pace_t - time.perf_counter() > self.ahead_s:
                    continue  # more was handed over meanwhile (gRPC's tensors): wait for the link again
                now = time.perf_counter()
                if self._busy_start is None:
                    self._busy_start, self._busy_bytes = now, 0
                budget = self._side_budget()
                spans, used = [], 0
                while True:
                    key, seq, it = heapq.heappop(self._wheap)
                    off = it.offset
                    end = self._cap_end(it, off, min(it.total, off + budget - used))
                    self._weight_taken(it, off, end, now)
                    if it.first_sent is None:
                        it.first_sent = now
                    it.offset = end
                    spans.append((it, off, end))
                    used += end - off
                    if end < it.total:
                        heapq.heappush(self._wheap, (key, seq, it))
                        break
                    if (used >= budget or len(spans) >= max(self.max_pack, 1) or not self._wheap
                            or self._capped(self._wheap)):
                        break
                self._paced(used, now)
                self.last_data_t = now
                self._side_block = spans
                return spans

    def _idle_side(self) -> bool:
        """Data-channel blocks may be long (``SIDE_IDLE_CHUNK_S``): no request in flight, no share paced."""
        return self.share_bps is None and not self.tensors_expected()

    def _side_budget(self) -> int:
        """The data channel's next block in bytes (under the lock): ``_chunk_size`` within the server's chunk
        limit, or while ``_idle_side`` at least ``SIDE_IDLE_CHUNK_S`` of the pacing rate (same cap)."""
        lone = min(self.chunk_bytes, self.side_block_bytes)
        budget = self._chunk_size(lone, weights=True)
        rate = self._rate()
        if rate is not None and self._idle_side():
            budget = int(min(lone, max(budget, rate * SIDE_IDLE_CHUNK_S)))
        return budget

    def side_unsent_bytes(self) -> int:
        """What the data channel's socket may hold unsent (``TCP_NOTSENT_LOWAT``): about ``chunk_s`` of the
        link at the pacing rate (at least 64 KiB; ``SIDE_IDLE_CHUNK_S`` while ``_idle_side``), a whole block
        when no rate is known."""
        rate = self._rate()
        if rate is None:
            return self.side_block_bytes
        span = SIDE_IDLE_CHUNK_S if self._idle_side() else self.chunk_s
        return int(min(self.side_block_bytes, max(64 << 10, rate * span)))

    def paced_backlog_s(self) -> float:
        """Seconds of link (at the pacing rate) still to carry what was handed over, by the pacing clock
        (``_pace_t``; 0 when unpaced or caught up): ``ue_client.backlog``'s estimate where no data channel
        socket can be read."""
        with self._cv:
            if self._rate() is None:
                return 0.0
            return max(0.0, self._pace_t - time.perf_counter())

    def delivered(self) -> None:
        """Everything handed over so far was acknowledged by the server (the connect-time probe waits for
        that): the link carries none of it, so :attr:`busy` need not wait ``quiet_s`` for it (a client
        whose plans stay local suspends its session at once, as after a probe on its own gRPC call)."""
        with self._cv:
            if not self._heap and not self._wheap and self._side_block is None:
                now = time.perf_counter()
                self.last_data_t = min(self.last_data_t, now - self.quiet_s)
                self.last_weight_t = min(self.last_weight_t, now - self.quiet_s)
                self._pace_t = min(self._pace_t, now)

    def side_written(self, nbytes: int) -> None:
        """The data channel's sender handed the current block (``nbytes``) to its socket."""
        with self._cv:
            self.side_bytes += nbytes
            self._side_block = None
            self.last_data_t = self.last_weight_t = time.perf_counter()


    def _took(self, key: tuple, seq: int, it: UplinkItem, end: int, now: float, count_busy: bool = True) -> None:
        """``it`` was sent up to ``end``: requeue what is left, account the bytes."""
        if count_busy:
            self._busy_bytes += end - it.offset
        self._paced(end - it.offset, now, it.kind == "tensor")
        if it.first_sent is None:
            it.first_sent = now
        it.offset = end
        if end < it.total:
            heapq.heappush(self._heap, (key, seq, it))
        self.last_data_t = now


@dataclass
class Pending:
    """One request in flight: its output chunks as they arrive and its outcome.

    ``expected`` names the outputs the request may receive, ``name -> (dtype, shape, bytes)`` from the client's
    own capture of the split (``request.SplitRun.expected``): a chunk of any other output, or of another dtype,
    shape or size, is refused (``ProtocolError``) before a byte is allocated for it, so the server cannot make the
    UE allocate what it chooses, and output bytes count as progress only up to what the request truly has
    (:meth:`output_step`)."""

    request_id: int
    expected: Mapping[str, tuple[str, tuple[int, ...], int]]
    started: float = field(default_factory=time.perf_counter)
    buffers: dict[str, memoryview] = field(default_factory=dict)
    metas: dict[str, tuple[str, tuple[int, ...]]] = field(default_factory=dict)
    received: dict[str, int] = field(default_factory=dict)
    done: threading.Event = field(default_factory=threading.Event)
    result: wire.Done | None = None
    error: ServerError | None = None
    finished: float = 0.0
    ops_reported: int = 0
    """The most ops the server reported having run for it (a report never moves it back)."""
    input_reported: int = 0
    """The most bytes of its cut tensors the server reported having received."""
    inputs_queued: bool = False
    """Every cut tensor of the request is on the uplink queue (``RequestPath`` sets it once the UE's prefix
    ran): no more can become ready, so the uplink need not keep its chunks small for it
    (``UplinkQueue.tensors_expected``); the queued ones keep their priority."""

    def add(self, c: wire.OutputChunk) -> None:
        """Copy one output chunk in. Raises ``ProtocolError`` for an output not in ``expected``, another dtype,
        shape or total size than expected, or a chunk that does not continue where the last one ended."""
        if c.name not in self.buffers:
            want = self.expected.get(c.name)
            if want is None:
                raise ProtocolError(f"output {c.name!r} of request {c.request_id} is not an output of its slice "
                                    f"(expected {sorted(self.expected)[:3]})")
            if (c.dtype, tuple(c.shape), c.total_bytes) != want:
                raise ProtocolError(f"output {c.name!r} of request {c.request_id} is {list(c.shape)} {c.dtype} "
                                    f"({c.total_bytes} bytes); expected {list(want[1])} {want[0]} ({want[2]} bytes)")
            if c.offset != 0:
                raise ProtocolError(f"output {c.name!r} of request {c.request_id} starts at offset {c.offset}")
            self.buffers[c.name] = aligned_buffer(c.total_bytes)
            self.metas[c.name] = (c.dtype, c.shape)
            self.received[c.name] = 0
        got = self.received[c.name]
        if c.offset != got or (c.dtype, c.shape) != self.metas[c.name] or got + len(c.data) > c.total_bytes \
                or len(self.buffers[c.name]) != c.total_bytes:
            raise ProtocolError(f"output {c.name!r} of request {c.request_id}: chunk at {c.offset} "
                                f"does not continue at {got} of {c.total_bytes} bytes")
        self.buffers[c.name][got:got + len(c.data)] = c.data
        self.received[c.name] = got + len(c.data)

    def output_step(self) -> int:
        """How far its outputs arrived, in ``OUTPUT_STEPS`` steps of all the expected output bytes (0 when it
        expects none): the deadline counts a move of this, not every byte, as progress, so a server trickling
        bytes holds the request for at most ``OUTPUT_STEPS`` stall windows."""
        total = sum(n for *_, n in self.expected.values())
        return sum(self.received.values()) * OUTPUT_STEPS // total if total else 0

    def finish(self, result: wire.Done | None = None, error: ServerError | None = None) -> None:
        if self.done.is_set():
            return
        if result is not None:
            incomplete = [n for n in result.output_names
                          if n not in self.buffers or self.received[n] != len(self.buffers[n])]
            if incomplete:
                error, result = ProtocolError(f"request {self.request_id} done but outputs incomplete: "
                                              f"{incomplete[:3]}"), None
        self.result, self.error = result, error
        self.finished = time.perf_counter()
        self.done.set()


class SessionStream:
    """The Session bidi stream of one client: open, send with priority, receive, close.

    ``on_weight_ack(ack, t)`` and ``on_slice_ack(ack)`` run on the receiver thread. The server answers
    every DefineSlice, in order, with SliceDefined or SliceRejected: ``rejected`` maps the tag given to
    :meth:`define_slice` to the rejection, so a slice id reused for another split is never confused.
    """

    def __init__(self, stub, tenant: str, model_id: str, *, chunk_bytes: int = wire.MAX_CHUNK_BYTES,
                 open_timeout_s: float = 10.0, rate_bps: Callable[[], float | None] | None = None,
                 on_weight_ack: Callable[[wire.WeightAck, float], None] | None = None,
                 on_slice_ack: Callable[[wire.SliceAck], None] | None = None,
                 profile: wire.UeProfile | None = None, cell_uplink_mbps: float | None = None,
                 op_timings: bool = False):
        self.queue = UplinkQueue(chunk_bytes, rate_bps)
        self.cell_uplink_mbps = cell_uplink_mbps
        """The cell's uplink rate (Mbit/s goodput) the server's uplink shares divide; None: shares are
        recorded but not obeyed (no pacing to a share)."""
        self.uplink_share = 0.0
        """This session's share of the cell's uplink (0: none given)."""
        self.request_uplink_share = 0.0
        """The share its cut tensors of a request in flight are paced to (at least ``uplink_share``)."""
        self.share_log: collections.deque[tuple[float, float, float]] = collections.deque(maxlen=1024)
        """(perf_counter time, compute share, uplink share) each time the server set them (the last
        1024: a long session in a busy cell must not grow it without bound)."""
        self._lock = threading.Lock()
        self._pending: dict[int, Pending] = {}
        self.held: set[str] = set()
        self.ack_messages = 0
        """Weight acknowledgement messages received (one ``WeightAck`` or one batch ``WeightAcks`` each): each
        wakes this receiver and gRPC's threads on the UE."""
        self.slice_acks: dict[str, wire.SliceAck] = {}
        self.slice_ack_at: dict[str, float] = {}
        """slice id -> ``time.perf_counter()`` when its latest SliceDefined arrived (the server validated it)."""
        self.rejected: dict[object, wire.SliceRejected] = {}
        """Tag of a DefineSlice (see define_slice) -> the server's SliceRejected."""
        self.slice_answers: collections.deque[tuple[object, wire.SliceAck | wire.SliceRejected]] = \
            collections.deque(maxlen=1024)
        """(tag, SliceDefined or SliceRejected) of every answered DefineSlice, in order, for the caller's thread
        to drain (``RequestPath.sync_refusals``)."""
        self._unsolicited = 0
        """Weights in ``held`` that were never put on this session's uplink (written outside it: a test's or a
        benchmark's raw data-channel socket); at most ``MAX_UNSOLICITED_ACKS``."""
        self._slice_ids: set[str] = set()
        """Every slice id this session defined (the client reuses a bounded set of ids)."""
        self._defs: dict[str, collections.deque] = {}
        """slice id -> tags of its DefineSlices not answered yet, in order."""
        self._answer_cv = threading.Condition()
        """Notified by the receiver thread on every slice answer and when the session breaks
        (``wait_slice_answer``)."""
        self.broken: ServerError | None = None
        self.opened: wire.Opened | None = None
        self._opened_evt = threading.Event()
        self._on_weight_ack = on_weight_ack
        self._on_slice_ack = on_slice_ack
        self.share = 1.0
        self.data_sender = None
        """The data channel's sender (``ue_client.data_channel.DataSender``) once the connection started
        one; None: weights go in-stream."""
        me = weakref.ref(self)  # not ``self``: stream -> queue -> closure -> stream was a cycle (see RemoteEngine's)
        self.queue.tensors_expected = lambda: (s := me()) is not None and any(
            not p.inputs_queued for p in tuple(s._pending.values()))
        self.queue.put_control(wire.open_session(tenant, model_id, profile, op_timings=op_timings))
        retain_freed_buffers()
        self._call = wire.session_call(stub, self.queue.messages())
        self._rx = threading.Thread(target=self._receive, name="coinfer-session-rx", daemon=True)
        self._rx.start()
        if not self._opened_evt.wait(open_timeout_s):
            self.cancel()
            raise ServerUnavailable(f"no SessionOpened within {open_timeout_s:.0f} s")
        if self.opened is None:
            raise self.broken or ServerUnavailable("session closed before it opened")

    # ---- receiving ----------------------------------------------------------------------------
    def _receive(self) -> None:
        err: ServerError
        try:
            for r in self._call:
                ev = wire.decode_event(r)
                self._dispatch(ev)
            err = ServerUnavailable("the server ended the session")
        except grpc.RpcError as e:
            mapped = wire.map_rpc_error(e, "session stream")
            err = mapped if isinstance(mapped, ServerError) else ServerUnavailable(str(mapped))
            e.__traceback__ = None  # e is self._call: its traceback holds this frame (self), a cycle
        except ProtocolError as e:
            err = e.with_traceback(None)  # kept as self.broken: its traceback would hold self (a cycle)
            self._call.cancel()
        except Exception as e:  # a bug here must not hang callers waiting on a request
            log.exception("session receiver crashed")
            err = ServerUnavailable(f"session receiver crashed: {type(e).__name__}: {e}")
            self._call.cancel()
        self._break(err)

    def _dispatch(self, ev: wire.Event) -> None:
        """Apply one server event (receiver thread). What the server names is checked against what this session
        sent before it is kept: a slice answer only of a slice id defined on it, an acknowledgement of a weight never
        put on its uplink only up to ``MAX_UNSOLICITED_ACKS`` of them (else logged, ``wire.refused``, and dropped).
        Before session 25 every name was kept: 200,000 acks of weights never sent grew ``held`` by 66 MB, and slice
        answers under new ids grew ``slice_acks`` without bound (``tests/test_hostile_server25.py``)."""
        if isinstance(ev, wire.Opened):
            self.queue.configure(ev.limits.max_chunk_bytes, ev.limits.max_chunks_per_message)
            self.opened = ev
            self.share = ev.share
            self._set_uplink_share(ev.uplink_share, ev.request_uplink_share)
            self._opened_evt.set()
        elif isinstance(ev, wire.ShareChanged):
            self.share = ev.share or self.share
            self._set_uplink_share(ev.uplink_share or self.uplink_share, ev.request_uplink_share)
        elif isinstance(ev, wire.Unknown):
            log.debug("ignoring unknown session response %r", ev.kind)
        elif isinstance(ev, wire.WeightAck | wire.WeightAcks):
            self.ack_messages += 1
            t = time.perf_counter()
            queued = self.queue.weights_queued
            for ack in ev.acks if isinstance(ev, wire.WeightAcks) else (ev,):
                if ack.sha256 not in queued and ack.sha256 not in self.held:  # (see _dispatch)
                    if self._unsolicited >= MAX_UNSOLICITED_ACKS:
                        wire.refused("weight ack", "it acknowledged weight %.16s, never sent on this session (more "
                                     "than %d such)", ack.sha256, MAX_UNSOLICITED_ACKS)
                        continue
                    self._unsolicited += 1
                self.held.add(ack.sha256)
                if self._on_weight_ack is not None:
                    self._on_weight_ack(ack, t)
        elif isinstance(ev, wire.SliceAck | wire.SliceRejected) and ev.slice_id not in self._slice_ids:
            wire.refused("slice answer", "it answered slice %.40r, never defined on this session", ev.slice_id)
        elif isinstance(ev, wire.SliceAck):
            tag, latest = self._answered(ev.slice_id)
            if tag is not None:
                self.slice_answers.append((tag, ev))
            if latest:  # (an answer to a definition the id has since been given again describes another slice)
                self.slice_acks[ev.slice_id] = ev
                self.slice_ack_at[ev.slice_id] = time.perf_counter()
            self._notify_answer()
            if self._on_slice_ack is not None:
                self._on_slice_ack(ev)
        elif isinstance(ev, wire.SliceRejected):
            tag, _ = self._answered(ev.slice_id)
            log.warning("server rejected slice %r: code %s: %s", ev.slice_id, ev.code, ev.message)
            if tag is not None:
                self.rejected[tag] = ev
                self.slice_answers.append((tag, ev))
            self._notify_answer()
        elif isinstance(ev, wire.OutputChunk):
            p = self._pending.get(ev.request_id)
            if p is None:
                log.debug("dropping output chunk of abandoned request %d", ev.request_id)
                return
            try:
                p.add(ev)
            except ProtocolError as e:  # this request's answer is bad: it fails, not the session
                if self._pop(ev.request_id) is p:
                    p.finish(error=e)
        elif isinstance(ev, wire.Done):
            p = self._pop(ev.request_id)
            if p is not None:
                for c in ev.outputs:  # outputs inside the RequestDone (OpenSession.outputs_in_done)
                    try:
                        p.add(c)
                    except ProtocolError as e:  # this request's answer is bad: it fails, not the session
                        p.finish(error=e)
                        return
                p.finish(ev)
        elif isinstance(ev, wire.Progress):
            self._progress(ev)
        elif isinstance(ev, wire.Progresses):
            for one in ev.reports:
                self._progress(one)
        elif isinstance(ev, wire.Failed):
            p = self._pop(ev.request_id)
            if p is None:  # a request we abandoned (cancelled at its deadline)
                log.debug("failure of request %d not pending here: code %s: %s", ev.request_id, ev.code, ev.message)
            else:
                p.finish(error=RequestFailed(f"server: code {ev.code}: {ev.message}", ev.code, ev.message))

    def _progress(self, ev: wire.Progress) -> None:
        """The server's report of a request in flight: its counts for the request's deadline (never back)."""
        p = self._pending.get(ev.request_id)
        if p is not None:
            p.ops_reported = max(p.ops_reported, ev.ops_done)
            p.input_reported = max(p.input_reported, ev.input_bytes)

    def _set_uplink_share(self, share: float, request_share: float = 0.0) -> None:
        """Record the server's uplink share and, when the cell rate is known, pace to share x rate; cut
        tensors at ``request_share`` x rate where the server gives more for them (0: the same)."""
        self.uplink_share = share
        self.request_uplink_share = max(share, request_share)
        self.share_log.append((time.perf_counter(), self.share, share))
        if self.cell_uplink_mbps is not None and share > 0:
            cell = self.cell_uplink_mbps * 125_000.0
            self.queue.set_share_rate(share * cell, tensor_bps=self.request_uplink_share * cell)
            log.info("uplink paced to %.3f of %.1f Mbit/s (cut tensors %.3f)", share, self.cell_uplink_mbps,
                     self.request_uplink_share)

    @property
    def uplink_share_mbps(self) -> float | None:
        """The rate this session paces its uplink to (Mbit/s), None when it does not pace to a share."""
        bps = self.queue.share_bps
        return None if bps is None else bps / 125_000.0

    def _answered(self, slice_id: str) -> tuple[object, bool]:
        """(the tag of the oldest unanswered DefineSlice of ``slice_id`` or None, whether it was its latest)."""
        with self._lock:
            q = self._defs.get(slice_id)
            return (q.popleft(), not q) if q else (None, True)

    def _pop(self, rid: int) -> Pending | None:
        with self._lock:
            return self._pending.pop(rid, None)

    def _notify_answer(self) -> None:
        with self._answer_cv:
            self._answer_cv.notify_all()

    def wait_slice_answer(self, answered: Callable[[], bool], timeout_s: float) -> bool:
        """Block the caller until ``answered()`` is true (checked at every slice answer the receiver takes),
        the session breaks, or ``timeout_s`` (s) passes; returns ``answered()``. No polling: a 10 % UE pays
        for every wake-up."""
        with self._answer_cv:
            self._answer_cv.wait_for(lambda: answered() or self.broken is not None, timeout_s)
        return answered()

    def _break(self, err: ServerError) -> None:
        with self._lock:
            self.broken = err
            pending, self._pending = list(self._pending.values()), {}
        self._notify_answer()
        self._opened_evt.set()
        self.queue.close()
        for p in pending:
            p.finish(error=err)
        log.debug("session ended: %s", err)

    # ---- sending ------------------------------------------------------------------------------
    def define_slice(self, slice_id: str, spec_json: str, tag: object = None) -> None:
        """Send a DefineSlice; if the server rejects it, ``rejected[tag]`` gets the reason. A slice id defined again
        forgets its earlier answer (``slice_acks``, ``slice_ack_at``) until this one's comes: what the server lacked
        for another definition is not this one's (break25b F2: a request timing out in between re-sent by the old
        list, ``RequestPath``'s ``doubt``)."""
        with self._lock:
            self._slice_ids.add(slice_id)
            self.slice_acks.pop(slice_id, None)
            self.slice_ack_at.pop(slice_id, None)
            self._defs.setdefault(slice_id, collections.deque()).append(slice_id if tag is None else tag)
        self.queue.put_control(wire.define_slice(slice_id, spec_json))

    def inline_budget(self) -> int:
        """Bytes of cut tensors the next BeginRequest may carry (:meth:`begin`'s ``inputs``): 0 unless the
        server takes them (``Limits.inline_tensors``); else at most its ``max_chunk_bytes`` and
        :meth:`UplinkQueue.inline_bytes`."""
        o = self.opened
        if o is None or not o.limits.inline_tensors:
            return 0
        return min(o.limits.max_chunk_bytes, self.queue.inline_bytes())

    def inline_count(self) -> int:
        """How many cut tensors the next BeginRequest may carry: the server's ``Limits.max_chunks_per_message``
        (it refuses more, INVALID_ARGUMENT); 0 unless it takes inline tensors."""
        o = self.opened
        if o is None or not o.limits.inline_tensors:
            return 0
        return o.limits.max_chunks_per_message

    def begin(self, request_id: int, slice_id: str, input_names,
              inputs: list[tuple[str, str, tuple[int, ...], memoryview]] | None = None, *,
              outputs: Mapping[str, tuple[str, tuple[int, ...], int]]) -> Pending:
        """Send a BeginRequest; ``inputs``: whole cut tensors ``(name, dtype, shape, bytes)`` inside it
        (their bytes together within :meth:`inline_budget`; the caller sends the others as chunks).
        ``outputs``: the only outputs the request accepts, ``name -> (dtype, shape, bytes)`` (``Pending.expected``)."""
        p = Pending(request_id, outputs)
        with self._lock:
            if self.broken is not None:
                raise self.broken
            self._pending[request_id] = p
        nbytes = sum(d.nbytes for *_, d in inputs) if inputs else 0
        # the UE's float32 matmul precision at the call: its eager module computes under it, so the server does too
        self.queue.put_control(wire.begin_request(request_id, slice_id, input_names, inputs or (),
                                                  matmul_precision=torch.get_float32_matmul_precision()), nbytes)
        return p

    def update_profile(self, profile: wire.UeProfile) -> bool:
        """Tell the server's allocator this UE's new profile (``wire.update_profile``: empty / 0 fields
        keep what the session has), e.g. its send rate once measured. Returns False, sending nothing,
        when the session is not open yet or the server does not take profile updates
        (``Limits.profile_updates`` unset: an older server would end the session on the message)."""
        opened = self.opened
        if opened is None or not opened.limits.profile_updates:
            return False
        self.queue.put_control(wire.update_profile(profile))
        return True

    def cancel_request(self, request_id: int) -> None:
        """Abandon a request (deadline passed): drop its unsent tensor chunks, ask the server to stop it;
        late outputs are dropped on arrival."""
        self._pop(request_id)
        self.queue.drop(lambda it: it.kind == "tensor" and it.request_id == request_id)
        self.queue.put_control(wire.cancel_request(request_id))

    # ---- lifecycle ----------------------------------------------------------------------------
    @property
    def pending_requests(self) -> int:
        """Requests begun on this session and not answered yet."""
        with self._lock:
            return len(self._pending)

    @property
    def alive(self) -> bool:
        return self.broken is None

    def close(self, timeout_s: float = 5.0) -> None:
        """Half-close (the server ends the session after in-flight requests) and wait for the end."""
        self.queue.close()
        self._rx.join(timeout_s)
        if self._rx.is_alive():
            self.cancel()
            self._rx.join(1.0)
        if self.data_sender is not None:
            self.data_sender.join(1.0)

    def end(self) -> None:
        """Half-close without waiting: the server ends the session after in-flight requests, and the
        receiver thread (and the data channel's sender, which sees the queue closed) end by themselves."""
        self.queue.close()

    @property
    def receiving(self) -> bool:
        """The receiver thread still runs (the server has not ended the stream)."""
        return self._rx.is_alive()

    def cancel(self) -> None:
        self.queue.close()  # the data channel's sender stops too
        self._call.cancel()


class QueueWatch:
    """Keeps the network queue below the uplink short, by pinging on the session's own connection.

    A ping's round trip above the idle RTT is time it waited behind our data in buffers we cannot see
    (socket buffers, a relay, the HTTP/2 window). When that excess passes ``target_s`` the uplink is
    held until the queue drained back to about the target, so a cut tensor that jumps the priority
    queue does not wait behind seconds of weights already handed to the transport. Idle pings refresh
    the base RTT and feed the link estimate.
    """

    def __init__(self, ping: Callable[[], float], queue: UplinkQueue, base_rtt_s: float, *,
                 on_idle_rtt: Callable[[float], None] | None = None, target_s: float = 0.04,
                 period_s: float = 0.15, idle_period_s: float = 10.0,
                 socket_backlog_s: Callable[[], float | None] | None = None):
        self._ping = ping
        self._socket_backlog_s = socket_backlog_s
        """Seconds of link the data channel's socket holds beyond one bandwidth-delay product (its unacknowledged
        bytes: ``ue_client.backlog``), None while no data channel carries the weights. Where it answers, the busy
        period reads it instead of pinging: the bytes a cut tensor would wait behind, at no network or server cost
        (session 22, ``bench/bench_send_insitu.py``, googlenet 26.5 MB at 100 Mbit/s on a 10 % UE: the watch's
        pings every 150 ms took 9.1 ms of the upload's 48 ms of CPU, 0.34 ns/B, and gRPC's event engine more), and
        without reading a throttled UE's own CPU wait as queueing (beside a forward a ping waited 33-70 ms at
        the median with the link's queue empty: session 21), which would hold the weights back for nothing."""
        self.socket_reads = 0
        """Busy-period checks answered by ``socket_backlog_s`` (no ping)."""
        self._queue = queue
        self._idle: collections.deque[float] = collections.deque([base_rtt_s], maxlen=8)
        self._on_idle_rtt = on_idle_rtt
        self.target_s = target_s
        self.period_s = period_s
        self.idle_period_s = idle_period_s
        """Idle pings only refresh the base RTT; each costs CPU that a throttled UE's next local run
        needs (measured: pings every 2 s took 0.35 % of a core, 3.5 % of a 10 % quota)."""
        self._stop = threading.Event()
        self.deferred_s = 0.0
        self.max_excess_s = 0.0
        self._thread = threading.Thread(target=self._run, name="coinfer-queue-watch", daemon=True)
        self._thread.start()

    @property
    def base_rtt_s(self) -> float:
        return min(self._idle)

    def _sleep(self) -> bool:
        """Wait until the next ping is due; True when stopped. ``period_s`` while weights may be on the link; else
        ``idle_period_s``, cut short by weights queued meanwhile (``UplinkQueue.weights_put``): an upload that starts
        after an idle period is watched from ``period_s`` after it starts (before session 22 the watch slept out the
        rest of its 10 s idle period first: a stream's whole cold upload could go by unwatched)."""
        q = self._queue
        q.weights_put.clear()  # (cleared before reading ``weights_busy``: a weight queued after the read sets it)
        if not q.weights_busy and not q.weights_put.wait(self.idle_period_s):
            return self._stop.is_set()  # the idle period is over: an idle ping
        return self._stop.wait(self.period_s)

    def _run(self) -> None:
        # the busy period only while weights may be on the link: a stream of warm requests keeps ``busy`` (their cut
        # tensors stamp ``last_data_t``) and was pinged every ``period_s`` all along (session 21)
        while not self._sleep():
            busy, weights = self._queue.busy, self._queue.weights_busy
            if weights and self._socket_backlog_s is not None:
                try:
                    backlog = self._socket_backlog_s()
                except Exception:  # (a socket closed under it, a session torn down): ping this time
                    log.debug("queue watch: socket backlog unreadable", exc_info=True)
                    backlog = None
                if backlog is not None:
                    self.socket_reads += 1
                    self._hold_for(backlog)
                    continue
            try:
                rtt = self._ping()
            except ServerError:
                continue
            if not busy and not self._queue.busy:
                self._idle.append(rtt)
                if self._on_idle_rtt is not None:
                    self._on_idle_rtt(rtt * 1e3)
                continue
            if not (weights or self._queue.weights_busy):
                continue  # beside cut tensors only: no weights to hold back (a hold would delay the next tensors)
            self._hold_for(rtt - self.base_rtt_s)

    def _hold_for(self, excess: float) -> None:
        """``excess`` (s): the wait behind our data now; above ``target_s`` the uplink is held for the difference."""
        self.max_excess_s = max(self.max_excess_s, excess)
        if excess > self.target_s:
            hold = excess - self.target_s
            self.deferred_s += hold
            self._queue.defer(hold)

    def stop(self, wait: bool = True) -> None:
        """Stop pinging; ``wait``: until the thread ended (at most 2 s), else it ends after its current ping."""
        self._stop.set()
        self._queue.weights_put.set()  # (wakes the idle wait)
        if wait and threading.current_thread() is not self._thread:
            self._thread.join(2.0)
