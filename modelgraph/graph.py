"""A captured model as a DAG of ATen ops with explicit weights: the data both sides agree on.

Tensor names ("refs"): a graph input is named by its placeholder; an op's output by the op's name;
element i of an op returning several tensors by ``"<op>#<i>"`` (the fx getitem nodes are folded
into their producer so a cut never has to ship a tuple).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import torch

from modelgraph.argcodec import TensorRef, WeightRef, analyse
from modelgraph.errors import PartitionError
from modelgraph.out_layout import as_callers
from modelgraph.pytree_io import IOSpec
from modelgraph.tensors import TensorMeta, restore_layout, tensor_bytes

SPLIT_CACHE = 64
"""Partitions a ``ModelGraph`` keeps (``ModelGraph.split``; first in, first out)."""


def split_ref(ref: str) -> tuple[str, int | None]:
    """``"bn#0"`` -> ("bn", 0); ``"conv"`` -> ("conv", None)."""
    name, sep, idx = ref.rpartition("#")
    if sep and idx.isdigit():
        return name, int(idx)
    return ref, None


@dataclass(frozen=True)
class OpNode:
    name: str
    target: str
    """Canonical ATen overload name, e.g. ``aten.conv2d.default``."""
    args: tuple[Any, ...]
    """JSON-encoded positional arguments (see argcodec)."""
    kwargs: Mapping[str, Any]
    outputs: tuple[TensorMeta, ...]
    multi: bool = False
    """True when the op returns a tuple/list; consumers then name ``"<op>#<i>"``."""
    layer: str = ""

    def prepare(self, skeletons: dict[tuple, tuple] | None = None) -> None:
        """Decode the arguments and index their references in one walk (``argcodec.analyse``): fills
        what :attr:`template`, :attr:`refs`, :attr:`tensor_inputs`, :attr:`weight_inputs` and
        :attr:`call_skeleton` cache (without ``cached_property``'s lock per attribute: a 20k-op slice
        from a client does this 20k times). ``skeletons``: equal skeletons of one slice become one
        object (``skeletons`` maps each to it). Raises MalformedSliceError like :attr:`template`."""
        d = self.__dict__
        if "call_skeleton" in d:
            return
        a, k, rs, skeleton, tensors, weights = analyse(self.args, self.kwargs)
        if skeletons is not None:
            skeleton = skeletons.setdefault(skeleton, skeleton)
        d["template"] = (a, k)
        d["refs"] = rs
        d["tensor_inputs"] = tensors
        d["weight_inputs"] = weights
        d["call_skeleton"] = skeleton

    # Each of the five is filled by ``prepare`` (one walk); a cached_property runs only when it has not run.
    @cached_property
    def call_skeleton(self) -> tuple:
        """Hashable image of the decoded arguments with each reference replaced by its slot, the index
        of the reference in :attr:`tensor_inputs` or :attr:`weight_inputs` (see ``argcodec.CallForm``):
        equal skeletons with equal tensors and weights at equal slots are the same call."""
        self.prepare()
        return self.__dict__["call_skeleton"]

    @cached_property
    def template(self) -> tuple[list, dict]:
        """(positional, keyword) arguments decoded (``argcodec.decode``), references as TensorRef/WeightRef."""
        self.prepare()
        return self.__dict__["template"]

    @cached_property
    def refs(self) -> tuple[TensorRef | WeightRef, ...]:
        """Every tensor and weight reference in the arguments, in argument order (repeats kept)."""
        self.prepare()
        return self.__dict__["refs"]

    @cached_property
    def tensor_inputs(self) -> tuple[str, ...]:
        """Refs of the tensors this op reads, each once, in argument order."""
        self.prepare()
        return self.__dict__["tensor_inputs"]

    @cached_property
    def weight_inputs(self) -> tuple[str, ...]:
        """Names of the weights this op reads, each once, in argument order."""
        self.prepare()
        return self.__dict__["weight_inputs"]

    def output_refs(self) -> tuple[str, ...]:
        if not self.multi:
            return (self.name,)
        return tuple(f"{self.name}#{i}" for i in range(len(self.outputs)))

    def output_meta(self, ref: str) -> TensorMeta:
        _, idx = split_ref(ref)
        return self.outputs[idx if self.multi else 0]

    def to_json(self) -> dict:
        d = {"name": self.name, "target": self.target, "args": list(self.args),
             "kwargs": dict(self.kwargs), "outputs": [m.to_json() for m in self.outputs]}
        if self.multi:
            d["multi"] = True
        if self.layer:
            d["layer"] = self.layer
        return d


_new_object = object.__new__


def new_op(name: str, target: str, args: tuple, kwargs: Mapping[str, Any], outputs: tuple[TensorMeta, ...],
           multi: bool = False, layer: str = "") -> OpNode:
    """``OpNode(name, target, args, kwargs, outputs, multi, layer)`` without the frozen dataclass's
    ``object.__setattr__`` per field (OpNode has no ``__post_init__``; the result is equal to the
    constructor's): the slice parser builds one per op of a client's slice."""
    op = _new_object(OpNode)
    d = op.__dict__
    d["name"] = name
    d["target"] = target
    d["args"] = args
    d["kwargs"] = kwargs
    d["outputs"] = outputs
    d["multi"] = multi
    d["layer"] = layer
    return op


@dataclass(frozen=True)
class Split:
    """Where each op runs for one partition, and what must cross the link because of it."""

    server_ops: frozenset[str]
    ue_order: tuple[str, ...]
    server_order: tuple[str, ...]
    cut_tensors: tuple[str, ...]
    """Refs produced on the UE (or graph inputs) that server ops read, in the order the server needs them."""
    server_outputs: tuple[str, ...]
    """Graph outputs the server produces and returns."""
    server_weights: tuple[str, ...]
    """Weights the server part reads, each once, in the order the server needs them."""


@dataclass(frozen=True)
class ModelGraph:
    name: str
    ops: tuple[OpNode, ...]
    """In topological order."""
    inputs: Mapping[str, TensorMeta]
    outputs: tuple[str, ...]
    weights: Mapping[str, TensorMeta]
    """Every unique parameter, buffer and lifted constant the ops read (a shared weight once)."""
    weight_values: Mapping[str, torch.Tensor] = field(default_factory=dict, compare=False, repr=False)
    """The UE's actual weight tensors; empty for a weightless copy."""
    weight_sources: Mapping[str, torch.Tensor] = field(default_factory=dict, compare=False, repr=False)
    """The module's own tensor behind a weight whose ``weight_values`` entry is a contiguous copy of it (a
    transposed parameter or tensor attribute): what ``ue_client.model.WeightWatch`` and ``modelgraph.pystate``
    watch for that weight (the copy's version counter and storage are not the module's)."""
    io: IOSpec | None = field(default=None, compare=False, repr=False)
    """The model's own input/output trees (see modelgraph.pytree_io); None for a hand-built graph,
    which then takes its inputs as a flat tuple and returns a tensor or a flat tuple."""
    python_reads: Any = field(default=None, compare=False, repr=False)
    """What the forward looked up on each submodule while the capture's eager check ran
    (``modelgraph.pystate.ForwardReads``), for ``modelgraph.pystate.PythonState``; None when not checked."""
    default_dtype: Any = field(default=None, compare=False, repr=False)
    """torch's default dtype (``torch.get_default_dtype()``) at capture when a floating or complex factory op of
    the forward left its dtype to it (``torch.full(size, -inf)``, ``torch.ones(n)``; ``capture._pinned_dtype``
    pins it in the graph), or when the forward's own code reads it (``x.to(torch.get_default_dtype())``, session 18);
    None when none did. Eager under another default makes those tensors in that dtype, the graph does not:
    ``ue_client.model.WeightWatch`` refuses a call made under another default."""
    grad_mode: tuple | None = field(default=None, compare=False, repr=False)
    """The autograd mode the graph was captured (traced and checked against eager) in, when the forward's own
    code reads it (``torch.is_grad_enabled()``, ``torch.is_inference_mode_enabled()``, ``x.requires_grad``,
    ``x.is_inference()``: ``modelgraph.capture.grad_mode``); None when it reads none, as most do. Eager answers
    such a forward by the mode of each call; the graph keeps its capture's: ``ue_client.CoinferClient`` captures
    a call made in another mode once more, in that mode (session 18: a call in another mode got the captured
    mode's answer, 0.96 off ``model(x)``)."""
    eager_max_diff: float | None = field(default=None, compare=False)
    out_layout: Any = field(default=None, compare=False, repr=False)
    """Eager's output strides and aliasing where the graph's differ (``modelgraph.out_layout.OutputLayout``, from
    the capture's check; None when they agree or unchecked): ``rebuild`` lays every path's outputs out so."""
    """Max |captured graph - eager module| over the output tensors on the example inputs, measured at
    capture (None when not checked); capture refuses beyond its tolerance (see capture.capture)."""

    # ---- lookups ---------------------------------------------------------------------------
    @cached_property
    def op_by_name(self) -> dict[str, OpNode]:
        return {op.name: op for op in self.ops}

    @cached_property
    def producer(self) -> dict[str, str]:
        """Ref -> name of the op producing it (graph inputs are absent)."""
        out = {}
        for op in self.ops:
            for r in op.output_refs():
                out[r] = op.name
        return out

    @cached_property
    def consumers(self) -> dict[str, tuple[str, ...]]:
        """Ref -> names of the ops reading it."""
        out: dict[str, list[str]] = {}
        for op in self.ops:
            for r in op.tensor_inputs:
                out.setdefault(r, []).append(op.name)
        return {k: tuple(v) for k, v in out.items()}

    def meta_of(self, ref: str) -> TensorMeta:
        if ref in self.inputs:
            return self.inputs[ref]
        return self.op_by_name[self.producer[ref]].output_meta(ref)

    def used_out_bytes(self, op: OpNode) -> int:
        """Bytes of this op's outputs that someone reads (a consumer or the caller), as they travel: a cut tensor
        whose layout has stride-0 dimensions (an ``expand``) goes up compact (``TensorMeta.wire_nbytes``: the UE
        sends its base, ``ue_client.request``), a graph output comes back dense (``nbytes``; one that is both
        counts dense)."""
        outs = set(self.outputs)
        total = 0
        for r in op.output_refs():
            if r in outs:
                total += op.output_meta(r).nbytes
            elif r in self.consumers:
                total += op.output_meta(r).wire_nbytes
        return total

    @property
    def total_weight_bytes(self) -> int:
        return sum(m.nbytes for m in self.weights.values())

    # ---- the model's own input/output structure ---------------------------------------------------
    def bind(self, args: Any, kwargs: Mapping[str, Any] | None = None) -> dict[str, torch.Tensor]:
        """Run-time ``forward(*args, **kwargs)`` -> ``{input name: tensor}`` in the captured layout.

        Checks structure, dtype (never cast) and shape: raises ``InputSpecError`` (a ValueError). A graph
        without ``io`` takes a flat sequence of tensors in ``inputs`` order."""
        from modelgraph.pytree_io import check_tensor, flat_io, flatten_inputs

        args = (args,) if isinstance(args, torch.Tensor) else tuple(args)
        plain = self._plain_inputs
        if plain is not None and not kwargs and len(args) == len(plain) \
                and all(isinstance(a, torch.Tensor) for a in args):
            # positional tensors only, as captured: the checks of ``flatten_inputs`` without its tree walk
            return {name: check_tensor(where, a, meta) for a, (name, where, meta) in zip(args, plain)}
        return flatten_inputs(self.io or flat_io(self.inputs, self.outputs, len(args)), self.inputs, args, kwargs)

    @cached_property
    def _plain_inputs(self) -> tuple[tuple[str, str, TensorMeta], ...] | None:
        """(placeholder, readable name, captured meta) per positional argument when ``forward`` takes only
        tensors as positional arguments (no nesting, no keyword arguments, no constants); else None."""
        io = self.io
        if io is None:
            return None
        aspec, kspec = io.in_spec.children()
        if aspec.type is not tuple or kspec.num_children != 0 or any(not c.is_leaf() for c in aspec.children()) \
                or aspec.num_children != len(io.in_leaves) or any("t" not in leaf for leaf in io.in_leaves):
            return None
        return tuple((leaf["t"], where, self.inputs[leaf["t"]]) for leaf, where in zip(io.in_leaves, io.in_names))

    def rebuild(self, values: Mapping[str, torch.Tensor]) -> Any:
        """The value the model's ``forward`` returns, from the graph's output tensors (ref -> tensor).

        A graph without ``io`` returns its one output tensor, or a tuple of them. Tensors of the caller's kind:
        inference tensors under ``torch.inference_mode``, else normal ones (``modelgraph.out_layout.as_callers``)."""
        from modelgraph.pytree_io import rebuild_outputs

        if self.io is None:
            outs = tuple(as_callers([values[o] for o in self.outputs], [True] * len(self.outputs),
                                    [values.get(n) for n in self.inputs]))
            return outs[0] if len(outs) == 1 else outs
        return rebuild_outputs(self.io, values, self.out_layout)

    # ---- identity --------------------------------------------------------------------------
    def structure_json(self) -> dict:
        return {
            "ops": [op.to_json() for op in self.ops],
            "inputs": {k: v.to_json() for k, v in self.inputs.items()},
            "outputs": list(self.outputs),
            "weights": {k: v.to_json() for k, v in self.weights.items()},
        }

    @cached_property
    def model_hash(self) -> str:
        """Stable hash of the structure (ops, shapes, weight shapes), not of weight values: two
        checkpoints of one architecture share profiles; weight content is addressed by sha256."""
        blob = json.dumps(self.structure_json(), sort_keys=True, separators=(",", ":")).encode()
        return hashlib.sha256(blob).hexdigest()[:20]

    @cached_property
    def _weight_sha(self) -> dict[str, str]:
        return {}

    @cached_property
    def run_weights(self) -> Mapping[str, torch.Tensor]:
        """The weights to run the graph with: ``weight_values`` (contiguous: the bytes the uplink sends), but a
        weight whose meta keeps strides (a channels_last or transposed parameter, ``capture``) in that layout,
        as the trace saw it and the server restores it: the module's own tensor (``weight_sources``) when it
        has them, else a copy. Without one it is ``weight_values`` itself."""
        strided = [k for k in self.weight_values if (m := self.weights.get(k)) is not None and m.stride is not None]
        if not strided:
            return self.weight_values
        out = dict(self.weight_values)
        for k in strided:
            meta, src = self.weights[k], self.weight_sources.get(k)
            ok = src is not None and tuple(src.stride()) == meta.stride and src.dtype == out[k].dtype
            out[k] = src if ok else restore_layout(out[k], meta)
        return out

    def weight_sha256(self, name: str) -> str:
        """Content address of one weight (computed once, on first use)."""
        cache = self._weight_sha
        if name not in cache:
            cache[name] = hashlib.sha256(tensor_bytes(self.weight_values[name])).hexdigest()
        return cache[name]

    def weight_layer(self) -> dict[str, str]:
        """Weight name -> layer of its first consumer (for per-layer tables)."""
        out: dict[str, str] = {}
        for op in self.ops:
            for w in op.weight_inputs:
                out.setdefault(w, op.layer)
        return out

    # ---- partitions ------------------------------------------------------------------------
    @cached_property
    def _splits(self) -> dict[frozenset[str], Split]:
        return {}

    def split(self, server_ops: Iterable[str]) -> Split:
        """The partition whose server part is ``server_ops``; it must be closed under successors
        (``PartitionError`` otherwise). The last ``SPLIT_CACHE`` distinct partitions are kept (a ``Split``
        is immutable): the device runtime asks for the same one on every request (~0.1-0.3 ms each on
        resnet18 / googlenet)."""
        server = frozenset(server_ops)
        cache = self._splits
        hit = cache.get(server)
        if hit is not None:
            return hit
        out = self._split(server)
        if len(cache) >= SPLIT_CACHE:
            with contextlib.suppress(RuntimeError, StopIteration):  # another thread may evict at once: fine
                cache.pop(next(iter(cache)), None)
        cache[server] = out
        return out

    def _split(self, server: frozenset[str]) -> Split:
        unknown = server - self.op_by_name.keys()
        if unknown:
            raise PartitionError(f"unknown ops in server part: {sorted(unknown)[:5]}")
        for op in self.ops:
            if op.name in server:
                continue
            for r in op.tensor_inputs:
                p = self.producer.get(r)
                if p in server:
                    raise PartitionError(
                        f"server part is not closed under successors: {p!r} is on the server "
                        f"but its consumer {op.name!r} is on the UE")
        ue_order = tuple(op.name for op in self.ops if op.name not in server)
        server_order = tuple(op.name for op in self.ops if op.name in server)
        cut: dict[str, None] = {}
        weights: dict[str, None] = {}
        for name in server_order:
            op = self.op_by_name[name]
            for r in op.tensor_inputs:
                if self.producer.get(r) not in server:
                    cut.setdefault(r)
            for w in op.weight_inputs:
                weights.setdefault(w)
        server_outputs = tuple(dict.fromkeys(o for o in self.outputs if self.producer.get(o) in server))
        return Split(server, ue_order, server_order, tuple(cut), server_outputs, tuple(weights))

    def split_at(self, k: int) -> Split:
        """The server part is every op from topological position ``k`` on (always a valid partition)."""
        if not 0 <= k <= len(self.ops):
            raise PartitionError(f"split position {k} outside 0..{len(self.ops)}")
        return self.split(op.name for op in self.ops[k:])
