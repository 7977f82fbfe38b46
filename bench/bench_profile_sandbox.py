"""Does a ProfileGraph profiled in a child process (``--profile-workers N``, ``edge_server.sandbox``; the
default 0 profiles in the server process) report what the server process would? Side by side in one
run: two servers on loopback, one with ``--profile-workers 1`` (child) and one with
``--profile-workers 0`` (in process), the same weightless slices (whole zoo models as the UE sends
them), alternating, fresh graphs each round (no cache hit).

    python bench/bench_profile_sandbox.py [--models torchvision:resnet18,...] [--rounds 3] [--json PATH]

Prints per model the median total (sum of op means, ms) in each mode and their ratio, and the median
per-op ratio; writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _slice_json(spec: str, salt: int) -> str:
    from modelgraph import capture, make_slice
    from modelgraph.sources import load_model

    m = load_model(spec)
    g = capture(m.module, m.example_inputs, name=spec)
    s = json.loads(make_slice(g, g.split(op.name for op in g.ops), with_hashes=False).to_json())
    s["model_hash"] = f"{s.get('model_hash') or ''}-{salt}"  # a fresh graph hash per round: no cache hit
    return json.dumps(s)


def main(argv: list[str] | None = None) -> int:
    import grpc

    from edge_server.attacks import serve_subprocess
    from protos.coinfer.v1 import coinfer_pb2 as pb
    from protos.coinfer.v1 import coinfer_pb2_grpc as pb_grpc

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="torchvision:resnet18,torchvision:mobilenet_v2,torchvision:alexnet")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="server --threads (both)")
    ap.add_argument("--json", default=str(ROOT / "docs" / "results" / "profile_sandbox.json"))
    args = ap.parse_args(argv)
    flags = ("--threads", str(args.threads))
    servers = {mode: serve_subprocess(*flags, "--profile-workers", w) for mode, w in (("child", "1"), ("server", "0"))}
    rows = []
    try:
        chans = {
            m: grpc.insecure_channel(a, options=[("grpc.max_send_message_length", 64 << 20)])
            for m, (_, a) in servers.items()
        }
        for spec in args.models.split(","):
            totals: dict[str, list[float]] = {"child": [], "server": []}
            per_op: list[float] = []
            for r in range(args.rounds):
                body = _slice_json(spec, r).encode()
                got = {}
                for mode in ("child", "server") if r % 2 == 0 else ("server", "child"):
                    resp = pb_grpc.EdgeServiceStub(chans[mode]).ProfileGraph(
                        pb.ProfileGraphRequest(slice_spec_json=body, iterations=10, warmup=2), timeout=600
                    )
                    got[mode] = {o.name: o.mean_ms for o in resp.ops}
                    totals[mode].append(resp.total_mean_ms)
                per_op += [got["child"][k] / got["server"][k] for k in got["server"] if got["server"][k] > 0.05]
            c, s = statistics.median(totals["child"]), statistics.median(totals["server"])
            rows.append(
                {
                    "model": spec,
                    "child_total_ms": c,
                    "server_total_ms": s,
                    "ratio": c / s,
                    "per_op_ratio_median": statistics.median(per_op),
                    "ops_compared": len(per_op),
                }
            )
    finally:
        for proc, _ in servers.values():
            proc.terminate()
            proc.wait(30)
    load = os.getloadavg()
    print(
        f"ProfileGraph in a child vs in the server process; --threads {args.threads}; {args.rounds} rounds; "
        f"load average {load[0]:.1f} on {os.cpu_count()} CPUs"
    )
    print(f"{'model':28} {'child ms':>9} {'server ms':>9} {'ratio':>6} {'per-op ratio':>12}")
    for r in rows:
        print(
            f"{r['model']:28} {r['child_total_ms']:9.2f} {r['server_total_ms']:9.2f} {r['ratio']:6.2f} "
            f"{r['per_op_ratio_median']:12.2f}"
        )
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(
        json.dumps(
            {
                "rows": rows,
                "load_average": load[0],
                "threads": args.threads,
                "rounds": args.rounds,
                "time": time.time(),
            },
            indent=1,
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
