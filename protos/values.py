"""Wire-level value types shared by both runtimes (the UE's ``ue_client`` and the ``edge_server``).

These are the plain-Python forms of protocol messages whose meaning both sides must agree on: a
request's server timings, the status code of a failed request or refused slice, and the UE's profile
sent at OpenSession. Each runtime converts protobuf to and from these in its one boundary module
(``ue_client/wire.py``, ``edge_server/servicer.py``), so the two cannot drift apart.

No grpc, protobuf or torch imports here: plain dataclasses and a table of status codes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

# google.rpc.Code values (the same numbers as grpc.StatusCode), by name. The protocol carries the
# number (RequestFailed.code, SliceRejected.code); both runtimes hold the NAME (str) in their domain.
STATUS_CODES: dict[str, int] = {
    "OK": 0,
    "CANCELLED": 1,
    "UNKNOWN": 2,
    "INVALID_ARGUMENT": 3,
    "DEADLINE_EXCEEDED": 4,
    "NOT_FOUND": 5,
    "ALREADY_EXISTS": 6,
    "PERMISSION_DENIED": 7,
    "RESOURCE_EXHAUSTED": 8,
    "FAILED_PRECONDITION": 9,
    "ABORTED": 10,
    "OUT_OF_RANGE": 11,
    "UNIMPLEMENTED": 12,
    "INTERNAL": 13,
    "UNAVAILABLE": 14,
    "DATA_LOSS": 15,
    "UNAUTHENTICATED": 16,
}
_NAMES = {v: k for k, v in STATUS_CODES.items()}

StatusName = str
"""A gRPC status code NAME, e.g. ``"INVALID_ARGUMENT"`` (a key of :data:`STATUS_CODES`)."""


def status_value(name: StatusName) -> int:
    """The wire number of a status name. Raises KeyError for a name that is not a gRPC status."""
    return STATUS_CODES[name]


def status_name(value: int) -> StatusName:
    """The name of a wire status number; an unknown number (a newer peer) reads as ``"UNKNOWN"``."""
    return _NAMES.get(value, "UNKNOWN")


@dataclass(frozen=True, slots=True)
class OpTime:
    """Server time of one op of a request (``coinfer.v1.OpTiming``)."""

    name: str
    """Op name from the slice spec."""
    start_ms: float
    """Start, in ms since the request's BeginRequest arrived."""
    ms: float
    """Run time in ms."""


@dataclass(frozen=True, slots=True)
class ServerTimings:
    """Server-side timings of one request, in ms (``coinfer.v1.ServerTimings``; see the proto for how
    waits are attributed: input_wait_ms + weight_wait_ms is the total data wait, with no overlap)."""

    total_ms: float = 0.0
    compute_ms: float = 0.0
    input_wait_ms: float = 0.0
    weight_wait_ms: float = 0.0
    queue_ms: float = 0.0
    ops: tuple[OpTime, ...] = field(default=(), repr=False)
    validation_ms: float = 0.0
    """Wall time of this request's slice definition (DefineSlice: validation, the wait for the server-wide
    validation slot included) when the request is the first on that definition, else 0; not in
    ``total_ms`` (the session read the request's BeginRequest after it)."""


@dataclass(frozen=True, slots=True)
class UeProfile:
    """What a UE tells the server's allocator about itself (``coinfer.v1.UeProfile``).

    ``cost_graph_json`` is the partitioner's ``CostGraph.to_json()`` text; rates in Mbit/s, RTT in ms,
    ``weight`` is the UE's priority w_n in the weighted sum of latencies (ARA, DESIGN.md §5).
    """

    cost_graph_json: str
    uplink_mbps: float
    rtt_ms: float = 0.0
    downlink_mbps: float = 0.0
    """0: same as the uplink."""
    weight: float = 1.0
    send_mbps: float = 0.0
    """The most the UE can send (Mbit/s; its CPU-bound send rate, ``partitioner.uecpu.UeCpu.rate_mbps``);
    0: unknown or not limited. The allocator caps the UE's uplink share at this / the cell rate."""
    cost_graph: object | None = field(default=None, compare=False, repr=False)
    """``cost_graph_json`` as the server parsed, validated and built it (a ``partitioner.CostGraph``, from
    ``edge_server.profile_intake.decode_profile``; or its JSON document), so that the allocator does not
    parse the text a second time; None: not parsed (the allocator parses it)."""
