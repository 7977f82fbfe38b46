"""Server-side profiling of a weightless slice (ProfileGraph), cached per sharing domain (``profile_key``).

The server never needs the real weights to know its own cost: it runs the slice on random inputs and
random weights of the declared shapes and dtypes, op by op, and reports each op's mean and variance.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import statistics
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from edge_server.errors import InvalidArgument
from edge_server.profile_budget import BudgetTooSmall, ProfileBudgetExceeded
from edge_server.slices import CompiledSlice, SliceRejected, parse_spec
from modelgraph import SliceSpec, TensorMeta
from modelgraph.allowlist import ALLOWED_OPS
from modelgraph.errors import OpExecutionError
from modelgraph.tensors import to_dtype

logger = logging.getLogger(__name__)


class OpFailed(InvalidArgument):
    """An op of a client's slice raised while running (bad data the checks could not see)."""


@dataclass(slots=True)
class OpProfile:
    name: str
    mean_ms: float
    var_ms2: float


@dataclass(slots=True)
class ProfileResult:
    graph_hash: str
    device: str
    ops: list[OpProfile]
    total_mean_ms: float
    total_var_ms2: float
    iterations: int
    cached: bool = False


def profilable_part(spec_json: bytes | str) -> tuple[bytes | str, list[str]]:
    """A ProfileGraph slice minus the ops this server will not run, and the names of those ops (as
    :func:`profilable_spec`, on and to JSON). A slice with no such op is returned unchanged (same bytes,
    same cache key). Raises SliceRejected for a spec that does not parse, or one with no op left to run.
    """
    part, dropped = profilable_spec(parse_spec(spec_json))
    return (spec_json if not dropped else part.to_json()), dropped


def profilable_spec(spec: SliceSpec) -> tuple[SliceSpec, list[str]]:
    """A parsed ProfileGraph slice minus the ops this server will not run, and the names of those ops.

    One op off the allowlist must not void the profile of the whole graph: the ops it cannot run (and
    only those) are dropped and their outputs become slice inputs of the declared shape, so every
    other op is still measured; the dropped ones are "unknown" (absent from the answer). A slice with
    no such op is returned as it is. Raises SliceRejected for one with no op left to run.
    """
    drop = [op for op in spec.ops if op.target not in ALLOWED_OPS]
    if not drop:
        return spec, []
    dropped = {op.name for op in drop}
    keep = tuple(op for op in spec.ops if op.name not in dropped)
    if not keep:
        raise SliceRejected(
            f"OpNotAllowedError: none of the {len(drop)} ops is on the server's allowlist (e.g. {drop[0].target!r})"
        )
    made = {r: op for op in drop for r in op.output_refs()}
    inputs = dict(spec.inputs)
    for op in keep:
        for r in op.tensor_inputs:
            if r in made and r not in inputs:
                inputs[r] = made[r].output_meta(r)
    produced = {r for op in keep for r in op.output_refs()} | set(inputs)
    used_w = {w for op in keep for w in op.weight_inputs}
    part = SliceSpec(
        keep,
        inputs,
        tuple(o for o in spec.outputs if o in produced),
        {k: v for k, v in spec.weights.items() if k in used_w},
        spec.model_hash,
    )
    logger.info(
        "profiling %d of %d ops; %d are off the allowlist (unknown): %s",
        len(keep),
        len(spec.ops),
        len(drop),
        sorted({op.target for op in drop})[:5],
    )
    return part, sorted(dropped)


def _random(meta: TensorMeta, device: torch.device, gen: torch.Generator) -> torch.Tensor:
    dtype = to_dtype(meta.dtype)
    if dtype.is_floating_point or dtype.is_complex:
        # uniform [0, 1): positive, so variances/sqrt/log in the graph stay finite
        t = torch.rand(meta.shape, generator=gen, dtype=torch.float32).to(dtype)
    else:
        t = torch.zeros(meta.shape, dtype=dtype)  # safe as indices, lengths, masks
    t = t.to(device)
    if meta.stride is not None:
        from modelgraph import restore_layout

        t = restore_layout(t, meta)
    return t


class ProfileCancelled(Exception):
    """The caller went away; the run stopped at an op boundary."""


class ProfileRun:
    """A profile of a weightless slice, run in steps so it shares the workers and can be cancelled.

    Each :meth:`step` (on a compute worker) runs ops for about ``quantum_ms`` and returns; between two
    ops it checks :attr:`cancelled`, so a cancelled run stops within one op. ``ops_after_cancel``
    counts ops that started after :meth:`cancel` (0 or 1: the one already running when it came).
    """

    def __init__(self, cs: CompiledSlice, iterations: int, warmup: int) -> None:
        self.cs = cs
        self.iterations = iterations
        self.warmup = warmup
        self._program = cs.program
        self._device = self._program.device
        self._n = len(self._program.order)
        self._samples: list[list[float]] = [[] for _ in range(self._n)]
        self._totals: list[float] = []
        self._it = 0
        self._i = 0
        self._env: dict[str, torch.Tensor] | None = None
        self._timings: list = []
        self._iter_ms = 0.0
        self._iter_t0 = 0.0
        self._iter_split = False
        self._weights: dict[str, torch.Tensor] | None = None
        self._inputs: dict[str, torch.Tensor] | None = None
        self.cancelled = False
        self.ops_run = 0
        self.ops_after_cancel = 0

    @property
    def done(self) -> bool:
        # a slice without ops (a model whose every op is off the allowlist leaves the UE an empty head; a
        # stranger's ``"ops": []``) has nothing to time: its profile is empty (it ran op 0 of nothing: INTERNAL)
        return self._n == 0 or self._it >= self.warmup + self.iterations

    def cancel(self) -> None:
        self.cancelled = True

    def step(self, quantum_ms: float, yield_now: Callable[[], bool] | None = None) -> None:
        """Worker thread: run ops for about ``quantum_ms``, and only one more op once ``yield_now()``
        says other work waits for the worker; raises :class:`ProfileCancelled` once cancelled."""
        if self._weights is None:
            gen = torch.Generator().manual_seed(0)
            self._weights = {name: _random(w.meta, self._device, gen) for name, w in self.cs.weights.items()}
            self._inputs = {name: _random(meta, self._device, gen) for name, meta in self.cs.spec.inputs.items()}
        deadline = time.perf_counter() + quantum_ms / 1e3
        with torch.inference_mode():
            while not self.done:
                if self.cancelled:
                    self.close()
                    raise ProfileCancelled("profile cancelled")
                if self._env is None:
                    self._env = dict(self._inputs)
                    self._timings = []
                    self._iter_ms = 0.0
                    self._iter_t0 = time.perf_counter()
                    self._iter_split = False
                try:
                    self._program.program.run_op(self._i, self._env, self._weights, timings=self._timings)
                except OpExecutionError as e:
                    self.close()
                    raise OpFailed(str(e)) from None
                finally:
                    self.ops_run += 1
                    if self.cancelled:
                        self.ops_after_cancel += 1
                self._iter_ms += self._timings[-1].ms
                self._i += 1
                if self._i == self._n:
                    if self._device.type == "cuda":
                        torch.cuda.synchronize(self._device)
                    if self._it >= self.warmup:
                        # end to end when the iteration ran in one step, else the sum of its op times
                        wall = (time.perf_counter() - self._iter_t0) * 1e3
                        self._totals.append(self._iter_ms if self._iter_split else wall)
                        for i, t in enumerate(self._timings):
                            self._samples[i].append(t.ms)
                    self._it += 1
                    self._i = 0
                    self._env = None
                if time.perf_counter() >= deadline or (yield_now is not None and yield_now()):
                    self._iter_split = self._env is not None
                    return
        self.close()

    def close(self) -> None:
        """Drop the random tensors and intermediates (idempotent)."""
        self._env = None
        self._weights = {}
        self._inputs = {}

    def result(self) -> ProfileResult:
        """Per-op mean and variance; the total is the sum of the op times of each iteration."""
        ops = [
            OpProfile(op.name, statistics.fmean(s) if s else 0.0, statistics.variance(s) if len(s) > 1 else 0.0)
            for op, s in zip(self._program.order, self._samples)
        ]
        totals = self._totals or [0.0]
        var = statistics.variance(totals) if len(totals) > 1 else 0.0
        return ProfileResult(
            self.cs.graph_hash,
            str(self._device),
            ops,
            statistics.fmean(totals),
            var if math.isfinite(var) else 0.0,
            self.iterations,
        )


def profile_slice(cs: CompiledSlice, iterations: int, warmup: int) -> ProfileResult:
    """Blocking: the whole profile in one go (tools and tests; the server runs :class:`ProfileRun` in steps)."""
    run = ProfileRun(cs, iterations, warmup)
    while not run.done:
        run.step(math.inf)
    return run.result()


ProfileKey = tuple[str, str, int, int]
"""(sharing domain, sha256 of the slice's bytes, iterations, warmup): see :func:`profile_key`."""


def profile_key(domain: str, spec_json: bytes | str, iterations: int, warmup: int) -> ProfileKey:
    """The profile cache's key of a ProfileGraph call, the one used in the server process and with
    profiling children alike.

    ``domain``: who may be answered from one another's entries: the caller's weight-store dedup domain
    (``Authenticator.domain_of``: its operator-declared group, else the tenant alone; "" for the one
    tenant of a server without authentication). Across domains a cached answer would cost the caller
    no budget and come back at once, telling it that another tenant profiled the same slice (the leak
    DESIGN.md §10 closes for weights). Then the slice's exact bytes (sha256; equal bytes validate alike,
    so a hit skips the validation too) and the run's ``iterations`` and ``warmup`` (both shape the
    answer: the warm-up iterations decide what the measured ones find in the caches)."""
    data = spec_json.encode("utf-8", "surrogatepass") if isinstance(spec_json, str) else bytes(spec_json)
    return domain, hashlib.sha256(data).hexdigest(), int(iterations), int(warmup)


@dataclass
class ProfileCache:
    """LRU cache of profiles by :func:`profile_key`; concurrent misses for one key compute once. Hits
    and misses are counted in all and per sharing domain (``hits_of``: what a tenant's Stats may show)."""

    capacity: int = 128
    hits: int = 0
    misses: int = 0
    _entries: OrderedDict[ProfileKey, ProfileResult] = field(default_factory=OrderedDict)
    _inflight: dict[ProfileKey, asyncio.Future] = field(default_factory=dict)
    _by_domain: dict[str, list[int]] = field(default_factory=dict)

    def hits_of(self, domain: str) -> tuple[int, int]:
        """(hits, misses) of the calls of one sharing domain (``profile_key``'s first part)."""
        h, m = self._by_domain.get(domain, (0, 0))
        return h, m

    def _count(self, key: ProfileKey, hit: bool) -> None:
        c = self._by_domain.setdefault(key[0], [0, 0])
        if hit:
            self.hits += 1
            c[0] += 1
        else:
            self.misses += 1
            c[1] += 1

    async def get_or_compute(self, key: ProfileKey, compute) -> ProfileResult:
        """The cached profile, or ``await compute()`` once for concurrent callers of one key.

        If the caller computing a key is cancelled, or stopped by its own ProfileGraph budget, a caller
        waiting for the same key takes over (its own call is not cancelled by someone else's)."""
        while True:
            hit = self._entries.get(key)
            if hit is not None:
                self._entries.move_to_end(key)
                self._count(key, True)
                return _copy(hit, cached=True)
            fut = self._inflight.get(key)
            if fut is None:
                break
            try:
                result = await asyncio.shield(fut)
            except asyncio.CancelledError:
                task = asyncio.current_task()
                if fut.cancelled() and (task is None or not task.cancelling()):
                    continue  # the computing caller went away: compute it ourselves
                raise
            self._count(key, True)
            return _copy(result, cached=True)
        self._count(key, False)
        fut = asyncio.get_running_loop().create_future()
        self._inflight[key] = fut
        try:
            result = await compute()
        except asyncio.CancelledError:
            fut.cancel()
            raise
        except (ProfileBudgetExceeded, BudgetTooSmall):
            fut.cancel()  # the computing caller's budget, not the waiters': they take over, on their own
            raise
        except Exception as e:
            fut.set_exception(e)
            fut.exception()  # mark retrieved: nobody may be waiting
            raise
        finally:
            self._inflight.pop(key, None)
        fut.set_result(result)
        self._entries[key] = result
        while len(self._entries) > self.capacity:
            self._entries.popitem(last=False)
        return result


def _copy(r: ProfileResult, *, cached: bool) -> ProfileResult:
    return ProfileResult(r.graph_hash, r.device, r.ops, r.total_mean_ms, r.total_var_ms2, r.iterations, cached)
