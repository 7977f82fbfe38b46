"""``modelgraph.tensors.tensor_bytes``: the bytes of a tensor in contiguous order, whichever of its two paths
(numpy's view of a plain contiguous CPU tensor, or the general detach / contiguous / uint8 view) it takes."""

from __future__ import annotations

import pytest
import torch

from modelgraph.tensors import tensor_bytes


def _want(t: torch.Tensor) -> bytes:
    t = t.detach().contiguous()
    return t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""


CASES = {
    "float32": torch.randn(2, 3), "int64": torch.arange(10), "float16": torch.randn(2, 2, dtype=torch.float16),
    "float64 slice": torch.randn(4, 4, dtype=torch.float64)[1:], "uint8": torch.arange(7, dtype=torch.uint8),
    "transposed": torch.randn(4, 3).t(), "scalar": torch.tensor(3.0), "empty": torch.zeros(0, 3),
    "bool": torch.tensor([True, False, True]), "bfloat16": torch.randn(3, dtype=torch.bfloat16),
    "requires grad": torch.randn(3, requires_grad=True),
    "size-1 dims, odd strides": torch.randn(1, 3, 1, 1).as_strided((1, 3, 1, 1), (100, 1, 7, 9)),
    "expanded size 1": torch.randn(1).expand(1, 1), "transposed size 1": torch.randn(2, 1, 3).transpose(0, 1),
    "channels_last": torch.randn(1, 3, 4, 5).to(memory_format=torch.channels_last),
}


@pytest.mark.parametrize("name", list(CASES))
def test_tensor_bytes_equal_the_contiguous_bytes(name: str) -> None:
    t = CASES[name]
    got = tensor_bytes(t)
    want = _want(t)
    assert bytes(got) == want and got.nbytes == len(want) == len(got)
    assert got.format == "B" and got.ndim == 1 and got.c_contiguous


def test_tensor_bytes_is_a_view_of_a_contiguous_tensor() -> None:
    t = torch.zeros(4, dtype=torch.float32)
    b = tensor_bytes(t)
    t[0] = 1.0  # no copy: the bytes change with the tensor
    assert bytes(b[:4]) == torch.tensor([1.0]).numpy().tobytes()
