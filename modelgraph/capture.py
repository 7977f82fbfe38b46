"""Capture any nn.Module as a ModelGraph with torch.export (ATen level, functional)."""

from __future__ import annotations

import contextlib
import io
import logging
import operator
import re
import time
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import replace
from typing import Any

import torch
from torch.export.graph_signature import ConstantArgument, InputKind, OutputKind
from torch.utils import _pytree as pytree

from modelgraph.allowlist import op_name
from modelgraph.argcodec import encode
from modelgraph.compare import TOLERANCES, tensor_max_diff, tensor_within_tolerance
from modelgraph.errors import CaptureError, ModelGraphError
from modelgraph.graph import ModelGraph, OpNode
from modelgraph.out_layout import OutputLayout, eager_layout
from modelgraph.pystate import (
    Drawn,
    DrawWatch,
    ForwardReads,
    PythonState,
    clock_bases,
    draw_sources,
    entropy_refusal,
    fake_clocks,
    made_in_forward,
    state_or_none,
    traced_reads,
    weight_reads,
)
from modelgraph.pytree_io import IOSpec, sizes_as_tuples, spec_line, to_tensor_leaf
from modelgraph.tensors import TensorMeta
from modelgraph.tracelock import TORCH_TRACE_LOCK
from modelgraph.value_reads import data_branch_refusal, item_sources

log = logging.getLogger(__name__)

_WEIGHT_KINDS = {InputKind.PARAMETER, InputKind.BUFFER, InputKind.CONSTANT_TENSOR}

_STATIC_CHECKS = frozenset({"aten._assert_tensor_metadata.default"})
"""Ops that only assert a tensor's size/stride/dtype and return nothing (``x.to(dtype)`` leaves one in
mvit_v2_s and raft). The graph is captured for one input signature, so each holds by construction;
:func:`_static_check_holds` confirms it on the traced metadata and the node is dropped."""


def _static_check_holds(node: torch.fx.Node) -> bool:
    """True when an ``_assert_tensor_metadata`` node's size/stride/dtype/device match its input's traced
    value (the check then holds on every run of this captured graph) and nothing reads its result."""
    if node.users:
        return False
    val = node.args[0].meta.get("val") if node.args and isinstance(node.args[0], torch.fx.Node) else None
    if not isinstance(val, torch.Tensor):
        return False
    given = dict(zip(("size", "stride", "dtype"), node.args[1:]), **node.kwargs)
    want = {"size": list(val.shape), "stride": list(val.stride()), "dtype": val.dtype, "device": val.device,
            "layout": val.layout}
    for key, v in given.items():
        if v is None:
            continue
        if key in ("size", "stride"):
            v = list(v)
        if key not in want or v != want[key]:
            return False
    return True


def _pinned_dtype(node: torch.fx.Node) -> dict:
    """``node.kwargs``, with ``dtype`` set to the traced output's dtype for a factory op that left it to torch's
    default (``torch.full(size, -inf)``, ``torch.ones(n)``, ``torch.arange(0.5, n)``: ``dtype=None``, first argument
    not a tensor, so not a ``*_like`` op that takes its input's dtype).

    Why: such an op makes ``torch.get_default_dtype()``'s dtype wherever it runs, so a UE process whose default
    was changed after capture (``torch.set_default_dtype(torch.float64)``) computed that part in float64 while
    the server and the captured metadata said float32: the split failed (``baddbmm``: "Input dtypes must be the
    same", session 15) or, where type promotion hides it, a local run and a split answer in different dtypes.
    Pinned, every path computes what was captured."""
    val = node.meta.get("val")
    schema = node.target._schema
    if not isinstance(val, torch.Tensor) or not schema.arguments or node.kwargs.get("dtype") is not None:
        return dict(node.kwargs)
    if isinstance(schema.arguments[0].type, torch.TensorType) or not any(a.name == "dtype" and a.kwarg_only
                                                                        for a in schema.arguments):
        return dict(node.kwargs)
    return {**node.kwargs, "dtype": val.dtype}


def _floating(v: object) -> bool:
    return isinstance(v, torch.Tensor) and (v.is_floating_point() or v.is_complex())


def _default_made(node: torch.fx.Node, pinned: dict) -> bool:
    """Whether eager made ``node``'s floating output in torch's default dtype: a factory op that left its dtype
    to it (pinned in the graph: ``_pinned_dtype``), or an op with no floating tensor input and no dtype argument
    (``torch.arange(6) * 0.1``, ``idx / 2``, ``int_tensor.sqrt()``: type promotion of integers with a Python float).
    Under another default (``torch.set_default_dtype(torch.float64)`` after capture) eager computes such a part
    in that dtype and the graph does not (``ModelGraph.default_dtype``)."""
    val = node.meta.get("val")
    if not _floating(val) or node.kwargs.get("dtype") is not None:
        return False
    if pinned.get("dtype") is not None:
        return True
    flat = torch.utils._pytree.tree_leaves((node.args, dict(node.kwargs)))
    if any(isinstance(a, torch.dtype) for a in flat):
        return False
    return not any(isinstance(a, torch.fx.Node) and _floating(a.meta.get("val")) for a in flat)


def _meta(val: object, where: str) -> TensorMeta:
    if not isinstance(val, torch.Tensor):
        raise CaptureError(
            f"{where} produces a non-tensor value ({type(val).__name__}); only tensor-valued ops can be represented"
        )
    return TensorMeta.of(val)


def _layer_of(node: torch.fx.Node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    path = list(stack.values())[-1][0]
    return str(path).replace("L['self'].", "").replace("L__self___", "")


def _path_name(keystr: str) -> str:
    """``[0][0]['a']`` (a path in ``(args, kwargs)``) -> ``args[0]['a']``."""
    if keystr.startswith("[0]"):
        return "args" + keystr[3:]
    if keystr.startswith("[1]"):
        return "kwargs" + keystr[3:]
    return keystr


def _storage_key(t: torch.Tensor) -> tuple[str, int] | None:
    try:
        st = t.untyped_storage()
    except (RuntimeError, NotImplementedError):  # sparse, meta without storage...
        return None
    return (str(t.device), st.data_ptr()) if st.nbytes() > 0 else None


def _unalias(module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """Clone every example tensor that shares storage with another example tensor or with a parameter
    or buffer of ``module``: torch.export would otherwise trace them as one placeholder (the same tensor
    twice) and the captured graph would read one input for both."""
    owners: dict[tuple[str, int], int] = {}
    for t in [*module.parameters(), *module.buffers()]:
        k = _storage_key(t)
        if k is not None:
            owners[k] = owners.get(k, 0) + 1
    leaves, spec = pytree.tree_flatten((args, kwargs))
    for x in leaves:
        if isinstance(x, torch.Tensor):
            k = _storage_key(x)
            if k is not None:
                owners[k] = owners.get(k, 0) + 1
    shared = 0
    out = []
    for x in leaves:
        if isinstance(x, torch.Tensor) and owners.get(_storage_key(x), 0) > 1:
            x = x.detach().clone(memory_format=torch.preserve_format)
            shared += 1
        out.append(x)
    if shared:
        log.info(
            "%d example inputs share storage with another input or a weight; each is captured as its own input", shared
        )
    return pytree.tree_unflatten(out, spec)


@contextlib.contextmanager
def _quiet(verbose: bool, sink: io.StringIO) -> Iterator[None]:
    """Silence torch's own warnings, log records and stderr prints for the duration (unless verbose)."""
    if verbose:
        yield
        return
    names = ["torch", *(n for n in logging.root.manager.loggerDict if n.startswith("torch."))]
    saved = {}
    for n in names:
        lg = logging.getLogger(n)
        saved[n] = lg.level
        lg.setLevel(logging.CRITICAL)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stderr(sink):
            warnings.simplefilter("ignore")
            yield
    finally:
        for n, level in saved.items():
            logging.getLogger(n).setLevel(level)


def _symbolic(val: Any) -> bool:
    if isinstance(val, torch.SymInt | torch.SymFloat | torch.SymBool):
        return True
    if isinstance(val, torch.Tensor):
        return any(not isinstance(d, int) for d in val.shape)
    if isinstance(val, list | tuple):
        return any(_symbolic(v) for v in val)
    return False


def _check_symbolic(graph: torch.fx.Graph, label: str, signature: Any = None) -> None:
    """Refuse a graph in which a value depends on the data (an unbacked size or scalar); ``signature`` (the
    export's ``graph_signature``) names the weights a value read from weights only comes from."""
    for node in graph.nodes:
        if node.op != "call_function" or not _symbolic(node.meta.get("val")):
            continue
        target = op_name(node.target)
        if target.split(".")[1] in ("item", "_local_scalar_dense"):
            weights, inputs = item_sources(node, signature) if signature is not None else ([], ["?"])
            if weights and not inputs:  # ``x / self.t.item()``: a weight's value (session 22, review22)
                raise CaptureError(
                    f"{label} reads the value of its weight {', '.join(f'{label}.{w}' for w in weights)} into Python "
                    f"({target}: .item(), float(), int()): a weight's value is fixed, but the graph carries tensors, "
                    f"not Python numbers; keep it a tensor: scale by it as a tensor (x / self.{weights[0]}), pick with "
                    f"torch.where(self.{weights[0]} > 0, a, b)")
            src = f" of input {', '.join(inputs)}" if inputs and inputs != ["?"] else ""
            raise CaptureError(
                f"{label} reads a tensor's value{src} into Python ({target}: .item(), float(), int() "
                "or a data-dependent condition); keep the computation in tensors (torch.where, "
                "torch.clamp; for a branch compute both sides and pick with torch.where)"
            )
        raise CaptureError(
            f"{label}: the output size of {target} depends on the input values "
            "(data-dependent shape); use a fixed-size form (torch.where(mask, x, 0), topk with "
            "a fixed k, masking instead of boolean indexing)"
        )


_CONTROL_FLOW: dict[str, tuple[str, str]] = {
    "cond": ("torch.cond", "compute both branches and pick with torch.where(pred, a, b) (equal to the branch "
             "taken; both run), or branch in Python on shapes or constants"),
    "while_loop": ("torch.while_loop", "loop in Python over a fixed count (traced into plain ops), or run the "
                   "loop outside the model"),
    "map_impl": ("torch's control_flow.map", "use batched ops over the leading dimension, or a Python for loop "
                 "over its fixed size"),
    "scan": ("torch.scan", "loop in Python over the fixed length (traced into plain ops)"),
    "associative_scan": ("torch.associative_scan", "use torch.cumsum/cumprod/cummax or a Python loop over the "
                         "fixed length"),
}
"""Higher-order op name (``torch.ops.higher_order.<name>``) -> (the construct as users write it, what to do)."""


def _check_control_flow(graph: torch.fx.Graph, label: str) -> None:
    """Refuse a graph that still holds a higher-order op (``torch.cond``, ``torch.while_loop``, ``map``,
    ``scan``...; checked after ``run_decompositions``, which inlines ``no_grad``/``autocast`` regions) in one
    line naming the construct, the submodule that uses it and what to write instead (DESIGN.md §4: a
    refusal names the cause and the fix). Such an op carries its body as sub-graphs: coinfer captures a
    flat DAG of allowlisted ATen ops, which a sub-graph is not (the server runs no client graph code), so
    it can be neither cut nor sent. Before, the refusal was ``unsupported node get_attr true_graph_0``.

    Raises CaptureError."""
    for node in graph.nodes:
        if node.op != "call_function" or not isinstance(node.target, torch._ops.HigherOrderOperator):
            continue
        hop = node.target.name()
        what, fix = _CONTROL_FLOW.get(hop, (f"the higher-order op {hop}", "write it with plain tensor ops, or "
                                            "run it outside the model"))
        where = _where(node, label)
        raise CaptureError(
            f"{where} uses {what}, which coinfer cannot split (its body is a sub-graph, not ATen ops the "
            f"server may run); {fix}"
        )


def _where(node: torch.fx.Node, label: str) -> str:
    """``label.path (Class)`` of the innermost submodule ``node`` was traced in (``label`` alone at the top)."""
    stack = node.meta.get("nn_module_stack") or {}
    path, cls = list(stack.values())[-1] if stack else ("", "")
    path = str(path).replace("L['self'].", "").replace("L__self___", "")
    return f"{label}.{path} ({str(cls).rsplit('.', 1)[-1]})" if path else label


def _draws_nothing(node: torch.fx.Node) -> bool:
    """True for a call of a random-tagged op that draws nothing: its ``train``/``training`` argument is False
    (dropout, the RNNs' inter-layer dropout in eval) or its probability (``p``, ``dropout``, ``dropout_p``) is 0
    (``scaled_dot_product_attention`` without dropout), read by name from the op's schema."""
    values = dict(node.kwargs)
    for i, arg in enumerate(node.target._schema.arguments):
        if i < len(node.args):
            values[arg.name] = node.args[i]
        elif arg.name not in values and arg.has_default_value():
            values[arg.name] = arg.default_value
    for key in ("train", "training"):
        if values.get(key) is False:
            return True
    return any(key in values and values[key] == 0 for key in ("p", "dropout", "dropout_p"))


def _check_random(graph: torch.fx.Graph, label: str) -> None:
    """Refuse a graph that draws random numbers (an ATen op tagged ``nondeterministic_seeded``: ``torch.rand``,
    ``randn_like``, ``bernoulli``, ``normal``, dropout in training mode, ...), naming the op and its submodule.

    Why: no path can reproduce eager's draw (the module consumes the user's generator state), and the UE
    and the server draw from different generators, so a split would not even equal the local run or
    another split; noise small enough to pass the comparison with eager (``x + 1e-6 * randn_like(x)``) was
    captured and then answered differently on every path and every call. An op that draws nothing here
    (``_draws_nothing``: dropout in eval, an LSTM's dropout off, SDPA at ``dropout_p`` 0) is kept. Raises
    CaptureError."""
    for node in graph.nodes:
        if node.op != "call_function" or not isinstance(node.target, torch._ops.OpOverload):
            continue
        if torch.Tag.nondeterministic_seeded not in node.target.tags:
            continue
        if _draws_nothing(node):
            continue
        name = op_name(node.target)
        where = _where(node, label)
        raise CaptureError(
            f"{where} draws random numbers ({name}) in forward: no split or local run can give eager's draw, "
            "nor the same answer twice; pass the noise as an input, or drop it at inference (dropout: .eval())"
        )


def _nested_encoders(module: torch.nn.Module) -> dict[torch.nn.Module, str]:
    """The ``nn.TransformerEncoder`` submodules that take PyTorch's nested-tensor fast path when called with
    a ``src_key_padding_mask`` in eval without grad (``use_nested_tensor``), by their path."""
    if not torch.backends.mha.get_fastpath_enabled():
        return {}
    return {m: path for path, m in module.named_modules()
            if isinstance(m, torch.nn.TransformerEncoder) and getattr(m, "use_nested_tensor", False)}


@contextlib.contextmanager
def _padded_encoder_calls(module: torch.nn.Module, label: str) -> Iterator[None]:
    """Refuse, after the block, a call that passed a ``src_key_padding_mask`` to an ``nn.TransformerEncoder``
    built with ``enable_nested_tensor=True`` (its default).

    Why: in eval under ``no_grad`` / ``inference_mode`` PyTorch runs such a call on nested tensors and returns
    0 at the padded positions; the traced graph computes them (as the same call with grad enabled does), so a
    request whose mask pads answered up to 1.8 off ``model(x, mask)`` on every path (session 15; captured
    whenever the example's mask padded nothing, else refused as "nondeterministic"). With
    ``enable_nested_tensor=False`` eager computes every position and equals the graph. The hooks (forward
    pre-hooks with kwargs) are removed before the block ends. Raises CaptureError."""
    encoders = _nested_encoders(module)
    if not encoders:
        yield
        return
    seen: list[str] = []

    def hook(m: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        mask = kwargs.get("src_key_padding_mask", args[2] if len(args) > 2 else None)
        if mask is not None and m.use_nested_tensor:
            seen.append(encoders[m])

    handles = [m.register_forward_pre_hook(hook, with_kwargs=True) for m in encoders]
    try:
        yield
    finally:
        for h in handles:
            h.remove()
    if seen:
        where = f"{label}.{seen[0]}" if seen[0] else label
        raise CaptureError(
            f"{where} (TransformerEncoder) is called with src_key_padding_mask and its nested-tensor fast path: in "
            "eval without grad PyTorch returns 0 at padded positions, which coinfer's graph does not reproduce (it "
            "computes those positions); build it with "
            "enable_nested_tensor=False (equal at every position), or pass no mask"
        )


def _dense(t: torch.Tensor) -> bool:
    """``t`` covers its storage span without gaps or overlaps (any order of strides): ``empty_like`` keeps them."""
    return t.layout is torch.strided and tuple(torch.empty_like(t, device="meta").stride()) == tuple(t.stride())


def _packed_sequence_in(e: BaseException) -> bool:
    """Whether a frame the failure went through held a ``PackedSequence`` (torch.export fails on one with a
    TypeError about a FakeTensor deep inside ``nn.GRU.forward``, which names neither the cause nor the fix)."""
    from torch.nn.utils.rnn import PackedSequence

    tb = e.__traceback__
    while tb is not None:
        if any(isinstance(v, PackedSequence) for v in tb.tb_frame.f_locals.values()):
            return True
        tb = tb.tb_next
    return False


_TORCH_CONSTANTS = frozenset({"torch.dtype", "torch.device", "torch.layout", "torch.memory_format"})
"""torch's own constant types, as torch.export names them when a forward returns one (it cannot)."""


def _refusal(e: Exception, label: str, module: torch.nn.Module) -> CaptureError:
    """One line naming why torch.export failed and what to try."""
    text = str(e).strip()
    first = text.splitlines()[0][:240] if text else type(e).__name__
    low = text.lower()
    if _packed_sequence_in(e):
        return CaptureError(
            f"{label} runs an RNN on a PackedSequence (nn.utils.rnn.pack_padded_sequence): its batch size per time "
            "step comes from the lengths' values, which a captured graph cannot depend on; run a unidirectional RNN "
            "on the padded batch and take each sequence's state at lengths - 1 with torch.gather (equal to the "
            "packed run's), or mask the padded steps"
        )
    if "guardondatadependent" in type(e).__name__.lower() or "data-dependent" in low or "data dependent" in low:
        return CaptureError(data_branch_refusal(e, module, label))  # the line, and the weight it reads if one
    if "in output" in low and "not a known type" in low:
        found = re.search(r"Found <class '([^']+)'>", text)
        if found and found.group(1) in _TORCH_CONSTANTS:  # session 22: "a dataclass or class" misled here
            return CaptureError(
                f"{label} returns a {found.group(1)}, a constant torch.export refuses in an output (a graph returns "
                "tensors, None, numbers, strings and torch.Size); read it from the output tensor outside the model "
                "(y.dtype, y.device)")
        what = f"a {found.group(1)} (a dataclass or class torch's pytrees do not know)" if found else f"({first[:120]})"
        return CaptureError(
            f"{label} returns an unsupported value {what}; return tensors, or "
            "dicts/lists/tuples/namedtuples of tensors, None and plain constants, or register the class with "
            "torch.utils._pytree.register_dataclass / register_pytree_node (it then comes back as that class)"
        )
    if "not a known type" in low or "unsupported input" in low:
        return CaptureError(
            f"{label} takes an unsupported input ({first[:120]}); pass tensors, or "
            "dicts/lists/tuples of tensors, None and plain constants"
        )
    return CaptureError(
        f"torch.export could not capture {label}: {type(e).__name__}: {first}; see "
        "https://pytorch.org/docs/stable/export.html for what it supports (--verbose shows torch's log)"
    )


def _check_python_state(before: PythonState, graph: ModelGraph, label: str,
                        reads: ForwardReads | None = None) -> ForwardReads | None:
    """Refuse a forward that changed Python state of its module (``modelgraph.pystate``: plain scalars,
    containers of them, and plain tensor attributes the graph reads; before the export vs after the eager
    check): the graph is specialised on the value it had while traced, so later calls of the module (whose
    value moved on) would silently differ from every path's answer. A number attribute the forward's code only adds
    to in place (``self.calls += 1`` and no other use of ``calls``: ``pystate.accumulated``; a log-only counter,
    refused before session 22) is no value the graph depends on: returned as ``reads`` with it among the scratch
    attributes (``ForwardReads.scratch``: not watched after capture either). Raises CaptureError."""
    ptrs = weight_reads(graph)
    while True:
        hit = before.changed(ptrs, new_attrs=True)
        if hit is None:
            return reads
        path, attr, change = hit
        if reads is not None and before.accumulates(path, attr, reads):
            reads = replace(reads, scratch={**reads.scratch, path: reads.scratch.get(path, frozenset()) | {attr}})
            before.forget_scratch(reads)
            continue
        where = f"{label}.{path}" if path else label
        raise CaptureError(
            f"{label}'s forward changes the Python attribute {where}.{attr} ({change}): the graph is "
            "specialised on its value at capture, so later calls would differ from the module; keep per-call "
            "state out of forward (pass it as an input)"
        )


def _run_once_more(module: torch.nn.Module, args: tuple, kwargs: dict, label: str, grad: bool, why: str,
                   drawn: Drawn | None = None) -> Any:
    """The eager forward once more on the example inputs (without grad unless ``grad``; ``drawn``: record its draws,
    ``traced_reads``), for one of capture's checks: ``why`` ends the message should it raise. Raises CaptureError
    naming the exception (it ran on these inputs already: named rather than hidden); ModelGraphError as it is."""
    try:
        with (contextlib.nullcontext() if grad else torch.no_grad()), _padded_encoder_calls(module, label), \
                (contextlib.nullcontext() if drawn is None else traced_reads(module, drawn)):
            return module(*args, **kwargs)
    except ModelGraphError:
        raise
    except Exception as e:
        raise CaptureError(f"{label} raised {type(e).__name__} when run once more {why}: {str(e).strip()[:200]}") from e


def _forward_writes(module: torch.nn.Module, args: tuple, kwargs: dict, reads: ForwardReads,
                    label: str, graph: ModelGraph,
                    consumed: Mapping[int, tuple[Any, str]] | None = None) -> ForwardReads:
    """``reads`` with ``written``: the places past the module's attributes that the forward only adds to on every
    call (a hook that appends each output's shape to a list: a per-call record, not state the graph is specialised
    on), found by running the eager forward once more and comparing (``pystate._Reached.moves``). Costs one eager
    forward and one run of ``graph`` at capture, only for a forward that ran user code outside its modules or
    loaded globals and reached data there that it may move (``pystate._Reached.holds_data``; since session 22 not a
    function's ``__defaults__`` of None nor a name no code stores to: torchvision's models skip it). ``consumed``
    (``DrawWatch.consumed``, from the check's forward): the lists and counts whose length or next value the code used
    as a value; such a place is no scratch (session 22: ``len(self.h.log) % 5``, ``next(self.calls) % 5``).

    Raises CaptureError (review21, session 21: each was filed as scratch, or not seen, and then 4 of 20 calls of a
    period-5 counter differed from eager, 16 of 20 for a rotated deque) when that forward
    - resumes a generator kept past the call (``next(self.gen)``: its position moves on every call);
    - changes any other place it reaches: a number or an object rebound (a helper object's ``self.h.n += 1``, a
      ``nonlocal`` counter, ``type(self).n += 1``, a global), a dict item changed, an item of a list, a deque,
      an array, a bytearray or a memoryview changed, a C iterator advanced (``itertools.cycle``), the counters of
      an ``lru_cache`` whose ``cache_info()`` the code calls; the module-attribute wording of
      ``_check_python_state``; not a place of a package torch requires (sympy's ``Dummy._count``) nor an
      ``itertools.count`` (fresh names: ``f"s{next(ids)}"``), which stay scratch (``pystate._Reached.moves``);
    - answers other than ``graph`` on the same inputs (state the checks above cannot see whose period is at most
      3: the export's call, the check's and this one)."""
    from modelgraph.execute import run_graph  # local: execute imports the graph layer this module builds on

    state = PythonState(module, reads)
    reached = state.reached
    if reached is None or not reached.holds_data():
        return reads
    if reached.advanced:
        raise CaptureError(
            f"{label}'s forward advances the generator {reached.advanced[0]}: the graph is specialised on what it "
            "yielded at capture, so later calls would differ from the module; keep per-call state out of forward "
            "(pass it as an input)")
    again = _run_once_more(module, args, kwargs, label, reads_grad_mode(reads), "to see what state its forward changes")
    moves = reached.moves(consumed)
    for _, what, change, scratch in moves:
        if not scratch:
            raise CaptureError(
                f"{label}'s forward changes {what} ({change}): the graph is specialised on its value at capture, so "
                "later calls would differ from the module; keep per-call state out of forward (pass it as an input)")
    differs = _output_difference(again, run_graph(graph, args, kwargs=kwargs))
    if differs is not None:
        raise CaptureError(
            f"{label}: called again on the same inputs the eager module answers otherwise than the captured graph "
            f"({differs}); its forward depends on Python state it changes on every call; keep per-call state out of "
            "forward (pass it as an input)")
    written = {key for key, _, _, scratch in moves if scratch}
    return replace(reads, written=frozenset(written)) if written else reads


def _output_difference(eager: Any, captured: Any) -> str | None:
    """Where ``captured`` (the graph's outputs) differs from ``eager`` beyond ``TOLERANCES`` (structure, a constant,
    a shape, a dtype or values), or None."""
    e_leaves, e_spec = pytree.tree_flatten(eager)
    g_leaves, g_spec = pytree.tree_flatten(captured)
    if e_spec != g_spec:
        return "another output structure"
    for where, e, g in zip(_leaf_paths(eager, len(e_leaves)), e_leaves, g_leaves):
        if isinstance(e, torch.Tensor) and e.requires_grad:
            e = e.detach()
        if not isinstance(e, torch.Tensor):
            try:
                same = not isinstance(g, torch.Tensor) and bool(e is g or e == g)
            except Exception:
                same = False
            if not same:
                return f"output {where}: {e!r:.40} vs {g!r:.40}"
        elif not isinstance(g, torch.Tensor) or e.shape != g.shape or e.dtype != g.dtype:
            return f"output {where}: another shape or dtype"
        elif not tensor_within_tolerance(g, e):
            return f"output {where} by up to {tensor_max_diff(g, e):.3g}"
    return None


def _leaf_paths(tree: Any, n: int) -> list[str]:
    """Names of a pytree's leaves for messages (``['logits']``, ``[0][1]``); ``leaf K`` for each where a node type
    was registered without a ``flatten_with_keys_fn`` (``torch.utils._pytree.register_pytree_node(cls, flatten,
    unflatten)``, as users register a ModelOutput-like class): ``tree_flatten_with_path`` raises ValueError there,
    which ended the capture of a model torch.export had captured (session 16, newuser16)."""
    try:
        return [pytree.keystr(p) or "<output>" for p, _ in pytree.tree_flatten_with_path(tree)[0]]
    except ValueError:
        return [f"leaf {k}" for k in range(n)]


GRAD_MODE_NAMES = frozenset({"is_grad_enabled", "is_inference_mode_enabled", "requires_grad", "is_inference"})
"""Names whose presence in the user code a forward ran (``ForwardReads.names``) means it may read the autograd
mode: the graph is specialised on the mode it was traced in (``ModelGraph.grad_mode``)."""


def reads_grad_mode(reads: ForwardReads | None) -> bool:
    """Whether the user code of a forward (``ForwardReads.names``) reads the autograd mode or an input's
    ``requires_grad`` / ``is_inference()`` (``GRAD_MODE_NAMES``)."""
    return reads is not None and not reads.names.isdisjoint(GRAD_MODE_NAMES)


def grad_mode(args: Any, kwargs: Any, per_input: bool) -> tuple:
    """The autograd mode a call runs in: ``(torch.is_grad_enabled(), torch.is_inference_mode_enabled(), flags)``,
    ``flags`` each input tensor's ``(requires_grad, is_inference())`` in pytree order when ``per_input`` (else
    ``()``). What ``ModelGraph.grad_mode`` records and ``ue_client.CoinferClient`` compares per call."""
    flags = tuple((t.requires_grad, t.is_inference()) for t in pytree.tree_leaves((args, kwargs))
                  if isinstance(t, torch.Tensor)) if per_input else ()
    return torch.is_grad_enabled(), torch.is_inference_mode_enabled(), flags


TRACER_CHECKS = {"is_compiling": "torch.compiler.is_compiling()", "is_exporting": "torch.compiler.is_exporting()",
                 "is_dynamo_compiling": "torch._dynamo.is_compiling()",
                 "is_torchdynamo_compiling": "is_torchdynamo_compiling()",
                 "is_fx_tracing": "torch.fx._symbolic_trace.is_fx_tracing()", "FakeTensor": "a FakeTensor check"}
"""Names in a forward's own code that ask whether torch is tracing it (``torch.export`` answers yes; eager no)."""


def _sources(module: torch.nn.Module, reads: ForwardReads, label: str,
             watch: DrawWatch | None) -> list[tuple[str, Any]]:
    """``draw_sources`` of ``module`` and the code its forward ran, walked once per capture (kept on ``watch``)."""
    if watch is not None and watch.sources is not None and watch.sources[0] is reads:
        return watch.sources[1]
    found = draw_sources([*module.named_modules(remove_duplicate=False), *reads.outside], reads, label)
    if watch is not None:
        watch.sources = (reads, found)
    return found


def _draw_names(module: torch.nn.Module, reads: ForwardReads | None, label: str,
                watch: DrawWatch | None = None) -> dict[int, str]:
    """{id: where} of the generators ``draw_sources`` reaches from ``module`` and the code its forward ran (for the
    refusal's message); {} when the forward was not traced."""
    if reads is None:
        return {}
    return {id(r): where for where, r in _sources(module, reads, label, watch)}


def _python_draws(module: torch.nn.Module, args: tuple, kwargs: dict, reads: ForwardReads | None, label: str,
                  grad: bool = False, watch: DrawWatch | None = None) -> str | None:
    """The refusal for a forward that draws Python or NumPy random numbers, or None.

    At run time, not from the code's names. First ``watch.refusal`` (``DrawWatch.judge`` around the check's eager
    forward: the states of every live generator in the process, ``pystate.live_rngs``, found by type, so a
    generator the forward reaches along any path is among them, whether or not the forward was traced: a compiled
    module, a capture under ``cProfile``). Then the generators ``pystate.draw_sources`` reaches from the model that
    ``watch`` does not hold (frozen by ``gc.freeze()``, a bare ``_random.Random``, one made during the export): only
    where such exists, the eager forward runs once more (without grad unless ``grad``) and a generator whose state
    that call moved is named. Every later ``model(x)`` draws anew while the graph keeps the traced draw (session 18:
    8-11 of 30 calls differed from eager). A draw in a branch the call does not take (``if self.training:``), a
    generator made and seeded in the call (``random.Random(0)``) or seeded again in every call leaves the states as
    they were and is captured. Another thread drawing from the same generator: ``DrawWatch``. A generator made from
    OS entropy in the call, ``random.SystemRandom``: ``_varies``. Not seen: one whose state cannot be read. Raises
    CaptureError
    when the extra forward raises."""
    if watch is not None and watch.refusal is not None:
        return watch.refusal
    if reads is None:
        return None
    sources = [(w, r) for w, r in _sources(module, reads, label, watch) if watch is None or not watch.holds(r)]
    if not sources:
        return None
    before = [state_or_none(r) for _, r in sources]
    _run_once_more(module, args, kwargs, label, grad, "to see whether it draws random numbers")
    moved = [where for (where, r), s in zip(sources, before) if s is not None and state_or_none(r) != s]
    if not moved:
        return None
    return (f"{label} draws random numbers in Python ({'; '.join(moved[:3])}) in forward: the graph keeps the "
            "value drawn while torch.export traced it, eager draws anew on every call (the generator's state moved "
            "in one call of the forward); pass the draw as an input (or drop it at inference)")


def _tracer_check(reads: ForwardReads | None, label: str) -> str | None:
    """The refusal for a captured graph that differs from eager when the forward's code asks whether it is being
    traced (``TRACER_CHECKS``): it took another branch under ``torch.export`` than in eager, so the message names
    that instead of "may depend on Python state" (session 18). None when it asks nothing of the kind."""
    hit = sorted(TRACER_CHECKS[n] for n in (reads.names if reads is not None else ()) if n in TRACER_CHECKS)
    if not hit:
        return None
    return (f"{label}: the captured graph differs from the eager module, and the forward asks whether it is traced "
            f"({', '.join(hit)}: true while torch.export captures it, false in eager): the graph holds the traced "
            "branch, eager the other; give both branches the same result, or drop the check from forward")


def _check_against_eager(graph: ModelGraph, module: torch.nn.Module, args: tuple, kwargs: dict,
                         label: str, grad: bool = False, watch: DrawWatch | None = None,
                         sized: list | None = None, layouts: list | None = None) -> tuple[float, ForwardReads | None]:
    """Run the captured graph and the eager module on the example inputs; refuse a disagreement.

    The eager module runs without grad unless ``grad`` (then in the caller's mode, as ``torch.export`` traced it:
    for a forward that reads the mode). Returns the max |graph - eager| over float output tensors (0.0 when all
    outputs are exact) and what the eager forward looked up on its submodules (``modelgraph.pystate.traced_reads``;
    None if not traced). ``sized``: eager's output spec is appended to it where it differs from the graph's only
    in a ``torch.Size`` node (``pytree_io.sizes_as_tuples``; the caller keeps it), else that is refused too. With
    ``watch``, the live generators' states are taken around the eager forward and judged
    after the graph's run (``DrawWatch.judge``: the run is part of the control interval): ``watch.refusal``.
    ``layouts``: eager's output layout where the graph's differs or outputs share storage
    (``modelgraph.out_layout.eager_layout``: an ``OutputLayout`` or None) is appended to it once the check passed."""
    from modelgraph.execute import run_graph  # local: execute imports the graph layer this module builds on

    if watch is not None:
        watch.refresh()  # a generator the export's run made (``functools.lru_cache``d on first use) is judged too
    before = watch.states() if watch is not None else None
    drawn = Drawn()
    start = time.perf_counter()
    try:
        with (contextlib.nullcontext() if grad else torch.no_grad()), _padded_encoder_calls(module, label), \
                traced_reads(module, drawn) as box:
            eager = module(*args, **kwargs)
        if grad:
            eager = pytree.tree_map(lambda t: t.detach() if isinstance(t, torch.Tensor) else t, eager)
    except ModelGraphError:
        raise
    except Exception as e:  # the user's forward on these inputs (an index past an embedding, a shape it refuses)
        first = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
        raise CaptureError(f"{label} raised {type(e).__name__} on the example inputs in eager mode: {first}; the "
                           "inputs do not fit the model (torch.export, on shapes alone, had not seen it)") from e
    ended = time.perf_counter()
    after = watch.states() if watch is not None else None
    if watch is not None:
        watch.consumed.update(drawn.consumed)
    reads = box[0] if box else None
    try:
        captured = run_graph(graph, args, kwargs=kwargs)
    except ModelGraphError as e:
        raise CaptureError(f"{label}: the captured graph does not run on its own example inputs: {e}") from e
    if watch is not None:
        watch.reached = lambda: _draw_names(module, reads, label, watch)  # {id: where}: its keys
        watch.judge(before, after, ended - start, ended, drawn, lambda: _draw_names(module, reads, label, watch),
                    label)
        if watch.refusal is None:
            watch.refusal = _varies(module, args, kwargs, label, grad, drawn, eager, watch, reads)
        if watch.refusal is None and reads is not None:  # a generator the watch cannot hold (a bare _random.Random)
            unheld = _python_draws(module, args, kwargs, reads, label, grad, watch)
            if unheld is not None:
                raise CaptureError(unheld)
    e_leaves, e_spec = pytree.tree_flatten(eager)
    g_leaves, g_spec = pytree.tree_flatten(captured)

    def why(otherwise: str) -> str:  # on a disagreement only: the draw check costs one eager forward
        clocks = [text for text in drawn.suspect if text.startswith("a clock read")]  # a clock capture cannot fake
        return _python_draws(module, args, kwargs, reads, label, grad, watch) or _tracer_check(reads, label) \
            or (f"{otherwise}; it reads the clock in forward ({'; '.join(clocks[:2])})" if clocks else otherwise)

    if e_spec != g_spec and sizes_as_tuples(e_spec) == g_spec and sized is not None:
        sized.append(e_spec)  # ``return y, y.shape``: export records a tuple; eager's torch.Size kept (session 22)
    elif e_spec != g_spec:
        raise CaptureError(why(f"{label}: the captured graph returns {spec_line(g_spec)} but the eager module "
                               f"{spec_line(e_spec)}"[:400]))
    worst = 0.0
    paths = _leaf_paths(eager, len(e_leaves))
    for where, e, g in zip(paths, e_leaves, g_leaves):
        if not isinstance(e, torch.Tensor):
            if not isinstance(g, torch.Tensor) and (e is g or e == g):
                continue
            raise CaptureError(why(
                f"{label}: output {where} is {e!r} in eager mode but {g!r} in the captured graph; "
                "the forward depends on Python state torch.export does not see"[:400]
            ))
        if not isinstance(g, torch.Tensor) or e.shape != g.shape or e.dtype != g.dtype:
            raise CaptureError(why(
                f"{label}: output {where} differs in shape or dtype between eager mode and the captured graph"
            ))
        if not (e.is_floating_point() or e.is_complex()):
            if not torch.equal(e, g):
                raise CaptureError(why(
                    f"{label}: integer output {where} differs between eager mode and the captured "
                    "graph; the forward may be nondeterministic (random ops?) or depend on Python state"
                ))
            continue
        d = tensor_max_diff(g, e)
        worst = max(worst, d)
        if not tensor_within_tolerance(g, e):
            rtol, atol = TOLERANCES.get(e.dtype, (0.0, 0.0))
            raise CaptureError(why(
                f"{label}: the captured graph differs from the eager module at output {where} by "
                f"up to {d:.3g} on the example inputs (tolerance {atol:g} + {rtol:g}*|x|); the forward "
                "may be nondeterministic (random ops, dropout in training mode) or depend on Python state"
            ))
    if worst:
        log.debug("%s: captured graph vs eager module on the example inputs: max |diff| %.3g", label, worst)
    if layouts is not None and graph.io is not None:
        own = _own_weights(graph, module)
        layout = eager_layout(e_leaves, g_leaves, pytree.tree_leaves((args, kwargs)), graph.io.in_leaves, label, own)
        if layout is not None and layout.strides and not grad:  # (rare) eager's layout may depend on the grad mode
            layout = _with_grad_layout(layout, module, args, kwargs, g_leaves, graph.io.in_leaves, label, own)
        layouts.append(layout)
    return worst, reads


def _own_weights(graph: ModelGraph, module: torch.nn.Module) -> list[torch.Tensor]:
    """The tensors an output of ``module`` may be a view of (``out_layout.eager_layout``'s ``weights``): its
    parameters and buffers (the objects themselves: eager's view of one is made of it), then the graph's weights
    (a tensor attribute's detached alias, sharing its memory and version counter), then the tensors the forward
    returns as they are (the module's own objects: no view to make of them)."""
    own: list[torch.Tensor] = []
    if isinstance(module, torch.nn.Module):
        own += [t for _, t in module.named_parameters()]
        own += [t for _, t in module.named_buffers() if isinstance(t, torch.Tensor)]
    own += [graph.weight_sources.get(k, v) for k, v in graph.weight_values.items()]
    if graph.io is not None:
        own += [leaf["c"] for leaf in graph.io.out_leaves if isinstance(leaf.get("c"), torch.Tensor)]
    return own


def _with_grad_layout(layout: OutputLayout, module: torch.nn.Module, args: tuple, kwargs: dict, g_leaves: list,
                      in_leaves: tuple, label: str, own: list | tuple = ()) -> OutputLayout:
    """``layout`` (eager's without grad, where some output's strides differ from the graph's) with ``grad``: eager's
    layout with grad enabled, from one more eager forward on the example inputs detached (``nn.MultiheadAttention``'s
    fused path runs unless grad is enabled and an input or projection weight requires grad; there eager answers
    the traced math path's strides), for the parameters' ``requires_grad`` flags at capture; and ``grad_inputs``:
    from one more with the floating inputs requiring grad (break41 F3: a frozen MHA called on an input that requires
    grad answered the fused path's strides where eager leaves it). Left as it is when the first forward raises or
    answers another structure (``grad_inputs`` left None, ``grad``'s, when the second does)."""
    def detached(t):
        return t.detach() if isinstance(t, torch.Tensor) else t

    def requiring(t):
        if isinstance(t, torch.Tensor) and (t.is_floating_point() or t.is_complex()):
            return t.detach().requires_grad_(True)
        return detached(t)

    def eager_with_grad(wrap, why: str) -> OutputLayout | None:
        try:
            a, kw = pytree.tree_map(wrap, (args, kwargs))  # an inference tensor refuses requires_grad_
            with torch.enable_grad():
                again = _run_once_more(module, a, kw, label, True, why)
        except (ModelGraphError, RuntimeError) as e:
            log.debug("%s: no output layout %s: %s", label, why, e)
            return None
        leaves = pytree.tree_leaves(pytree.tree_map(detached, again))
        if len(leaves) != len(g_leaves) or any(
                isinstance(e, torch.Tensor) != isinstance(g, torch.Tensor)
                or (isinstance(e, torch.Tensor) and (e.shape, e.dtype) != (g.shape, g.dtype))
                for e, g in zip(leaves, g_leaves)):
            return None
        return eager_layout(leaves, g_leaves, pytree.tree_leaves((args, kwargs)), in_leaves, label, own) \
            or OutputLayout()

    with_grad = eager_with_grad(detached, "with grad (its output layout)")
    if with_grad is None:
        return layout
    floating = any(isinstance(t, torch.Tensor) and (t.is_floating_point() or t.is_complex())
                   for t in pytree.tree_leaves((args, kwargs)))
    # an input requiring grad only turns eager's fused paths off, never on: where eager with grad already answers the
    # graph's layout (a trainable MHA: nothing to record), it would answer it again; and a layout equal to ``grad``'s
    # is not kept (the per-call choice between them is then skipped, ``inputs_require_grad``)
    inputs_grad = eager_with_grad(requiring, "with grad, its inputs requiring grad (its output layout)") \
        if floating and with_grad != OutputLayout() else None
    return replace(layout, grad=with_grad, grad_inputs=None if inputs_grad == with_grad else inputs_grad)


def _varies(module: torch.nn.Module, args: tuple, kwargs: dict, label: str, grad: bool, drawn: Drawn, eager: Any,
            watch: DrawWatch, reads: ForwardReads | None = None) -> str | None:
    """The refusal for a forward whose answer is not decided by its inputs and state, or None: its user code read
    OS entropy in the check's forward (``pystate.entropy_refusal``: a generator made with no seed,
    ``np.random.default_rng()``, ``os.urandom``, ``uuid4``; session 20's fresh tester: a 50/50 branch on one was
    captured 3 of 6 times, then 8-9 of 15 calls differed from eager). Else, where that forward gave a seed to a
    generator, held one made in the call in a local, or read the clock (``Drawn.seeds``, ``Drawn.suspect``), the
    eager forward runs once more on the same inputs: seeds or generator states that differ
    (``random.Random(time.time_ns())``) or outputs that differ refuse. Seeds that are constants or come from the
    inputs and the module's state are the same both times: captured (``random.Random(0)`` made in forward; a seed
    from a tensor's value cannot be traced by torch.export, which refuses it first).

    Not seen: a generator made in forward by a C extension from its own entropy (not through ``os.urandom``), on
    another thread, or under a C profiler (``cProfile``: no profile function). Where the forward read the clock
    (``time``'s clocks, ``os.times()``, ``datetime.now()`` / ``utcnow()`` / ``today()``, ``date.today()``), it runs
    ``pystate.CLOCK_RUNS`` times on faked clocks (``pystate.fake_clocks``), from ``pystate.clock_bases()`` (each read
    moving on by 1 us in all): a branch on a residue mod 2 to 5 of the clock's count at any unit from 1 ns to a day
    (``if time.time_ns() % 5 == 4``, the second's parity), on the hour of the day or on the weekday takes both sides
    and the outputs differ (session 21: caught about half the time; session 24: parities only, and ``datetime``,
    ``os.times`` not faked). The runs stop at the first that differs. Seen only when the outputs then differ: a
    branch on another function of the clock (a residue mod 7), a legacy ``RandomState(seed)`` used as a temporary
    with a seed that changes (its seeding sends no event; kept in a local, its state is compared); a clock C code
    reads for itself (NumPy's ``datetime64('now')``): seen only by chance, as before."""
    why = entropy_refusal(drawn, label)
    fresh = watch.fresh(drawn)
    if why is not None or not (fresh or drawn.suspect):
        return why
    second = Drawn()
    why_run = "on the same inputs (it seeds a generator or reads the clock in forward)"
    places = reads.globals if reads is not None else ()
    clocked = any(text.startswith("a clock read") for text in drawn.suspect)
    clock = f"; {'; '.join(drawn.suspect[:2])}" if drawn.suspect else ""
    when = "at other clock readings" if clocked else "when called again"
    differs = (f"{label}'s forward answers differently on the same inputs {when}, so its answer changes "
               f"between calls{clock or ' (it seeds a generator in forward)'}: the graph keeps the answer traced by "
               "torch.export; make forward depend on its inputs and state only (pass the time or the draw as an "
               "input)")
    last = None
    if clocked:  # from CLOCK_RUNS bases: a branch on a residue of the clock, the hour or the weekday takes both sides
        *bases, last = clock_bases()
        with fake_clocks(bases[0], places):
            eager = _run_once_more(module, args, kwargs, label, grad, why_run)
        for base in bases[1:]:
            with fake_clocks(base, places):
                other = _run_once_more(module, args, kwargs, label, grad, why_run)
            if _output_difference(eager, pytree.tree_map(lambda t: t.detach() if isinstance(t, torch.Tensor) else t,
                                                         other)) is not None:
                return differs
    with fake_clocks(last, places) if clocked else contextlib.nullcontext():
        again = _run_once_more(module, args, kwargs, label, grad, why_run, second)
    why = entropy_refusal(second, label)
    if why is not None:
        return why
    seeds = watch.fresh(second)
    if seeds != fresh:
        at = next((a[0] for a, b in zip(fresh, seeds) if a != b), (fresh or seeds)[0][0])
        return (f"{label} seeds a random generator in forward from a value that changes between calls ({at}{clock}): "
                "two eager calls on the same inputs drew differently, the graph keeps what was drawn while "
                "torch.export traced it; seed it with a constant or pass the draw as an input")
    if _output_difference(eager, pytree.tree_map(lambda t: t.detach() if isinstance(t, torch.Tensor) else t,
                                                 again)) is None:
        return None
    return differs


def _checked(graph: ModelGraph, module: torch.nn.Module, args: tuple, kwargs: dict,
             label: str, watch: DrawWatch | None = None,
             sized: list | None = None, layouts: list | None = None) -> tuple[float, ForwardReads | None]:
    """``_check_against_eager`` in the mode the graph was traced in: without grad, as always, and once more with
    grad when the caller's mode has it and the forward reads the mode (``reads_grad_mode``). torch.export traces
    in the caller's mode: a forward with ``if torch.is_grad_enabled():`` was traced on that branch and checked on
    the other, and refused as "differs from the eager module" (session 18); captured under ``no_grad`` and called
    with grad, it answered the no-grad branch."""
    if not (torch.is_grad_enabled() or any(t.requires_grad for t in pytree.tree_leaves((args, kwargs))
                                           if isinstance(t, torch.Tensor))):
        return _check_against_eager(graph, module, args, kwargs, label, watch=watch, sized=sized,
                                    layouts=layouts)
    try:
        worst, reads = _check_against_eager(graph, module, args, kwargs, label, watch=watch, sized=sized,
                                            layouts=layouts)
    except CaptureError as refused:
        try:
            worst, reads = _check_against_eager(graph, module, args, kwargs, label, grad=True, watch=watch,
                                                sized=sized, layouts=layouts)
        except CaptureError:
            raise refused from None
        if not reads_grad_mode(reads):
            raise
        return worst, reads
    if reads_grad_mode(reads):
        worst, reads = _check_against_eager(graph, module, args, kwargs, label, grad=True, watch=watch, sized=sized,
                                            layouts=layouts)
    return worst, reads


def capture(
    module: torch.nn.Module,
    example_inputs: Any,
    *,
    kwargs: Mapping[str, Any] | None = None,
    name: str = "",
    check: bool = True,
    verbose: bool | None = None,
) -> ModelGraph:
    """Export ``module`` (in eval mode) and turn the functional ATen graph into a ModelGraph.

    A module in training mode is switched to eval mode in place (``module.eval()``, logged as a WARNING):
    the user's own ``module(*inputs)`` afterwards gives what the graph gives (dropout off, batch-norm on
    its running statistics), not what it gave in training mode.

    ``example_inputs`` are the positional arguments of ``forward`` (a tuple; a lone tensor is one
    argument), ``kwargs`` its keyword arguments: any pytree of tensors (dicts, lists, tuples), ``None``
    and non-tensor constants (the graph is specialised on those). The graph records both trees
    (``graph.io``, see modelgraph.pytree_io): ``graph.bind(args, kwargs)`` flattens run-time inputs,
    ``graph.rebuild(values)`` gives back the model's own output structure.

    Parameters, buffers and constants become named weights (a tied weight is one entry); in-place
    ops are functionalised by ``run_decompositions({})`` so no op mutates a tensor that crosses a cut.
    Example inputs that share storage (the same tensor twice, overlapping views, a parameter) are
    cloned for the export so each gets its own placeholder (torch.export would otherwise merge them).

    With ``check`` (default) the captured graph is run on the example inputs and compared with the
    eager module: the structure must match, integer/bool outputs exactly, float outputs within
    ``|graph - eager| <= atol + rtol * |eager|`` (``modelgraph.compare.TOLERANCES``: float32/64 1e-4 +
    1e-4, half types 1e-2 + 1e-2).
    A larger difference is a refusal (CaptureError), never a warning; the max |diff| is kept in
    ``graph.eager_max_diff``.

    Raises CaptureError with one line naming the cause and what to try: data-dependent control flow
    (``torch.where``; ``torch.cond``, ``torch.while_loop`` and other higher-order ops are refused naming the
    submodule that uses them), data-dependent output shapes (``nonzero``, boolean masks),
    ``.item()``, mutation of inputs or buffers, output leaves that are not tensors or plain constants.
    torch's own log output is suppressed unless ``verbose`` (default: this module's logger at DEBUG).

    Thread-safe: the whole capture holds ``TORCH_TRACE_LOCK``. ``torch.export`` swaps the module's
    parameters for fake tensors while it traces, so another thread's capture of the same module (two
    clients built from one module, or a client's new batch size) reading them (the example inputs'
    alias check, the weights, the check against the eager module) failed or broke that export.
    """
    with TORCH_TRACE_LOCK:
        return _capture(module, example_inputs, kwargs, name, check, verbose)


def _refuse_torchscript(module: torch.nn.Module, label: str) -> None:
    """A TorchScript module (``torch.jit.script`` / ``torch.jit.trace``), the whole model or a submodule, is refused
    naming it: ``torch.export`` traces Python code and a ScriptModule runs TorchScript (before: a TypeError about
    'OrderedModuleDict' from the module walk; session 16, newuser16). Raises CaptureError."""
    try:
        named = list(module.named_modules())
    except Exception:  # a ScriptModule without the walk: the root alone
        named = [("", module)]
    for path, sub in named:
        if isinstance(sub, torch.jit.ScriptModule):
            where = label if not path else f"{label}.{path}"
            raise CaptureError(
                f"{where} is a TorchScript module ({type(sub).__name__}, made by torch.jit.script or "
                "torch.jit.trace): torch.export captures Python modules, not TorchScript; pass the nn.Module it "
                "was made from (the one given to torch.jit.script / trace)")


_FLOAT_FUNCTIONAL = (torch.ao.nn.quantized.FloatFunctional, torch.ao.nn.quantized.FXFloatFunctional)
"""The float modules under ``torch.ao.nn.quantized``: a skip add or concat (``self.skip_add.add(x, y)``) in a float
model written for later quantization; ``add`` is ``torch.add`` then an identity (an observer only after
``torch.ao.quantization.prepare``). ``QFunctional`` (quantized ops) is not among them."""


def _refuse_lazy_or_quantized(module: torch.nn.Module, label: str) -> None:
    """Refuse, naming the submodule and the fix: a lazy module not run yet (``nn.LazyLinear``: its parameters
    have no shape; before: torch's ValueError "Attempted to use an uninitialized parameter", not an InputError),
    and a quantized module (``torch.ao.quantization.quantize_dynamic`` / ``convert``: its packed weights are
    TorchScript objects; before: torch.export's "LinearPackedParamsBase ... does not have a field with name
    '__obj_flatten__'"). Session 18. ``FloatFunctional`` / ``FXFloatFunctional`` (``_FLOAT_FUNCTIONAL``) are float
    modules, captured as the float ops they call (session 19: refused by the prefix match, and with them every
    float model written for later quantization, torchvision's ``quantization.mobilenet_v2(quantize=False)``).
    Raises CaptureError."""
    for path, sub in module.named_modules():
        where = label if not path else f"{label}.{path}"
        kind = type(sub).__module__
        if kind.startswith(("torch.ao.nn.quantized", "torch.ao.nn.intrinsic.quantized", "torch.nn.quantized")) \
                and not isinstance(sub, _FLOAT_FUNCTIONAL):
            raise CaptureError(
                f"{where} is a quantized module ({kind}.{type(sub).__name__}, made by torch.ao.quantization): its "
                "packed weights are TorchScript objects torch.export cannot lift and the server runs no quantized "
                "ops; pass the float model (before quantize_dynamic / convert)")
        own = [*sub.named_parameters(recurse=False), *sub.named_buffers(recurse=False)]
        odd = [f"{n} ({p.layout})" for n, p in own if p is not None and p.layout is not torch.strided]
        if odd:
            raise CaptureError(
                f"{where} ({type(sub).__name__}) holds a non-dense tensor ({', '.join(odd)}): the graph, the wire and "
                "the server carry dense (strided) tensors; keep it dense (.to_dense()) in the module")
        lazy = [n for n, p in own if torch.nn.parameter.is_lazy(p)]
        if lazy:
            raise CaptureError(
                f"{where} ({type(sub).__name__}) has uninitialized lazy parameters ({', '.join(lazy)}): call the "
                "model once on an example batch (model(*example_inputs)) to initialize them, then build the client")


def _capture(module: torch.nn.Module, example_inputs: Any, kwargs: Mapping[str, Any] | None, name: str,
             check: bool, verbose: bool | None) -> ModelGraph:
    """``capture``'s work, under the trace lock, with the process's random generators watched
    (``pystate.DrawWatch``): the check refuses a forward that draws from one, and whatever the export's trace and
    the eager runs drew is put back afterwards, captured or refused (session 19: a refused capture left the
    user's generator 3 draws ahead)."""
    watch = DrawWatch()
    try:
        return _capture_watched(module, example_inputs, kwargs, name, check, verbose, watch)
    finally:
        watch.restore(name or type(module).__name__)


def _capture_watched(module: torch.nn.Module, example_inputs: Any, kwargs: Mapping[str, Any] | None, name: str,
                     check: bool, verbose: bool | None, watch: DrawWatch) -> ModelGraph:
    """``_capture`` with ``watch`` held."""
    label = name or type(module).__name__
    _refuse_torchscript(module, label)
    _refuse_lazy_or_quantized(module, label)
    if module.training:  # the user's own module is switched (so ``model(*inputs)`` after it gives what we do)
        log.warning("%s was in training mode: module.eval() was called on it and it is captured in eval mode "
                    "(dropout off, batch-norm with its running statistics), as inference runs it", label)
    module = module.eval()
    py_state = PythonState(module) if check else None
    args = tuple(example_inputs) if isinstance(example_inputs, list | tuple) else (example_inputs,)
    kwargs = dict(kwargs or {})
    args, kwargs = pytree.tree_map(to_tensor_leaf, (args, kwargs))
    cap_args, cap_kwargs = _unalias(module, args, kwargs)
    if verbose is None:
        verbose = log.isEnabledFor(logging.DEBUG)
    chatter = io.StringIO()
    try:
        with TORCH_TRACE_LOCK, _quiet(verbose, chatter):
            ep = torch.export.export(module, cap_args, cap_kwargs)
            _check_symbolic(ep.graph, label, ep.graph_signature)
            ep = ep.run_decompositions({})
            _check_control_flow(ep.graph, label)
            _check_random(ep.graph, label)
    except ModelGraphError:
        raise
    except Exception as e:  # torch raises many types here; all mean "cannot capture"
        log.debug("torch.export output:\n%s", chatter.getvalue())
        raise _refusal(e, label, module) from e

    sig = ep.graph_signature
    for spec in sig.output_specs:
        if spec.kind == OutputKind.USER_INPUT_MUTATION:
            raise CaptureError(
                f"{label} mutates its input {spec.target!r} in forward (an in-place op such as "
                "add_ or x[...] = v on an input); clone it first (x = x.clone()) or use out-of-place ops"
            )
        if spec.kind == OutputKind.BUFFER_MUTATION:
            raise CaptureError(
                f"{label} updates its buffer {spec.target!r} in forward (e.g. batch-norm statistics "
                "in training mode, a counter); call .eval() or stop mutating module state"
            )
        if spec.kind == OutputKind.PARAMETER_MUTATION:
            raise CaptureError(
                f"{label} changes its parameter {spec.target!r} in forward (an in-place op on a weight, e.g. "
                "nn.Embedding(max_norm=...) renormalising the rows it reads); the graph would keep the weights it was "
                "sent while the module's move on: stop mutating weights in forward (for max_norm: renormalise the "
                "whole weight once, then set max_norm=None)"
            )
        if spec.kind != OutputKind.USER_OUTPUT:
            raise CaptureError(
                f"{label} has a {spec.kind.name} output ({spec.target!r}); only plain functional forwards can be split"
            )
    state = {**ep.state_dict, **ep.constants}
    placeholders: dict[str, dict] = {}
    inputs: dict[str, TensorMeta] = {}
    weights: dict[str, TensorMeta] = {}
    weight_values: dict[str, torch.Tensor] = {}
    weight_sources: dict[str, torch.Tensor] = {}
    constants: dict[str, torch.Tensor] = {}
    """The lifted constants (the user's plain tensors, or tensors the forward made: ``made_in_forward``)."""
    for spec in sig.input_specs:
        pname = spec.arg.name
        if spec.kind in _WEIGHT_KINDS:
            value = state[spec.target]
            if not isinstance(value, torch.Tensor):
                raise CaptureError(f"constant {spec.target!r} is not a tensor")
            value = value.detach()
            if spec.kind == InputKind.CONSTANT_TENSOR:
                constants[spec.target] = value
            # a dense non-contiguous weight (a channels_last conv's, a transposed parameter) keeps its strides in
            # the graph: the trace's strides of the ops that read it follow them (a conv with a channels_last
            # weight answers channels_last), so every side runs it in that layout (``ModelGraph.run_weights``; the
            # server restores it from the contiguous bytes, ``edge_server.slices.weight_tensor``); before session
            # 17 both ran a contiguous copy and the outputs' layout, and a split's bits, differed from the trace's
            weights[spec.target] = TensorMeta.of(value, keep_stride=_dense(value))
            weight_values[spec.target] = value.contiguous()
            if weight_values[spec.target] is not value:
                weight_sources[spec.target] = value
            placeholders[pname] = {"w": spec.target}
        elif spec.kind == InputKind.USER_INPUT:
            if isinstance(spec.arg, ConstantArgument):  # None, a number, a string: the graph is specialised on it
                placeholders[pname] = {"c": spec.arg.value}
            else:
                placeholders[pname] = {"t": pname}
        else:
            raise CaptureError(f"unsupported graph input kind {spec.kind.name} ({pname})")

    aliases: dict[str, str] = {}  # getitem node -> "<producer>#<i>"
    ops: list[OpNode] = []
    default_pinned: torch.dtype | None = None
    """torch's default dtype at capture when a floating or complex factory op left its dtype to it (pinned)."""
    multi: set[str] = set()

    def ref_of(node: torch.fx.Node) -> Any:
        if node.name in placeholders:
            r = placeholders[node.name]
            return encode(r["c"], ref_of) if "c" in r else r
        if node.name in aliases:
            return {"t": aliases[node.name]}
        if node.name in multi:
            raise CaptureError(f"op {node.name} passes a whole tuple of tensors to another op")
        return {"t": node.name}

    for node in ep.graph.nodes:
        if node.op == "placeholder":
            if placeholders.get(node.name, {}).get("t"):
                inputs[node.name] = _meta(node.meta.get("val"), f"input {node.name}")
            continue
        if node.op == "output":
            outs = node.args[0]
            break
        if node.op != "call_function":
            raise CaptureError(f"unsupported node {node.op} {node.name}")
        if node.target is operator.getitem:
            src, idx = node.args
            if src.name not in multi:
                raise CaptureError(f"getitem on non-tuple node {src.name}")
            aliases[node.name] = f"{src.name}#{idx}"
            continue
        if not isinstance(node.target, torch._ops.OpOverload):
            raise CaptureError(f"node {node.name} calls {node.target!r}, not an ATen op")
        if op_name(node.target) in _STATIC_CHECKS:
            if not _static_check_holds(node):
                raise CaptureError(f"{label}: {node.name} ({op_name(node.target)}) asserts a size, stride or "
                                   "dtype its input does not have at capture")
            continue
        val = node.meta.get("val")
        is_multi = isinstance(val, list | tuple)
        if is_multi:
            outputs = tuple(
                _meta(v, f"{node.name}[{i}]") if isinstance(v, torch.Tensor) else TensorMeta((0,), "float32")
                for i, v in enumerate(val)
            )
            multi.add(node.name)
        else:
            outputs = (_meta(val, node.name),)
        pinned = _pinned_dtype(node)
        if _default_made(node, pinned):
            default_pinned = torch.get_default_dtype()
        ops.append(
            OpNode(
                name=node.name,
                target=op_name(node.target),
                args=tuple(encode(a, ref_of) for a in node.args),
                kwargs={k: encode(v, ref_of) for k, v in pinned.items()},
                outputs=outputs,
                multi=is_multi,
                layer=_layer_of(node),
            )
        )
    else:  # pragma: no cover - fx graphs always end with an output node
        raise CaptureError("graph has no output node")

    out_refs: list[str] = []
    out_leaves: list[dict] = []
    for o in outs if isinstance(outs, list | tuple) else [outs]:
        if not isinstance(o, torch.fx.Node):
            out_leaves.append({"c": o})  # None, a number, a string, a shape: returned as is
            continue
        r = placeholders.get(o.name)
        if r is not None and "c" in r:
            out_leaves.append({"c": r["c"]})
        elif r is not None and "w" in r:  # forward returns a parameter/buffer itself: no op computes it
            # the module's own tensor object, as eager returns it (its strides: a transposed buffer came back
            # contiguous, session 18; and the object: edited in place through the output, eager's next call returns
            # the edited buffer, session 19)
            own = state.get(r["w"])
            out_leaves.append({"c": own if isinstance(own, torch.Tensor)
                               else weight_sources.get(r["w"], weight_values[r["w"]])})
        else:
            ref = ref_of(o)["t"]
            out_refs.append(ref)
            out_leaves.append({"t": ref})
    in_leaves = tuple(placeholders[s.arg.name] for s in sig.input_specs if s.kind == InputKind.USER_INPUT)
    paths = _leaf_paths((args, kwargs), len(pytree.tree_leaves((args, kwargs))))
    in_names = tuple(
        f"{leaf['t']!r} ({_path_name(p)})" if "t" in leaf else _path_name(p) for leaf, p in zip(in_leaves, paths)
    )
    io_spec = IOSpec(ep.call_spec.in_spec, in_leaves, in_names, ep.call_spec.out_spec, tuple(out_leaves))
    used_weights = {w for op in ops for w in op.weight_inputs}
    unused = [w for w in weights if w not in used_weights]
    if unused:
        log.debug("dropping %d weights no op reads: %s", len(unused), unused[:5])
        for w in unused:
            weights.pop(w)
            weight_values.pop(w)
            weight_sources.pop(w, None)
    graph = ModelGraph(
        name=label,
        ops=tuple(ops),
        inputs=inputs,
        outputs=tuple(out_refs),
        weights=weights,
        weight_values=weight_values,
        weight_sources=weight_sources,
        io=io_spec,
        default_dtype=default_pinned,
    )
    if check:
        sized: list = []
        layouts: list = []
        worst, reads = _checked(graph, module, args, kwargs, label, watch, sized, layouts)
        if layouts and layouts[-1] is not None:  # eager's output strides and aliasing (break38 F3, F4)
            graph = replace(graph, out_layout=layouts[-1])
        if sized:  # ``return y, y.shape``: eager's torch.Size, rebuilt as one (its entries: constants per signature)
            graph = replace(graph, io=replace(graph.io, out_spec=sized[-1]))
        why = _python_draws(module, args, kwargs, reads, label, grad=reads_grad_mode(reads), watch=watch)
        if why is not None:  # the traced draw and the checked one agreed (``if random.random() < 0.1:``, twice
            raise CaptureError(why)  # above 0.1): every later call draws again, every path answers the traced one
        graph = replace(graph, eager_max_diff=worst, python_reads=reads)
        if reads_grad_mode(reads):
            graph = replace(graph, grad_mode=grad_mode(args, kwargs, not reads.names.isdisjoint(
                {"requires_grad", "is_inference"})))
        if graph.default_dtype is None and reads is not None and "get_default_dtype" in reads.names:
            # ``x.to(torch.get_default_dtype())`` in the user's code: eager under another default answers another
            # dtype, the graph the traced one (session 18: silently float32 where eager gave float64)
            graph = replace(graph, default_dtype=torch.get_default_dtype())
        if graph.default_dtype is None and reads is not None:
            default = torch.get_default_dtype()
            dtypes = (default, torch.complex64 if default == torch.float32 else torch.complex128)
            floating = {n: t for n, t in constants.items() if t.dtype in dtypes}
            made = made_in_forward(module, reads, floating) if floating else []
            if made:  # ``torch.tensor([0.1, 0.2])`` in forward: made in the default dtype (session 16)
                log.debug("%s: constants made in forward in the default dtype %s: %s", label, default, made[:5])
                graph = replace(graph, default_dtype=default)
        py_state.forget_scratch(reads)
        kept = _check_python_state(py_state, graph, label, reads)
        if kept is not reads:  # a log-only counter on the module: per-call scratch
            reads = kept
            graph = replace(graph, python_reads=reads)
        if reads is not None and (reads.called or reads.globals):
            graph = replace(graph, python_reads=_forward_writes(module, args, kwargs, reads, label, graph,
                                                                watch.consumed))
    log.debug(
        "captured %s: %d ops, %d weights (%.1f MiB)",
        graph.name,
        len(ops),
        len(weights),
        graph.total_weight_bytes / 2**20,
    )
    return graph
