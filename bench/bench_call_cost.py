"""What one gRPC call costs the edge server's process, in CPU: grpcio's own floor against coinfer's calls.

    python bench/bench_call_cost.py [--calls 2000] [--rounds 2] [--json PATH]

Why: under the ``fuzz`` attack of ``bench/bench_attacks.py`` (a client that sends malformed messages one
after another, as fast as it is answered) the victim's latency rises 1.9-2.8x, and the server's profile
shows the time in the RPC machinery, not in one of our checks. This bench separates the two: the server
process's CPU time (``psutil``, all its threads: user + system) per call, for

- ``grpc bare ok`` / ``grpc bare abort``: a ``grpc.aio`` server with one unary handler that returns at once
  or aborts with INVALID_ARGUMENT (grpcio's own per-call floor; no coinfer code);
- ``coinfer Hello``: a valid call to ``coinfer-edge serve`` (default flags, loopback, no TLS, no tokens);
- ``coinfer QueryWeights garbage`` / ``coinfer ProfileGraph garbage``: undecodable bytes (INVALID_ARGUMENT).

Calls are sequential from one client process (the attack's shape); rounds alternate the servers, and the
table gives the median over rounds. Prints a table and writes JSON (``us_per_call`` per kind).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import grpc
import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from edge_server.attacks import serve_subprocess  # noqa: E402

_BARE_SERVER = textwrap.dedent(
    """
    import asyncio, sys, grpc
    async def ok(req, ctx):
        return b"ok"
    async def abort(req, ctx):
        await ctx.abort(grpc.StatusCode.INVALID_ARGUMENT, "bad request")
    async def main():
        server = grpc.aio.server()
        handlers = {"Ok": grpc.unary_unary_rpc_method_handler(ok), "Abort": grpc.unary_unary_rpc_method_handler(abort)}
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("bare.Bare", handlers),))
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        print(port, flush=True)
        await server.wait_for_termination()
    asyncio.run(main())
    """
)


def _ident(b: bytes) -> bytes:  # raw bytes on the wire
    return b


def _server_cpu(pid: int) -> float:
    t = psutil.Process(pid).cpu_times()
    return t.user + t.system


def _measure(address: str, pid: int, method: str, payload: bytes, calls: int) -> tuple[float, dict[str, int]]:
    """Server CPU microseconds per call over ``calls`` sequential calls (after 100 warm-up calls)."""
    with grpc.insecure_channel(address) as ch:
        fn = ch.unary_unary(method, request_serializer=_ident, response_deserializer=_ident)
        codes: dict[str, int] = {}

        def go(n: int) -> None:
            for _ in range(n):
                try:
                    fn(payload, timeout=10)
                    code = "OK"
                except grpc.RpcError as e:
                    code = e.code().name
                codes[code] = codes.get(code, 0) + 1

        go(100)
        codes.clear()
        time.sleep(0.2)  # let the warm-up's last work settle
        c0 = _server_cpu(pid)
        go(calls)
        c1 = _server_cpu(pid)
    return (c1 - c0) / calls * 1e6, codes


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--calls", type=int, default=2000)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    if args.calls < 1 or args.rounds < 1:
        ap.error("--calls and --rounds must be >= 1")

    bare = subprocess.Popen([sys.executable, "-c", _BARE_SERVER], stdout=subprocess.PIPE, text=True)
    coinfer, coinfer_addr = serve_subprocess()
    try:
        bare_addr = f"127.0.0.1:{int(bare.stdout.readline())}"
        svc = "/coinfer.v1.EdgeService"
        kinds = [
            ("grpc bare ok", bare_addr, bare.pid, "/bare.Bare/Ok", b"x"),
            ("grpc bare abort", bare_addr, bare.pid, "/bare.Bare/Abort", b"x"),
            ("coinfer Hello", coinfer_addr, coinfer.pid, "/coinfer.v1.EdgeService/Hello", b""),
            ("coinfer QueryWeights garbage", coinfer_addr, coinfer.pid, f"{svc}/QueryWeights", b"\xff" * 16),
            ("coinfer ProfileGraph garbage", coinfer_addr, coinfer.pid, f"{svc}/ProfileGraph", b"\xff" * 16),
        ]
        samples: dict[str, list[float]] = {k[0]: [] for k in kinds}
        codes: dict[str, dict[str, int]] = {}
        load = [os.getloadavg()]
        for _ in range(args.rounds):
            for name, addr, pid, method, payload in kinds:
                us, c = _measure(addr, pid, method, payload, args.calls)
                samples[name].append(us)
                codes[name] = c
        load.append(os.getloadavg())
    finally:
        for p in (bare, coinfer):
            p.terminate()
            p.wait(10)

    floor = statistics.median(samples["grpc bare ok"])
    rows = []
    print(f"{'call':32s} {'server CPU us/call':>19s} {'x bare ok':>9s}  answers (last round)")
    for name, values in samples.items():
        med = statistics.median(values)
        row = {"call": name, "us_per_call": med, "rounds": values, "x_bare_ok": med / floor, "codes": codes[name]}
        rows.append(row)
        print(f"{name:32s} {med:19.0f} {med / floor:9.2f}  {codes[name]}")
    print(f"{args.calls} sequential calls per kind and round, {args.rounds} round(s);", end=" ")
    print(f"load average {load[0][0]:.1f} -> {load[1][0]:.1f}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(
            json.dumps(
                {
                    "calls": args.calls,
                    "rounds": args.rounds,
                    "load_average": load,
                    "rows": rows,
                    "command": " ".join(["python", "bench/bench_call_cost.py", *(argv or sys.argv[1:])]),
                },
                indent=1,
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
