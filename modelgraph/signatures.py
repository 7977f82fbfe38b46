"""Any batch size (any input shapes): one captured graph per input signature, cached.

Why not one graph with a dynamic batch (``torch.export.Dim``): a dynamic export has symbolic shapes
(``sym_size`` nodes, SymInt arithmetic between ops), while everything downstream of capture works on
concrete shapes: per-op costs, cut tensor sizes, the server's meta-shape validation and memory bounds,
and its profile and slice caches keyed by graph hash. So a new signature (tree structure + every
input's shape and dtype, see ``pytree_io.signature``) is captured again from the same module: it costs
one ``torch.export`` plus the eager check (see ``bench/bench_capture.py`` for the numbers), once per
signature per process; the weights are the module's own tensors, shared by all the graphs (one
sha256 each, so the server stores and the uplink sends them once). Each signature's graph has its own
model hash, so the server profiles and caches its slices per signature too.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import Any

import torch

from modelgraph.capture import capture
from modelgraph.graph import ModelGraph
from modelgraph.pytree_io import dense_like, signature

log = logging.getLogger(__name__)


def autocast_state() -> tuple[bool, torch.dtype | None]:
    """The CPU autocast state a call runs in: ``(enabled, dtype)`` (dtype None when off). The dispatcher applies
    it to every op a forward runs, so ``model(x)`` under ``torch.autocast("cpu", dtype=torch.bfloat16)`` answers
    bfloat16 where the same call outside answers float32, and ``torch.export`` traces its casts into the graph:
    a graph is specialised on the state it was captured in (break38 F1)."""
    on = torch.is_autocast_enabled("cpu")
    return on, torch.get_autocast_dtype("cpu") if on else None


def no_autocast():
    """A context that runs a captured graph as it was traced: CPU autocast off (a graph captured under autocast
    holds its casts; re-applying autocast to a graph captured without it changes its answer, and the server
    applies none)."""
    return torch.autocast("cpu", enabled=False)


class SignatureCache:
    """Captured graphs of one module, one per input signature, least recently used dropped past ``capacity``.

    ``get(args, kwargs)`` returns the graph for those inputs' signature, capturing it (with these inputs
    as the example) on a miss. Thread-safe; a miss holds the cache's lock while it captures. Raises
    CaptureError like ``capture``."""

    def __init__(
        self,
        module: torch.nn.Module,
        *,
        name: str = "",
        capacity: int = 8,
        check: bool = True,
        first: tuple[tuple, ModelGraph] | tuple[tuple, ModelGraph, Mapping[str, Any]] | None = None,
        exact_layout: bool = False,
    ) -> None:
        """``first``: an already captured ``(example args, graph)`` or ``(example args, graph, example kwargs)``
        to seed the cache with. ``exact_layout``: the forward reads its inputs' strides
        (``modelgraph.pytree_io.reads_layout``): a non-dense input is keyed by its own strides and captured as
        it is, not as its dense copy."""
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self.module = module
        self.name = name or type(module).__name__
        self.capacity = capacity
        self.check = check
        self.exact_layout = exact_layout
        self.hits = 0
        self.misses = 0
        self.capture_s: list[float] = []
        """Seconds each miss spent capturing (torch.export + conversion + eager check)."""
        self._graphs: OrderedDict[tuple, ModelGraph] = OrderedDict()
        self._lock = threading.Lock()
        if first is not None:
            self._graphs[signature(first[0], (first[2] if len(first) > 2 else None) or None, exact_layout)] = first[1]

    def __len__(self) -> int:
        return len(self._graphs)

    def get(self, args: Any, kwargs: Mapping[str, Any] | None = None, mode: tuple | None = None,
            autocast: tuple | None = None, before_capture: Callable[[], None] | None = None) -> ModelGraph:
        """``mode``: the call's autograd mode (``modelgraph.capture.grad_mode``) for a module whose forward reads
        it, part of the key (a miss captures in the caller's mode); None for one that does not. ``autocast``: the
        call's ``autocast_state()`` where it is not the one the cache's graphs were captured in (a miss captures
        in the caller's state), else None. ``before_capture``: called on a miss before the module is captured (the
        caller's check that the module is still the one it captured first: a capture of a changed module would be
        kept for its signature; what it raises propagates, nothing captured)."""
        args = (args,) if isinstance(args, torch.Tensor) else tuple(args)
        sig = signature(args, kwargs, self.exact_layout)
        key = sig if mode is None else (*sig, ("grad mode", mode))
        if autocast is not None:
            key = (*key, ("autocast", autocast))
        with self._lock:
            g = self._graphs.get(key)
            if g is not None:
                self._graphs.move_to_end(key)
                self.hits += 1
                return g
            if before_capture is not None:
                before_capture()
            t0 = time.perf_counter()
            if not self.exact_layout:  # a sliced (non-dense) input is captured as its dense copy: its signature's
                args, kwargs = torch.utils._pytree.tree_map(dense_like, (args, dict(kwargs) if kwargs else None))
            g = capture(self.module, args, kwargs=kwargs, name=self.name, check=self.check)
            self.capture_s.append(time.perf_counter() - t0)
            self.misses += 1
            log.info(
                "captured %s for a new input signature in %.2f s (%d cached)",
                self.name,
                self.capture_s[-1],
                len(self._graphs) + 1,
            )
            self._graphs[key] = g
            while len(self._graphs) > self.capacity:
                self._graphs.popitem(last=False)
            return g
