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

A rule refuses with a ShapeError naming the argument, its shape and the one expected (the slice is then refused:
INVALID_ARGUMENT). Every graph PyTorch's own modules produce passes (``tests/test_kernel_shapes.py`` checks the
rules against real ``nn.LSTM``/``GRU``/``RNN`` parameter lists, batch norms and weight norms, and that each
changed shape is refused).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from modelgraph.allowlist import argument_binder
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
        if not isinstance(layers, int) or layers < 1:
            raise ShapeError(f"num_layers {layers!r}; at least 1")
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


_RULES: dict[str, Callable[[dict[str, Any]], None]] = {
    "aten._native_batch_norm_legit_no_training.default": _batch_norm,
    "aten.native_batch_norm.default": _batch_norm,
    "aten.batch_norm.default": _batch_norm,
    **{t: _rnn(t) for t in _GATES},
    "aten._weight_norm.default": _weight_norm,
}
SHAPE_CHECKED: frozenset[str] = frozenset(_RULES)
"""The allowlisted ops with a shape rule here."""


def checked_shapes(target: str, fn: Callable[..., Any], label: str = "") -> Callable[..., Any]:
    """``fn`` (the op ``target``'s kernel, run on meta tensors while a slice is validated) with the op's shape
    rule checked first (module docstring); ``fn`` itself for an op without one. Raises ShapeError, its message
    starting with the op's ``label`` (its name in the slice) and target."""
    rule = _RULES.get(target)
    if rule is None:
        return fn
    bind = argument_binder(target)

    def run(*args: Any, **kwargs: Any) -> Any:
        try:
            rule(bind(args, kwargs))
        except ShapeError as e:
            raise ShapeError(f"op {label!r} ({target}): {e}") from None
        except (AttributeError, IndexError, TypeError) as e:  # an argument of another kind than the schema's
            raise ShapeError(f"op {label!r} ({target}): arguments not as the kernel takes them "
                             f"({type(e).__name__}: {e})") from None
        return fn(*args, **kwargs)

    return run
