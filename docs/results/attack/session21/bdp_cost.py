"""What turning grpc's BDP probing off costs an upload on a real link with delay (bound21, task 2).

``--max-reading-mb`` / ``--max-reading-calls`` turn grpc's BDP probing off (``grpc.http2.bdp_probe`` 0: without it
grpc widens the receive windows and takes in every call's message whether it is read or not). Without BDP probing a
stream's window stays at its initial 64 KiB until a read asks for a message, so a message over 64 KiB waits one
round trip for its window (``--read-window-kb``, session 21, sets a larger fixed window). Session 20 left the
flag off by default for that cost, not measured. Here:

- a network namespace per side (``testbed.netns.NetnsTestbed``): uplink and downlink ``--mbps`` (tc tbf), RTT
  ``--rtt-ms`` (this kernel has no netem: the testbed's userspace delay relay adds it, as the testbed does);
- ``coinfer-edge serve`` processes in the server namespace, same flags except: ``--max-reading-mb 0`` (BDP probing
  on, the default before session 21) and ``--max-reading-mb 32 --read-window-kb W`` for each ``--windows-kb`` W
  (BDP probing off; each stream's receive window W, grpc's ``grpc.http2.lookahead_bytes``; 64: grpc's initial);
- from the UE namespace, a fresh sender process per run (``bench/bench_uplink_cpu.py --sender``): ``bulk`` (one
  UploadWeights call, 1 MiB chunks) and ``session`` (the weights on a Session stream, in-stream) of the server part
  of ``--model`` (resnet18 from op 25 %: 46.1 MB), plus ``unary`` (``--unary`` sequential 256 KiB Hellos: a cut
  tensor's size, each one message over 64 KiB; median wall per call);
- runs alternate between the servers (the order flipped every repeat), same run.

    flock /work/wt/.bench.lock .venv/bin/python docs/results/attack/session21/bdp_cost.py --repeats 5 \
        --json docs/results/attack/session21/bdp_cost.json

Not measured: the data channel (raw TCP beside gRPC, ``--data-port``, what UEs use for weights by default): grpc's
window does not apply to it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[4]
BENCH = ROOT / "bench" / "bench_uplink_cpu.py"
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))


def unary_sender(port: int, n: int, size: int) -> dict:
    """``n`` sequential Hellos of ``size`` bytes (the client_version field) to 127.0.0.1:port; wall per call."""
    import grpc

    from protos.coinfer.v1 import coinfer_pb2 as pb
    from protos.coinfer.v1 import coinfer_pb2_grpc as pbg

    opts = [("grpc.max_send_message_length", 16 << 20), ("grpc.max_receive_message_length", 16 << 20)]
    with grpc.insecure_channel(f"127.0.0.1:{port}", options=opts) as ch:
        stub = pbg.EdgeServiceStub(ch)
        stub.Hello(pb.HelloRequest(client_version="warm"), timeout=30)
        walls, codes = [], []
        payload = "v" * size
        for _ in range(n):
            t0 = time.perf_counter()
            try:
                stub.Hello(pb.HelloRequest(client_version=payload), timeout=30)
                codes.append("OK")
            except grpc.RpcError as e:
                codes.append(e.code().name)
            walls.append(time.perf_counter() - t0)
    return {"wall_s": statistics.median(walls), "walls": walls, "codes": sorted(set(codes)), "bytes": size}


def start_server(tb, extra: list[str]) -> tuple[subprocess.Popen, int]:
    cmd = [sys.executable, "-m", "edge_server.cli", "serve", "--host", "0.0.0.0", "--port", "0", "--grace", "1",
           "--threads", "1", "--cache-mb", "1024", "--data-port", "off", "--insecure", *extra]
    proc = tb.popen(tb.server_ns, cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=ROOT,
                    env=dict(os.environ, PYTHONPATH=str(ROOT)))
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            raise RuntimeError(f"server {extra} exited")
        if "listening on" in line:
            return proc, int(line.strip().rsplit(":", 1)[1])
    raise RuntimeError(f"server {extra} did not start")


def run_sender(tb, ue, mode: str, port: int, payload: Path, unary: int) -> dict:
    if mode == "unary":
        cmd = [sys.executable, str(Path(__file__).resolve()), "--sender-unary", str(port), "--unary", str(unary)]
    else:
        cmd = [sys.executable, str(BENCH), "--sender", mode, "--root", str(ROOT), "--payload", str(payload),
               "--port", str(port), "--chunk-bytes", str(1 << 20)]
    p = subprocess.run(["ip", "netns", "exec", ue.netns, *cmd], capture_output=True, text=True, timeout=300,
                       cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    line = next((x for x in p.stdout.splitlines() if x.startswith("RESULT ")), None)
    if p.returncode != 0 or line is None:
        raise RuntimeError(f"{mode} sender failed: {p.stderr[-2000:]}")
    return json.loads(line[len("RESULT "):])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="torchvision:resnet18")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--mbps", type=float, default=400.0)
    ap.add_argument("--rtt-ms", type=float, default=40.0)
    ap.add_argument("--unary", type=int, default=10, help="256 KiB Hellos per unary run")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--windows-kb", type=int, nargs="+", default=[64, 1024, 2048],
                    help="--read-window-kb of the servers with BDP probing off (64: grpc's initial window)")
    ap.add_argument("--sender-unary", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.sender_unary:
        print("RESULT " + json.dumps(unary_sender(args.sender_unary, args.unary, 256 << 10)), flush=True)
        return 0

    from bench_uplink_cpu import write_payload

    from testbed.netns import NetnsTestbed

    sides = {"bdp_on": ["--max-reading-mb", "0"]}
    for kb in args.windows_kb:
        sides[f"off_w{kb}"] = ["--max-reading-mb", "32", "--read-window-kb", str(kb)]
    modes = ("bulk", "session", "unary")
    samples = {s: {m: [] for m in modes} for s in sides}
    with tempfile.TemporaryDirectory(prefix="coinfer-bdp-") as tmp, NetnsTestbed() as tb:
        payload = Path(tmp)
        man = write_payload(args.model, 0.25, payload)
        print(f"{args.model}: {man['weight_bytes'] / 1e6:.1f} MB in {len(man['weights'])} weights", flush=True)
        ue = tb.add_ue(uplink_mbps=args.mbps, downlink_mbps=args.mbps, rtt_ms=args.rtt_ms)
        relays = {}
        for side, extra in sides.items():
            _proc, port = start_server(tb, extra)
            relays[side] = tb.delay_relay(ue, port).port
        for rep in range(args.repeats):
            order = list(sides) if rep % 2 == 0 else list(reversed(sides))
            for mode in modes:
                for side in order:
                    r = run_sender(tb, ue, mode, relays[side], payload, args.unary)
                    samples[side][mode].append(r)
                    rate = f"{r['bytes'] / r['wall_s'] / 1e6:7.1f} MB/s" if mode != "unary" else ""
                    print(f"  run {rep + 1}/{args.repeats} {side:<8} {mode:<8} {r['wall_s'] * 1e3:8.1f} ms {rate}"
                          + (f" {r['codes']}" if mode == "unary" else ""), flush=True)
    summary = {}
    offs = [s for s in sides if s != "bdp_on"]
    print(f"\n{args.model}, {args.mbps:g} Mbit/s each way, RTT {args.rtt_ms:g} ms, median of {args.repeats} runs "
          "(wall ms [min, max]; unary: median per 256 KiB Hello; x: over BDP probing on)\n")
    print("| what | BDP probing on | " + " | ".join(f"off, window {s[5:]} KiB" for s in offs) + " |")
    print("|---|---|" + "---|" * len(offs))
    for mode in modes:
        cells, on = [], None
        for side in sides:
            walls = [r["wall_s"] * 1e3 for r in samples[side][mode]]
            med = statistics.median(walls)
            on = med if on is None else on
            summary.setdefault(mode, {})[side] = {"median_ms": med, "min_ms": min(walls), "max_ms": max(walls),
                                                  "over_on": med / on}
            cells.append(f"{med:.1f} [{min(walls):.1f}, {max(walls):.1f}]" + ("" if side == "bdp_on"
                                                                             else f" {med / on:.2f}x"))
        print(f"| {mode} | " + " | ".join(cells) + " |")
    if args.json:
        args.json.write_text(json.dumps({"model": args.model, "mbps": args.mbps, "rtt_ms": args.rtt_ms,
                                         "weight_bytes": man["weight_bytes"], "summary": summary,
                                         "samples": samples, "uptime": os.getloadavg(),
                                         "command": " ".join(sys.argv)}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
