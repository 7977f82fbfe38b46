"""The edge server's domain facade: everything a servicer method needs, with no gRPC types.

It owns the weight store, the compute scheduler, the session manager and the profile cache, and is
created (and closed) by :func:`edge_server.server.create_server`.
"""

from __future__ import annotations

import asyncio
import logging
import platform
import time
from dataclasses import dataclass

import torch

from edge_server.allocation import EqualShareAllocator, ShareAllocator
from edge_server.auth import Authenticator, Principal
from edge_server.config import ServerConfig
from edge_server.errors import InvalidArgument, PermissionDenied, Unauthenticated
from edge_server.events import SliceDefined
from edge_server.ids import check_id
from edge_server.profiling import ProfileCache, ProfileResult, profilable_part, profile_slice
from edge_server.scheduler import ComputeScheduler, SchedulerStats
from edge_server.session import Session
from edge_server.session_manager import SessionManager
from edge_server.slices import MAX_OPS, allowed_ops, allowed_ops_hash, compile_slice
from edge_server.tensor_codec import check_sha256
from edge_server.uploads import UploadStream, UploadTracker
from edge_server.weight_store import StoreStats, WeightStore
from protos.values import UeProfile

logger = logging.getLogger(__name__)

SERVER_VERSION = "0.1.0"
PROTOCOL = "coinfer.v1"
MAX_QUERY = 100_000


def resolve_device(name: str) -> torch.device:
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise ValueError(f"bad device {name!r}: {e}") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("device 'cuda' requested but CUDA is not available")
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
    elif device.type != "cpu":
        raise ValueError(f"unsupported device {name!r} (cpu or cuda)")
    return device


def device_name(device: torch.device) -> str:
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


@dataclass(slots=True)
class SessionSnapshot:
    session_id: str
    tenant: str
    model_id: str
    share: float
    requests_done: int
    requests_failed: int
    weights_pinned: int
    bytes_received: int
    chunks_dropped: int = 0
    slices_rejected: int = 0


@dataclass(slots=True)
class ServerStats:
    """vLLM-style stats snapshot."""

    store: StoreStats
    scheduler: SchedulerStats
    active_sessions: int
    sessions_opened: int
    requests_done: int
    requests_failed: int
    profile_cache_hits: int
    profile_cache_misses: int
    uptime_s: float
    session: SessionSnapshot | None = None
    tenant_bytes: int = 0
    chunks_dropped: int = 0
    slices_rejected: int = 0


class EdgeRuntime:
    def __init__(
        self, config: ServerConfig, allocator: ShareAllocator | None = None, *, auth: Authenticator | None = None
    ) -> None:
        self.config = config
        self.auth = auth
        """None: single tenant, no authentication (the tenant is the one the message names)."""
        self.device = resolve_device(config.device)
        if config.threads:
            torch.set_num_threads(config.threads)
        self.store = WeightStore(
            config.cache_bytes,
            staging_bytes=config.staging_bytes,
            domain_of=auth.domain_of if auth is not None else None,
            isolated=auth is not None,
            quota_of=auth.quota_of if auth is not None else None,
        )
        self.scheduler = ComputeScheduler(config.workers)
        self.allocator = allocator or EqualShareAllocator()
        self.sessions = SessionManager(
            config,
            self.store,
            self.scheduler,
            self.allocator,
            self.device,
            quota_of=auth.quota_of if auth is not None else None,
        )
        self.profiles = ProfileCache(capacity=config.profile_cache_entries)
        self.started = time.monotonic()
        self._allowed = allowed_ops()
        self._allowed_hash = allowed_ops_hash()

    # -- identity ------------------------------------------------------------------------------------

    def caller(self, authorization: str | None, claimed_tenant: str, *, need_tenant: bool = True) -> Principal:
        """Who is calling. With authentication the tenant comes from the bearer token: a message naming
        another tenant is PermissionDenied ("" means the token's tenant); without it, the tenant is the
        one the message names (InvalidArgument if empty and ``need_tenant``), with every right.
        Raises Unauthenticated if the token is unknown (the interceptor normally refused it already)."""
        if self.auth is None:
            if need_tenant or claimed_tenant:
                check_id("tenant", claimed_tenant)
            return Principal(claimed_tenant, operator=True)
        p = self.auth.authenticate(authorization)
        if p is None:
            raise Unauthenticated("missing or unknown bearer token")
        if claimed_tenant and claimed_tenant != p.tenant:
            raise PermissionDenied(f"this token is tenant {p.tenant!r}; the message names another tenant")
        return p

    def _sessions_visible(self, who: Principal) -> list[Session]:
        if self.auth is None or who.operator:
            return list(self.sessions.sessions.values())
        return [s for s in self.sessions.sessions.values() if s.tenant == who.tenant]

    # -- unary calls ---------------------------------------------------------------------------------

    def hello(self, who: Principal) -> HelloInfo:
        tenant = who.tenant
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
            active_sessions=len(self._sessions_visible(who)),
            share=self.allocator.preview_share(tenant),
        )

    def query_weights(self, who: Principal, sha256s: list[str]) -> list[str]:
        tenant = who.tenant
        if len(sha256s) > MAX_QUERY:
            raise InvalidArgument(f"at most {MAX_QUERY} hashes per query")
        for s in sha256s:
            check_sha256(s)
        return self.store.query(tenant, sha256s)

    async def profile(self, spec_json: bytes, iterations: int, warmup: int) -> ProfileResult:
        cfg = self.config
        iterations = min(iterations or cfg.profile_iterations, cfg.profile_max_iterations)
        warmup = min(warmup or cfg.profile_warmup, cfg.profile_max_iterations)
        spec_json, _unknown = await asyncio.to_thread(profilable_part, spec_json)  # unknown ops: no cost
        cs = await asyncio.to_thread(
            compile_slice,
            spec_json,
            device=self.device,
            max_tensor_bytes=cfg.max_tensor_bytes,
            max_slice_bytes=cfg.max_slice_bytes,
            require_hashes=False,
        )

        async def compute() -> ProfileResult:
            # profiling shares the device with sessions like any other tenant's work
            res = await self.scheduler.run("__profile__", lambda: profile_slice(cs, iterations, warmup))
            return res.value

        return await self.profiles.get_or_compute((cs.graph_hash, iterations), compute)

    def stats(self, who: Principal | None = None, session_id: str = "", tenant: str = "") -> ServerStats:
        """Server counters. With authentication a tenant sees only its own sessions and weights (another
        tenant's session or tenant named: PermissionDenied); an operator token sees everything."""
        who = who or Principal("", operator=True)
        if self.auth is not None and not who.operator and tenant and tenant != who.tenant:
            raise PermissionDenied("only an operator token may read another tenant's stats")
        snap = None
        if session_id:
            s = self.sessions.get(session_id)
            if self.auth is not None and not who.operator and s.tenant != who.tenant:
                raise PermissionDenied("the session belongs to another tenant")
            sc = s.counters
            snap = SessionSnapshot(
                s.session_id,
                s.tenant,
                s.model_id,
                self.scheduler.share(s.session_id),
                sc.requests_done,
                sc.requests_failed,
                len(s.available),
                sc.bytes_received,
                sc.chunks_dropped,
                sc.slices_rejected,
            )
        scoped = self.auth is not None and not who.operator  # a tenant's own view
        own = who.tenant if scoped else None
        c = self.sessions.totals(own)
        return ServerStats(
            store=self.store.stats(own),
            scheduler=self.scheduler.stats(),
            active_sessions=len(self._sessions_visible(who)),
            sessions_opened=self.sessions.opened(own),
            requests_done=c.requests_done,
            requests_failed=c.requests_failed,
            profile_cache_hits=self.profiles.hits,
            profile_cache_misses=self.profiles.misses,
            uptime_s=time.monotonic() - self.started,
            session=snap,
            tenant_bytes=self.store.tenant_bytes(tenant or (own or "")) if (tenant or own) else 0,
            chunks_dropped=c.chunks_dropped,
            slices_rejected=c.slices_rejected,
        )

    # -- sessions ------------------------------------------------------------------------------------

    async def open_session(
        self, who: Principal, model_id: str, profile: UeProfile | None, slice_id: str, spec_json: bytes
    ) -> tuple[Session, SliceDefined | None]:
        """OpenSession: see :meth:`SessionManager.open`."""
        return await self.sessions.open(who.tenant, model_id, profile, slice_id=slice_id, spec_json=spec_json)

    async def close_session(self, session: Session) -> None:
        await self.sessions.close(session)

    # -- uploads outside a session -------------------------------------------------------------------

    def upload_stream(self, who: Principal, session_id: str = "") -> UploadStream:
        """UploadWeights: the weights go to the caller's tenant; with ``session_id`` (an open session of
        the same tenant: NotFound / PermissionDenied otherwise) they are pinned for that session."""
        tenant = who.tenant
        session = self.sessions.get_for_tenant(session_id, tenant) if session_id else None

        def committed(sha: str) -> None:
            if session is not None and not session.closed:
                session.weight_committed(sha, uploaded_here=True)
            self.sessions.weight_committed(tenant, sha)

        return UploadStream(UploadTracker(self.store, tenant), committed)

    # -- lifecycle -----------------------------------------------------------------------------------

    def share_of(self, session_id: str) -> float:
        return self.scheduler.share(session_id)

    async def close(self) -> None:
        await self.sessions.close_all()
        self.scheduler.close(wait=False)
