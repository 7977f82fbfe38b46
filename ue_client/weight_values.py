"""What the watched weights hold, checked by value: changes torch's version counters do not record.

A write through ``param.data`` (``p.data.mul_(2)``, an EMA ``p.data.copy_(q)``, WGAN clipping
``p.data.clamp_(...)``, ``bn.running_mean.data.fill_(...)``) goes to the parameter's storage through a
tensor with its own version counter: the parameter's ``_version`` does not move, so ``WeightWatch``'s
counters saw nothing, the local path read the new values and the server kept the bytes it was sent
(break31 F1: 0.25-1.78 off eager through the server, no error). torch keeps no record of such a write,
so the only way to see it is to look at the values.

``ValueCheck`` keeps, per watched tensor, either a sample of its elements (``"sampled"``: strided views
of its storage, read with one ``torch.cat`` per dtype and compared byte for byte, so NaN weights compare
equal to themselves) or the sha256 of all its bytes (``"full"``). The sample takes at least
``SAMPLE_MIN`` elements and, in a tensor of two dims or more seen as rows along dim 0 (output channels), as many
as it has rows or columns, whichever is more (up to ``SAMPLE_MAX``), at a step coprime to the row length, so that
every row and every column is read: a change to a whole tensor, to one row, to one column, or to any element of a
vector of up to ``SAMPLE_MAX`` elements is seen; a change to a few elements of a matrix no sample falls on is seen
only by ``"full"``.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence

import torch

SAMPLE_MIN = 64
"""Elements sampled per tensor at least (all of a smaller one)."""

SAMPLE_MAX = 65536
"""Elements sampled per tensor at most: a matrix with more rows or columns than this (an embedding of a larger
vocabulary) has only some of its rows or columns read."""


def _dense(t: torch.Tensor) -> bool:
    """Whether ``t``'s elements fill one storage range with no gap and no overlap (any dim order)."""
    expected = 1
    for size, stride in sorted(((s, st) for s, st in zip(t.shape, t.stride(), strict=True) if s != 1),
                               key=lambda p: p[1]):
        if stride != expected:
            return False
        expected *= size
    return True


def _stride(n: int, rows: int) -> int:
    """The sample's step over ``n`` elements in ``rows`` rows of ``n / rows``: about n / max(rows, row length)
    (at least ``SAMPLE_MIN`` samples, at most ``SAMPLE_MAX``), lowered until it is coprime to the row length.
    With max(rows, row length) samples the step is at most the row length, so every row is read, and successive
    samples' columns (i x step mod the row length) run through every residue, so every column is read too
    (break32 G2: one sample per row at a step of row length - 1 read only a band of ``rows`` columns of a wide
    matrix, e.g. input channels 227-255 of a 256x256x3x3 convolution, and 1 row in 7 of a 30,522-row embedding)."""
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
    Sampled: a dense tensor (any dim order) is read through a strided view of its storage range, made
    once, so a call reads only the samples (~0.1 ms for resnet18's 122 tensors at a full core); a tensor
    with gaps (a slice of a larger one) through its own first-dim view, copied per call.
    """

    def __init__(self, tensors: Sequence[tuple[str, torch.Tensor]], mode: str = "sampled") -> None:
        self.mode = mode
        self._labels: list[str] = []
        self._tensors: list[torch.Tensor] = []
        self._views: dict[torch.dtype, list[torch.Tensor]] = {}
        """dtype -> strided views of dense tensors' storage (sampled mode), in ``_order``'s order."""
        self._order: dict[torch.dtype, list[int]] = {}
        self._gapped: list[tuple[int, torch.Tensor]] = []
        """(index, tensor) of tensors with gaps in their storage range, sampled by slicing dim 0 per call."""
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
            rows = t.shape[0] if t.dim() > 1 else 1  # a vector: one row, every element up to SAMPLE_MAX
            k = _stride(n, rows)
            if _dense(t):
                view = torch.as_strided(t.detach(), ((n - 1) // k + 1,), (k,), t.storage_offset())
                self._views.setdefault(t.dtype, []).append(view)
                self._order.setdefault(t.dtype, []).append(i)
            else:
                self._gapped.append((i, t.detach()))
        self._reference = self._read()

    def _read(self) -> tuple[dict[torch.dtype, torch.Tensor], list[torch.Tensor], list[str]]:
        """(dtype -> its samples' bytes, the gapped tensors' samples' bytes, the full digests)."""
        if self.mode == "full":
            return {}, [], [hashlib.sha256(_bytes(t)).hexdigest() for t in self._tensors]
        joined = {dtype: torch.cat(views).view(torch.uint8) for dtype, views in self._views.items()}
        gapped = [_bytes_of(_rows_sample(t)) for _, t in self._gapped]
        return joined, gapped, []

    def unchanged(self) -> bool:
        """Whether every checked tensor still holds its baseline values (sampled: the samples; full: all bytes)."""
        joined, gapped, digests = self._read()
        ref_joined, ref_gapped, ref_digests = self._reference
        return (digests == ref_digests and all(torch.equal(joined[d], ref_joined[d]) for d in joined)
                and all(torch.equal(a, b) for a, b in zip(gapped, ref_gapped, strict=True)))

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
        for (i, _), now, then in zip(self._gapped, gapped, ref_gapped, strict=True):
            if not torch.equal(now, then):
                return self._labels[i]
        return None


def _rows_sample(t: torch.Tensor) -> torch.Tensor:
    """A sample of a tensor with gaps: every k-th index of dim 0 (a view), flattened (a copy)."""
    if t.dim() == 0:
        return t.reshape(1)
    rows = t.shape[0]
    step = max(1, rows // SAMPLE_MAX)
    return t[::step].reshape(-1)[:: max(1, t[::step].numel() // SAMPLE_MAX)]


def _bytes_of(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.uint8) if t.dim() else t.reshape(1).view(torch.uint8)


def _bytes(t: torch.Tensor) -> memoryview:
    """All of ``t``'s bytes in its logical order (a contiguous copy where it has another layout)."""
    c = t.detach().cpu().contiguous().reshape(-1)
    return memoryview(c.view(torch.uint8).numpy()) if c.numel() else memoryview(b"")
