"""Server configuration (plain data): the one source of the server's defaults.

``create_server`` and the ``coinfer-edge`` CLI both read their defaults from ``ServerConfig()``'s
fields, so a default is written here and nowhere else.
"""

from __future__ import annotations

from dataclasses import dataclass

from edge_server.ranges import CHUNK_BYTES, PROGRESS_INTERVAL_MS

MiB = 1 << 20


@dataclass(frozen=True, slots=True)
class ServerConfig:
    device: str = "cpu"
    """torch device slices run on ("cpu", "cuda", "cuda:1")."""
    allow_tf32: bool = False
    """CUDA only: let convolutions and matmuls of float32 slices use TF32 (10-bit mantissa) tensor cores. Off by
    default: a UE's float32 model then gets float32 arithmetic on the server too (PyTorch's own default turns
    TF32 on for cuDNN convolutions, which moved resnet18's logits ~1e-3 from the UE's eager run on an H200,
    docs/results/gpu/session29/). ``coinfer-edge serve --tf32`` trades that for speed."""
    cache_bytes: int = 1024 * MiB
    """Weight store capacity (verified weights, each distinct content once)."""
    staging_bytes: int | None = None
    """Bound on bytes of partial uploads (weights and request tensors) held at once (None: half the
    cache, at least 64 MiB; resolved to an int at construction)."""
    max_sessions: int = 64
    max_requests_per_session: int = 16
    """Requests of one session in flight at once."""
    threads: int | None = None
    """torch intra-op threads (None: leave torch's default). ``coinfer-edge serve`` resolves an unset
    ``--threads`` with the default rule, :func:`edge_server.cpus.compute_threads`."""
    workers: int = 1
    """Compute worker threads (slots) per device; sessions share them by weighted fair queuing."""
    max_chunk_bytes: int = 4 * MiB
    """Largest chunk payload accepted: 16 KiB to 64 MiB (``ranges.CHUNK_BYTES``, the range clients take)."""
    max_chunks_per_message: int = 256
    """Chunks one ``SessionRequest.weights`` message may pack (small weights together), and cut tensors one
    ``BeginRequest`` may carry inline (``BeginRequest.inputs``); their data together is bounded by
    ``max_chunk_bytes``."""
    preferred_chunk_bytes: int = 1 * MiB
    """Chunk size for outputs (and the one advertised to clients)."""
    max_message_bytes: int = 8 * MiB
    """gRPC message size limit both ways (chunks are small; slice JSON must fit)."""
    max_tensor_bytes: int = 1 << 30
    """Largest single tensor a slice may declare."""
    max_slice_bytes: int = 4 << 30
    """Bound on inputs + weights + op outputs of one slice (checked before it runs)."""
    max_slices_per_session: int = 8
    max_cost_graph_ops: int = 10_000
    """Most ops a UE's cost graph (``UeProfile.cost_graph_json``) may have (``Limits.max_cost_graph_ops``):
    more is INVALID_ARGUMENT, refused before the parse where the text's shape shows it
    (``edge_server.profile_intake``); 0: no limit. Also ARA's own bound
    (``edge_server.allocation.MAX_COST_GRAPH_OPS``)."""
    slice_time_slice_ms: float = 5.0
    """A compute task runs consecutive ready ops for at most about this long before yielding."""
    profile_iterations: int = 10
    profile_warmup: int = 2
    profile_max_iterations: int = 50
    profile_cache_entries: int = 128
    profile_workers: int = 0
    """ProfileGraph jobs run at once in child processes (``edge_server.sandbox``): validation and the run
    off the server's GIL, under an address-space limit, a crash contained. 0 (default): in the server
    process, on the compute workers in fair time slices with session requests: on a 2-core box a child
    that computes beside the server made a victim tenant's requests slower (server time 28-30 ms under
    the abandon attack vs 8-11 ms in process, runs back to back), because it does not yield to them."""
    profile_nice: int = 0
    """CPU priority offset (Linux nice, 0-19) of the profiling children: higher protects sessions more
    under contention but stretches the measured op times with the machine's load."""
    profile_cpu_s: float = 10.0
    """Default ProfileGraph CPU budget of a tenant (``--profile-cpu-s``; quota ``profile_cpu_s``): a bucket
    of this many CPU seconds (validation + profile run, abandoned work included); 0: no budget. Without
    authentication all ProfileGraph callers share one bucket (``edge_server.profile_budget``)."""
    profile_cpu_share: float = 0.1
    """Refill rate of that bucket in CPU seconds per second (``--profile-cpu-share``; quota
    ``profile_cpu_share``): what a tenant's profiling may take of one CPU in the long run."""
    slice_cpu_s: float = 10.0
    """Default slice validation CPU budget of a tenant (``--slice-cpu-s``; quota ``slice_cpu_s``): its sessions'
    DefineSlice / OpenSession validations are charged to a bucket of this many CPU seconds; an empty bucket
    refuses them RESOURCE_EXHAUSTED and a validation stops mid-way once it is spent; 0: no budget. Without
    authentication all sessions share one bucket. Real slices cost 0.02-0.1 CPU s (resnet50, googlenet, vit_b_16)
    and a 20k-op chain under 1 s; 100k ops whose meta-kernel calls all differ cost ~50-140 s (review17 F5)."""
    slice_cpu_share: float = 0.2
    """Refill rate of that bucket in CPU seconds per second (``--slice-cpu-share``; quota ``slice_cpu_share``)."""
    cell_uplink_mbps: float | None = None
    """The uplink rate (Mbit/s) of the cell the UEs share (``--cell-uplink-mbps``), when the operator knows
    it: the most a UE's claimed ``uplink_mbps`` / ``send_mbps`` counts for in ARA's plans
    (``SessionManager.plausible``). None: unknown (a claim is bounded only by ``edge_server.ranges``)."""
    cell_downlink_mbps: float | None = None
    """The downlink rate (Mbit/s) of the cell (``--cell-downlink-mbps``), when the operator knows it: the most
    a UE's claimed ``downlink_mbps`` counts for in ARA's plans. None: unknown."""
    cell_rtt_ms: float | None = None
    """The round trip (ms) of the cell itself (``--cell-rtt-ms``), when the operator knows it: the least a UE's
    claimed ``rtt_ms`` counts for (no UE in the cell is closer). None: unknown."""
    tls_cert_file: str | None = None
    """PEM certificate chain of the server (with ``tls_key_file``): serve TLS."""
    tls_key_file: str | None = None
    """PEM private key of the server."""
    tls_client_ca_file: str | None = None
    """PEM CA bundle: require client certificates signed by it (mutual TLS)."""
    insecure: bool = False
    """Allow plain text on a non-loopback address (without TLS the server refuses to bind one)."""
    auth_tokens_file: str | None = None
    """The operator's tokens file (``edge_server.auth``); None: single tenant, no authentication."""
    session_idle_s: float = 300.0
    """A session with no message from its client and no request in flight for this long is closed."""
    upload_progress_bytes: int = 1 << 20
    """An UploadWeights call with a weight half-received is ended (DEADLINE_EXCEEDED) unless at least this many
    bytes of weights its tenant does not hold already arrive within each ``session_idle_s`` (>= 1): any message
    used to restart the clock, so one byte every 299 s held a tenant's staging for ever (review22), and until
    session 23 any weight's end did (re-sending a held 1-byte weight: review23 F2). 1 MiB per 300 s: 28 kbit/s.
    The clock also restarts whenever no weight is half-received. The same rule and bytes hold a Session stream's
    weights half-received in-stream (any message used to keep them: session 23), its session then ending as idle
    (a request computing restarts it)."""
    keepalive_time_s: float = 60.0
    """gRPC keepalive ping interval of the server (a dead peer is noticed within time + timeout)."""
    keepalive_timeout_s: float = 20.0
    health_port: int | None = None
    """Serve the health service also on this port of the server's host, in plain text, for the operator's probers
    (``edge_server.health_listener``; 0: any free port; None: none)."""
    metrics_port: int | None = None
    """Serve Prometheus metrics over HTTP on this port (0: any free port; None: no endpoint)."""
    metrics_host: str = "127.0.0.1"
    """Address of the metrics endpoint (per-tenant names are in it: loopback unless the operator says)."""
    grace_s: float = 5.0
    """Drain time on SIGTERM/SIGINT (``coinfer-edge serve --grace``): running calls get this long."""
    memory_bytes: int = 0
    """Server-wide memory cap (``--memory-mb``; 0: none). What is left after the process's baseline, the
    weight cache and the staging area is the budget for work in flight (``edge_server.memory``)."""
    op_time_ms: float = 2000.0
    """Time budget of one op (``--op-time-ms``), checked before a slice runs from its FLOPs and the
    device rate measured at start (``edge_server.op_budget``)."""
    progress_interval_ms: float = 250.0
    """A request in flight is reported (``RequestProgress``: ops run, cut-tensor bytes received) at most this often
    to a client that asked (``OpenSession.progress_events``), when it moved and nothing else waits to be sent (in
    rounds, one ``ProgressBatch`` message each to a client that sets ``OpenSession.batch_progress``; the next round
    an interval after the previous one was written: ``RequestRunner._report_progress``); 0: never. Without reports
    a client's deadline could not tell a slow server from a stalled one: it gave up after ``max(1 s, 2 x the split's
    expected compute + 3 sigma)`` of silence, and a server validating a slice or computing under load (96-320 ms of
    validation seen under two busy loops, session 23) was silent that long."""
    max_output_buffer_bytes: int = 16 * MiB
    """Output bytes a session may have produced and not yet sent: beyond it the session's requests wait
    before their next op (flow control for a client that does not read)."""
    data_port: int | None = 0
    """Port of the data channel for weight bytes (``edge_server.data_channel``) on the gRPC host, TLS as
    gRPC (0, the default: any free port, advertised in ``Limits.data_port``; None: no data channel,
    weights go in-stream). A gRPC address without a TCP host (``unix:PATH``) gets none."""
    data_max_connections: int = 64
    """Data connections open at once, server-wide (one per session at most)."""
    data_idle_s: float = 60.0
    """A data connection with a weight half-received is closed (its partial weights dropped) once it went this
    long without ``data_progress_bytes`` of weights its tenant does not hold already; between weights it may
    idle as long as its session lives."""
    data_progress_bytes: int = 64 << 10
    """Progress on a data connection (``data_idle_s``; the rule of ``upload_progress_bytes``, counted as bytes
    arrive, within a frame too): 64 KiB per 60 s, 8.7 kbit/s of new weights. Until session 23 any byte restarted a
    per-read timeout, and every frame (a held 1-byte weight re-sent every 0.3 s) did: a half-received 4 MiB
    weight's staging was held for ever. A data connection ended this way is not the session's end: its UE sends
    the rest in-stream."""
    tarpit_rate: float = 10.0
    """Error answers per second a caller (a tenant, or an address without a token) gets once it has spent
    its ``tarpit_burst``; further error answers wait for their slot (``edge_server.tarpit``): a flood of
    failing calls slows to this rate. 0: no tarpit."""
    tarpit_burst: int = 100
    """Error answers a caller gets at once before the tarpit delays its next ones."""
    max_calls_per_caller: int = 256
    """Calls one caller (the tenant of a valid token, else a peer address) may have open at once, a refusal
    waiting in the tarpit included; one more is RESOURCE_EXHAUSTED at once (``edge_server.calls``). 0: no gate
    (no bound, no first-message deadline, no revocation of running calls)."""
    max_stranger_calls: int = 4096
    """Calls open at once over all callers known by their address (no valid token: strangers, or every caller of a
    server without ``--auth-tokens``): one more is RESOURCE_EXHAUSTED at once (a stranger at many addresses)."""
    max_waiting_calls_per_caller: int = 32
    """Of them, calls still waiting for their first message: one more ends the caller's oldest such call."""
    max_reading_calls_per_caller: int = 0
    """Unary calls one caller key may have reading or holding their request at once (``--max-reading-calls``;
    0: no bound, the default): the others wait before grpc reads their message
    (``edge_server.calls.CallGate.reading``). Set, it also turns grpc's BDP probing off (``grpc.http2.bdp_probe``),
    without which the bound holds nothing back: grpc widens the receive windows and takes in every call's message
    whether it is read or not. 200 Hello calls of 7 MiB at once from one token: server peak RSS +1049 MiB without,
    +112 MiB with 4 (+271 with BDP probing off alone; docs/results/attack/session18/). The cost: each message over
    64 KiB the server receives (a cut tensor, a weight chunk in-stream) waited one round trip for its window
    (session 21: a 46 MB in-stream upload 1.96-3.03x as long at 400 Mbit/s, 20-40 ms RTT); with either bound the
    server now gives each stream a fixed ``read_window_bytes`` window instead."""
    max_reading_bytes: int | None = None
    """Bytes of requests being received at once, server-wide (``--max-reading-mb``; 0: no bound; None, the default:
    under ``memory_bytes`` one slot per 160 MiB of the budget for work in flight, 2 to 8, none under two:
    ``edge_server.sizing.reading_slots``; ``--memory-mb 1024``: 4 slots, 32 MiB; session 21): a
    unary call's message or a stream's first takes one of ``max(1, max_reading_bytes // max_message_bytes)`` reading
    slots before grpc reads it (its size is not known before: each counts as the message limit) until it is decoded
    (``edge_server.reading_slots.ReadingSlots``); under ``--memory-mb`` the budget for work in flight is that much
    smaller times ``edge_server.calls.RECEIVE_COPIES`` (a message being received is held about twice: grpc's buffer
    and its bytes), so what is received and what is held stay under the cap together. Set, it turns grpc's BDP
    probing off as ``max_reading_calls_per_caller`` does (needs the call gate). One caller holds or waits for at most
    half of the slots (``ReadingSlots.max_share``, at least one: with a single slot one silent call still holds it for
    ``first_message_s``), and a stream gives its slot back once its first message is decoded (review20b F2). 64
    tenants' 6.45 MiB ProfileGraphs at once: +862-892 MiB of server RSS without, under the 722 MiB budget with it
    (docs/results/attack/session20/)."""
    reading_grace_s: float = 5.0
    """Seconds a call keeps a server-wide reading slot (``max_reading_bytes``) its caller holds beyond its share of
    them (the slots over the callers holding or waiting for one, at least one) once a caller under its share waits
    (``--reading-grace-s``; < 0: never taken back): then it is ended UNAVAILABLE ("retry") and its slot goes to the
    waiting caller (``edge_server.reading_slots.ReadingSlots._take_back``). Two tenants' silent calls holding half
    of the slots each kept a third tenant's Hello waiting ``first_message_s`` (session 20's tester)."""
    contended_first_message_s: float = 30.0
    """Seconds a call keeps a server-wide reading slot within its caller's share without its first message arriving,
    once another caller waits for one (``--contended-first-message-s``; 0: until ``first_message_s``): then it is
    ended UNAVAILABLE ("retry") and its slot goes to the waiting caller
    (``edge_server.reading_slots.ReadingSlots._take_back``). As many colluding tenants as slots, one silent call
    each, held every slot until ``first_message_s`` (session 22). 30 s: an 8 MiB first message at 2.2 Mbit/s, 4 MiB
    at 1.1; a slower sender is ended only while someone waits."""
    read_window_bytes: int = 1 << 20
    """The receive window of each stream while requests are read in slots (``--read-window-kb``; grpc's
    ``grpc.http2.lookahead_bytes``, with BDP probing off): a message up to this size is received without waiting a
    round trip for its window, and a stream carries up to this much per round trip (1 MiB at 20 ms: 420 Mbit/s);
    an unread call holds up to this much of its message outside the memory budget. Session 21 at 400 Mbit/s each
    way, 40 ms RTT: the initial 64 KiB window made a 46 MB upload 2.8-3.1x as long and a 256 KiB Hello 1.9x, 1 MiB
    none for the Hello; 64 tenants' 6.45 MiB ProfileGraphs at once under ``--memory-mb 1024``: +495 / +509 / +674 /
    +759 MiB of server RSS with 64 KiB / 1 / 2 / 4 MiB against a 658 MiB budget (docs/results/attack/session21/)."""
    first_message_s: float = 120.0
    """A call's first message (OpenSession, the UploadHeader, a unary call's request) within this many seconds
    of its start, else DEADLINE_EXCEEDED (0: no deadline). Generous: a first message arrives whole, and an
    8 MiB OpenSession or ProfileGraph over a 1 Mbit/s uplink takes 67 s; silent calls are bounded by count
    (``max_waiting_calls_per_caller``), this ends the last of them."""
    max_op_workspace_bytes: int = 2 << 30
    """Kernel scratch one op may take (an im2col convolution's columns...); also bounded by half the
    in-flight budget under a memory cap."""

    def __post_init__(self) -> None:
        for name in ("upload_progress_bytes", "data_progress_bytes"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an int >= 1, not {v!r}")
        if not self.data_idle_s > 0:  # also how long the data channel waits for the UE to read its acknowledgements
            raise ValueError(f"data_idle_s must be > 0, not {self.data_idle_s!r}")
        PROGRESS_INTERVAL_MS.check("progress_interval_ms", self.progress_interval_ms)
        if not isinstance(self.max_chunk_bytes, int):
            raise ValueError(f"max_chunk_bytes must be an int, not {self.max_chunk_bytes!r}")
        CHUNK_BYTES.check("max_chunk_bytes", self.max_chunk_bytes)
        if self.staging_bytes is None:
            staging = max(64 * MiB, self.cache_bytes // 2)
            if self.memory_bytes:  # under a cap: at most an eighth of it
                staging = min(staging, max(8 * MiB, self.memory_bytes // 8))
            object.__setattr__(self, "staging_bytes", staging)
