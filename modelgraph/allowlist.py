"""The explicit list of ATen overloads a server will run for a client.

An allowlist, not a denylist: ATen has ops that touch the file system (``from_file``), allocate
unbounded memory from scalars, or mutate their inputs. Every entry here is a pure tensor function
of its arguments. Names are resolved against ``torch.ops.aten`` through this table only.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from functools import cache
from typing import Any

import torch

from modelgraph.errors import OpNotAllowedError

_ALLOWED_TEXT = """
conv1d.default conv2d.default conv3d.default conv_transpose1d.default conv_transpose2d.input
convolution.default linear.default matmul.default mm.default bmm.default addmm.default baddbmm.default
_native_batch_norm_legit_no_training.default batch_norm.default native_batch_norm.default
layer_norm.default native_layer_norm.default group_norm.default native_group_norm.default
instance_norm.default rms_norm.default
relu.default relu6.default leaky_relu.default hardtanh.default hardswish.default hardsigmoid.default
silu.default gelu.default sigmoid.default tanh.default elu.default softplus.default mish.default
prelu.default _prelu_kernel.default
softmax.int _softmax.default log_softmax.int _log_softmax.default
add.Tensor add.Scalar sub.Tensor sub.Scalar rsub.Scalar rsub.Tensor mul.Tensor mul.Scalar
div.Tensor div.Scalar div.Tensor_mode neg.default exp.default log.default sqrt.default rsqrt.default
pow.Tensor_Scalar pow.Tensor_Tensor abs.default erf.default reciprocal.default maximum.default
minimum.default clamp.default clamp_min.default clamp_max.default where.self masked_fill.Scalar
eq.Scalar eq.Tensor ne.Scalar lt.Scalar gt.Scalar le.Scalar ge.Scalar logical_not.default
mean.dim mean.default sum.dim_IntList sum.default amax.default amin.default max.dim argmax.default
var.correction std.correction cumsum.default
max_pool1d.default max_pool2d.default max_pool2d_with_indices.default max_pool3d.default
avg_pool1d.default avg_pool2d.default avg_pool3d.default adaptive_avg_pool1d.default
adaptive_avg_pool2d.default adaptive_max_pool2d.default
upsample_nearest2d.vec upsample_bilinear2d.vec upsample_nearest2d.default upsample_bilinear2d.default
pixel_shuffle.default pixel_unshuffle.default channel_shuffle.default
cat.default stack.default view.default reshape.default _unsafe_view.default flatten.using_ints
unflatten.int permute.default transpose.int t.default contiguous.default clone.default expand.default
unsqueeze.default squeeze.dim squeeze.dims squeeze.default select.int slice.Tensor narrow.default
split.Tensor split_with_sizes.default unbind.int chunk.default index_select.default gather.default
roll.default flip.default repeat.default tile.default alias.default detach.default lift_fresh_copy.default
constant_pad_nd.default pad.default embedding.default _to_copy.default to.dtype type_as.default
scaled_dot_product_attention.default dropout.default native_dropout.default feature_dropout.default
zeros_like.default ones_like.default full_like.default zeros.default ones.default full.default
arange.default arange.start arange.start_step scalar_tensor.default
topk.default sort.default sort.stable argsort.default argsort.stable
slice_scatter.default select_scatter.default index_put.default copy.default fill.Scalar fill.Tensor
index.Tensor scatter.src scatter.value scatter_add.default masked_fill.Tensor
ne.Tensor lt.Tensor gt.Tensor le.Tensor ge.Tensor logical_and.default logical_or.default
lstm.input gru.input rnn_tanh.input rnn_relu.input
upsample_bicubic2d.vec upsample_bicubic2d.default grid_sampler.default grid_sampler_2d.default
embedding_bag.padding_idx embedding_bag.default _embedding_bag.default
new_zeros.default new_ones.default new_full.default zero.default tril.default triu.default _weight_norm.default
bitwise_and.Tensor bitwise_or.Tensor bitwise_xor.Tensor bitwise_not.default __and__.Tensor __or__.Tensor __xor__.Tensor
bitwise_and.Scalar bitwise_or.Scalar bitwise_xor.Scalar __and__.Scalar __or__.Scalar __xor__.Scalar
"""
# The block after scalar_tensor (issue 10): what users' models commonly hit. topk/sort/argsort have fixed
# output sizes (k is an argument); slice_scatter/select_scatter/index_put/copy/fill are what
# functionalisation makes of slice writes (``y[:, 0] = 0``, ``y[idx] = v``) and return new tensors;
# index.Tensor with a boolean mask has a data-dependent size (capture refuses it; a slice using it fails
# shape propagation on meta tensors and is rejected); the RNN ``.input`` forms take their weights as a
# list of weight refs; grid_sampler's coordinates are clamped or zero-padded by its kernel. The ops that read
# index tensors (gather, scatter, index_select, embedding, embedding_bag, index, index_put) are not safe on
# their kernels' checks alone: embedding_bag's CPU kernel reads outside its indices on negative or decreasing
# offsets (session 28: a segfault of the server), and on CUDA each out-of-range index is a device-side assert;
# a client's program checks their values first (``modelgraph.index_bounds``).
# The last line (session 17, newuser17): each pinned a user's model to the UE from its first use on (an LSTM's
# ``h0 = x.new_zeros(...)`` pinned the whole model; ``.zero_()`` on a view, a causal mask's ``tril``, and
# ``parametrizations.weight_norm``'s ``_weight_norm`` on a weight pinned every op after them). Pure functions of
# their arguments: the ``new_*`` factories take their size from arguments and their dtype/device from a tensor
# input, so the server's meta validation runs them on meta like ``zeros_like`` (never ``new_empty``: uninitialised
# memory); ``_weight_norm`` is ``v * (g / ||v||)``.
# The bitwise line (session 30, break34): a GPT-style ``causal & pad_mask`` on bool masks (``aten.__and__.Tensor``)
# pinned 96 of 137 ops of a user's model to the UE under a fixed split. Elementwise on bool and integer tensors
# (TensorIterator: broadcasting, strides read in place, no index read, no division); a float operand passes the meta
# kernel and is refused by the CPU kernel when the slice runs (NotImplementedError: an OpExecutionError answer, the
# server goes on). The shifts are left out.
ALLOWED_OPS: frozenset[str] = frozenset(f"aten.{n}" for n in _ALLOWED_TEXT.split())


@cache
def resolve(target: str) -> torch._ops.OpOverload:
    """The OpOverload for an allowlisted name like ``aten.conv2d.default``; refuses anything else."""
    if target not in ALLOWED_OPS:
        raise OpNotAllowedError(f"op {target!r} is not on the server's allowlist")
    _, packet, overload = target.split(".")
    try:
        return getattr(getattr(torch.ops.aten, packet), overload)
    except (AttributeError, RuntimeError) as e:
        raise OpNotAllowedError(f"op {target!r} is allowlisted but unknown to this torch ({e})") from None


@cache
def resolve_trusted(target: str) -> torch._ops.OpOverload:
    """Resolve any op of the device's own captured graph (trusted: it came from its own model)."""
    if target in ALLOWED_OPS:
        return resolve(target)
    ns, packet, overload = target.split(".")
    return getattr(getattr(getattr(torch.ops, ns), packet), overload)


@cache
def argument_binder(target: str) -> Callable[[tuple, dict], dict[str, Any]]:
    """``bind(args, kwargs) -> {argument name: value}`` for a call of the allowlisted op ``target`` as its kernel
    takes it (positional in schema order, or by name), the schema's defaults filled in; for checks that read
    arguments by name (``modelgraph.index_bounds``, ``modelgraph.kernel_shapes``). Raises OpNotAllowedError
    off the allowlist."""
    arguments = resolve(target)._schema.arguments
    names = [a.name for a in arguments]
    defaults = {a.name: a.default_value for a in arguments if a.has_default_value()}

    def bind(args: tuple, kwargs: dict) -> dict[str, Any]:
        bound = dict(defaults)
        bound.update(zip(names, args))
        bound.update(kwargs)
        return bound

    return bind


@cache
def _positional_names(target: str) -> tuple[str, ...]:
    return tuple(a.name for a in resolve(target)._schema.arguments if not a.kwarg_only)


def positional_form(target: str, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """``(args, kwargs)`` of an allowlisted op with the arguments that can go by position and follow the given
    positional ones without a gap moved from ``kwargs`` to ``args`` (schema order); the same call for the kernel.

    Why (break32 G3): the server's checks read leading arguments by position (``edge_server.op_budget``'s alias
    groups and cost rules, ``args[0] if args else kwargs.get("self")``); a client that sent ``dropout``'s first
    argument as ``input=`` (its schema name) escaped the alias accounting (a 3.8 KB spec held 768 MiB past the
    limit), and one that sent a ``.vec`` upsampling's as ``input=`` its uint8 scratch rule (break28 F6). The slice
    parser puts every op in this form, so each check sees one form of the call. Arguments given by name after a
    gap (an earlier optional one left to its default) stay named; a name given twice is left for the kernel to
    refuse. Other targets (off the allowlist, refused by validation) are returned as given."""
    if not kwargs or target not in ALLOWED_OPS:
        return args, kwargs
    try:
        names = _positional_names(target)
    except OpNotAllowedError:
        return args, kwargs
    i = len(args)
    if i >= len(names) or names[i] not in kwargs:
        return args, kwargs
    moved, rest = list(args), dict(kwargs)
    while i < len(names) and names[i] in rest:
        moved.append(rest.pop(names[i]))
        i += 1
    return tuple(moved), rest


def is_allowed(target: str) -> bool:
    return target in ALLOWED_OPS


def op_name(target: object) -> str:
    """Canonical ``aten.<packet>.<overload>`` name of an OpOverload."""
    if not isinstance(target, torch._ops.OpOverload):
        return repr(target)
    ns = target.namespace
    return f"{ns}.{target._schema.name.split('::', 1)[-1]}.{target._overloadname}"


def allowlist_hash() -> str:
    return hashlib.sha256("\n".join(sorted(ALLOWED_OPS)).encode()).hexdigest()[:16]
