"""Bursts of big unary calls from one token (session 17's "not fixed"): what bounds the server's memory?

    flock /work/wt/.bench.lock env PYTHONPATH=$PWD python docs/results/attack/session18/burst_probe.py \
        N MIB VARIANT [VARIANT ...]

N Hello calls of MIB MiB each (a long ``client_version``) at once from one tenant's token over 4 connections,
against a fresh ``coinfer-edge serve --auth-tokens F --memory-mb 1024 --threads 1`` per VARIANT, one after another:
prints the server's RSS before, its peak (sampled every 20 ms) and after, the time the burst took, and how the
calls ended. VARIANT names grpc server options added to the server's own for the experiment (the server is started
through a wrapper that appends them to ``grpc.aio.server``'s options), or the server's own flags:

- ``plain``: the server as it is;
- ``nobdp``: ``grpc.http2.bdp_probe=0`` (HTTP/2 windows stay at their initial size unless a read asks for more);
- ``streams8``: ``grpc.max_concurrent_streams=8`` (per connection);
- ``flag:ARG=VALUE,...``: the server's own flags (e.g. ``flag:--max-reading-calls=4``);
- ``A+B``: both.

No raw sockets; only loopback; the server is stopped at the end of each variant.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time

import grpc
import psutil

from protos.coinfer.v1 import coinfer_pb2 as pb

SVC = "/coinfer.v1.EdgeService/"
TOKEN = "alice-secret-123"
_OPTIONS = {"plain": [], "nobdp": [["grpc.http2.bdp_probe", 0]], "streams8": [["grpc.max_concurrent_streams", 8]]}
_WRAPPER = """
import json, os, sys, grpc
extra = [tuple(o) for o in json.loads(os.environ["BURST_EXTRA_OPTIONS"])]
real = grpc.aio.server
def server(*a, options=None, **kw):
    return real(*a, options=list(options or []) + extra, **kw)
grpc.aio.server = server
from edge_server.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _serve(variant: str, tokens: str) -> tuple[subprocess.Popen, str]:
    flags = ["--auth-tokens", tokens, "--memory-mb", "1024", "--threads", "1"]
    extra: list = []
    for part in variant.split("+"):
        if part.startswith("flag:"):
            for kv in part[5:].split(","):
                flags += kv.split("=", 1)
        else:
            extra += _OPTIONS[part]
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(
        __file__))))))
    env = dict(os.environ, PYTHONPATH=root, BURST_EXTRA_OPTIONS=json.dumps(extra))
    proc = subprocess.Popen([sys.executable, "-c", _WRAPPER, "serve", "--host", "127.0.0.1", "--port", "0", *flags],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env, cwd=root)
    line = proc.stdout.readline()
    if "listening on" not in line:
        proc.kill()
        raise RuntimeError(f"server did not start: {line!r}")
    return proc, line.split("listening on", 1)[1].split()[0]


async def burst(n: int, mib: int, variant: str) -> str:
    path = os.path.join(tempfile.mkdtemp(), "t.json")
    with open(path, "w") as f:
        f.write(json.dumps({"tenants": {"alice": {"token": TOKEN}}}))
    proc, addr = _serve(variant, path)
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
        req = pb.HelloRequest(client_version="x" * (mib << 20)).SerializeToString()  # serialized once: the client's
        sampler = asyncio.ensure_future(sample())  # own memory stays ~MIB, not N x MIB
        t0 = time.monotonic()
        calls = [chs[i % 4].unary_unary(SVC + "Hello", request_serializer=lambda b: b,
                                        response_deserializer=pb.HelloResponse.FromString)(
            req, metadata=(("authorization", f"Bearer {TOKEN}"),), timeout=120) for i in range(n)]
        codes: dict[str, int] = {}
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
        for ch in chs:
            await ch.close()
        await asyncio.sleep(1)
        rss1 = ps.memory_info().rss / 2**20
        return (f"{variant:28s} {n} x {mib} MiB: server RSS {rss0:.0f} -> peak {peak[0]:.0f} -> {rss1:.0f} MiB "
                f"after; {took:.1f} s; {codes}")
    finally:
        proc.terminate()
        proc.wait(10)


if __name__ == "__main__":
    n, mib = int(sys.argv[1]), int(sys.argv[2])
    print(f"# {time.strftime('%H:%M', time.gmtime())} load {os.getloadavg()[0]:.2f}", flush=True)
    for v in sys.argv[3:]:
        print(asyncio.run(burst(n, mib, v)), flush=True)
