"""The edge server's domain facade: everything a servicer method needs, with no gRPC types.

It owns the weight store, the compute scheduler, the session manager and the profile cache, and is
created (and closed) by :func:`edge_server.server.create_server`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import platform
import time
from dataclasses import dataclass

import torch

from edge_server.allocation import EqualShareAllocator, ShareAllocator
from edge_server.auth import Authenticator, Principal
from edge_server.calls import RECEIVE_COPIES, CallGate
from edge_server.config import MiB, ServerConfig
from edge_server.data_channel import DataChannel
from edge_server.errors import InvalidArgument, PermissionDenied, Unauthenticated
from edge_server.events import SessionFailed, SliceDefined
from edge_server.ids import check_id
from edge_server.memory import Bounds, MemoryBudget
from edge_server.metrics import ServerMetrics, by_tenant
from edge_server.op_budget import OpLimits, measure_device_flops, measure_slow_gemm_rates
from edge_server.profile_budget import ANONYMOUS, ANONYMOUS_SLICES, BudgetLimits, CpuMeter, ProfileBudget
from edge_server.profiling import (
    ProfileCache,
    ProfileCancelled,
    ProfileKey,
    ProfileResult,
    ProfileRun,
    profilable_spec,
    profile_key,
)
from edge_server.sandbox import ProfileJob, ProfileSandbox, SandboxUnavailable
from edge_server.scheduler import ComputeScheduler, SchedulerStats
from edge_server.session import VALIDATION_BYTES_PER_SPEC_BYTE, Session
from edge_server.session_manager import SessionManager
from edge_server.slices import (
    MAX_OPS,
    CompiledSlice,
    allowed_ops,
    allowed_ops_hash,
    compile_slice,
    gc_paused,
    parse_spec,
    spec_text,
    warm_up_validation,
)
from edge_server.tarpit import Tarpit
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
    data_port: int = 0
    """The data channel's port (0: none)."""


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


def inflight_budget(config: ServerConfig, slots: int | None = None) -> int:
    """Bytes for work in flight under ``config.memory_bytes`` (0: unbounded).

    The cap covers the whole process: its current resident size (interpreter, torch, the code), the
    weight cache, the staging area and the server-wide reading slots (``slots``, None: :func:`reading_slots`) are
    taken off first. Raises ValueError if less than 64 MiB is left.
    """
    if not config.memory_bytes:
        return 0
    import psutil

    base = psutil.Process().memory_info().rss
    before = config.memory_bytes - base - config.cache_bytes - config.staging_bytes
    reading = reading_reserve(config, reading_slots(config, before) if slots is None else slots)
    left = before - reading
    if left < 64 * 2**20:
        raise ValueError(
            f"--memory-mb {config.memory_bytes >> 20} leaves {left >> 20} MiB for work in flight after the "
            f"process ({base >> 20} MiB), the weight cache ({config.cache_bytes >> 20} MiB), staging "
            f"({config.staging_bytes >> 20} MiB) and the requests being received ({reading >> 20} MiB, "
            "--max-reading-mb); at least 64 MiB are needed"
        )
    return left


AUTO_READING_BYTES_PER_SLOT = 160 * MiB
"""Without ``--max-reading-mb`` under ``--memory-mb``: one server-wide reading slot per this much of the budget for
work in flight (before the slots' own reserve), :data:`AUTO_READING_MAX_SLOTS` at most, none under two (one slot lets
any one silent call keep every other caller's request waiting up to ``--first-message-s``). ``--memory-mb 1024``:
722 MiB -> 4 slots (32 MiB, 64 MiB off the budget), what session 20 measured by hand."""
AUTO_READING_MAX_SLOTS = 8


def reading_slots(config: ServerConfig, left: int | None = None) -> int:
    """Requests received at once server-wide (0: no bound): ``config.max_reading_bytes // max_message_bytes`` (at
    least one) when set (0: none); unset (None) under ``memory_bytes`` with the call gate, one per
    ``AUTO_READING_BYTES_PER_SLOT`` of the budget for work in flight ``left`` (bytes before the slots' reserve;
    None: measured now, as :func:`inflight_budget`), at most ``AUTO_READING_MAX_SLOTS``, 0 under two. Each counts as
    the message limit, a request's size unknown before it is read."""
    if config.max_reading_bytes is None:
        if not config.memory_bytes or config.max_calls_per_caller <= 0:
            return 0
        if left is None:
            import psutil

            left = (config.memory_bytes - psutil.Process().memory_info().rss - config.cache_bytes
                    - config.staging_bytes)
        n = min(AUTO_READING_MAX_SLOTS, max(0, left) // AUTO_READING_BYTES_PER_SLOT)
        return n if n >= 2 else 0
    if config.max_reading_bytes <= 0:
        return 0
    return max(1, config.max_reading_bytes // config.max_message_bytes)


def reading_reserve(config: ServerConfig, slots: int | None = None) -> int:
    """Host memory the requests being received may hold at once (``slots``, None: :func:`reading_slots`, x the
    message limit x ``RECEIVE_COPIES``), taken off the budget for work in flight: 0 without reading slots."""
    return (reading_slots(config) if slots is None else slots) * config.max_message_bytes * RECEIVE_COPIES


class EdgeRuntime:
    def __init__(
        self, config: ServerConfig, allocator: ShareAllocator | None = None, *, auth: Authenticator | None = None
    ) -> None:
        self.config = config
        self.auth = auth
        self.metrics = ServerMetrics()
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
        self.reading_slots = 0
        """Server-wide reading slots (:func:`reading_slots`, resolved once: unset, it depends on the RSS now)."""
        if config.memory_bytes:
            import psutil

            before = (config.memory_bytes - psutil.Process().memory_info().rss - config.cache_bytes
                      - config.staging_bytes)
            self.reading_slots = reading_slots(config, before)
        elif config.max_calls_per_caller > 0:
            self.reading_slots = reading_slots(config, 0)
        self.memory = MemoryBudget(inflight_budget(config, self.reading_slots))
        inflight = self.memory.limit_bytes
        self.op_limits = OpLimits(
            max_workspace_bytes=min(config.max_op_workspace_bytes, inflight // 2)
            if inflight
            else config.max_op_workspace_bytes,
            max_op_ms=config.op_time_ms,
            device_flops=measure_device_flops(self.device),
            slow_gemm_rates=measure_slow_gemm_rates(self.device),
            max_peak_bytes=inflight // 2,
        )
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
        self.profiles = ProfileCache(capacity=config.profile_cache_entries)
        self.sandbox = (
            ProfileSandbox(config.profile_workers, torch_threads=torch.get_num_threads(), nice=config.profile_nice)
            if config.profile_workers
            else None
        )
        self.profile_budget = ProfileBudget(self._profile_limits)
        self.slice_budget = ProfileBudget(self._slice_limits, name="slice validation",
                                          quota_keys="slice_cpu_s / slice_cpu_share")
        """Each tenant's CPU budget of its sessions' slice validations (DefineSlice, OpenSession's slice): one
        shared bucket without authentication (``edge_server.profile_budget``; review17 F5)."""
        self.bounds.validation_bucket = (
            (lambda tenant: self.slice_budget.bucket(tenant)) if auth is not None
            else (lambda _tenant: self.slice_budget.bucket(ANONYMOUS_SLICES))
        )
        self.profiles_cancelled = 0
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
                     reading_grace_s=config.reading_grace_s)
            if config.max_calls_per_caller > 0
            else None
        )
        """Every call from its start to its answer (``edge_server.calls``): calls open per caller bounded, a
        deadline on the first message, revoked tokens' calls ended; None: off."""
        self.reads_bounded = self.calls is not None and (config.max_reading_calls_per_caller > 0
                                                         or self.reading_slots > 0)
        """Requests are read in slots (``--max-reading-calls`` or server-wide reading slots): the server turns grpc's
        BDP probing off and gives each stream a fixed receive window (``ServerConfig.read_window_bytes``)."""
        if self.reads_bounded:  # a call's window beyond grpc's default 64 KiB, held in the budget until its first
            self.calls.window_bytes = max(0, config.read_window_bytes - (64 << 10))  # message (review21b finding 1)
        self.data: DataChannel | None = None
        """The data channel for weight bytes (``edge_server.data_channel``), when the server runs one."""
        self.started = time.monotonic()
        self._allowed = allowed_ops()
        self._allowed_hash = allowed_ops_hash()
        warm_up_validation()  # once per process, at start: not on the first client's clock

    def _profile_limits(self, bucket: str) -> BudgetLimits:
        """A ProfileGraph budget bucket's limits: the tenant's quota ``profile_cpu_s`` /
        ``profile_cpu_share`` where its tokens file entry sets them, else the server's defaults."""
        cfg = self.config
        cap, rate = cfg.profile_cpu_s, cfg.profile_cpu_share
        if self.auth is not None and bucket != ANONYMOUS:
            q = self.auth.quota_of(bucket)
            cap = cap if q.profile_cpu_s is None else q.profile_cpu_s
            rate = rate if q.profile_cpu_share is None else q.profile_cpu_share
        return BudgetLimits(cap, rate)

    def _slice_limits(self, bucket: str) -> BudgetLimits:
        """A slice validation budget bucket's limits: the tenant's quota ``slice_cpu_s`` / ``slice_cpu_share``
        where its tokens file entry sets them, else the server's defaults (``--slice-cpu-s``,
        ``--slice-cpu-share``)."""
        cfg = self.config
        cap, rate = cfg.slice_cpu_s, cfg.slice_cpu_share
        if self.auth is not None and bucket != ANONYMOUS_SLICES:
            q = self.auth.quota_of(bucket)
            cap = cap if q.slice_cpu_s is None else q.slice_cpu_s
            rate = rate if q.slice_cpu_share is None else q.slice_cpu_share
        return BudgetLimits(cap, rate)

    # -- identity ------------------------------------------------------------------------------------

    def caller(self, authorization: str | None, claimed_tenant: str, *, need_tenant: bool = True,
               principal: Principal | None = None) -> Principal:
        """Who is calling. With authentication the tenant comes from the bearer token: a message naming
        another tenant is PermissionDenied ("" means the token's tenant); without it (single-tenant mode,
        loopback or ``--insecure`` only: ``server.create_server``), the tenant is the one the message names
        (InvalidArgument if empty and ``need_tenant``) and nobody is an operator: the names are labels of
        the one tenant, which sees the whole server as its own (Stats), and nothing more.
        Raises Unauthenticated if the token is unknown (the interceptor normally refused it already).
        ``principal``: the caller the interceptor already authenticated (``edge_server.auth.remembered_caller``;
        with authentication only): ``authorization`` is then not read."""
        if self.auth is None:
            if need_tenant or claimed_tenant:
                check_id("tenant", claimed_tenant)
            return Principal(claimed_tenant)
        p = principal if principal is not None else self.auth.authenticate(authorization)
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
            data_port=self.data.port if self.data is not None else 0,
        )

    def query_weights(self, who: Principal, sha256s: list[str]) -> list[str]:
        tenant = who.tenant
        if len(sha256s) > MAX_QUERY:
            raise InvalidArgument(f"at most {MAX_QUERY} hashes per query")
        for s in sha256s:
            check_sha256(s)
        return self.store.query(tenant, sha256s)

    async def profile(self, spec_json: bytes, iterations: int, warmup: int, *, tenant: str = "") -> ProfileResult:
        """Profile a weightless slice, cached per sharing domain (:func:`edge_server.profiling.profile_key`:
        the tenant's dedup group or the tenant alone, the slice's bytes, iterations and warmup; a hit
        validates and runs nothing).

        The caller's ProfileGraph CPU budget (:class:`edge_server.profile_budget.ProfileBudget`; one
        shared bucket for callers without a tenant) is checked first: an empty bucket is
        :class:`~edge_server.profile_budget.ProfileBudgetExceeded` (RESOURCE_EXHAUSTED) before anything of
        the spec is decoded; the validation's and every profile step's CPU time are charged to it
        (abandoned work too), and a run whose bucket is spent stops at its next step with that error.
        The run shares the compute workers in time slices as work of ``tenant`` (its group in the
        scheduler; anonymous profiles share one), holds a memory reservation for its random weights and
        peak intermediates, and stops at the next op boundary when the caller is cancelled (the RPC ended)."""
        budget = self.profile_budget
        bucket = tenant or ANONYMOUS
        budget.admit(bucket)
        # the request's spec is held while the profile waits and runs (the call's reading slot is given back once
        # it is decoded, ``edge_server.wire``): its bytes are reserved in the memory budget, so a tenant's pile of
        # big ProfileGraphs waiting for the one validation slot is bounded by its share (RESOURCE_EXHAUSTED)
        with self.memory.reserve(bucket, len(spec_json), "ProfileGraph's slice spec"):
            return await self._profile(spec_json, iterations, warmup, tenant, budget, bucket)

    async def _profile(self, spec_json: bytes, iterations: int, warmup: int, tenant: str, budget: ProfileBudget,
                       bucket: str) -> ProfileResult:
        cfg = self.config
        iterations = min(iterations or cfg.profile_iterations, cfg.profile_max_iterations)
        warmup = min(warmup or cfg.profile_warmup, cfg.profile_max_iterations)
        domain = self.auth.domain_of(tenant) if self.auth is not None else ""
        cache_key = profile_key(domain, spec_json, iterations, warmup)
        if self.sandbox is not None:
            try:
                return await self._profile_in_child(spec_json, iterations, warmup, tenant, cache_key)
            except SandboxUnavailable as e:
                logger.warning("profiling in the server process: no profiling child could start (%s)", e)
                sandbox, self.sandbox = self.sandbox, None
                sandbox.close()
        key = f"profile:{tenant}" if tenant else ANONYMOUS
        # a tenant's profiles share its compute; anonymous ones (no authentication) are a tenant of
        # their own, so profiling never runs ahead of sessions' requests as if it were their own work
        self.scheduler.set_group(key, tenant or key)

        def validate(check) -> CompiledSlice:
            # admitted again by ``Bounds.compile`` once this call holds the validation slot (the calls queued
            # behind the slot were admitted while the bucket still held CPU time, and N of them validated N times
            # the budget: a 20k-op spec is about a CPU second each), metered, and stopped mid-way by ``check``
            # once the bucket is spent. Parsed once, with the cyclic collector paused for the whole of it (a full
            # collection walks torch's heap: before, the first parse ran outside the pause and cost 3x the second)
            with gc_paused():
                part, _unknown = profilable_spec(parse_spec(spec_json))  # unknown ops: no cost
                return compile_slice(
                    part,
                    device=self.device,
                    max_tensor_bytes=cfg.max_tensor_bytes,
                    max_slice_bytes=cfg.max_slice_bytes,
                    require_hashes=False,
                    op_limits=self.op_limits,
                    check=check,
                )

        def step(run: ProfileRun, quantum: float) -> None:
            with CpuMeter(budget, bucket):
                run.step(quantum, lambda: self.scheduler.contended(key))

        async def compute() -> ProfileResult:
            cs = await self.bounds.compile(
                validate,
                budget.bucket(bucket),
                hold_bytes=VALIDATION_BYTES_PER_SPEC_BYTE * len(spec_json),
                holder=bucket,
                what=f"ProfileGraph's slice validation ({len(spec_json) / 2**20:.1f} MiB of JSON)",
            )
            cost = cs.cost
            need = cost.peak_bytes + cost.weight_bytes + sum(m.nbytes for m in cs.spec.inputs.values())
            run = ProfileRun(cs, iterations, warmup)
            with self.memory.reserve(tenant or key, need, "ProfileGraph"):
                while not run.done:
                    quantum = self.scheduler.quantum_ms(key, cfg.slice_time_slice_ms)
                    fut = self.scheduler.submit(key, lambda q=quantum: step(run, q))
                    try:
                        await asyncio.wrap_future(fut)
                    except asyncio.CancelledError:
                        run.cancel()  # a step already running stops at its next op boundary
                        self.profiles_cancelled += 1
                        fut.add_done_callback(lambda _f: self._after_cancel(run))
                        raise
                    except ProfileCancelled:
                        raise asyncio.CancelledError from None
                    if not run.done:
                        try:
                            budget.check(bucket)
                        except Exception:
                            run.close()
                            raise
            return run.result()

        return await self.profiles.get_or_compute(cache_key, compute)

    async def _profile_in_child(
        self, spec_json: bytes, iterations: int, warmup: int, tenant: str, cache_key: ProfileKey
    ) -> ProfileResult:
        """ProfileGraph in a child process (``ProfileSandbox.profile``), cached under ``cache_key``."""
        cfg = self.config
        job = ProfileJob(
            spec_text(spec_json),
            iterations,
            warmup,
            str(self.device),
            cfg.max_tensor_bytes,
            cfg.max_slice_bytes,
            dataclasses.asdict(self.op_limits),
        )

        def cancelled(ops_after_cancel: int | None) -> None:
            if ops_after_cancel is None:  # the cancel came
                self.profiles_cancelled += 1
            else:  # the job it stopped has ended
                self.bounds.count_stopped(ops_after_cancel)

        bucket = tenant or ANONYMOUS
        return await self.profiles.get_or_compute(
            cache_key,
            lambda: self.sandbox.profile(job, bucket, self.memory, cancelled, self.profile_budget.bucket(bucket)),
        )

    def _after_cancel(self, run: ProfileRun) -> None:
        """The step that was running (or queued) when a profile was cancelled has ended: count the ops
        that finished after the cancel and drop the run's tensors."""
        self.bounds.count_stopped(run.ops_after_cancel)
        run.close()

    def stats(self, who: Principal | None = None, session_id: str = "", tenant: str = "") -> ServerStats:
        """Server counters. With authentication a tenant sees only its own sessions and weights (another
        tenant's session or tenant named: PermissionDenied); an operator token sees everything."""
        who = who or Principal("", operator=True)  # an in-process caller (tests, tools)
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
        if own is not None:  # its own profile cache counters (its group's: they share the entries)
            cache_hits, cache_misses = self.profiles.hits_of(self.auth.domain_of(own))
        else:
            cache_hits, cache_misses = self.profiles.hits, self.profiles.misses
        return ServerStats(
            store=self.store.stats(own),
            scheduler=self.scheduler.stats(),
            active_sessions=len(self._sessions_visible(who)),
            sessions_opened=self.sessions.opened(own),
            requests_done=c.requests_done,
            requests_failed=c.requests_failed,
            profile_cache_hits=cache_hits,
            profile_cache_misses=cache_misses,
            uptime_s=time.monotonic() - self.started,
            session=snap,
            tenant_bytes=self.store.tenant_bytes(tenant or (own or "")) if (tenant or own) else 0,
            chunks_dropped=c.chunks_dropped,
            slices_rejected=c.slices_rejected,
        )

    def metrics_snapshot(self) -> dict[str, dict[str, float]]:
        """Per-tenant values of :class:`edge_server.metrics.RuntimeCollector`'s series (event loop)."""
        out: dict[str, dict[str, float]] = {}
        open_by: dict[str, int] = {}
        for s in self.sessions.sessions.values():
            open_by[s.tenant] = open_by.get(s.tenant, 0) + 1
        budget = self.profile_budget
        for t in self.sessions.tenants() | self.store.tenants() | set(budget.charged_s) | set(budget.refused_by):
            c = self.sessions.totals(t)
            st = self.store.stats(t)
            values = {
                "requests_done": c.requests_done,
                "requests_failed": c.requests_failed,
                "bytes_received": c.bytes_received,
                "sessions_opened": self.sessions.opened(t),
                "cache_commits": st.commits,
                "cache_evictions": st.evictions,
                "uploads_rejected": st.rejected,
                "sessions_open": open_by.get(t, 0),
                "cache_bytes": st.bytes_used,
                "cache_entries": st.entries,
                "pinned_bytes": st.pinned_bytes,
                "staging_bytes": st.staging_bytes,
                "profile_cpu_seconds": budget.charged_s.get(t, 0.0),
                "profile_refused": budget.refused_by.get(t, 0),
            }
            for k, v in values.items():
                out.setdefault(k, {})[t] = float(v)
        for k in list(out):  # a caller names its tenant without --auth-tokens: labels bounded (review21b finding 7)
            out[k] = by_tenant(out[k])
        # what bounds strangers (session 21): the budget's holders, the gate's calls and reading slots, the
        # validation slot (edge_server.metrics.RuntimeCollector's SERVER_* series and the per-tenant ones below)
        mem = self.memory.stats()
        running, paused, waiting = self.bounds.compile_slots.counts()
        server = {"memory_budget_bytes": mem.limit_bytes, "memory_reserved_total_bytes": mem.reserved_bytes,
                  "memory_refused": mem.refused, "validations_running": running, "validations_paused": paused,
                  "validations_waiting": waiting}
        out["memory_reserved_bytes"] = by_tenant(self.memory.holders())
        gate = self.calls
        if gate is not None:
            out["calls_open"] = by_tenant(gate.open_by_key())
            out["reading_slots_held"] = by_tenant(gate.reading_held())
            out["reading_calls_waiting"] = by_tenant(gate.reading_queued())
            server.update(reading_slots=gate.server_reading, reading_slots_free=gate.server_free,
                          reading_slots_taken_back=gate.taken_back, reading_slot_timeouts=gate.slot_timeouts,
                          first_message_ended=gate.evicted, request_holds_refused=gate.hold_refused)
        out["server"] = {k: float(v) for k, v in server.items()}
        return out

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
        now = time.monotonic()
        for s in list(self.sessions.sessions.values()):
            if s.closed or s.idle_expired or not s.token_digest or self.auth.holds(s.tenant, s.token_digest):
                continue
            s.idle_expired = True  # the reaper cancels a stream the end cannot reach
            s.expired_at = now
            logger.info("session %s of tenant %s: its token is no longer in the tokens file: ending it",
                        s.session_id[:8], s.tenant)
            s.emit(SessionFailed(Unauthenticated("this session's bearer token was revoked (tokens file reloaded)")))
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
        the same tenant: NotFound / PermissionDenied otherwise) they are pinned for that session."""
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
        if self.sandbox is not None:
            self.sandbox.close()
        try:  # ARA's planner child ends with the server (no orphan process)
            self.allocator.close()
        except Exception:
            logger.exception("closing the allocator failed")
