"""Session 22 (staging22): the staging area before/after, side by side in one run.

Starts real ``coinfer-edge serve --port 0 --memory-mb 1024 --threads 1`` servers from two source trees (``--tree
NAME=PATH``, alternating per round), and against each:

1. honest upload: resnet18's 62 state-dict tensors (46.8 MB) in one UploadWeights call, 1 MiB chunks, three times
   (tenants t0, t1, t2: the first stores the blobs, the others send, verify and drop their copy); wall ms each;
2. the review22 repro without tokens: tenant ``a`` opens an UploadWeights declaring 120 MiB and sends 1 MiB, then
   tenant ``b`` uploads a 40 MiB weight: b's outcome, the server's staging bytes (Stats) and its RSS (VmRSS) before
   and while a holds.

Usage (under the bench lock, one measurement at a time on the machine)::

    flock /work/wt/.bench.lock python docs/results/attack/session22/staging_bench.py \\
        --tree before=/tmp/stg22_main --tree after=/work/wt/staging22 --rounds 3 --out staging_bench.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import threading
import time

import grpc
import torch

from modelgraph.tv_compat import import_torchvision
from protos.coinfer.v1 import coinfer_pb2 as pb
from protos.coinfer.v1 import coinfer_pb2_grpc as pbg

MiB = 1 << 20
OPTS = [("grpc.max_send_message_length", 16 * MiB), ("grpc.max_receive_message_length", 16 * MiB)]


def _rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _chunk(sha: str, dtype: str, shape: list[int], total: int, data: bytes, off: int) -> pb.UploadWeightsRequest:
    return pb.UploadWeightsRequest(chunk=pb.WeightChunk(sha256=sha, dtype=dtype, shape=shape, offset=off,
                                                        total_bytes=total, data=data))


def _weights() -> list[tuple[str, str, list[int], bytes]]:
    tv = import_torchvision()
    torch.manual_seed(0)
    out = []
    for t in tv.models.resnet18(weights=None).state_dict().values():
        t = t.contiguous()
        raw = t.numpy().tobytes()
        out.append((hashlib.sha256(raw).hexdigest(), str(t.dtype).removeprefix("torch."), list(t.shape), raw))
    return out


def _upload_msgs(tenant: str, weights, chunk: int = MiB):
    yield pb.UploadWeightsRequest(header=pb.UploadHeader(tenant=tenant))
    for sha, dtype, shape, raw in weights:
        for off in range(0, max(len(raw), 1), chunk):
            yield _chunk(sha, dtype, shape, len(raw), raw[off : off + chunk], off)


def _serve(tree: str) -> tuple[subprocess.Popen, str]:
    env = dict(os.environ, PYTHONPATH=tree)
    proc = subprocess.Popen([sys.executable, "-m", "edge_server.cli", "serve", "--port", "0", "--memory-mb", "1024",
                             "--threads", "1"], cwd=tree, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            text=True)
    line = proc.stdout.readline()
    if not line.startswith("listening on"):
        proc.kill()
        raise RuntimeError(f"server from {tree} did not start: {line!r}")
    return proc, line.split()[2]


def _one(tree: str, weights) -> dict:
    proc, addr = _serve(tree)
    try:
        with grpc.insecure_channel(addr, options=OPTS) as ch:
            stub = pbg.EdgeServiceStub(ch)
            stub.Hello(pb.HelloRequest(client_version="bench", tenant="t0"), timeout=30)
            res: dict = {"upload_ms": []}
            for i in range(3):
                t0 = time.perf_counter()
                r = stub.UploadWeights(_upload_msgs(f"t{i}", weights), timeout=120)
                res["upload_ms"].append((time.perf_counter() - t0) * 1e3)
                assert len(r.weights) == len(weights)
            res["rss_after_uploads_mib"] = _rss_mib(proc.pid)
            # the review22 repro, without tokens: a declares 120 MiB and sends 1 MiB, b uploads 40 MiB
            stop = threading.Event()

            def hold():
                yield pb.UploadWeightsRequest(header=pb.UploadHeader(tenant="a"))
                yield _chunk("ab" * 32, "uint8", [120 * MiB], 120 * MiB, b"\1" * MiB, 0)
                stop.wait(60)

            rss0 = _rss_mib(proc.pid)
            fut = stub.UploadWeights.future(hold(), timeout=90)
            time.sleep(2.0)
            res["hold_staging_bytes"] = stub.Stats(pb.StatsRequest(), timeout=30).store.staging_bytes
            res["hold_rss_delta_mib"] = _rss_mib(proc.pid) - rss0
            data = torch.randn(10 * MiB).numpy().tobytes()
            sha = hashlib.sha256(data).hexdigest()
            try:
                msgs = [pb.UploadWeightsRequest(header=pb.UploadHeader(tenant="b"))]
                msgs += [_chunk(sha, "uint8", [len(data)], len(data), data[o : o + MiB], o)
                         for o in range(0, len(data), MiB)]
                stub.UploadWeights(iter(msgs), timeout=60)
                res["b_40mib_upload"] = "OK"
            except grpc.RpcError as e:
                res["b_40mib_upload"] = f"{e.code().name}: {e.details()[:120]}"
            stop.set()
            try:
                fut.result(timeout=30)
            except grpc.RpcError as e:
                res["a_hold_ended"] = e.code().name
            time.sleep(0.5)
            res["staging_bytes_after"] = stub.Stats(pb.StatsRequest(), timeout=30).store.staging_bytes
            return res
    finally:
        proc.terminate()
        proc.wait(30)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tree", action="append", required=True, help="NAME=PATH of a source tree")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    trees = [t.split("=", 1) for t in args.tree]
    weights = _weights()
    total = sum(len(w[3]) for w in weights)
    print(f"resnet18: {len(weights)} tensors, {total / 1e6:.1f} MB", flush=True)
    runs: dict[str, list[dict]] = {name: [] for name, _ in trees}
    for r in range(args.rounds):
        order = trees if r % 2 == 0 else trees[::-1]
        for name, path in order:
            res = _one(path, weights)
            runs[name].append(res)
            print(name, json.dumps(res), flush=True)
    summary = {}
    for name, rs in runs.items():
        first = [x["upload_ms"][0] for x in rs]
        again = [v for x in rs for v in x["upload_ms"][1:]]
        summary[name] = {"first_upload_ms_median": statistics.median(first), "first_upload_ms": first,
                         "repeat_upload_ms_median": statistics.median(again),
                         "hold_rss_delta_mib": [x["hold_rss_delta_mib"] for x in rs],
                         "hold_staging_bytes": [x["hold_staging_bytes"] for x in rs],
                         "b_40mib_upload": [x["b_40mib_upload"] for x in rs]}
    names = [n for n, _ in trees]
    if len(names) == 2:
        a, b = names
        summary["ratio_first_upload"] = summary[b]["first_upload_ms_median"] / summary[a]["first_upload_ms_median"]
        summary["ratio_repeat_upload"] = summary[b]["repeat_upload_ms_median"] / summary[a]["repeat_upload_ms_median"]
    print(json.dumps(summary, indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"command": " ".join(sys.argv), "total_bytes": total, "runs": runs, "summary": summary}, f,
                      indent=1)


if __name__ == "__main__":
    main()
