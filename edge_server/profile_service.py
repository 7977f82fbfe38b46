"""ProfileGraph's call: a weightless slice profiled under its caller's CPU budget and memory, cached per sharing
domain, in a profiling child (``--profile-workers``) or in time slices on the compute workers.

:class:`ProfileService` owns what only ProfileGraph uses: the profile cache, the profiling children, the
ProfileGraph CPU budget and the count of cancelled profiles; the scheduler, the memory budget and the
validation bounds it shares with sessions are given to it (:class:`edge_server.runtime.EdgeRuntime` composes
them).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging

import torch

from edge_server.auth import Authenticator
from edge_server.config import ServerConfig
from edge_server.memory import Bounds, MemoryBudget
from edge_server.op_budget import OpLimits
from edge_server.profile_budget import ANONYMOUS, CpuMeter, ProfileBudget, QuotaLimits
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
from edge_server.scheduler import ComputeScheduler
from edge_server.session import VALIDATION_BYTES_PER_SPEC_BYTE
from edge_server.slices import CompiledSlice, compile_slice, gc_paused, parse_spec, spec_text

logger = logging.getLogger(__name__)


class ProfileService:
    """Answers ProfileGraph: admits the call against its tenant's CPU budget, holds its spec in the memory budget,
    and profiles the slice once per cache key, in a child process or on the compute workers."""

    def __init__(self, config: ServerConfig, auth: Authenticator | None, device: torch.device,
                 scheduler: ComputeScheduler, memory: MemoryBudget, bounds: Bounds, op_limits: OpLimits) -> None:
        """``auth`` None: no authentication (one shared budget bucket, one sharing domain). The profiling
        children (``config.profile_workers``, 0: none) start here, with the process's torch threads now."""
        self.config = config
        self.auth = auth
        self.device = device
        self.scheduler = scheduler
        self.memory = memory
        self.bounds = bounds
        self.op_limits = op_limits
        self.cache = ProfileCache(capacity=config.profile_cache_entries)
        self.sandbox = (
            ProfileSandbox(config.profile_workers, torch_threads=torch.get_num_threads(), nice=config.profile_nice)
            if config.profile_workers
            else None
        )
        """The profiling children; None: profiles run in this process (none configured, or none could start)."""
        self.budget = ProfileBudget(QuotaLimits(config, auth, ANONYMOUS, "profile_cpu_s", "profile_cpu_share"))
        """Each tenant's ProfileGraph CPU budget (``edge_server.profile_budget``; one bucket without a tenant)."""
        self.cancelled = 0
        """Profiles cancelled (their RPC ended) while they ran."""

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
        budget = self.budget
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
                        self.cancelled += 1
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

        return await self.cache.get_or_compute(cache_key, compute)

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
                self.cancelled += 1
            else:  # the job it stopped has ended
                self.bounds.count_stopped(ops_after_cancel)

        bucket = tenant or ANONYMOUS
        return await self.cache.get_or_compute(
            cache_key,
            lambda: self.sandbox.profile(job, bucket, self.memory, cancelled, self.budget.bucket(bucket)),
        )

    def _after_cancel(self, run: ProfileRun) -> None:
        """The step that was running (or queued) when a profile was cancelled has ended: count the ops
        that finished after the cancel and drop the run's tensors."""
        self.bounds.count_stopped(run.ops_after_cancel)
        run.close()

    def close(self) -> None:
        """Stop the profiling children (if any)."""
        if self.sandbox is not None:
            self.sandbox.close()
