"""review18 F5: with ``--max-reading-calls 2``, 48 calls at once from one token whose first message is 4 MiB: Hellos
(unary) or Sessions (the OpenSession carries a 4 MiB slice spec, refused once read); ``-seq``: the 48 one after
another. Prints the server process's peak
RSS growth (psutil, sampled every 10 ms) and the calls' status codes.

    PROBE_ROOT=DIR python docs/results/attack/session19/session_burst_probe.py hello|session|hello-seq|session-seq

PROBE_ROOT runs another checkout's server (the version before the fix); default this checkout.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import tempfile
from collections import Counter
from pathlib import Path

import grpc
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[4]))

from edge_server.attacks import serve_subprocess
from protos.coinfer.v1 import coinfer_pb2 as pb

TOKEN = "alice-secret-123"
MD = (("authorization", f"Bearer {TOKEN}"),)


async def attack(ps: psutil.Process, addr: str, kind: str) -> tuple[float, Counter]:
    peak, stop = [0], asyncio.Event()

    async def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], ps.memory_info().rss)
            await asyncio.sleep(0.01)

    opts = [("grpc.max_send_message_length", 16 << 20)]
    chs = [grpc.aio.insecure_channel(addr, options=opts) for _ in range(2)]
    await asyncio.sleep(1.0)
    rss0 = ps.memory_info().rss
    sampler = asyncio.ensure_future(sample())
    if kind.startswith("hello"):
        body = pb.HelloRequest(client_version="x" * (4 << 20)).SerializeToString()
        f = [ch.unary_unary("/coinfer.v1.EdgeService/Hello", request_serializer=lambda b: b,
                            response_deserializer=pb.HelloResponse.FromString) for ch in chs]

        async def one(i):
            try:
                await f[i % 2](body, metadata=MD, timeout=60)
                return "OK"
            except grpc.aio.AioRpcError as e:
                return e.code().name
    else:
        body = pb.SessionRequest(open=pb.OpenSession(model_id="m", slice_id="s", slice_spec_json=b"x" * (4 << 20)))
        body = body.SerializeToString()
        f = [ch.stream_stream("/coinfer.v1.EdgeService/Session", request_serializer=lambda b: b,
                              response_deserializer=pb.SessionResponse.FromString) for ch in chs]

        async def one(i):
            call = f[i % 2](iter([body]), metadata=MD, timeout=60)
            try:
                async for _ in call:
                    pass
                return "OK"
            except grpc.aio.AioRpcError as e:
                return e.code().name if e.code() != grpc.StatusCode.INTERNAL else f"INTERNAL {e.details()[:80]}"
    if kind.endswith("-seq"):  # one after another: what the server keeps of each processed message
        codes = [await one(i) for i in range(48)]
    else:
        codes = await asyncio.gather(*(one(i) for i in range(48)))
    stop.set()
    await sampler
    for ch in chs:
        await ch.close()
    return (peak[0] - rss0) / 2**20, Counter(codes)


def main(kind: str) -> None:
    path = os.path.join(tempfile.mkdtemp(), "tokens.json")
    Path(path).write_text(json.dumps({"tenants": {"alice": {"token": TOKEN}}}))
    root = os.environ.get("PROBE_ROOT") or None
    proc, addr = serve_subprocess("--auth-tokens", path, "--threads", "1", "--max-reading-calls", "2", root=root)
    try:
        grown, codes = asyncio.run(attack(psutil.Process(proc.pid), addr, kind))
        print(f"{kind} x48 of 4 MiB, {root or 'this checkout'}: peak RSS growth {grown:.0f} MiB, {dict(codes)}",
              flush=True)
    finally:
        proc.terminate()
        proc.wait(10)


if __name__ == "__main__":
    main(sys.argv[1])
