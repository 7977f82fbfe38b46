"""The model on this device: capture it once (bounded per-process cache), bind inputs, run all or part.

``prepare_model`` captures a spec string, a module or a graph; captured specs are kept in an LRU cache
of ``CAPTURE_CACHE_SIZE`` entries (a captured model holds its weights: an unbounded cache kept every
model a long-lived process ever named). ``run_whole``, ``run_prefix`` and ``run_rest`` run the whole
captured graph, the UE part of a split, and the server part locally (fallback), optionally paced like
a slower device; ``finish_tail`` runs the ops pinned to the UE (off the server's allowlist) after them.
"""

from __future__ import annotations

import operator
import threading
import time
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from modelgraph import (
    ModelGraph,
    ModelGraphError,
    Program,
    ShapeError,
    Split,
    capture,
    collect_outputs,
    load_model,
    run_ue_part,
)
from modelgraph.execute import bind_inputs
from modelgraph.pinning import PinnedTail, run_tail
from modelgraph.pystate import ConstantSources, PythonState, weight_reads
from modelgraph.pytree_io import signature
from modelgraph.sources import with_given_hint
from modelgraph.tensors import to_dtype
from modelgraph.tracelock import TORCH_TRACE_LOCK
from partitioner import CostGraph
from ue_client.errors import InputError
from ue_client.inputs import random_like
from ue_client.weight_values import ValueCheck

CAPTURE_CACHE_SIZE = 8
"""Captured model specs kept per process (least recently used dropped first)."""


@dataclass
class PreparedModel:
    """A captured model and the inputs it was captured with."""

    graph: ModelGraph
    example_inputs: tuple[torch.Tensor, ...]
    spec: str
    module: torch.nn.Module | None = None
    """The user's eager module, when we have it: the reference ``--verify`` compares with, and what
    another input signature is captured from (``CoinferClient``)."""
    example_kwargs: Mapping[str, Any] = field(default_factory=dict)
    """Keyword arguments of ``forward`` the model was captured with (a required keyword-only tensor)."""

    def bound_example(self) -> Any:
        """The example inputs in a form ``bind(graph, x)`` and the profiler take without keywords: the
        positional arguments when there are no keywords, else the graph's flat input names -> tensors."""
        if not self.example_kwargs:
            return self.example_inputs
        return bind(self.graph, self.example_inputs, self.example_kwargs)


class DeferredCheck:
    """One call's ``WeightWatch.check``, run once, when the caller's path says so: a warm split request runs it
    while the UE waits for the server's answer (``RequestPath.run_split``), so on a CPU-quota'd UE it costs no
    latency; anything else runs it before it computes or, at the latest, before the call returns
    (:meth:`finish`). Nothing computed on changed weights is returned: a check that fails raises its
    ``InputError`` from :meth:`finish`, in place of the answer.

    Why: the check reads every watched tensor's samples (``weight_values.ValueCheck``), the module's Python state and
    every version counter: 1.4-2.0 ms of a full core per call for resnet18 and mobilenet_v2 at load ~4 (session 33,
    ``bench_warm_cpu10``), 34-46 % of the UE process's CPU for a warm all-server request, spent before the request
    left; at 10 % of a core the same requests took 4-32 ms (median wall) more with it than with no check at all."""

    __slots__ = ("_check", "_error", "ran")

    def __init__(self, check):
        self._check = check
        self._error: InputError | None = None
        self.ran = False

    def run(self) -> None:
        """Run the check unless it ran; keep its ``InputError`` for :meth:`finish` (never raises it here: the request
        in progress ends normally, and its answer is dropped)."""
        if self.ran:
            return
        self.ran = True
        try:
            self._check()
        except InputError as e:
            self._error = e

    @property
    def failed(self) -> bool:
        """Whether the check ran and found a change."""
        return self._error is not None

    def finish(self) -> None:
        """Run the check if it did not run; raise its ``InputError`` if it found a change."""
        self.run()
        if self._error is not None:
            raise self._error


class WeightWatch:
    """The model's weights as the client captured them; ``check()`` refuses a call once they changed.

    The captured graph reads the module's own parameter and buffer storage (``ModelGraph.weight_values``
    are detached views of them), while the server holds the bytes it was sent, addressed by the sha256
    the client computed once: a weight changed in place after capture (``load_state_dict``, an optimizer
    step, batch-norm statistics moved by a forward in training mode) made local runs use the new values
    and offloaded ones the old (a silently wrong answer on one path), and a parameter replaced by another
    (``module.fc = ...``, ``module.double()``) left every path on the old one. Watched, per weight the
    graph reads: the graph's tensor's version counter and storage pointer, and where the module is known,
    which tensor the module holds under that name (every name it is reachable by, tied weights
    included) and that tensor's version and storage, and the same for the other parameters and buffers of
    each submodule the graph reads from (batch-norm's ``num_batches_tracked``: its CPU kernel updates the
    running statistics without bumping their version counter). A change made through ``param.data`` bypasses the
    version counter (torch keeps no record of it): ``values`` (``ClientOptions.weight_check``) says how the
    values themselves are compared with the capture's (``ue_client.weight_values.ValueCheck``: a sample of each
    tensor's elements, or every byte's sha256).

    ``check`` is one C-level pass over the watched tensors and attributes (``_unchanged``; measured per call
    below, at load ~10 on this 2-core machine); the names are looked for only when something changed.
    Raises ``InputError``.
    """

    def __init__(self, graph: ModelGraph, module: torch.nn.Module | None, values: str = "sampled") -> None:
        self.label = graph.name
        tensors = [(f"weight {name!r}", graph.weight_sources.get(name, t)) for name, t in graph.weight_values.items()]
        read = {t.untyped_storage().data_ptr() for t in (*graph.weight_values.values(), *graph.weight_sources.values())}
        returned = {t.untyped_storage().data_ptr() for leaf in (graph.io.out_leaves if graph.io is not None else ())
                    if isinstance(leaf.get("c"), torch.Tensor) for t in (leaf["c"],)} - read
        """Storage of the parameters and buffers forward returns as is and no op reads (a detection head's anchors):
        every path returns the module's own tensor (``capture``), so a change made in place (the user editing the
        output, ``y["anchors"].mul_(2)``: eager's buffer changes too) is what eager's next call returns as well, and
        is not refused (session 19: refused as a weight changed, though the server holds no copy of it); replacing
        it (``m.anchors = ...``) is (session 18: every path still returned the old one)."""
        self._owned: list[tuple[str, dict, str, torch.Tensor]] = []
        """(name, the owner's ``_parameters`` or ``_buffers``, attribute, tensor held at capture)."""
        if module is not None:
            ptrs = read | returned
            names = set(graph.weight_values)
            for mod_name, mod in module.named_modules(remove_duplicate=False):
                held = [(table, attr, t, f"{mod_name}.{attr}" if mod_name else attr)
                        for table in (mod._parameters, mod._buffers) for attr, t in table.items() if t is not None]
                if not any(full in names or t.untyped_storage().data_ptr() in ptrs for _, _, t, full in held):
                    continue
                # every tensor of a module the graph reads from: batch-norm's kernel moves its running
                # statistics without bumping their version counter, but its num_batches_tracked moves with them
                for table, attr, t, full in held:
                    self._owned.append((full, table, attr, t))
                    if t.untyped_storage().data_ptr() not in returned:
                        tensors.append((f"{full!r}", t))
        if self._owned:  # a graph tensor on the storage of a module tensor shares its version counter (a detach)
            owned = {t.data_ptr() for _, _, _, t in self._owned}
            tensors = [(what, t) for what, t in tensors if not what.startswith("weight ") or t.data_ptr() not in owned]
        self._sources: ConstantSources | None = None
        """The user's tensors behind the graph's lifted constants outside the module's parameters and buffers
        (``modelgraph.pystate.ConstantSources``: an ``nn.Linear`` kept in a plain list, ...): their own version
        counters and storage are watched as a parameter's, and the path to each, step by step."""
        if module is not None:
            owned_storage = {t.untyped_storage().data_ptr() for _, _, _, t in self._owned}
            loose = {t.untyped_storage().data_ptr() for _, t in tensors if t.untyped_storage().data_ptr()
                     not in owned_storage} | (returned - owned_storage)
            if loose:  # a returned plain tensor attribute: its path is watched (replaced), not its values
                self._sources = ConstantSources(module, loose)
                tensors += [(f"constant {path!r}", t) for path, t in self._sources.found
                            if t.untyped_storage().data_ptr() not in returned]
                if not self._sources.found:
                    self._sources = None
        self._graph = graph
        self._state = [(what, t, t._version, t.data_ptr()) for what, t in tensors]
        self._storages = [t.untyped_storage()._cdata for _, t in tensors]
        """Each watched tensor's storage object (its ``StorageImpl``): a storage that moved its bytes as a whole
        (``module.share_memory()``: the same object, the same version, another data pointer, the graph's views
        moved with it) holds the same values, so it is taken as the new baseline, not refused."""
        self._baseline()
        self._values = ValueCheck([(what, t) for what, t, _, _ in self._state], values)
        """The watched tensors' values at capture. Made once: after a storage moved whole (``share_memory()``) its
        views and offsets read the same storage objects, so it is not re-based (break32 G1: re-basing took a
        ``.data`` write made with the move as the new baseline)."""
        self._dtype = None if module is None else graph.default_dtype
        """torch's default dtype at capture where the forward made a floating tensor in it
        (``ModelGraph.default_dtype``; None: it made none, or no module is known: a graph given as the model
        computes what it holds): a call under another default (``torch.set_default_dtype(torch.float64)`` after
        capture) is refused, as the module would make those tensors in the new dtype and every path answers the
        captured one (final15: eager float64, every path float32)."""
        self._python = None if module is None else PythonState(module, graph.python_reads)
        """The module's Python attributes the graph is specialised on (``modelgraph.pystate``): a call after
        the user changed one (``model.temperature = 3.0``) is refused too."""

    def _baseline(self) -> None:
        # in columns for one C-level pass per call (``_unchanged``): ~4,000 tensors and attributes of densenet121
        # checked one by one in Python took 6.8 ms per call at load ~10
        self._cols = ([table for _, table, _, _ in self._owned], [attr for _, _, attr, _ in self._owned],
                      [t for _, _, _, t in self._owned], [t for _, t, _, _ in self._state],
                      [v for _, _, v, _ in self._state], [p for _, _, _, p in self._state])
        self._reads = weight_reads(self._graph)

    def check(self) -> None:
        """``InputError`` naming the first weight or attribute that changed since capture; else nothing.

        A capture of the same module in another thread (another input signature, another client) swaps its
        parameters for fake tensors while ``torch.export`` runs: a failed check is made again under
        ``TORCH_TRACE_LOCK`` (held by every capture), so only a change that outlives it is refused."""
        try:
            self._check()
        except InputError:
            with TORCH_TRACE_LOCK:
                self._check()

    def _unchanged(self) -> bool:
        tables, attrs, held, tensors, versions, ptrs = self._cols
        return ((self._dtype is None or torch.get_default_dtype() is self._dtype)
                and all(map(operator.is_, map(dict.get, tables, attrs), held))
                and list(map(_VERSION, tensors)) == versions and list(map(torch.Tensor.data_ptr, tensors)) == ptrs
                and (self._sources is None or self._sources.unchanged())
                and (self._python is None or self._python.unchanged(self._reads))
                and self._values.unchanged())

    def _check(self) -> None:
        if self._unchanged():
            return
        if self._dtype is not None and torch.get_default_dtype() is not self._dtype:
            raise InputError(
                f"{self.label}: torch's default dtype is {torch.get_default_dtype()}, {self._dtype} when the client "
                "captured the model, and its forward makes tensors in the default dtype (a factory op such as "
                "torch.full or torch.ones without dtype=, integers times a Python float, torch.get_default_dtype()): "
                "the graph keeps "
                f"{self._dtype} there, the model would now compute another dtype; set the default back "
                "(torch.set_default_dtype) or build a new CoinferClient")
        for full, table, attr, t in self._owned:
            if table.get(attr) is not t:
                self._refuse(f"{full!r} was replaced")
        moved = None if self._sources is None else self._sources.replaced()
        if moved is not None:
            self._refuse(f"{moved!r} (read by the graph as a constant) was replaced")
        moved = False
        for i, (what, t, version, ptr) in enumerate(self._state):
            if t._version != version or (t.data_ptr() != ptr and t.untyped_storage()._cdata != self._storages[i]):
                self._refuse(f"{what} was changed in place")
            moved = moved or t.data_ptr() != ptr
        changed = self._values.changed()
        if changed is not None:
            self._refuse(f"{changed} was changed without a version bump (through .data: its values differ from "
                         "those at capture)")
        if moved:  # storages moved whole (``share_memory()``): same objects, same versions, same values
            self._state = [(what, t, version, t.data_ptr()) for what, t, version, _ in self._state]
            if self._python is not None:
                self._python.storage_moved()
            self._baseline()
        hit = None if self._python is None else self._python.changed(self._reads)
        if hit is not None:
            path, attr, change = hit
            if path is None:  # past the modules' attributes (``modelgraph.pystate._Reached``)
                raise InputError(
                    f"{self.label}: {attr} changed ({change}) after the client captured the model; its forward "
                    "reads it and the graph is specialised on its value at capture; build a new CoinferClient after "
                    "changing it")
            if attr == "training":
                raise InputError(
                    f"{self.label}: {self.label}{'.' + path if path else ''} was switched to training mode after the "
                    "client captured the model in eval mode (dropout off, batch-norm on its running statistics); "
                    "call module.eval() before calling the client")
            raise InputError(
                f"{self.label}: the attribute {self.label}{'.' + path if path else ''}.{attr} changed ({change}) "
                "after the client captured the model, whose graph is specialised on its value at capture; build a "
                "new CoinferClient after changing the model")

    def _refuse(self, what: str) -> None:
        raise InputError(
            f"{self.label}: {what} after the client captured it (load_state_dict, an optimizer step, a forward in "
            "training mode, .to()/.double()); the server holds the weights it was sent, so build a new "
            "CoinferClient after changing the model's weights")


_VERSION = operator.attrgetter("_version")

_CAPTURED: OrderedDict[tuple, PreparedModel] = OrderedDict()
_CAPTURE_LOCK = threading.Lock()


def prepare_model(model: str | torch.nn.Module | ModelGraph, example_inputs: Sequence[torch.Tensor] | None = None,
                  *, name: str = "", weights: str | None = None,
                  example_kwargs: Mapping[str, Any] | None = None) -> PreparedModel:
    """Capture ``model`` (a spec string, a module or an already captured graph).

    ``example_kwargs``: keyword arguments of ``forward`` to capture with besides ``example_inputs`` (a
    module or a spec string); for a graph, captured already, the keyword arguments it was captured with (its
    example calls, the profile's and the connect-time runs, pass them; ignored before session 17, so a graph
    captured with keyword arguments failed there).

    Spec strings are cached per process, keyed by (spec, weights file, example input shapes), at most
    ``CAPTURE_CACHE_SIZE`` of them (LRU). Raises ``InputError`` for a model that cannot be loaded or
    captured, or a module without ``example_inputs``.
    """
    try:
        if isinstance(model, ModelGraph):
            g = torch.Generator().manual_seed(0)
            ex = _as_args(example_inputs) if example_inputs is not None else tuple(
                random_like(m.shape, to_dtype(m.dtype), None, g) for m in model.inputs.values())
            return PreparedModel(model, ex, name or model.name, None, dict(example_kwargs or {}))
        if isinstance(model, str):
            given = None if example_inputs is None else _as_args(example_inputs)
            kw = dict(example_kwargs or {})
            key = (model, weights, None if given is None else input_signature(given, kw or None, exact=True))
            with _CAPTURE_LOCK:
                hit = _CAPTURED.get(key)
                if hit is None:
                    lm = load_model(model, weights=weights)
                    ex = given if given is not None else lm.example_inputs
                    if given is None and example_kwargs is None:  # a factory's (module, args, kwargs)
                        kw = dict(lm.example_kwargs)
                    try:
                        graph = capture(lm.module, ex, kwargs=kw, name=name or lm.name)
                    except ModelGraphError as e:
                        raise InputError(lm.with_example_hint(e) if given is None else with_given_hint(e)) from e
                    hit = PreparedModel(graph, ex, model, lm.module, kw)
                    _CAPTURED[key] = hit
                    while len(_CAPTURED) > CAPTURE_CACHE_SIZE:
                        _CAPTURED.popitem(last=False)
                else:
                    _CAPTURED.move_to_end(key)
            return hit
        if isinstance(model, torch.nn.Module):
            if example_inputs is None:
                raise InputError("a module needs example_inputs to be captured")
            ex = _as_args(example_inputs)
            kw = dict(example_kwargs or {})
            return PreparedModel(capture(model, ex, kwargs=kw, name=name or type(model).__name__), ex,
                                 name or type(model).__name__, model, kw)
    except ModelGraphError as e:
        raise InputError(with_given_hint(e)) from e
    raise InputError(f"model must be a spec string, an nn.Module or a ModelGraph, got {type(model).__name__}")


def _as_args(example_inputs: Any) -> tuple:
    """Example inputs as forward's positional arguments: a lone tensor is one argument."""
    return (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(example_inputs)


def bind(graph: ModelGraph, args: Any, kwargs: Mapping[str, Any] | None = None) -> dict[str, torch.Tensor]:
    """The graph's input names bound to ``forward(*args, **kwargs)`` (tensors, numpy arrays, pytrees of
    them; see ``ModelGraph.bind``), each in its captured layout. ``InputError`` (a ``ValueError``) on
    another structure, dtype (never cast) or shape."""
    try:
        return bind_inputs(graph, args, kwargs)
    except ShapeError as e:
        raise InputError(str(e)) from None


def run_whole(model: PreparedModel, env: dict[str, torch.Tensor], slowdown: float = 1.0):
    """The whole model on this device, in the model's own output structure.

    Always the captured graph (the same ops as a split's two parts), never the eager module: a local
    run and a fallback then equal ``CoinferClient.reference`` and the split path bit for bit (the eager
    module can differ from the graph in the last bits, e.g. 1.4e-6 for the zoo's vit_small)."""
    g = model.graph
    return collect_outputs(g, run_prefix(g, g.split(()), env, slowdown=slowdown))


def input_signature(args: Any, kwargs: Mapping[str, Any] | None = None, exact: bool = False) -> tuple:
    """What a captured graph is specialised on: the inputs' tree structure, each tensor's shape, dtype and
    layout (``exact``: a non-dense tensor's own strides, for a forward that reads them), each constant's value
    (``modelgraph.pytree_io.signature``)."""
    return signature(_as_args(args), kwargs, exact)


def run_prefix(graph: ModelGraph, split: Split, env: dict[str, torch.Tensor], *, on_cut_tensor=None,
               slowdown: float = 1.0) -> dict[str, torch.Tensor]:
    """The UE part of ``split`` on bound inputs (``bind``'s result: not checked again), calling
    ``on_cut_tensor`` as each cut tensor exists.

    ``slowdown`` > 1 emulates a device that many times slower than this CPU: after each op the thread
    sleeps (slowdown - 1) x the CPU time the op took on this thread (``Program.run``: not its wall time,
    which includes waits for the GIL and for a core; sleeping uses no CPU, so a shared test machine stays fair).
    """
    return run_ue_part(graph, split, env, on_cut_tensor=on_cut_tensor, after_op=pacer(slowdown), bound=True)


def pacer(slowdown: float):
    """``after_op`` hook of an emulated slower device: sleep (slowdown - 1) x each op's time."""
    if slowdown <= 1.0:
        return None
    return lambda seconds: time.sleep(seconds * (slowdown - 1.0))


def run_rest(graph: ModelGraph, split: Split, env: dict[str, torch.Tensor], slowdown: float = 1.0) -> None:
    """Run the server part locally on the UE prefix's env (fallback: nothing of the prefix is redone)."""
    ops = tuple(graph.op_by_name[n] for n in split.server_order)
    prog = Program(ops, frozenset(graph.outputs), trusted=True)
    prog.run(env, graph.run_weights, after_op=pacer(slowdown))


def finish_tail(graph: ModelGraph, pinned: PinnedTail, env: dict[str, torch.Tensor], slowdown: float = 1.0) -> Any:
    """After the head ran (split, offloaded or its server part locally): run the ops pinned to the UE
    (``modelgraph.pinning``: off the server's allowlist, and their descendants) on ``env`` and return
    the model's own output structure of the full ``graph``."""
    return collect_outputs(graph, run_tail(graph, pinned, env, after_op=pacer(slowdown)))


def slow_costs(costs: CostGraph, slowdown: float) -> CostGraph:
    """UE costs of a device ``slowdown`` times slower (variance x slowdown^2): a profile taken on this CPU
    made the emulated device's (``ClientOptions.ue_slowdown``; a given ``ClientOptions.costs`` is not passed
    here). The profile's times are wall times, while a slowed run sleeps (slowdown - 1) x each op's CPU
    time (``pacer``): on a loaded machine, where an op's wall time exceeds its CPU time, this over-predicts
    the emulated device (emulation only; a real device has no ``ue_slowdown``)."""
    if slowdown == 1.0:
        return costs
    ops = tuple(replace(o, ue_ms=o.ue_ms * slowdown, ue_var=o.ue_var * slowdown ** 2) for o in costs.ops)
    samples = None if costs.ue_samples_ms is None else tuple(tuple(x * slowdown for x in row)
                                                              for row in costs.ue_samples_ms)
    return replace(costs, ops=ops, ue_samples_ms=samples, meta={**costs.meta, "ue_slowdown": slowdown})
