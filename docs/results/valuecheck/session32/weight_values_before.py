"""What the watched weights hold, checked by value: changes torch's version counters do not record.

A write through ``param.data`` (``p.data.mul_(2)``, an EMA ``p.data.copy_(q)``, WGAN clipping
``p.data.clamp_(...)``, ``bn.running_mean.data.fill_(...)``) goes to the parameter's storage through a
tensor with its own version counter: the parameter's ``_version`` does not move, so ``WeightWatch``'s
counters saw nothing, the local path read the new values and the server kept the bytes it was sent
(break31 F1: 0.25-1.78 off eager through the server, no error). torch keeps no record of such a write,
so the only way to see it is to look at the values.

``ValueCheck`` keeps, per watched tensor, either a sample of its elements (``"sampled"``, compared byte for
byte, so NaN weights compare equal to themselves) or the sha256 of all its bytes (``"full"``). A tensor of at most
``SAMPLE_ALL`` elements, and a vector of at most ``SAMPLE_MAX``, is read whole. A larger one is seen as rows of
equal length (a dense tensor: the outermost dimension in memory; one with gaps or overlaps: dim 0) and sampled at
a step coprime to the row length, as many samples as it has rows or row elements, whichever is more (at least
``SAMPLE_MIN``, at most ``SAMPLE_MAX``): the step is at most a row, so every row is read, and the samples' places
within their rows run through every residue, so every index of every inner dimension is read too. A change to a
whole tensor, to one index of any dimension (a row, a column, an input or output channel), or to any element of a
small tensor is seen; a change to a few elements of a large matrix no sample falls on is seen only by ``"full"``.
A dense tensor's samples are one strided view of its storage (all of a dtype read by one ``torch.cat``), those of a
tensor with gaps one ``index_select`` of its storage span at precomputed offsets.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence

import torch

from modelgraph.tensors import dense_layout, tensor_bytes

SAMPLE_MIN = 64
"""Elements sampled per tensor at least (all of a smaller one)."""

SAMPLE_ALL = 4096
"""A tensor of at most this many elements is read whole (break33 V3: a 16 x 16 matrix's 64 samples read a third of
it, and one element written through ``.data`` answered 0.169 off eager)."""

SAMPLE_MAX = 65536
"""Elements sampled per tensor at most: a matrix with more rows or columns than this (an embedding of a larger
vocabulary) has only some of its rows or columns read."""


def _outer_size(t: torch.Tensor) -> int:
    """The size of ``t``'s outermost dimension in memory (the largest stride; 1 for a vector): the rows a dense
    tensor's storage is laid out in, whatever its dimension order (break33 V1: rows taken from ``shape[0]`` while the
    sample walked the storage, so a TF kernel loaded with ``.t()`` had every sample in one logical row and a class
    row doubled through ``.data`` answered 1.48 off eager)."""
    dims = [(stride, size) for size, stride in zip(t.shape, t.stride(), strict=True) if size > 1]
    return max(dims)[1] if len(dims) > 1 else 1


def _stride(n: int, rows: int) -> int:
    """The sample's step over ``n`` elements in ``rows`` rows of ``n / rows``: about n / max(rows, row length)
    (at least ``SAMPLE_MIN`` samples, at most ``SAMPLE_MAX``), lowered until it is coprime to the row length.
    With max(rows, row length) samples the step is at most the row length, so every row is read, and successive
    samples' columns (i x step mod the row length) run through every residue, so every column is read too
    (break32 G2: one sample per row at a step of row length - 1 read only a band of ``rows`` columns of a wide
    matrix, e.g. input channels 227-255 of a 256x256x3x3 convolution, and 1 row in 7 of a 30,522-row embedding)."""
    if n <= SAMPLE_ALL:
        return 1
    row = n // max(rows, 1)
    count = min(n, max(SAMPLE_MIN, min(max(rows, row), SAMPLE_MAX)))
    k = max(1, n // count)
    while k > 1 and row > 1 and math.gcd(k, row) > 1:
        k -= 1  # down, not up: a step above the row length would skip rows (k = row - 1 is always coprime)
    return k


class ValueCheck:
    """The watched tensors' values at a baseline; ``changed()`` names the first tensor whose values differ.

    ``mode``: ``"sampled"`` or ``"full"`` (``ClientOptions.weight_check``). ``tensors``: (label, tensor)
    pairs; a tensor without a strided CPU layout (sparse, quantized, meta) is not checked by value.
    Sampled: a call reads only the samples, through views and offsets made once (0.3-1.8 ms per call for resnet18
    to vit_b_16 at a full core, README).
    """

    def __init__(self, tensors: Sequence[tuple[str, torch.Tensor]], mode: str = "sampled") -> None:
        self.mode = mode
        self._labels: list[str] = []
        self._tensors: list[torch.Tensor] = []
        self._views: dict[torch.dtype, list[torch.Tensor]] = {}
        """dtype -> strided views of dense tensors' storage (sampled mode), in ``_order``'s order."""
        self._order: dict[torch.dtype, list[int]] = {}
        self._gapped: list[tuple[int, torch.Tensor, torch.Tensor]] = []
        """(index, a 1-D view of the storage span, the samples' offsets in it) of tensors with gaps in their storage
        range or overlaps (a slice of a fused weight, an expanded buffer): one ``index_select`` per call (break33
        V2: a copy of the whole tensor per call, 50-154 ms for a 4096-column slice or a GPT-2-sized embedding)."""
        for label, t in tensors:
            if t.layout is not torch.strided or t.is_quantized or t.device.type == "meta" or t.is_nested:
                continue
            i = len(self._tensors)
            self._labels.append(label)
            self._tensors.append(t)
            if mode != "sampled":
                continue
            n = t.numel()
            if n == 0:
                continue
            if dense_layout(t.shape, t.stride()):  # in storage order: rows are the outermost dimension in memory
                k = _stride(n, _outer_size(t))
                view = torch.as_strided(t.detach(), ((n - 1) // k + 1,), (k,), t.storage_offset())
                self._views.setdefault(t.dtype, []).append(view)
                self._order.setdefault(t.dtype, []).append(i)
            else:  # samples in logical order (rows along dim 0), read through their storage offsets
                self._gapped.append((i, *_offsets(t)))
        self._reference = self._read()

    def _read(self) -> tuple[dict[torch.dtype, torch.Tensor], list[torch.Tensor], list[str]]:
        """(dtype -> its samples' bytes, the gapped tensors' samples' bytes, the full digests)."""
        if self.mode == "full":
            return {}, [], [hashlib.sha256(tensor_bytes(t)).hexdigest() for t in self._tensors]
        joined = {dtype: torch.cat(views).view(torch.uint8) for dtype, views in self._views.items()}
        gapped = [span.index_select(0, offsets).view(torch.uint8) for _, span, offsets in self._gapped]
        return joined, gapped, []

    def unchanged(self) -> bool:
        """Whether every checked tensor still holds its baseline values (sampled: the samples; full: all bytes)."""
        return self.changed() is None

    def changed(self) -> str | None:
        """The label of the first tensor whose (sampled or full) values differ from the baseline, else None."""
        joined, gapped, digests = self._read()
        ref_joined, ref_gapped, ref_digests = self._reference
        for i, (now, then) in enumerate(zip(digests, ref_digests, strict=True)):
            if now != then:
                return self._labels[i]
        for dtype, now in joined.items():
            if torch.equal(now, ref_joined[dtype]):
                continue
            size = dtype.itemsize
            start = 0
            for i, view in zip(self._order[dtype], self._views[dtype], strict=True):
                end = start + view.numel() * size
                if not torch.equal(now[start:end], ref_joined[dtype][start:end]):
                    return self._labels[i]
                start = end
        for (i, _, _), now, then in zip(self._gapped, gapped, ref_gapped, strict=True):
            if not torch.equal(now, then):
                return self._labels[i]
        return None


def _offsets(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(a 1-D view of ``t``'s storage from its first element to its last, the storage offsets of its samples in it):
    the samples at a step of ``_stride(n, shape[0])`` over ``t``'s logical (row-major) order, so every index of
    every dimension is read, whatever the layout."""
    n = t.numel()
    rows = t.shape[0] if t.dim() > 1 else 1
    flat = torch.arange(0, n, _stride(n, rows), dtype=torch.int64)
    offsets = torch.zeros_like(flat)
    for size, stride in zip(reversed(t.shape), reversed(t.stride()), strict=True):
        offsets += (flat % size) * stride
        flat //= size
    span = sum((size - 1) * stride for size, stride in zip(t.shape, t.stride(), strict=True)) + 1
    return torch.as_strided(t.detach(), (span,), (1,), t.storage_offset()), offsets
