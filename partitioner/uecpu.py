"""The UE's CPU cost of sending: on a weak device every byte put on the uplink costs CPU time.

A Python gRPC client spends CPU per byte it sends (protobuf chunk copies, the sender thread, HTTP/2
framing): a few ns per byte on a desktop core, tens of ns of wall time on a device that may use a tenth
of a core. Two consequences the plain link model misses:

1. the UE cannot push bytes faster than its CPU budget allows: the uplink the planner may count on is
   ``min(link rate, CPU-bound send rate)`` (:func:`effective_link`);
2. when sending and computing draw on the same CPU budget (``shared``), bytes sent while the UE computes
   delay its computation: the parallel upload of MJOA no longer hides behind local compute.

:func:`simulate_cpu` is the schedule simulator with both corrections, conservatively: the simulator runs
with the effective uplink, then every byte it puts on the uplink before the UE prefix ends charges its
send time (``send_ms_per_byte``) to the UE's critical path, which shifts everything after the prefix by
that much. With a CPU-bound uplink that is busy during the whole prefix this is exactly "compute and
send serial on one resource"; with a free CPU (``shared=False`` or ``send_ms_per_byte=0``) it is the
plain simulator.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

from partitioner.costgraph import CostGraph, CostGraphError, Link
from partitioner.simulate import Rates, simulate
from partitioner.state import ServerState, Shares


@dataclass(frozen=True)
class UeCpu:
    """What sending costs this UE."""

    send_ms_per_byte: float
    """UE wall-clock ms per byte sent on the CPU budget it has (CPU seconds per byte / CPUs it may use)."""
    shared: bool = True
    """Sending and computing share the CPU budget: bytes sent while the UE computes slow the computation."""

    def __post_init__(self) -> None:
        v = self.send_ms_per_byte
        if not isinstance(v, int | float) or math.isnan(v) or v < 0 or math.isinf(v):
            raise CostGraphError(f"send_ms_per_byte must be a finite number >= 0, got {v!r}")

    @property
    def rate_mbps(self) -> float:
        """The CPU-bound send rate (inf when sending is free)."""
        return math.inf if self.send_ms_per_byte <= 0 else 1.0 / (self.send_ms_per_byte * 125.0)

    def send_ms(self, nbytes: float) -> float:
        """UE wall time spent sending ``nbytes``."""
        return nbytes * self.send_ms_per_byte

    def to_dict(self) -> dict:
        return {"send_ms_per_byte": self.send_ms_per_byte, "shared": self.shared, "rate_mbps": self.rate_mbps}


def effective_link(link: Link, cpu: UeCpu | None) -> Link:
    """The link as the planner may count on it: uplink = min(link rate, CPU-bound send rate)."""
    if cpu is None or cpu.rate_mbps >= link.uplink_mbps:
        return link
    return Link(uplink_mbps=cpu.rate_mbps, downlink_mbps=link.downlink, rtt_ms=link.rtt_ms)


@dataclass(frozen=True)
class CpuSim:
    latency_ms: float
    """Corrected latency: the effective-link simulation plus ``steal_ms``."""
    sim_ms: float
    """The simulator's latency with the effective uplink, before the CPU charge."""
    steal_ms: float
    """Send time of the bytes sent before the UE prefix ends, charged to the UE's critical path."""
    ue_finish_ms: float
    upload_bytes: int
    sent_tensor_bytes: int
    upload_order: tuple[str, ...] = ()


def simulate_cpu(graph: CostGraph, link: Link, server_ops: Iterable[str], cpu: UeCpu | None, *,
                 mode: str = "cold", state: ServerState | None = None, share: Shares | None = None) -> CpuSim:
    """Latency of one partition with the UE's CPU cost of sending (see the module docstring).

    ``serial`` mode uploads before the UE computes, so nothing overlaps and only the effective uplink
    applies.
    """
    server_ops = frozenset(server_ops)
    eff = effective_link(link, cpu)
    charge = cpu is not None and cpu.shared and cpu.send_ms_per_byte > 0 and bool(server_ops) and mode != "serial"
    res = simulate(graph, eff, server_ops, mode=mode, state=state, share=share, timeline=charge)
    steal = 0.0
    if charge and res.timeline is not None:
        rate = Rates.of(eff, share).up  # bytes per ms
        F = res.ue_finish_ms
        busy = sum(max(0.0, min(s.end_ms, F) - s.start_ms) for s in res.timeline.uplink)
        steal = cpu.send_ms(busy * rate)
    return CpuSim(res.latency_ms + steal, res.latency_ms, steal, res.ue_finish_ms + steal, res.upload_bytes,
                  res.sent_tensor_bytes, tuple(res.upload_order))
