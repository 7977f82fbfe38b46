"""What a client's op is checked for, or kept from, at run time: its index tensors (``modelgraph.index_bounds``),
integer division's overflow trap, the running statistics a training-mode batch norm writes, and the whole storage a
functional copy / scatter would clone (``COMPACT_SELF``, break31 F2).

Why (session 28, break28 from outside, each against a ``coinfer-edge serve`` process):

- ``div.Tensor_mode`` with ``rounding_mode="trunc"`` on ``int64`` (``int32``) ``MIN / -1`` is a CPU trap
  (SIGFPE): two ``full`` factories in a stranger's ProfileGraph killed the server.
- ``native_batch_norm`` / ``batch_norm`` with ``training=True`` and ``instance_norm`` (either mode) update
  ``running_mean`` / ``running_var`` in place, and a session's weights are views of the store's blob shared
  by every tenant that uploaded the same bytes: another tenant's next request read the written values (and the
  blob no longer matched its sha256). Their outputs do not depend on the running statistics in that mode, so
  the op runs on copies of them: the same outputs, nothing written.

:func:`guarded` composes the three for one op; ``modelgraph.execute.Program`` applies it to every op of a
client's (untrusted) program.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from modelgraph.allowlist import argument_binder
from modelgraph.index_bounds import checked as checked_index
from modelgraph.tensors import dense_layout


def _division_trap(a: dict[str, Any]) -> None:
    """Refuse an integer ``MIN / -1`` truncating division (IndexError's sibling: ArithmeticError)."""
    x, y = a["self"], a["other"]
    if a.get("rounding_mode") != "trunc" or not isinstance(x, torch.Tensor):
        return
    dtype = torch.result_type(x, y)
    if dtype.is_floating_point or dtype.is_complex or dtype == torch.bool:
        return
    mn = torch.iinfo(dtype).min
    if x.device.type == "meta" or (isinstance(y, torch.Tensor) and y.device.type == "meta"):
        return
    # compared as the kernel divides: both cast to the result type first (a 0-dim int64 2**31 does not widen an
    # int32 division and wraps to its MIN there: break28b N1)
    xc = x.to(dtype)
    yc = y.to(dtype) if isinstance(y, torch.Tensor) else torch.tensor(y).to(dtype)
    if bool(((xc == mn) & (yc == -1)).any()):
        raise ArithmeticError(f"integer overflow: {mn} / -1 in {dtype} (the division traps on this CPU)")


_RUNNING_STATS = {
    "aten.native_batch_norm.default": ("training", ("running_mean", "running_var")),
    "aten.batch_norm.default": ("training", ("running_mean", "running_var")),
    "aten.instance_norm.default": (None, ("running_mean", "running_var")),  # it writes them in either mode (the
}  # same values with use_input_stats false, break28b L1: copied all the same)


def _stats_copied(target: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` with the running statistics it would write (in the mode that writes them) passed as copies, every
    argument by name (``argument_binder``)."""
    mode, names = _RUNNING_STATS[target]
    bind = argument_binder(target)

    def run(*args: Any, **kwargs: Any) -> Any:
        bound = bind(args, kwargs)
        if mode is not None and not bound.get(mode):
            return fn(*args, **kwargs)
        for n in names:
            if isinstance(bound.get(n), torch.Tensor):
                bound[n] = bound[n].clone()
        return fn(**bound)

    return run


_DENSE_ARGUMENTS = {
    **dict.fromkeys(("aten.embedding_bag.default", "aten.embedding_bag.padding_idx", "aten._embedding_bag.default"),
                    ("indices", "offsets", "per_sample_weights")),
    "aten.native_group_norm.default": ("weight", "bias"),
    "aten.group_norm.default": ("weight", "bias"),
    "aten.native_layer_norm.default": ("weight", "bias"),
    "aten.layer_norm.default": ("weight", "bias"),
    "aten.rms_norm.default": ("weight",),
    "aten._native_batch_norm_legit_no_training.default": ("weight", "bias", "running_mean", "running_var"),
    "aten.native_batch_norm.default": ("weight", "bias", "running_mean", "running_var"),
    "aten.batch_norm.default": ("weight", "bias", "running_mean", "running_var"),
    "aten.instance_norm.default": ("weight", "bias", "running_mean", "running_var"),
    "aten._weight_norm.default": ("v", "g"),
}
"""Arguments passed to the kernel contiguous, before the index check sees them (so it checks what the kernel reads).
break29: ``_embedding_bag``'s CPU kernel reads its indices and offsets (H2), ``native_group_norm``'s its weight and
bias (H3), as dense arrays whatever their strides: a stride-0 ``expand`` of a 1-element tensor made them read past
its storage (heap pointers in the error; heap floats scaling channels 1..C-1). The other embedding bags and norms
are listed for the same reason (raw pointers too; the fuzz found no read through them)."""


def _dense(target: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    names, bind = _DENSE_ARGUMENTS[target], argument_binder(target)

    def run(*args: Any, **kwargs: Any) -> Any:
        bound = bind(args, kwargs)
        changed = False
        for n in names:
            t = bound.get(n)
            if isinstance(t, torch.Tensor) and not t.is_contiguous():
                bound[n] = t.contiguous()
                changed = True
        return fn(**bound) if changed else fn(*args, **kwargs)

    return run


COMPACT_SELF = frozenset({"aten.copy.default", "aten.slice_scatter.default", "aten.select_scatter.default"})
"""Ops run into a storage of their output's own size when their ``self`` is a view of more (:func:`_compact_self`).

break31 F2: ATen's functional ``copy`` / ``slice_scatter`` / ``select_scatter`` start from
``clone_preserve_strides(self)``, which clones ``self``'s WHOLE storage and returns a view into the clone (with
``self``'s strides and storage offset): ``copy(narrow(x, 0, N - 1, 1), z)`` of a 128 MiB ``x`` allocated and copied
128 MiB for a declared 4-byte output, and kept them alive while the output lived (a 2.9 KB ProfileGraph spec took the
server from 459 to 1995 MiB RSS under ``--memory-mb 1024``; 300 chained copies held the compute worker 16.9 s). The
same holds for a contiguous narrow view (contiguous, but its storage is the base's), a view with gaps, and a weight (a
view of the store's blob). ``diagonal_scatter`` / ``as_strided_scatter`` share the helper and are not allowlisted."""


def _own_layout(t: torch.Tensor) -> torch.Tensor:
    """An uninitialised tensor like ``t`` in a storage of exactly its elements.

    ``t``'s strides when ``t`` is dense (every element once, no gaps: a narrow of dim 0, a permutation), so the op's
    output has eager's strides (only its storage offset, 0 here, differs; no allowlisted op reads offsets or strides
    as values: no ``as_strided`` / ``set_``); ``empty_like``'s layout when ``t`` repeats elements (a stride-0
    ``expand``: what ATen clones such a ``self`` to itself); a dense layout in ``t``'s dimension order when ``t`` has
    gaps (eager keeps the gaps, in a clone of the whole storage; the same iteration order for a later reduction)."""
    if dense_layout(t.shape, t.stride()) or any(st == 0 and n > 1 for n, st in zip(t.shape, t.stride(), strict=True)):
        return torch.empty_like(t)
    order = sorted(range(t.dim()), key=lambda d: -t.stride(d))  # outermost first
    return torch.empty_permuted(t.shape, order, dtype=t.dtype, device=t.device)


def _compact_self(target: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` (an op of ``COMPACT_SELF``), or, when its ``self``'s storage holds more bytes than ``self``'s elements,
    what ATen computes (``copy``, ``slice_scatter``, ``select_scatter`` in ``TensorShape.cpp`` / ``Copy.cpp``: a copy
    of ``self``, its region written with ``src``) with the copy in :func:`_own_layout`: the op allocates its declared
    output and nothing more (``copy`` reads nothing of ``self``: ``src`` overwrites every element)."""
    bind = argument_binder(target)
    kind = target.split(".")[1]

    def run(*args: Any, **kwargs: Any) -> Any:
        a = bind(args, kwargs)
        x, src = a["self"], a["src"]
        if not isinstance(x, torch.Tensor) or x.untyped_storage().nbytes() <= x.numel() * x.element_size():
            return fn(*args, **kwargs)
        out = _own_layout(x)
        if kind == "copy":
            return out.copy_(src, non_blocking=a["non_blocking"])
        out.copy_(x)
        if kind == "select_scatter":
            part = torch.ops.aten.select.int(out, a["dim"], a["index"])
        else:
            part = torch.ops.aten.slice.Tensor(out, a["dim"], a["start"], a["end"], a["step"])
        if part.shape != src.shape:  # (ATen's own check and words)
            raise RuntimeError(f"expected src to have a size equal to the slice of self. src size = {list(src.shape)}"
                               f", slice size = {list(part.shape)}")
        part.copy_(src)
        return out

    return run


def guarded(target: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` (the kernel of the allowlisted op ``target``) as a client's program runs it: its index tensors
    checked (``index_bounds.checked``: IndexError), an integer ``MIN / -1`` truncating division refused
    (ArithmeticError), the arguments kernels read as dense arrays passed contiguous (``_DENSE_ARGUMENTS``), the running
    statistics a training-mode norm would write passed as copies, an op that would clone its ``self``'s whole storage
    run into its output's own size (``COMPACT_SELF``). The op names the error for the client (``execute._op_error``:
    INVALID_ARGUMENT at the server). ``fn`` itself for other ops."""
    fn = checked_index(target, fn)
    if target in _DENSE_ARGUMENTS:  # (outside the index check: it sees the contiguous tensors)
        fn = _dense(target, fn)
    if target in _RUNNING_STATS:
        fn = _stats_copied(target, fn)
    if target in COMPACT_SELF:
        fn = _compact_self(target, fn)
    if target == "aten.div.Tensor_mode":
        bind, inner = argument_binder(target), fn

        def fn(*args: Any, **kwargs: Any) -> Any:
            _division_trap(bind(args, kwargs))
            return inner(*args, **kwargs)

    return fn
