"""Measure: per-op latency on this device, device facts, link estimates; produce a CostGraph."""

from __future__ import annotations

import logging

from modelgraph import ModelGraph
from profiler import cache
from profiler.costs import cost_graph
from profiler.device_info import DeviceInfo, device_info
from profiler.link import LinkEstimator
from profiler.oplatency import (
    DEFAULT_RUNS,
    DEFAULT_WARMUP,
    ProfilerError,
    device_label,
    profile_graph,
    profile_slice,
    resolve_device,
)
from profiler.profile import GraphProfile, LayerStats, OpStats

log = logging.getLogger(__name__)


def profile_model(graph: ModelGraph, inputs=None, *, device: str = "cpu", threads: int | None = None,
                  runs: int = DEFAULT_RUNS, warmup: int = DEFAULT_WARMUP, use_cache: bool = True,
                  module=None) -> GraphProfile:
    """Profile ``graph`` on this device, from the JSON cache when a matching profile exists."""
    import torch

    from profiler.oplatency import torch_threads

    dev = resolve_device(device)
    with torch_threads(threads) as n:
        key = cache.profile_key(graph.model_hash, device_label(dev), n, torch.__version__, runs)
    if use_cache:
        hit = cache.load(key)
        if hit is not None:
            log.info("profile of %s from cache (%s)", graph.name, key)
            return hit
    prof = profile_graph(graph, inputs, device=dev, threads=threads, runs=runs, warmup=warmup, module=module)
    if use_cache:
        cache.store(key, prof)
    return prof


__all__ = [
    "DeviceInfo", "GraphProfile", "LayerStats", "LinkEstimator", "OpStats", "ProfilerError", "cost_graph",
    "device_info", "profile_graph", "profile_model", "profile_slice",
]
