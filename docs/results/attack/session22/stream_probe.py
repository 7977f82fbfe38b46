"""Session 22 (server22): what a stranger's streams past their first message make a ``--memory-mb`` server hold.

A real ``coinfer-edge serve --memory-mb M --auth-tokens F`` subprocess (the checkout ``--root``) and a raw HTTP/2
client (``tests/h2raw.py``): each of ``--tenants`` tenants opens ``--streams`` UploadWeights calls, one after another,
each its UploadHeader then all but the last byte of a chunk message declared 8 MiB - 64 bytes (just under the
message limit), and leaves it there. Reported: the bytes the server took in on the streams still open, the server's
RSS growth (VmRSS, and peak VmHWM, over its RSS after start and one Hello), the budget for work in flight, and
whether another tenant's Hello and Session still work while they hold it and after they closed.

    python docs/results/attack/session22/stream_probe.py --root CHECKOUT [--tenants 4] [--streams 40] [--json F]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(HERE))))
sys.path.insert(0, ROOT)

import grpc  # noqa: E402

from edge_server.attacks import serve_subprocess  # noqa: E402
from protos.coinfer.v1 import coinfer_pb2 as pb  # noqa: E402
from protos.coinfer.v1 import coinfer_pb2_grpc as pbg  # noqa: E402
from tests.h2raw import H2Conn, grpc_message  # noqa: E402

MiB = 1 << 20
DECLARED = 8 * MiB - 64


def _status(pid: int) -> dict[str, int]:
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(("VmRSS", "VmHWM")):
                out[line.split(":")[0]] = int(line.split()[1]) // 1024
    return out


def _honest(address: str, token: str) -> str:
    """Another tenant's Hello and a Session opened and closed: 'OK' or the status codes."""
    md = (("authorization", f"Bearer {token}"),)
    out = []
    with grpc.insecure_channel(address) as ch:
        stub = pbg.EdgeServiceStub(ch)
        try:
            stub.Hello(pb.HelloRequest(client_version="probe"), metadata=md, timeout=10)
            out.append("hello OK")
        except grpc.RpcError as e:
            out.append(f"hello {e.code().name}")
        try:
            msgs = iter([pb.SessionRequest(open=pb.OpenSession(model_id="m")),
                         pb.SessionRequest(close=pb.CloseSession())])
            for _ in stub.Session(msgs, metadata=md, timeout=10):
                pass
            out.append("session OK")
        except grpc.RpcError as e:
            out.append(f"session {e.code().name}: {e.details()[:120]}")
    return "; ".join(out)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--root", default=ROOT, help="the checkout whose server runs")
    ap.add_argument("--tenants", type=int, default=4)
    ap.add_argument("--streams", type=int, default=40, help="per tenant")
    ap.add_argument("--memory-mb", type=int, default=1024)
    ap.add_argument("--label", default="")
    ap.add_argument("--stranger", action="store_true",
                    help="Hello calls with a bad token instead (refused, their answers held in the tarpit past its "
                    "burst of 100), each sent all but the last byte of an 8 MiB message; --tenants addresses")
    ap.add_argument("--json", default="")
    ap.add_argument("--health", action="store_true",
                    help="health Check calls without a token instead, each sent all but the last byte of an 8 MiB "
                    "request")
    args = ap.parse_args()
    tmp = tempfile.mkdtemp()
    tokens = {f"t{i}": f"t{i}-secret-probe22" for i in range(args.tenants)}
    tokens["honest"] = "honest-secret-probe22"
    path = os.path.join(tmp, "tokens.json")
    with open(path, "w") as f:
        json.dump({"tenants": {n: {"token": t} for n, t in tokens.items()}}, f)
    proc, address = serve_subprocess("--threads", "1", "--memory-mb", str(args.memory_mb), "--cache-mb", "64",
                                     "--auth-tokens", path, root=args.root)
    conns: list[H2Conn] = []
    try:
        host, port = address.rsplit(":", 1)
        honest_before = _honest(address, tokens["honest"])
        time.sleep(0.5)
        base = _status(proc.pid)
        header = grpc_message(pb.UploadWeightsRequest(header=pb.UploadHeader()).SerializeToString())
        body = grpc_message(b"", declared=DECLARED) + b"\x0a" * (DECLARED - 1)
        streams, t0 = [], time.monotonic()
        for t in range(args.tenants):
            md = (("authorization", "Bearer not-a-token" if args.stranger else f"Bearer {tokens[f't{t}']}"),)
            for i in range(args.streams):
                if i % 16 == 0:
                    conns.append(H2Conn(host, int(port)))
                c = conns[-1]
                if args.health:
                    sid = c.open("Check", service="/grpc.health.v1.Health/")
                else:
                    sid = c.open("Hello" if args.stranger else "UploadWeights", md)
                if not (args.stranger or args.health):
                    c.send(sid, header)
                streams.append((c, sid, c.fill(sid, body, settle_s=0.25)))
        time.sleep(1.0)
        held = [n for c, sid, n in streams if sid not in c.ended and not c.closed]
        during = _status(proc.pid)
        honest_during = _honest(address, tokens["honest"])
        for c in conns:
            c.close()
        conns = []
        time.sleep(2.0)
        after = _status(proc.pid)
        honest_after = _honest(address, tokens["honest"])
        row = {
            "label": args.label, "stranger": args.stranger, "health": args.health, "root": args.root,
            "memory_mb": args.memory_mb,
            "tenants": args.tenants,
            "streams_per_tenant": args.streams, "attack_s": round(time.monotonic() - t0, 1),
            "streams_open": len(held), "taken_mib_on_open_streams": round(sum(held) / MiB),
            "taken_mib_all": round(sum(n for _, _, n in streams) / MiB),
            "rss_base_mib": base["VmRSS"], "rss_growth_mib": during["VmRSS"] - base["VmRSS"],
            "peak_growth_mib": during["VmHWM"] - base["VmRSS"],
            "rss_after_close_growth_mib": after["VmRSS"] - base["VmRSS"],
            "honest_before": honest_before, "honest_during": honest_during, "honest_after": honest_after,
        }
        print(json.dumps(row))
        if args.json:
            with open(args.json, "a") as f:
                f.write(json.dumps(row) + "\n")
    finally:
        for c in conns:
            c.close()
        proc.terminate()
        proc.wait(30)


if __name__ == "__main__":
    main()
