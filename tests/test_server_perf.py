"""Loopback throughput of weight upload and warm request latency against a server process.

Slow (run with ``make test-all`` or ``pytest -m slow -s`` to see the numbers). The floors asserted are
far below the ~150-400 MB/s measured on the 2-core CI machine: they only catch pathologies.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
import torch

from edge_server.tensor_codec import encode_weight_chunks
from protos.coinfer.v1 import coinfer_pb2 as pb
from protos.coinfer.v1 import coinfer_pb2_grpc as pb_grpc

ROOT = Path(__file__).resolve().parents[1]
MB = 1e6


@pytest.fixture(scope="module")
def address():
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "edge_server.cli", "serve", "--port", "0", "--cache-mb", "512"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        line = proc.stdout.readline()
        assert line.startswith("listening on "), line
        yield line.split()[-1]
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def _weights(n: int, numel: int) -> list[tuple[str, torch.Tensor]]:
    out = []
    for _ in range(n):
        t = torch.randn(numel)
        out.append((hashlib.sha256(t.numpy().tobytes()).hexdigest(), t))
    return out


@pytest.mark.slow
@pytest.mark.parametrize("chunk", [256 * 1024, 1024 * 1024])
def test_upload_throughput(address, chunk) -> None:
    items = _weights(4, 4 << 20)  # 4 x 16 MiB
    total = sum(t.numel() * 4 for _, t in items)
    with grpc.insecure_channel(address) as ch:
        stub = pb_grpc.EdgeServiceStub(ch)
        stub.Hello(pb.HelloRequest(tenant="perf"), timeout=10)
        up = [pb.UploadWeightsRequest(header=pb.UploadHeader(tenant=f"u{chunk}"))]
        sess = [pb.SessionRequest(open=pb.OpenSession(tenant=f"s{chunk}"))]
        for sha, t in items:
            for c in encode_weight_chunks(sha, t, chunk):
                up.append(pb.UploadWeightsRequest(chunk=c))
                sess.append(pb.SessionRequest(weight=c))
        t0 = time.perf_counter()
        r = stub.UploadWeights(iter(up), timeout=120)
        dt_up = time.perf_counter() - t0
        assert len(r.weights) == len(items)
        t0 = time.perf_counter()
        acks = sum(1 for m in stub.Session(iter(sess), timeout=120) if m.WhichOneof("msg") == "weight_stored")
        dt_sess = time.perf_counter() - t0
        assert acks == len(items)
    print(
        f"\nchunk {chunk >> 10} KiB: UploadWeights {total / MB / dt_up:.0f} MB/s, "
        f"Session stream {total / MB / dt_sess:.0f} MB/s ({total / MB:.0f} MB)"
    )
    assert total / dt_up > 20 * MB and total / dt_sess > 20 * MB
