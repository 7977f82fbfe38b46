"""What a session tells its client: the events the servicer encodes onto the Session stream.

Plain data, no protobuf: :mod:`edge_server.servicer` turns each into a ``SessionResponse``. Status codes
are gRPC status NAMES (``protos.values.StatusName``); timings are the shared ``protos.values`` types.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from edge_server.errors import EdgeError
from edge_server.memory import Reservation
from edge_server.tensor_codec import TensorPiece, WeightPiece
from protos.values import ServerTimings, StatusName, UeProfile


@dataclass(slots=True)
class SliceDefined:
    """A slice was accepted; ``missing_weights`` lists the sha256 of its weights not held yet."""

    slice_id: str
    graph_hash: str
    missing_weights: list[str]


@dataclass(slots=True)
class SliceRejected:
    """A DefineSlice was refused; the session goes on (requests on this slice id fail)."""

    slice_id: str
    code: StatusName
    message: str


@dataclass(slots=True)
class WeightStored:
    """A weight uploaded on the session stream was verified and committed."""

    sha256: str
    nbytes: int
    already_present: bool


@dataclass(slots=True)
class WeightsStored:
    """Weights committed on the session stream whose acknowledgements wait to be sent together.

    The session appends to the batch still waiting in its queue (:meth:`Session.emit`), so a client
    that reads batches gets one message per burst of commits, with no added delay."""

    acks: list[WeightStored]


@dataclass(slots=True)
class OutputReady:
    """One output tensor of a request (contiguous, on the CPU), to be sent in chunks."""

    request_id: int
    name: str
    tensor: torch.Tensor


@dataclass(slots=True)
class RequestDone:
    """A request finished; its outputs were emitted before this event (``OutputReady``), or travel in it
    (``outputs``: a client that set ``OpenSession.outputs_in_done``, the outputs together within
    ``max_chunk_bytes``)."""

    request_id: int
    output_names: list[str]
    timings: ServerTimings
    """The request's server timings, per-op ones included (the allocator's check of claimed costs reads them)."""
    outputs: dict[str, torch.Tensor] | None = None
    """Name -> output (contiguous, CPU) sent inside the RequestDone message; None: sent before as OutputReady."""
    with_ops: bool = False
    """The client asked for per-op timings (``OpenSession.op_timings`` / ``BeginRequest.op_timings``):
    ``timings.ops`` go on the wire; else only the totals."""

    @property
    def nbytes(self) -> int:
        """Bytes of the outputs it carries (0 when they went as OutputReady)."""
        return sum(t.nbytes for t in self.outputs.values()) if self.outputs else 0


@dataclass(slots=True)
class RequestFailed:
    """A request failed (or never started); the session goes on."""

    request_id: int
    code: StatusName
    message: str


@dataclass(slots=True)
class RequestProgress:
    """A request in flight moved since its last report (``OpenSession.progress_events``): one entry of a
    :class:`ProgressRound`."""

    request_id: int
    ops_done: int
    """Ops of its slice run so far (of ``ops_total``)."""
    ops_total: int
    input_bytes: int
    """Bytes of its cut tensors received so far."""


@dataclass(slots=True, eq=False)
class ProgressRound:
    """A round of progress reports is due (``OpenSession.progress_events``): queued as a placeholder, at most one per
    session, and only while nothing else waits to be sent (``RequestRunner``'s reporter). :meth:`Session.next_event`
    fills ``reports`` when the stream takes it, from the requests' counts at that moment (``build``: a report of each
    request in flight that moved since its last one), or drops it when an answer waits behind it or nothing moved:
    no report's values wait in the queue, so none goes stale behind another, none goes ahead of an answer and none
    after its request's RequestDone / RequestFailed. ``written`` is set once its messages were handed to the
    transport (the stream asked for its next event) or it was dropped: the reporter waits for it before the next
    round."""

    build: Callable[[], list[RequestProgress]]
    written: asyncio.Event = field(default_factory=asyncio.Event)
    reports: list[RequestProgress] = field(default_factory=list)


@dataclass(slots=True)
class ShareChanged:
    """The session's compute share (0..1] or its uplink share (0..1]; 0 = none given) changed."""

    share: float
    uplink_share: float = 0.0
    request_uplink_share: float = 0.0
    """The share its cut tensors of a request in flight may use (``SessionManager.apply_shares``); 0: none."""


@dataclass(slots=True)
class SessionEnded:
    """The client closed its side and every request finished."""


@dataclass(slots=True)
class SessionFailed:
    """A protocol error: the stream ends with this error's status."""

    error: BaseException


Event = (
    SliceDefined
    | SliceRejected
    | WeightStored
    | WeightsStored
    | OutputReady
    | RequestDone
    | RequestFailed
    | ProgressRound
    | ShareChanged
    | SessionEnded
    | SessionFailed
)


# ------------------------------------------------------------------------------------------------------
# Inbound: the client's Session messages after decoding (weight and tensor chunks arrive as
# ``tensor_codec.WeightPiece`` / ``TensorPiece``).


@dataclass(slots=True)
class BadTensorChunk:
    """A TensorChunk that could not be decoded: it fails its request, not the session."""

    request_id: int
    nbytes: int
    error: EdgeError


@dataclass(slots=True)
class WeightPieces:
    """Several weight chunks of one message (``SessionRequest.weights``), applied in order."""

    pieces: list[WeightPiece]


@dataclass(slots=True)
class BeginRequest:
    """``SessionRequest.begin_request``, decoded: ``inputs`` are its inline cut tensors (``BeginRequest.inputs``)
    as validated pieces, handled after the request began exactly as TensorChunks; ``input_error`` is why
    they could not be decoded (then the request fails with it)."""

    request_id: int
    slice_id: str
    input_names: Sequence[str]
    """``BeginRequest.input_names`` as received (the message's repeated field, not copied: a message may
    carry millions of names; ``RequestRunner.begin`` checks their count against the slice's inputs first)."""
    inputs: list[TensorPiece] = field(default_factory=list)
    input_error: EdgeError | None = None
    op_timings: bool = False
    """Send this request's per-op timings (``BeginRequest.op_timings``)."""
    matmul_precision: str = "highest"
    """The float32 matmul precision its ops run under (``BeginRequest.matmul_precision``, checked:
    ``edge_server.precision``)."""


@dataclass(slots=True)
class DefineSlice:
    slice_id: str
    spec_json: bytes


@dataclass(slots=True)
class CancelRequest:
    request_id: int


@dataclass(slots=True)
class UpdateProfile:
    """The UE sent a new profile (``SessionRequest.profile``): empty / 0 fields keep the session's."""

    profile: UeProfile
    hold: Reservation | None = None
    """The memory its cost graph's parse holds (``edge_server.profile_intake``), released once handled."""


@dataclass(slots=True)
class CloseSession:
    """The client ends the session (same as closing its side of the stream)."""
