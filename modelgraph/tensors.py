"""Tensor metadata and the dtype table shared by both sides of the wire.

Dtypes travel as names ("float32") and are looked up in an explicit table, never with getattr on
the torch module, so a name from the network cannot reach arbitrary attributes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property

import torch

from modelgraph.errors import ShapeError

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float64": torch.float64,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "int64": torch.int64,
    "int32": torch.int32,
    "int16": torch.int16,
    "int8": torch.int8,
    "uint8": torch.uint8,
    "bool": torch.bool,
    "complex64": torch.complex64,
    "complex128": torch.complex128,
}
DTYPE_NAMES: dict[torch.dtype, str] = {v: k for k, v in DTYPES.items()}

MAX_DIM = 1 << 31
MAX_RANK = 16


def dtype_name(dtype: torch.dtype) -> str:
    try:
        return DTYPE_NAMES[dtype]
    except KeyError:
        raise ShapeError(f"unsupported dtype {dtype}") from None


def to_dtype(name: str) -> torch.dtype:
    try:
        return DTYPES[name]
    except (KeyError, TypeError):
        raise ShapeError(f"unknown dtype {name!r} (known: {', '.join(DTYPES)})") from None


def contiguous_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    strides, acc = [], 1
    for d in reversed(shape):
        strides.append(acc)
        acc *= max(d, 1)
    return tuple(reversed(strides))


@dataclass(frozen=True)
class TensorMeta:
    shape: tuple[int, ...]
    dtype: str
    stride: tuple[int, ...] | None = None
    """Strides of the producing op's output. Bytes travel contiguous; the receiver restores these
    strides so that stride-sensitive kernels compute bit-identical results on both sides."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "shape", tuple(int(d) for d in self.shape))
        if self.stride is not None:
            object.__setattr__(self, "stride", tuple(int(s) for s in self.stride))
        self.check()

    def check(self) -> None:
        if len(self.shape) > MAX_RANK:
            raise ShapeError(f"rank {len(self.shape)} exceeds {MAX_RANK}")
        for d in self.shape:
            if d < 0 or d > MAX_DIM:
                raise ShapeError(f"absurd dimension {d} in shape {list(self.shape)}")
        to_dtype(self.dtype)
        if self.stride is not None:
            if len(self.stride) != len(self.shape):
                raise ShapeError(f"stride {list(self.stride)} does not match shape {list(self.shape)}")
            if any(s < 0 or s > MAX_DIM for s in self.stride):
                raise ShapeError(f"absurd stride {list(self.stride)} (strides must be in 0..{MAX_DIM})")

    @cached_property
    def strides(self) -> tuple[int, ...]:
        """The layout's strides: ``stride``, or the contiguous strides of ``shape`` when it is None (computed
        once per meta: binding a request's inputs checks them on every request)."""
        return self.stride if self.stride is not None else contiguous_strides(self.shape)

    @cached_property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def itemsize(self) -> int:
        return to_dtype(self.dtype).itemsize

    @cached_property
    def nbytes(self) -> int:
        return self.numel * self.itemsize

    @cached_property
    def storage_nbytes(self) -> int:
        """Bytes of storage the strided layout spans (what restoring the layout allocates)."""
        if self.stride is None or self.numel == 0:
            return self.nbytes
        return (1 + sum((d - 1) * s for d, s in zip(self.shape, self.stride))) * self.itemsize

    @cached_property
    def wire_shape(self) -> tuple[int, ...]:
        """The compact shape a tensor of this layout may travel in (``wire_shape``): ``shape`` with 1 at every
        dimension of size > 1 whose declared stride is 0; ``shape`` when there is none (or no stride, or no
        elements)."""
        stride = self.stride
        if stride is None or self.numel == 0 or 0 not in stride:
            return self.shape
        return tuple(1 if s == 0 and n > 1 else n for n, s in zip(self.shape, stride))

    @cached_property
    def wire_nbytes(self) -> int:
        """Bytes of ``wire_shape``: what such a tensor costs on the wire sent compact (``nbytes`` when its layout
        has no stride-0 dimension)."""
        return math.prod(self.wire_shape) * self.itemsize

    @classmethod
    def of(cls, t: torch.Tensor, *, keep_stride: bool = True) -> TensorMeta:
        stride = tuple(t.stride()) if keep_stride else None
        if stride is not None and stride == contiguous_strides(tuple(t.shape)):
            stride = None
        return cls(tuple(t.shape), dtype_name(t.dtype), stride)

    def to_json(self) -> dict:
        d = {"shape": list(self.shape), "dtype": self.dtype}
        if self.stride is not None:
            d["stride"] = list(self.stride)
        return d

    @classmethod
    def from_json(cls, d: dict) -> TensorMeta:
        if not isinstance(d, dict) or not isinstance(d.get("shape"), list):
            raise ShapeError(f"tensor metadata must be {{shape: [...], dtype: str}}, got {d!r}"[:200])
        if not all(isinstance(x, int) and not isinstance(x, bool) for x in d["shape"]):
            raise ShapeError(f"shape entries must be integers: {d['shape']!r}"[:200])
        stride = d.get("stride")
        if stride is not None and not (isinstance(stride, list)
                                       and all(isinstance(x, int) and not isinstance(x, bool) for x in stride)):
            raise ShapeError(f"stride entries must be integers: {stride!r}"[:200])
        return cls(tuple(d["shape"]), d.get("dtype"), None if stride is None else tuple(stride))


def restore_layout(t: torch.Tensor, meta: TensorMeta) -> torch.Tensor:
    """Give a received contiguous tensor the producer's strides (a no-op for contiguous producers).

    A producer's stride of 0 (``expand``: every index of that dimension reads one element) is restored as
    an expanded view of the first index along each such dimension, laid out with the producer's other
    strides: an op's output that had stride 0 holds the same values along that dimension by construction,
    and the user sees the eager module's strides (session 15: such an output came back contiguous from the
    server while eager's and a local run's were expanded). Other overlapping strides (``unfold``) come back
    contiguous: the values are what matter.

    Values win over the layout there too: a received tensor whose values differ along a dimension the producer
    had at stride 0 is returned as received (session 31: a graph input captured as an ``expand`` and called with
    a dense tensor, or a view of it cut to the server, declares stride 0 while the run-time tensor differs along
    that dimension; the server read index 0 only and answered wrong, silently). A tensor already at stride 0 there
    (a compact cut tensor expanded on arrival) is not compared: its values are equal by construction."""
    if meta.stride is None or tuple(t.stride()) == meta.stride:
        return t
    stride, shape = meta.stride, meta.shape
    try:
        wide = [d for d, (s, n) in enumerate(zip(stride, shape)) if s == 0 and n > 1]
        if wide:
            base = t
            for d in wide:
                base = base.narrow(d, 0, 1)
            if any(t.stride(d) != 0 for d in wide) and not _same_bits(t, base.expand(shape)):
                return t
            out = torch.empty_strided(base.shape, stride, dtype=t.dtype, device=t.device)
            out.copy_(base)
            return out.expand(shape)
        out = torch.empty_strided(shape, stride, dtype=t.dtype, device=t.device)
        out.copy_(t)
        return out
    except RuntimeError:  # overlapping or odd strides: values are what matter
        return t


_SAME_SIZE_INT = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether ``a`` and ``b`` (same shape and dtype) hold the same bits: ``torch.equal`` of floats takes -0.0 for 0.0
    (a stride-0 restore then answered 5 where eager answered -5 through ``1 / x``, break37 F2) and NaN for unequal to
    itself (an expanded NaN came back dense, break37 F3). Compared as integers of the same size; a dtype without one
    (complex128) by ``torch.equal``."""
    it = _SAME_SIZE_INT.get(a.element_size())
    if it is None or (not a.is_floating_point() and not a.is_complex()):
        return torch.equal(a, b)
    return torch.equal(a.view(it), b.view(it))


def restorable_layout(shape: tuple[int, ...], stride: tuple[int, ...]) -> bool:
    """``restore_layout`` gives a received tensor of ``shape`` these strides: with each stride-0 dim taken at size 1
    (it is restored as an ``expand``), no two elements share memory (sorted by stride, each dim's stride passes
    the span of the dims inside it). An overlapping layout (an ``unfold``'s) comes back contiguous instead."""
    dims = sorted((s, n) for n, s in zip(shape, stride, strict=True) if n > 1 and s != 0)
    span = 0  # the largest offset the inner dims reach
    for s, n in dims:
        if s <= span:
            return False
        span += (n - 1) * s
    return True


def compact_for_wire(t: torch.Tensor, meta: TensorMeta) -> torch.Tensor:
    """``t`` (a run-time tensor of ``meta``'s shape) as it goes on the wire: narrowed to index 0 along each
    dimension ``meta.wire_shape`` makes 1, when ``t`` itself has stride 0 in each of them (so its values are equal
    along them, whatever the declared layout promised); else ``t`` itself (sent dense, as before). A view: its
    bytes in contiguous order are the compact base's."""
    ws = meta.wire_shape
    if ws == meta.shape or tuple(t.shape) != meta.shape:
        return t
    stride = t.stride()
    base = t
    for d, (n, w) in enumerate(zip(meta.shape, ws)):
        if n != w:
            if stride[d] != 0:
                return t
            base = base.narrow(d, 0, 1)
    return base


def from_wire(t: torch.Tensor, meta: TensorMeta) -> torch.Tensor:
    """A received cut tensor in ``meta``'s logical shape: ``t`` when it came dense (``meta.shape``), expanded
    (a view, stride 0 where it was compact) when it came as ``meta.wire_shape``. Raises ShapeError for any other
    shape."""
    shape = tuple(t.shape)
    if shape == meta.shape:
        return t
    if shape == meta.wire_shape:
        return t.expand(meta.shape)
    raise ShapeError(f"a tensor of shape {list(shape)} is neither {list(meta.shape)} nor its compact form "
                     f"{list(meta.wire_shape)}")


ALIGN_BYTES = 64
"""Alignment of every tensor this project builds from received bytes: torch's CPU allocator's (c10 uses
64 bytes). CPU kernels pick code paths by the address of their operands (MKL's sgemm on AMD EPYC gives a
Linear a different last bit for a 4- or 8-byte aligned input), so bitwise equality between the UE and the
server needs both sides to see tensors aligned as the allocator aligns them."""


def aligned_buffer(nbytes: int) -> memoryview:
    """A zeroed, writable buffer of ``nbytes`` bytes whose start is ``ALIGN_BYTES``-aligned.

    A byte memoryview into a slightly larger bytearray (which is never resized, so the address is stable);
    ``torch.frombuffer`` on it gives a tensor the kernels treat like one from torch's own allocator.
    """
    raw = bytearray(nbytes + ALIGN_BYTES)
    addr = torch.frombuffer(raw, dtype=torch.uint8).data_ptr() if raw else 0
    off = (-addr) % ALIGN_BYTES
    return memoryview(raw)[off : off + nbytes]


def tensor_from_bytes(buf: bytes | bytearray | memoryview, meta: TensorMeta, *, align: bool = True,
                      dtype: torch.dtype | None = None) -> torch.Tensor:
    """A tensor over raw contiguous bytes; validates numel * itemsize == len(bytes).

    Zero-copy when the bytes start ``ALIGN_BYTES``-aligned (see ``aligned_buffer``) or ``align`` is False;
    otherwise the tensor is over an aligned copy of the bytes (a plain memory copy, no torch op), so that
    the kernels that run on it give the same bits as on a tensor torch allocated. ``dtype``: ``meta``'s
    torch dtype when the caller has it (``to_dtype(meta.dtype)``; saves the lookup).
    """
    n = len(buf) if not isinstance(buf, memoryview) else buf.nbytes
    if n != meta.nbytes:
        from modelgraph.errors import WeightIntegrityError

        raise WeightIntegrityError(
            f"{n} bytes do not match dtype {meta.dtype} x shape {list(meta.shape)} = {meta.nbytes} bytes")
    if dtype is None:
        dtype = to_dtype(meta.dtype)
    if n == 0:
        return torch.empty(meta.shape, dtype=dtype)
    if isinstance(buf, bytearray) or (isinstance(buf, memoryview) and not buf.readonly):
        t = torch.frombuffer(buf, dtype=dtype)  # writable: torch has nothing to warn about
    else:
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # read-only buffers: we never write into them
            t = torch.frombuffer(buf, dtype=dtype)
    if align and t.data_ptr() % ALIGN_BYTES:
        copy = aligned_buffer(n)
        copy[:] = memoryview(buf).cast("B")
        t = torch.frombuffer(copy, dtype=dtype)
    return t.reshape(meta.shape)


_NUMPY_BYTES = frozenset((torch.float32, torch.float64, torch.float16, torch.int64, torch.int32, torch.int16,
                          torch.int8, torch.uint8))
"""dtypes whose ``Tensor.numpy()`` is a plain view of the tensor's memory (``tensor_bytes``' short path)."""


def dense_layout(shape: tuple[int, ...], stride: tuple[int, ...]) -> bool:
    """``shape``/``stride`` cover their storage span without gaps or overlaps, in any order of strides (a permuted
    or channels-last tensor is dense; an ``expand``'s stride 0, a ``slice``'s or ``select``'s gaps are not)."""
    if 0 in shape:
        return True
    want = 1
    for s, n in sorted((s, n) for n, s in zip(shape, stride) if n != 1):
        if s != want:
            return False
        want *= n
    return True


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """The tensor's bytes in contiguous order (a flat memoryview of format ``B``), without a copy when it
    already is contiguous on CPU.

    A contiguous CPU tensor of rank >= 1 and a dtype numpy has (``_NUMPY_BYTES``) that needs no gradient is
    viewed through numpy directly (~1 us; the general path's detach, reshape and uint8 view took ~15 us per
    call, on every request's input)."""
    if (t.dtype in _NUMPY_BYTES and not t.requires_grad and t.is_contiguous() and t.dim() and t.numel()
            and t.device.type == "cpu"):
        return memoryview(t.numpy()).cast("B")
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.contiguous()
    if t.numel() == 0:
        return memoryview(b"")
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())
