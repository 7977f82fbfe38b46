"""Benchmark of the userspace link emulator: goodput vs configured rate, delay accuracy, relay CPU cost.

Why: the testbed's latency numbers are only as good as its link model; this shows how close the relay
gets to the configured rate and delay on this machine, and the unshaped ceiling of the relay itself.

    python -m testbed.bench_linkemu [--rates 10,20,50,100,400] [--rtt-ms 0,40] [--seconds 1] [--out f.json]
                                    [--netns]   # also tc tbf on a veth between namespaces (root)
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

from testbed.linkemu import emulated_link
from testbed.tcptools import TrafficServer, download, ping, upload

log = logging.getLogger(__name__)

_UNSHAPED_BYTES = 128 * 1024 * 1024


def _cpu_seconds() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def _measure(
    port: int, rate: float | None, seconds: float, rtt_ms: float = 0.0, host: str = "127.0.0.1", call=None
) -> list[dict]:
    """Upload then download; goodput over the whole transfer, and without the one RTT every transfer
    pays (request/acknowledgement), which is the link's own share."""
    nbytes = _UNSHAPED_BYTES if rate is None else int(rate * 1e6 / 8 * seconds)
    rows = []
    for fn in (upload, download):
        cpu0 = _cpu_seconds()
        r = fn(host, port, nbytes) if call is None else call(fn, host, port, nbytes)
        cpu = _cpu_seconds() - cpu0
        if not r.sha_ok:
            raise RuntimeError(f"{r.direction} checksum mismatch at rate {rate}")
        ex_rtt = nbytes * 8 / max(1e-9, r.seconds - rtt_ms / 1000) / 1e6
        rows.append(
            {
                "direction": r.direction,
                "bytes": nbytes,
                "seconds": round(r.seconds, 4),
                "goodput_mbps": round(r.mbps, 2),
                "ratio": None if rate is None else round(r.mbps / rate, 4),
                "goodput_ex_rtt_mbps": round(ex_rtt, 2),
                "ratio_ex_rtt": None if rate is None else round(ex_rtt / rate, 4),
                "process_cpu_s_per_s": round(cpu / r.seconds, 3),
            }
        )
    return rows


def _run_netns(rates: list[float], seconds: float) -> list[dict]:
    """tc tbf on a veth pair between a UE and a server namespace (rate only: this is the kernel path)."""
    from testbed.netns import NetnsTestbed, call_in_netns

    rows = []
    with NetnsTestbed() as tb:
        srv = call_in_netns(tb.server_ns, TrafficServer, "0.0.0.0", 0)
        try:
            for rate in [*rates, None]:
                ue = tb.add_ue(uplink_mbps=rate, downlink_mbps=rate)

                def call(fn, *args, ue=ue):
                    return call_in_netns(ue.netns, fn, *args)

                for row in _measure(srv.port, rate, seconds, 0.0, ue.srv_addr, call):
                    rows.append({"shaper": "tc", "config_mbps": rate, "rtt_ms": 0.0, **row})
        finally:
            srv.close()
    return rows


def run(rates: list[float], rtts: list[float], seconds: float, netns: bool = False) -> dict:
    results = []
    with TrafficServer() as srv:
        # Baseline: no relay at all (what loopback + these Python tools can do).
        for row in _measure(srv.port, None, seconds):
            results.append({"shaper": "none", "config_mbps": None, "rtt_ms": None, **row})
        for rtt in rtts:
            for rate in [*rates, None]:
                with emulated_link("127.0.0.1", srv.port, uplink_mbps=rate, downlink_mbps=rate, rtt_ms=rtt) as port:
                    for row in _measure(port, rate, seconds, rtt):
                        results.append({"shaper": "relay", "config_mbps": rate, "rtt_ms": rtt, **row})
        pings = []
        for rtt in rtts:
            with emulated_link("127.0.0.1", srv.port, uplink_mbps=20, downlink_mbps=20, rtt_ms=rtt) as port:
                samples = [s * 1000 for s in ping("127.0.0.1", port, 50)]
            pings.append(
                {
                    "rtt_ms": rtt,
                    "median_ms": round(statistics.median(samples), 3),
                    "min_ms": round(min(samples), 3),
                    "p90_ms": round(statistics.quantiles(samples, n=10)[-1], 3),
                }
            )
    if netns:
        results.extend(_run_netns(rates, seconds))
    return {
        "machine": {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count()},
        "seconds_per_transfer": seconds,
        "goodput": results,
        "rtt": pings,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }


def _fmt(v, spec: str = "") -> str:
    return "-" if v is None else format(v, spec)


def print_table(report: dict) -> None:
    print(
        f"{'shaper':>6} {'rtt ms':>6} {'rate Mbit/s':>11} {'dir':>4} {'goodput':>9} {'ratio':>6} "
        f"{'ex-RTT':>7} {'cpu/s':>6}"
    )
    for r in report["goodput"]:
        print(
            f"{r['shaper']:>6} {_fmt(r['rtt_ms'], 'g'):>6} "
            f"{_fmt(r['config_mbps'], 'g') if r['shaper'] != 'none' else 'direct':>11} {r['direction']:>4} "
            f"{r['goodput_mbps']:>9.1f} {_fmt(r['ratio'], '.3f'):>6} {_fmt(r['ratio_ex_rtt'], '.3f'):>7} "
            f"{r['process_cpu_s_per_s']:>6.2f}"
        )
    print(
        "(goodput in Mbit/s over the whole transfer; ex-RTT: without the one round trip each pays;"
        " cpu/s: CPU seconds of this process - client, server and relay - per second;"
        " shaper tc: tbf on a veth between namespaces, rates are TCP goodput)"
    )
    print()
    print(f"{'rtt ms':>6} {'median':>8} {'min':>8} {'p90':>8}   (64-byte ping-pong through the relay)")
    for p in report["rtt"]:
        print(f"{p['rtt_ms']:>6g} {p['median_ms']:>8.3f} {p['min_ms']:>8.3f} {p['p90_ms']:>8.3f}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m testbed.bench_linkemu", description=__doc__.splitlines()[0])
    p.add_argument("--rates", default="10,20,50,100,400", help="comma-separated Mbit/s")
    p.add_argument("--rtt-ms", default="0,40", help="comma-separated RTTs in ms")
    p.add_argument("--seconds", type=float, default=1.0, help="target duration of each shaped transfer")
    p.add_argument("--out", type=Path, help="write the report as JSON here")
    p.add_argument("--netns", action="store_true", help="also measure tc shaping between namespaces (root)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    report = run(
        [float(x) for x in args.rates.split(",") if x],
        [float(x) for x in args.rtt_ms.split(",")],
        args.seconds,
        args.netns,
    )
    print_table(report)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2))
        print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
