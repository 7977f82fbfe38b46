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

Left (documented in the README): an input bound as a copy (another layout than the captured one: ``bind`` copies
it) is viewed in that copy, not in the caller's tensor, as local runs always did; an output that is the input itself
(``return x``) is a tensor sharing the input's storage, not the caller's object (``bind`` hands the graph an alias);
an output sharing storage with a weight or with an intermediate tensor no output returns keeps its own storage
(values, shape and strides as eager's);
where some output's strides differ, eager runs once more with grad (``OutputLayout.grad``: MHA's fused path runs only
without grad), for the ``requires_grad`` flags the module's parameters had at capture.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

log = logging.getLogger(__name__)


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
class OutputLayout:
    """What :func:`eager_layout` found; :meth:`apply` gives it back. Empty parts are empty tuples."""

    strides: tuple[Member, ...] = ()
    """Outputs sharing no storage whose graph strides differ from eager's (``byte`` 0)."""
    groups: tuple[tuple[Member, ...], ...] = ()
    """Output leaves sharing one storage in eager, the lowest first (``byte`` 0)."""
    views: tuple[InputView, ...] = ()
    grad: OutputLayout | None = None
    """Eager's layout with grad enabled where the check's eager run had none and found strides to change (eager
    ran once more with grad: MHA's fused path runs only without grad, the math path with it answers the graph's
    strides), given back to a call made with grad enabled; None: the same as this one."""

    def __bool__(self) -> bool:
        return bool(self.strides or self.groups or self.views)

    def apply(self, leaves: Sequence, values: Mapping[str, torch.Tensor]) -> list:
        """``leaves`` (the flat output leaves: tensors and constants) laid out as eager's; ``values``: the run's
        env, which holds the bound inputs (for :class:`InputView`). A leaf whose shape or dtype is not the recorded
        one (it cannot be: a graph has one signature) is left as it is. Called with grad enabled, ``grad``'s layout
        where there is one."""
        if self.grad is not None and torch.is_grad_enabled():
            return self.grad.apply(leaves, values) if self.grad else list(leaves)
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
                out[m.leaf] = _view(storage, start + m.byte, m)
        for m in self.strides:
            t = out[m.leaf]
            if _fits(t, m) and tuple(t.stride()) != m.stride:
                buf = torch.empty(m.extent(), dtype=torch.uint8, device=t.device)
                v = _view(buf.untyped_storage(), 0, m)
                _write(v, t)
                out[m.leaf] = v
        return out


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
                 label: str = "model") -> OutputLayout | None:
    """What eager's flat output leaves ``eager`` look like in memory where the captured graph's (``graph``, the same
    count, shapes and dtypes: checked before) differ in strides, or where they share storage with each other or
    with an input (``inputs``: the flat example input leaves, ``in_leaves`` their ``IOSpec`` entries). None when
    nothing is to be done (most models: no copy, no cost at run time)."""
    by_storage: dict[int, list[int]] = {}
    for i, e in enumerate(eager):
        if isinstance(e, torch.Tensor) and (p := _storage(e)) is not None:
            by_storage.setdefault(p, []).append(i)
    in_storage: dict[int, int] = {}
    for k, (x, leaf) in enumerate(zip(inputs, in_leaves)):
        if isinstance(x, torch.Tensor) and "t" in leaf and (p := _storage(x)) is not None:
            in_storage.setdefault(p, k)  # inputs sharing storage (the same tensor twice): the first
    grouped: set[int] = set()
    groups: list[tuple[Member, ...]] = []
    views: list[InputView] = []
    for p, idx in by_storage.items():
        if p in in_storage:
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
    layout = OutputLayout(strides, tuple(groups), tuple(views))
    if not layout:
        return None
    log.debug("%s: eager's output layout kept: %d outputs restrided, %d groups sharing storage, %d views of inputs",
              label, len(strides), len(groups), len(views))
    return layout
