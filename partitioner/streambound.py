"""A lower bound on a stream's total latency over the runtime's own strategy space (issue 12).

A UE serves ``K`` requests back to back on a cold server. Whatever it does, the model's weights for a
remote target have to cross the uplink once, its CPU budget is shared by its computing and its sending
(:mod:`partitioner.uecpu`), and a request cannot be faster than the target's warm latency. The strategies
(what ``auto`` can do, progressive offloading on one target):

- requests ``1 .. j-1`` run locally, and ``X`` bytes of the target's weights go up in the background
  while they run (``X = 0``: no background upload);
- request ``j`` is the first on the target (any one of ``targets``): it sends the ``W - X`` bytes left
  inside the request (parallel, need-ordered upload), then requests ``j+1 .. K`` are warm on it;
- or every request runs locally (``j = K + 1``).

Per request the model charges only what physics demands (every term is a lower bound of what the runtime
and :func:`partitioner.uecpu.run_shared` do):

- a local request that sends ``x`` bytes: ``max(l + c x, x / R)``: its compute ``l`` and the send CPU
  ``c`` per byte share one CPU budget, and the link carries at most ``R`` bytes per ms;
- the first remote request sending ``y > 0`` bytes: ``max(w, p + c y, y / R + rtt)``: no faster than warm,
  its UE compute ``p`` plus the send CPU, and the last weight byte has to reach the server and the answer
  come back (one round trip); ``y = 0``: ``w``;
- a warm request: ``w``.

``stream_bound`` minimises the sum over ``j``, the target and ``X`` exactly: for fixed ``j`` and target
the sum is convex and piecewise linear in ``X``, so its minimum is at an end or a kink of a piece
(the one discontinuity, the round trip that vanishes when ``X = W``, is evaluated on both sides).
Spreading ``X`` evenly over the local requests reaches ``max((j-1) l + c X, X / R)``, the least sum of
their latencies, so the bound is attained by a strategy of the model.

Not in the space (so not bounded by it): requests on intermediate splits while the upload goes on
(IONN's suffix pieces), switching targets within the stream, and idle time between requests.

With measured inputs (a cell's mean local latency, the least mean warm latency, the send CPU per byte)
the bound is of the means, not of one noisy run; ``send_ms_per_byte = 0`` and ``ue_ms = 0`` give a
weaker bound that still holds.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from partitioner.costgraph import CostGraphError

BYTES_PER_MS_PER_MBPS = 125.0
"""1 Mbit/s = 125,000 bytes/s = 125 bytes/ms."""


@dataclass(frozen=True)
class Target:
    """One remote split the stream may end on."""

    weight_bytes: float
    """W (bytes): the target's server weights the server does not hold at the stream's start."""
    warm_ms: float
    """w (ms): one request on the target once its weights are held."""
    ue_ms: float = 0.0
    """p (ms of the UE's CPU budget): what one request on the target computes on the UE (0: always a bound)."""


@dataclass(frozen=True)
class StreamBound:
    """The least stream total of the model and the strategy that reaches it."""

    total_ms: float
    """Sum of the K latencies (ms)."""
    requests: int
    first_remote: int | None
    """1-based index of the first request on the target (None: every request local)."""
    target: int | None
    """Index into ``targets`` of the target (None: every request local)."""
    prefetch_bytes: float
    """Bytes of the target's weights sent during the local requests before ``first_remote``."""
    per_request_ms: tuple[float, ...]

    @property
    def mean_ms(self) -> float:
        return self.total_ms / self.requests


def local_ms_with_upload(local_ms: float, x: float, rate: float, send_ms_per_byte: float) -> float:
    """Least latency (ms) of a local request of ``local_ms`` that also sends ``x`` bytes at most ``rate``
    bytes/ms at ``send_ms_per_byte`` ms of the UE's CPU budget per byte."""
    return max(local_ms + send_ms_per_byte * x, x / rate)


def first_remote_ms(t: Target, y: float, rate: float, send_ms_per_byte: float, rtt_ms: float) -> float:
    """Least latency (ms) of the first request on ``t`` that sends the ``y`` bytes of weights left."""
    if y <= 0:
        return t.warm_ms
    return max(t.warm_ms, t.ue_ms + send_ms_per_byte * y, y / rate + rtt_ms)


def _check(name: str, v: float, positive: bool = False) -> None:
    if not isinstance(v, int | float) or math.isnan(v) or math.isinf(v) or v < 0 or (positive and v == 0):
        raise CostGraphError(f"{name} must be a finite number {'> 0' if positive else '>= 0'}, got {v!r}")


def stream_bound(requests: int, local_ms: float, targets: Sequence[Target], uplink_mbps: float, rtt_ms: float,
                 send_ms_per_byte: float = 0.0) -> StreamBound:
    """The least total latency (ms) of ``requests`` back-to-back requests over the strategies of the module
    docstring.

    ``local_ms``: l, one local request (ms, the UE's whole CPU budget); ``targets``: the remote splits the
    stream may end on; ``uplink_mbps``: R; ``rtt_ms``: the round trip; ``send_ms_per_byte``: c, ms of the
    UE's CPU budget per byte sent (CPU ms per byte / the share of a core it has). Raises
    ``CostGraphError`` on a request count below 1 or a negative, NaN or infinite number."""
    if not isinstance(requests, int) or requests < 1:
        raise CostGraphError(f"requests must be an integer >= 1, got {requests!r}")
    _check("local_ms", local_ms)
    _check("uplink_mbps", uplink_mbps, positive=True)
    _check("rtt_ms", rtt_ms)
    _check("send_ms_per_byte", send_ms_per_byte)
    for t in targets:
        _check("weight_bytes", t.weight_bytes)
        _check("warm_ms", t.warm_ms)
        _check("ue_ms", t.ue_ms)
    K, ell, c = requests, float(local_ms), float(send_ms_per_byte)
    R = uplink_mbps * BYTES_PER_MS_PER_MBPS
    best = StreamBound(K * ell, K, None, None, 0.0, (ell,) * K)
    for ti, t in enumerate(targets):
        W, w = float(t.weight_bytes), float(t.warm_ms)
        for j in range(1, K + 1):
            n_loc = j - 1
            base = (K - j) * w
            tot, X = min((_strategy_total(n_loc, ell, t, X, R, c, rtt_ms, base), X)
                         for X in _kinks(n_loc, ell, t, R, c, rtt_ms))
            if tot < best.total_ms - 1e-9:
                y = W - X
                per = [local_ms_with_upload(ell, X / n_loc, R, c)] * n_loc if n_loc else []
                per.append(first_remote_ms(t, y, R, c, rtt_ms))
                per += [w] * (K - j)
                best = StreamBound(tot, K, j, ti, X, tuple(per))
    return best


def _strategy_total(n_loc: int, ell: float, t: Target, X: float, R: float, c: float, rtt_ms: float,
                    warm_after_ms: float) -> float:
    """The model's stream total: ``n_loc`` local requests sending ``X`` bytes, the first remote request, then
    ``warm_after_ms`` of warm requests."""
    pre = local_ms_with_upload(n_loc * ell, X, R, c) if n_loc else 0.0
    return pre + first_remote_ms(t, t.weight_bytes - X, R, c, rtt_ms) + warm_after_ms


def _kinks(n_loc: int, ell: float, t: Target, R: float, c: float, rtt_ms: float) -> list[float]:
    """The prefetch amounts X where the minimum of ``_strategy_total`` over [0, W] lies: the ends and the
    kinks (the local phase turns link-bound; the first remote request's pieces cross). On [0, W) the total is
    convex and piecewise linear; at X = W the round trip goes (not above the limit from below)."""
    W, w = float(t.weight_bytes), float(t.warm_ms)
    if not n_loc or W <= 0:
        return [0.0]
    xs = [0.0, W]
    if c < 1.0 / R:
        xs.append(n_loc * ell / (1.0 / R - c))
    ys = [(w - rtt_ms) * R]
    if c > 0:
        ys.append((w - t.ue_ms) / c)
    if c != 1.0 / R:
        ys.append((rtt_ms - t.ue_ms) / (c - 1.0 / R))
    xs += [W - y for y in ys]
    return [min(W, max(0.0, x)) for x in xs]
