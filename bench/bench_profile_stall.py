"""What a UE's large profile costs the other sessions of an edge server: the event-loop stall.

A victim client calls Hello back to back (a unary call served on the server's event loop) while an
attacker opens sessions whose OpenSession profile carries a large cost graph (``UeProfile.cost_graph_json``),
one after another. Per graph: the attacker's call time and status, and the victim's Hello latencies in that
window (p50 / p99 / max): a profile parsed on the event loop shows as Hellos waiting for the whole parse.

Graphs: ``chain40k`` (session 9's repro: a 40,000-op chain, 7.6 MiB), ``zeros`` (an 8 MiB list of zeros:
one Python call per number in the old strict parser), ``honest10k`` (a 10,000-op chain with 3 profiling
samples per op: the largest honest graph the default limit admits), ``floats_at_cap`` (floats up to the
separators 10,000 ops may have, ``edge_server.profile_intake.SEPARATORS_PER_OP``).

``python bench/bench_profile_stall.py [--baseline ROOT] [--rounds 4] [--json PATH]``; ``--baseline``: the
same against a server started from another checkout (e.g. before the change), side by side. Run it under
the bench lock (``flock /work/wt/.bench.lock``): it measures latency.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

import grpc

sys.path.insert(0, str(Path(__file__).resolve().parent))
from edge_process import edge_server

from edge_server.profile_intake import SEPARATORS_PER_OP
from partitioner import chain
from protos.coinfer.v1 import coinfer_pb2 as pb
from protos.coinfer.v1 import coinfer_pb2_grpc as pb_grpc

ROOT = Path(__file__).resolve().parent.parent
OPTIONS = [("grpc.max_send_message_length", 16 << 20), ("grpc.max_receive_message_length", 16 << 20)]


def graphs() -> dict[str, bytes]:
    honest = chain([(1.0, 0.5, 400, 400)] * 10_000, input_bytes=400)
    honest = replace(honest, ue_samples_ms=tuple((0.11, 0.12, 0.13) for _ in range(10_000)))
    n = SEPARATORS_PER_OP * 10_000 - 16
    return {
        "chain40k": chain([(1.0, 0.5, 400, 400)] * 40_000, input_bytes=400).to_json().encode(),
        "zeros": b'{"ops": [' + b"0," * ((4 << 20) - 64) + b"0]}",
        "honest10k": honest.to_json().encode(),
        "floats_at_cap": b'{"ops": [], "x": [' + b",".join([b"1.5"] * n) + b"]}",
    }


def open_once(stub, graph: bytes) -> tuple[float, str]:
    first = pb.SessionRequest(open=pb.OpenSession(
        tenant="attacker", model_id="m", profile=pb.UeProfile(cost_graph_json=graph, uplink_mbps=20.0, rtt_ms=5.0)))
    t0 = time.perf_counter()
    try:
        for _ in stub.Session(iter([first, pb.SessionRequest(close=pb.CloseSession())]), timeout=120):
            pass
        status = "OK"
    except grpc.RpcError as e:
        status = e.code().name
    return (time.perf_counter() - t0) * 1e3, status


def measure(port: int, rounds: int) -> list[dict]:
    addr = f"127.0.0.1:{port}"
    stop = threading.Event()
    samples: list[tuple[float, float]] = []  # (start, ms)

    def victim() -> None:
        with grpc.insecure_channel(addr) as ch:
            stub = pb_grpc.EdgeServiceStub(ch)
            while not stop.is_set():
                t0 = time.perf_counter()
                stub.Hello(pb.HelloRequest(client_version="bench", tenant="victim"), timeout=60)
                samples.append((t0, (time.perf_counter() - t0) * 1e3))

    rows = []
    with grpc.insecure_channel(addr, options=OPTIONS) as ch:
        stub = pb_grpc.EdgeServiceStub(ch)
        open_once(stub, chain([(1.0, 0.5, 400, 400)] * 3).to_json().encode())  # warm
        th = threading.Thread(target=victim, daemon=True)
        th.start()
        time.sleep(0.5)
        try:
            for name, graph in graphs().items():
                t0 = time.perf_counter()
                calls = [open_once(stub, graph) for _ in range(rounds)]
                t1 = time.perf_counter()
                time.sleep(0.2)
                lat = sorted(ms for s, ms in samples if t0 <= s <= t1)
                rows.append({
                    "graph": name, "mib": len(graph) / 2**20, "status": sorted({s for _, s in calls}),
                    "attacker_ms": statistics.median(ms for ms, _ in calls), "hellos": len(lat),
                    "hello_p50_ms": lat[len(lat) // 2] if lat else None,
                    "hello_p99_ms": lat[min(len(lat) - 1, int(0.99 * len(lat)))] if lat else None,
                    "hello_max_ms": lat[-1] if lat else None,
                })
        finally:
            stop.set()
            th.join(60)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--baseline", type=Path, help="another checkout to run the same against")
    ap.add_argument("--rounds", type=int, default=4, help="OpenSessions per graph")
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()
    out = {"rounds": a.rounds, "runs": {}}
    roots = [("this", ROOT)] + ([("baseline", a.baseline.resolve())] if a.baseline else [])
    for label, root in roots:
        with edge_server(root) as port:
            out["runs"][label] = {"root": str(root), "rows": measure(port, a.rounds)}
    print(f"{'server':9s} {'graph':14s} {'MiB':>5s} {'status':22s} {'attacker ms':>11s} {'Hellos':>6s} "
          f"{'Hello p50':>9s} {'p99':>7s} {'max':>7s}")
    for label, run in out["runs"].items():
        for r in run["rows"]:
            print(f"{label:9s} {r['graph']:14s} {r['mib']:5.2f} {','.join(r['status']):22s} {r['attacker_ms']:11.1f} "
                  f"{r['hellos']:6d} {r['hello_p50_ms'] or 0:9.2f} {r['hello_p99_ms'] or 0:7.1f} "
                  f"{r['hello_max_ms'] or 0:7.1f}")
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
