from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class TensorMeta(_message.Message):
    __slots__ = ("name", "dtype", "shape")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    name: str
    dtype: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, name: _Optional[str] = ..., dtype: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ...) -> None: ...

class TensorChunk(_message.Message):
    __slots__ = ("request_id", "meta", "offset", "total_bytes", "data")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    META_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    request_id: int
    meta: TensorMeta
    offset: int
    total_bytes: int
    data: bytes
    def __init__(self, request_id: _Optional[int] = ..., meta: _Optional[_Union[TensorMeta, _Mapping]] = ..., offset: _Optional[int] = ..., total_bytes: _Optional[int] = ..., data: _Optional[bytes] = ...) -> None: ...

class WeightChunk(_message.Message):
    __slots__ = ("sha256", "dtype", "shape", "offset", "total_bytes", "data")
    SHA256_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    sha256: str
    dtype: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    offset: int
    total_bytes: int
    data: bytes
    def __init__(self, sha256: _Optional[str] = ..., dtype: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., offset: _Optional[int] = ..., total_bytes: _Optional[int] = ..., data: _Optional[bytes] = ...) -> None: ...

class OpCost(_message.Message):
    __slots__ = ("name", "mean_ms", "var_ms2")
    NAME_FIELD_NUMBER: _ClassVar[int]
    MEAN_MS_FIELD_NUMBER: _ClassVar[int]
    VAR_MS2_FIELD_NUMBER: _ClassVar[int]
    name: str
    mean_ms: float
    var_ms2: float
    def __init__(self, name: _Optional[str] = ..., mean_ms: _Optional[float] = ..., var_ms2: _Optional[float] = ...) -> None: ...

class HelloRequest(_message.Message):
    __slots__ = ("client_version", "tenant")
    CLIENT_VERSION_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    client_version: str
    tenant: str
    def __init__(self, client_version: _Optional[str] = ..., tenant: _Optional[str] = ...) -> None: ...

class Limits(_message.Message):
    __slots__ = ("max_chunk_bytes", "preferred_chunk_bytes", "max_message_bytes", "cache_bytes", "staging_bytes", "max_sessions", "max_ops", "max_chunks_per_message", "profile_updates", "data_port", "max_cost_graph_ops", "inline_tensors", "progress_interval_ms")
    MAX_CHUNK_BYTES_FIELD_NUMBER: _ClassVar[int]
    PREFERRED_CHUNK_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_MESSAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    CACHE_BYTES_FIELD_NUMBER: _ClassVar[int]
    STAGING_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_SESSIONS_FIELD_NUMBER: _ClassVar[int]
    MAX_OPS_FIELD_NUMBER: _ClassVar[int]
    MAX_CHUNKS_PER_MESSAGE_FIELD_NUMBER: _ClassVar[int]
    PROFILE_UPDATES_FIELD_NUMBER: _ClassVar[int]
    DATA_PORT_FIELD_NUMBER: _ClassVar[int]
    MAX_COST_GRAPH_OPS_FIELD_NUMBER: _ClassVar[int]
    INLINE_TENSORS_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_INTERVAL_MS_FIELD_NUMBER: _ClassVar[int]
    max_chunk_bytes: int
    preferred_chunk_bytes: int
    max_message_bytes: int
    cache_bytes: int
    staging_bytes: int
    max_sessions: int
    max_ops: int
    max_chunks_per_message: int
    profile_updates: bool
    data_port: int
    max_cost_graph_ops: int
    inline_tensors: bool
    progress_interval_ms: int
    def __init__(self, max_chunk_bytes: _Optional[int] = ..., preferred_chunk_bytes: _Optional[int] = ..., max_message_bytes: _Optional[int] = ..., cache_bytes: _Optional[int] = ..., staging_bytes: _Optional[int] = ..., max_sessions: _Optional[int] = ..., max_ops: _Optional[int] = ..., max_chunks_per_message: _Optional[int] = ..., profile_updates: _Optional[bool] = ..., data_port: _Optional[int] = ..., max_cost_graph_ops: _Optional[int] = ..., inline_tensors: _Optional[bool] = ..., progress_interval_ms: _Optional[int] = ...) -> None: ...

class HelloResponse(_message.Message):
    __slots__ = ("server_version", "protocol", "device", "device_name", "torch_version", "threads", "allowed_ops", "allowed_ops_hash", "limits", "active_sessions", "share", "instance_id")
    SERVER_VERSION_FIELD_NUMBER: _ClassVar[int]
    PROTOCOL_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    DEVICE_NAME_FIELD_NUMBER: _ClassVar[int]
    TORCH_VERSION_FIELD_NUMBER: _ClassVar[int]
    THREADS_FIELD_NUMBER: _ClassVar[int]
    ALLOWED_OPS_FIELD_NUMBER: _ClassVar[int]
    ALLOWED_OPS_HASH_FIELD_NUMBER: _ClassVar[int]
    LIMITS_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_SESSIONS_FIELD_NUMBER: _ClassVar[int]
    SHARE_FIELD_NUMBER: _ClassVar[int]
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    server_version: str
    protocol: str
    device: str
    device_name: str
    torch_version: str
    threads: int
    allowed_ops: _containers.RepeatedScalarFieldContainer[str]
    allowed_ops_hash: str
    limits: Limits
    active_sessions: int
    share: float
    instance_id: str
    def __init__(self, server_version: _Optional[str] = ..., protocol: _Optional[str] = ..., device: _Optional[str] = ..., device_name: _Optional[str] = ..., torch_version: _Optional[str] = ..., threads: _Optional[int] = ..., allowed_ops: _Optional[_Iterable[str]] = ..., allowed_ops_hash: _Optional[str] = ..., limits: _Optional[_Union[Limits, _Mapping]] = ..., active_sessions: _Optional[int] = ..., share: _Optional[float] = ..., instance_id: _Optional[str] = ...) -> None: ...

class ProfileGraphRequest(_message.Message):
    __slots__ = ("slice_spec_json", "iterations", "warmup")
    SLICE_SPEC_JSON_FIELD_NUMBER: _ClassVar[int]
    ITERATIONS_FIELD_NUMBER: _ClassVar[int]
    WARMUP_FIELD_NUMBER: _ClassVar[int]
    slice_spec_json: bytes
    iterations: int
    warmup: int
    def __init__(self, slice_spec_json: _Optional[bytes] = ..., iterations: _Optional[int] = ..., warmup: _Optional[int] = ...) -> None: ...

class ProfileGraphResponse(_message.Message):
    __slots__ = ("graph_hash", "ops", "total_mean_ms", "total_var_ms2", "device", "cached")
    GRAPH_HASH_FIELD_NUMBER: _ClassVar[int]
    OPS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_MEAN_MS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_VAR_MS2_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    CACHED_FIELD_NUMBER: _ClassVar[int]
    graph_hash: str
    ops: _containers.RepeatedCompositeFieldContainer[OpCost]
    total_mean_ms: float
    total_var_ms2: float
    device: str
    cached: bool
    def __init__(self, graph_hash: _Optional[str] = ..., ops: _Optional[_Iterable[_Union[OpCost, _Mapping]]] = ..., total_mean_ms: _Optional[float] = ..., total_var_ms2: _Optional[float] = ..., device: _Optional[str] = ..., cached: _Optional[bool] = ...) -> None: ...

class QueryWeightsRequest(_message.Message):
    __slots__ = ("tenant", "sha256")
    TENANT_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    sha256: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, tenant: _Optional[str] = ..., sha256: _Optional[_Iterable[str]] = ...) -> None: ...

class QueryWeightsResponse(_message.Message):
    __slots__ = ("present",)
    PRESENT_FIELD_NUMBER: _ClassVar[int]
    present: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, present: _Optional[_Iterable[str]] = ...) -> None: ...

class UploadHeader(_message.Message):
    __slots__ = ("tenant", "session_id")
    TENANT_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    session_id: str
    def __init__(self, tenant: _Optional[str] = ..., session_id: _Optional[str] = ...) -> None: ...

class UploadWeightsRequest(_message.Message):
    __slots__ = ("header", "chunk")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    header: UploadHeader
    chunk: WeightChunk
    def __init__(self, header: _Optional[_Union[UploadHeader, _Mapping]] = ..., chunk: _Optional[_Union[WeightChunk, _Mapping]] = ...) -> None: ...

class WeightStatus(_message.Message):
    __slots__ = ("sha256", "nbytes", "already_present")
    SHA256_FIELD_NUMBER: _ClassVar[int]
    NBYTES_FIELD_NUMBER: _ClassVar[int]
    ALREADY_PRESENT_FIELD_NUMBER: _ClassVar[int]
    sha256: str
    nbytes: int
    already_present: bool
    def __init__(self, sha256: _Optional[str] = ..., nbytes: _Optional[int] = ..., already_present: _Optional[bool] = ...) -> None: ...

class UploadWeightsResponse(_message.Message):
    __slots__ = ("weights",)
    WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    weights: _containers.RepeatedCompositeFieldContainer[WeightStatus]
    def __init__(self, weights: _Optional[_Iterable[_Union[WeightStatus, _Mapping]]] = ...) -> None: ...

class OpenSession(_message.Message):
    __slots__ = ("tenant", "model_id", "slice_spec_json", "slice_id", "profile", "batch_acks", "outputs_in_done", "op_timings", "progress_events", "batch_progress")
    TENANT_FIELD_NUMBER: _ClassVar[int]
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    SLICE_SPEC_JSON_FIELD_NUMBER: _ClassVar[int]
    SLICE_ID_FIELD_NUMBER: _ClassVar[int]
    PROFILE_FIELD_NUMBER: _ClassVar[int]
    BATCH_ACKS_FIELD_NUMBER: _ClassVar[int]
    OUTPUTS_IN_DONE_FIELD_NUMBER: _ClassVar[int]
    OP_TIMINGS_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_EVENTS_FIELD_NUMBER: _ClassVar[int]
    BATCH_PROGRESS_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    model_id: str
    slice_spec_json: bytes
    slice_id: str
    profile: UeProfile
    batch_acks: bool
    outputs_in_done: bool
    op_timings: bool
    progress_events: bool
    batch_progress: bool
    def __init__(self, tenant: _Optional[str] = ..., model_id: _Optional[str] = ..., slice_spec_json: _Optional[bytes] = ..., slice_id: _Optional[str] = ..., profile: _Optional[_Union[UeProfile, _Mapping]] = ..., batch_acks: _Optional[bool] = ..., outputs_in_done: _Optional[bool] = ..., op_timings: _Optional[bool] = ..., progress_events: _Optional[bool] = ..., batch_progress: _Optional[bool] = ...) -> None: ...

class UeProfile(_message.Message):
    __slots__ = ("cost_graph_json", "uplink_mbps", "downlink_mbps", "rtt_ms", "weight", "send_mbps")
    COST_GRAPH_JSON_FIELD_NUMBER: _ClassVar[int]
    UPLINK_MBPS_FIELD_NUMBER: _ClassVar[int]
    DOWNLINK_MBPS_FIELD_NUMBER: _ClassVar[int]
    RTT_MS_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    SEND_MBPS_FIELD_NUMBER: _ClassVar[int]
    cost_graph_json: bytes
    uplink_mbps: float
    downlink_mbps: float
    rtt_ms: float
    weight: float
    send_mbps: float
    def __init__(self, cost_graph_json: _Optional[bytes] = ..., uplink_mbps: _Optional[float] = ..., downlink_mbps: _Optional[float] = ..., rtt_ms: _Optional[float] = ..., weight: _Optional[float] = ..., send_mbps: _Optional[float] = ...) -> None: ...

class DefineSlice(_message.Message):
    __slots__ = ("slice_id", "slice_spec_json")
    SLICE_ID_FIELD_NUMBER: _ClassVar[int]
    SLICE_SPEC_JSON_FIELD_NUMBER: _ClassVar[int]
    slice_id: str
    slice_spec_json: bytes
    def __init__(self, slice_id: _Optional[str] = ..., slice_spec_json: _Optional[bytes] = ...) -> None: ...

class BeginRequest(_message.Message):
    __slots__ = ("request_id", "slice_id", "input_names", "inputs", "op_timings", "matmul_precision")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    SLICE_ID_FIELD_NUMBER: _ClassVar[int]
    INPUT_NAMES_FIELD_NUMBER: _ClassVar[int]
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    OP_TIMINGS_FIELD_NUMBER: _ClassVar[int]
    MATMUL_PRECISION_FIELD_NUMBER: _ClassVar[int]
    request_id: int
    slice_id: str
    input_names: _containers.RepeatedScalarFieldContainer[str]
    inputs: _containers.RepeatedCompositeFieldContainer[TensorChunk]
    op_timings: bool
    matmul_precision: str
    def __init__(self, request_id: _Optional[int] = ..., slice_id: _Optional[str] = ..., input_names: _Optional[_Iterable[str]] = ..., inputs: _Optional[_Iterable[_Union[TensorChunk, _Mapping]]] = ..., op_timings: _Optional[bool] = ..., matmul_precision: _Optional[str] = ...) -> None: ...

class WeightChunks(_message.Message):
    __slots__ = ("chunks",)
    CHUNKS_FIELD_NUMBER: _ClassVar[int]
    chunks: _containers.RepeatedCompositeFieldContainer[WeightChunk]
    def __init__(self, chunks: _Optional[_Iterable[_Union[WeightChunk, _Mapping]]] = ...) -> None: ...

class CloseSession(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class CancelRequest(_message.Message):
    __slots__ = ("request_id",)
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    request_id: int
    def __init__(self, request_id: _Optional[int] = ...) -> None: ...

class SessionRequest(_message.Message):
    __slots__ = ("open", "define_slice", "weight", "begin_request", "tensor", "close", "cancel_request", "weights", "profile")
    OPEN_FIELD_NUMBER: _ClassVar[int]
    DEFINE_SLICE_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    BEGIN_REQUEST_FIELD_NUMBER: _ClassVar[int]
    TENSOR_FIELD_NUMBER: _ClassVar[int]
    CLOSE_FIELD_NUMBER: _ClassVar[int]
    CANCEL_REQUEST_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    PROFILE_FIELD_NUMBER: _ClassVar[int]
    open: OpenSession
    define_slice: DefineSlice
    weight: WeightChunk
    begin_request: BeginRequest
    tensor: TensorChunk
    close: CloseSession
    cancel_request: CancelRequest
    weights: WeightChunks
    profile: UeProfile
    def __init__(self, open: _Optional[_Union[OpenSession, _Mapping]] = ..., define_slice: _Optional[_Union[DefineSlice, _Mapping]] = ..., weight: _Optional[_Union[WeightChunk, _Mapping]] = ..., begin_request: _Optional[_Union[BeginRequest, _Mapping]] = ..., tensor: _Optional[_Union[TensorChunk, _Mapping]] = ..., close: _Optional[_Union[CloseSession, _Mapping]] = ..., cancel_request: _Optional[_Union[CancelRequest, _Mapping]] = ..., weights: _Optional[_Union[WeightChunks, _Mapping]] = ..., profile: _Optional[_Union[UeProfile, _Mapping]] = ...) -> None: ...

class SessionOpened(_message.Message):
    __slots__ = ("session_id", "share", "limits", "missing_weights", "uplink_share", "data_ticket", "request_uplink_share")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    SHARE_FIELD_NUMBER: _ClassVar[int]
    LIMITS_FIELD_NUMBER: _ClassVar[int]
    MISSING_WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    UPLINK_SHARE_FIELD_NUMBER: _ClassVar[int]
    DATA_TICKET_FIELD_NUMBER: _ClassVar[int]
    REQUEST_UPLINK_SHARE_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    share: float
    limits: Limits
    missing_weights: _containers.RepeatedScalarFieldContainer[str]
    uplink_share: float
    data_ticket: bytes
    request_uplink_share: float
    def __init__(self, session_id: _Optional[str] = ..., share: _Optional[float] = ..., limits: _Optional[_Union[Limits, _Mapping]] = ..., missing_weights: _Optional[_Iterable[str]] = ..., uplink_share: _Optional[float] = ..., data_ticket: _Optional[bytes] = ..., request_uplink_share: _Optional[float] = ...) -> None: ...

class SliceDefined(_message.Message):
    __slots__ = ("slice_id", "graph_hash", "missing_weights")
    SLICE_ID_FIELD_NUMBER: _ClassVar[int]
    GRAPH_HASH_FIELD_NUMBER: _ClassVar[int]
    MISSING_WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    slice_id: str
    graph_hash: str
    missing_weights: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, slice_id: _Optional[str] = ..., graph_hash: _Optional[str] = ..., missing_weights: _Optional[_Iterable[str]] = ...) -> None: ...

class WeightStored(_message.Message):
    __slots__ = ("sha256", "nbytes", "already_present")
    SHA256_FIELD_NUMBER: _ClassVar[int]
    NBYTES_FIELD_NUMBER: _ClassVar[int]
    ALREADY_PRESENT_FIELD_NUMBER: _ClassVar[int]
    sha256: str
    nbytes: int
    already_present: bool
    def __init__(self, sha256: _Optional[str] = ..., nbytes: _Optional[int] = ..., already_present: _Optional[bool] = ...) -> None: ...

class WeightsStored(_message.Message):
    __slots__ = ("weights",)
    WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    weights: _containers.RepeatedCompositeFieldContainer[WeightStored]
    def __init__(self, weights: _Optional[_Iterable[_Union[WeightStored, _Mapping]]] = ...) -> None: ...

class OpTiming(_message.Message):
    __slots__ = ("name", "start_ms", "ms")
    NAME_FIELD_NUMBER: _ClassVar[int]
    START_MS_FIELD_NUMBER: _ClassVar[int]
    MS_FIELD_NUMBER: _ClassVar[int]
    name: str
    start_ms: float
    ms: float
    def __init__(self, name: _Optional[str] = ..., start_ms: _Optional[float] = ..., ms: _Optional[float] = ...) -> None: ...

class ServerTimings(_message.Message):
    __slots__ = ("total_ms", "compute_ms", "input_wait_ms", "weight_wait_ms", "queue_ms", "ops", "validation_ms")
    TOTAL_MS_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_MS_FIELD_NUMBER: _ClassVar[int]
    INPUT_WAIT_MS_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_WAIT_MS_FIELD_NUMBER: _ClassVar[int]
    QUEUE_MS_FIELD_NUMBER: _ClassVar[int]
    OPS_FIELD_NUMBER: _ClassVar[int]
    VALIDATION_MS_FIELD_NUMBER: _ClassVar[int]
    total_ms: float
    compute_ms: float
    input_wait_ms: float
    weight_wait_ms: float
    queue_ms: float
    ops: _containers.RepeatedCompositeFieldContainer[OpTiming]
    validation_ms: float
    def __init__(self, total_ms: _Optional[float] = ..., compute_ms: _Optional[float] = ..., input_wait_ms: _Optional[float] = ..., weight_wait_ms: _Optional[float] = ..., queue_ms: _Optional[float] = ..., ops: _Optional[_Iterable[_Union[OpTiming, _Mapping]]] = ..., validation_ms: _Optional[float] = ...) -> None: ...

class RequestDone(_message.Message):
    __slots__ = ("request_id", "output_names", "timings", "outputs")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_NAMES_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    request_id: int
    output_names: _containers.RepeatedScalarFieldContainer[str]
    timings: ServerTimings
    outputs: _containers.RepeatedCompositeFieldContainer[TensorChunk]
    def __init__(self, request_id: _Optional[int] = ..., output_names: _Optional[_Iterable[str]] = ..., timings: _Optional[_Union[ServerTimings, _Mapping]] = ..., outputs: _Optional[_Iterable[_Union[TensorChunk, _Mapping]]] = ...) -> None: ...

class ShareChanged(_message.Message):
    __slots__ = ("share", "uplink_share", "request_uplink_share")
    SHARE_FIELD_NUMBER: _ClassVar[int]
    UPLINK_SHARE_FIELD_NUMBER: _ClassVar[int]
    REQUEST_UPLINK_SHARE_FIELD_NUMBER: _ClassVar[int]
    share: float
    uplink_share: float
    request_uplink_share: float
    def __init__(self, share: _Optional[float] = ..., uplink_share: _Optional[float] = ..., request_uplink_share: _Optional[float] = ...) -> None: ...

class RequestFailed(_message.Message):
    __slots__ = ("request_id", "code", "message")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    request_id: int
    code: int
    message: str
    def __init__(self, request_id: _Optional[int] = ..., code: _Optional[int] = ..., message: _Optional[str] = ...) -> None: ...

class SliceRejected(_message.Message):
    __slots__ = ("slice_id", "code", "message")
    SLICE_ID_FIELD_NUMBER: _ClassVar[int]
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    slice_id: str
    code: int
    message: str
    def __init__(self, slice_id: _Optional[str] = ..., code: _Optional[int] = ..., message: _Optional[str] = ...) -> None: ...

class SessionResponse(_message.Message):
    __slots__ = ("opened", "slice_defined", "weight_stored", "output", "request_done", "request_failed", "share_changed", "slice_rejected", "weights_stored", "request_progress", "progress_batch")
    OPENED_FIELD_NUMBER: _ClassVar[int]
    SLICE_DEFINED_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_STORED_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_FIELD_NUMBER: _ClassVar[int]
    REQUEST_DONE_FIELD_NUMBER: _ClassVar[int]
    REQUEST_FAILED_FIELD_NUMBER: _ClassVar[int]
    SHARE_CHANGED_FIELD_NUMBER: _ClassVar[int]
    SLICE_REJECTED_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_STORED_FIELD_NUMBER: _ClassVar[int]
    REQUEST_PROGRESS_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_BATCH_FIELD_NUMBER: _ClassVar[int]
    opened: SessionOpened
    slice_defined: SliceDefined
    weight_stored: WeightStored
    output: TensorChunk
    request_done: RequestDone
    request_failed: RequestFailed
    share_changed: ShareChanged
    slice_rejected: SliceRejected
    weights_stored: WeightsStored
    request_progress: RequestProgress
    progress_batch: ProgressBatch
    def __init__(self, opened: _Optional[_Union[SessionOpened, _Mapping]] = ..., slice_defined: _Optional[_Union[SliceDefined, _Mapping]] = ..., weight_stored: _Optional[_Union[WeightStored, _Mapping]] = ..., output: _Optional[_Union[TensorChunk, _Mapping]] = ..., request_done: _Optional[_Union[RequestDone, _Mapping]] = ..., request_failed: _Optional[_Union[RequestFailed, _Mapping]] = ..., share_changed: _Optional[_Union[ShareChanged, _Mapping]] = ..., slice_rejected: _Optional[_Union[SliceRejected, _Mapping]] = ..., weights_stored: _Optional[_Union[WeightsStored, _Mapping]] = ..., request_progress: _Optional[_Union[RequestProgress, _Mapping]] = ..., progress_batch: _Optional[_Union[ProgressBatch, _Mapping]] = ...) -> None: ...

class RequestProgress(_message.Message):
    __slots__ = ("request_id", "ops_done", "ops_total", "input_bytes")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    OPS_DONE_FIELD_NUMBER: _ClassVar[int]
    OPS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    INPUT_BYTES_FIELD_NUMBER: _ClassVar[int]
    request_id: int
    ops_done: int
    ops_total: int
    input_bytes: int
    def __init__(self, request_id: _Optional[int] = ..., ops_done: _Optional[int] = ..., ops_total: _Optional[int] = ..., input_bytes: _Optional[int] = ...) -> None: ...

class ProgressBatch(_message.Message):
    __slots__ = ("requests",)
    REQUESTS_FIELD_NUMBER: _ClassVar[int]
    requests: _containers.RepeatedCompositeFieldContainer[RequestProgress]
    def __init__(self, requests: _Optional[_Iterable[_Union[RequestProgress, _Mapping]]] = ...) -> None: ...

class StatsRequest(_message.Message):
    __slots__ = ("session_id", "tenant")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    tenant: str
    def __init__(self, session_id: _Optional[str] = ..., tenant: _Optional[str] = ...) -> None: ...

class StoreStats(_message.Message):
    __slots__ = ("bytes_used", "capacity_bytes", "staging_bytes", "entries", "blobs", "hits", "misses", "evictions", "commits", "rejected", "pinned_bytes")
    BYTES_USED_FIELD_NUMBER: _ClassVar[int]
    CAPACITY_BYTES_FIELD_NUMBER: _ClassVar[int]
    STAGING_BYTES_FIELD_NUMBER: _ClassVar[int]
    ENTRIES_FIELD_NUMBER: _ClassVar[int]
    BLOBS_FIELD_NUMBER: _ClassVar[int]
    HITS_FIELD_NUMBER: _ClassVar[int]
    MISSES_FIELD_NUMBER: _ClassVar[int]
    EVICTIONS_FIELD_NUMBER: _ClassVar[int]
    COMMITS_FIELD_NUMBER: _ClassVar[int]
    REJECTED_FIELD_NUMBER: _ClassVar[int]
    PINNED_BYTES_FIELD_NUMBER: _ClassVar[int]
    bytes_used: int
    capacity_bytes: int
    staging_bytes: int
    entries: int
    blobs: int
    hits: int
    misses: int
    evictions: int
    commits: int
    rejected: int
    pinned_bytes: int
    def __init__(self, bytes_used: _Optional[int] = ..., capacity_bytes: _Optional[int] = ..., staging_bytes: _Optional[int] = ..., entries: _Optional[int] = ..., blobs: _Optional[int] = ..., hits: _Optional[int] = ..., misses: _Optional[int] = ..., evictions: _Optional[int] = ..., commits: _Optional[int] = ..., rejected: _Optional[int] = ..., pinned_bytes: _Optional[int] = ...) -> None: ...

class SessionStats(_message.Message):
    __slots__ = ("session_id", "tenant", "model_id", "share", "requests_done", "requests_failed", "weights_pinned", "bytes_received", "chunks_dropped", "slices_rejected")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    SHARE_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_DONE_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_FAILED_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_PINNED_FIELD_NUMBER: _ClassVar[int]
    BYTES_RECEIVED_FIELD_NUMBER: _ClassVar[int]
    CHUNKS_DROPPED_FIELD_NUMBER: _ClassVar[int]
    SLICES_REJECTED_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    tenant: str
    model_id: str
    share: float
    requests_done: int
    requests_failed: int
    weights_pinned: int
    bytes_received: int
    chunks_dropped: int
    slices_rejected: int
    def __init__(self, session_id: _Optional[str] = ..., tenant: _Optional[str] = ..., model_id: _Optional[str] = ..., share: _Optional[float] = ..., requests_done: _Optional[int] = ..., requests_failed: _Optional[int] = ..., weights_pinned: _Optional[int] = ..., bytes_received: _Optional[int] = ..., chunks_dropped: _Optional[int] = ..., slices_rejected: _Optional[int] = ...) -> None: ...

class StatsResponse(_message.Message):
    __slots__ = ("store", "active_sessions", "sessions_opened", "requests_done", "requests_failed", "profile_cache_hits", "profile_cache_misses", "session", "tenant_bytes", "uptime_s", "chunks_dropped", "slices_rejected")
    STORE_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_SESSIONS_FIELD_NUMBER: _ClassVar[int]
    SESSIONS_OPENED_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_DONE_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_FAILED_FIELD_NUMBER: _ClassVar[int]
    PROFILE_CACHE_HITS_FIELD_NUMBER: _ClassVar[int]
    PROFILE_CACHE_MISSES_FIELD_NUMBER: _ClassVar[int]
    SESSION_FIELD_NUMBER: _ClassVar[int]
    TENANT_BYTES_FIELD_NUMBER: _ClassVar[int]
    UPTIME_S_FIELD_NUMBER: _ClassVar[int]
    CHUNKS_DROPPED_FIELD_NUMBER: _ClassVar[int]
    SLICES_REJECTED_FIELD_NUMBER: _ClassVar[int]
    store: StoreStats
    active_sessions: int
    sessions_opened: int
    requests_done: int
    requests_failed: int
    profile_cache_hits: int
    profile_cache_misses: int
    session: SessionStats
    tenant_bytes: int
    uptime_s: float
    chunks_dropped: int
    slices_rejected: int
    def __init__(self, store: _Optional[_Union[StoreStats, _Mapping]] = ..., active_sessions: _Optional[int] = ..., sessions_opened: _Optional[int] = ..., requests_done: _Optional[int] = ..., requests_failed: _Optional[int] = ..., profile_cache_hits: _Optional[int] = ..., profile_cache_misses: _Optional[int] = ..., session: _Optional[_Union[SessionStats, _Mapping]] = ..., tenant_bytes: _Optional[int] = ..., uptime_s: _Optional[float] = ..., chunks_dropped: _Optional[int] = ..., slices_rejected: _Optional[int] = ...) -> None: ...
