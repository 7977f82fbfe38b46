"""What the connect-time uplink probe says sending costs, and how much of it is the probe's own waiting.

    .venv/bin/python bench/bench_probe_cost.py [--model torchvision:resnet18] [--uplinks 20,100,400]
        [--repeats 3] [--json PATH]

An edge server (``coinfer-edge serve --data-port 0``) and, per uplink rate, two userspace link emulators
(``python -m testbed.linkemu``: one for the gRPC port, one for the data channel; RTT 20 ms) run in their
own processes, so this process's CPU is the UE's alone. For each rate and repeat a fresh client connects
(its probe uploads a sample of the weights, ``probing.probe_weights``, on the data channel); from the
probe's log line this prints the probe's process CPU per byte, the part of it the probing thread spent
waiting for the server's acknowledgements (``time.thread_time`` of its 2 ms polling loop), and the send
cost the client keeps (``SendCpuEstimator.cpu_s_per_byte``). The testbed's cells fit
``CPU share = b R + c`` (``bench/bench_cold_hiding.py``): a per-time part c is what such a wait would add.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import statistics
import sys
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import edge_process  # bench/edge_process.py, beside this script

ROOT = Path(__file__).resolve().parents[1]
LINE = re.compile(r"uplink probe \(data channel\): (\d+) bytes in ([\d.]+) ms \(([\d.]+) ms CPU"
                  r"(?:, ([\d.]+) ms of it the wait's own)?\)")


def process(cmd: list[str], wanted: list[str], timeout_s: float = 120.0):
    """``edge_process.process`` on this checkout."""
    return edge_process.process(ROOT, cmd, wanted, timeout_s)


def emulator(port: int, mbps: float, rtt_ms: float):
    return process([sys.executable, "-m", "testbed.linkemu", "--target", f"127.0.0.1:{port}", "--uplink-mbps",
                    str(mbps), "--rtt-ms", str(rtt_ms)], ["listening on "])


class Grab(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.records: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record.getMessage())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="torchvision:resnet18")
    ap.add_argument("--uplinks", type=lambda s: [float(x) for x in s.split(",")], default=[20.0, 100.0, 400.0])
    ap.add_argument("--rtt-ms", type=float, default=20.0)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--probe-mb", type=lambda s: [float(x) for x in s.split(",")], default=[1.0],
                    help="probe sizes (MiB, ``ClientOptions.probe_bytes``; the default client's is 1)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    import torch

    from ue_client.client import CoinferClient, prepare_model

    torch.set_num_threads(1)
    grab = Grab()
    plog = logging.getLogger("ue_client.probing")
    plog.setLevel(logging.INFO)
    plog.addHandler(grab)
    model = prepare_model(args.model)
    rows = []
    serve = [sys.executable, "-m", "edge_server.cli", "serve", "--host", "127.0.0.1", "--port", "0", "--data-port",
             "0", "--grace", "1"]
    with process(serve, ["listening on ", "data channel on "]) as (port, data_port):
        for mbps in args.uplinks:
            with emulator(port, mbps, args.rtt_ms) as (p1,), emulator(data_port, mbps, args.rtt_ms) as (p2,):
                for _, mb in ((i, mb) for mb in args.probe_mb for i in range(args.repeats)):
                    grab.records.clear()
                    c = CoinferClient(model.graph, model.example_inputs, server=f"127.0.0.1:{p1}", policy="auto",
                                      tenant=f"probe-{uuid.uuid4().hex[:8]}", data_address=f"127.0.0.1:{p2}",
                                      probe_bytes=int(mb * (1 << 20)))
                    try:
                        c.engine.connect()
                        kept = c.engine.probe.send_est.cpu_s_per_byte
                    finally:
                        c.close()
                    m = next((LINE.search(r) for r in grab.records if LINE.search(r)), None)
                    if m is None:
                        print(f"{mbps:g} Mbit/s: no data-channel probe line in {grab.records}")
                        continue
                    nbytes, ms, cpu_ms = int(m.group(1)), float(m.group(2)), float(m.group(3))
                    wait_ms = float(m.group(4)) if m.group(4) else None
                    rows.append({"uplink_mbps": mbps, "probe_mib": mb, "bytes": nbytes, "probe_ms": ms,
                                 "cpu_ms": cpu_ms,
                                 "wait_cpu_ms": wait_ms, "ns_per_byte": cpu_ms * 1e6 / nbytes,
                                 "ns_per_byte_without_wait": None if wait_ms is None else
                                 (cpu_ms - wait_ms) * 1e6 / nbytes, "kept_ns_per_byte": kept * 1e9 if kept else None,
                                 "load1": os.getloadavg()[0]})
                    r = rows[-1]
                    print(f"{mbps:6g} Mbit/s: {nbytes / 1e6:.2f} MB in {ms:.0f} ms, CPU {cpu_ms:.1f} ms "
                          f"({r['ns_per_byte']:.2f} ns/B), the wait's own {wait_ms} ms -> "
                          f"{r['ns_per_byte_without_wait'] if wait_ms is not None else float('nan'):.2f} ns/B; "
                          f"kept {r['kept_ns_per_byte']:.2f} ns/B", flush=True)
    print("\n| uplink Mbit/s | probe MB | probes | probe ms | CPU ns/B (median) | the wait's own CPU ms "
          "| without it ns/B |")
    print("|---|---|---|---|---|---|---|")
    for mbps, mb in ((u, m) for u in args.uplinks for m in args.probe_mb):
        rs = [r for r in rows if r["uplink_mbps"] == mbps and r["probe_mib"] == mb]
        if not rs:
            continue
        med = statistics.median
        ww = [r["wait_cpu_ms"] for r in rs if r["wait_cpu_ms"] is not None]
        wo = [r["ns_per_byte_without_wait"] for r in rs if r["ns_per_byte_without_wait"] is not None]
        print(f"| {mbps:g} | {med(r['bytes'] for r in rs) / 1e6:.1f} | {len(rs)} | "
              f"{med(r['probe_ms'] for r in rs):.0f} | "
              f"{med(r['ns_per_byte'] for r in rs):.2f} | {med(ww) if ww else '-'} | "
              f"{f'{med(wo):.2f}' if wo else '-'} |")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"model": args.model, "rtt_ms": args.rtt_ms, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
