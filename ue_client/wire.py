"""The one boundary between protobuf (``protos.coinfer.v1``) and the device runtime's domain types.

Nothing else in ue_client builds or reads generated messages: encoders take plain values, decoders
return frozen dataclasses, and RPC errors become the typed errors of ``ue_client.errors``.
"""

from __future__ import annotations

import functools
import logging
import math
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import grpc

from protos.coinfer.v1 import coinfer_pb2 as pb
from protos.coinfer.v1 import coinfer_pb2_grpc as pb_grpc
from protos.values import OpTime, ServerTimings, StatusName, UeProfile, status_name
from ue_client.errors import AccessDenied, InputError, RequestFailed, ServerUnavailable
from ue_client.heap import retain_freed_buffers

log = logging.getLogger(__name__)

CLIENT_VERSION = "coinfer-ue/0.1"
MiB = 1 << 20
DEFAULT_CHUNK_BYTES = 512 << 10
MIN_CHUNK_BYTES = 256 << 10
MAX_CHUNK_BYTES = 1 * MiB
LONE_MESSAGE_BYTES = 1 * MiB
"""Data per message of an upload no cut tensor can be waiting behind (the server may take 4 MiB). Larger
messages saved nothing measurable and cost a fresh UE process more: each message's buffers (ours and
gRPC's copy) are first-touched pages, ~3,300 page faults per 13.8 MB at 4 MiB against ~1,000 at 1 MiB
(``bench/bench_uplink_cpu.py``, mobilenet_v2: 1.57 vs 1.26 ns/B; resnet18 0.95 vs 0.95)."""

MIN_SHARE = 1e-3
"""The smallest compute or uplink share this client takes from a server (a smaller one counts as this): the planner
and the deadline rule already clamp the compute share there (``client.RemoteEngine``, ``deadline.patience_of``), and
an uplink share paces the session's uplink (``session.UplinkQueue.set_share_rate``): at 1e-300 of the cell one chunk
was scheduled 1e297 s ahead and the session sent nothing more, ever (session 25, ``tests/test_hostile_server25.py``)."""
SERVER_CHUNK_BYTES = (16 << 10, 64 * MiB)
"""The range this client takes a server's ``Limits.max_chunk_bytes`` in (outside it: clamped, logged). Below, a
server chose the size of every message the UE sends: at 1 byte the UE sent its weights a byte a message, each byte
progress to the deadline, and a cold request never ended (session 25); above, it would size the data channel's
blocks and socket buffer."""
MAX_PACK = 1024
"""The most ``Limits.max_chunks_per_message`` this client takes (weight chunks in one message; inline tensors of a
BeginRequest)."""

_UNAVAILABLE_CODES = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED, grpc.StatusCode.DEADLINE_EXCEEDED,
                      grpc.StatusCode.UNKNOWN}


# ---- domain types --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Limits:
    max_chunk_bytes: int = 4 * MiB
    preferred_chunk_bytes: int = 1 * MiB
    max_message_bytes: int = 8 * MiB
    cache_bytes: int = 0
    staging_bytes: int = 0
    max_sessions: int = 0
    max_ops: int = 0
    max_chunks_per_message: int = 0
    """Weight chunks one message may pack (:func:`encode_weight_chunks`); 0: an older server, one each."""
    profile_updates: bool = False
    """The server takes ``SessionRequest.profile`` (older servers end the session on it)."""
    data_port: int = 0
    """The server's data channel for weight bytes (``ue_client.data_channel``); 0: none (weights in-stream)."""
    max_cost_graph_ops: int = 0
    """Most ops the server takes in a profile's cost graph (more: INVALID_ARGUMENT); 0: no stated limit."""
    inline_tensors: bool = False
    """The server takes cut tensors inside BeginRequest (:func:`begin_request`'s ``inputs``) and sends small
    outputs inside RequestDone to a client that asks (``open_session(outputs_in_done=True)``); False: an
    older server (it would ignore inline tensors, and the request would wait for them)."""
    progress_interval_ms: int = 0
    """The server reports a request in flight at most this often, when it moved (``Progress``); 0: an older
    server, silent while it computes."""


@dataclass(frozen=True)
class ServerInfo:
    server_version: str
    protocol: str
    device: str
    device_name: str
    torch_version: str
    threads: int
    allowed_ops: frozenset[str]
    limits: Limits
    active_sessions: int
    share: float
    instance_id: str = ""
    """The server process's random id (``HelloResponse.instance_id``; "" from older servers)."""


@dataclass(frozen=True)
class ServerProfile:
    """Per-op server cost (mean ms, variance ms^2) of a weightless slice."""

    graph_hash: str
    ops: Mapping[str, tuple[float, float]]
    total_mean_ms: float
    device: str
    cached: bool


@dataclass(frozen=True)
class Opened:
    session_id: str
    share: float
    limits: Limits
    missing_weights: tuple[str, ...]
    uplink_share: float = 0.0
    """This session's share of the cell's uplink in (0, 1]; 0 when the server gives none."""
    data_ticket: bytes = b""
    """One-time ticket to the server's data channel (``Limits.data_port``); b"": none for this session."""
    request_uplink_share: float = 0.0
    """The share of the cell its cut tensors of a request in flight may use (at least ``uplink_share``);
    0: ``uplink_share``."""


@dataclass(frozen=True)
class SliceAck:
    slice_id: str
    graph_hash: str
    missing_weights: tuple[str, ...]


@dataclass(frozen=True)
class SliceRejected:
    """The server refused a DefineSlice (the session goes on; requests on that slice id fail)."""

    slice_id: str
    code: StatusName
    message: str


@dataclass(frozen=True)
class WeightAck:
    sha256: str
    nbytes: int
    already_present: bool


@dataclass(frozen=True)
class WeightAcks:
    """Several weights committed, acknowledged in one message (``weights_stored``)."""

    acks: tuple[WeightAck, ...]


@dataclass(frozen=True)
class OutputChunk:
    request_id: int
    name: str
    dtype: str
    shape: tuple[int, ...]
    offset: int
    total_bytes: int
    data: bytes


@dataclass(frozen=True)
class Done:
    request_id: int
    output_names: tuple[str, ...]
    timings: ServerTimings
    outputs: tuple[OutputChunk, ...] = ()
    """The outputs that came inside the RequestDone (``RequestDone.outputs``); () when they came as chunks before."""


@dataclass(frozen=True)
class Failed:
    request_id: int
    code: StatusName
    message: str


@dataclass(frozen=True)
class Progress:
    """The server's report of a request in flight (``SessionResponse.request_progress``; asked for by
    ``open_session(progress_events=True)``): it moved since its last report."""

    request_id: int
    ops_done: int
    ops_total: int
    input_bytes: int


@dataclass(frozen=True)
class Progresses:
    """One round of the server's reports (``SessionResponse.progress_batch``; asked for by
    ``open_session(batch_progress=True)``): a ``Progress`` of each request that moved, in one message."""

    reports: tuple[Progress, ...]


@dataclass(frozen=True)
class ShareChanged:
    share: float
    uplink_share: float = 0.0
    """The new share of the cell's uplink in (0, 1]; 0 when the server gives none."""
    request_uplink_share: float = 0.0
    """The new ``Opened.request_uplink_share``; 0: ``uplink_share``."""


@dataclass(frozen=True)
class Unknown:
    """A response kind this client does not know (a newer server): ignored."""

    kind: str


Event = (Opened | SliceAck | SliceRejected | WeightAck | WeightAcks | OutputChunk | Done | Failed | Progress
         | Progresses | ShareChanged | Unknown)


# ---- channel and stub ----------------------------------------------------------------------------------
class _BearerToken(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor,
                   grpc.StreamUnaryClientInterceptor, grpc.StreamStreamClientInterceptor):
    """Adds ``authorization: Bearer <token>`` to every call's metadata."""

    def __init__(self, token: str):
        self._md = ("authorization", f"Bearer {token}")

    def _details(self, d):
        md = [*(d.metadata or ()), self._md]
        return d._replace(metadata=md) if hasattr(d, "_replace") else _CallDetails(d, md)

    def intercept_unary_unary(self, continuation, details, request):
        return continuation(self._details(details), request)

    def intercept_unary_stream(self, continuation, details, request):
        return continuation(self._details(details), request)

    def intercept_stream_unary(self, continuation, details, request_iterator):
        return continuation(self._details(details), request_iterator)

    def intercept_stream_stream(self, continuation, details, request_iterator):
        return continuation(self._details(details), request_iterator)


class _CallDetails(grpc.ClientCallDetails):
    def __init__(self, d, metadata):
        self.method, self.timeout, self.metadata = d.method, d.timeout, metadata
        self.credentials = getattr(d, "credentials", None)
        self.wait_for_ready = getattr(d, "wait_for_ready", None)
        self.compression = getattr(d, "compression", None)


def _read_pem(path: str, what: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise InputError(f"cannot read {what} {path}: {e.strerror or e}") from None


def channel(address: str, *, max_message_bytes: int = 8 * MiB, tls_ca: str | None = None,
            tls_cert: str | None = None, tls_key: str | None = None, token: str | None = None) -> grpc.Channel:
    """A channel to an edge server: TLS when ``tls_ca`` (PEM of the CA that signed the server's
    certificate) is given, with a client certificate (``tls_cert`` + ``tls_key``, PEM) for mutual TLS;
    plain text otherwise (loopback, or a server started with --insecure). ``token`` is sent as
    ``authorization: Bearer`` metadata on every call. Raises InputError for unreadable PEM files."""
    opts = [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
        # Fail fast on a dead server instead of waiting for reconnect backoff.
        ("grpc.initial_reconnect_backoff_ms", 200),
        ("grpc.max_reconnect_backoff_ms", 2000),
        ("grpc.enable_retries", 0),
    ]
    if (tls_cert is None) != (tls_key is None):
        raise InputError("give both --tls-cert and --tls-key (client certificate for mutual TLS)")
    if tls_ca is not None or tls_cert is not None:
        creds = grpc.ssl_channel_credentials(
            root_certificates=_read_pem(tls_ca, "TLS CA") if tls_ca else None,
            private_key=_read_pem(tls_key, "TLS key") if tls_key else None,
            certificate_chain=_read_pem(tls_cert, "TLS certificate") if tls_cert else None)
        ch = grpc.secure_channel(address, creds, options=opts)
    else:
        ch = grpc.insecure_channel(address, options=opts)
    if token:
        ch = grpc.intercept_channel(ch, _BearerToken(token))
    return ch


class EdgeStub(pb_grpc.EdgeServiceStub):
    """The generated stub plus the two streaming calls with pre-serialised requests.

    ``SessionRaw`` and ``UploadWeightsRaw`` take an iterator of ``bytes`` (each a serialised
    ``SessionRequest`` / ``UploadWeightsRequest``, see :func:`encode_weight_chunk`): gRPC sends them as
    they are (no request serializer), so a weight's bytes are copied once on their way from the tensor
    to gRPC instead of twice through a protobuf message.
    """

    def __init__(self, channel: grpc.Channel) -> None:
        super().__init__(channel)
        self.SessionRaw = channel.stream_stream("/coinfer.v1.EdgeService/Session", request_serializer=None,
                                                response_deserializer=pb.SessionResponse.FromString)
        self.UploadWeightsRaw = channel.stream_unary("/coinfer.v1.EdgeService/UploadWeights",
                                                     request_serializer=None,
                                                     response_deserializer=pb.UploadWeightsResponse.FromString)


def stub(ch: grpc.Channel) -> EdgeStub:
    return EdgeStub(ch)


def map_rpc_error(e: grpc.RpcError, what: str) -> Exception:
    """A gRPC error -> ServerUnavailable (transport trouble) or RequestFailed (the server said no)."""
    code = e.code() if hasattr(e, "code") else None
    details = e.details() if hasattr(e, "details") else str(e)
    msg = f"{what}: {code.name if code else 'error'}: {details}"
    if code is None or code in _UNAVAILABLE_CODES:
        err = ServerUnavailable(msg)
        err.code = code.name if code else ""
        return err
    if code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
        return AccessDenied(msg, code=code.name)
    return RequestFailed(msg, code=code.name)


# ---- unary calls ---------------------------------------------------------------------------------------
_refused: dict[str, int] = {}


def refused(what: str, msg: str, *args) -> None:
    """Log (WARNING) that a value a server sent was refused or changed: the 1st, 2nd, 4th, 8th, ... time for each
    ``what`` (with the count), so a server repeating it cannot flood the UE's log."""
    n = _refused[what] = _refused.get(what, 0) + 1
    if n & (n - 1) == 0:
        log.warning("hostile or broken server (%d times): " + msg, n, *args)


def _clamped(what: str, v: int, lo: int, hi: int) -> int:
    """``v`` within [lo, hi]; a value outside is logged (a server's limit this client does not take as it is)."""
    if lo <= v <= hi:
        return v
    c = min(hi, max(lo, v))
    refused(what, "its %s %d is outside [%d, %d]: using %d", what, v, lo, hi, c)
    return c


def _limits(m: pb.Limits) -> Limits:
    """The server's limits, those that size what the UE sends validated: ``max_chunk_bytes`` within
    ``SERVER_CHUNK_BYTES``, ``max_chunks_per_message`` at most ``MAX_PACK``, ``data_port`` a TCP port (else 0: no
    data channel). A server's limits are its word on what it takes, not a say in how the UE spends its CPU and
    memory."""
    port = m.data_port
    if port > 65535:
        refused("data_port", "its data port %d is not a TCP port: no data channel", port)
        port = 0
    return Limits(max_chunk_bytes=_clamped("max_chunk_bytes", m.max_chunk_bytes or 4 * MiB, *SERVER_CHUNK_BYTES),
                  preferred_chunk_bytes=m.preferred_chunk_bytes or MiB,
                  max_message_bytes=m.max_message_bytes or 8 * MiB, cache_bytes=m.cache_bytes,
                  staging_bytes=m.staging_bytes, max_sessions=m.max_sessions, max_ops=m.max_ops,
                  max_chunks_per_message=_clamped("max_chunks_per_message", m.max_chunks_per_message, 0, MAX_PACK),
                  profile_updates=m.profile_updates, data_port=port, max_cost_graph_ops=m.max_cost_graph_ops,
                  inline_tensors=m.inline_tensors, progress_interval_ms=m.progress_interval_ms)


def hello(s: pb_grpc.EdgeServiceStub, tenant: str, timeout_s: float) -> ServerInfo:
    try:
        r = s.Hello(pb.HelloRequest(client_version=CLIENT_VERSION, tenant=tenant), timeout=timeout_s)
    except grpc.RpcError as e:
        raise map_rpc_error(e, "Hello") from None
    return ServerInfo(server_version=r.server_version, protocol=r.protocol, device=r.device,
                      device_name=r.device_name, torch_version=r.torch_version, threads=r.threads,
                      allowed_ops=frozenset(r.allowed_ops), limits=_limits(r.limits),
                      active_sessions=r.active_sessions, share=_compute_share(r.share, "Hello") or 1.0,
                      instance_id=r.instance_id[:64])


def ping(ch: grpc.Channel, timeout_s: float) -> float:
    """Round trip of the smallest call (a health check) on this channel's connection, in seconds."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    t = time.perf_counter()
    try:
        health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=""), timeout=timeout_s)
    except grpc.RpcError as e:
        raise map_rpc_error(e, "health check") from None
    return time.perf_counter() - t


def query_weights(s: pb_grpc.EdgeServiceStub, tenant: str, shas: Iterable[str], timeout_s: float) -> set[str]:
    try:
        r = s.QueryWeights(pb.QueryWeightsRequest(tenant=tenant, sha256=list(shas)), timeout=timeout_s)
    except grpc.RpcError as e:
        raise map_rpc_error(e, "QueryWeights") from None
    return set(r.present)


def profile_graph(s: pb_grpc.EdgeServiceStub, spec_json: str, timeout_s: float, *, iterations: int = 0,
                  warmup: int = 0) -> ServerProfile:
    try:
        r = s.ProfileGraph(pb.ProfileGraphRequest(slice_spec_json=spec_json.encode(), iterations=iterations,
                                                  warmup=warmup), timeout=timeout_s)
    except grpc.RpcError as e:
        raise map_rpc_error(e, "ProfileGraph") from None
    bad = next((o for o in r.ops if not (math.isfinite(o.mean_ms) and math.isfinite(o.var_ms2) and o.mean_ms >= 0
                                         and o.var_ms2 >= 0)), None)
    if bad is not None:
        # the planner's cost graph refuses such a cost (CostGraphError): before session 25 it reached the user's call
        # (NaN or negative: every call raised; inf: the profile sent at every OpenSession was refused by the server,
        # every request fell back for good). Refused here, the client plans with its own op times instead
        refused("profile", "its profile of op %.60r is mean %r ms, variance %r ms^2: not a time; profile refused",
                bad.name, bad.mean_ms, bad.var_ms2)
        raise RequestFailed(f"ProfileGraph: the server's cost of op {bad.name[:60]!r} is not a time "
                            f"(mean {bad.mean_ms!r} ms, variance {bad.var_ms2!r} ms^2)", code="INVALID_ARGUMENT")
    return ServerProfile(graph_hash=r.graph_hash, ops={o.name: (o.mean_ms, o.var_ms2) for o in r.ops},
                         total_mean_ms=r.total_mean_ms, device=r.device, cached=r.cached)


def upload_weights(s: pb_grpc.EdgeServiceStub, tenant: str, session_id: str,
                   chunks: Iterable[pb.WeightChunk | bytes], timeout_s: float) -> list[WeightAck]:
    """Upload weights outside the session stream (the timed link probe, the serial baselines).

    ``chunks`` are ``WeightChunk`` messages or, cheaper, :func:`encode_weight_chunk` bytes made with
    ``field=UPLOAD_CHUNK`` (one copy of the weight bytes instead of three; needs an :class:`EdgeStub`).
    """
    raw = getattr(s, "UploadWeightsRaw", None)

    def reqs() -> Iterator[pb.UploadWeightsRequest | bytes]:
        head = pb.UploadWeightsRequest(header=pb.UploadHeader(tenant=tenant, session_id=session_id))
        yield head.SerializeToString() if raw is not None else head
        for c in chunks:
            if isinstance(c, bytes):
                yield c if raw is not None else pb.UploadWeightsRequest.FromString(c)
            else:
                msg = pb.UploadWeightsRequest(chunk=c)
                yield msg.SerializeToString() if raw is not None else msg

    retain_freed_buffers()
    try:
        r = (raw or s.UploadWeights)(reqs(), timeout=timeout_s)
    except grpc.RpcError as e:
        raise map_rpc_error(e, "UploadWeights") from None
    return [WeightAck(w.sha256, w.nbytes, w.already_present) for w in r.weights]


# ---- session stream: encoders --------------------------------------------------------------------------
# Every encoder below returns a serialised ``SessionRequest`` (bytes), as the session's uplink sends it.
def open_session(tenant: str, model_id: str, profile: UeProfile | None = None, batch_acks: bool = True,
                 outputs_in_done: bool = True, op_timings: bool = False, progress_events: bool = True,
                 batch_progress: bool = True) -> bytes:
    """OpenSession; ``batch_acks``: this client reads ``weights_stored`` (several acks in one message);
    ``outputs_in_done``: it reads outputs inside RequestDone; ``op_timings``: every RequestDone carries the
    server's per-op timings (else only when a BeginRequest asks; the totals always come); ``progress_events``:
    it reads ``request_progress`` (the server's reports of its requests in flight); ``batch_progress``: it reads
    ``progress_batch`` (a round of reports in one message; a server before session 25 sends ``request_progress``)."""
    m = pb.OpenSession(tenant=tenant, model_id=model_id, batch_acks=batch_acks, outputs_in_done=outputs_in_done,
                       op_timings=op_timings, progress_events=progress_events, batch_progress=batch_progress)
    if profile is not None:
        m.profile.CopyFrom(_profile_pb(profile))
    return pb.SessionRequest(open=m).SerializeToString()


def _profile_pb(profile: UeProfile) -> pb.UeProfile:
    return pb.UeProfile(cost_graph_json=profile.cost_graph_json.encode(), uplink_mbps=profile.uplink_mbps,
                        downlink_mbps=profile.downlink_mbps, rtt_ms=profile.rtt_ms, weight=profile.weight,
                        send_mbps=profile.send_mbps)


def update_profile(profile: UeProfile) -> bytes:
    """SessionRequest.profile: the UE's new profile; empty / 0 fields keep the session's (e.g. only
    ``send_mbps``, measured after OpenSession)."""
    return pb.SessionRequest(profile=_profile_pb(profile)).SerializeToString()


def cancel_request(request_id: int) -> bytes:
    return pb.SessionRequest(cancel_request=pb.CancelRequest(request_id=request_id)).SerializeToString()


def define_slice(slice_id: str, spec_json: str) -> bytes:
    return pb.SessionRequest(define_slice=pb.DefineSlice(slice_id=slice_id,
                                                         slice_spec_json=spec_json.encode())).SerializeToString()


SESSION_BEGIN = 4
"""``SessionRequest.begin_request``."""


def begin_request(request_id: int, slice_id: str, input_names: Iterable[str],
                  inputs: Sequence[tuple[str, str, tuple[int, ...], memoryview | bytes]] = (),
                  op_timings: bool = False, matmul_precision: str = "highest") -> bytes:
    """A serialised ``SessionRequest{begin_request}``; ``inputs``: whole cut tensors sent inside it, each
    ``(name, dtype, shape, data)`` (only to a server with ``Limits.inline_tensors``; their data together
    within its ``max_chunk_bytes``), ``op_timings``: ask for this request's per-op server timings;
    ``matmul_precision``: the UE's ``torch.get_float32_matmul_precision()`` (``BeginRequest.matmul_precision``,
    left out when "highest", the server's default: break38 F2).
    Byte-identical to protobuf's encoding; each tensor's bytes are copied once, into the result.

    Everything but the request id and the tensors' bytes is encoded once per (slice id, input names,
    inline tensors' name / dtype / shape / size) and kept (``_begin_parts``, the last ``BEGIN_TEMPLATES``):
    a split's requests differ only in those. Protobuf writes fields in field-number order and
    ``request_id`` is field 1 of both BeginRequest and TensorChunk, so the id's bytes go first."""
    names = input_names if isinstance(input_names, tuple) else tuple(input_names)
    sized = tuple((name, dtype, tuple(shape), len(data) if not isinstance(data, memoryview) else data.nbytes)
                  for name, dtype, shape, data in inputs)
    head_rest, chunk_rests = _begin_parts(slice_id, names, sized)
    rid = _REQUEST_ID_TAG + _varint(request_id) if request_id else b""
    head = rid + head_rest
    if not inputs and not op_timings and matmul_precision == "highest":
        return bytes(((SESSION_BEGIN << 3) | 2,)) + _varint(len(head)) + head
    parts: list = [head]
    size = len(head)
    for chunk_rest, (*_, data) in zip(chunk_rests, inputs):
        pre, n = _framed(BEGIN_INPUTS, rid + chunk_rest, _TENSOR_DATA_TAG, data)
        parts += (pre, data)
        size += len(pre) + n
    if op_timings:
        parts.append(_BEGIN_OP_TIMINGS_TRUE)
        size += len(_BEGIN_OP_TIMINGS_TRUE)
    if matmul_precision != "highest":
        field = matmul_precision.encode()
        field = _BEGIN_PRECISION_TAG + _varint(len(field)) + field
        parts.append(field)
        size += len(field)
    return b"".join((bytes(((SESSION_BEGIN << 3) | 2,)), _varint(size), *parts))


BEGIN_TEMPLATES = 64
"""BeginRequest encodings kept (``_begin_parts``): a client's splits x its sessions' slice ids."""


@functools.lru_cache(maxsize=BEGIN_TEMPLATES)
def _begin_parts(slice_id: str, input_names: tuple[str, ...],
                 inputs: tuple[tuple[str, str, tuple[int, ...], int], ...]) -> tuple[bytes, tuple[bytes, ...]]:
    """(the BeginRequest's fields after ``request_id``, each inline TensorChunk's fields between its
    ``request_id`` and its data) for inline tensors ``(name, dtype, shape, bytes)``."""
    head = pb.BeginRequest(slice_id=slice_id, input_names=list(input_names)).SerializeToString()
    chunks = tuple(pb.TensorChunk(meta=pb.TensorMeta(name=name, dtype=dtype, shape=shape), offset=0,
                                  total_bytes=n).SerializeToString() for name, dtype, shape, n in inputs)
    return head, chunks


def close_session() -> bytes:
    return pb.SessionRequest(close=pb.CloseSession()).SerializeToString()


def session_call(s: pb_grpc.EdgeServiceStub, requests: Iterator[bytes]):
    """Open the Session stream on serialised ``SessionRequest``s; returns gRPC's call (an iterator of
    ``SessionResponse``, with ``cancel()``). An :class:`EdgeStub` sends the bytes as they are; a plain
    generated stub gets them parsed back into messages first (slower, same wire bytes)."""
    raw = getattr(s, "SessionRaw", None)
    if raw is not None:
        return raw(requests)
    return s.Session(pb.SessionRequest.FromString(m) for m in requests)


# Field numbers the pre-serialised chunks are wrapped in (see coinfer.proto).
SESSION_WEIGHT = 3
"""``SessionRequest.weight``."""
SESSION_TENSOR = 5
"""``SessionRequest.tensor``."""
SESSION_WEIGHTS = 8
"""``SessionRequest.weights`` (``WeightChunks``; its chunks are field 1)."""
UPLOAD_CHUNK = 2
"""``UploadWeightsRequest.chunk``."""
WEIGHTS_CHUNKS = pb.WeightChunks.DESCRIPTOR.fields_by_name["chunks"].number
"""``WeightChunks.chunks``."""
BEGIN_INPUTS = pb.BeginRequest.DESCRIPTOR.fields_by_name["inputs"].number
"""``BeginRequest.inputs``."""
_WEIGHT_DATA_TAG = (pb.WeightChunk.DESCRIPTOR.fields_by_name["data"].number << 3) | 2
_TENSOR_DATA_TAG = (pb.TensorChunk.DESCRIPTOR.fields_by_name["data"].number << 3) | 2
_REQUEST_ID_TAG = bytes(((pb.BeginRequest.DESCRIPTOR.fields_by_name["request_id"].number << 3) | 0,))
"""``BeginRequest.request_id`` and ``TensorChunk.request_id`` (field 1 of both, a varint)."""
if any(m.DESCRIPTOR.fields_by_name["request_id"].number != min(f.number for f in m.DESCRIPTOR.fields)
       for m in (pb.BeginRequest, pb.TensorChunk)):  # begin_request writes the id's bytes first
    raise ImportError("BeginRequest.request_id and TensorChunk.request_id must be their first fields")
_BEGIN_OP_TIMINGS_TRUE = bytes(((pb.BeginRequest.DESCRIPTOR.fields_by_name["op_timings"].number << 3) | 0, 1))
_BEGIN_PRECISION_TAG = bytes(((pb.BeginRequest.DESCRIPTOR.fields_by_name["matmul_precision"].number << 3) | 2,))
"""``BeginRequest.op_timings = true`` (a varint field)."""


def _varint(n: int) -> bytes:
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _framed(field: int, head: bytes, data_tag: int, data: memoryview | bytes) -> tuple[bytes, int]:
    """What goes before ``data`` in ``field`` (length-delimited) holding the message ``head`` followed by the
    bytes field ``data`` (tag ``data_tag``), and ``data``'s length: the caller appends ``data`` itself, so its
    bytes are copied once, where the whole message is joined."""
    n = len(data) if not isinstance(data, memoryview) else data.nbytes
    if n:  # proto3 leaves an empty bytes field out; so do we, for byte-identical output
        head = head + bytes((data_tag,)) + _varint(n)
    return bytes(((field << 3) | 2,)) + _varint(len(head) + n) + head, n


def _wrap(field: int, head: bytes, data_tag: int, data: memoryview | bytes) -> bytes:
    """``field`` (length-delimited) holding the message ``head`` followed by the bytes field ``data``."""
    return b"".join((_framed(field, head, data_tag, data)[0], data))


def encode_weight_chunk(sha256: str, dtype: str, shape: tuple[int, ...], offset: int, total: int,
                        data: memoryview | bytes, field: int = SESSION_WEIGHT) -> bytes:
    """A serialised ``SessionRequest{weight}`` (or, with ``field=UPLOAD_CHUNK``, ``UploadWeightsRequest
    {chunk}``) for bytes ``data`` = [offset, offset + len) of a weight; byte-identical to what protobuf
    would produce for the same message. The metadata is encoded by protobuf, the data appended by hand
    (``data`` last, as protobuf orders fields by number): ``data`` is copied once, into the result."""
    head = pb.WeightChunk(sha256=sha256, dtype=dtype, shape=shape, offset=offset,
                          total_bytes=total).SerializeToString()
    return _wrap(field, head, _WEIGHT_DATA_TAG, data)


def encode_weight_chunks(chunks: list[tuple[str, str, tuple[int, ...], int, int, memoryview | bytes]]) -> bytes:
    """A serialised ``SessionRequest{weights: WeightChunks}`` packing several weight chunks, each
    ``(sha256, dtype, shape, offset, total, data)`` as for :func:`encode_weight_chunk`; byte-identical to
    protobuf's encoding. Each chunk's bytes are copied once, into the result (one ``join``). Only for a
    server whose ``Limits.max_chunks_per_message`` allows ``len(chunks)``."""
    parts: list = []
    inner = 0
    for sha, dtype, shape, offset, total, data in chunks:
        head = pb.WeightChunk(sha256=sha, dtype=dtype, shape=shape, offset=offset,
                              total_bytes=total).SerializeToString()
        pre, n = _framed(WEIGHTS_CHUNKS, head, _WEIGHT_DATA_TAG, data)
        parts += (pre, data)
        inner += len(pre) + n
    return b"".join((bytes(((SESSION_WEIGHTS << 3) | 2,)), _varint(inner), *parts))


def encode_tensor_chunk(request_id: int, name: str, dtype: str, shape: tuple[int, ...], offset: int, total: int,
                        data: memoryview | bytes) -> bytes:
    """A serialised ``SessionRequest{tensor}`` for bytes [offset, offset + len(data)) of a cut tensor;
    byte-identical to :func:`tensor_chunk`'s message, with ``data`` copied once."""
    head = pb.TensorChunk(request_id=request_id, meta=pb.TensorMeta(name=name, dtype=dtype, shape=shape),
                          offset=offset, total_bytes=total).SerializeToString()
    return _wrap(SESSION_TENSOR, head, _TENSOR_DATA_TAG, data)


def weight_chunk(sha256: str, dtype: str, shape: tuple[int, ...], offset: int, total: int,
                 data: memoryview | bytes) -> pb.WeightChunk:
    return pb.WeightChunk(sha256=sha256, dtype=dtype, shape=list(shape), offset=offset, total_bytes=total,
                          data=bytes(data))


def session_weight(chunk: pb.WeightChunk) -> pb.SessionRequest:
    return pb.SessionRequest(weight=chunk)


def tensor_chunk(request_id: int, name: str, dtype: str, shape: tuple[int, ...], offset: int, total: int,
                 data: memoryview | bytes) -> pb.SessionRequest:
    return pb.SessionRequest(tensor=pb.TensorChunk(
        request_id=request_id, meta=pb.TensorMeta(name=name, dtype=dtype, shape=list(shape)), offset=offset,
        total_bytes=total, data=bytes(data)))


# ---- session stream: decoder ---------------------------------------------------------------------------
class OpTimes(Sequence):
    """``ServerTimings.ops`` as the device receives them: a sequence of ``OpTime`` decoded on first use.

    The server times every op of every request (its allocator's calibration); the device runtime reads
    none of them, and building one ``OpTime`` per op cost its receiver thread 37 us per request on
    resnet18's 70 server ops and 271 us on googlenet's 560. The one generated message kept beyond this
    module: the repeated field, until the first look. Equal to a tuple of the same ``OpTime``s."""

    __slots__ = ("_ops", "_pb")

    def __init__(self, ops) -> None:
        self._pb = ops
        self._ops: tuple[OpTime, ...] | None = None

    def _all(self) -> tuple[OpTime, ...]:
        ops = self._ops
        if ops is None:
            ops = self._ops = tuple(OpTime(o.name, o.start_ms, o.ms) for o in self._pb)
            self._pb = None
        return ops

    def __len__(self) -> int:
        return len(self._ops) if self._ops is not None else len(self._pb)

    def __getitem__(self, i):
        return self._all()[i]

    def __iter__(self):
        return iter(self._all())

    def __eq__(self, other: object) -> bool:
        if isinstance(other, OpTimes | tuple | list):
            return self._all() == tuple(other)
        return NotImplemented

    def __hash__(self) -> int:
        return hash(self._all())

    def __repr__(self) -> str:
        return repr(self._all())


def _timings(t: pb.ServerTimings) -> ServerTimings:
    return ServerTimings(total_ms=t.total_ms, compute_ms=t.compute_ms, input_wait_ms=t.input_wait_ms,
                         weight_wait_ms=t.weight_wait_ms, queue_ms=t.queue_ms,
                         ops=OpTimes(t.ops) if t.ops else (), validation_ms=t.validation_ms)


def _share(v: float, what: str) -> float:
    """A server's share (compute or uplink) as this client uses it: 0 (none given) unless finite and > 0, else within
    [``MIN_SHARE``, 1]. Not a finite positive number: logged and taken as none; a NaN compute share once made every
    later plan of the session local (the planner clamps NaN to the floor: the server 1000x slower) and a share of
    1e-300 stopped the uplink for good (session 25)."""
    if v == 0.0:  # (unset)
        return 0.0
    if not (math.isfinite(v) and v > 0):
        refused(f"{what} share", "it sent %s share %r: not a number in (0, 1], ignored", what, v)
        return 0.0
    return min(1.0, max(MIN_SHARE, v))


def _uplink_share(v: float) -> float:
    """A server's uplink share as this client uses it (``_share``): 0 (none) unless finite and > 0, else within
    [``MIN_SHARE``, 1]."""
    return _share(v, "uplink")


def _compute_share(v: float, what: str = "compute") -> float:
    """A server's compute share as this client uses it (``_share``): 0 (none given) or within [``MIN_SHARE``, 1]."""
    return _share(v, what)


MAX_MESSAGE_CHARS = 2000
"""The most characters of a server's error message (RequestFailed, SliceRejected) this client keeps: the message goes
into an exception, a log line and a report. Before session 25 one 6 MB message cost the UE 77 MB (its copies)."""


def _message(m: str) -> str:
    """A server's error message, cut to ``MAX_MESSAGE_CHARS``."""
    if len(m) <= MAX_MESSAGE_CHARS:
        return m
    return f"{m[:MAX_MESSAGE_CHARS]}... ({len(m)} characters)"


def decode_event(r: pb.SessionResponse) -> Event:
    kind = r.WhichOneof("msg")
    if kind == "opened":
        o = r.opened
        return Opened(o.session_id, _compute_share(o.share) or 1.0, _limits(o.limits), tuple(o.missing_weights),
                      _uplink_share(o.uplink_share), o.data_ticket, _uplink_share(o.request_uplink_share))
    if kind == "slice_defined":
        o = r.slice_defined
        return SliceAck(o.slice_id, o.graph_hash, tuple(o.missing_weights))
    if kind == "slice_rejected":
        o = r.slice_rejected
        return SliceRejected(o.slice_id, status_name(o.code), _message(o.message))
    if kind == "weight_stored":
        o = r.weight_stored
        return WeightAck(o.sha256, o.nbytes, o.already_present)
    if kind == "weights_stored":
        return WeightAcks(tuple(WeightAck(o.sha256, o.nbytes, o.already_present) for o in r.weights_stored.weights))
    if kind == "output":
        o = r.output
        return OutputChunk(o.request_id, o.meta.name, o.meta.dtype, tuple(o.meta.shape), o.offset, o.total_bytes,
                           o.data)
    if kind == "request_done":
        o = r.request_done
        outputs = tuple(OutputChunk(o.request_id, c.meta.name, c.meta.dtype, tuple(c.meta.shape), c.offset,
                                    c.total_bytes, c.data) for c in o.outputs) if o.outputs else ()
        return Done(o.request_id, tuple(o.output_names), _timings(o.timings), outputs)
    if kind == "request_failed":
        o = r.request_failed
        return Failed(o.request_id, status_name(o.code), _message(o.message))
    if kind == "request_progress":
        o = r.request_progress
        return Progress(o.request_id, o.ops_done, o.ops_total, o.input_bytes)
    if kind == "progress_batch":
        return Progresses(tuple(Progress(o.request_id, o.ops_done, o.ops_total, o.input_bytes)
                                for o in r.progress_batch.requests))
    if kind == "share_changed":
        c = r.share_changed
        return ShareChanged(_compute_share(c.share), _uplink_share(c.uplink_share),
                            _uplink_share(c.request_uplink_share))
    return Unknown(str(kind))


def chunk_spans(total: int, chunk: int) -> Iterator[tuple[int, int]]:
    """(offset, end) of each chunk of a ``total``-byte payload; one empty chunk for an empty tensor."""
    if total == 0:
        yield 0, 0
        return
    for off in range(0, total, chunk):
        yield off, min(total, off + chunk)
