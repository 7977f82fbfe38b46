"""A tokenless health prober during a flood of bad-token calls from the same loopback address (session 25).

    PYTHONPATH=ROOT python docs/results/attack/session25/health_flood_probe.py [ROOT] [--rate M] [--seconds S]
        [--probes N] [--kind bad|none|health] [--memory-mb MB]

Starts ``coinfer-edge serve`` from checkout ROOT (default: this one) on 127.0.0.1, port 0, with ``--auth-tokens``
and ``--memory-mb`` (default 1024), then for ``S`` seconds (default 8) sends ``M`` Hello calls per second (default 50)
from 127.0.0.1 with a wrong bearer token (``--kind none``: none), each with a 5 s deadline and never awaited (they
queue in the tarpit) (``--kind health``: tokenless health Checks instead, each sent when the last is answered, as
fast as the server answers; ``M`` unused), while a prober on another channel from the same address calls
``grpc.health.v1.Health/Check`` without a token every ``S / N`` s with a 1 s deadline (``N`` probes, default 16).
Prints one ``RESULT {json}`` line: probes SERVING of N, the codes of the rest, flood calls sent, their answers'
codes, and the server's CPU seconds (user + system, psutil) over the flood. Everything ends by itself: the flood
after S s (its calls within 5 s more), the server by SIGTERM at the end (SIGKILL after 15 s)."""

from __future__ import annotations

import argparse
import collections
import json
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import grpc
import psutil
from grpc_health.v1 import health_pb2, health_pb2_grpc


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("root", nargs="?", default=str(Path(__file__).resolve().parents[4]))
    p.add_argument("--rate", type=float, default=50.0)
    p.add_argument("--seconds", type=float, default=8.0)
    p.add_argument("--probes", type=int, default=16)
    p.add_argument("--kind", choices=("bad", "none", "health"), default="bad")
    p.add_argument("--memory-mb", type=int, default=1024)
    args = p.parse_args()
    root = Path(args.root).resolve()
    sys.path.insert(0, str(root))
    from protos.coinfer.v1 import coinfer_pb2 as pb
    from protos.coinfer.v1 import coinfer_pb2_grpc as pbg

    with tempfile.TemporaryDirectory() as tmp:
        tokens = Path(tmp) / "tokens.json"
        tokens.write_text(json.dumps({"tenants": {"alice": {"token": secrets.token_hex(16)}}}))
        cmd = [sys.executable, "-m", "edge_server.cli", "serve", "--host", "127.0.0.1", "--port", "0", "--grace", "1",
               "--auth-tokens", str(tokens), "--memory-mb", str(args.memory_mb), "--threads", "1"]
        proc = subprocess.Popen(cmd, cwd=root, env=dict(os.environ, PYTHONPATH=str(root)), stdout=subprocess.PIPE,
                                stderr=subprocess.DEVNULL, text=True)
        try:
            port = None
            deadline = time.monotonic() + 120
            while port is None and time.monotonic() < deadline:
                line = proc.stdout.readline()
                if not line:
                    break
                if line.startswith("listening on "):
                    port = int(line.split()[2].rsplit(":", 1)[1])
            if port is None:
                raise SystemExit("server did not start")
            address = f"127.0.0.1:{port}"
            server = psutil.Process(proc.pid)
            md = (("authorization", "Bearer not-a-valid-token"),) if args.kind == "bad" else ()
            flood_codes: collections.Counter = collections.Counter()
            lock = threading.Lock()
            sent = 0

            def health_flood(stop_at: float) -> None:
                nonlocal sent
                with grpc.insecure_channel(address) as ch:
                    check = health_pb2_grpc.HealthStub(ch).Check
                    while (left := stop_at - time.monotonic()) > 0:
                        sent += 1
                        try:
                            check(health_pb2.HealthCheckRequest(), timeout=left)
                            code = "OK"
                        except grpc.RpcError as e:
                            code = e.code().name
                        with lock:
                            flood_codes[code] += 1

            def flood(stop_at: float) -> None:
                nonlocal sent
                if args.kind == "health":
                    return health_flood(stop_at)
                with grpc.insecure_channel(address) as ch:
                    stub = pbg.EdgeServiceStub(ch)
                    futures = []
                    step = 1.0 / args.rate
                    t = time.monotonic()
                    while t < stop_at:
                        futures.append(stub.Hello.future(pb.HelloRequest(client_version="flood"), metadata=md,
                                                         timeout=5.0))
                        sent += 1
                        t += step
                        time.sleep(max(0.0, t - time.monotonic()))
                    for f in futures:
                        try:
                            f.result()
                            code = "OK"
                        except grpc.RpcError as e:
                            code = e.code().name
                        with lock:
                            flood_codes[code] += 1

            cpu0 = sum(server.cpu_times()[:2])
            t0 = time.monotonic()
            th = threading.Thread(target=flood, args=(t0 + args.seconds,), daemon=True)
            th.start()
            probes: list[str] = []
            details: list[str] = []
            every = args.seconds / args.probes
            with grpc.insecure_channel(address) as ch:
                stub = health_pb2_grpc.HealthStub(ch)
                for i in range(args.probes):
                    time.sleep(max(0.0, t0 + (i + 0.5) * every - time.monotonic()))
                    try:
                        r = stub.Check(health_pb2.HealthCheckRequest(), timeout=1.0)
                        probes.append(health_pb2.HealthCheckResponse.ServingStatus.Name(r.status))
                    except grpc.RpcError as e:
                        probes.append(e.code().name)
                        if len(details) < 2:
                            details.append(e.details())
            cpu_flood = sum(server.cpu_times()[:2]) - cpu0
            th.join(30)
            cpu_all = sum(server.cpu_times()[:2]) - cpu0
            print("RESULT " + json.dumps({
                "root": str(root), "kind": args.kind, "rate": args.rate, "seconds": args.seconds,
                "serving": probes.count("SERVING"), "probes": len(probes),
                "probe_codes": dict(collections.Counter(probes)), "probe_sequence": "".join(
                    "." if c == "SERVING" else "x" for c in probes), "probe_errors": details, "flood_sent": sent,
                "flood_codes": dict(flood_codes), "server_cpu_s_during_flood": round(cpu_flood, 2),
                "server_cpu_s_until_flood_answered": round(cpu_all, 2),
                "load": os.getloadavg(),
            }), flush=True)
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()


if __name__ == "__main__":
    main()
