"""bound21 probe: two colluding tenants hold all server-wide reading slots with silent Session calls (2 + 2 of 4,
``max_reading_bytes`` 32 MiB); a third tenant's Hello, sent ``--after`` seconds later, timed with its status.

    PYTHONPATH=ROOT python docs/results/attack/session21/collude_probe.py --after 1 6 [--first-message-s 10]

ROOT: the checkout whose server runs (in process, a real gRPC server on loopback port 0). The default
``reading_grace_s`` (5 s) of the code that has it."""

from __future__ import annotations

import argparse
import json
import tempfile
import threading
import time
from pathlib import Path

import grpc

from edge_server.config import MiB, ServerConfig
from edge_server.testing import ServerThread
from protos.coinfer.v1 import coinfer_pb2 as pb
from protos.coinfer.v1 import coinfer_pb2_grpc as pbg

TOKENS = {n: f"{n}-probe-secret-21" for n in ("alice", "bob", "carol")}


def md(n):
    return (("authorization", f"Bearer {TOKENS[n]}"),)


def one(after: float, first_message_s: float) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "tokens.json"
        path.write_text(json.dumps({"tenants": {n: {"token": t} for n, t in TOKENS.items()}}))
        cfg = ServerConfig(cache_bytes=16 * MiB, staging_bytes=16 * MiB, threads=1, auth_tokens_file=str(path),
                           max_reading_bytes=32 * MiB, first_message_s=first_message_s)
        stop = threading.Event()

        def nothing():
            stop.wait(60)
            return
            yield

        with ServerThread(config=cfg) as srv, grpc.insecure_channel(srv.address) as att, \
                grpc.insecure_channel(srv.address) as honest:
            calls = [pbg.EdgeServiceStub(att).Session(nothing(), timeout=60, metadata=md(o))
                     for o in ("alice", "alice", "bob", "bob")]
            ends: list = []

            def run(c):
                try:
                    next(c, None)
                except grpc.RpcError as e:
                    if not stop.is_set():
                        ends.append(e.code().name)

            threads = [threading.Thread(target=run, args=(c,), daemon=True) for c in calls]
            for t in threads:
                t.start()
            time.sleep(after)
            t0 = time.monotonic()
            try:
                pbg.EdgeServiceStub(honest).Hello(pb.HelloRequest(client_version="c"), metadata=md("carol"),
                                                  timeout=first_message_s + 5)
                code, details = "OK", ""
            except grpc.RpcError as e:
                code, details = e.code().name, e.details()
            wall = time.monotonic() - t0
            time.sleep(0.2)
            stop.set()
            for c in calls:
                c.cancel()
            for t in threads:
                t.join(10)
    return {"after_s": after, "hello": code, "hello_s": round(wall, 3), "details": details[:160],
            "silent_calls_ended": sorted(ends)}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--after", type=float, nargs="+", default=[1.0, 6.0])
    ap.add_argument("--first-message-s", type=float, default=10.0)
    args = ap.parse_args()
    for a in args.after:
        print(json.dumps(one(a, args.first_message_s)), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
