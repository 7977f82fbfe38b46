"""Link estimates: RTT and up/downlink rates, refined passively from every real transfer.

An exponentially weighted moving average per quantity; transfers too small to say anything about
bandwidth (dominated by latency) only update the RTT side.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

from partitioner import Link

MIN_RATE_SAMPLE_BYTES = 64 << 10


@dataclass
class _Ewma:
    alpha: float
    value: float | None = None
    samples: int = 0

    def add(self, x: float) -> None:
        self.value = x if self.value is None else (1 - self.alpha) * self.value + self.alpha * x
        self.samples += 1


class LinkEstimator:
    """Thread-safe moving estimate of a UE's link; ``link()`` gives the partitioner's view."""

    def __init__(self, *, uplink_mbps: float | None = None, downlink_mbps: float | None = None,
                 rtt_ms: float | None = None, alpha: float = 0.3):
        self._lock = threading.Lock()
        self._up = _Ewma(alpha, uplink_mbps)
        self._down = _Ewma(alpha, downlink_mbps)
        self._rtt = _Ewma(alpha, rtt_ms)
        self._planned: Link | None = None

    def observe_rtt(self, ms: float) -> None:
        if ms >= 0:
            with self._lock:
                self._rtt.add(ms)

    def observe_upload(self, nbytes: int, seconds: float, *, includes_rtt: bool = False) -> None:
        self._observe(self._up, nbytes, seconds, includes_rtt)

    def observe_download(self, nbytes: int, seconds: float, *, includes_rtt: bool = False) -> None:
        self._observe(self._down, nbytes, seconds, includes_rtt)

    def _observe(self, ewma: _Ewma, nbytes: int, seconds: float, includes_rtt: bool) -> None:
        if nbytes < MIN_RATE_SAMPLE_BYTES or seconds <= 0:
            return
        with self._lock:
            if includes_rtt and self._rtt.value is not None:
                seconds -= self._rtt.value / 1e3
            if seconds <= 0:
                return
            ewma.add(nbytes * 8 / seconds / 1e6)

    def link(self, default_mbps: float = 100.0, default_rtt_ms: float = 1.0) -> Link:
        with self._lock:
            up = self._up.value or default_mbps
            down = self._down.value or up
            rtt = self._rtt.value if self._rtt.value is not None else default_rtt_ms
        return Link(uplink_mbps=up, downlink_mbps=down, rtt_ms=rtt)

    def moved(self, rel: float = 0.25) -> bool:
        """True when the estimate moved by more than ``rel`` since the last ``mark_planned``: re-plan."""
        cur = self.link()
        last = self._planned
        if last is None:
            return True
        def far(a: float, b: float) -> bool:
            return abs(a - b) > rel * max(abs(b), 1e-9)
        rtt_moved = far(cur.rtt_ms, last.rtt_ms) and abs(cur.rtt_ms - last.rtt_ms) > 2
        return far(cur.uplink_mbps, last.uplink_mbps) or rtt_moved

    def mark_planned(self) -> Link:
        self._planned = self.link()
        return self._planned
