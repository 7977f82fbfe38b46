"""The model's own input and output structure around a flat captured graph.

A ModelGraph's ops read flat, named tensors (its ``inputs``) and produce flat tensor refs (its
``outputs``). What the user's ``forward`` takes and returns is a pytree (``torch.utils._pytree``):
dicts, lists, nested tuples, ``None`` leaves and non-tensor constants. :class:`IOSpec` records both
trees at capture time (torch.export's ``call_spec``):

* inputs: ``in_spec`` is the tree of ``(args, kwargs)``; ``in_leaves[i]`` says what flat leaf ``i``
  is: ``{"t": placeholder}`` (a tensor the graph reads) or ``{"c": value}`` (a non-tensor constant
  torch.export specialised the graph on; a run-time value must be equal).
* outputs: ``out_spec`` is the tree of what ``forward`` returns; ``out_leaves[i]`` is ``{"t": ref}``
  (a graph output tensor) or ``{"c": value}`` (``None``, an int, a string, a shape tuple...).

:func:`flatten_inputs` turns run-time ``(args, kwargs)`` into ``{placeholder: tensor}``, checking the
structure, every tensor's dtype (no silent casts: :class:`InputSpecError`, a ``ValueError``, names the
input, the expected and the given dtype) and shape, and giving each tensor the exact strides it was
captured with (a permuted HWC->NCHW view or a channels_last tensor is copied into the captured
layout, so the kernels see what they saw at capture: bitwise-equal results on CPU). numpy arrays are
accepted as tensors of their own dtype. :func:`rebuild_outputs` turns the graph's flat tensors back
into the structure ``forward`` returns.
"""

from __future__ import annotations

import dis
import inspect
import math
import sys
from collections import OrderedDict, defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils import _pytree as pytree

from modelgraph.errors import InputSpecError
from modelgraph.out_layout import as_callers
from modelgraph.tensors import DTYPE_NAMES, TensorMeta


@dataclass(frozen=True)
class IOSpec:
    """Input and output trees of a captured ``forward`` (see the module docstring)."""

    in_spec: pytree.TreeSpec
    """Tree of ``(args, kwargs)`` as ``torch.utils._pytree.tree_flatten`` builds it."""
    in_leaves: tuple[dict, ...]
    """Per flat input leaf: ``{"t": placeholder name}`` or ``{"c": constant}``."""
    in_names: tuple[str, ...]
    """Per flat input leaf: a readable path (``"x"``, ``"batch['image']"``) for error messages."""
    out_spec: pytree.TreeSpec
    """Tree of the returned value (torch.export's ``out_spec``: ``None`` is a leaf)."""
    out_leaves: tuple[dict, ...]
    """Per flat output leaf: ``{"t": tensor ref}`` or ``{"c": constant}``."""

    def to_json(self) -> dict:
        """JSON-able form (tree specs via ``treespec_dumps``); part of a graph's structure hash."""
        return {
            "in_spec": _dumps(self.in_spec),
            "in_leaves": [_leaf_json(x) for x in self.in_leaves],
            "out_spec": _dumps(self.out_spec),
            "out_leaves": [_leaf_json(x) for x in self.out_leaves],
        }


def flat_io(inputs: Mapping[str, TensorMeta], outputs: Sequence[str], n_args: int | None = None) -> IOSpec:
    """The IOSpec of a graph built without one: positional tensors in ``inputs`` order; a tensor or a
    flat tuple out. ``n_args`` (the caller's count) only makes a count mismatch name both counts."""
    names = tuple(inputs)
    if n_args is not None and n_args != len(names):
        raise InputSpecError(f"model takes {len(names)} inputs ({', '.join(names)}), got {n_args}")
    in_spec = pytree.tree_flatten((tuple(range(len(names))), {}))[1]
    out = tuple(outputs)
    out_spec = pytree.tree_flatten(0 if len(out) == 1 else tuple(range(len(out))))[1]
    return IOSpec(
        in_spec, tuple({"t": n} for n in names), tuple(repr(n) for n in names), out_spec, tuple({"t": o} for o in out)
    )


def _dumps(spec: pytree.TreeSpec) -> str:
    try:
        return pytree.treespec_dumps(spec)
    except Exception:  # a user-registered node type without a serialisable name
        return str(spec)


def _leaf_json(leaf: dict) -> dict:
    if "c" in leaf:
        return {"c": repr(leaf["c"])}
    return leaf


def to_tensor_leaf(x: Any) -> Any:
    """A numpy array becomes a tensor of the same dtype (no cast); everything else is returned as is."""
    if type(x).__module__ == "numpy" and type(x).__name__ == "ndarray":
        try:
            return torch.from_numpy(x)
        except TypeError as e:  # object arrays, unsupported dtypes
            raise InputSpecError(f"numpy array of dtype {x.dtype} cannot become a tensor: {e}") from None
    return x


def fit_layout(t: torch.Tensor, meta: TensorMeta) -> torch.Tensor:
    """``t`` with exactly the strides ``meta`` was captured with (contiguous when ``meta.stride`` is None).

    A copy only when the strides differ; values are unchanged (same dtype, same shape)."""
    want = meta.strides
    if tuple(t.stride()) == want:
        return t
    try:
        out = torch.empty_strided(meta.shape, want, dtype=t.dtype, device=t.device)
        out.copy_(t)
        return out
    except RuntimeError:  # overlapping strides cannot be allocated: values are what matter
        return t.contiguous()


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    try:
        return type(a) is type(b) and bool(a == b)
    except Exception:
        return False


def flatten_inputs(
    io: IOSpec, inputs: Mapping[str, TensorMeta], args: Sequence[Any], kwargs: Mapping[str, Any] | None = None
) -> dict[str, torch.Tensor]:
    """Bind run-time ``forward(*args, **kwargs)`` values to the graph's placeholders.

    ``inputs`` is the graph's placeholder -> captured TensorMeta. Returns ``{placeholder: tensor}``,
    each tensor in its captured layout. Raises :class:`InputSpecError` (a ``ValueError``) for a
    different tree structure, a non-tensor where a tensor was captured, a different constant, a dtype
    mismatch (named: input, expected and given dtype; never cast) or a different shape.
    """
    aspec, kspec = io.in_spec.children()
    flat = flatten_like(tuple(args), aspec, "args") + flatten_like(dict(kwargs or {}), kspec, "kwargs")
    leaves = [to_tensor_leaf(x) for x in flat]
    env: dict[str, torch.Tensor] = {}
    for leaf, x, where in zip(io.in_leaves, leaves, io.in_names):
        if "c" in leaf:
            if isinstance(x, torch.Tensor) or not _same(x, leaf["c"]):
                raise InputSpecError(
                    f"input {where} is {_short_value(x)}; the model was captured with the "
                    f"constant {leaf['c']!r} (torch.export specialises on non-tensor inputs)"
                )
            continue
        name = leaf["t"]
        env[name] = check_tensor(where, x, inputs[name])
    return env


def check_tensor(where: str, x: Any, meta: TensorMeta) -> torch.Tensor:
    """``x`` checked against the captured ``meta`` (a tensor, same dtype, same shape) and given its
    captured strides. Raises InputSpecError naming ``where``, the expected and the given value."""
    if not isinstance(x, torch.Tensor):
        hint = ("" if x is not None else " (the graph was captured with a tensor there; a client built on the "
                "module captures a call that leaves an optional argument out once more, in its own form; one built "
                "on a captured graph cannot: capture one without it)")
        raise InputSpecError(
            f"input {where} is a {type(x).__name__}; expected a tensor {list(meta.shape)} {meta.dtype}{hint}"
        )
    if x.device.type == "meta":  # no data: every path failed later with another torch error (session 15)
        raise InputSpecError(f"input {where} is a meta tensor (shape and dtype only, no data); pass real values")
    if x.layout is not torch.strided or x.is_nested:  # before session 22: torch's RuntimeError from the layout copy
        if x.is_nested:  # review22b: not sparse; to_dense() does not apply
            kind, why, fix = ("a nested", "eager runs nested-tensor kernels on it",
                              "torch.stack(x.unbind()) or x.to_padded_tensor(0)")
        else:
            kind = f"a {str(x.layout).removeprefix('torch.')}"
            why = ("eager runs sparse kernels on it (their answers can be sparse, and differ from the dense ones in "
                   "the last bits)")
            fix = "x.to_dense()"
        raise InputSpecError(
            f"input {where} is {kind} tensor; the graph, the wire and the server carry dense (strided) tensors, and "
            f"{why}: pass it dense ({fix}), as the model was captured with {list(meta.shape)} {meta.dtype}")
    got = DTYPE_NAMES.get(x.dtype, str(x.dtype))
    if got != meta.dtype:
        raise InputSpecError(
            f"input {where} has dtype {got}; the model expects {meta.dtype} (convert it "
            f"explicitly, e.g. x.to(torch.{meta.dtype}); nothing is cast silently)"
        )
    if tuple(x.shape) != meta.shape:
        raise InputSpecError(f"input {where} has shape {list(x.shape)}; the graph was captured with {list(meta.shape)}")
    x = x.detach()
    if x.is_conj() or x.is_neg():  # a lazy ``z.conj()`` (or its ``.imag``): its bytes are not its values; a split
        x = x.resolve_conj().resolve_neg()  # sent them raw (a RuntimeError from .view; session 18)
    return fit_layout(x, meta)


def flatten_like(tree: Any, spec: pytree.TreeSpec, where: str = "inputs") -> list[Any]:
    """Leaves of ``tree`` in the order of ``spec``; dict keys may come in any order (matched by key).

    Raises :class:`InputSpecError` naming the first place where the structure differs."""
    if spec.is_leaf():
        return [tree]
    node = pytree.SUPPORTED_NODES.get(type(tree))
    if type(tree) is not spec.type or node is None:
        raise InputSpecError(
            f"{where} is a {type(tree).__name__}; the model was captured with a "
            f"{getattr(spec.type, '__name__', spec.type)} there"
        )
    children, context = node.flatten_fn(tree)
    if spec.type in (dict, OrderedDict, defaultdict) and isinstance(context, list):
        if set(context) != set(spec.context):
            missing = [k for k in spec.context if k not in context][:5]
            extra = [k for k in context if k not in spec.context][:5]
            raise InputSpecError(f"{where} has keys {extra} the model was not captured with and lacks {missing}")
        by_key = dict(zip(context, children))
        children = [by_key[k] for k in spec.context]
    elif len(children) != len(spec.children()) or context != spec.context:
        raise InputSpecError(
            f"{where} has {len(children)} entries; the model was captured with {len(spec.children())} "
            f"({spec_line(spec)})"
        )
    out: list[Any] = []
    for i, (child, cspec) in enumerate(zip(children, spec.children())):
        key = spec.context[i] if spec.type in (dict, OrderedDict, defaultdict) else i
        out.extend(flatten_like(child, cspec, f"{where}[{key!r}]"))
    return out


def rebuild_outputs(io: IOSpec, values: Mapping[str, torch.Tensor], layout: Any = None) -> Any:
    """The value ``forward`` returns, rebuilt from the graph's output tensors ``values`` (ref -> tensor); a
    ``torch.Size`` node (``return y, y.shape``; ``sizes_as_tuples``) comes back a ``torch.Size``. ``layout``
    (``modelgraph.out_layout.OutputLayout``, or None): eager's output strides and aliasing, given back (a copy
    only where the tensors in ``values`` differ from it; ``values`` holds the bound inputs for views of them). The
    tensors come back of the caller's kind: inference tensors under ``torch.inference_mode``, else normal ones
    (``modelgraph.out_layout.as_callers``: no copy)."""
    leaves = [values[leaf["t"]] if "t" in leaf else leaf["c"] for leaf in io.out_leaves]
    if layout:
        leaves = layout.apply(leaves, values)
    inputs = [values.get(leaf["t"]) for leaf in io.in_leaves if "t" in leaf]
    if layout and layout.weights:  # eager's views of weights (break43 F1): of the weight's kind, left as they are
        inputs += layout.bases
    leaves = as_callers(leaves, [("t" in leaf) for leaf in io.out_leaves], inputs)
    if not _holds_size(io.out_spec):
        return pytree.tree_unflatten(leaves, io.out_spec)
    it = iter(leaves)
    return _unflatten(it, io.out_spec)


def _holds_size(spec: pytree.TreeSpec) -> bool:
    return not spec.is_leaf() and (spec.type is torch.Size or any(_holds_size(c) for c in spec.children()))


def _unflatten(leaves: Any, spec: pytree.TreeSpec) -> Any:
    """``pytree.tree_unflatten`` of an iterator of leaves, but a ``torch.Size`` node is made a ``torch.Size`` (torch's
    own node for it unflattens to a plain tuple)."""
    if spec.is_leaf():
        return next(leaves)
    children = [_unflatten(leaves, c) for c in spec.children()]
    if spec.type is torch.Size:
        return torch.Size(children)
    return pytree.SUPPORTED_NODES[spec.type].unflatten_fn(children, spec.context)


def sizes_as_tuples(spec: pytree.TreeSpec) -> pytree.TreeSpec:
    """``spec`` with each ``torch.Size`` node a tuple node of the same children: what torch.export's ``out_spec``
    records for a forward returning ``y.shape`` (its entries are constants of the graph, which is captured per
    input signature, shapes included: exact). ``modelgraph.capture`` keeps eager's spec where they differ only so
    (session 22, review22: refused with a TreeSpec dump before)."""
    if spec.is_leaf():
        return spec
    kind = tuple if spec.type is torch.Size else spec.type
    return pytree.TreeSpec(kind, spec.context, [sizes_as_tuples(c) for c in spec.children()])


def spec_line(spec: pytree.TreeSpec) -> str:
    """A tree spec on one line (``TreeSpec(tuple, None, [*, *])``), at most 200 characters, for messages."""
    s = " ".join(str(spec).split())
    return s if len(s) <= 200 else s[:197] + "..."




def _short_value(x: Any) -> str:
    if isinstance(x, torch.Tensor):
        return f"a tensor {list(x.shape)} {x.dtype}"
    r = repr(x)
    return r if len(r) <= 60 else r[:57] + "..."


_POSITIONAL = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)


def forward_signature(module: Any) -> inspect.Signature | None:
    """``inspect.signature`` of ``module.forward`` (bound: no ``self``), or None where Python cannot tell."""
    try:
        return inspect.signature(module.forward)
    except (TypeError, ValueError, AttributeError):
        return None


def rebind_call(
    sig: inspect.Signature, io: IOSpec, args: Sequence[Any], kwargs: Mapping[str, Any] | None
) -> tuple[tuple, dict]:
    """A call ``forward(*args, **kwargs)`` rewritten in the form the model was captured with, binding the
    arguments as Python does (``sig``: the user's ``forward`` signature, ``io``: the captured trees): a
    keyword argument for a parameter captured positionally becomes positional, a positional one captured
    as a keyword becomes a keyword, an omitted parameter with a default takes its default where the
    capture passed it, and extra ``*args`` / ``**kwargs`` entries go where they went at capture.

    Returns ``(args, kwargs)``, the same objects' values (no tensor is copied). Raises
    :class:`InputSpecError` for a call Python would refuse (``TypeError`` of ``sig.bind``: a missing or
    unexpected argument, a keyword for a positional-only parameter) and for an argument the capture did
    not pass (it took its default then; the graph is specialised on it) unless it equals that default.
    Any other difference (structure, count of ``*args``, dtype, shape) is left to :func:`flatten_inputs`.
    """
    aspec, kspec = io.in_spec.children()
    n_cap = aspec.num_children
    keys = list(kspec.context or ()) if kspec.type in (dict, OrderedDict, defaultdict) else []
    kwargs = dict(kwargs or {})
    try:
        bound = sig.bind(*args, **kwargs)
    except TypeError as e:
        raise InputSpecError(f"the call does not fit the model's forward{sig}: {e}") from None
    params = list(sig.parameters.values())
    positional = [p for p in params if p.kind in _POSITIONAL]
    var_pos = next((p for p in params if p.kind is inspect.Parameter.VAR_POSITIONAL), None)
    var_kw = next((p for p in params if p.kind is inspect.Parameter.VAR_KEYWORD), None)
    given = dict(bound.arguments)
    extra_kw = dict(given.pop(var_kw.name, {})) if var_kw is not None else {}
    extra_pos = tuple(given.pop(var_pos.name, ())) if var_pos is not None else ()

    def value(name: str) -> Any:
        if name in given:
            return given.pop(name)
        if name in extra_kw:
            return extra_kw.pop(name)
        p = sig.parameters.get(name)
        if p is not None and p.default is not inspect.Parameter.empty:
            return p.default
        raise InputSpecError(f"the model was captured with argument {name!r}; the call does not give it")

    new_args = [value(p.name) for p in positional[:n_cap]]
    new_args.extend(extra_pos)  # (a count other than the capture's is refused by flatten_inputs, naming both)
    new_kwargs = {k: value(k) for k in keys}
    for name, v in (*given.items(), *extra_kw.items()):
        p = sig.parameters.get(name)
        default = inspect.Parameter.empty if p is None else p.default
        if default is not inspect.Parameter.empty and (v is default or (
                not isinstance(v, torch.Tensor) and not isinstance(default, torch.Tensor) and _same(v, default))):
            continue
        raise InputSpecError(
            f"argument {name!r} was not passed when the model was captured (it took its default then, and the "
            "graph is specialised on that): capture the model with it to pass it (CoinferClient(module, args, "
            f"example_kwargs={{{name!r}: ...}}))"
        )
    return tuple(new_args), new_kwargs


LAYOUT_NAMES = frozenset({"is_contiguous", "stride", "storage_offset", "data_ptr", "untyped_storage", "storage",
                          "is_non_overlapping_and_dense", "_is_view", "is_set_to"})
"""Names whose presence in the user code a forward ran (``modelgraph.pystate.ForwardReads.names``) means it may
read an input's strides (``x.is_contiguous()``, ``x.stride(0)``): its graph is then specialised on each input's
exact strides (``reads_layout``). A false hit costs a capture per non-dense layout a call brings, never a wrong
answer; ``stride`` alone counts only where the code calls it as a method (``x.stride(0)``, not a conv block's
``self.stride == 1``: torchvision's shufflenet_v2)."""


def reads_layout(reads: Any) -> bool:
    """Whether the user code of a forward (``ForwardReads.names``, the ``python_reads`` a checked capture keeps;
    None for a graph captured without the check) may read an input's strides or contiguity (``LAYOUT_NAMES``).
    Such a forward's graph is keyed by each non-dense input's own strides (``layout_key(t, exact=True)``) and
    captured on them (session 22, review22: a slice with gaps was copied dense and ``x.is_contiguous()`` answered
    True, 0.62 off eager; ``x.stride(0)`` 8.01 off)."""
    if reads is None:
        return False
    hit = LAYOUT_NAMES.intersection(getattr(reads, "names", ()))
    if hit != {"stride"}:
        return bool(hit)
    codes = getattr(reads, "called", None)
    return not codes or any(_calls_method(c, "stride") for c in codes)


def _calls_method(code: Any, name: str) -> bool:
    """Whether ``code`` loads ``name`` as a method (``x.stride(0)``: ``LOAD_METHOD``, or ``LOAD_ATTR`` with its
    method bit from Python 3.12), not as a plain attribute (``self.stride``); also ``getattr(x, "stride")``."""
    try:
        me = code.co_varnames[0] if code.co_argcount else None
        prev = None
        for ins in dis.get_instructions(code):
            before, prev = prev, ins
            if ins.argval != name:
                continue
            if ins.opname == "LOAD_METHOD" or ins.opname == "LOAD_CONST":
                return True
            if ins.opname == "LOAD_ATTR" and sys.version_info >= (3, 12) and (ins.arg or 0) & 1:
                return True
            if ins.opname == "LOAD_ATTR" and not (before is not None and before.opname == "LOAD_FAST"
                                                  and before.argval == me):
                return True  # the bound method kept (st = x.stride; st(0)); only a block's own self.stride is not
    except (TypeError, ValueError):
        return True
    return False


def layout_key(t: torch.Tensor, exact: bool = False) -> tuple[int, ...] | None:
    """The memory layout eager ops see in ``t``, as a hashable key: None for a contiguous tensor (strides of
    size-1 dimensions do not count, as for ``Tensor.is_contiguous``), else the strides of the dense tensor
    ``torch.empty_like(t)`` lays it out as (``t``'s own strides when ``t`` is dense, e.g. channels_last or
    an HWC image permuted to NCHW; for a sliced, non-dense tensor the format PyTorch suggests for it, None
    when that is contiguous). Eager's outputs follow their inputs' layout (a conv on a channels_last input
    answers channels_last), so a captured graph, whose every tensor has the strides it was traced with,
    answers eager's layout only for inputs of the layout it was captured with (session 17).

    ``exact`` (for a forward that reads strides, ``reads_layout``): a non-contiguous tensor's key is its own
    strides, a slice with gaps included (``x[:, ::2]`` of a ``[2, 8]`` tensor: ``(8, 2)``), so it is captured on
    that layout. The storage offset is not part of the key (a forward branching on ``x.storage_offset()`` or
    ``x.data_ptr()`` is specialised on the capture's)."""
    if t.layout is not torch.strided or t.is_contiguous():
        return None
    if exact:
        return tuple(t.stride())
    dense = torch.empty_like(t, device="meta")
    return None if dense.is_contiguous() else tuple(dense.stride())


def dense_like(t: Any) -> Any:
    """A tensor that is not dense (a slice with gaps, a broadcast view) copied into the dense layout of
    ``layout_key`` (``Tensor.clone`` keeps a dense tensor's strides, and lays a non-dense one out in the
    suggested format); anything else as it is. An example to capture a graph of ``layout_key(t)`` with."""
    if not isinstance(t, torch.Tensor) or t.layout is not torch.strided or t.is_contiguous():
        return t
    if tuple(torch.empty_like(t, device="meta").stride()) == tuple(t.stride()):
        return t
    return t.clone()


def signature(args: Sequence[Any], kwargs: Mapping[str, Any] | None = None, exact: bool = False) -> tuple:
    """Hashable key of an input signature: tree structure, each tensor's shape, dtype and memory layout
    (``layout_key``; ``exact``: a non-dense tensor's own strides, for a forward that reads them), each
    constant's repr; a sparse or nested tensor is ``("odd", layout, is_nested)``. Two inputs with one signature
    can run on one captured graph and get the same output strides from it as from the eager module."""
    leaves, spec = pytree.tree_flatten(pytree.tree_map(to_tensor_leaf, (tuple(args), dict(kwargs or {}))))
    key: list[Any] = [spec]  # TreeSpecs hash and compare by structure (serialising one per call cost ~0.17 ms)
    for x in leaves:
        if isinstance(x, torch.Tensor) and (x.is_nested or x.layout is not torch.strided):
            key.append(("odd", str(x.layout), x.is_nested))  # sparse / nested: no graph takes it (``check_tensor``)
        elif isinstance(x, torch.Tensor):
            key.append(("t", tuple(x.shape), str(x.dtype), layout_key(x, exact)))
        else:
            key.append(("c", type(x).__name__, repr(x)))
    return tuple(key)
