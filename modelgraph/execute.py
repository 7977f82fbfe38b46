"""Run ops of a ModelGraph or a SliceSpec: the same interpreter on both sides of the link.

Running the exact ATen overloads the model's own forward dispatches to is what makes split
execution bit-identical to local execution on the same device type.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from modelgraph.allowlist import resolve, resolve_trusted
from modelgraph.argcodec import _DEVICE, TensorRef, WeightRef
from modelgraph.errors import DanglingReferenceError, InputSpecError, OpExecutionError, ShapeError, SliceError
from modelgraph.graph import ModelGraph, OpNode, Split
from modelgraph.opcall import call_op
from modelgraph.out_layout import INPUTS_REQUIRE_GRAD, inputs_require_grad
from modelgraph.pytree_io import check_tensor, to_tensor_leaf
from modelgraph.runtime_guards import guarded
from modelgraph.slice import Limits, SliceSpec, validate
from modelgraph.tensors import TensorMeta, from_wire, restore_layout

# Functional ops and their in-place twins. The captured graph is functional (safe across cuts); the
# executor switches to the in-place form only where nothing else can observe the mutation: the input
# is a fresh (non-view) tensor produced in this program, this op is its last reader, and it is not
# kept (not an output or cut tensor). Values are bit-identical; memory traffic and allocations drop.
_INPLACE_UNARY = {
    "aten.relu.default": torch.ops.aten.relu_.default,
    "aten.hardtanh.default": torch.ops.aten.hardtanh_.default,
    "aten.hardswish.default": torch.ops.aten.hardswish_.default,
    "aten.silu.default": torch.ops.aten.silu_.default,
    "aten.sigmoid.default": torch.ops.aten.sigmoid_.default,
    "aten.leaky_relu.default": torch.ops.aten.leaky_relu_.default,
}
_INPLACE_BINARY = {"aten.add.Tensor": torch.ops.aten.add_.Tensor, "aten.mul.Tensor": torch.ops.aten.mul_.Tensor}
# Ops whose outputs never share storage with their inputs. An in-place rewrite needs both the
# producer and every reader of the tensor in this set: a view (or an op that may return its input,
# like dropout in eval or contiguous) would let the mutation leak into a tensor still alive.
_FRESH_TEXT = """
conv1d.default conv2d.default conv3d.default convolution.default linear.default addmm.default bmm.default mm.default
_native_batch_norm_legit_no_training.default native_batch_norm.default batch_norm.default layer_norm.default
native_layer_norm.default group_norm.default relu.default hardtanh.default hardswish.default silu.default
sigmoid.default leaky_relu.default gelu.default tanh.default add.Tensor sub.Tensor mul.Tensor div.Tensor cat.default
stack.default max_pool2d.default avg_pool2d.default adaptive_avg_pool2d.default _softmax.default softmax.int
scaled_dot_product_attention.default clone.default _to_copy.default mean.dim sum.dim_IntList constant_pad_nd.default
upsample_nearest2d.vec upsample_bilinear2d.vec
"""
_FRESH_OUTPUT = frozenset(f"aten.{n}" for n in _FRESH_TEXT.split())


def _inplace_fn(op: OpNode, i: int, last_use: Mapping[str, int], keep: frozenset[str],
                producers: Mapping[str, OpNode], aliased_reads: set[str]) -> Callable | None:
    """The in-place twin of ``op`` (the ``i``-th op) when nothing else can observe the mutation, else None.

    ``aliased_reads``: refs read by some op whose output may share storage with its inputs (not in
    ``_FRESH_OUTPUT``)."""
    unary = _INPLACE_UNARY.get(op.target)
    binary = _INPLACE_BINARY.get(op.target) if unary is None else None
    if unary is None and binary is None:
        return None
    args = op.template[0]
    if not args or type(args[0]) is not TensorRef:
        return None
    r = args[0].name
    if r in keep or r in aliased_reads or last_use.get(r) != i:
        return None
    prod = producers.get(r)
    if prod is None or prod.target not in _FRESH_OUTPUT:
        return None
    if binary is not None:
        src = prod.output_meta(r)
        out = op.outputs[0]
        if src.shape != out.shape or src.dtype != out.dtype or src.stride is not None:
            return None
        return binary
    return unary


_MAX_POOL2D = "aten.max_pool2d.default"
_max_pool2d = torch.ops.aten.max_pool2d.default
_EXACT_CL_POOL = (torch.float32, torch.float64)


def max_pool2d_channels_last(*args, **kwargs) -> torch.Tensor:
    """``aten.max_pool2d.default`` with the same arguments and result, through ATen's channels-last CPU kernel
    when the input is a 4-d float32 / float64 CPU tensor in NCHW-contiguous layout: the input is copied to
    channels-last, pooled there and the result copied back to NCHW-contiguous (the layout the NCHW kernel
    returns). Any other input runs the op as it is.

    Why: the NCHW CPU kernel is scalar; the channels-last one is vectorised over channels. googlenet's
    first max pool (1x64x112x112, 3x3 / 2, ceil_mode) took 4.38 ms on one thread here and 0.70 ms this way,
    both copies included (0.25 ms in channels-last alone); googlenet's 13 max pools were about half of its
    server compute (~24 of ~50 ms, two threads, session 10's bench with ``--op-timings``). Bit-identical: a
    max selects one of its inputs, and both kernels scan the window in the same order with the same NaN
    rule (tests: random inputs with NaN, +-0 and -inf, strides, dilation, padding, ceil_mode; bitwise).
    Not bfloat16 / float16: their channels-last kernel computes in float and gives NaN another bit pattern.
    Scratch: one copy of the input and one of the output (``edge_server.op_budget`` counts them)."""
    x = args[0] if args else kwargs.get("self")
    if (isinstance(x, torch.Tensor) and x.dim() == 4 and x.device.type == "cpu" and x.dtype in _EXACT_CL_POOL
            and x.is_contiguous() and not x.is_contiguous(memory_format=torch.channels_last)):
        xc = x.contiguous(memory_format=torch.channels_last)
        if args:
            args = (xc, *args[1:])
        else:
            kwargs = {**kwargs, "self": xc}
        return _max_pool2d(*args, **kwargs).contiguous()
    return _max_pool2d(*args, **kwargs)


def _op_error(op: OpNode, e: Exception) -> OpExecutionError:
    """The typed error of an op whose kernel refused its inputs, naming the op."""
    msg = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
    return OpExecutionError(f"op {op.name!r} ({op.target}) failed: {type(e).__name__}: {msg}")


def _binder(op: OpNode, device: torch.device) -> Callable | None:
    """A function ``(env, weights) -> (args, kwargs)`` that binds ``op``'s arguments as ``call_op`` does
    (``argcodec.bind``: references from ``env`` / ``weights``, the device slot to ``device``), with where
    each reference sits worked out once: the graph interpreter's per-op cost (~1-2 us an op, 0.3-0.4 ms
    a request on mobilenet_v2 and googlenet, against the eager module) is mostly this binding. For
    templates whose references sit at the top level of the positional arguments or one list down and
    whose keyword arguments hold no reference, list or dict; None for the others (``call_op`` binds them).
    A missing reference raises ``KeyError``."""
    args, kwargs = op.template
    kw: dict = {}
    for k, v in kwargs.items():
        if isinstance(v, TensorRef | WeightRef | list | dict):
            return None
        kw[k] = device if v is _DEVICE else v
    consts = list(args)
    top: list[tuple[int, bool, str]] = []
    nested: list[tuple[int, int, bool, str]] = []
    for i, v in enumerate(consts):
        if isinstance(v, TensorRef | WeightRef):
            top.append((i, isinstance(v, TensorRef), v.name))
        elif v is _DEVICE:
            consts[i] = device
        elif isinstance(v, dict):
            return None
        elif isinstance(v, list):
            for j, x in enumerate(v):
                if isinstance(x, list | dict) or x is _DEVICE:
                    return None
                if isinstance(x, TensorRef | WeightRef):
                    nested.append((i, j, isinstance(x, TensorRef), x.name))
    if nested:
        lists = sorted({i for i, *_ in nested})

        def bind_nested(env, weights):
            a = list(consts)
            for i in lists:
                a[i] = list(consts[i])
            for i, is_t, name in top:
                a[i] = env[name] if is_t else weights[name]
            for i, j, is_t, name in nested:
                a[i][j] = env[name] if is_t else weights[name]
            return a, kw
        return bind_nested

    def bind_top(env, weights):
        a = list(consts)
        for i, is_t, name in top:
            a[i] = env[name] if is_t else weights[name]
        return a, kw
    return bind_top


@dataclass
class OpTiming:
    name: str
    ms: float


@dataclass
class Program:
    """An ordered list of ops with last-use bookkeeping so intermediates are freed early."""

    ops: tuple[OpNode, ...]
    keep: frozenset[str]
    """Refs that must survive (outputs, cut tensors)."""
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    trusted: bool = False
    """True for the device's own graph (any ATen op); False for a slice from a client (allowlist)."""

    def __post_init__(self) -> None:
        if self.trusted:
            self._fns = [resolve_trusted(op.target) for op in self.ops]
        else:  # a client's: its indices checked, division's trap refused, no shared weight written (``runtime_guards``)
            self._fns = [guarded(op.target, resolve(op.target)) for op in self.ops]
        last: dict[str, int] = {}
        producers: dict[str, OpNode] = {}
        aliased_reads: set[str] = set()
        for i, op in enumerate(self.ops):
            ins = op.tensor_inputs
            for r in ins:
                last[r] = i
            if op.target not in _FRESH_OUTPUT:
                aliased_reads.update(ins)
            if op.multi:
                for r in op.output_refs():
                    producers[r] = op
            else:
                producers[op.name] = op
        keep = self.keep
        free_after: list[tuple[str, ...]] = []
        for i, op in enumerate(self.ops):
            if op.target == _MAX_POOL2D and self.device.type == "cpu":
                self._fns[i] = max_pool2d_channels_last
            if op.target in _INPLACE_UNARY or op.target in _INPLACE_BINARY:
                fn = _inplace_fn(op, i, last, keep, producers, aliased_reads)
                if fn is not None:
                    self._fns[i] = fn
            ins = op.tensor_inputs
            if len(ins) == 1:  # most ops: the tuple itself, or nothing (no list built per op)
                free_after.append(ins if last[ins[0]] == i and ins[0] not in keep else ())
            else:
                free_after.append(tuple([r for r in ins if last[r] == i and r not in keep]) if ins else ())
            # outputs nothing reads and nobody keeps (a sort's indices, batch norm's saved statistics): freed
            # at once, not held to the end of the run outside the memory estimate
            outs = op.output_refs() if op.multi else (op.name,)
            dead = [r for r in outs if r not in last and r not in keep]
            if dead:
                free_after[i] = (*free_after[i], *dead)
        self._free_after = free_after  # per op: the refs it read last and the outputs nothing reads (not kept)
        self._binders = [_binder(op, self.device) for op in self.ops]

    def run(self, env: dict[str, torch.Tensor], weights: Mapping[str, torch.Tensor], *,
            on_output: Callable[[str, torch.Tensor], None] | None = None,
            watch: frozenset[str] = frozenset(), timings: list[OpTiming] | None = None,
            after_op: Callable[[float], None] | None = None) -> dict[str, torch.Tensor]:
        """Run every op; ``on_output(ref, tensor)`` fires as soon as a watched ref is computed.

        ``after_op(seconds)`` is called after each op with the CPU seconds the op took on this thread
        (``time.thread_time``; torch's intra-op workers run beside it, so with several threads this is
        about the op's wall time): the pace of an emulated slower device. Not wall time: an op's wall time
        includes waiting for the GIL (up to ``sys.getswitchinterval()``, 5 ms, per op while another
        Python thread, e.g. the UE's sender, runs) and for a core, and an emulated device N times slower
        multiplied those waits too (mobilenet_v2's 148-op prefix at 10x: 6.4 s beside an upload instead of
        ~0.2 s), which a slower device does not."""
        if timings is None and after_op is None:
            with torch.inference_mode():
                return self._run_plain(env, weights, on_output, watch)
        with torch.inference_mode():
            for i in range(len(self.ops)):
                t0 = time.thread_time() if after_op is not None else 0.0
                self.run_op(i, env, weights, on_output=on_output, watch=watch, timings=timings)
                if after_op is not None:
                    after_op(time.thread_time() - t0)
        return env

    def _run_plain(self, env: dict[str, torch.Tensor], weights: Mapping[str, torch.Tensor],
                   on_output: Callable[[str, torch.Tensor], None] | None, watch: frozenset[str]) -> dict:
        """``run`` without timings or pacing: ``run_op``'s steps in one loop (a method call with keyword
        arguments per op was ~1 us of the interpreter's per-op cost), the same results and errors."""
        ops, fns, binders, frees = self.ops, self._fns, self._binders, self._free_after
        for i in range(len(ops)):
            binder = binders[i]
            if binder is None:  # an argument structure only ``call_op`` binds
                self.run_op(i, env, weights, on_output=on_output, watch=watch)
                continue
            try:
                a, kw = binder(env, weights)
            except KeyError:  # a missing ref: ``run_op`` (``call_op``) names it
                self.run_op(i, env, weights, on_output=on_output, watch=watch)
                continue
            op = ops[i]
            try:
                out = fns[i](*a, **kw)
            except (SliceError, torch.OutOfMemoryError):
                raise
            except Exception as e:
                raise _op_error(op, e) from e
            if op.multi:
                for r, t in zip(op.output_refs(), out):
                    env[r] = t
            else:
                env[op.name] = out
            for r in frees[i]:
                env.pop(r, None)
            if on_output is not None:
                for r in op.output_refs():
                    if r in watch:
                        on_output(r, env[r])
        return env

    def run_op(self, i: int, env: dict[str, torch.Tensor], weights: Mapping[str, torch.Tensor], *,
               on_output: Callable[[str, torch.Tensor], None] | None = None,
               watch: frozenset[str] = frozenset(), timings: list[OpTiming] | None = None) -> None:
        op = self.ops[i]
        t0 = time.perf_counter() if timings is not None else 0.0
        try:
            binder = self._binders[i]
            bound = None
            if binder is not None:
                try:
                    bound = binder(env, weights)
                except KeyError:  # a missing ref: ``call_op`` names it
                    bound = None
            out = call_op(op, env, weights, self.device, self._fns[i]) if bound is None \
                else self._fns[i](*bound[0], **bound[1])
        except (SliceError, torch.OutOfMemoryError):  # out of memory: the device's, not the inputs' (review34)
            raise
        except Exception as e:  # a kernel refusing its inputs: name the op, keep a typed error
            raise _op_error(op, e) from e
        if timings is not None:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            timings.append(OpTiming(op.name, (time.perf_counter() - t0) * 1e3))
        if op.multi:
            for r, t in zip(op.output_refs(), out):
                env[r] = t
        else:
            env[op.name] = out
        for r in self._free_after[i]:
            env.pop(r, None)
        if on_output is not None:
            for r in op.output_refs():
                if r in watch:
                    on_output(r, env[r])


def bind_inputs(graph: ModelGraph, inputs: Any, kwargs: Mapping[str, Any] | None = None) -> dict[str, torch.Tensor]:
    """Run-time inputs -> ``{graph input name: tensor}``, checked and in the captured layout.

    ``inputs`` is either the positional arguments of the model's ``forward`` (a tuple of pytrees; a lone
    tensor is one argument) with ``kwargs`` its keyword arguments, or an already flat mapping from the
    graph's input names to tensors. Raises InputSpecError (a ValueError and a ShapeError) on another
    structure, dtype (never cast) or shape; a tensor of other strides (a permuted view, channels_last)
    is copied into the captured layout."""
    if isinstance(inputs, Mapping) and not kwargs:
        missing = [n for n in graph.inputs if n not in inputs]
        if missing:
            raise InputSpecError(f"missing input {missing[0]!r} (the graph's inputs: {', '.join(graph.inputs)})")
        return {n: check_tensor(repr(n), to_tensor_leaf(inputs[n]), m) for n, m in graph.inputs.items()}
    return graph.bind(inputs, kwargs)


def run_ue_part(graph: ModelGraph, split: Split, inputs, *,
                on_cut_tensor: Callable[[str, torch.Tensor], None] | None = None,
                device: torch.device | str = "cpu", timings: list[OpTiming] | None = None,
                after_op: Callable[[float], None] | None = None, bound: bool = False) -> dict[str, torch.Tensor]:
    """Run the UE's ops; returns the env holding every cut tensor and every UE-produced output.

    ``on_cut_tensor`` is called the moment each cut tensor exists, so a sender can ship it while
    the rest of the prefix still runs. Graph inputs that are cut tensors are reported first.
    ``bound``: ``inputs`` is already ``bind_inputs``' result for this graph's inputs (checked, in the
    captured layout), so it is not checked again (the device runtime binds each request once).
    """
    env = {n: inputs[n] for n in graph.inputs} if bound else bind_inputs(graph, inputs)
    cut = frozenset(split.cut_tensors)
    if on_cut_tensor is not None:
        for r in split.cut_tensors:
            if r in graph.inputs:
                on_cut_tensor(r, env[r])
    if not split.ue_order:  # nothing runs here (every op on the server): what a program of no ops returns
        return env
    prog = _program(graph, split.ue_order, frozenset(graph.outputs) | cut | frozenset(graph.inputs), device)
    weights = graph.run_weights
    return prog.run(env, weights, on_output=on_cut_tensor, watch=cut, timings=timings, after_op=after_op)


PROGRAM_CACHE = 16
"""UE parts (op order, kept refs, device) whose ``Program`` a graph keeps: the device runs the same part on
every request of a plan, and building its program (an op resolution and last-use pass over every op) cost
~0.1-0.5 ms per request on resnet18 / googlenet."""


def _program(graph: ModelGraph, order: tuple[str, ...], keep: frozenset[str], device) -> Program:
    """The program of the ops ``order`` of ``graph`` keeping ``keep`` on ``device`` (built once per
    ``PROGRAM_CACHE`` distinct ones; a ``Program`` is not changed by running it)."""
    dev = torch.device(device)
    key = (order, keep, str(dev))
    cache = graph.__dict__.setdefault("_programs", {})
    prog = cache.get(key)
    if prog is None:
        prog = Program(tuple(graph.op_by_name[n] for n in order), keep, dev, trusted=True)
        if len(cache) >= PROGRAM_CACHE:
            with contextlib.suppress(RuntimeError, StopIteration, KeyError):  # another thread evicting: fine
                cache.pop(next(iter(cache)))
        cache[key] = prog
    return prog


def run_graph(graph: ModelGraph, inputs: Any, *, kwargs: Mapping[str, Any] | None = None,
              device: torch.device | str = "cpu") -> Any:
    """Run the whole captured graph locally (the reference for split execution); returns what the
    model's ``forward`` returns (its own structure). ``inputs``/``kwargs`` as for :func:`bind_inputs`."""
    env = run_ue_part(graph, graph.split(()), bind_inputs(graph, inputs, kwargs), device=device)
    token = INPUTS_REQUIRE_GRAD.set(inputs_require_grad(graph.out_layout, (inputs, kwargs)))
    try:
        return collect_outputs(graph, env)
    finally:
        INPUTS_REQUIRE_GRAD.reset(token)


def collect_outputs(graph: ModelGraph, env: Mapping[str, torch.Tensor]) -> Any:
    """The model's own output structure (``graph.rebuild``) from an env holding every graph output."""
    return graph.rebuild(env)


class SliceProgram:
    """A validated server part, ready to run on ``device``. Construction runs every check (``check``: called
    periodically while validating, ``modelgraph.slice.validate``; what it raises ends the construction)."""

    def __init__(self, spec: SliceSpec, device: torch.device | str = "cpu", limits: Limits | None = None,
                 check: Callable[[], None] | None = None):
        self.spec = spec
        self.device = torch.device(device)
        self.nondense: set[str] = set()
        """Refs whose layout is not dense (stride 0 or gaps: ``modelgraph.slice.validate``)."""
        self.strides: dict[str, tuple[int, ...]] = {}
        """Run-time strides of the refs whose layout the spec pins (``modelgraph.slice.validate``)."""
        self.order = validate(spec, limits or Limits(), check, self.nondense, self.strides)
        self.program = Program(self.order, frozenset(spec.outputs), self.device)

    def prepare_input(self, ref: str, t: torch.Tensor) -> torch.Tensor:
        """Check a received cut tensor against the spec and restore its producer's layout.

        ``t`` may come dense (``meta.shape``) or, for a layout with stride-0 dimensions, as its compact base
        (``wire_shape(meta)``: index 0 of each such dimension, what ``restore_layout`` reads of a dense one); the
        compact one is expanded back first. Both give the same tensor: same values, same strides."""
        meta: TensorMeta | None = self.spec.inputs.get(ref)
        if meta is None:
            raise DanglingReferenceError(f"{ref!r} is not an input of this slice")
        shape = tuple(t.shape)
        if shape not in (meta.shape, meta.wire_shape) or TensorMeta.of(t, keep_stride=False).dtype != meta.dtype:
            compact = f" (or compact {list(meta.wire_shape)})" if meta.wire_shape != meta.shape else ""
            raise ShapeError(f"input {ref!r} is {list(t.shape)} {t.dtype}; expected {list(meta.shape)}{compact} "
                             f"{meta.dtype}")
        if shape == meta.shape:
            return restore_layout(t.to(self.device), meta)
        wide = from_wire(t.to(self.device), meta)
        out = restore_layout(wide, meta)
        if out is wide and tuple(wide.stride()) != meta.strides:
            return wide.contiguous()  # a layout restore_layout cannot give: contiguous, as a dense one comes back
        return out

    def run(self, inputs: Mapping[str, torch.Tensor], weights: Mapping[str, torch.Tensor], *,
            timings: list[OpTiming] | None = None) -> dict[str, torch.Tensor]:
        env = {r: self.prepare_input(r, t) for r, t in inputs.items()}
        missing = [r for r in self.spec.inputs if r not in env]
        if missing:
            raise DanglingReferenceError(f"missing cut tensors: {missing[:5]}")
        self.program.run(env, weights, timings=timings)
        return {o: env[o] for o in self.spec.outputs}
