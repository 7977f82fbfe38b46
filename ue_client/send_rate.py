"""The send rate a UE tells the server's allocator (``UeProfile.send_mbps``: ARA caps the UE's uplink share
at it), and when to tell it again.

Why a class of its own: the rate comes from two sources (the connect-time probe's CPU-bound rate, then the
goodput of the latest sender-bound upload) and every update re-plans the whole cell's allocation, so it is
re-sent only when it moved; the device runtime (``RemoteEngine``) only asks for it at OpenSession and after
each request."""

from __future__ import annotations

import collections
import logging
import time
from collections.abc import Callable

from ue_client import wire

log = logging.getLogger(__name__)

SEND_UPDATE_MARGIN = 0.05
"""A measured send rate is sent to the server only when it differs from the reported one by more than
this (relative): every update re-plans the cell's allocation."""

SEND_UPDATE_MIN_S = 1.0
"""After an update, the next one on the same session waits this long (s) unless the rate moved by more than
``SEND_UPDATE_JUMP``: the probe's CPU-bound rate takes a passive sample from every warm request (its CPU per
byte sent), which moved it by more than 5 % on 19 of 50 warm resnet18 requests on loopback, each one more
uplink message and a re-plan of the whole cell (``bench/bench_ue_request_cpu.py``, session 10)."""
SEND_UPDATE_JUMP = 0.25
"""A rate that moved by more than this (relative) since the last update is sent at once."""


class SendRateReport:
    """This UE's send rate for the allocator, and what it last reported on which session.

    ``probe``: the ``LinkProbe`` (its ``ue_cpu().rate_mbps``); ``take_sample()``: the latest sender-bound
    upload's sample since the last call, or None (``UploadScheduler.take_send_sample`` of the runtime's
    current scheduler). Used under the device runtime's request lock."""

    def __init__(self, probe, take_sample: Callable[[], dict | None]) -> None:
        self.probe = probe
        self.take_sample = take_sample
        self.sustained_mbps: float | None = None
        """The goodput of the latest sender-bound upload (Mbit/s), None before one."""
        self._reported: tuple[object, float] = (None, 0.0)
        """(session, the send rate reported on it, Mbit/s)."""
        self._reported_at = 0.0
        """``time.monotonic()`` of the last update sent (``SEND_UPDATE_MIN_S``)."""
        self.log: collections.deque[tuple[float, float, str]] = collections.deque(maxlen=256)
        """(time.time(), send rate, "probe" / "sustained") each time one was sent to the server (the last 256)."""

    def rate_mbps(self) -> float:
        """The most this UE can send (Mbit/s): the goodput of its latest sender-bound upload
        (``UploadScheduler.take_send_sample``: the rate it sustained when it could not keep its pace) once it
        had one, else its CPU-bound send rate from the probe (``UeCpu.rate_mbps``); 0 when unknown (before
        the probe measured it, or not modelled) or not limited."""
        if self.sustained_mbps is not None:
            return self.sustained_mbps
        cpu = self.probe.ue_cpu()
        rate = cpu.rate_mbps if cpu is not None else 0.0
        return rate if 0 < rate < float("inf") else 0.0

    def source(self) -> str:
        return "sustained" if self.sustained_mbps is not None else "probe"

    def opened(self, sess, send: float) -> None:
        """``sess`` was opened with a profile carrying ``send`` (Mbit/s; 0: none)."""
        self._reported = (sess, send)
        self._reported_at = time.monotonic()
        if send > 0:
            self.log.append((time.time(), send, self.source()))

    def report(self, sess, margin: float = SEND_UPDATE_MARGIN) -> bool:
        """Take the latest sender-bound upload's rate (if any) and tell the allocator on ``sess`` (None: no
        session, nothing sent) the send rate when it differs from the one reported on that session by more
        than ``margin`` (relative), and either ``SEND_UPDATE_MIN_S`` passed since the last update or it
        differs by more than ``SEND_UPDATE_JUMP``, or it is a new sustained-goodput sample. Returns whether
        an update was sent."""
        sample = self.take_sample()
        if sample is not None:
            self.sustained_mbps = sample["mbps"]
            log.info("sustained send rate %.2f Mbit/s (%.2f s paced at %.2f, handed over at %.2f)", sample["mbps"],
                     sample["seconds"], sample["pace_mbps"], sample["handover_mbps"])
        send = self.rate_mbps()
        if sess is None or send <= 0:
            return False
        old = self._reported[1] if self._reported[0] is sess else 0.0
        if old > 0 and abs(send - old) <= margin * old:
            return False
        now = time.monotonic()
        if (old > 0 and sample is None and abs(send - old) <= SEND_UPDATE_JUMP * old
                and now - self._reported_at < SEND_UPDATE_MIN_S):
            return False  # a small move of the passive estimate, soon after the last update: later
        if not sess.update_profile(wire.UeProfile("", 0.0, weight=0.0, send_mbps=send)):
            return False
        self._reported = (sess, send)
        self._reported_at = now
        self.log.append((time.time(), send, self.source()))
        log.info("send rate %.2f Mbit/s (%s) reported to the allocator", send, self.source())
        return True
