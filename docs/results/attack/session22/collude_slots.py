"""server22 probe: as many colluding tenants as server-wide reading slots (4, as ``--memory-mb 1024`` makes), one
silent Session call each (none over its share); another tenant's Hello sent ``--after`` s later, timed with its
status, and how the silent calls ended. Server defaults otherwise (``--first-message-s`` 120; the checkout's
``--contended-first-message-s`` where it has one).

    cd ROOT && PYTHONPATH=ROOT python docs/results/attack/session22/collude_slots.py [--after 1]

ROOT: the checkout whose server runs (in process, a real gRPC server on loopback port 0)."""

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

NAMES = ("alice", "bob", "carol", "dave", "erin")
TOKENS = {n: f"{n}-probe-secret-22" for n in NAMES}


def md(n):
    return (("authorization", f"Bearer {TOKENS[n]}"),)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--after", type=float, default=1.0)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "tokens.json"
        path.write_text(json.dumps({"tenants": {n: {"token": t} for n, t in TOKENS.items()}}))
        cfg = ServerConfig(cache_bytes=16 * MiB, staging_bytes=16 * MiB, threads=1, auth_tokens_file=str(path),
                           max_reading_bytes=32 * MiB)
        stop = threading.Event()

        def nothing():
            stop.wait(300)
            return
            yield

        with ServerThread(config=cfg) as srv, grpc.insecure_channel(srv.address) as att, \
                grpc.insecure_channel(srv.address) as honest:
            calls = [pbg.EdgeServiceStub(att).Session(nothing(), timeout=300, metadata=md(o)) for o in NAMES[:4]]
            ends: list = []
            t_start = time.monotonic()

            def run(c):
                try:
                    next(c, None)
                except grpc.RpcError as e:
                    if not stop.is_set():
                        ends.append((round(time.monotonic() - t_start, 2), e.code().name, e.details()[:200]))

            threads = [threading.Thread(target=run, args=(c,), daemon=True) for c in calls]
            for t in threads:
                t.start()
            time.sleep(args.after)
            t0 = time.monotonic()
            try:
                pbg.EdgeServiceStub(honest).Hello(pb.HelloRequest(client_version="probe"), metadata=md("erin"),
                                                  timeout=200)
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
            print(json.dumps({"slots": srv.runtime.calls.server_reading,
                              "first_message_s": cfg.first_message_s,
                              "contended_first_message_s": getattr(cfg, "contended_first_message_s", None),
                              "after_s": args.after, "hello": code, "hello_s": round(wall, 2),
                              "details": details[:160], "silent_calls_ended": ends}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
