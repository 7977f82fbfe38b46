"""--max-reading-mb: a tenant (bob) opens a few calls and sends no message: it holds every server-wide
reading slot until first_message_s; a tenant's Hello (tiny) waits behind it (before: only bob's own key's
slots). Real server, loopback, bounded (4 silent calls, 1 s deadline on the honest Hello)."""

import json
import pathlib
import sys
import tempfile
import threading
import time

import grpc

from edge_server.config import MiB, ServerConfig
from edge_server.testing import ServerThread
from protos.coinfer.v1 import coinfer_pb2 as pb
from protos.coinfer.v1 import coinfer_pb2_grpc as pbg
from tests.test_attack18 import ALICE, BOB, _md

mb = int(sys.argv[1]) if len(sys.argv) > 1 else 32
d = pathlib.Path(tempfile.mkdtemp())
(d / "t.json").write_text(json.dumps({"tenants": {"alice": {"token": ALICE}, "bob": {"token": BOB}}}))
cfg = ServerConfig(
    cache_bytes=16 * MiB,
    staging_bytes=16 * MiB,
    threads=1,
    auth_tokens_file=str(d / "t.json"),
    max_reading_bytes=mb * MiB,
    first_message_s=8.0,
)
with ServerThread(config=cfg) as srv:
    print("server-wide reading slots:", srv.runtime.calls.server_reading)
    with grpc.insecure_channel(srv.address) as honest:
        stub = pbg.EdgeServiceStub(honest)
        t = time.perf_counter()
        stub.Hello(pb.HelloRequest(client_version="x"), metadata=_md(ALICE), timeout=5)
        print(f"alice Hello alone: {1e3 * (time.perf_counter() - t):.1f} ms")
        att = grpc.insecure_channel(srv.address)  # bob, another tenant
        silent = []
        for _ in range(max(1, srv.runtime.calls.server_reading)):
            it = pbg.EdgeServiceStub(att).Session(
                iter(lambda: (time.sleep(30), None)[1], 0), timeout=20, metadata=_md(BOB)
            )  # its first message never comes
            silent.append(it)
            threading.Thread(target=lambda it=it: next(it, None), daemon=True).start()  # starts the call
        time.sleep(1.0)
        for _i in range(3):
            t = time.perf_counter()
            try:
                stub.Hello(pb.HelloRequest(client_version="x"), metadata=_md(ALICE), timeout=3)
                r = "OK"
            except grpc.RpcError as e:
                r = e.code().name
            print(
                f"alice Hello with bob's {len(silent)} silent Session calls open: {r} after "
                f"{1e3 * (time.perf_counter() - t):.0f} ms"
            )
        for it in silent:
            it.cancel()
        att.close()
        time.sleep(0.5)
        t = time.perf_counter()
        stub.Hello(pb.HelloRequest(client_version="x"), metadata=_md(ALICE), timeout=5)
        print(f"alice Hello after they were cancelled: {1e3 * (time.perf_counter() - t):.1f} ms")
