"""Eager's output layout and aliasing, recorded at capture and given back by every path (break38 F3, F4).

The captured graph runs the ops ``torch.export`` traced, which are not always the kernels eager ran: under
``no_grad`` ``nn.MultiheadAttention(batch_first=True)`` takes a fused path whose ``(2, 5, 8)`` output is contiguous
``(40, 8, 1)`` while the traced math path answers ``(8, 16, 1)`` (``y.view(...)`` then raised where eager's worked).
And a server answers each output tensor on its own: outputs that are views of one tensor (``h``, ``h.t()``,
``h[:, ::2]``, ``h.expand(...)``) or of an input (``x.t()``) came back as separate tensors, so writing into one no
longer showed in the others as it does in eager.

The capture's check (``modelgraph.capture._check_against_eager``, eager and the graph once on the example inputs)
records, with :func:`eager_layout`, what eager's outputs look like in memory where the graph's differ or where they
share storage; :meth:`OutputLayout.apply` (run by ``ModelGraph.rebuild``, so by the local, split, offloaded and
fallback paths alike) lays the graph's output tensors out so:

* an output whose strides differ from eager's (and that shares no storage) is copied into eager's strides;
* outputs that share one storage in eager (two or more output leaves) are put in one fresh buffer at eager's
  relative byte offsets and strides (a leaf that was the same eager object twice is the same tensor twice),
  unless they already share storage that way (a local run: no copy);
* an output that is a view of an input in eager is made that view of the bound input (``values[placeholder]``),
  when the bound input has the strides the example input had (then the view eager makes has the recorded
  relative offset and strides).
* an output that is a view of a weight in eager (``self.fc.weight[0]``, ``self.fc.bias.T``, ``self.center.view(1, 5)``)
  is made that view of the module's own tensor (:class:`WeightView`: ``as_strided`` on the ``Parameter`` or buffer, in
  the caller's autograd mode, as eager's op is): the live weight's memory, of its kind (a view of a normal tensor is
  normal under ``inference_mode`` too), with eager's autograd history to the weight under grad; a split's or the
  server's bytes for it are not used. The weight itself returned beside its view (``return y, w, w[0]``) is no
  group member: it stays the module's own object, as a weight returned alone always did (break43 F1).

Left (documented in the README): an input bound as a copy (another layout than the captured one: ``bind`` copies
it) is viewed in that copy, not in the caller's tensor, as local runs always did; an output that is the input itself
(``return x``) is a tensor sharing the input's storage, not the caller's object (``bind`` hands the graph an alias);
an output sharing storage with an intermediate tensor no output returns keeps its own storage (values, shape and
strides as eager's);
where some output's strides differ, eager runs once more with grad (``OutputLayout.grad``: MHA's fused path runs
unless grad is enabled and something it reads requires grad), for the ``requires_grad`` flags the module's parameters
had at capture, and once more with its floating inputs requiring grad (``OutputLayout.grad_inputs``, given back to a
call with grad enabled on an input that requires grad, whichever input it is).

:func:`as_callers` (run after it by every path too) gives the outputs back as the caller's kind of tensor: normal
tensors outside ``torch.inference_mode``, inference tensors inside it, as eager's (break41 F4).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field

import torch
from torch.utils import _pytree as pytree

log = logging.getLogger(__name__)

INPUTS_REQUIRE_GRAD: ContextVar[bool] = ContextVar("coinfer_inputs_require_grad", default=False)
"""Whether the call whose outputs are being laid out passed an input tensor that requires grad (set around the run
by ``ue_client.CoinferClient.__call__`` and ``modelgraph.execute.run_graph``; binding detaches the inputs):
:meth:`OutputLayout.apply` then gives ``grad_inputs``'s layout where there is one (break41 F3)."""


def inputs_require_grad(layout: OutputLayout | None, tree) -> bool:
    """What ``INPUTS_REQUIRE_GRAD`` is to say for a call of a graph with ``layout`` (its ``out_layout``) on the
    inputs ``tree`` (before binding): grad enabled and a tensor of them requiring grad. False at once where the
    layout has no ``grad_inputs`` (most graphs: nothing looked at)."""
    return layout is not None and layout.grad_inputs is not None and torch.is_grad_enabled() and any(
        isinstance(t, torch.Tensor) and t.requires_grad for t in pytree.tree_leaves(tree))


@dataclass(frozen=True)
class Member:
    """One output leaf's place in eager's memory."""

    leaf: int
    """Index in the flat output leaves (``IOSpec.out_leaves``)."""
    byte: int
    """Byte offset of its first element: relative to its group's lowest member (outputs among themselves), or to
    the input's own first element (a view of an input)."""
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    dtype: torch.dtype
    same: int | None = None
    """The index (in its group) of an earlier member that was the same eager tensor object, else None."""

    def extent(self) -> int:
        """Bytes from its group's base to one past its last element."""
        size = torch.empty((), dtype=self.dtype).element_size()
        if any(n == 0 for n in self.shape):
            return self.byte
        return self.byte + (sum((n - 1) * s for n, s in zip(self.shape, self.stride)) + 1) * size


@dataclass(frozen=True)
class InputView:
    """Outputs that are views of one input in eager."""

    placeholder: str
    """The input's placeholder (``IOSpec.in_leaves[i]["t"]``)."""
    stride: tuple[int, ...]
    """The example input's strides: the relation holds for a bound input of these strides."""
    members: tuple[Member, ...]


@dataclass(frozen=True)
class WeightView:
    """Outputs that are views of one weight (a parameter, buffer or tensor attribute) in eager (break43 F1)."""

    base: torch.Tensor = field(compare=False)
    """The module's own tensor (the ``Parameter`` or buffer object; a tensor attribute's detached alias): eager's
    views are made of it at every call, so they see the live weight's memory."""
    members: tuple[Member, ...] = ()
    """``byte``: relative to ``base``'s first element."""


@dataclass(frozen=True)
class OutputLayout:
    """What :func:`eager_layout` found; :meth:`apply` gives it back. Empty parts are empty tuples."""

    strides: tuple[Member, ...] = ()
    """Outputs sharing no storage whose graph strides differ from eager's (``byte`` 0)."""
    groups: tuple[tuple[Member, ...], ...] = ()
    """Output leaves sharing one storage in eager, the lowest first (``byte`` 0)."""
    views: tuple[InputView, ...] = ()
    grad: OutputLayout | None = None
    """Eager's layout with grad enabled where the check's eager run had none and found strides to change (eager
    ran once more with grad, the example inputs not requiring grad and the parameters' ``requires_grad`` flags as
    at capture: MHA leaves its fused path where grad is enabled and an input or projection weight requires grad;
    its math path answers the graph's strides), given back to a call made with grad enabled; None: the same as this
    one."""
    grad_inputs: OutputLayout | None = None
    """Eager's layout with grad enabled and the example's floating inputs requiring grad (one more eager run, where
    ``grad`` is recorded): given back to a call made with grad enabled and an input tensor that requires grad
    (``INPUTS_REQUIRE_GRAD``): a frozen MHA leaves its fused path for such a call (break41 F3); None: ``grad``'s."""
    weights: tuple[WeightView, ...] = ()
    """Outputs that are views of a weight in eager (break43 F1)."""

    def __bool__(self) -> bool:
        return bool(self.strides or self.groups or self.views or self.weights)

    @property
    def bases(self) -> tuple[torch.Tensor, ...]:
        """The weights some output is a view of (:func:`as_callers` leaves those views as they are)."""
        return tuple(w.base for w in self.weights)

    def apply(self, leaves: Sequence, values: Mapping[str, torch.Tensor]) -> list:
        """``leaves`` (the flat output leaves: tensors and constants) laid out as eager's; ``values``: the run's
        env, which holds the bound inputs (for :class:`InputView`). A leaf whose shape or dtype is not the recorded
        one (it cannot be: a graph has one signature) is left as it is. Called with grad enabled, ``grad``'s layout
        where there is one (``grad_inputs``'s where the call passed an input that requires grad and there is one)."""
        if self.grad is not None and torch.is_grad_enabled():
            chosen = self.grad_inputs if self.grad_inputs is not None and INPUTS_REQUIRE_GRAD.get() else self.grad
            return chosen.apply(leaves, values) if chosen else list(leaves)
        out = list(leaves)
        for group in self.groups:
            ts = [out[m.leaf] for m in group]
            if not all(_fits(t, m) for t, m in zip(ts, group)) or _laid_as(ts, group):
                continue  # a local run: the graph's views share storage as eager's did
            buf = torch.empty(max(m.extent() for m in group), dtype=torch.uint8, device=ts[0].device)
            made: list[torch.Tensor] = []
            for t, m in zip(ts, group):
                if m.same is not None:
                    made.append(made[m.same])
                    continue
                v = _view(buf.untyped_storage(), m.byte, m)
                _write(v, t)
                made.append(v)
            for m, v in zip(group, made):
                out[m.leaf] = v
        for view in self.views:
            base = values.get(view.placeholder)
            if not isinstance(base, torch.Tensor) or tuple(base.stride()) != view.stride:
                continue  # unreachable by bind (it lays an input out in its captured strides); kept as copies
            start = base.storage_offset() * base.element_size()
            storage = base.untyped_storage()
            for m in view.members:
                t = out[m.leaf]
                if not _fits(t, m) or start + m.byte < 0 or start + m.extent() > storage.nbytes() \
                        or (start + m.byte) % t.element_size():
                    continue
                if _shares(t, storage) and t.storage_offset() * t.element_size() == start + m.byte \
                        and tuple(t.stride()) == m.stride:
                    continue  # a local run: already that view
                with torch.inference_mode(base.is_inference()):  # eager's view of a tensor is of its kind
                    out[m.leaf] = _view(storage, start + m.byte, m)
        for weight in self.weights:
            base = weight.base
            start = base.storage_offset() * base.element_size()
            nbytes = base.untyped_storage().nbytes()
            for m in weight.members:
                t = out[m.leaf]
                if not _fits(t, m) or start + m.byte < 0 or start + m.extent() > nbytes \
                        or (start + m.byte) % t.element_size():
                    continue
                if m.dtype == base.dtype:  # eager's view op, on the live weight, in the caller's mode
                    out[m.leaf] = base.as_strided(m.shape, m.stride, (start + m.byte) // t.element_size())
                else:  # ``w.view(torch.int32)``: over its memory, of its kind
                    with torch.inference_mode(base.is_inference()):
                        out[m.leaf] = _view(base.untyped_storage(), start + m.byte, m)
        for m in self.strides:
            t = out[m.leaf]
            if _fits(t, m) and tuple(t.stride()) != m.stride:
                buf = torch.empty(m.extent(), dtype=torch.uint8, device=t.device)
                v = _view(buf.untyped_storage(), 0, m)
                _write(v, t)
                out[m.leaf] = v
        return out


def as_callers(leaves: list, computed: Sequence[bool], inputs: Iterable) -> list:
    """``leaves`` (the flat output leaves, changed in place and returned) as eager's ``model(*inputs)`` answers them
    in the caller's autograd mode (break41 F4): outside ``torch.inference_mode`` normal tensors, inside it inference
    tensors. A graph runs under ``inference_mode`` (``Program.run``) and a server's answer is read outside it, so a
    local, fallen-back or split call answered inference tensors where eager's take an in-place write, or
    ``requires_grad_()``, outside it (whether they did on a split depended on where the planner cut), and normal
    ones under the caller's ``inference_mode``. ``computed``: per leaf, whether the graph computed it (not a constant
    or a tensor returned as is: the module's own, left alone); ``inputs``: the bound inputs, and the weights some
    output is a view of (:attr:`OutputLayout.bases`). A leaf sharing storage with one of them is left as it is:
    eager's view of an input or a weight is of its kind, as the graph's and :meth:`OutputLayout.apply`'s are.

    No copy: a tensor of the other kind over the same storage, offset, shape and strides (one object for a leaf
    that was one object twice, so the sharing :meth:`OutputLayout.apply` gave back stays): 4.7 us for one output
    changed, 1.5 us for 8 left (``bench/bench_output_kind.py``); local resnet18 / mobilenet_v2 calls at one thread
    within noise of before (41.5 -> 41.3 ms, 21.1 -> 20.6 ms medians). Running the graph under ``no_grad`` instead
    was within noise there too (41.8, 20.5 ms), but leaves a server's answer (normal tensors) to change under the
    caller's ``inference_mode`` all the same, and the UE's part of a split to run so as well."""
    inference = torch.is_inference_mode_enabled()
    made: dict[int, torch.Tensor] = {}
    shared: set[int] | None = None
    for i, t in enumerate(leaves):
        if not computed[i] or not isinstance(t, torch.Tensor) or t.is_inference() == inference:
            continue
        hit = made.get(id(t))
        if hit is None:
            if shared is None:
                shared = {p for x in inputs if isinstance(x, torch.Tensor) and (p := _storage(x)) is not None}
            if _storage(t) in shared:
                continue
            hit = made[id(t)] = _of_mode(t)
        leaves[i] = hit
    return leaves


def _of_mode(t: torch.Tensor) -> torch.Tensor:
    """``t`` as a tensor made in the current mode (an inference tensor inside ``inference_mode``, else a normal one)
    over the same memory: a tensor made here, then ``set_`` to ``t``'s storage, offset, shape and strides (a copy
    where that cannot be)."""
    if t.layout is not torch.strided or t.is_nested or t.is_quantized or t.requires_grad:
        return t.clone()
    if t.is_conj():  # ``set_`` takes the memory, not the lazy conjugate or negation bits: given back on top
        return _of_mode(t.conj()).conj()
    if t.is_neg():
        return torch._neg_view(_of_mode(torch._neg_view(t)))
    return torch.empty(0, dtype=t.dtype, device=t.device).set_(t)


def _fits(t, m: Member) -> bool:
    return isinstance(t, torch.Tensor) and tuple(t.shape) == m.shape and t.dtype == m.dtype


def _shares(t: torch.Tensor, storage) -> bool:
    return t.untyped_storage().data_ptr() == storage.data_ptr()


def _laid_as(ts: list[torch.Tensor], group: tuple[Member, ...]) -> bool:
    """Whether ``ts`` already share one storage at ``group``'s relative offsets and strides (and objects)."""
    ptr = ts[0].untyped_storage().data_ptr()
    base = ts[0].storage_offset() * ts[0].element_size() - group[0].byte
    for i, (t, m) in enumerate(zip(ts, group)):
        if m.same is not None and t is not ts[m.same]:
            return False
        if t.untyped_storage().data_ptr() != ptr or tuple(t.stride()) != m.stride \
                or t.storage_offset() * t.element_size() - base != m.byte:
            return False
        if i and m.same is None and any(t is ts[j] for j in range(i)):
            return False  # eager had two objects there
    return True


def _view(storage, byte: int, m: Member) -> torch.Tensor:
    """The tensor ``m`` describes, at byte ``byte`` of ``storage``."""
    size = torch.empty((), dtype=m.dtype).element_size()
    return torch.empty(0, dtype=m.dtype, device=storage.device).set_(storage, byte // size, m.shape, m.stride)


def _write(v: torch.Tensor, t: torch.Tensor) -> None:
    """``t``'s values into ``v``; a stride-0 dimension (an ``expand``) is written once (its elements are one)."""
    for d in range(v.dim()):
        if v.stride(d) == 0 and v.shape[d] > 1:
            v, t = v.narrow(d, 0, 1), t.narrow(d, 0, 1)
    with torch.no_grad():
        v.copy_(t)


def _member(e: torch.Tensor, leaf: int, byte: int, same: int | None = None) -> Member:
    return Member(leaf, byte, tuple(e.shape), tuple(e.stride()), e.dtype, same)


def _storage(t: torch.Tensor) -> int | None:
    """The data pointer of ``t``'s storage, None for one that holds nothing or has none (meta, sparse)."""
    if t.layout is not torch.strided or t.is_nested or t.numel() == 0:
        return None
    try:
        st = t.untyped_storage()
    except (RuntimeError, NotImplementedError):
        return None
    return st.data_ptr() if st.nbytes() > 0 else None


def eager_layout(eager: Sequence, graph: Sequence, inputs: Sequence, in_leaves: Sequence[dict],
                 label: str = "model", weights: Iterable = ()) -> OutputLayout | None:
    """What eager's flat output leaves ``eager`` look like in memory where the captured graph's (``graph``, the same
    count, shapes and dtypes: checked before) differ in strides, or where they share storage with each other, with
    an input (``inputs``: the flat example input leaves, ``in_leaves`` their ``IOSpec`` entries) or with a weight
    (``weights``: the module's own tensors, the first of a storage kept; a leaf the graph answers as eager's very
    object or as one of ``weights``, a weight returned as is, is no member: eager's leaves may be detached copies).
    None when nothing is to be done (most models: no copy, no cost at run time)."""
    by_storage: dict[int, list[int]] = {}
    for i, e in enumerate(eager):
        if isinstance(e, torch.Tensor) and (p := _storage(e)) is not None:
            by_storage.setdefault(p, []).append(i)
    in_storage: dict[int, int] = {}
    for k, (x, leaf) in enumerate(zip(inputs, in_leaves)):
        if isinstance(x, torch.Tensor) and "t" in leaf and (p := _storage(x)) is not None:
            in_storage.setdefault(p, k)  # inputs sharing storage (the same tensor twice): the first
    w_storage: dict[int, torch.Tensor] = {}
    own: set[int] = set()
    for w in weights:
        if isinstance(w, torch.Tensor) and (p := _storage(w)) is not None:
            w_storage.setdefault(p, w)
            own.add(id(w))
    grouped: set[int] = set()
    groups: list[tuple[Member, ...]] = []
    views: list[InputView] = []
    of_weights: list[WeightView] = []
    for p, idx in by_storage.items():
        if p in w_storage and p not in in_storage:
            w = w_storage[p]
            start = w.storage_offset() * w.element_size()
            members = tuple(_member(eager[i], i, eager[i].storage_offset() * eager[i].element_size() - start)
                            for i in idx if graph[i] is not eager[i] and id(graph[i]) not in own)
            if members:
                of_weights.append(WeightView(w, members))
            grouped.update(idx)
        elif p in in_storage:
            x = inputs[in_storage[p]]
            start = x.storage_offset() * x.element_size()
            members = tuple(_member(eager[i], i, eager[i].storage_offset() * eager[i].element_size() - start)
                            for i in idx)
            views.append(InputView(in_leaves[in_storage[p]]["t"], tuple(x.stride()), members))
            grouped.update(idx)
        elif len(idx) > 1:
            lowest = min(eager[i].storage_offset() * eager[i].element_size() for i in idx)
            idx = sorted(idx, key=lambda i: eager[i].storage_offset() * eager[i].element_size())
            members = []
            for j, i in enumerate(idx):
                same = next((k for k in range(j) if eager[idx[k]] is eager[i]), None)
                members.append(_member(eager[i], i, eager[i].storage_offset() * eager[i].element_size() - lowest,
                                       same))
            groups.append(tuple(members))
            grouped.update(idx)
    strides = tuple(_member(e, i, 0) for i, (e, g) in enumerate(zip(eager, graph))
                    if i not in grouped and isinstance(e, torch.Tensor) and isinstance(g, torch.Tensor)
                    and _storage(e) is not None and tuple(e.stride()) != tuple(g.stride()))
    layout = OutputLayout(strides, tuple(groups), tuple(views), weights=tuple(of_weights))
    if not layout:
        return None
    log.debug("%s: eager's output layout kept: %d outputs restrided, %d groups sharing storage, %d views of inputs, "
              "%d of weights", label, len(strides), len(groups), len(views), len(of_weights))
    return layout
