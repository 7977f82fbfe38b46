"""The call gate's cost per call (session 18, item 3): Hello calls against servers with and without the gate, side by
side in one run.

    flock /work/wt/.bench.lock python docs/results/attack/session18/gate_cost.py [--calls 3000] [--rounds 3]
        [--before ROOT]

Servers (``coinfer-edge serve`` subprocesses on loopback, ``--auth-tokens``, ``--threads 1``): this checkout with the
gate (the default), this checkout with ``--max-calls-per-caller 0`` (no gate), and, with ``--before ROOT``, another
checkout's server with its gate (e.g. the commit before the interceptor's caller was passed on). One client process
makes ``--calls`` sequential valid Hello calls (bearer token) per server and round; rounds alternate the servers. Per
server: the server process's CPU (psutil, all threads, user + system) per call and the client's wall latency
(median, p90), medians over rounds. Prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import grpc
import psutil

ROOT = Path(__file__).resolve().parents[4]
sys.path.insert(0, str(ROOT))

from edge_server.attacks import serve_subprocess  # noqa: E402
from protos.coinfer.v1 import coinfer_pb2 as pb  # noqa: E402

TOKEN = "alice-secret-123"


def _cpu(pid: int) -> float:
    t = psutil.Process(pid).cpu_times()
    return t.user + t.system


def _measure(address: str, pid: int, calls: int) -> tuple[float, float, float]:
    """(server CPU us per call, client latency median us, p90 us) over ``calls`` sequential Hellos."""
    md = (("authorization", f"Bearer {TOKEN}"),)
    with grpc.insecure_channel(address) as ch:
        hello = ch.unary_unary("/coinfer.v1.EdgeService/Hello", request_serializer=pb.HelloRequest.SerializeToString,
                               response_deserializer=pb.HelloResponse.FromString)
        req = pb.HelloRequest(client_version="bench")
        for _ in range(200):
            hello(req, metadata=md, timeout=10)
        time.sleep(0.2)
        lat = []
        c0 = _cpu(pid)
        for _ in range(calls):
            t = time.perf_counter()
            hello(req, metadata=md, timeout=10)
            lat.append(time.perf_counter() - t)
        c1 = _cpu(pid)
    lat.sort()
    return (c1 - c0) / calls * 1e6, lat[len(lat) // 2] * 1e6, lat[int(len(lat) * 0.9)] * 1e6


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--calls", type=int, default=3000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--before", default=None, help="another checkout's root: its server (with its gate) too")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    tokens = Path(tempfile.mkdtemp()) / "tokens.json"
    tokens.write_text(json.dumps({"tenants": {"alice": {"token": TOKEN}}}))
    base = ("--auth-tokens", str(tokens), "--threads", "1")
    kinds = [("gate (this)", base, None), ("no gate (this)", (*base, "--max-calls-per-caller", "0"), None)]
    if args.before:
        kinds.append(("gate (before)", base, args.before))
    procs = []
    try:
        for name, flags, root in kinds:
            procs.append((name, *serve_subprocess(*flags, root=root)))
        samples: dict[str, list[tuple[float, float, float]]] = {k[0]: [] for k in kinds}
        load = [os.getloadavg()[0]]
        for _ in range(args.rounds):
            for name, proc, addr in procs:
                samples[name].append(_measure(addr, proc.pid, args.calls))
        load.append(os.getloadavg()[0])
    finally:
        for _, proc, _ in procs:
            proc.terminate()
            proc.wait(10)
    ref = statistics.median(s[0] for s in samples["no gate (this)"])
    rows = []
    print(f"{'server':16s} {'server CPU us/call':>19s} {'x no gate':>9s} {'latency med us':>15s} {'p90 us':>8s}")
    for name, vals in samples.items():
        cpu = statistics.median(v[0] for v in vals)
        med = statistics.median(v[1] for v in vals)
        p90 = statistics.median(v[2] for v in vals)
        rows.append({"server": name, "cpu_us": cpu, "latency_med_us": med, "latency_p90_us": p90, "rounds": vals})
        print(f"{name:16s} {cpu:19.0f} {cpu / ref:9.3f} {med:15.0f} {p90:8.0f}")
    print(f"{args.calls} sequential Hello calls per server and round, {args.rounds} rounds, medians over rounds; "
          f"load average {load[0]:.2f} -> {load[1]:.2f}")
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "calls": args.calls, "rounds": args.rounds, "load": load},
                                        indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
