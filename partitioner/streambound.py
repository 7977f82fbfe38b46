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

Not in this space (so not bounded by it): requests on intermediate splits while the upload goes on
(IONN's suffix pieces), switching targets within the stream, and idle time between requests. The gradual
space (intermediate splits once their weights are up, then the target: IONN's strategy and ``auto``'s gradual
plans) has its own, relaxed bound, :func:`gradual_bound`; the least of the two bounds both spaces.

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


def gradual_bound(requests: int, local_ms: float, final: Target, intermediates: Sequence[Target], uplink_mbps: float,
                  rtt_ms: float, max_levels: int = 6) -> StreamBound:
    """A lower bound on the stream total (ms) of gradual offloading (IONN's strategy; ``auto``'s gradual plans,
    ``ue_client.planning._gradual_best``): the target's weights go up in one order from the stream's start, and
    a request may run on an intermediate split once the bytes it needs are up (``intermediates``: each
    ``weight_bytes`` = the bytes of that order before its split is complete, ``warm_ms`` its latency; the
    order's bytes of ``final`` in ``final.weight_bytes``), locally (``local_ms``; a local request may last
    longer, its upload outlasting the run, as in :func:`stream_bound`), or on ``final``; the first request on
    ``final`` may send what is left inside it (no faster than ``final.warm_ms`` nor than those bytes at
    ``uplink_mbps`` plus ``rtt_ms``, the round trip counted at most at ``final.warm_ms``).

    Relaxed to stay a bound: the uplink carries the order at the full rate R from time 0 whatever the requests
    do, and sending costs the UE no CPU; so the bytes up when request i starts are at most R x (the latencies
    before it). The single-target strategies of :func:`stream_bound` are in this space and the relaxation
    charges them no more (tested: without intermediates it is at most ``stream_bound``), so it bounds both.
    A stream is then a count of requests per level (local, each intermediate, the target) and the place of
    the target's first request: in any feasible order, the other requests ordered by level (local first) with
    the target's requests as one block where its first one was is feasible too (each request starts no earlier
    than a needier one would; the target's later requests cost ``final.warm_ms`` wherever they run: an
    exchange argument) and has the same total, so the minimum over counts and block places, each checked in
    that order, is the relaxed optimum (tests/test_gradual.py checks it against every order by brute force).
    ``max_levels``: at most that many intermediates are used (the fastest; the bound is then one of the
    strategies over those levels; the enumeration is C(K + levels, levels) x K). Not covered: a request on an
    intermediate split whose weights are not all up yet (it would upload them inside it), idle time between
    requests other than a local request's, another order of the weights. Raises ``CostGraphError`` as
    :func:`stream_bound`."""
    if not isinstance(requests, int) or requests < 1:
        raise CostGraphError(f"requests must be an integer >= 1, got {requests!r}")
    _check("local_ms", local_ms)
    _check("uplink_mbps", uplink_mbps, positive=True)
    _check("rtt_ms", rtt_ms)
    for t in (final, *intermediates):
        _check("weight_bytes", t.weight_bytes)
        _check("warm_ms", t.warm_ms)
    K, ell = requests, float(local_ms)
    R = uplink_mbps * BYTES_PER_MS_PER_MBPS
    W, w = float(final.weight_bytes), float(final.warm_ms)
    # (a slower level can pay too: it passes the time the next level's bytes need)
    kept = sorted((float(t.weight_bytes), float(t.warm_ms)) for t in intermediates)
    if len(kept) > max_levels:  # the fastest ones (a bound of the strategies over the kept levels)
        kept = sorted(sorted(kept, key=lambda e: e[1])[:max_levels])
    levels = [(0.0, ell), *kept]
    best = StreamBound(K * ell, K, None, None, 0.0, (ell,) * K)

    def counts(u: int, left: int):
        if u == len(levels):
            yield ()
            return
        for c in range(left + 1):
            for rest in counts(u + 1, left - c):
                yield (c, *rest)

    cut = W / R + min(rtt_ms, w)

    def first_ms(tau: float) -> float:
        """The target's first request starting at ``tau`` (the relaxation of the module's ``first_remote_ms``:
        the round trip counted at most at w, so that starting later never shortens the stream)."""
        return max(w, cut - tau)

    for cs in counts(0, K):
        n_loc = cs[0]
        seq = [lat for (_, lat), c in zip(levels, cs, strict=True) for _ in range(c)]
        need = [b / R for (b, _), c in zip(levels, cs, strict=True) for _ in range(c)]  # ms of upload first
        n_t = K - len(seq)
        pre = [0.0]
        for lat in seq:
            pre.append(pre[-1] + lat)
        # the target's requests as one block before request p of the others (None: no target request); the
        # local requests (first of the others) may last longer than ``local_ms`` (their upload outlasting the
        # run, as in ``stream_bound``): by the least stretch d after the last of them that puts every later
        # request's bytes up (starting later never shortens the stream, so the least is the best)
        for p in ([None] if not n_t else range(len(seq) + 1)):
            block_after = p is not None and p >= n_loc  # the stretch delays the block too
            d = 0.0
            ok = True
            for i in range(n_loc, len(seq)):
                if p is not None and i >= p:
                    if block_after:  # start = pre_i + (n_t - 1) w + max(d + w, cut - pre_p)
                        a = pre[i] + (n_t - 1) * w
                        if a + cut - pre[p] < need[i]:
                            d = max(d, need[i] - a - w)
                    else:
                        a = pre[i] + first_ms(pre[p]) + (n_t - 1) * w
                        d = max(d, need[i] - a)
                else:
                    d = max(d, need[i] - pre[i])
            if d > 0 and n_loc == 0:
                ok = False
            if not ok:
                continue
            first = 0.0 if p is None else first_ms(pre[p] + (d if block_after else 0.0))
            total = pre[-1] + d + (first + (n_t - 1) * w if p is not None else 0.0)
            if total < best.total_ms - 1e-9:
                per = list(seq)
                if d:
                    per[n_loc - 1] += d
                if p is not None:
                    per[p:p] = [first] + [w] * (n_t - 1)
                up = 0.0 if p is None else min(W, R * (pre[p] + (d if block_after else 0.0)))
                best = StreamBound(total, K, None if p is None else p + 1, None if p is None else 0, up, tuple(per))
    return best
