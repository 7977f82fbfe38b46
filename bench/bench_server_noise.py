"""Why the edge server computes the same slice at different speeds in different streams: one warm, all-server
client stream at a time against a real ``coinfer-edge serve`` per server variant, variants interleaved.

    python bench/bench_server_noise.py [--models mobilenet_v2,resnet50] [--streams 5] [--requests 8]
                                       [--variants t2,t1,t2-passive,t2-spin10k] [--cpu 0.1] [--uplink 400]
                                       [--rtt 20] [--gap-ms 30] [--json PATH]

Needs root (netns mode, as the testbed's bench: ``testbed.launcher.Testbed``). Per model, one testbed per
variant, all set up first and idle while another runs: a ``coinfer-edge serve`` in its own network namespace
(started by the launcher as ``coinfer-testbed bench`` starts it, plain text), and one UE process in its own
namespace and CPU cgroup (``--cpu`` of a core over 10 ms CFS periods, one torch thread), behind the launcher's
userspace delay relay (``--rtt``; this kernel has no netem) and tc's rate (``--uplink``). A variant is the
server's ``--threads`` and OpenMP environment:

- ``t2``: ``--threads 2`` (what ``testbed/bench/suite.py`` ran up to session 13);
- ``t1``: ``--threads 1`` (``edge_server.cpus.compute_threads`` on 2 cores: one core left to I/O);
- ``t2-passive``: ``--threads 2`` and ``OMP_WAIT_POLICY=PASSIVE`` (libgomp's threads sleep at once at a
  barrier instead of spinning);
- ``t2-spin10k``: ``--threads 2`` and ``GOMP_SPINCOUNT=10000`` (a short spin before sleeping; the default,
  with no wait policy set, is 300,000);
- ``t1-passive``: ``--threads 1`` and ``OMP_WAIT_POLICY=PASSIVE``;
- ``t2-auto`` / ``t1-auto`` / ``t2-passive-auto``: as ``t2`` / ``t1`` / ``t2-passive`` with coinfer's stream
  instead of a serial baseline's (below);
- ``t2-up20`` / ``t1-up20``: ``--threads 2`` / ``1`` with the UE's uplink at 20 Mbit/s instead of ``--uplink``
  (session 13's grid computed resnet50's all-server slice in 70-87 ms per request at 20 Mbit/s, 71-165 at 400).

A stream (kind ``serial``) is what the bench's serial baselines run: a fresh tenant, every weight of the all-
server split (``planning.choose("offload")``) uploaded first on one ``UploadWeights`` call, a fresh client on
that split (``server_ops``), one unrecorded request (it defines the slice), then ``--requests`` recorded
requests, each after an idle gap of ``--gap-ms`` (the UE's quota refills). Streams run one at a time; in round s
every variant runs its stream s, the order rotated per round, so a drift of the machine hits every variant
alike. Kind ``auto`` is coinfer's stream: the ``auto`` client on a fresh tenant with nothing uploaded before,
unrecorded requests until it runs the all-server split with nothing left to upload (at most 9), then the
recorded ones.

Per request the UE records the server's own timings (``compute_ms``: the sum of its ops' times), the call's
wall time, its own CPU, and around the call (read just outside it) the scheduler statistics of every thread
of the edge server, of this driver process (the delay relays' threads) and the machine's CPU counters
(``/proc/<pid>/task/<tid>/schedstat``: time on a CPU, time waiting on a run queue, slices; ``/proc/stat``).
The server's compute threads of a request are its threads that ran at least a quarter of its compute time;
their run-queue wait is ``cwait``.

Printed per model and variant: requests, compute median / p90 / CV, the per-stream medians, their median and
their spread ((max - min) / median), the call's median, the compute threads' run-queue wait per request
(median), the server's other threads' CPU, the UE's CPU, the driver's (relay) CPU, the hypervisor's steal and
the CPU of every other process on the machine (``other``: the machine's busy time in the window less the
server's, the UE's and the driver's; ``o cores``: that over the window), and the compute threads' own CPU
(``c cpu``; per stream too) per request (medians).
Written as JSON (``--json``) with every request.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


@dataclasses.dataclass(frozen=True)
class Variant:
    """One server set-up: ``coinfer-edge serve --threads threads`` with ``env`` added to its environment."""

    name: str
    threads: int
    env: dict[str, str]
    uplink_mbps: float | None = None
    """The UE's uplink for this variant (None: ``--uplink``)."""
    kind: str = "serial"
    """``serial``: the stream a serial baseline runs (weights uploaded first, a fixed all-server split);
    ``auto``: coinfer's stream (the ``auto`` client on a fresh tenant uploads what it needs itself, on the
    data channel, while its first requests run), recorded once it runs the all-server split."""


VARIANTS = {
    "t2": Variant("t2", 2, {}),
    "t1": Variant("t1", 1, {}),
    "t2-passive": Variant("t2-passive", 2, {"OMP_WAIT_POLICY": "PASSIVE"}),
    "t2-spin10k": Variant("t2-spin10k", 2, {"GOMP_SPINCOUNT": "10000"}),
    "t1-passive": Variant("t1-passive", 1, {"OMP_WAIT_POLICY": "PASSIVE"}),
    "t2-up20": Variant("t2-up20", 2, {}, 20.0),
    "t1-up20": Variant("t1-up20", 1, {}, 20.0),
    "t2-auto": Variant("t2-auto", 2, {}, None, "auto"),
    "t1-auto": Variant("t1-auto", 1, {}, None, "auto"),
    "t2-passive-auto": Variant("t2-passive-auto", 2, {"OMP_WAIT_POLICY": "PASSIVE"}, None, "auto"),
}


# ---- scheduler statistics -------------------------------------------------------------------------------
def threads_of(pid: int) -> dict[int, tuple[str, int, int, int]]:
    """tid -> (name, ns on a CPU, ns waiting on a run queue, slices) of every thread of ``pid`` now
    (``/proc/<pid>/task/<tid>/schedstat``); threads that end while read are left out."""
    out = {}
    base = f"/proc/{pid}/task"
    try:
        tids = os.listdir(base)
    except OSError:
        return out
    for t in tids:
        try:
            with open(f"{base}/{t}/schedstat") as f:
                run, wait, slices = (int(x) for x in f.read().split()[:3])
            with open(f"{base}/{t}/comm") as f:
                name = f.read().strip()
        except (OSError, ValueError):
            continue
        out[int(t)] = (name, run, wait, slices)
    return out


def cpu_counters() -> list[int]:
    """The machine's ``/proc/stat`` ``cpu`` line (USER_HZ ticks): user nice system idle iowait irq softirq steal."""
    with open("/proc/stat") as f:
        return [int(x) for x in f.readline().split()[1:9]]


def snapshot(pids: dict[str, int]) -> dict:
    return {"t": time.perf_counter(), "cpu": cpu_counters(), **{k: threads_of(p) for k, p in pids.items()}}


def thread_delta(a: dict, b: dict) -> list[list]:
    """[[tid, name, run_ms, wait_ms, slices], ...] of the threads that ran or waited between two ``threads_of``."""
    out = []
    for tid, (name, run, wait, sl) in b.items():
        _, r0, w0, s0 = a.get(tid, (name, 0, 0, 0))
        dr, dw = (run - r0) / 1e6, (wait - w0) / 1e6
        if dr > 0.05 or dw > 0.05:
            out.append([tid, name, round(dr, 3), round(dw, 3), sl - s0])
    return sorted(out, key=lambda x: -x[2])


def host_delta(a: dict, b: dict) -> dict:
    hz = os.sysconf("SC_CLK_TCK")
    d = [(y - x) * 1e3 / hz for x, y in zip(a["cpu"], b["cpu"])]
    return {"wall_ms": round((b["t"] - a["t"]) * 1e3, 3), "server": thread_delta(a["server"], b["server"]),
            "driver": thread_delta(a["driver"], b["driver"]),
            "machine_ms": {"busy": round(d[0] + d[1] + d[2] + d[5] + d[6], 1), "idle": round(d[3] + d[4], 1),
                           "softirq": round(d[6], 1), "steal": round(d[7], 1)}}


# ---- the UE process ------------------------------------------------------------------------------------------
def ue_main(spec_path: str) -> int:
    """The UE (started by the launcher in its namespace and cgroup): ``streams`` warm all-server streams, each
    when the driver says go (stage ``rNNN``); writes ``spec["out"]`` after each."""
    import logging

    logging.basicConfig(level=logging.WARNING)
    spec = json.loads(Path(spec_path).read_text())
    from testbed.bench.worker import Ue, stage
    from ue_client import planning

    ue = Ue(spec)
    stage("captured", True)
    ue.connect()
    stage("connected", False)
    ops = sorted(planning.choose("offload", ue.costs, ue.planning_link()).server_ops)
    names = ue.weights_of(set(ops))
    pids = {"server": int(spec["server_pid"]), "driver": int(spec["driver_pid"])}
    gap = float(spec["gap_ms"]) / 1e3
    out = {"variant": spec["variant"], "server_ops": len(ops), "graph_ops": len(ue.graph.ops), "streams": []}
    for s in range(int(spec["streams"])):
        stage(f"r{s:03d}", True)
        tenant = ue.tenant(f"s{s}")
        auto = spec.get("kind") == "auto"
        up_ms, nbytes = (0.0, 0) if auto else ue.upload(tenant, names)
        k = int(spec["requests"])
        c = ue.client(tenant, "auto", horizon=k + 8) if auto else ue.client(tenant, "auto", server_ops=ops)
        rows = []
        try:
            c.engine.connect()
            first = ue.request(c, -1)  # defines the slice (validated on the server), warms both sides
            for _ in range(8 if auto else 0):  # coinfer's stream: until it runs the all-server split warm
                if first["server_ops"] == len(ops) and not first["uploaded_bytes"]:
                    break
                first = ue.request(c, -1)
            for i in range(int(spec["requests"])):
                time.sleep(gap)
                a = snapshot(pids)
                r = ue.request(c, i)
                b = snapshot(pids)
                rows.append({"i": i, "t_wall": r["t_wall"], "call_ms": r["call_ms"], "cpu_ms": r["cpu_ms"],
                             "fallback": r["fallback"], "server_ops": r["server_ops"],
                             "server_timings": r["server_timings"], "load1": r["load1"], "host": host_delta(a, b)})
        finally:
            ue.closed(c)
        out["streams"].append({"stream": s, "tenant": tenant, "upload_ms": up_ms, "upload_bytes": nbytes,
                               "first_call_ms": first["call_ms"], "requests": rows})
        Path(spec["out"]).write_text(json.dumps(out))
    stage("done", False)
    return 0


# ---- summary -----------------------------------------------------------------------------------------------
def _q(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    k = (len(xs) - 1) * q
    lo = int(k)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def request_facts(r: dict) -> dict:
    """One request's numbers: compute_ms (server), call_ms, the compute threads' run-queue wait (threads that
    ran >= a quarter of compute_ms), the server's other threads' CPU, the UE's CPU, the driver's (relays) CPU."""
    st = r.get("server_timings") or {}
    comp = st.get("compute_ms")
    h = r["host"]
    srv = h["server"]
    cut = 0.25 * comp if comp else float("inf")
    cthreads = [t for t in srv if t[2] >= cut]
    return {"compute_ms": comp, "call_ms": r["call_ms"], "queue_ms": st.get("queue_ms"),
            "cwait_ms": sum(t[3] for t in cthreads), "cthreads": len(cthreads),
            # the compute threads' CPU: with one thread, the compute's CPU time (wall = CPU + waiting); with
            # OpenMP's two, also their spinning at barriers
            "ccpu_ms": sum(t[2] for t in cthreads),
            "srv_other_ms": sum(t[2] for t in srv if t not in cthreads),
            "ue_cpu_ms": r["cpu_ms"], "driver_ms": sum(t[2] for t in h["driver"]),
            "steal_ms": h["machine_ms"]["steal"],
            # the machine's busy CPU in the window beyond the server, the UE and this driver: other processes
            # (USER_HZ ticks: 10 ms resolution per request, meaningful in the median over many)
            "foreign_ms": h["machine_ms"]["busy"] - sum(t[2] for t in srv) - r["cpu_ms"]
            - sum(t[2] for t in h["driver"]), "window_ms": h["wall_ms"]}


def _cores(f: dict) -> float:
    return f["foreign_ms"] / f["window_ms"] if f["window_ms"] else 0.0


def summarize(streams: list[dict]) -> dict:
    """Per variant: compute median / p90 / CV over every request, the per-stream medians, their median and
    spread ((max - min) / median of them), and the medians of the other per-request facts."""
    facts = [[request_facts(r) for r in s["requests"] if not r["fallback"] and r.get("server_timings")]
             for s in streams]
    comp = [f["compute_ms"] for fs in facts for f in fs]
    per_stream = [statistics.median([f["compute_ms"] for f in fs]) for fs in facts if fs]
    med = lambda key: _q([f[key] for fs in facts for f in fs if f[key] is not None], 0.5)
    mos = statistics.median(per_stream) if per_stream else None
    return {
        "requests": len(comp), "fallbacks": sum(r["fallback"] for s in streams for r in s["requests"]),
        "compute_median_ms": _q(comp, 0.5), "compute_p90_ms": _q(comp, 0.9),
        "compute_cv": statistics.pstdev(comp) / statistics.mean(comp) if len(comp) > 1 else None,
        "per_stream_medians_ms": [round(x, 2) for x in per_stream], "median_of_stream_medians_ms": mos,
        "stream_spread": (max(per_stream) - min(per_stream)) / mos if mos else None,
        "call_median_ms": med("call_ms"), "queue_median_ms": med("queue_ms"), "cwait_median_ms": med("cwait_ms"),
        "cwait_p90_ms": _q([f["cwait_ms"] for fs in facts for f in fs], 0.9),
        "compute_threads_median": med("cthreads"), "srv_other_median_ms": med("srv_other_ms"),
        "ue_cpu_median_ms": med("ue_cpu_ms"), "driver_median_ms": med("driver_ms"), "steal_median_ms": med("steal_ms"),
        "foreign_median_ms": med("foreign_ms"), "window_median_ms": med("window_ms"),
        "foreign_cores_median": _q([_cores(f) for fs in facts for f in fs], 0.5),
        "ccpu_median_ms": med("ccpu_ms"),
        "ccpu_per_stream_medians_ms": [round(statistics.median([f["ccpu_ms"] for f in fs]), 2) for fs in facts if fs],
    }


def print_table(model: str, summary: dict[str, dict]) -> None:
    def f(x, d=1):
        return "-" if x is None else f"{x:.{d}f}"

    print(f"\n{model}: server compute per warm all-server request (ms; medians unless said)")
    print(f"{'variant':<12} {'n':>3} {'median':>7} {'p90':>7} {'CV':>5} {'stream medians':<34} "
          f"{'med/str':>7} {'spread':>6} {'call':>6} {'cwait':>6} {'cw p90':>6} {'srv oth':>7} "
          f"{'UE cpu':>6} {'relay':>6} {'steal':>5} {'other':>6} {'o cores':>7} {'c cpu':>6}  c cpu per stream")
    for name, s in summary.items():
        sm = ",".join(f"{x:.0f}" for x in s["per_stream_medians_ms"])
        print(f"{name:<12} {s['requests']:>3} {f(s['compute_median_ms']):>7} {f(s['compute_p90_ms']):>7} "
              f"{f(s['compute_cv'], 2):>5} {sm:<34} {f(s['median_of_stream_medians_ms']):>7} "
              f"{f(s['stream_spread'], 2):>6} {f(s['call_median_ms']):>6} {f(s['cwait_median_ms']):>6} "
              f"{f(s['cwait_p90_ms']):>6} {f(s['srv_other_median_ms']):>7} {f(s['ue_cpu_median_ms']):>6} "
              f"{f(s['driver_median_ms']):>6} {f(s['steal_median_ms']):>5} {f(s['foreign_median_ms']):>6} "
              f"{f(s['foreign_cores_median'], 2):>7} {f(s['ccpu_median_ms']):>6}  "
              + ",".join(f"{x:.0f}" for x in s["ccpu_per_stream_medians_ms"]))


def testbed_streams(out: Path) -> list[dict]:
    """Per cell of a ``coinfer-testbed bench`` run (``OUT/logs/ueN.json``): the server's compute_ms of every
    stream policy's requests after its first (``requests[1:]``) that ran the same server part as the cell's
    most common one, with their medians; the spread of the per-stream medians ((max - min) / their median)."""
    cells = []
    for path in sorted((out / "logs").glob("ue*.json"), key=lambda p: int(p.stem[2:]) if p.stem[2:].isdigit() else 0):
        if not path.stem[2:].isdigit():
            continue
        d = json.loads(path.read_text())
        spec = d.get("spec", {})
        per = {}
        for pol, st in (d.get("streams") or {}).items():
            rows = [(r.get("server_ops"), (r.get("server_timings") or {}).get("compute_ms"))
                    for r in st.get("requests", [])[1:]]
            per[pol] = [(n, c) for n, c in rows if c is not None and n]
        counts: dict = {}
        for rows in per.values():
            for n, _ in rows:
                counts[n] = counts.get(n, 0) + 1
        if not counts:
            continue
        common = max(counts, key=counts.get)
        meds = {pol: statistics.median([c for n, c in rows if n == common])
                for pol, rows in per.items() if any(n == common for n, _ in rows)}
        vals = list(meds.values())
        mos = statistics.median(vals)
        cells.append({"ue": path.stem, "model": spec.get("model"), "cpu": spec.get("cpu"),
                      "uplink_mbps": spec.get("uplink_mbps"), "server_ops": common,
                      "stream_medians_ms": {p: round(v, 1) for p, v in meds.items()},
                      "n": {pol: sum(n == common for n, _ in rows) for pol, rows in per.items()},
                      "spread": (max(vals) - min(vals)) / mos if len(vals) > 1 and mos else None})
    return cells


def print_testbed(out: Path) -> None:
    print(f"\n{out}: server compute_ms medians per stream (requests 2.., the cell's common server part)")
    for c in testbed_streams(out):
        meds = ", ".join(f"{p} {v:.0f} (n={c['n'][p]})" for p, v in c["stream_medians_ms"].items())
        sp = "-" if c["spread"] is None else f"{c['spread']:.2f}"
        print(f"  {c['model']} cpu={c['cpu']} up={c['uplink_mbps']:g} ops={c['server_ops']}: {meds}; spread {sp}")


# ---- the driver --------------------------------------------------------------------------------------------------
def run_model(model: str, variants: list[Variant], args, workdir: Path, cache: Path) -> dict[str, list[dict]]:
    from testbed.launcher import Testbed, write_spec

    results: dict[str, list[dict]] = {}
    with contextlib.ExitStack() as stack:
        ues = {}
        for v in variants:
            tb = stack.enter_context(Testbed(workdir / v.name, mode="netns", server_threads=v.threads, secure=False,
                                             cache_mb=4096, server_env={**v.env,
                                                                        "COINFER_CACHE_DIR": str(cache / "server")}))
            tb.start_server()
            up = v.uplink_mbps or args.uplink
            ue = tb.add_ue(up, None, args.rtt, args.cpu)
            spec = {"model": model if ":" in model else f"torchvision:{model}", "server": ue.server_address,
                    "data_address": ue.data_address, "slowdown": ue.slowdown, "handshake": True, "threads": 1,
                    "uplink_mbps": up, "downlink_mbps": None, "rtt_ms": args.rtt,
                    "tenant_prefix": f"{tb.prefix}{v.name}", "server_pid": tb.server.pid, "driver_pid": os.getpid(),
                    "streams": args.streams, "requests": args.requests, "gap_ms": args.gap_ms, "variant": v.name,
                    "kind": v.kind,
                    "out": str(tb.workdir / "ue.json")}
            path = tb.workdir / "ue.spec.json"
            write_spec(path, spec)
            tb.spawn(ue, [sys.executable, str(Path(__file__).resolve()), "--ue", str(path)], handshake=True,
                     env={"COINFER_CACHE_DIR": str(cache / f"ue-cpu{args.cpu}")})
            tb.wait_stage([ue], "captured", 600)
            tb.throttle(ue)
            tb.release([ue])
            tb.wait_stage([ue], "connected", 600)
            ues[v.name] = (tb, ue, Path(spec["out"]))
            print(f"  {model} {v.name}: server pid {tb.server.pid}, UE connected", flush=True)
        for s in range(args.streams):
            order = variants[s % len(variants):] + variants[: s % len(variants)]
            for v in order:
                tb, ue, _ = ues[v.name]
                tb.wait_stage([ue], f"r{s:03d}", 120)
                tb.release([ue])
                tb.wait_stage([ue], f"r{s + 1:03d}" if s + 1 < args.streams else "done", 600)
            print(f"  {model} round {s + 1}/{args.streams} done ({', '.join(v.name for v in order)})", flush=True)
        for v in variants:
            results[v.name] = json.loads(ues[v.name][2].read_text())["streams"]
    return results


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ue", help=argparse.SUPPRESS)
    ap.add_argument("--models", default="mobilenet_v2,resnet50")
    ap.add_argument("--variants", default="t2,t1,t2-passive,t2-spin10k", help=f"of {', '.join(VARIANTS)}")
    ap.add_argument("--streams", type=int, default=5, help="streams per variant (rounds)")
    ap.add_argument("--requests", type=int, default=8, help="recorded requests per stream")
    ap.add_argument("--cpu", type=float, default=0.1, help="the UE's CPU share of one core")
    ap.add_argument("--uplink", type=float, default=400.0, help="Mbit/s (tc)")
    ap.add_argument("--rtt", type=float, default=20.0, help="ms (the delay relay)")
    ap.add_argument("--gap-ms", type=float, default=30.0, help="idle time before each recorded request")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--summarize", type=Path, help="print the tables of an earlier run's JSON and exit")
    ap.add_argument("--testbed", type=Path, nargs="+", metavar="OUT",
                    help="print the per-stream server compute of these coinfer-testbed bench --out folders and exit")
    ap.add_argument("--workdir", type=Path, help="keep the testbeds' logs here (default: a temporary folder)")
    args = ap.parse_args(argv)
    if args.ue:
        return ue_main(args.ue)
    if args.testbed:
        for out in args.testbed:
            print_testbed(out)
        return 0
    if args.summarize:
        for model, m in json.loads(args.summarize.read_text())["models"].items():
            print_table(model, {name: summarize(st) for name, st in m["streams"].items()})
        return 0
    variants = [VARIANTS[v.strip()] for v in args.variants.split(",") if v.strip()]
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    cache = Path(tempfile.mkdtemp(prefix="coinfer-srvnoise-cache-"))
    t0 = time.time()
    given = argv if argv is not None else sys.argv[1:]
    doc = {"command": " ".join(["python", "bench/bench_server_noise.py", *given]),
           "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "load_before": os.getloadavg(),
           "config": {k: v for k, v in vars(args).items() if k not in ("ue", "json", "workdir")},
           "variants": {v.name: dataclasses.asdict(v) for v in variants}, "models": {}}
    try:
        from testbed.bench.suite import git_commit

        doc["commit"] = git_commit()
        with contextlib.ExitStack() as stack:
            tmp = args.workdir or stack.enter_context(tempfile.TemporaryDirectory(prefix="coinfer-srvnoise-"))
            for model in models:
                streams = run_model(model, variants, args, Path(tmp) / model, cache)
                summary = {name: summarize(st) for name, st in streams.items()}
                doc["models"][model] = {"summary": summary, "streams": streams}
                print_table(model, summary)
                if args.json:
                    args.json.parent.mkdir(parents=True, exist_ok=True)
                    args.json.write_text(json.dumps(doc, indent=1))
    finally:
        import shutil

        shutil.rmtree(cache, ignore_errors=True)
    doc["load_after"] = os.getloadavg()
    doc["elapsed_s"] = round(time.time() - t0, 1)
    print(f"\nload {doc['load_before'][0]:.2f} -> {doc['load_after'][0]:.2f}; {doc['elapsed_s']:.0f} s")
    if args.json:
        args.json.write_text(json.dumps(doc, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
