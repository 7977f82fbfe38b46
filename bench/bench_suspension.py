"""What a suspended session costs the UE's requests: the request right after the suspension, later offline
requests, plain local runs, the re-open and the idle process, against a real ``coinfer-edge serve`` on loopback.

    python bench/bench_suspension.py [--model googlenet] [--cycles 12] [--baseline DIR] [--json PATH]

A client whose plans stay local closes ("suspends") its session after a request
(``ue_client.plan_run.PlanRunner._suspend``) and plans the next ones offline. Whatever the closing costs
runs while the next request computes; on a UE with a quarter of a core each ms of its CPU is ~4 ms of
latency. Each UE process (``CoinferClient``, policy ``auto`` over ``--uplink-mbps`` / ``--rtt-ms``, on which
every plan stays local; one torch thread) repeats ``--cycles`` times:

1. ``reopen``: re-open the session (``RemoteEngine.connect``: Hello, pings, QueryWeights, the Session
   stream; a cold channel or the one the suspension kept) and wait ``--settle-s``;
2. ``open``: one request on the open session: its plan stays local, and at its end the session is
   suspended (measured: the suspension is on its clock);
3. ``first``: the next request, right after it (offline; the closing, where it runs in the background,
   overlaps it);
4. ``offline``: two more offline requests, and ``local``: the same request on a client of policy ``local``
   (the testbed's local baseline: the same captured graph, no session), one before and one after them.

Per request: the process's CPU (``resource.getrusage``: every thread), the calling thread's
(``time.thread_time``), the wall time and Python's garbage collections (count and CPU ms per generation,
``gc.callbacks``). After the cycles the process sleeps ``--idle-s`` suspended; its CPU in each second of
that is the idle cost (while a channel is kept, and after it was closed); then a full ``gc.collect()`` is timed
(the calling thread's CPU: what one costs if it lands in a request). ``--baseline DIR`` runs the same
UE code of another checkout in alternate processes against the same server, so before and after share the
machine's drift. Medians over processes and cycles.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

import edge_process  # bench/edge_process.py, beside this script

ROOT = Path(__file__).resolve().parents[1]
KINDS = ("reopen", "open", "first", "offline", "local")


def cpu_s() -> float:
    """User + system CPU seconds of this process so far (all threads)."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


class GcClock:
    """Python's garbage collections: count and CPU ms per generation (``gc.callbacks``)."""

    def __init__(self) -> None:
        import gc

        self.n, self.ms, self._t = [0, 0, 0], [0.0, 0.0, 0.0], 0.0
        gc.callbacks.append(self._cb)

    def _cb(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._t = time.thread_time()
        else:
            g = int(info.get("generation", 0))
            self.n[g] += 1
            self.ms[g] += (time.thread_time() - self._t) * 1e3

    def snap(self) -> tuple[list[int], list[float]]:
        return list(self.n), list(self.ms)


def measure(fn, gcc: GcClock) -> dict:
    """Run ``fn()``: process CPU ms, calling thread CPU ms, wall ms, gc collections and their ms."""
    g0 = gcc.snap()
    c0, t0, w0 = cpu_s(), time.thread_time(), time.perf_counter()
    fn()
    w1, t1, c1 = time.perf_counter(), time.thread_time(), cpu_s()
    g1 = gcc.snap()
    return {"cpu_ms": (c1 - c0) * 1e3, "caller_ms": (t1 - t0) * 1e3, "wall_ms": (w1 - w0) * 1e3,
            "gc_n": [b - a for a, b in zip(g0[0], g1[0])], "gc_ms": [b - a for a, b in zip(g0[1], g1[1])]}


def ue_main(args) -> int:
    sys.path.insert(0, str(Path(args.root).resolve()))
    import logging

    import torch

    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(1)
    from ue_client.client import CoinferClient

    gcc = GcClock()
    spec = f"torchvision:{args.model}" if ":" not in args.model else args.model
    rows: dict[str, list] = {k: [] for k in KINDS}
    torch.manual_seed(0)
    with CoinferClient(spec, server=f"127.0.0.1:{args.port}", policy="auto", tenant=args.tenant,
                       link=(args.uplink_mbps, args.rtt_ms)) as c:
        x = c.example_inputs[0].clone()
        eng = c.engine
        if args.linger_s is not None:
            eng.conn.linger_s = args.linger_s
        plain = CoinferClient(c.graph, c.example_inputs, policy="local")

        def request(kind: str):
            def one():
                c(x)
                if c.last_report.server_ops:
                    raise RuntimeError(f"a {kind} request ran on the server: the link is too fast")
            return one

        def local():
            plain(x)

        for _ in range(2):  # warm-up: the first request suspends; the next ones run offline
            c(x)
            local()
        for _ in range(args.cycles):
            rows["reopen"].append(measure(eng.connect, gcc))
            if eng.conn.session is None:
                raise RuntimeError("the session did not re-open")
            time.sleep(args.settle_s)
            rows["local"].append(measure(local, gcc))
            rows["open"].append(measure(request("open"), gcc))
            if eng.conn.suspended is None:
                raise RuntimeError("the request did not suspend the session")
            rows["first"].append(measure(request("first"), gcc))
            if not c.last_report.offline:
                raise RuntimeError("the request after the suspension was not planned offline")
            for _ in range(2):
                rows["offline"].append(measure(request("offline"), gcc))
            rows["local"].append(measure(local, gcc))
        kept = eng.conn.channel is not None
        windows = []
        c0 = cpu_s()
        for _ in range(round(args.idle_s)):
            time.sleep(1.0)
            c1 = cpu_s()
            windows.append((c1 - c0) * 1e3)
            c0 = c1
        import gc

        t0 = time.thread_time()
        gc.collect()  # what a full collection costs this process now (frozen objects are skipped)
        full_gc_ms = (time.thread_time() - t0) * 1e3
        res = {"rows": rows, "idle_cpu_ms": windows, "full_gc_ms": full_gc_ms, "frozen": gc.get_freeze_count(),
               "tracked": len(gc.get_objects()), "idle_cpu_ms_per_s": statistics.fmean(windows),
               "suspensions": eng.suspensions, "channel_kept": kept, "channel_at_end": eng.conn.channel is not None}
        plain.close()
    print("RESULT " + json.dumps(res), flush=True)
    return 0


def run_child(root: Path, port: int, args, tenant: str) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", "--root", str(root), "--port", str(port),
           "--model", args.model, "--cycles", str(args.cycles), "--tenant", tenant, "--uplink-mbps",
           str(args.uplink_mbps), "--rtt-ms", str(args.rtt_ms), "--settle-s", str(args.settle_s),
           "--idle-s", str(args.idle_s)] + ([] if args.linger_s is None else ["--linger-s", str(args.linger_s)])
    return edge_process.child_result(cmd, root, f"UE ({root})")



def summarise(procs: list[dict]) -> dict:
    """Per kind: medians over every process's rows of process CPU, calling thread CPU, the rest (process -
    calling thread) and wall; gc collections in total and their ms; the paired difference of ``first`` and
    ``open`` against the same cycle's ``offline`` / ``local`` medians."""
    out: dict = {}
    for k in KINDS:
        rs = [r for p in procs for r in p["rows"][k]]
        out[k] = {"n": len(rs), "cpu_ms": statistics.median(r["cpu_ms"] for r in rs),
                  "caller_ms": statistics.median(r["caller_ms"] for r in rs),
                  "rest_ms": statistics.median(r["cpu_ms"] - r["caller_ms"] for r in rs),
                  "rest_ms_mean": statistics.fmean(r["cpu_ms"] - r["caller_ms"] for r in rs),
                  "wall_ms": statistics.median(r["wall_ms"] for r in rs),
                  "gc_n": [sum(r["gc_n"][g] for r in rs) for g in range(3)],
                  "gc_ms": [round(sum(r["gc_ms"][g] for r in rs), 3) for g in range(3)]}
    for k in ("open", "first"):  # paired per cycle: this request minus the cycle's offline requests' mean
        d = []
        for p in procs:
            off = p["rows"]["offline"]
            for i, r in enumerate(p["rows"][k]):
                d.append(r["cpu_ms"] - statistics.fmean(o["cpu_ms"] for o in off[2 * i:2 * i + 2]))
        out[k]["minus_offline_ms"] = statistics.median(d)
        out[k]["minus_offline_ms_mean"] = statistics.fmean(d)
    d = []
    for p in procs:
        loc = p["rows"]["local"]
        for i, r in enumerate(p["rows"]["offline"]):
            c = i // 2
            d.append(r["cpu_ms"] - (loc[2 * c]["cpu_ms"] + loc[2 * c + 1]["cpu_ms"]) / 2)
    out["offline"]["minus_local_ms"] = statistics.median(d)
    out["offline"]["minus_local_ms_mean"] = statistics.fmean(d)
    out["idle_cpu_ms_per_s"] = statistics.median(p["idle_cpu_ms_per_s"] for p in procs)
    n = min(len(p["idle_cpu_ms"]) for p in procs)
    out["idle_cpu_ms_by_second"] = [round(statistics.median(p["idle_cpu_ms"][i] for p in procs), 3) for i in range(n)]
    out["full_gc_ms"] = statistics.median(p["full_gc_ms"] for p in procs)
    out["frozen"] = [p["frozen"] for p in procs]
    out["tracked"] = [p["tracked"] for p in procs]
    out["channel_kept"] = [p["channel_kept"] for p in procs]
    out["channel_at_end"] = [p["channel_at_end"] for p in procs]
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="googlenet")
    p.add_argument("--cycles", type=int, default=12, help="suspensions per UE process (default 12)")
    p.add_argument("--repeats", type=int, default=2, help="UE processes per code (default 2)")
    p.add_argument("--uplink-mbps", type=float, default=1.0, help="the link (default 1: plans stay local)")
    p.add_argument("--rtt-ms", type=float, default=50.0)
    p.add_argument("--settle-s", type=float, default=0.3, help="wait after re-opening a session (default 0.3)")
    p.add_argument("--idle-s", type=float, default=10.0,
                   help="suspended idle seconds measured at the end, one window a second (default 10)")
    p.add_argument("--linger-s", type=float, default=None,
                   help="keep a suspended idle channel this long (Connection.linger_s; default: the code's own)")
    p.add_argument("--baseline", type=Path, default=None, help="another checkout's UE code, run alternately")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--root", default=str(ROOT), help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, help=argparse.SUPPRESS)
    p.add_argument("--tenant", default="bench", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        return ue_main(args)

    impls = {"this": ROOT}
    if args.baseline is not None:
        impls["baseline"] = args.baseline.resolve()
    up0, t_start = edge_process.uptime(), time.time()
    print(f"uptime before: {up0}", flush=True)
    procs: dict[str, list] = {k: [] for k in impls}
    with edge_process.edge_server(ROOT) as port:
        for rep in range(args.repeats):
            order = list(impls.items()) if rep % 2 == 0 else list(reversed(impls.items()))
            for k, root in order:
                r = run_child(root, port, args, f"susp-{k}-{rep}-{os.getpid()}")
                procs[k].append(r)
                s = summarise([r])
                print(f"  {rep + 1}/{args.repeats} {k:>8}: first {s['first']['cpu_ms']:.2f} ms CPU "
                      f"(offline {s['offline']['cpu_ms']:.2f}, local {s['local']['cpu_ms']:.2f}, open "
                      f"{s['open']['cpu_ms']:.2f}), idle {s['idle_cpu_ms_per_s']:.3f} ms/s", flush=True)
    up1 = edge_process.uptime()
    summary = {k: summarise(v) for k, v in procs.items()}
    print(f"\n{args.model}: UE process CPU per request, ms (median over {args.repeats} processes x {args.cycles} "
          "cycles); rest = process - calling thread; first/open - offline: paired per cycle (median / mean)\n")
    print("| code | request | n | CPU ms | caller ms | rest ms (median / mean) | wall ms | - offline ms | "
          "gc collections (gen 0/1/2) | gc ms |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for k, s in summary.items():
        for kind in KINDS:
            r = s[kind]
            diff = (f"{r['minus_offline_ms']:+.2f} / {r['minus_offline_ms_mean']:+.2f}" if "minus_offline_ms" in r
                    else (f"(- local {r['minus_local_ms']:+.2f} / {r['minus_local_ms_mean']:+.2f})"
                          if "minus_local_ms" in r else ""))
            print(f"| {k} | {kind} | {r['n']} | {r['cpu_ms']:.2f} | {r['caller_ms']:.2f} | {r['rest_ms']:.2f} / "
                  f"{r['rest_ms_mean']:.2f} | {r['wall_ms']:.1f} | {diff} | {'/'.join(map(str, r['gc_n']))} | "
                  f"{'/'.join(f'{x:.2f}' for x in r['gc_ms'])} |")
        print(f"| {k} | idle (suspended), CPU ms per s | | {s['idle_cpu_ms_per_s']:.3f} | | | | | | |")
        print(f"{k}: a full gc.collect() at the end {s['full_gc_ms']:.2f} ms CPU (objects frozen {s['frozen']}, "
              f"tracked outside the frozen ones {s['tracked']})")
        print(f"{k}: idle CPU ms in each second after the last suspension: {s['idle_cpu_ms_by_second']} "
              f"(channel kept at the suspension: {s['channel_kept']}, at the end: {s['channel_at_end']})")
    print(f"uptime after: {up1} ({time.time() - t_start:.0f} s)")
    result = {"model": args.model, "cycles": args.cycles, "repeats": args.repeats, "uplink_mbps": args.uplink_mbps,
              "rtt_ms": args.rtt_ms, "settle_s": args.settle_s, "idle_s": args.idle_s, "summary": summary,
              "processes": procs, "uptime_before": up0, "uptime_after": up1, "seconds": time.time() - t_start,
              "baseline": None if args.baseline is None else str(impls["baseline"]),
              "machine": {"python": platform.python_version(), "cpus": os.cpu_count(),
                          "platform": platform.platform()},
              "command": " ".join([Path(sys.argv[0]).name] + (argv if argv is not None else sys.argv[1:]))}
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
