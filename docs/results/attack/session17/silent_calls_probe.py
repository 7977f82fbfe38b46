"""Calls that never send their first message, and calls left running when their token is revoked (attack17 probe).

    PYTHONPATH=$PWD python docs/results/attack/session17/silent_calls_probe.py silent N [CHANNELS]
    PYTHONPATH=$PWD python docs/results/attack/session17/silent_calls_probe.py strangers N [CHANNELS]
    PYTHONPATH=$PWD python docs/results/attack/session17/silent_calls_probe.py revoke
    PYTHONPATH=$PWD python docs/results/attack/session17/silent_calls_probe.py burst N MIB [TOKENS]

PROBE_ROOT=DIR runs the server of another checkout (the version before the fix).

silent: a tenant with a valid token opens N calls over CHANNELS connections (default 4) with grpc.aio and sends
nothing: N/3 Session streams (no OpenSession), N/3 unary Hello calls (headers, no message: on the wire a unary call
is a request stream), N/3 UploadWeights streams (no UploadHeader). Prints the server's RSS and CPU before and after,
how many calls the server still held open 15 s later (and 25 s later), and an honest client's Hello latency while
they are open. strangers: N Hello calls with a bad token, all at once (each waits in the tarpit for its refusal).
revoke: an UploadWeights call that sent its header and one chunk of a two-chunk weight, and a
ProfileGraph call running a long profile, then the tokens file is rewritten without the token and the server gets
SIGHUP: prints how long each call took to end after the reload and with which status.
burst: N Hello calls of MIB MiB each (a long client_version) at once, spread over TOKENS tenants (default 1) and
4 connections: prints the server's peak RSS (sampled every 20 ms) and how the calls ended.
No raw sockets; only loopback; everything stops by itself.
"""

import asyncio
import hashlib
import json
import os
import signal
import sys
import tempfile
import time

import grpc
import psutil

from edge_server.attacks import serve_subprocess
from protos.coinfer.v1 import coinfer_pb2 as pb

TOKEN = "alice-secret-123"
MD = (("authorization", f"Bearer {TOKEN}"),)
SVC = "/coinfer.v1.EdgeService/"


def _server(*flags):
    path = os.path.join(tempfile.mkdtemp(), "t.json")
    with open(path, "w") as f:
        f.write(json.dumps({"tenants": {"alice": {"token": TOKEN}, "bob": {"token": "bob-secret-4567"}}}))
    proc, addr = serve_subprocess("--auth-tokens", path, "--memory-mb", "1024", "--threads", "1", *flags,
                                  root=os.environ.get("PROBE_ROOT") or None)
    return proc, addr, path


def _cpu(ps):
    t = ps.cpu_times()
    return t.user + t.system


async def _hello_ms(addr, token="bob-secret-4567", n=5):
    async with grpc.aio.insecure_channel(addr) as ch:
        call = ch.unary_unary(SVC + "Hello", request_serializer=pb.HelloRequest.SerializeToString,
                              response_deserializer=pb.HelloResponse.FromString)
        ts = []
        for _ in range(n):
            t0 = time.perf_counter()
            await call(pb.HelloRequest(), metadata=(("authorization", f"Bearer {token}"),), timeout=60)
            ts.append((time.perf_counter() - t0) * 1e3)
        return sorted(ts)[len(ts) // 2]


async def silent(n: int, channels: int, strangers: bool = False) -> None:
    proc, addr, _ = _server()
    ps = psutil.Process(proc.pid)
    try:
        await asyncio.sleep(1)
        rss0, cpu0 = ps.memory_info().rss / 2**20, _cpu(ps)
        hello0 = await _hello_ms(addr)
        chs = [grpc.aio.insecure_channel(addr) for _ in range(channels)]
        calls = []
        t0 = time.monotonic()
        for i in range(n):
            ch = chs[i % channels]
            kind = ("Session", "Hello", "UploadWeights")[i % 3]
            if strangers:
                kind = "Hello"
                c = ch.unary_unary(SVC + kind, request_serializer=pb.HelloRequest.SerializeToString,
                                   response_deserializer=pb.HelloResponse.FromString)(
                    pb.HelloRequest(), metadata=(("authorization", "Bearer not-a-token"),))
                calls.append(c)
                continue
            if kind == "Session":
                m = ch.stream_stream(SVC + kind, request_serializer=pb.SessionRequest.SerializeToString,
                                     response_deserializer=pb.SessionResponse.FromString)
            else:
                req, resp = ((pb.HelloRequest, pb.HelloResponse) if kind == "Hello"
                             else (pb.UploadWeightsRequest, pb.UploadWeightsResponse))
                m = ch.stream_unary(SVC + kind, request_serializer=req.SerializeToString,
                                    response_deserializer=resp.FromString)
            c = m(metadata=MD)
            calls.append(c)
            if i % 200 == 199:
                await asyncio.sleep(0)
        open_s = time.monotonic() - t0
        await asyncio.sleep(5)
        hello1 = await _hello_ms(addr)
        await asyncio.sleep(10)
        alive15 = sum(not c.done() for c in calls)
        rss1, cpu1 = ps.memory_info().rss / 2**20, _cpu(ps)
        await asyncio.sleep(10)
        alive25 = sum(not c.done() for c in calls)
        codes = {}
        for i, c in enumerate(calls):
            if c.done():
                try:
                    code = (await c.code()).name
                except Exception as e:
                    code = type(e).__name__
                k = f"{'Hello' if strangers else ('Session', 'Hello', 'UploadWeights')[i % 3]} {code}"
                codes[k] = codes.get(k, 0) + 1
        what = "strangers" if strangers else "silent"
        print(f"{n} {what} calls on {channels} connection(s) (opened in {open_s:.1f} s): server RSS {rss0:.0f} -> "
              f"{rss1:.0f} MiB, server CPU {cpu1 - cpu0:.2f} s over ~15 s; still open after 15 s: {alive15}, after "
              f"25 s: {alive25}; ended: {codes}; honest Hello median {hello0:.1f} ms before, {hello1:.1f} ms with "
              "them open")
        for c in calls:
            c.cancel()
        for ch in chs:
            await ch.close()
    finally:
        proc.terminate()
        proc.wait()


def _chain(n):
    ops = [{"name": "x0", "target": "aten.zeros.default", "args": [[256, 256]],
            "kwargs": {"dtype": {"dtype": "float32"}, "device": {"device": None}, "pin_memory": False},
            "outputs": [{"dtype": "float32", "shape": [256, 256]}]}]
    for i in range(1, n):
        ops.append({"name": f"x{i}", "target": "aten.mm.default", "args": [{"t": f"x{i - 1}"}, {"t": f"x{i - 1}"}],
                    "kwargs": {}, "outputs": [{"dtype": "float32", "shape": [256, 256]}]})
    return json.dumps({"version": 1, "ops": ops, "inputs": {"x": {"dtype": "float32", "shape": [1]}},
                       "outputs": [f"x{n - 1}"], "weights": {}}).encode()


async def revoke() -> None:
    proc, addr, path = _server("--profile-cpu-s", "1000", "--profile-cpu-share", "10")
    try:
        async with grpc.aio.insecure_channel(addr) as ch:
            up = ch.stream_unary(SVC + "UploadWeights", request_serializer=pb.UploadWeightsRequest.SerializeToString,
                                 response_deserializer=pb.UploadWeightsResponse.FromString)(metadata=MD)
            data = os.urandom(2 << 20)
            sha = hashlib.sha256(data).hexdigest()
            await up.write(pb.UploadWeightsRequest(header=pb.UploadHeader()))
            await up.write(pb.UploadWeightsRequest(chunk=pb.WeightChunk(
                sha256=sha, dtype="uint8", shape=[len(data)], offset=0, total_bytes=len(data),
                data=data[: 1 << 20])))
            prof = ch.unary_unary(SVC + "ProfileGraph", request_serializer=pb.ProfileGraphRequest.SerializeToString,
                                  response_deserializer=pb.ProfileGraphResponse.FromString)(
                pb.ProfileGraphRequest(slice_spec_json=_chain(400), iterations=50, warmup=0), metadata=MD, timeout=600)
            await asyncio.sleep(3)
            with open(path, "w") as f:
                f.write(json.dumps({"tenants": {"bob": {"token": "bob-secret-4567"}}}))
            t0 = time.monotonic()
            os.kill(proc.pid, signal.SIGHUP)

            async def end(call, what):
                try:
                    await asyncio.wait_for(asyncio.shield(call), 20)
                    code = grpc.StatusCode.OK
                except grpc.aio.AioRpcError as e:
                    code = f"{e.code()} ({e.details()[:80]})"
                except TimeoutError:
                    call.cancel()
                    print(f"{what}: still running 20 s after the reload (cancelled by the probe)")
                    return
                print(f"{what}: ended {time.monotonic() - t0:.2f} s after the reload: {code}")

            await asyncio.gather(end(up, "UploadWeights (half a weight sent)"),
                                 end(prof, "ProfileGraph (400 mm x 50 iterations)"))
    finally:
        proc.terminate()
        proc.wait()


async def burst(n: int, mib: int, tokens: int) -> None:
    path = os.path.join(tempfile.mkdtemp(), "t.json")
    names = [f"t{i}" for i in range(tokens)]
    with open(path, "w") as f:
        f.write(json.dumps({"tenants": {k: {"token": f"{k}-secret-123"} for k in names}}))
    proc, addr = serve_subprocess("--auth-tokens", path, "--memory-mb", "1024", "--threads", "1",
                                  root=os.environ.get("PROBE_ROOT") or None)
    ps = psutil.Process(proc.pid)
    peak = [0.0]
    stop = asyncio.Event()

    async def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], ps.memory_info().rss / 2**20)
            await asyncio.sleep(0.02)

    try:
        await asyncio.sleep(1)
        rss0 = ps.memory_info().rss / 2**20
        opts = [("grpc.max_send_message_length", 16 << 20), ("grpc.max_receive_message_length", 16 << 20)]
        chs = [grpc.aio.insecure_channel(addr, options=opts) for _ in range(4)]
        body = "x" * (mib << 20)
        sampler = asyncio.ensure_future(sample())
        calls = []
        for i in range(n):
            m = chs[i % 4].unary_unary(SVC + "Hello", request_serializer=pb.HelloRequest.SerializeToString,
                                       response_deserializer=pb.HelloResponse.FromString)
            calls.append(m(pb.HelloRequest(client_version=body),
                           metadata=(("authorization", f"Bearer {names[i % tokens]}-secret-123"),), timeout=120))
        codes = {}
        t0 = time.monotonic()
        for c in calls:
            try:
                await c
                k = "OK"
            except grpc.aio.AioRpcError as e:
                k = e.code().name
            codes[k] = codes.get(k, 0) + 1
        took = time.monotonic() - t0
        stop.set()
        await sampler
        print(f"{n} Hello calls of {mib} MiB at once from {tokens} token(s): server RSS {rss0:.0f} -> peak "
              f"{peak[0]:.0f} MiB; all ended in {took:.1f} s: {codes}")
        for ch in chs:
            await ch.close()
    finally:
        proc.terminate()
        proc.wait()


if __name__ == "__main__":
    if sys.argv[1] in ("silent", "strangers"):
        asyncio.run(silent(int(sys.argv[2]), int(sys.argv[3]) if len(sys.argv) > 3 else 4, sys.argv[1] == "strangers"))
    elif sys.argv[1] == "burst":
        asyncio.run(burst(int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]) if len(sys.argv) > 4 else 1))
    else:
        asyncio.run(revoke())
