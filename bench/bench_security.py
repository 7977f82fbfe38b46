"""What TLS and the authentication interceptor cost (issue 11): warm resnet18 requests and upload goodput
against four edge servers (subprocesses on loopback), measured side by side in one run.

    .venv/bin/python bench/bench_security.py --out docs/results/security [--requests 20] [--upload-mb 64]

Configurations: plain text; plain text + ``--auth-tokens`` (the interceptor and the token lookup on
every call); TLS; TLS + ``--auth-tokens``. Per configuration: the median latency of warm full-offload
resnet18 requests (after a cold one that uploads the weights), and the median goodput of uploading
``--upload-mb`` of fresh weights through UploadWeights in 1 MiB chunks. Ratios are to plain text.
Prints a table and writes ``security.json`` in ``--out``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from protos.coinfer.v1 import coinfer_pb2 as pb
from testbed.credentials import make_credentials
from testbed.launcher import edge_server_process
from ue_client import CoinferClient, wire
from ue_client.options import ClientOptions

MODEL = "torchvision:resnet18"
CHUNK = 1 << 20


def upload_goodput_mbps(address: str, channel_args: dict, mb: int, seed: int) -> float:
    """MB/s of one UploadWeights of ``mb`` MiB of fresh content (16 weights) on a new channel."""
    g = torch.Generator().manual_seed(seed)
    weights = [torch.rand(mb * (1 << 20) // 16 // 4, generator=g) for _ in range(16)]
    raw = [w.numpy().tobytes() for w in weights]
    shas = [hashlib.sha256(r).hexdigest() for r in raw]
    ch = wire.channel(address, **channel_args)
    try:
        stub = wire.stub(ch)
        tenant = "" if channel_args.get("token") else "bench"  # with a token the server takes the token's
        wire.hello(stub, tenant, 10.0)  # connect before timing

        def msgs():
            yield pb.UploadWeightsRequest(header=pb.UploadHeader(tenant=tenant))
            for r, sha in zip(raw, shas):
                for off in range(0, len(r), CHUNK):
                    yield pb.UploadWeightsRequest(chunk=wire.weight_chunk(sha, "float32", (len(r) // 4,), off, len(r),
                                                                          r[off:off + CHUNK]))

        t = time.perf_counter()
        resp = stub.UploadWeights(msgs(), timeout=600)
        dt = time.perf_counter() - t
        assert len(resp.weights) == 16 and not any(w.already_present for w in resp.weights)
    finally:
        ch.close()
    return sum(len(r) for r in raw) / 1e6 / dt


def warm_request_ms(address: str, channel_args: dict, n: int) -> tuple[float, float]:
    """(cold ms, median warm ms) of full-offload resnet18 requests from one client."""
    opts = ClientOptions(policy="offload", fallback=False, probe=False, **channel_args)
    with CoinferClient(MODEL, server=address, options=opts) as c:
        x = c.example_inputs
        t = time.perf_counter()
        c(*x)
        cold = (time.perf_counter() - t) * 1e3
        warm = []
        for _ in range(n):
            t = time.perf_counter()
            c(*x)
            warm.append((time.perf_counter() - t) * 1e3)
            assert not c.last_report.fallback
    return cold, statistics.median(warm)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--requests", type=int, default=20)
    ap.add_argument("--upload-mb", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3, help="upload runs per configuration")
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    rows = []
    with tempfile.TemporaryDirectory(prefix="coinfer-sec-") as tmp:
        creds = make_credentials(Path(tmp) / "creds", ["bench"])
        tls = ["--tls-cert", str(creds.server_cert), "--tls-key", str(creds.server_key)]
        auth = ["--auth-tokens", str(creds.tokens_file)]
        token, ca = creds.tokens["bench"], str(creds.ca_cert)
        configs = [
            ("plain", [], {}),
            ("plain+auth", auth, {"token": token}),
            ("tls", tls, {"tls_ca": ca}),
            ("tls+auth", tls + auth, {"tls_ca": ca, "token": token}),
        ]
        for name, server_args, client_args in configs:
            with edge_server_process(1, extra_args=["--cache-mb", "1024", *server_args]) as (_proc, port):
                address = f"127.0.0.1:{port}"
                cold, warm = warm_request_ms(address, client_args, args.requests)
                goodputs = [upload_goodput_mbps(address, client_args, args.upload_mb, seed)
                            for seed in range(args.repeats)]
            rows.append({"config": name, "cold_ms": cold, "warm_ms": warm,
                         "upload_MBps": statistics.median(goodputs), "upload_runs_MBps": goodputs})
            print(f"{name}: warm {warm:.1f} ms, upload {statistics.median(goodputs):.0f} MB/s", flush=True)
    base = rows[0]
    for r in rows:
        r["warm_ratio"] = r["warm_ms"] / base["warm_ms"]
        r["upload_ratio"] = r["upload_MBps"] / base["upload_MBps"]
    print(f"\n{'config':<11} {'cold ms':>8} {'warm ms':>8} {'x plain':>8} {'upload MB/s':>12} {'x plain':>8}")
    for r in rows:
        print(f"{r['config']:<11} {r['cold_ms']:8.1f} {r['warm_ms']:8.1f} {r['warm_ratio']:8.2f} "
              f"{r['upload_MBps']:12.0f} {r['upload_ratio']:8.2f}")
    (args.out / "security.json").write_text(json.dumps({"model": MODEL, "requests": args.requests,
                                                        "upload_mb": args.upload_mb, "rows": rows}, indent=1))
    print(f"wrote {args.out / 'security.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
