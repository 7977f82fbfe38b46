"""server22: what grpc's BDP probing does to a stream's receive window, seen from a raw HTTP/2 client
(``tests/h2raw.py``). A real server in process (``max_reading_bytes`` 0: BDP probing on, as without ``--memory-mb``;
or the session-21 default: off, a fixed 1 MiB window). One connection sends ``--hellos`` Hello calls of
``--mib`` MiB each, one after another; after each, the SETTINGS_INITIAL_WINDOW_SIZE the server last announced (the
window every stream of the connection starts with, read or not) and the connection window.

    PYTHONPATH=. python docs/results/attack/session22/bdp_window.py [--hellos 12] [--mib 4]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from edge_server.config import MiB, ServerConfig
from edge_server.testing import ServerThread
from protos.coinfer.v1 import coinfer_pb2 as pb
from tests.h2raw import H2Conn, grpc_message

TOKEN = "alice-bdp-secret-22"


def run(bounded: bool, hellos: int, mib: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "tokens.json"
        path.write_text(json.dumps({"tenants": {"alice": {"token": TOKEN}}}))
        cfg = ServerConfig(cache_bytes=16 * MiB, staging_bytes=16 * MiB, threads=1, auth_tokens_file=str(path),
                           max_reading_bytes=32 * MiB if bounded else 0)
        md = (("authorization", f"Bearer {TOKEN}"),)
        msg = grpc_message(pb.HelloRequest(client_version="x" * (mib * MiB)).SerializeToString())
        with ServerThread(config=cfg) as srv:
            c = H2Conn("127.0.0.1", srv.port)
            time.sleep(0.2)
            seen = [c.initial_window]
            for _ in range(hellos):
                sid = c.open("Hello", md)
                c.send(sid, msg, end=True, timeout=20)
                deadline = time.monotonic() + 10
                while sid not in c.ended and time.monotonic() < deadline:
                    time.sleep(0.005)
                time.sleep(0.05)
                seen.append(c.initial_window)
            c.close()
    return {"bdp_probing": not bounded, "hello_mib": mib, "initial_window_kib_after_each": [w >> 10 for w in seen]}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--hellos", type=int, default=12)
    ap.add_argument("--mib", type=int, default=4)
    args = ap.parse_args()
    for bounded in (False, True):
        print(json.dumps(run(bounded, args.hellos, args.mib)), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
