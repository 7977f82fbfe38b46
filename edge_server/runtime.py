"""The edge server's domain facade: everything a servicer method needs, with no gRPC types.

:class:`EdgeRuntime` builds the server's parts from one :class:`~edge_server.config.ServerConfig` and hands each
call to the part whose job it is; it answers Hello and QueryWeights itself. Its parts, one job each:

- ``edge_server.sizing``: how ``--memory-mb`` is divided (reading slots, the budget for work in flight, op limits);
- ``edge_server.auth`` (``caller_of``, ``view_of``): who is calling and what of the server it may see;
- :class:`~edge_server.weight_store.WeightStore`, :class:`~edge_server.scheduler.ComputeScheduler`,
  :class:`~edge_server.session_manager.SessionManager` (sessions, their shares, token revocation);
- :class:`~edge_server.profile_service.ProfileService`: ProfileGraph (budget, cache, profiling children);
- :class:`~edge_server.server_stats.StatsReader`: Stats and the ``/metrics`` values;
- :class:`~edge_server.calls.CallGate`, :class:`~edge_server.tarpit.Tarpit`, the memory budget and validation bounds
  (``edge_server.memory``), the data channel.

It is created (and closed) by :func:`edge_server.server.create_server`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import platform
import secrets
from dataclasses import dataclass

import torch

from edge_server.allocation import EqualShareAllocator, ShareAllocator
from edge_server.auth import Authenticator, Principal, caller_of, view_of
from edge_server.calls import CallGate
from edge_server.config import ServerConfig
from edge_server.data_channel import DataChannel
from edge_server.errors import InvalidArgument
from edge_server.events import SliceDefined
from edge_server.health_admission import HealthAdmission
from edge_server.memory import Bounds, MemoryBudget
from edge_server.metrics import ServerMetrics
from edge_server.profile_budget import ANONYMOUS_SLICES, ProfileBudget, QuotaLimits
from edge_server.profile_service import ProfileService
from edge_server.profiling import ProfileCache, ProfileResult
from edge_server.sandbox import ProfileSandbox
from edge_server.scheduler import ComputeScheduler
from edge_server.server_stats import ServerStats, StatsReader
from edge_server.session import Session
from edge_server.session_manager import SessionManager
from edge_server.sizing import inflight_budget, op_limits, server_reading_slots
from edge_server.slices import MAX_OPS, allowed_ops, allowed_ops_hash, warm_up_validation
from edge_server.tarpit import PEER_KEY, Tarpit
from edge_server.tensor_codec import check_sha256
from edge_server.uploads import UploadStream, UploadTracker
from edge_server.weight_store import MIN_AREA_CHARGE, MIN_WEIGHT_CHARGE, WeightStore
from protos.values import UeProfile

logger = logging.getLogger(__name__)

SERVER_VERSION = "0.1.0"
PROTOCOL = "coinfer.v1"
MAX_QUERY = 100_000
STRANGER_BUDGET_DIVISOR = 8
"""With ``--auth-tokens``, callers without a valid token (keys ``peer:HOST``) hold together at most 1/8 of the
``--memory-mb`` budget for work in flight (``MemoryBudget.pool``); beyond it a refused call is answered at once
(review23 F1). Their health calls are not in it since session 25: they have a budget of their own
(``edge_server.health_admission``), which the pool filled by refused calls starved a tokenless prober of."""


def resolve_device(name: str) -> torch.device:
    """The torch device ``--device`` names ("cpu", "cuda", "cuda:N"; "cuda" resolved to the current index).
    Raises ValueError for a name torch does not parse, another device type, or CUDA not available."""
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise ValueError(f"bad device {name!r}: {e}") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {name!r} requested but CUDA is not available")
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
    elif device.type != "cpu":
        raise ValueError(f"unsupported device {name!r} (cpu or cuda)")
    return device


def set_tf32(allowed: bool) -> None:
    """This process's float32 CUDA convolutions and matmuls with TF32 tensor cores, or not
    (``ServerConfig.allow_tf32``). Process-wide: the server process owns its CUDA work."""
    torch.backends.cuda.matmul.allow_tf32 = bool(allowed)
    torch.backends.cudnn.allow_tf32 = bool(allowed)


def device_name(device: torch.device) -> str:
    """A human name of ``device`` (the GPU's model, else the CPU's processor or machine string)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine() or "cpu"


@dataclass(slots=True)
class HelloInfo:
    server_version: str
    protocol: str
    device: str
    device_name: str
    torch_version: str
    threads: int
    allowed_ops: list[str]
    allowed_ops_hash: str
    config: ServerConfig
    max_ops: int
    active_sessions: int
    share: float
    data_port: int = 0
    """The data channel's port (0: none)."""
    instance_id: str = ""
    """This server process's random id, new at each start (``EdgeRuntime.instance_id``)."""


class EdgeRuntime:
    """Composes the server's parts from its config and hands each servicer call to the part whose job it is
    (answering Hello and QueryWeights itself)."""

    def __init__(
        self, config: ServerConfig, allocator: ShareAllocator | None = None, *, auth: Authenticator | None = None
    ) -> None:
        """``allocator`` None: equal shares; ``auth`` None: single tenant, no authentication (the tenant is the one
        the message names). Raises ValueError for a device that cannot be used, or a ``--memory-mb`` that leaves
        under 64 MiB for work in flight (``edge_server.sizing.inflight_budget``), or ``profile_workers`` with a
        CUDA device."""
        self.config = config
        self.auth = auth
        self.metrics = ServerMetrics()
        self.instance_id = secrets.token_hex(16)
        """A random id of this server process (Hello's ``instance_id``): a client keys what it learned about this
        server across its own processes by it (``ue_client.transport_cache``); a restart is another server to it."""
        self.device = resolve_device(config.device)
        if self.device.type == "cuda":
            if config.profile_workers:
                raise ValueError(
                    "--profile-workers needs --device cpu: a profiling child's address-space limit does not bound "
                    "GPU memory and each child would make a CUDA context of its own; on CUDA, ProfileGraph runs on "
                    "the compute workers (--profile-workers 0)")
            set_tf32(config.allow_tf32)
        if config.threads:
            torch.set_num_threads(config.threads)
        self.store = WeightStore(
            config.cache_bytes,
            staging_bytes=config.staging_bytes,
            domain_of=auth.domain_of if auth is not None else None,
            isolated=auth is not None,
            quota_of=auth.quota_of if auth is not None else None,
            min_weight_charge=MIN_WEIGHT_CHARGE,
            min_area_charge=MIN_AREA_CHARGE,
        )
        self.scheduler = ComputeScheduler(config.workers)
        self.allocator = allocator or EqualShareAllocator()
        self.reading_slots = server_reading_slots(config)
        """Server-wide reading slots (``edge_server.sizing``, resolved once: unset, they depend on the RSS now)."""
        self.memory = MemoryBudget(inflight_budget(config, self.reading_slots))
        self.reads_bounded = config.max_calls_per_caller > 0 and (config.max_reading_calls_per_caller > 0
                                                                  or self.reading_slots > 0)
        """Requests are read in slots (``--max-reading-calls`` or server-wide reading slots): the server turns grpc's
        BDP probing off and gives each stream a fixed receive window (``ServerConfig.read_window_bytes``)."""
        window_bytes = max(0, config.read_window_bytes - (64 << 10)) if self.reads_bounded else 0
        self.health = HealthAdmission(self.memory, window_bytes, strangers=auth is not None)
        """The health service's own admission (``edge_server.health_admission``): with tokens, a stranger's health
        calls hold their windows in a budget of their own, carved off ``memory`` here, and are paced per host, so
        strangers' EdgeService calls cannot starve a tokenless prober (session 25)."""
        if auth is not None:
            # callers without a token (``peer:HOST``: their refused calls' receive windows in the tarpit) hold one
            # pool: from many addresses they filled the budget tenants need (review23 F1); their health calls hold
            # the health budget instead (session 25: refused calls filling the pool starved a tokenless prober)
            self.memory.pool(PEER_KEY, self.memory.limit_bytes // STRANGER_BUDGET_DIVISOR)
        self.op_limits = op_limits(config, self.device, self.memory.limit_bytes)
        self.bounds = Bounds(self.memory, self.op_limits, config.max_output_buffer_bytes)
        self.sessions = SessionManager(
            config,
            self.store,
            self.scheduler,
            self.allocator,
            self.device,
            quota_of=auth.quota_of if auth is not None else None,
            bounds=self.bounds,
            metrics=self.metrics,
        )
        self.profiling = ProfileService(config, auth, self.device, self.scheduler, self.memory, self.bounds,
                                        self.op_limits)
        self.slice_budget = ProfileBudget(QuotaLimits(config, auth, ANONYMOUS_SLICES, "slice_cpu_s",
                                                      "slice_cpu_share"),
                                          name="slice validation", quota_keys="slice_cpu_s / slice_cpu_share")
        """Each tenant's CPU budget of its sessions' slice validations (DefineSlice, OpenSession's slice): one
        shared bucket without authentication (``edge_server.profile_budget``; review17 F5)."""
        self.bounds.validation_bucket = (
            (lambda tenant: self.slice_budget.bucket(tenant)) if auth is not None
            else (lambda _tenant: self.slice_budget.bucket(ANONYMOUS_SLICES))
        )
        self.tarpit = (
            Tarpit(config.tarpit_rate, config.tarpit_burst, on_delay=self.metrics.tarpit_delayed)
            if config.tarpit_rate > 0
            else None
        )
        """Delays the error answers of callers that keep failing (``edge_server.tarpit``); None: off."""
        self.calls: CallGate | None = (
            CallGate(config.max_calls_per_caller, config.max_waiting_calls_per_caller, config.first_message_s,
                     on_refused=self.metrics.rpc_error, max_peer_calls=config.max_stranger_calls,
                     max_reading=config.max_reading_calls_per_caller, memory=self.memory,
                     trimmer=self.bounds.trimmer, server_reading=self.reading_slots,
                     reading_grace_s=config.reading_grace_s,
                     contended_s=config.contended_first_message_s)
            if config.max_calls_per_caller > 0
            else None
        )
        """Every call from its start to its answer (``edge_server.calls``): calls open per caller bounded, a
        deadline on the first message, revoked tokens' calls ended; None: off."""
        if self.reads_bounded:  # a call's window beyond grpc's default 64 KiB, held in the budget for its life
            self.calls.window_bytes = window_bytes  # (review21b finding 1)
            self.calls.next_read_bytes = config.max_message_bytes  # a stream's reads past its first (session 22)
        self.data: DataChannel | None = None
        """The data channel for weight bytes (``edge_server.data_channel``), when the server runs one."""
        self.counters = StatsReader(auth, self.sessions, self.store, self.scheduler, self.profiling.cache,
                                    self.profiling.budget, self.memory, self.bounds, self.calls, self.health)
        self._allowed = allowed_ops()
        self._allowed_hash = allowed_ops_hash()
        warm_up_validation()  # once per process, at start: not on the first client's clock

    # -- the parts' state, by the names tests and tools read --------------------------------------------

    @property
    def profiles(self) -> ProfileCache:
        """ProfileGraph's cache (``ProfileService.cache``)."""
        return self.profiling.cache

    @property
    def profile_budget(self) -> ProfileBudget:
        """Each tenant's ProfileGraph CPU budget (``ProfileService.budget``)."""
        return self.profiling.budget

    @property
    def sandbox(self) -> ProfileSandbox | None:
        """The profiling children (``ProfileService.sandbox``; None: profiles run in this process)."""
        return self.profiling.sandbox

    @property
    def profiles_cancelled(self) -> int:
        """Profiles cancelled while they ran (``ProfileService.cancelled``)."""
        return self.profiling.cancelled

    # -- calls ----------------------------------------------------------------------------------------

    def caller(self, authorization: str | None, claimed_tenant: str, *, need_tenant: bool = True,
               principal: Principal | None = None) -> Principal:
        """Who is calling: :func:`edge_server.auth.caller_of` (PermissionDenied, Unauthenticated,
        InvalidArgument as it says)."""
        return caller_of(self.auth, authorization, claimed_tenant, need_tenant=need_tenant, principal=principal)

    def hello(self, who: Principal) -> HelloInfo:
        """Hello: the server's build, device, op allowlist and limits, the sessions ``who`` may see and the share
        its tenant would get now."""
        return HelloInfo(
            server_version=SERVER_VERSION,
            protocol=PROTOCOL,
            device=str(self.device),
            device_name=device_name(self.device),
            torch_version=torch.__version__,
            threads=torch.get_num_threads(),
            allowed_ops=self._allowed,
            allowed_ops_hash=self._allowed_hash,
            config=self.config,
            max_ops=MAX_OPS,
            active_sessions=len(self.sessions.visible(view_of(self.auth, who))),
            share=self.allocator.preview_share(who.tenant),
            data_port=self.data.port if self.data is not None else 0,
            instance_id=self.instance_id,
        )

    def query_weights(self, who: Principal, sha256s: list[str]) -> list[str]:
        """QueryWeights: which of ``sha256s`` (lowercase hex; at most ``MAX_QUERY``, else InvalidArgument) the
        caller's tenant may use from the weight store."""
        if len(sha256s) > MAX_QUERY:
            raise InvalidArgument(f"at most {MAX_QUERY} hashes per query")
        for s in sha256s:
            check_sha256(s)
        return self.store.query(who.tenant, sha256s)

    async def profile(self, spec_json: bytes, iterations: int, warmup: int, *, tenant: str = "") -> ProfileResult:
        """ProfileGraph: :meth:`edge_server.profile_service.ProfileService.profile`."""
        return await self.profiling.profile(spec_json, iterations, warmup, tenant=tenant)

    def stats(self, who: Principal | None = None, session_id: str = "", tenant: str = "") -> ServerStats:
        """Stats: :meth:`edge_server.server_stats.StatsReader.stats` (PermissionDenied for another tenant's)."""
        return self.counters.stats(who, session_id, tenant)

    def metrics_snapshot(self) -> dict[str, dict[str, float]]:
        """``/metrics``' values: :meth:`edge_server.server_stats.StatsReader.metrics_snapshot` (event loop)."""
        return self.counters.metrics_snapshot()

    # -- sessions ------------------------------------------------------------------------------------

    async def open_session(
        self, who: Principal, model_id: str, profile: UeProfile | None, slice_id: str, spec_json: bytes,
        peer: str = "",
    ) -> tuple[Session, SliceDefined | None]:
        """OpenSession: see :meth:`SessionManager.open`. The profile's ``weight`` (the UE's priority in
        ARA's weighted latency sum) is the client's claim: it is capped at the tenant's
        ``quota.compute_weight`` (1.0 without authentication), so no client buys a larger share of the
        cell's compute or uplink by claiming a larger weight. ARA's planner CPU is charged per identity a
        client cannot mint by naming it (``SessionInfo.planner_key``): the token's tenant with
        authentication, else ``peer`` (the call's gRPC peer, one per connection; "" for in-process
        callers: the tenant), and all of them to one global bucket."""
        planner_key = f"tenant:{who.tenant}" if self.auth is not None else (f"peer:{peer}" if peer else "")
        if profile is not None:
            cap = who.quota.compute_weight if who.quota is not None else 1.0
            if profile.weight > cap:
                logger.info(
                    "tenant %s: profile weight %g capped at %g (quota compute_weight)", who.tenant, profile.weight, cap
                )
                profile = dataclasses.replace(profile, weight=cap)
        return await self.sessions.open(
            who.tenant, model_id, profile, slice_id=slice_id, spec_json=spec_json, planner_key=planner_key
        )

    def reload_tokens(self) -> bool:
        """Re-read the tokens file (SIGHUP; on the event loop) and end every open session whose bearer token it no
        longer maps to the session's tenant (revoked or rotated) with UNAUTHENTICATED: the token is checked at each
        call's start, and a Session stream lives for hours (session 16: a revoked tenant's open session went on
        running requests and uploading weights). Its stream is cancelled if the end cannot reach it, as an idle
        session's. Returns False (nothing changed) if the file is bad or there is no authentication."""
        if self.auth is None or not self.auth.reload():
            return False
        if self.calls is not None:  # its other calls (an UploadWeights mid-weight, a ProfileGraph running, ...)
            self.calls.revoke(self.auth.holds)
        self.sessions.end_revoked(self.auth.holds)
        return True

    async def close_session(self, session: Session) -> None:
        await self.sessions.close(session)

    def attach_data_channel(self, data: DataChannel) -> None:
        """Serve ``data``: sessions get its tickets, and a session's end voids its ticket and connection."""
        self.data = data
        self.sessions.on_closed = data.session_closed

    def data_ticket(self, session: Session) -> bytes:
        """A one-time ticket to the data channel for ``session`` (b"": no data channel)."""
        if self.data is None:
            return b""
        return self.data.issue(session, asyncio.get_running_loop())

    # -- uploads outside a session -------------------------------------------------------------------

    def upload_stream(self, who: Principal, session_id: str = "") -> UploadStream:
        """UploadWeights: the weights go to the caller's tenant; with ``session_id`` (an open session of
        the same tenant: NotFound otherwise, whoever's it is) they are pinned for that session."""
        tenant = who.tenant
        session = self.sessions.get_for_tenant(session_id, tenant) if session_id else None

        def committed(sha: str) -> None:
            if session is not None and not session.closed:
                session.weight_committed(sha, uploaded_here=True)
            self.sessions.weight_committed(tenant, sha)

        return UploadStream(
            UploadTracker(self.store, tenant), committed, session.touch if session is not None else None
        )

    # -- lifecycle -----------------------------------------------------------------------------------

    def share_of(self, session_id: str) -> float:
        return self.scheduler.share(session_id)

    def request_uplink_share_of(self, session_id: str) -> float:
        """The share of the cell a session's cut tensors of a request in flight may use (0: none given;
        ``SessionManager._request_shares``)."""
        return self.sessions.request_uplink_shares.get(session_id, 0.0)

    def uplink_share_of(self, session_id: str) -> float:
        """The session's share of the cell's uplink (0..1]; 0 when the allocator gives none."""
        return self.sessions.uplink_shares.get(session_id, 0.0)

    async def close(self) -> None:
        if self.data is not None:
            self.data.close()
        await self.sessions.close_all()
        self.scheduler.close(wait=False)
        self.bounds.compile_slots.close()
        self.bounds.trimmer.close()
        self.profiling.close()
        try:  # ARA's planner child ends with the server (no orphan process)
            self.allocator.close()
        except Exception:
            logger.exception("closing the allocator failed")
