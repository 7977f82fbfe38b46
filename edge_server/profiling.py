"""Server-side profiling of a weightless slice (ProfileGraph), cached by graph hash.

The server never needs the real weights to know its own cost: it runs the slice on random inputs and
random weights of the declared shapes and dtypes, op by op, and reports each op's mean and variance.
"""

from __future__ import annotations

import asyncio
import logging
import math
import statistics
import time
from collections import OrderedDict
from dataclasses import dataclass, field

import torch

from edge_server.slices import CompiledSlice, SliceRejected, parse_spec
from modelgraph import SliceSpec, TensorMeta
from modelgraph.allowlist import ALLOWED_OPS
from modelgraph.tensors import to_dtype

logger = logging.getLogger(__name__)


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
    """A ProfileGraph slice minus the ops this server will not run, and the names of those ops.

    One op off the allowlist must not void the profile of the whole graph: the ops it cannot run (and
    only those) are dropped and their outputs become slice inputs of the declared shape, so every
    other op is still measured; the dropped ones are "unknown" (absent from the answer). A slice with
    no such op is returned unchanged (same bytes, same cache key). Raises SliceRejected for a spec
    that does not parse, or one with no op left to run.
    """
    spec = parse_spec(spec_json)
    drop = [op for op in spec.ops if op.target not in ALLOWED_OPS]
    if not drop:
        return spec_json, []
    dropped = {op.name for op in drop}
    keep = tuple(op for op in spec.ops if op.name not in dropped)
    if not keep:
        raise SliceRejected(f"OpNotAllowedError: none of the {len(drop)} ops is on the server's allowlist "
                            f"(e.g. {drop[0].target!r})")
    made = {r: op for op in drop for r in op.output_refs()}
    inputs = dict(spec.inputs)
    for op in keep:
        for r in op.tensor_inputs:
            if r in made and r not in inputs:
                inputs[r] = made[r].output_meta(r)
    produced = {r for op in keep for r in op.output_refs()} | set(inputs)
    used_w = {w for op in keep for w in op.weight_inputs}
    part = SliceSpec(keep, inputs, tuple(o for o in spec.outputs if o in produced),
                     {k: v for k, v in spec.weights.items() if k in used_w}, spec.model_hash)
    logger.info("profiling %d of %d ops; %d are off the allowlist (unknown): %s", len(keep), len(spec.ops),
                len(drop), sorted({op.target for op in drop})[:5])
    return part.to_json(), sorted(dropped)


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


def profile_slice(cs: CompiledSlice, iterations: int, warmup: int) -> ProfileResult:
    """Blocking; runs on a compute worker."""
    program = cs.program
    device = program.device
    gen = torch.Generator().manual_seed(0)
    weights = {name: _random(w.meta, device, gen) for name, w in cs.weights.items()}
    inputs = {name: _random(meta, device, gen) for name, meta in cs.spec.inputs.items()}
    n_ops = len(program.order)
    samples: list[list[float]] = [[] for _ in range(n_ops)]
    totals: list[float] = []
    from modelgraph.execute import OpTiming

    with torch.inference_mode():
        for it in range(warmup + iterations):
            env = dict(inputs)
            timings: list[OpTiming] = []
            t0 = time.perf_counter()
            for i in range(n_ops):
                program.program.run_op(i, env, weights, timings=timings)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            total = (time.perf_counter() - t0) * 1e3
            if it >= warmup:
                totals.append(total)
                for i, t in enumerate(timings):
                    samples[i].append(t.ms)
    ops = [
        OpProfile(op.name, statistics.fmean(s), statistics.variance(s) if len(s) > 1 else 0.0)
        for op, s in zip(program.order, samples)
    ]
    var = statistics.variance(totals) if len(totals) > 1 else 0.0
    return ProfileResult(
        cs.graph_hash, str(device), ops, statistics.fmean(totals), var if math.isfinite(var) else 0.0, iterations
    )


@dataclass
class ProfileCache:
    """LRU cache of profiles by (graph hash, iterations); concurrent misses for one key compute once."""

    capacity: int = 128
    hits: int = 0
    misses: int = 0
    _entries: OrderedDict[tuple[str, int], ProfileResult] = field(default_factory=OrderedDict)
    _inflight: dict[tuple[str, int], asyncio.Future] = field(default_factory=dict)

    async def get_or_compute(self, key: tuple[str, int], compute) -> ProfileResult:
        hit = self._entries.get(key)
        if hit is not None:
            self._entries.move_to_end(key)
            self.hits += 1
            return _copy(hit, cached=True)
        fut = self._inflight.get(key)
        if fut is not None:
            self.hits += 1
            return _copy(await asyncio.shield(fut), cached=True)
        self.misses += 1
        fut = asyncio.get_running_loop().create_future()
        self._inflight[key] = fut
        try:
            result = await compute()
        except asyncio.CancelledError:
            fut.cancel()
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
