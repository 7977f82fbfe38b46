"""Boundary between the wire (``protos.coinfer.v1``) and torch tensors.

Only this module and the servicer touch generated protobuf types. Decoding validates everything that
comes from the client (dtype names, shapes, sizes, chunk bounds) and raises
:class:`edge_server.errors.InvalidArgument` subclasses, which the servicer maps to INVALID_ARGUMENT.
Nothing here unpickles or evaluates client data: tensors are rebuilt from raw bytes + dtype + shape.
"""

from __future__ import annotations

import math
import mmap
import re
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from edge_server.errors import InvalidArgument, ResourceExhausted
from modelgraph.tensors import ALIGN_BYTES, DTYPE_NAMES, DTYPES, aligned_buffer
from protos.coinfer.v1 import coinfer_pb2 as pb

# Wire dtype names (torch names without the "torch." prefix): the one table modelgraph owns.
_NAMES = DTYPE_NAMES
_ITEMSIZE = {name: dt.itemsize for name, dt in DTYPES.items()}
_SHA256_RE = re.compile(r"[0-9a-f]{64}")

MAX_NDIM = 16
DEFAULT_CHUNK_BYTES = 1 << 20

if sys.byteorder != "little":  # pragma: no cover - every platform we run on is little-endian
    raise ImportError("coinfer's wire format is little-endian raw bytes; big-endian hosts are unsupported")


class CodecError(InvalidArgument):
    """A tensor or chunk from the client is malformed."""


class ChunkOrderError(CodecError):
    """A chunk does not continue its tensor where the previous one ended, or changes its metadata."""


def dtype_from_name(name: str) -> torch.dtype:
    """Wire dtype name -> torch dtype ("torch.float32" is accepted too)."""
    key = name.removeprefix("torch.")
    try:
        return DTYPES[key]
    except KeyError:
        raise CodecError(f"unsupported dtype {name!r}; expected one of {sorted(DTYPES)}") from None


def dtype_name(dtype: torch.dtype) -> str:
    """torch dtype -> wire dtype name."""
    try:
        return _NAMES[dtype]
    except KeyError:
        raise CodecError(f"dtype {dtype} cannot travel on the wire") from None


def itemsize(dtype: torch.dtype) -> int:
    return _ITEMSIZE[dtype_name(dtype)]


def check_shape(shape: object) -> tuple[int, ...]:
    """Validate a shape: at most MAX_NDIM dims, each a non-negative int."""
    dims = tuple(shape)  # type: ignore[arg-type]
    if len(dims) > MAX_NDIM:
        raise CodecError(f"shape {list(dims)} has {len(dims)} dims (> {MAX_NDIM})")
    for d in dims:
        if not isinstance(d, int) or isinstance(d, bool) or d < 0:
            raise CodecError(f"shape {list(dims)} has an invalid dimension {d!r}")
    return dims


def nbytes_of(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    return math.prod(shape) * itemsize(dtype)


def check_sha256(digest: str) -> str:
    if not isinstance(digest, str) or not _SHA256_RE.fullmatch(digest):
        raise CodecError(f"sha256 must be 64 lowercase hex characters, got {digest[:80]!r}")
    return digest


def tensor_from_bytes(buf: bytes | bytearray | memoryview, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    """Rebuild a tensor from raw contiguous bytes. Zero-copy when ``buf`` is writable and 64-byte aligned.

    The tensor then shares memory with ``buf``: the caller keeps ``buf`` alive and unchanged.
    """
    shape = check_shape(shape)
    expected = nbytes_of(shape, dtype)
    if len(buf) != expected:
        what = f"shape {list(shape)} {dtype_name(dtype)}"
        raise CodecError(f"{len(buf)} bytes for {what} (expected {expected})")
    if expected == 0:
        return torch.empty(shape, dtype=dtype)
    if isinstance(buf, bytes):
        buf = bytearray(buf)  # torch.frombuffer wants a writable buffer
    t = torch.frombuffer(buf, dtype=dtype)
    if t.data_ptr() % ALIGN_BYTES:  # kernels' last bits depend on operand alignment (modelgraph.tensors)
        copy = aligned_buffer(expected)
        copy[:] = memoryview(buf).cast("B")
        t = torch.frombuffer(copy, dtype=dtype)
    t = t.reshape(shape)
    if dtype == torch.bool and bool((t.view(torch.uint8) > 1).any()):
        raise CodecError("bool tensor holds bytes other than 0 and 1")
    return t


def tensor_to_bytes(t: torch.Tensor) -> memoryview:
    """Raw contiguous bytes of a tensor (moved to CPU first)."""
    dtype_name(t.dtype)
    flat = t.detach().to("cpu").contiguous().reshape(-1)
    if flat.numel() == 0:
        return memoryview(b"")
    return memoryview(flat.view(torch.uint8).numpy()).cast("B")


# ------------------------------------------------------------------------------------------------------
# Chunks


@dataclass(frozen=True, slots=True)
class WeightPiece:
    """A validated weight chunk."""

    sha256: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int
    total_bytes: int
    data: bytes

    @property
    def last(self) -> bool:
        return self.offset + len(self.data) == self.total_bytes


@dataclass(frozen=True, slots=True)
class TensorPiece:
    """A validated chunk of a request's tensor."""

    request_id: int
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int
    total_bytes: int
    data: bytes

    @property
    def last(self) -> bool:
        return self.offset + len(self.data) == self.total_bytes


def _check_bounds(what: str, offset: int, size: int, total: int, max_chunk_bytes: int) -> None:
    if size > max_chunk_bytes:
        raise CodecError(f"{what}: chunk of {size} bytes exceeds max_chunk_bytes={max_chunk_bytes}")
    if size == 0 and total != 0:
        raise CodecError(f"{what}: empty chunk")
    if offset + size > total:
        raise CodecError(f"{what}: chunk [{offset}, {offset + size}) past the end ({total} bytes)")


def check_weight_span(
    sha256: str, dtype: str, shape: object, offset: int, total_bytes: int, size: int, max_chunk_bytes: int
) -> tuple[str, torch.dtype, tuple[int, ...], int]:
    """Validate the metadata of ``size`` bytes of a weight at ``offset``: the one check of a weight chunk,
    whether it came in a ``WeightChunk`` message or a data-channel frame (``edge_server.data_channel``).

    Returns (sha256, torch dtype, shape, total bytes). Raises CodecError (INVALID_ARGUMENT): a sha256 that
    is not 64 lowercase hex characters, an unknown dtype, a bad shape, ``total_bytes`` not what shape and
    dtype give, an empty or oversized (> ``max_chunk_bytes``) chunk, or one past the end.
    """
    sha = check_sha256(sha256)
    dt = dtype_from_name(dtype)
    dims = check_shape(shape)
    total = nbytes_of(dims, dt)
    if total_bytes != total:
        raise CodecError(f"weight {sha[:12]}: total_bytes={total_bytes} but shape/dtype give {total}")
    _check_bounds(f"weight {sha[:12]}", offset, size, total, max_chunk_bytes)
    return sha, dt, dims, total


def decode_weight_chunk(msg: pb.WeightChunk, max_chunk_bytes: int) -> WeightPiece:
    sha, dtype, shape, total = check_weight_span(
        msg.sha256, msg.dtype, msg.shape, msg.offset, msg.total_bytes, len(msg.data), max_chunk_bytes
    )
    return WeightPiece(sha, dtype, shape, msg.offset, total, msg.data)


def decode_tensor_chunk(msg: pb.TensorChunk, max_chunk_bytes: int) -> TensorPiece:
    if not msg.HasField("meta") or not msg.meta.name:
        raise CodecError("tensor chunk without a name")
    name = msg.meta.name
    dtype = dtype_from_name(msg.meta.dtype)
    shape = check_shape(msg.meta.shape)
    total = nbytes_of(shape, dtype)
    if msg.total_bytes != total:
        raise CodecError(f"tensor {name!r}: total_bytes={msg.total_bytes} but shape/dtype give {total}")
    _check_bounds(f"tensor {name!r}", msg.offset, len(msg.data), total, max_chunk_bytes)
    return TensorPiece(msg.request_id, name, dtype, shape, msg.offset, total, msg.data)


def encode_tensor_chunks(
    request_id: int, name: str, tensor: torch.Tensor, chunk_bytes: int = DEFAULT_CHUNK_BYTES
) -> Iterator[pb.TensorChunk]:
    """Split a tensor into wire chunks (at least one, even when empty)."""
    raw = tensor_to_bytes(tensor)
    meta = pb.TensorMeta(name=name, dtype=dtype_name(tensor.dtype), shape=list(tensor.shape))
    total = len(raw)
    offset = 0
    while True:
        end = min(total, offset + chunk_bytes)
        yield pb.TensorChunk(
            request_id=request_id, meta=meta, offset=offset, total_bytes=total, data=bytes(raw[offset:end])
        )
        offset = end
        if offset >= total:
            return


def encode_weight_chunks(
    sha256: str, tensor: torch.Tensor, chunk_bytes: int = DEFAULT_CHUNK_BYTES
) -> Iterator[pb.WeightChunk]:
    """Split a weight into wire chunks (used by tests and tools; the UE client has its own)."""
    raw = tensor_to_bytes(tensor)
    total = len(raw)
    offset = 0
    while True:
        end = min(total, offset + chunk_bytes)
        yield pb.WeightChunk(
            sha256=sha256,
            dtype=dtype_name(tensor.dtype),
            shape=list(tensor.shape),
            offset=offset,
            total_bytes=total,
            data=bytes(raw[offset:end]),
        )
        offset = end
        if offset >= total:
            return


LAZY_MIN_BYTES = 1 << 20
"""Staged bytes (uploads, request tensors) of at least this many bytes are received into an anonymous private mapping
(``mmap``), whose pages commit only when written, and the server-wide staging area is charged what arrived (whole
pages), never what was declared (session 22). 1 MiB: a mapping's last page wastes at most 0.4 % of it."""


class TensorAssembler:
    """Collects the in-order chunks of one tensor into a preallocated buffer.

    The first piece fixes name, dtype and shape; later pieces must repeat them and continue exactly where
    the previous one ended. Without ``charge`` the caller accounts the buffer's bytes (staging budget) before
    creating it. With ``charge`` (session 22) a tensor of at least ``LAZY_MIN_BYTES`` goes to an anonymous
    mapping whose pages commit only when written, and ``charge(n)`` is called with the bytes (whole pages)
    each piece adds before it is written (it raises to refuse them, e.g. ResourceExhausted); ``charged`` is
    what it was told in all. Smaller tensors are charged whole at the first piece.
    """

    __slots__ = ("_buf", "_charge", "charged", "dtype", "name", "received", "shape", "total_bytes")

    def __init__(self, name: str, dtype: torch.dtype, shape: tuple[int, ...], total_bytes: int,
                 charge: Callable[[int], None] | None = None) -> None:
        self.name = name
        self.dtype = dtype
        self.shape = shape
        self.total_bytes = total_bytes
        self.received = 0
        self.charged = 0
        self._charge = charge
        if charge is not None and total_bytes >= LAZY_MIN_BYTES:
            try:
                self._buf = memoryview(mmap.mmap(-1, total_bytes, flags=mmap.MAP_PRIVATE,
                                                 prot=mmap.PROT_READ | mmap.PROT_WRITE))
            except OSError as e:  # e.g. a host that does not overcommit (vm.overcommit_memory 2)
                raise ResourceExhausted(f"tensor {name!r}: no memory to map {total_bytes} bytes: {e}") from e
        else:
            if charge is not None:
                charge(total_bytes)
                self.charged = total_bytes
            self._buf = aligned_buffer(total_bytes)

    def add(self, piece: TensorPiece | WeightPiece) -> bool:
        """Append a piece; returns True when the tensor is complete."""
        if piece.dtype != self.dtype or piece.shape != self.shape or piece.total_bytes != self.total_bytes:
            raise ChunkOrderError(f"tensor {self.name!r}: chunk metadata changed mid-tensor")
        if piece.offset != self.received:
            raise ChunkOrderError(
                f"tensor {self.name!r}: chunk at offset {piece.offset}, expected {self.received} (in order)"
            )
        n = len(piece.data)
        end = self.received + n
        if end > self.total_bytes:
            raise ChunkOrderError(f"tensor {self.name!r}: chunk past the end ({self.total_bytes} bytes)")
        if self._charge is not None:
            pages = min(-(-end // mmap.PAGESIZE) * mmap.PAGESIZE, self.total_bytes)
            if pages > self.charged:
                self._charge(pages - self.charged)
                self.charged = pages
        self._buf[self.received : end] = piece.data
        self.received = end
        return self.complete

    @property
    def complete(self) -> bool:
        return self.received == self.total_bytes

    def tensor(self) -> torch.Tensor:
        if not self.complete:
            got = f"{self.received}/{self.total_bytes} bytes"
            raise ChunkOrderError(f"tensor {self.name!r} incomplete ({got})")
        return tensor_from_bytes(self._buf, self.dtype, self.shape)
