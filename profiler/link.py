"""Link estimates: RTT and up/downlink rates, refined passively from every real transfer.

An exponentially weighted moving average per quantity; transfers too small to say anything about
bandwidth (dominated by latency) only update the RTT side. Rates are averaged as time per bit (the
estimate is the EWMA's harmonic mean of the rate samples): the planner predicts a transfer's time as
bytes / rate, and on a link whose rate varies the mean of that time is bytes x E[1 / R], which the
arithmetic mean of the rates under-predicts (Jensen's inequality: a link alternating 40 and 10 Mbit/s
moves 200 KB in 100 ms on average, not the 64 ms of 25 Mbit/s).
"""

from __future__ import annotations

import math
import statistics
import threading
from collections import deque
from dataclasses import dataclass

from partitioner import Link

MIN_RATE_SAMPLE_BYTES = 64 << 10
RATE_WINDOW = 32
"""Recent uplink rate samples kept for the rate's spread (``LinkEstimator.uplink_cv``)."""
MIN_CV_SAMPLES = 4


def relative_spread(xs, min_samples: int = MIN_CV_SAMPLES) -> float | None:
    """Coefficient of variation (sample std / mean, unitless) of the samples ``xs``; None with fewer than
    ``min_samples`` (at least 2) of them or a mean <= 0. The one estimator of every recent-sample window
    the UE keeps (the uplink rate's here, the UE run time's in ``ue_client.calibration.CostModel.ue_cv``)."""
    xs = list(xs)
    if len(xs) < max(2, min_samples):
        return None
    m = statistics.fmean(xs)
    if not m > 0:
        return None
    # in floats: statistics.stdev sums exact fractions (~0.15 ms for 32 samples, on every UE request)
    return math.sqrt(sum((x - m) * (x - m) for x in xs) / (len(xs) - 1)) / m


def sample_std(xs, mean: float | None = None) -> float:
    """Sample standard deviation (n - 1) of at least two floats, in floating point (two passes; within a few
    ulps of ``statistics.stdev``, which sums exact fractions). ``mean``: the samples' mean when known."""
    n = len(xs)
    m = math.fsum(xs) / n if mean is None else mean
    return math.sqrt(sum((x - m) * (x - m) for x in xs) / (n - 1))


@dataclass
class _Ewma:
    alpha: float
    value: float | None = None
    samples: int = 0

    def add(self, x: float) -> None:
        self.value = x if self.value is None else (1 - self.alpha) * self.value + self.alpha * x
        self.samples += 1


class _RateEwma:
    """A rate (Mbit/s) averaged as its inverse (s per Mbit): ``value`` is the EWMA's harmonic mean of the
    samples, the rate whose bytes / rate is the mean transfer time (module docstring)."""

    def __init__(self, alpha: float, value: float | None = None):
        self._inv = _Ewma(alpha, None if value is None else 1.0 / value)

    @property
    def samples(self) -> int:
        return self._inv.samples

    @property
    def value(self) -> float | None:
        return None if self._inv.value is None else 1.0 / self._inv.value

    def add(self, x: float) -> None:
        self._inv.add(1.0 / x)


class LinkEstimator:
    """Thread-safe moving estimate of a UE's link; ``link()`` gives the partitioner's view."""

    def __init__(self, *, uplink_mbps: float | None = None, downlink_mbps: float | None = None,
                 rtt_ms: float | None = None, alpha: float = 0.3):
        self._lock = threading.Lock()
        self._up = _RateEwma(alpha, uplink_mbps)
        self._down = _RateEwma(alpha, downlink_mbps)
        self._rtt = _Ewma(alpha, rtt_ms)
        self._up_samples: deque[float] = deque(maxlen=RATE_WINDOW)
        self._last_link: tuple[tuple[float, float, float], Link] | None = None
        self.version = 0
        """Counts the uplink rate samples (any thread): ``uplink_cv()`` gives what it gave while it stays the
        same; ``link()``'s value says the rest (``ue_client.client.RemoteEngine.marks``, the background
        decision's exact key; RTT samples, which an idle session's queue watch takes every few ms, move only
        ``link()``, and not at all under an override of the RTT)."""

    def observe_rtt(self, ms: float) -> None:
        if ms >= 0:
            with self._lock:
                self._rtt.add(ms)

    def observe_upload(self, nbytes: int, seconds: float, *, includes_rtt: bool = False) -> None:
        x = self._observe(self._up, nbytes, seconds, includes_rtt)
        if x is not None:
            with self._lock:
                self._up_samples.append(x)
                self.version += 1

    def uplink_cv(self, min_samples: int = MIN_CV_SAMPLES) -> float | None:
        """The relative spread (sample std / mean, unitless) of the time per bit (1 / rate) over the last
        ``RATE_WINDOW`` uplink rate samples, or None with fewer than ``min_samples`` (>= 2) of them: a
        transfer of B bytes then takes B / R x (1 +- cv) with R the estimate (``link``), the spread the
        robust policy hedges against (``partitioner.robust``). For two rates seen equally often it equals
        the rates' own coefficient of variation."""
        with self._lock:
            xs = [1.0 / x for x in self._up_samples]
        return relative_spread(xs, min_samples)

    @property
    def uplink_samples(self) -> list[float]:
        """The recent uplink rate samples (Mbit/s), oldest first."""
        with self._lock:
            return list(self._up_samples)

    def observe_download(self, nbytes: int, seconds: float, *, includes_rtt: bool = False) -> None:
        self._observe(self._down, nbytes, seconds, includes_rtt)

    def _observe(self, ewma: _RateEwma, nbytes: int, seconds: float, includes_rtt: bool) -> float | None:
        """Add one rate sample (Mbit/s) and return it; None when the transfer says nothing about the rate."""
        if nbytes < MIN_RATE_SAMPLE_BYTES or seconds <= 0:
            return None
        with self._lock:
            if includes_rtt and self._rtt.value is not None:
                seconds -= self._rtt.value / 1e3
            if seconds <= 0:
                return None
            x = nbytes * 8 / seconds / 1e6
            ewma.add(x)
            return x

    def link(self, default_mbps: float = 100.0, default_rtt_ms: float = 1.0) -> Link:
        """The estimate as a ``Link`` (the same object while the estimate stays where it is: a ``Link`` is
        immutable, and the device runtime asks several times per request)."""
        with self._lock:
            up = self._up.value or default_mbps
            down = self._down.value or up
            rtt = self._rtt.value if self._rtt.value is not None else default_rtt_ms
        last = self._last_link
        if last is not None and last[0] == (up, down, rtt):
            return last[1]
        link = Link(uplink_mbps=up, downlink_mbps=down, rtt_ms=rtt)
        self._last_link = ((up, down, rtt), link)
        return link


# ---- the UE's CPU cost of sending ----------------------------------------------------------------------
_MEASURED_SHARE: list[float] = []


def _measured_share(spin_s: float = 0.3) -> float:
    """CPU share one busy thread gets (process CPU time / wall time over a short spin), once per process."""
    import time

    if not _MEASURED_SHARE:
        w, c = time.perf_counter(), time.process_time()
        while time.perf_counter() - w < spin_s:
            sum(range(1000))
        _MEASURED_SHARE.append((time.process_time() - c) / max(1e-9, time.perf_counter() - w))
    return _MEASURED_SHARE[0]


def cpu_capacity() -> float:
    """CPUs this process may use: its cgroup quota (own group or any ancestor, the smallest:
    ``profiler.device_info.cgroup_cpu_quota``), capped by the cores it may run on.

    Where the cgroup files are not visible (``ip netns exec`` remounts /sys without them) the share
    one busy thread gets is measured instead (a 0.3 s spin, once per process).
    """
    import os

    from profiler.device_info import cgroup_cpu_quota

    try:
        cores = float(len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        cores = float(os.cpu_count() or 1)
    quotas = [q for q in (cgroup_cpu_quota(),) if q is not None and q > 0]
    if not quotas and not (os.path.exists("/sys/fs/cgroup/cpu.max") or os.path.isdir("/sys/fs/cgroup/cpu")
                           or os.path.exists("/sys/fs/cgroup/cgroup.controllers")):
        share = _measured_share()
        if share < 0.9:
            quotas.append(share)
    return min([cores, *quotas])


class SendCpuEstimator:
    """CPU seconds this process spends per byte it sends (``time.process_time`` over uploads while nothing
    else runs), as a moving average, and the CPU budget it shares with the UE's computation."""

    MIN_SAMPLE_BYTES = 256 << 10

    def __init__(self, *, cpu_s_per_byte: float | None = None, capacity: float | None = None,
                 alpha: float = 0.3):
        self._lock = threading.Lock()
        self._est = _Ewma(alpha, cpu_s_per_byte)
        self.capacity = capacity
        self.version = 0
        """Counts the samples taken: ``ue_cpu()`` gives what it gave while it stays the same (and ``capacity``)."""

    def observe(self, nbytes: int, cpu_s: float) -> None:
        """One sample: ``nbytes`` (ignored under ``MIN_SAMPLE_BYTES``) sent for ``cpu_s`` CPU seconds. The first
        sample replaces a starting value (``seed`` or the constructor's ``cpu_s_per_byte``); later ones move the
        EWMA (``alpha``)."""
        if nbytes < self.MIN_SAMPLE_BYTES or cpu_s <= 0:
            return
        with self._lock:
            if self._est.samples == 0:
                self._est.value = None
            self._est.add(cpu_s / nbytes)
            self.version += 1

    def seed(self, cpu_s_per_byte: float) -> None:
        """Start from ``cpu_s_per_byte`` (a cost known beforehand, > 0 and finite) where nothing was measured
        yet; ``samples`` stays 0 and the first sample replaces it (then an EWMA of the samples). Why replace,
        not blend: the testbed's connect-time probe (~1 MiB sent alone) measured 6.2-11.7 ms of a 10 % UE's
        budget per MB between runs while the streams' own uploads (MBs, beside their requests) paid 7.0-10.0
        (docs/results/stream/session20), and a blend kept 70 % of the probe's error in the decision after
        the first upload (invest vs prefetch turned on 0.4 % margins there). Ignored once a sample was taken.
        Raises ValueError on a value that is not a finite number > 0."""
        if not (cpu_s_per_byte > 0 and math.isfinite(cpu_s_per_byte)):
            raise ValueError(f"a send cost must be a finite number of CPU s per byte > 0, got {cpu_s_per_byte!r}")
        with self._lock:
            if self._est.samples == 0:
                self._est.value = float(cpu_s_per_byte)
                self.version += 1

    @property
    def cpu_s_per_byte(self) -> float | None:
        return self._est.value

    @property
    def samples(self) -> int:
        return self._est.samples

    def ue_cpu(self, compute_threads: int = 1, *, shared: bool | None = None):
        """The partitioner's view (``partitioner.uecpu.UeCpu``), or None before any measurement.

        Wall ms per byte = CPU s per byte / min(capacity, 1) (one sender thread); sending shares the
        budget with computing when the capacity is below the compute threads + one core for the sender.
        """
        from partitioner.uecpu import UeCpu

        v = self.cpu_s_per_byte
        if v is None:
            return None
        if self.capacity is None:
            self.capacity = cpu_capacity()
        cap = self.capacity
        if shared is None:
            shared = cap < compute_threads + 1
        return UeCpu(send_ms_per_byte=v * 1e3 / max(1e-3, min(cap, 1.0)), shared=shared)
