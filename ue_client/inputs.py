"""What users hand the device runtime from the command line: example input shapes and dtypes
(``--input-shape``), input files (``--input``: .pt tensors, images), and server addresses; each
checked, or refused with one line (``InputError``, a ``ValueError``).

Nothing is cast silently: a file tensor of another dtype than the model's input is refused. Library
inputs (tensors, numpy arrays, pytrees) are checked against the captured graph by
``ModelGraph.bind`` (``modelgraph.pytree_io``).
"""

from __future__ import annotations

import ipaddress
import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from modelgraph.tensors import DTYPES, dtype_name
from ue_client.errors import InputError

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")

_DTYPE_ALIASES = {
    "float": "float32",
    "double": "float64",
    "half": "float16",
    "long": "int64",
    "int": "int32",
    "f32": "float32",
    "f64": "float64",
    "f16": "float16",
    "bf16": "bfloat16",
    "i64": "int64",
    "i32": "int32",
}


# ---- --input-shape ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class InputSpec:
    """One model input as ``--input-shape`` describes it: a shape and a dtype."""

    shape: tuple[int, ...]
    dtype: torch.dtype = torch.float32

    def __str__(self) -> str:
        return f"{','.join(map(str, self.shape))}:{dtype_name(self.dtype)}"


def parse_dtype(text: str) -> torch.dtype:
    """``"float32"`` (or an alias: float, double, half, long, int, f32, i64, ...) -> torch dtype.

    Raises ``InputError`` for any other name (names come from a table, never ``getattr(torch, ...)``).
    """
    key = text.strip().lower().removeprefix("torch.")
    key = _DTYPE_ALIASES.get(key, key)
    if key not in DTYPES:
        raise InputError(f"unknown dtype {text!r} (known: {', '.join(DTYPES)})")
    return DTYPES[key]


def parse_input_shapes(text: str) -> tuple[InputSpec, ...]:
    """``"1,3,224,224:float32;1,128:int64"`` -> one ``InputSpec`` per model input, in order.

    Inputs are separated by ``;``, dimensions by ``,`` or ``x``; the dtype after ``:`` defaults to
    float32. Raises ``InputError`` for empty, non-integer or non-positive dimensions and unknown dtypes.
    """
    specs = []
    for part in text.split(";"):
        if not part.strip():
            continue
        dims, _, dtype = part.partition(":")
        try:
            shape = tuple(int(d) for d in re.split(r"[,x]", dims.strip().lower()) if d.strip())
        except ValueError:
            raise InputError(f"input shape {part.strip()!r} must look like 1,3,224,224 or 1,128:int64") from None
        if not shape or any(d <= 0 for d in shape):
            raise InputError(f"input shape {part.strip()!r} needs positive dimensions")
        specs.append(InputSpec(shape, parse_dtype(dtype) if dtype.strip() else torch.float32))
    if not specs:
        raise InputError(f"input shape {text!r} names no input (e.g. 1,3,224,224 or 1,3,224,224:float32;1,128:int64)")
    return tuple(specs)


def _int_range(like: torch.Tensor | None) -> tuple[int, int]:
    """[low, high) for random integer inputs: the example's own value range (token ids stay in vocab)."""
    if like is None or like.numel() == 0 or like.is_floating_point() or like.is_complex():
        return 0, 2
    return int(like.min()), int(like.max()) + 1


def random_like(
    shape: Sequence[int], dtype: torch.dtype, like: torch.Tensor | None, generator: torch.Generator
) -> torch.Tensor:
    """A seeded random tensor: normal for floating dtypes, integers in ``like``'s value range
    (0..1 without one), random booleans for bool."""
    if dtype.is_floating_point or dtype.is_complex:
        return torch.randn(tuple(shape), generator=generator, dtype=dtype)
    if dtype == torch.bool:
        return torch.randint(0, 2, tuple(shape), generator=generator).bool()
    lo, hi = _int_range(like if like is not None and like.dtype == dtype else None)
    return torch.randint(lo, hi, tuple(shape), generator=generator, dtype=dtype)


def example_inputs(
    specs: Sequence[InputSpec] | None, default: Sequence[torch.Tensor], seed: int = 0
) -> tuple[torch.Tensor, ...]:
    """Example inputs for capture: ``default`` (the factory's own) when no ``--input-shape`` was given,
    else one seeded random tensor per spec. An integer input is drawn from the value range of the
    default input at the same position (so token ids stay inside the model's vocabulary).

    Raises ``InputError`` when the number of specs differs from the factory's number of inputs.
    """
    default = tuple(default)
    if specs is None:
        return default
    tensors, rebuild = tensor_leaves(default)
    if default and len(specs) != len(tensors):
        raise InputError(
            f"--input-shape gives {len(specs)} input(s) ({'; '.join(map(str, specs))}); the model's "
            f"example takes {len(tensors)} tensor(s) ({'; '.join(describe(t) for t in tensors)})"
        )
    g = torch.Generator().manual_seed(seed)
    new = [random_like(s.shape, s.dtype, tensors[i] if i < len(tensors) else None, g) for i, s in enumerate(specs)]
    return rebuild(new) if default else tuple(new)


def tensor_leaves(args: Sequence[Any]) -> tuple[list[torch.Tensor], Any]:
    """The tensors of ``forward``'s positional arguments (pytrees: dicts, lists, tuples; other leaves such
    as ``None`` or a float are kept), in ``torch.utils._pytree`` order, and a function that puts new
    tensors (same count, same order) back into the same structure: ``rebuild(tensors) -> tuple``."""
    from torch.utils import _pytree as pytree

    leaves, spec = pytree.tree_flatten(tuple(args))
    where = [i for i, x in enumerate(leaves) if isinstance(x, torch.Tensor)]

    def rebuild(tensors: Sequence[torch.Tensor]) -> tuple:
        out = list(leaves)
        for i, t in zip(where, tensors, strict=True):
            out[i] = t
        return tuple(pytree.tree_unflatten(out, spec))

    return [leaves[i] for i in where], rebuild


def tensor_paths(args: Sequence[Any]) -> list[str]:
    """Names of the tensors ``tensor_leaves`` returns, as paths in the arguments: ``args[0]['image']``."""
    from torch.utils import _pytree as pytree

    flat, _ = pytree.tree_flatten_with_path(tuple(args))
    return ["args" + pytree.keystr(p) for p, x in flat if isinstance(x, torch.Tensor)]


def describe(t: Any) -> str:
    """``"1,3,224,224:float32"`` for a tensor, the type name for anything else."""
    if isinstance(t, torch.Tensor):
        return f"{','.join(map(str, t.shape))}:{dtype_name(t.dtype)}"
    return type(t).__name__


# ---- --input: random, an image, a .pt file ---------------------------------------------------------------
def load_inputs(
    source: str, example: Sequence[torch.Tensor], seed: int = 0, names: Sequence[str] | None = None
) -> tuple[torch.Tensor, ...]:
    """Run-time inputs from ``--input``: ``random`` (seeded, shaped and typed like ``example``), an
    image (.jpg/.png/...) resized to a single (N, C, H, W) input, or a ``.pt`` file (see ``load_pt``).

    ``names`` are the model's input names (for dict files and messages). Raises ``InputError``.
    """
    example = tuple(example)
    if source == "random":  # every tensor of the example's structure (dicts, lists, several inputs) drawn anew
        g = torch.Generator().manual_seed(seed)
        tensors, rebuild = tensor_leaves(example)
        return rebuild([random_like(x.shape, x.dtype, x, g) for x in tensors])
    path = Path(source)
    if not path.is_file():
        raise InputError(f"input file {source!r} does not exist (use 'random', an image or a .pt file)")
    suffix = path.suffix.lower()
    if suffix == ".pt":
        return load_pt(path, example, names)
    if suffix in IMAGE_SUFFIXES:
        return (load_image(path, example),)
    raise InputError(f"input {source!r}: unsupported file type {suffix!r} (use .jpg/.png or .pt)")


def _input_names(names: Sequence[str] | None, n: int) -> list[str]:
    names = list(names or [])
    return names if len(names) == n else [f"input {i}" for i in range(n)]


def load_pt(
    path: Path, example: Sequence[torch.Tensor], names: Sequence[str] | None = None
) -> tuple[torch.Tensor, ...]:
    """Inputs from a ``.pt`` file holding a tensor, a tuple/list of tensors, or a dict of tensors.

    Read with ``torch.load(weights_only=True)`` (the user's own file on the device; no code runs). A
    dict is matched by the model's input names when its keys are exactly those names, else taken in
    order. Each tensor must have the example's dtype (a float file for an int input is refused, not
    cast) and its shape; a tensor missing only the leading batch dimension of a batch-1 example gets
    it. Other batch sizes are passed on (the runtime accepts or refuses them). Raises ``InputError``.
    """
    example = tuple(example)
    where = str(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
        raise InputError(f"cannot read tensor file {where!r}: {type(e).__name__}: {first}. Expected tensors saved with "
                         "torch.save(x, PATH) (a tensor, a tuple/list or a dict of them)") from None
    if not all(isinstance(x, torch.Tensor) for x in example):
        return _load_pt_tree(obj, example, where)
    labels = _input_names(names, len(example))
    if isinstance(obj, torch.Tensor):
        obj = [obj]
    elif isinstance(obj, Mapping):
        keys = list(obj)
        if set(map(str, keys)) == set(labels) and names:
            obj = [obj[k] for k in labels]
        else:
            obj = list(obj.values())
    if not isinstance(obj, list | tuple) or not all(isinstance(t, torch.Tensor) for t in obj):
        raise InputError(
            f"{where!r} must hold a tensor, or a list/tuple/dict of tensors, not "
            f"{type(obj).__name__}" + ("" if not isinstance(obj, list | tuple) else " of other values")
        )
    if len(obj) != len(example):
        raise InputError(
            f"{where!r} holds {len(obj)} tensor(s); the model takes {len(example)} "
            f"({', '.join(f'{n} {describe(x)}' for n, x in zip(labels, example))})"
        )
    out = []
    for label, t, x in zip(labels, obj, example):
        if t.dtype != x.dtype:
            raise InputError(
                f"{where!r}: {label} is {dtype_name(t.dtype)}; the model expects {dtype_name(x.dtype)} "
                "(convert the file yourself; inputs are never cast)"
            )
        if t.dim() == x.dim() - 1 and x.shape[0] == 1 and tuple(t.shape) == tuple(x.shape[1:]):
            t = t.unsqueeze(0)
        elif t.dim() != x.dim() or tuple(t.shape[1:]) != tuple(x.shape[1:]):
            raise InputError(f"{where!r}: {label} has shape {list(t.shape)}; the model expects {list(x.shape)}")
        out.append(t)
    return tuple(out)


def _load_pt_tree(obj: Any, example: tuple, where: str) -> tuple:
    """A ``.pt`` file for a model whose arguments are pytrees (a dict, a list of tensors, constants): the file
    holds all the arguments (a list/tuple as long as the example's) or the first one (the others must then
    hold no tensors, e.g. a float, and are the example's). Tensors are matched by their path in the
    arguments (``args[0]['image']``); each must have the example's dtype (never cast) and shape but for
    the batch (first) dimension. Raises ``InputError`` naming the path."""
    if isinstance(obj, list | tuple) and len(obj) == len(example) and len(example) > 1:
        args = tuple(obj)
    elif all(not tensor_leaves((x,))[0] for x in example[1:]):
        args = (obj, *example[1:])
    else:
        raise InputError(f"{where!r} must hold the model's {len(example)} arguments as a list or tuple "
                         f"({', '.join(type(x).__name__ for x in example)})")
    want = dict(zip(tensor_paths(example), tensor_leaves(example)[0]))
    got = dict(zip(tensor_paths(args), tensor_leaves(args)[0]))
    if set(got) != set(want):
        missing, extra = sorted(set(want) - set(got)), sorted(set(got) - set(want))
        raise InputError(f"{where!r} does not match the model's inputs: missing {missing[:5]}, unexpected "
                         f"{extra[:5]} (expected tensors at {', '.join(want)})")
    out = []
    for path, x in want.items():
        t = got[path]
        if t.dtype != x.dtype:
            raise InputError(f"{where!r}: {path} is {dtype_name(t.dtype)}; the model expects {dtype_name(x.dtype)} "
                             "(convert the file yourself; inputs are never cast)")
        if t.dim() != x.dim() or tuple(t.shape[1:]) != tuple(x.shape[1:]):
            raise InputError(f"{where!r}: {path} has shape {list(t.shape)}; the model expects {list(x.shape)}")
        out.append(t)
    return tensor_leaves(example)[1](out)


def load_image(path: Path, example: Sequence[torch.Tensor]) -> torch.Tensor:
    """An image file as the model's single (N, C, H, W) input (C = 1 or 3), resized (bilinear), scaled to
    [0, 1] and ImageNet-normalised for C = 3, in the example's floating dtype. Raises ``InputError``."""
    example = tuple(example)
    x = example[0] if example else None
    if len(example) != 1 or x.dim() != 4 or x.shape[1] not in (1, 3) or not x.is_floating_point():
        raise InputError(
            f"an image input needs a model with one floating (N, C, H, W) input; this one takes "
            f"{[describe(t) for t in example]}"
        )
    try:
        from PIL import Image
    except ImportError:
        raise InputError("reading images needs Pillow (pip install pillow)") from None
    try:
        img = Image.open(path).convert("RGB" if x.shape[1] == 3 else "L")
    except Exception as e:
        raise InputError(f"cannot read image {str(path)!r}: {e}") from None
    h, w = int(x.shape[2]), int(x.shape[3])
    img = img.resize((w, h), Image.BILINEAR)
    t = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).reshape(h, w, -1).permute(2, 0, 1)
    t = t.to(torch.float32) / 255.0
    if x.shape[1] == 3:
        t = (t - torch.tensor(IMAGENET_MEAN).view(3, 1, 1)) / torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return t.unsqueeze(0).expand(x.shape[0], -1, -1, -1).contiguous().to(x.dtype)


# ---- server addresses -------------------------------------------------------------------------------------
def parse_server_address(text: str) -> str:
    """``HOST:PORT`` (``[IPv6]:PORT`` for IPv6, or ``unix:PATH``) -> the gRPC target, validated.

    The port is required and must be 1..65535 (gRPC would wrap 99999 to another port, and a missing
    port would silently mean 443). Raises ``InputError`` with one line otherwise.
    """
    if not isinstance(text, str) or not text.strip():
        raise InputError("server address is empty (expected HOST:PORT, e.g. 127.0.0.1:50051)")
    addr = text.strip()
    if addr.startswith("unix:"):
        if len(addr) == len("unix:"):
            raise InputError(f"server address {text!r} names no socket path (unix:PATH)")
        return addr
    if "://" in addr:
        raise InputError(f"server address {text!r}: give HOST:PORT without a scheme (e.g. 127.0.0.1:50051)")
    if addr.startswith("["):
        host, sep, port = addr[1:].partition("]:")
        if not sep:
            raise InputError(f"server address {text!r} needs a port: [IPV6]:PORT, e.g. [::1]:50051")
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise InputError(f"server address {text!r}: {host!r} is not an IPv6 address") from None
    else:
        host, sep, port = addr.rpartition(":")
        if not sep or not host:
            raise InputError(f"server address {text!r} needs a port: HOST:PORT, e.g. {addr or '127.0.0.1'}:50051")
        if ":" in host:
            raise InputError(f"server address {text!r}: write an IPv6 host in brackets, e.g. [::1]:50051")
        if not re.fullmatch(r"[A-Za-z0-9._-]+", host):
            raise InputError(f"server address {text!r}: {host!r} is not a host name or IP address")
    if not port.isdigit():
        raise InputError(f"server address {text!r}: port {port!r} is not a number")
    if not 1 <= int(port) <= 65535:
        raise InputError(f"server address {text!r}: port {int(port)} is out of range 1-65535")
    return f"[{host}]:{int(port)}" if addr.startswith("[") else f"{host}:{int(port)}"


def parse_data_address(text: object) -> tuple[str, int]:
    """``--data-address`` / ``ClientOptions.data_address``: ``HOST:PORT`` or ``[IPv6]:PORT`` -> (host, port),
    with :func:`parse_server_address`'s rules (no ``unix:`` path: the data channel is TCP). Raises
    ``InputError`` with one line otherwise."""
    if not isinstance(text, str) or text.strip().startswith("unix:"):
        raise InputError(f"data address must be HOST:PORT, got {text!r}")
    try:
        addr = parse_server_address(text)
    except InputError as e:
        raise InputError(f"data address: {e}") from None
    host, _, port = addr.rpartition(":")
    return host.strip("[]"), int(port)


__all__ = [
    "parse_data_address",
    "InputSpec",
    "describe",
    "example_inputs",
    "load_image",
    "load_inputs",
    "load_pt",
    "tensor_leaves",
    "tensor_paths",
    "parse_dtype",
    "parse_input_shapes",
    "parse_server_address",
    "random_like",
]
