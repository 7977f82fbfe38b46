"""The UE's CPU cost of sending: on a weak device every byte put on the uplink costs CPU time.

A Python gRPC client spends CPU per byte it sends (protobuf chunk copies, the sender thread, HTTP/2
framing): a few ns per byte on a desktop core, tens of ns of wall time on a device that may use a tenth
of a core. Two consequences the plain link model misses:

1. the UE cannot push bytes faster than its CPU budget allows: the uplink the planner may count on is
   ``min(link rate, CPU-bound send rate)`` (:func:`effective_link`);
2. when sending and computing draw on the same CPU budget (``shared``), bytes sent while the UE computes
   delay its computation: the parallel upload of MJOA no longer hides behind local compute.

:func:`simulate_cpu` models the UE's CPU budget and the link as two resources (:func:`run_shared`):

- the CPU budget (1 = all the CPU this UE may use) is shared by the compute of the UE's ops (op v needs
  ``a_v`` ms of it) and the sending (``s = send_ms_per_byte`` ms of it per byte); the link caps the
  byte rate at R (bytes/ms);
- while the UE computes and the uplink has a released item, the sender takes the CPU share it needs to
  drive the link, but at most ``SEND_SHARE`` (processor sharing between the compute thread and the
  sender: a fair half each when both want the whole CPU): byte rate ``beta = min(R, SEND_SHARE / s)``,
  and the compute advances at rate ``1 - beta * s``; so the prefix is slowed by exactly the CPU spent
  sending while it runs;
- while only one of them is active it has the whole budget: compute at rate 1, sending at
  ``min(R, 1 / s)`` (the effective uplink);
- everything else is the plain simulator's cold schedule, reused from :mod:`partitioner.simulate`: one
  uplink sending, among released items, the one the server needs earliest (preemptive; weights released
  at 0, cut tensors when their producer finishes), server op k starting when op k-1 finished and its
  tensors and weights arrived (last byte + L), latency = max(UE finish, server finish + L + results).

``serial`` uploads the weights first with the whole CPU (at the effective uplink), then runs the request
the same way. With a free CPU (``shared=False`` or ``send_ms_per_byte=0``) it is the plain simulator on
the effective uplink.

Consequences. Where the CPU-bound send rate is below the link rate (``R * s >= 1``), every byte costs
the same CPU whether it is sent during the prefix or after it, so a parallel upload gains at most the
server compute it overlaps with the rest of the upload: parallel ~ serial. With ``SEND_SHARE = 1/2`` the
cold result is then the same as charging the plain schedule's uplink time before the prefix ends to the
prefix (the shared schedule is the plain one on the effective uplink, run at half speed while both are
busy). Where the link is the bottleneck (``R * s < SEND_SHARE``), the prefix runs at ``1 - R * s`` of
its speed while the upload goes on, and an upload that outlasts the slowed prefix hides it completely.
In ``serial`` mode the cut tensors (and graph inputs) a DAG sends while the UE still computes slow it too.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Iterable
from dataclasses import dataclass

from partitioner.costgraph import CostGraph, CostGraphError, Link
from partitioner.prep import Prepared, prepare
from partitioner.simulate import (
    MODES,
    Rates,
    SimResult,
    _weights_needed,
    check_partition,
    run,
    serve,
    server_mask,
    uplink_items,
)
from partitioner.state import ServerState, Shares

SEND_SHARE = 0.5
"""The most CPU share the sender gets while the UE computes (processor sharing of two busy threads)."""


@dataclass(frozen=True)
class UeCpu:
    """What sending costs this UE."""

    send_ms_per_byte: float
    """UE wall-clock ms per byte sent on the CPU budget it has (CPU seconds per byte / CPUs it may use)."""
    shared: bool = True
    """Sending and computing share the CPU budget: bytes sent while the UE computes slow the computation."""
    send_ms_per_weight: float = 0.0
    """UE wall-clock ms per weight sent, on top of its bytes (each weight's messages, acknowledgement and
    bookkeeping), at the CPU budget it has. 0 where the per-byte cost was measured on a sample with the
    model's weights per byte (the client's probe, ``ue_client.probing.probe_weights``): it holds the per-weight
    cost at the model's mean. Charged by :func:`simulate_cpu` (and :func:`run_shared` when given) as an
    upload's per-weight cost spread over its bytes (:func:`weight_byte_cost`); the other planners' searches
    use ``send_ms_per_byte`` alone."""

    def __post_init__(self) -> None:
        for name in ("send_ms_per_byte", "send_ms_per_weight"):
            v = getattr(self, name)
            if not isinstance(v, int | float) or math.isnan(v) or v < 0 or math.isinf(v):
                raise CostGraphError(f"{name} must be a finite number >= 0, got {v!r}")

    @property
    def rate_mbps(self) -> float:
        """The CPU-bound send rate (inf when sending is free)."""
        return math.inf if self.send_ms_per_byte <= 0 else 1.0 / (self.send_ms_per_byte * 125.0)

    def send_ms(self, nbytes: float) -> float:
        """UE wall time spent sending ``nbytes``."""
        return nbytes * self.send_ms_per_byte

    def at_factor(self, factor: float) -> UeCpu:
        """The send cost with the UE's CPU ``factor`` times slower (a lower frequency or CPU quota: sending
        is CPU work like the UE's ops, so it scales by the same ``EnergyModel.time_factor``)."""
        return UeCpu(self.send_ms_per_byte * factor, self.shared, self.send_ms_per_weight * factor)

    def to_dict(self) -> dict:
        return {"send_ms_per_byte": self.send_ms_per_byte, "shared": self.shared, "rate_mbps": self.rate_mbps,
                "send_ms_per_weight": self.send_ms_per_weight}


def weight_byte_cost(send_ms_per_byte: float, send_ms_per_weight: float, weights: int, nbytes: float) -> float:
    """ms of the UE's CPU budget per byte of an upload of ``weights`` weights in ``nbytes`` bytes: the per-byte
    cost plus the per-weight cost spread over the upload's bytes (its total CPU exact; the uplink then carries
    the weights at one rate, where the per-weight part would make small weights slower than large ones)."""
    if send_ms_per_weight <= 0 or weights <= 0 or nbytes <= 0:
        return send_ms_per_byte
    return send_ms_per_byte + send_ms_per_weight * weights / nbytes


def effective_link(link: Link, cpu: UeCpu | None) -> Link:
    """The link as the planner may count on it: uplink = min(link rate, CPU-bound send rate)."""
    if cpu is None or cpu.rate_mbps >= link.uplink_mbps:
        return link
    return Link(uplink_mbps=cpu.rate_mbps, downlink_mbps=link.downlink, rtt_ms=link.rtt_ms)


def effective_rates(r: Rates, send_ms_per_byte: float) -> Rates:
    """``r`` with the uplink capped at the CPU-bound send rate 1 / ``send_ms_per_byte`` (bytes/ms; 0: no
    cap): :func:`effective_link` on simulator rates, for sending free of compute."""
    s = send_ms_per_byte
    if s <= 0 or max(r.up, r.tup) <= 1.0 / s:
        return r
    return Rates(up=min(r.up, 1.0 / s), dn=r.dn, L=r.L, phi=r.phi, tup=min(r.tup, 1.0 / s))


@dataclass(frozen=True)
class CpuSim:
    latency_ms: float
    """Latency with the UE's CPU shared between computing and sending (:func:`run_shared`)."""
    sim_ms: float
    """The plain simulator's latency on the effective uplink (sending costs no compute time)."""
    steal_ms: float
    """CPU time the sending took from the UE's ops: bytes sent while the UE computed x send_ms_per_byte
    (the UE finishes this much later than it would computing alone)."""
    ue_finish_ms: float
    upload_bytes: int
    sent_tensor_bytes: int
    upload_order: tuple[str, ...] = ()


def run_shared(P: Prepared, smask: int, r: Rates, send_ms_per_byte: float, mode: str = "cold",
               state: ServerState | None = None, send_share: float = SEND_SHARE,
               a: list[float] | None = None, send_ms_per_weight: float = 0.0) -> tuple[SimResult, float]:
    """Simulate one partition (bitmask of server ops, no validation) with the UE's compute and sending
    on one CPU budget (module docstring); ``r.up`` is the link's rate; ``a``: the UE op times (ms; default
    the profile's ``P.a``; e.g. scaled to another frequency); ``send_ms_per_weight``: the UE's CPU per weight
    uploaded besides its bytes (``UeCpu.send_ms_per_weight``; the weights' bytes cost
    :func:`weight_byte_cost`, cut tensors ``send_ms_per_byte``). Returns the result and the CPU ms the
    sending took from the UE's ops.

    A fluid event simulation: between two events (a UE op finishes, an item's last byte leaves) the
    rates are constant, the UE's ops run one after another in topological order and the uplink sends
    the released item of the highest priority.
    """
    s = send_ms_per_byte
    if not 0.0 < send_share < 1.0:
        raise ValueError(f"send_share must be in (0, 1), got {send_share!r}")
    n = P.n
    a = P.a if a is None else a
    server = [i for i in range(n) if smask >> i & 1]
    ue = [i for i in range(n) if not smask >> i & 1]
    if not server:
        F = sum(a[i] for i in ue)
        return SimResult(F, F, None, 0, 0, ()), 0.0
    R, Rt = r.up, r.tup
    weights = [] if mode == "warm" else _weights_needed(P, server, state)
    upload = sum(b for _, _, b in weights) if mode != "warm" else 0
    sw = weight_byte_cost(s, send_ms_per_weight, len(weights), upload)  # a weight's byte
    alone = min(R, 1.0 / sw) if sw > 0 else R  # bytes/ms with the whole CPU
    both = min(R, send_share / sw) if sw > 0 else R  # bytes/ms while the UE computes
    slow = 1.0 - both * sw  # compute rate while sending
    # cut tensors at their own share of the link (``Rates.tup``), on the same CPU
    alone_t = min(Rt, 1.0 / s) if s > 0 else Rt
    both_t = min(Rt, send_share / s) if s > 0 else Rt
    slow_t = 1.0 - both_t * s
    t_w = upload / alone if mode == "serial" else 0.0
    ue_fin = [0.0] * n
    items, sent_bytes, need_order = uplink_items(P, smask, server, weights, ue_fin, t_w, r, mode)
    m = len(items)
    rem = [float(it[6]) for it in items]
    done = [0.0] * m
    heap: list = []
    by_prod: dict[int, list[int]] = {}
    for j, it in enumerate(items):
        p = it[7]
        if p < 0:
            heap.append((it[1], j))
        else:
            by_prod.setdefault(p, []).append(j)
    heapq.heapify(heap)
    t = t_w
    nue = len(ue)
    k = 0
    wr = a[ue[0]] if nue else 0.0  # work left of the running UE op (ms at the whole CPU)
    stolen = 0.0  # CPU ms the sending took while the UE computed
    while True:
        if k < nue and wr <= 0.0:  # the running op finished: release its tensors
            i = ue[k]
            ue_fin[i] = t
            for j in by_prod.get(i, ()):
                heapq.heappush(heap, (items[j][1], j))
            k += 1
            wr = a[ue[k]] if k < nue else 0.0
            continue
        if heap:
            j = heap[0][1]
            tensor = items[j][4] == "tensor"
            if k < nue:
                bj, sj, cj = (both_t, slow_t, s) if tensor else (both, slow, sw)
                dt = rem[j] / bj
                dto = wr / sj
                if dto < dt:  # the op finishes first: its tensors may preempt
                    t += dto
                    rem[j] -= bj * dto
                    stolen += bj * dto * cj
                    wr = 0.0
                    continue
                t += dt
                wr -= sj * dt
                stolen += rem[j] * cj
                if wr < 0.0:
                    wr = 0.0
            else:
                t += rem[j] / (alone_t if tensor else alone)
            rem[j] = 0.0
            done[j] = t
            heapq.heappop(heap)
        elif k < nue:
            t += wr
            wr = 0.0
        else:
            break
    F = t_w
    for i in ue:
        if ue_fin[i] > F:
            F = ue_fin[i]
    f, res_bytes, _ = serve(P, server, items, done, r, t_w + r.L, P.c)
    lat = f + r.L + res_bytes / r.dn
    return SimResult(max(F, lat), F, f, upload, sent_bytes, need_order), stolen


def simulate_cpu(graph: CostGraph, link: Link, server_ops: Iterable[str], cpu: UeCpu | None, *,
                 mode: str = "cold", state: ServerState | None = None, share: Shares | None = None) -> CpuSim:
    """Latency of one partition with the UE's CPU cost of sending (see the module docstring).

    The effective uplink is ``min(share of the link, CPU-bound send rate)``.
    """
    if mode not in MODES:
        raise CostGraphError(f"unknown simulation mode {mode!r}; valid: {', '.join(MODES)}")
    P = prepare(graph)
    smask = server_mask(graph, server_ops)
    check_partition(P, smask)
    r = Rates.of(link, share)
    s = cpu.send_ms_per_byte if cpu is not None else 0.0
    sw = cpu.send_ms_per_weight if cpu is not None else 0.0
    if sw > 0 and mode != "warm" and smask:  # the uplink capped at the weights' CPU-bound rate
        server = [i for i in range(P.n) if smask >> i & 1]
        weights = _weights_needed(P, server, state)
        plain_s = weight_byte_cost(s, sw, len(weights), sum(b for _, _, b in weights))
    else:
        plain_s = s
    plain = run(P, smask, effective_rates(r, plain_s), mode, state)
    if plain_s <= 0 or not cpu.shared or not smask:
        return CpuSim(plain.latency_ms, plain.latency_ms, 0.0, plain.ue_finish_ms, plain.upload_bytes,
                      plain.sent_tensor_bytes, plain.upload_order)
    res, steal = run_shared(P, smask, r, s, mode, state, send_ms_per_weight=sw)
    return CpuSim(res.latency_ms, plain.latency_ms, steal, res.ue_finish_ms, res.upload_bytes,
                  res.sent_tensor_bytes, res.upload_order)
