"""Per-op latency of a captured graph on this device: mean, variance and raw per-run samples.

Each timed run executes the whole graph op by op (the same interpreter the runtime uses) and keeps
one sample per op, so per-run totals, and the correlation between ops, survive. Whole-graph runs
are interleaved with the timed runs; the per-op means are then scaled so their sum matches the
whole-graph median (calibration removes the timer's own overhead and systematic drift).
"""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import contextmanager

import torch
from torch.utils._pytree import tree_map

from modelgraph import ModelGraph, Program, SliceProgram, SliceSpec
from modelgraph.execute import bind_inputs
from modelgraph.tensors import TensorMeta, to_dtype
from profiler.profile import GraphProfile, OpStats

log = logging.getLogger(__name__)

DEFAULT_RUNS = 20
DEFAULT_WARMUP = 3
OUTLIER_FACTOR = 1.5


class ProfilerError(RuntimeError):
    """Profiling cannot run as asked (e.g. CUDA requested on a machine without it)."""


def resolve_device(device: str | torch.device) -> torch.device:
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ProfilerError("device 'cuda' requested but CUDA is not available on this machine")
    if dev.type not in ("cpu", "cuda"):
        raise ProfilerError(f"unsupported device {device!r} (use cpu or cuda)")
    return dev


def device_label(dev: torch.device) -> str:
    if dev.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(dev)}"
    from profiler.device_info import _cpu_model

    return f"cpu:{_cpu_model()}"


@contextmanager
def torch_threads(n: int | None):
    """Temporarily set torch's intra-op thread count (process-wide in torch; restored on exit)."""
    old = torch.get_num_threads()
    if n is not None:
        if n < 1:
            raise ProfilerError(f"threads must be >= 1, got {n}")
        torch.set_num_threads(n)
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(old)


def random_tensor(meta: TensorMeta, device: torch.device, gen: torch.Generator) -> torch.Tensor:
    """A stand-in of the declared shape: uniform in [0, 1) for floats (keeps sqrt/log finite), zeros else."""
    dtype = to_dtype(meta.dtype)
    if dtype.is_floating_point:
        t = torch.rand(meta.shape, dtype=dtype, generator=gen)
    else:
        t = torch.zeros(meta.shape, dtype=dtype)
    return t.to(device)


def _timed_pass(prog: Program, env_factory: Callable[[], dict], weights: Mapping[str, torch.Tensor],
                dev: torch.device, clock: Callable[[], float] = time.perf_counter) -> list[float]:
    env = env_factory()
    n = len(prog.ops)
    out = [0.0] * n
    with torch.inference_mode():
        if dev.type == "cuda":
            starts = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
            ends = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
            for i in range(n):
                starts[i].record()
                prog.run_op(i, env, weights)
                ends[i].record()
            torch.cuda.synchronize(dev)
            return [s.elapsed_time(e) for s, e in zip(starts, ends)]
        for i in range(n):
            t0 = clock()
            prog.run_op(i, env, weights)
            out[i] = (clock() - t0) * 1e3
    return out


def _whole_pass(prog: Program, env_factory: Callable[[], dict], weights: Mapping[str, torch.Tensor],
                dev: torch.device, clock: Callable[[], float] = time.perf_counter) -> float:
    env = env_factory()
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    t0 = clock()
    prog.run(env, weights)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    return (clock() - t0) * 1e3


def measure_ops(prog: Program, env_factory: Callable[[], dict], weights: Mapping[str, torch.Tensor], *,
                runs: int, warmup: int, calibrate: bool = True,
                reference: Callable[[], object] | None = None,
                reference_ms: list[float] | None = None,
                clock: Callable[[], float] = time.perf_counter) -> tuple[list[list[float]], list[float], float]:
    """Raw per-op samples (op-major), whole-graph samples, and the calibration factor applied.

    ``reference`` (e.g. the eager model) is timed in the same loop into ``reference_ms``, so both see
    the same machine load. ``clock`` (seconds) times the CPU runs; CUDA runs use CUDA events."""
    if runs < 2:
        raise ProfilerError(f"runs must be >= 2 to estimate a variance, got {runs}")
    dev = prog.device
    for _ in range(max(warmup, 0)):
        _whole_pass(prog, env_factory, weights, dev)
    per_run: list[list[float]] = []
    whole: list[float] = []
    for _ in range(runs):
        per_run.append(_timed_pass(prog, env_factory, weights, dev, clock))
        whole.append(_whole_pass(prog, env_factory, weights, dev, clock))
        if reference is not None and reference_ms is not None:
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            t0 = clock()
            with torch.inference_mode():
                reference()
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            reference_ms.append((clock() - t0) * 1e3)
    if not per_run or not per_run[0]:
        return [[] for _ in prog.ops], whole, 1.0
    totals = [sum(r) for r in per_run]
    raw_median = statistics.median(totals)
    # A run far above the median was interrupted (another process, a page-fault storm): it says
    # nothing about this device's latency and would drag every op's mean. Keep at least half.
    kept = [r for r, t in zip(per_run, totals) if t <= OUTLIER_FACTOR * raw_median]
    if len(kept) < max(2, len(per_run) // 2):
        kept = per_run
    elif len(kept) < len(per_run):
        log.debug("dropped %d of %d timed runs as interrupted (> %.1fx median)", len(per_run) - len(kept),
                  len(per_run), OUTLIER_FACTOR)
    samples = [list(col) for col in zip(*kept)]
    factor = 1.0
    if calibrate and raw_median > 0:
        factor = statistics.median(whole) / statistics.fmean(sum(r) for r in kept)
        samples = [[s * factor for s in row] for row in samples]
    return samples, whole, factor


def _stats(samples: Sequence[float]) -> tuple[float, float]:
    mean = statistics.fmean(samples)
    var = statistics.variance(samples) if len(samples) > 1 else 0.0
    return mean, var


def profile_graph(graph: ModelGraph, inputs: Sequence[torch.Tensor] | None = None, *,
                  device: str | torch.device = "cpu", threads: int | None = None, runs: int = DEFAULT_RUNS,
                  warmup: int = DEFAULT_WARMUP, calibrate: bool = True, seed: int = 0,
                  module: torch.nn.Module | None = None,
                  clock: Callable[[], float] = time.perf_counter) -> GraphProfile:
    """Measure every op of ``graph`` on this device (no cache; see ``profile_model``).

    With ``module`` (the eager model the graph was captured from), its forward is timed in the same
    loop and reported as ``eager_model_ms``: how far our op-by-op execution is from plain PyTorch.
    ``clock`` (seconds) times CPU runs: the default ``time.perf_counter`` is wall time (what a request
    waits, the profile's meaning); ``time.thread_time`` counts only this thread's CPU time, which with
    ``threads=1`` (torch runs its intra-op work on the calling thread) leaves out the time other
    processes hold the core: for consistency checks of the per-op accounting on a loaded machine."""
    dev = resolve_device(device)
    gen = torch.Generator().manual_seed(seed)
    if inputs is None:
        base = {n: random_tensor(m, dev, gen) for n, m in graph.inputs.items()}
    else:
        base = {n: t.to(dev) for n, t in bind_inputs(graph, inputs).items()}  # inputs: forward's (pytree) args
    weights = {k: v.to(dev) for k, v in graph.weight_values.items()} or \
        {k: random_tensor(m, dev, gen) for k, m in graph.weights.items()}
    prog = Program(graph.ops, frozenset(graph.outputs), dev, trusted=True)
    t0 = time.perf_counter()
    eager: list[float] = []
    reference = None
    if module is not None:
        mod = module.to(dev).eval()
        args = tuple(base[n] for n in graph.inputs) if inputs is None else tree_map(
            lambda x: x.to(dev) if isinstance(x, torch.Tensor) else x, tuple(inputs))

        def reference():
            return mod(*args)

    with torch_threads(threads) as nthreads:
        samples, whole, factor = measure_ops(prog, lambda: dict(base), weights, runs=runs, warmup=warmup,
                                             calibrate=calibrate, reference=reference, reference_ms=eager,
                                             clock=clock)
    first_use: dict[str, str] = {}
    for op in graph.ops:
        for w in op.weight_inputs:
            first_use.setdefault(w, op.name)
    wbytes: dict[str, int] = {}
    for w, op_name in first_use.items():
        wbytes[op_name] = wbytes.get(op_name, 0) + graph.weights[w].nbytes
    stats = []
    for op, row in zip(graph.ops, samples):
        mean, var = _stats(row)
        stats.append(OpStats(name=op.name, layer=op.layer, target=op.target, mean_ms=mean, var_ms2=var,
                             raw_mean_ms=mean / factor if factor else mean,
                             out_bytes=graph.used_out_bytes(op), weight_bytes=wbytes.get(op.name, 0)))
    prof = GraphProfile(
        model=graph.name, model_hash=graph.model_hash, device=device_label(dev), threads=nthreads,
        torch_version=torch.__version__, runs=runs, warmup=warmup, ops=tuple(stats),
        samples_ms=tuple(tuple(r) for r in samples), whole_model_ms=statistics.median(whole),
        whole_model_samples_ms=tuple(whole), calibration=factor, total_weight_bytes=graph.total_weight_bytes,
        eager_model_ms=statistics.median(eager) if eager else None,
        profile_seconds=time.perf_counter() - t0)
    log.info("profiled %s on %s (%d threads): %d ops, sum %.2f ms, whole %.2f ms, calibration x%.3f",
             graph.name, prof.device, nthreads, len(stats), prof.sum_mean_ms, prof.whole_model_ms, factor)
    return prof


def profile_slice(spec: SliceSpec, *, device: str | torch.device = "cpu", runs: int = DEFAULT_RUNS,
                  warmup: int = DEFAULT_WARMUP, threads: int | None = None,
                  seed: int = 0) -> tuple[dict[str, tuple[float, float]], float, float]:
    """Server side: profile a weightless slice with random weights of the declared shapes.

    The spec is validated first (allowlist, shapes, memory bound), exactly as for a real request.
    Returns ({op: (mean_ms, var_ms2)}, whole mean ms, whole var ms^2).
    """
    dev = resolve_device(device)
    sp = SliceProgram(spec, dev)
    gen = torch.Generator().manual_seed(seed)
    base = {r: sp.prepare_input(r, random_tensor(m, torch.device("cpu"), gen)) for r, m in spec.inputs.items()}
    weights = {k: random_tensor(w.meta, dev, gen) for k, w in spec.weights.items()}
    with torch_threads(threads):
        samples, whole, _ = measure_ops(sp.program, lambda: dict(base), weights, runs=runs, warmup=warmup)
    per_op = {op.name: _stats(row) for op, row in zip(sp.order, samples)}
    wm, wv = _stats(whole)
    return per_op, wm, wv
