"""Tensors rebuilt from received bytes are aligned like torch's own: CPU kernels' bits depend on it."""

from __future__ import annotations

import torch

from edge_server.tensor_codec import TensorAssembler
from edge_server.tensor_codec import tensor_from_bytes as edge_from_bytes
from modelgraph.tensors import ALIGN_BYTES, TensorMeta, aligned_buffer, tensor_bytes, tensor_from_bytes


def test_aligned_buffer_is_aligned_writable_and_sized():
    for n in (1, 7, 64, 4097):
        buf = aligned_buffer(n)
        assert len(buf) == n and not buf.readonly
        assert torch.frombuffer(buf, dtype=torch.uint8).data_ptr() % ALIGN_BYTES == 0
        buf[0:1] = b"\x05"
        assert buf[0] == 5


def test_misaligned_bytes_give_an_aligned_tensor_with_the_same_bits():
    torch.manual_seed(0)
    lin = torch.nn.Linear(256, 10)
    x = torch.randn(1, 256)
    want = lin(x)
    raw = bytes(tensor_bytes(x))
    for off in range(0, 64, 4):  # every 4-byte offset from the allocator's alignment
        blob = aligned_buffer(len(raw) + off)
        blob[off:] = raw
        for t in (tensor_from_bytes(blob[off:], TensorMeta.of(x, keep_stride=False)),
                  edge_from_bytes(blob[off:], torch.float32, (1, 256))):
            assert t.data_ptr() % ALIGN_BYTES == 0
            torch.testing.assert_close(lin(t), want, rtol=0, atol=0)


def test_assembled_cut_tensor_is_aligned_without_a_copy():
    x = torch.randn(3, 1000)
    raw = bytes(tensor_bytes(x))
    from edge_server.tensor_codec import TensorPiece

    asm = TensorAssembler("x", torch.float32, (3, 1000), len(raw))
    for off in range(0, len(raw), 5000):
        asm.add(TensorPiece(1, "x", torch.float32, (3, 1000), off, len(raw), raw[off : off + 5000]))
    t = asm.tensor()
    assert t.data_ptr() % ALIGN_BYTES == 0
    assert t.data_ptr() == asm.tensor().data_ptr()  # a view of the assembler's buffer, not a copy
    torch.testing.assert_close(t, x, rtol=0, atol=0)
