"""Shape rules that some allowlisted ops' CPU kernels assume of their arguments and neither they nor their meta
kernels check: checked on a client's slice while it is validated, before the meta kernel runs.

Why (session 28, a differential run of each op with freed memory filled by two different canaries, then on meta):

- ``_native_batch_norm_legit_no_training`` and ``native_batch_norm`` read ``C = input.size(1)`` values of their
  weight, bias and running statistics whatever their size: a 1-element ``running_mean`` for 4 channels answered
  values read from outside it (the composite ``batch_norm`` checks; the exported graphs use the native ones).
- ``lstm``, ``gru``, ``rnn_tanh``, ``rnn_relu`` take their parameters as a list and trust its shapes: an LSTM whose
  weights were 2 x 3 and 2 x 4 for a hidden size of 4 faulted the server's *meta* kernel (SIGSEGV while validating
  a ProfileGraph or DefineSlice) and, on CPU, answered from memory outside them.
- ``_weight_norm`` along dim 0 or the last dim (its fused kernel) reads ``v.size(dim)`` values of ``g``.

Then from outside (break28, break28b, break28c: fresh testers against a server process): ``avg_pool2d/3d`` of an
integer MIN with ``divisor_override=-1`` traps (SIGFPE); the 2-D upsamplings with a scale far from the one their
sizes give map to coordinates outside the input (SIGSEGV, or heap bytes back); the 5-D ``grid_sampler`` with an
unknown mode writes nothing into its output; ``unbind`` / ``split`` / ``chunk`` whose pieces the slice does not
declare, and RNNs of tens of thousands of layers, held validation for tens of seconds and gigabytes; a bare integer
where a schema takes a dtype, memory format or layout segfaulted the meta kernel. Session 29 (break29, a fuzz of
every allowlisted op's arguments): 65,536 ``roll`` shifts held one meta run ~25 s; a convolution's stride of 2**62
wrapped in oneMKL's 32-bit parameters. Each has its rule below (``_RULES``; ``_enum_arguments`` for every op).

A rule refuses with a ShapeError naming the argument, its shape and the one expected (the slice is then refused:
INVALID_ARGUMENT). Every graph PyTorch's own modules produce passes (``tests/test_kernel_shapes.py`` checks the
rules against real ``nn.LSTM``/``GRU``/``RNN`` parameter lists, batch norms and weight norms, and that each
changed shape is refused).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import cache
from typing import Any

import torch

from modelgraph.allowlist import argument_binder, resolve
from modelgraph.errors import ShapeError


def _numel_is(what: str, t: Any, n: int, why: str) -> None:
    if isinstance(t, torch.Tensor) and t.numel() != n:
        raise ShapeError(f"{what} has {t.numel()} elements {list(t.shape)}; {why} needs {n}")


def _batch_norm(a: dict[str, Any]) -> None:
    x = a["input"]
    if x.dim() < 2:
        raise ShapeError(f"input of {x.dim()} dims; batch norm needs (N, C, ...)")
    c = x.shape[1]
    for name in ("weight", "bias", "running_mean", "running_var"):
        _numel_is(name, a.get(name), c, f"an input of {c} channels")


MAX_RNN_LAYERS = 256
"""Layers of one RNN op a client's slice may have: the validator runs each layer's step on meta tensors in Python, one
meta run the validation's CPU budget cannot interrupt (break28 F8: 32,768 layers held validation, one at a time
server-wide, for 92 s). PyTorch's own models use a handful."""

_GATES = {"aten.lstm.input": 4, "aten.gru.input": 3, "aten.rnn_tanh.input": 1, "aten.rnn_relu.input": 1}


def _shape_is(what: str, t: Any, shape: tuple[int, ...]) -> None:
    if not isinstance(t, torch.Tensor):
        raise ShapeError(f"{what} is not a tensor")
    if tuple(t.shape) != shape:
        raise ShapeError(f"{what} is {list(t.shape)}; expected {list(shape)}")


def _rnn(target: str) -> Callable[[dict[str, Any]], None]:
    gates = _GATES[target]

    def check(a: dict[str, Any]) -> None:
        x, params, layers = a["input"], list(a["params"]), a["num_layers"]
        dirs = 2 if a["bidirectional"] else 1
        if x.dim() not in (2, 3):
            raise ShapeError(f"input of {x.dim()} dims; an RNN needs (T, N, I), (N, T, I) or (T, I)")
        if not isinstance(layers, int) or not 1 <= layers <= MAX_RNN_LAYERS:
            raise ShapeError(f"num_layers {layers!r}; 1 to {MAX_RNN_LAYERS} (validation steps through every layer)")
        if gates == 4:
            hx = list(a["hx"])
            if len(hx) != 2:
                raise ShapeError(f"an LSTM's hx is (h0, c0); got {len(hx)} tensors")
            h0, c0 = hx
            hidden, out = c0.shape[-1], h0.shape[-1]  # out < hidden: a projection (proj_size)
            proj = out != hidden
        else:
            h0, c0 = a["hx"], None
            hidden = out = h0.shape[-1]
            proj = False
        lead = (layers * dirs,) + ((x.shape[0 if a["batch_first"] else 1],) if x.dim() == 3 else ())
        _shape_is("hx[0]" if gates == 4 else "hx", h0, (*lead, out))
        if c0 is not None:
            _shape_is("hx[1]", c0, (*lead, hidden))
        per = 2 + (2 if a["has_biases"] else 0) + (1 if proj else 0)
        if len(params) != layers * dirs * per:
            raise ShapeError(f"{len(params)} parameters; {layers} layers x {dirs} directions need "
                             f"{layers * dirs * per}")
        i = 0
        for layer in range(layers):
            width = x.shape[-1] if layer == 0 else out * dirs
            for _ in range(dirs):
                want = [(gates * hidden, width), (gates * hidden, out)]
                if a["has_biases"]:
                    want += [(gates * hidden,), (gates * hidden,)]
                if proj:
                    want.append((out, hidden))
                for shape in want:
                    _shape_is(f"params[{i}] (layer {layer})", params[i], shape)
                    i += 1

    return check


def _weight_norm(a: dict[str, Any]) -> None:
    v, g, dim = a["v"], a["g"], a["dim"]
    if isinstance(v, torch.Tensor) and (dim == 0 or dim == v.dim() - 1):  # the fused kernel's cases
        _numel_is("g", g, v.shape[dim], f"a weight norm along dim {dim} of {list(v.shape)}")


def _avg_pool(a: dict[str, Any]) -> None:
    x, d = a["self"], a.get("divisor_override")
    if d == -1 and isinstance(x, torch.Tensor) and not (x.dtype.is_floating_point or x.dtype.is_complex):
        raise ShapeError(f"divisor_override -1 on {x.dtype}: a window summing to the type's minimum traps the CPU "
                         f"(integer overflow)")


def _upsample_scales(a: dict[str, Any]) -> None:
    """A 2-D upsampling's explicit scales must be the ones its sizes came from, ``size_out = floor(size_in x scale)``
    (what F.interpolate passes; with ``size=`` or a recomputed scale it passes none). The kernels map output to
    input coordinates by 1 / scale: uint8 bicubic / bilinear with a 1e-20 scale segfaulted the server (break28 F3,
    and to an output of 1 past the first rule, break28b N2) or answered heap bytes; uint8 nearest with 1e-19 and
    float64 bicubic with 1e-30 segfaulted it too (break28c P1, P2)."""
    x = a["self"]
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        return
    for i, key in ((2, "scales_h"), (3, "scales_w")):
        scale = a.get(key)
        if scale is None:
            continue
        size_in, size_out = x.shape[i], a["output_size"][i - 2]
        if not (isinstance(scale, float | int) and size_out - 1e-6 <= size_in * scale < size_out + 1 + 1e-6):
            raise ShapeError(f"{key} {scale!r} for {size_in} -> {size_out}: an upsampling's scale must be the one its "
                             f"sizes give (size_out = floor(size_in x scale))")


def _grid_modes(a: dict[str, Any]) -> None:
    """grid_sampler's modes: interpolation 0-2 (bilinear, nearest, bicubic), padding 0-2 (zeros, border,
    reflection). The 4-D meta kernel refuses others; the 5-D path (``grid_sampler.default``) did not, and its CPU
    kernel then wrote nothing into its output: heap bytes back to the client (break28c P3)."""
    for key in ("interpolation_mode", "padding_mode"):
        v = a.get(key)
        if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v <= 2:
            raise ShapeError(f"{key} {v!r}; 0, 1 or 2")


def _pieces(a: dict[str, Any], target: str) -> int:
    x, dim = a["self"], a.get("dim", 0)
    n = x.shape[dim] if x.dim() else 1
    if target == "aten.unbind.int":
        return n
    if target == "aten.chunk.default":  # as torch.chunk: pieces of ceil(n / chunks); an empty dim gives chunks
        chunks = a["chunks"]
        if chunks <= 0:
            return 1  # the kernel refuses it
        return chunks if n == 0 else -(-n // -(-n // chunks))
    size = a["split_size"]
    return -(-n // size) if size > 0 and n > 0 else 1


def _split_pieces(target: str) -> Callable[[dict[str, Any]], None]:
    def check(a: dict[str, Any]) -> None:
        declared = a.get(_DECLARED)
        if declared is None or not isinstance(a["self"], torch.Tensor):
            return
        if not -max(a["self"].dim(), 1) <= a.get("dim", 0) < max(a["self"].dim(), 1):
            return  # the kernel refuses it
        n = _pieces(a, target)
        if n > declared:
            raise ShapeError(f"makes {n} tensors, the slice declares {declared} (the meta kernel would build each)")

    return check


MAX_ROLL_DIMS = 64
"""The most shifts (and dims) one ``roll`` takes: far above a real tensor's rank, far below what hurts. break29 H4:
65,536 shifts held one meta run ~25 s in torch's Python decomposition (beyond the slice CPU budget's reach, which
is checked between meta runs), and the CPU kernel faults at 16,384 (its recursion)."""

_INT32_MAX = 2**31 - 1
_WINDOW_ARGUMENTS = ("stride", "padding", "dilation", "output_padding", "kernel_size")


def _roll(a: dict[str, Any]) -> None:
    for name in ("shifts", "dims"):
        v = a.get(name)
        if isinstance(v, list | tuple) and len(v) > MAX_ROLL_DIMS:
            raise ShapeError(f"{name} has {len(v)} values, at most {MAX_ROLL_DIMS}")


def _window(a: dict[str, Any]) -> None:
    """Convolutions' and poolings' window arguments fit the 32-bit integers some CPU kernels take them as. break29
    H5: ``conv3d`` with a stride of 2**62 made oneMKL refuse a parameter and answer the bias alone (the convolution
    dropped, its inputs read at a wrapped stride)."""
    for name in _WINDOW_ARGUMENTS:
        v = a.get(name)
        for x in (v if isinstance(v, list | tuple) else (v,)):
            if isinstance(x, int) and not -_INT32_MAX <= x <= _INT32_MAX:
                raise ShapeError(f"{name} holds {x}, beyond the kernels' 32-bit range")


_WINDOWED = ("aten.conv1d.default", "aten.conv2d.default", "aten.conv3d.default", "aten.convolution.default",
             "aten.conv_transpose1d.default", "aten.conv_transpose2d.input", "aten.max_pool1d.default",
             "aten.max_pool2d.default", "aten.max_pool2d_with_indices.default", "aten.max_pool3d.default",
             "aten.avg_pool1d.default")


def _avg_pool_window(a: dict[str, Any]) -> None:
    _window(a)
    _avg_pool(a)


_DECLARED = "__declared_outputs__"

_RULES: dict[str, Callable[[dict[str, Any]], None]] = {
    "aten._native_batch_norm_legit_no_training.default": _batch_norm,
    "aten.native_batch_norm.default": _batch_norm,
    "aten.batch_norm.default": _batch_norm,
    **{t: _rnn(t) for t in _GATES},
    "aten._weight_norm.default": _weight_norm,
    "aten.avg_pool2d.default": _avg_pool_window,
    "aten.avg_pool3d.default": _avg_pool_window,
    "aten.roll.default": _roll,
    **dict.fromkeys(_WINDOWED, _window),
    "aten.upsample_bicubic2d.default": _upsample_scales,
    "aten.upsample_bilinear2d.default": _upsample_scales,
    "aten.upsample_nearest2d.default": _upsample_scales,
    "aten.grid_sampler.default": _grid_modes,
    "aten.grid_sampler_2d.default": _grid_modes,
    **{t: _split_pieces(t) for t in ("aten.unbind.int", "aten.split.Tensor", "aten.chunk.default")},
}
SHAPE_CHECKED: frozenset[str] = frozenset(_RULES)
"""The allowlisted ops with a shape rule here."""


_ENUMS = {"ScalarType": torch.dtype, "MemoryFormat": torch.memory_format, "Layout": torch.layout}


@cache
def _enum_arguments(target: str) -> tuple[tuple[str, type], ...]:
    """(name, Python type) of ``target``'s dtype / memory format / layout arguments: a slice must give each as its
    encoded value (argcodec's ``{"dtype": ...}``), never a bare integer, which ATen reads as the enum's number
    (break28b N4: ``to.dtype(x, -1)``, ``_to_copy(dtype=-1)``, ``softmax.int(x, 0, -1)``, ``full_like(dtype=-1)`` and
    ``clone(memory_format=-1)`` segfaulted the meta kernel while the server validated the slice; -2 hung it)."""
    out = []
    for arg in resolve(target)._schema.arguments:
        real = str(arg.real_type).removeprefix("Optional[").removesuffix("]")
        if real in _ENUMS:
            out.append((arg.name, _ENUMS[real]))
    return tuple(out)


def _check_enums(enums: tuple[tuple[str, type], ...], a: dict[str, Any]) -> None:
    for name, kind in enums:
        v = a.get(name)
        if v is not None and not isinstance(v, kind):
            raise ShapeError(f"{name} {v!r} is not a {kind.__name__} (a slice encodes it, e.g. "
                             f'{{"dtype": "float32"}})'[:300])


def checked_shapes(target: str, fn: Callable[..., Any], label: str = "",
                   declared_outputs: int | None = None) -> Callable[..., Any]:
    """``fn`` (the op ``target``'s kernel, run on meta tensors while a slice is validated) with the op's shape
    rule and its dtype / memory format / layout arguments' kinds checked first (module docstring); ``fn`` itself
    for an op with neither. ``declared_outputs``: how many
    tensors the slice declares the op returns (unbind, split and chunk may not make more). Raises ShapeError, its
    message starting with the op's ``label`` (its name in the slice) and target."""
    rule, enums = _RULES.get(target), _enum_arguments(target)
    if rule is None and not enums:
        return fn
    bind = argument_binder(target)

    def run(*args: Any, **kwargs: Any) -> Any:
        try:
            bound = bind(args, kwargs)
            _check_enums(enums, bound)
            if rule is not None:
                bound[_DECLARED] = declared_outputs
                rule(bound)
        except ShapeError as e:
            raise ShapeError(f"op {label!r} ({target}): {e}") from None
        except (AttributeError, IndexError, TypeError) as e:  # an argument of another kind than the schema's
            raise ShapeError(f"op {label!r} ({target}): arguments not as the kernel takes them "
                             f"({type(e).__name__}: {e})") from None
        return fn(*args, **kwargs)

    return run
