"""The uplink's backlog at a request's start: bytes handed to the link that it has not carried yet.

A local prefetch request (``planning`` ``prefetch``) hands the warm target's weights to the uplink while it
computes; when it ends, what it handed over is not all across the link: the pacing lets the queue run up to
``UplinkQueue.ahead_s`` plus one data-channel block ahead of the link (while no request is in flight a block
is ``session.SIDE_IDLE_CHUNK_S`` = 100 ms of it), and the bottleneck's own queue holds what the socket sent.
The planner counts those bytes as delivered (``ServerState.in_flight`` holds what is still to be handed
over), so the next request's input and weights wait behind them unpredicted: stream20 measured the cold
request after a prefetch 70-74 ms over its prediction at 10 % UE / 400 Mbit/s
(``docs/results/stream/session20/results.md``, cause 2).

:func:`backlog_ms` is that wait in link time, the larger of two readings, each blind where the other sees: the
data channel socket's own counter (``SIOCOUTQ``: bytes written and not yet acknowledged by the peer's TCP,
``DataSender.unacked_bytes``) less one bandwidth-delay product (bytes in propagation have passed the
bottleneck: they delay nothing sent after them), which cannot see past a proxy that acknowledges at once (the
testbed's userspace delay relay in the UE's namespace, a relay in front of the server); and the queue's pacing
clock (``UplinkQueue.paced_backlog_s``: the virtual time at which the link finishes what was handed over, at
the estimated rate), which cannot see a link slower than its estimate. In session 20's first A/B run through
the testbed's relay the socket counter read 0 at every split request.
:func:`with_backlog` adds it to a split plan's prediction (``UplinkBacklog.charge``, at the client's requests): the
whole backlog when the plan uploads weights (its upload starts behind it), else what is left of it when the UE's
prefix ends and its cut tensor is ready (the backlog drains while the prefix runs).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from ue_client import planning

if TYPE_CHECKING:
    from ue_client.connection import Connection
    from ue_client.probing import LinkProbe

MIN_BACKLOG_MS = 0.5
"""A backlog below this (ms of link) is not counted (the prediction is not changed for it)."""


def backlog_ms(*, socket_bytes: int | None, paced_s: float, uplink_mbps: float, rtt_ms: float) -> float:
    """Link time (ms, >= 0) of the uplink's backlog.

    ``socket_bytes``: the data channel socket's unacknowledged + unsent bytes (None: no data channel, or
    not measurable); ``paced_s``: the uplink queue's pacing clock ahead of now (s, the fallback);
    ``uplink_mbps`` (> 0): the link estimate; ``rtt_ms`` (>= 0): its round trip. The backlog is
    ``max(max(0, socket_bytes - rate x rtt) / rate, paced_s)`` (without ``socket_bytes`` the second term
    alone), clamped at 0. Raises ValueError for a non-positive rate or a negative rtt."""
    if not uplink_mbps > 0:
        raise ValueError(f"uplink_mbps must be > 0, got {uplink_mbps!r}")
    if not rtt_ms >= 0:
        raise ValueError(f"rtt_ms must be >= 0, got {rtt_ms!r}")
    rate = uplink_mbps * 125.0  # bytes per ms
    paced = max(0.0, paced_s) * 1e3
    if socket_bytes is None:
        return paced
    return max(paced, max(0.0, socket_bytes - rate * rtt_ms) / rate)


def added_ms(choice: planning.PlanChoice, backlog: float, uploads: bool) -> float:
    """What a backlog of ``backlog`` ms adds to ``choice``'s latency (ms): 0 for a local plan; the whole
    backlog when the plan uploads weights (``uploads``: its first weight bytes go behind it), else the
    backlog left when its UE part ends (``details["ue_finish_ms"]``, the simulator's UE finish: its cut
    tensor is ready then)."""
    if not choice.server_ops or backlog < MIN_BACKLOG_MS:
        return 0.0
    if uploads:
        return backlog
    return max(0.0, backlog - float(choice.details.get("ue_finish_ms", 0.0)))


def with_backlog(choice: planning.PlanChoice, backlog: float, uploads: bool) -> planning.PlanChoice:
    """``choice`` with its prediction (``predicted_ms``, ``serial_ms``, ``details["mean_ms"]``) raised by
    :func:`added_ms`, the backlog and what it added in ``details["backlog_ms"]`` / ``["backlog_added_ms"]``;
    ``choice`` itself when nothing is added. ``warm_ms`` (a later request's) is not changed."""
    add = added_ms(choice, backlog, uploads)
    if add <= 0.0:
        return choice
    d = choice.details
    details = {**d, "backlog_ms": backlog, "backlog_added_ms": add,
               "mean_ms": d.get("mean_ms", choice.predicted_ms) + add}
    return planning.evolve(choice, predicted_ms=choice.predicted_ms + add, serial_ms=choice.serial_ms + add,
                           details=details)


class UplinkBacklog:
    """Reads the open session's uplink backlog at the planning link: for a split plan's prediction at a request's
    start (``charge``, the caller's thread) and for the queue watch (``socket_s``, its thread)."""

    def __init__(self, conn: Connection, probe: LinkProbe):
        self.conn = conn
        self.probe = probe

    def charge(self, choice: planning.PlanChoice, weights) -> tuple[planning.PlanChoice, float]:
        """(``choice`` with the backlog now added to its prediction, :func:`with_backlog`; the backlog, ms): the
        whole backlog when the plan puts weights (of ``weights``, the split graph's) on the uplink in its
        request; a local plan as it is, with nothing read."""
        backlog = self.ms() if choice.server_ops else 0.0
        if backlog:
            uploads = bool(choice.invest or any(w in weights for w in choice.upload_order))
            choice = with_backlog(choice, backlog, uploads)
        return choice, backlog

    def ms(self) -> float:
        """The uplink's backlog now (ms of link, :func:`backlog_ms`): the larger of what the data channel's socket
        holds unacknowledged beyond one bandwidth-delay product and the queue's pacing clock ahead of now; 0 when
        no weight bytes were handed over within the queue's ``quiet_s`` (not read then: the previous requests'
        cut tensors were delivered before their answers came, ``UplinkQueue.last_weight_t``; a steady split run
        reads nothing inside its plan window, where the read was ~0.04 ms of CPU)."""
        sess = self.conn.session
        if sess is None:
            return 0.0
        q = sess.queue
        if time.perf_counter() - q.last_weight_t > q.quiet_s:
            return 0.0
        ds = sess.data_sender
        link = self.probe.planning_link()
        return backlog_ms(socket_bytes=None if ds is None else ds.unacked_bytes(), paced_s=q.paced_backlog_s(),
                          uplink_mbps=link.uplink_mbps, rtt_ms=link.rtt_ms)

    def socket_s(self) -> float | None:
        """Seconds of link the data channel's socket holds beyond one bandwidth-delay product (:func:`backlog_ms`'s
        socket term at the planning link), None while no data channel is active or its counter cannot be read: the
        queue watch's reading (``session.QueueWatch``; its thread calls it)."""
        sess = self.conn.session
        ds = None if sess is None else sess.data_sender
        if ds is None or not ds.active:
            return None
        n = ds.unacked_bytes()
        if n is None:
            return None
        link = self.probe.planning_link()
        return backlog_ms(socket_bytes=n, paced_s=0.0, uplink_mbps=link.uplink_mbps, rtt_ms=link.rtt_ms) / 1e3
