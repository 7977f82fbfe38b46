"""A warm split request's CPU on a 10 % UE, by thread, for ``auto`` against the fixed split, with each piece
of ``auto``'s work around the request switched off in turn.

    flock /work/wt/.bench.lock python bench/bench_warm_cpu10.py [--models resnet18,mobilenet_v2] [--rounds 16]
        [--variants fixed,auto,auto-transport,auto-server,auto-account,auto-bg,auto-all] [--quota 0.1]
        [--period-ms 10] [--json PATH]

Needs writable cgroups (root). One UE process per variant, each in its own CPU cgroup
(``testbed.cgroups.CpuCgroup``, ``--quota`` of one core over a ``--period-ms`` CFS period), against one real
``coinfer-edge serve`` on loopback (unthrottled). Each UE process builds, unthrottled, a ``CoinferClient`` as
the testbed's streams build theirs (``policy="auto"``, a 400 Mbit/s / 5 ms planning link, ``ue_slowdown`` 10 so
that every op goes to the server, decisions inline: ``plan_background=False``, ``horizon`` the stream's
length), runs its cold request, waits for its uploads and ``--warmup`` warm requests (past the re-plans of
requests 1 and 3), and a local client of the same model (the captured graph without a server: the
testbed's paired ``local`` stream). Then the quotas are applied and the parent asks each UE in turn for one
round: one local request and one warm request, local first in even rounds (as the testbed's paired streams
alternate: half the warm requests start on a quota the local run spent, half after an idle wait). Variants:

- ``fixed``: ``server_ops`` = every op (the serial baselines' client, ``testbed/bench/worker.py``).
- ``auto``: coinfer's.
- ``auto-transport``: the transport residual's calibration after each request off (``transport_residual``
  and ``CostModel.calibrate_transport`` do nothing; ``TransportMemory`` is not updated).
- ``auto-server``: ``CostModel.calibrate_server`` off (and with it ``TransportMemory.note_server_scale``).
- ``auto-account``: ``DecisionCache.account`` off.
- ``auto-bg``: ``UploadScheduler.schedule`` given no background list.
- ``auto-all``: all four off.
- ``auto-upfront`` / ``fixed-upfront``: the call's weight check (``WeightWatch.check``) made before the request, as
  before session 33, instead of while the UE waits for the server (``ue_client.model.DeferredCheck``).

A variant named twice or more (``auto#2``: the part after ``#`` names another UE process of the same variant)
separates what one process's layout does from the variant.

Per warm request: the calling thread's CPU (``time.thread_time``), every thread's CPU (``/proc/self/task/*/
schedstat``, grouped as ``bench_ue_request_cpu.thread_group``), the process's CPU (``getrusage``), wall ms, the
report's ``plan_ms`` / ``plan_cpu_ms`` / ``plan_why``, and the cgroup's throttled ms over the whole round (the
local request's included). Printed as a table of medians
and means per variant; JSON with every request. A switched-off piece changes what the client learns (its
decisions may then differ); a request that did not run every op on the server is counted and left out.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = ("fixed", "auto", "auto-transport", "auto-server", "auto-account", "auto-bg", "auto-all", "auto-upfront",
            "fixed-upfront")
SWITCHES = {"auto-transport": ("transport",), "auto-server": ("server",), "auto-account": ("account",),
            "auto-bg": ("bg",), "auto-all": ("transport", "server", "account", "bg"), "auto-upfront": ("upfront",),
            "fixed-upfront": ("upfront",)}


def switch_off(names) -> None:
    """Switch off ``auto``'s pieces named (``SWITCHES``) in this process (class level: one variant a process)."""
    import ue_client.request as R
    from ue_client.calibration import CostModel
    from ue_client.decisions import DecisionCache
    from ue_client.uploads import UploadScheduler

    if "transport" in names:
        R.transport_residual = lambda *a, **k: (0.0, 0.0)
        CostModel.calibrate_transport = lambda self, *a, **k: None
    if "server" in names:
        CostModel.calibrate_server = lambda self, *a, **k: None
    if "account" in names:
        DecisionCache.account = lambda self, *a, **k: None
    if "upfront" in names:  # the call's weight check before the request, as before session 33 (not deferred)
        import ue_client.client as C

        class Upfront(C.DeferredCheck):
            def __init__(self, check):
                super().__init__(check)
                self.run()

        C.DeferredCheck = Upfront
    if "bg" in names:
        orig = UploadScheduler.schedule
        UploadScheduler.schedule = lambda self, split, background, rid: orig(self, split, (), rid)


def worker(args) -> int:
    import torch
    from bench_ue_request_cpu import thread_group

    from testbed.bench.worker import thread_cpu_ns
    from ue_client.client import CoinferClient
    from ue_client.options import ClientOptions

    torch.set_num_threads(1)
    kind = args.worker.split("#")[0]
    switch_off(SWITCHES.get(kind, ()))
    spec = f"torchvision:{args.model}" if ":" not in args.model else args.model
    kw = dict(server=f"127.0.0.1:{args.port}", policy="auto", tenant=f"w{os.getpid()}", link=(400.0, 5.0),
              ue_slowdown=10.0, horizon=args.rounds + args.warmup + 1)
    if "plan_background" in ClientOptions.__dataclass_fields__:
        kw["plan_background"] = False
    loc = CoinferClient(spec)
    if kind.startswith("fixed"):
        kw["server_ops"] = [op.name for op in loc.graph.ops]
    c = CoinferClient(spec, **kw)
    torch.manual_seed(0)
    x = torch.randn(c.example_inputs[0].shape)
    c(x)
    c.engine.wait_uploads(120)
    for _ in range(args.warmup):
        c(x)
        loc(x)
    ops = len(c.graph.ops)
    print("ready", flush=True)
    for line in sys.stdin:
        k = int(line.split()[1])
        if k % 2 == 0:
            loc(x)
        thr0 = thread_cpu_ns(main_name=None)
        r0 = resource.getrusage(resource.RUSAGE_SELF)
        tt0, t0 = time.thread_time(), time.perf_counter()
        c(x)
        wall = (time.perf_counter() - t0) * 1e3
        caller = (time.thread_time() - tt0) * 1e3
        r1 = resource.getrusage(resource.RUSAGE_SELF)
        thr1 = thread_cpu_ns(main_name=None)
        if k % 2 == 1:
            loc(x)
        groups: dict[str, float] = {}
        for tid, (name, ns) in thr1.items():
            ms = (ns - thr0.get(tid, (name, 0))[1]) / 1e6
            if ms > 0:
                g = thread_group(name, tid)
                groups[g] = round(groups.get(g, 0.0) + ms, 4)
        rep = c.last_report
        rec = {"k": k, "wall_ms": wall, "caller_ms": caller,
               "cpu_ms": (r1.ru_utime + r1.ru_stime - r0.ru_utime - r0.ru_stime) * 1e3, "threads_ms": groups,
               "plan_ms": rep.plan_ms, "plan_cpu_ms": rep.plan_cpu_ms, "plan_why": rep.plan_why,
               "all_server": bool(rep.server_ops == ops and not rep.fallback)}
        print(json.dumps(rec), flush=True)
    c.close()
    return 0


def _med(xs):
    return statistics.median(xs) if xs else float("nan")


def summarize(records: dict[str, list[dict]]) -> dict[str, dict]:
    """Per variant: medians and means of the warm requests that ran every op on the server."""
    out = {}
    for v, recs in records.items():
        ok = [r for r in recs if r["all_server"]]
        groups = sorted({g for r in ok for g in r["threads_ms"]})
        out[v] = {"n": len(ok), "not_all_server": len(recs) - len(ok),
                  "replans": sum(1 for r in ok if r["plan_why"] not in ("reused", "")),
                  "plan_why": sorted({r["plan_why"] for r in ok if r["plan_why"] not in ("reused", "")}),
                  **{f"{k}_p50": _med([r[k] for r in ok]) for k in ("caller_ms", "cpu_ms", "wall_ms", "plan_ms",
                                                                    "plan_cpu_ms", "throttled_ms")},
                  **{f"{k}_mean": statistics.fmean(r[k] for r in ok) if ok else float("nan")
                     for k in ("caller_ms", "cpu_ms", "wall_ms")},
                  "threads_ms_mean": {g: statistics.fmean(r["threads_ms"].get(g, 0.0) for r in ok) for g in groups}}
    return out


def print_table(model: str, s: dict[str, dict]) -> None:
    groups = sorted({g for v in s.values() for g in v["threads_ms_mean"]})
    print(f"\n{model}: warm all-server request, medians (means) over the rounds")
    print("| variant | n | caller CPU ms | process CPU ms | wall ms | plan_ms | plan_cpu_ms | throttled ms (round) "
          "| re-plans | "
          + " | ".join(f"{g} (mean)" for g in groups) + " |")
    print("|---" * (9 + len(groups)) + "|")
    for v, r in s.items():
        print(f"| {v} | {r['n']} | {r['caller_ms_p50']:.3f} ({r['caller_ms_mean']:.3f}) | {r['cpu_ms_p50']:.3f} "
              f"({r['cpu_ms_mean']:.3f}) | {r['wall_ms_p50']:.1f} | {r['plan_ms_p50']:.2f} | "
              f"{r['plan_cpu_ms_p50']:.3f} | "
              f"{r['throttled_ms_p50']:.1f} | {r['replans']} | "
              + " | ".join(f"{r['threads_ms_mean'].get(g, 0.0):.3f}" for g in groups) + " |")
    for v, r in s.items():
        if r["plan_why"]:
            print(f"  {v} re-planned: {'; '.join(r['plan_why'])}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="resnet18,mobilenet_v2")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--rounds", type=int, default=16, help="measured warm requests per variant (default 16)")
    ap.add_argument("--warmup", type=int, default=4, help="warm requests before the quota (default 4)")
    ap.add_argument("--quota", type=float, default=0.1, help="cores (default 0.1)")
    ap.add_argument("--period-ms", type=float, default=10.0, help="CFS period (default 10 ms, as the testbed)")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        return worker(args)

    import edge_process

    from testbed.cgroups import CpuCgroup, detect_cgroups

    support = detect_cgroups()
    if not support.usable:
        print(f"cgroups unusable: {support.reason}", file=sys.stderr)
        return 2
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in variants if v.split("#")[0] not in VARIANTS]
    if unknown:
        ap.error(f"unknown variants {unknown}; known: {', '.join(VARIANTS)}")
    load0, t_start = os.getloadavg(), time.time()
    result = {"argv": sys.argv[1:], "machine": platform.node(), "load_before": load0, "models": {}}
    with edge_process.edge_server(ROOT) as port:
        for model in [m.strip() for m in args.models.split(",") if m.strip()]:
            groups: dict[str, CpuCgroup] = {}
            workers: dict[str, subprocess.Popen] = {}
            records: dict[str, list[dict]] = {v: [] for v in variants}
            try:
                for i, v in enumerate(variants):
                    cg = CpuCgroup(f"cfr-{os.getpid()}-wc{i}", args.quota, support=support,
                                   period_us=round(args.period_ms * 1000))
                    cg.set_cpus(None)
                    groups[v] = cg
                    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", v, "--model", model, "--port",
                           str(port), "--rounds", str(args.rounds), "--warmup", str(args.warmup)]
                    workers[v] = cg.popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT,
                                          env=dict(os.environ, PYTHONPATH=str(ROOT)))
                    if workers[v].stdout.readline().strip() != "ready":
                        raise RuntimeError(f"worker {v} ({model}) did not start")
                for cg in groups.values():
                    cg.set_cpus(args.quota)
                time.sleep(0.5)
                for k in range(args.rounds):
                    order = variants[k % len(variants):] + variants[:k % len(variants)]
                    for v in order:
                        a = groups[v].throttle_stats()
                        workers[v].stdin.write(f"go {k}\n")
                        workers[v].stdin.flush()
                        rec = json.loads(workers[v].stdout.readline())
                        b = groups[v].throttle_stats()
                        thr = "throttled_time" if "throttled_time" in b else "throttled_usec"
                        scale = 1e-6 if thr == "throttled_time" else 1e-3
                        rec["throttled_ms"] = (b.get(thr, 0) - a.get(thr, 0)) * scale
                        rec["nr_throttled"] = b.get("nr_throttled", 0) - a.get("nr_throttled", 0)
                        records[v].append(rec)
            finally:
                for w in workers.values():
                    if w.poll() is None:
                        w.stdin.close()
                        try:
                            w.wait(30)
                        except subprocess.TimeoutExpired:
                            w.kill()
                            w.wait()
                for cg in groups.values():
                    cg.close()
            s = summarize(records)
            print_table(model, s)
            result["models"][model] = {"summary": s, "requests": records}
    result["load_after"] = os.getloadavg()
    result["seconds"] = round(time.time() - t_start, 1)
    print(f"\nload {load0[0]:.2f} -> {result['load_after'][0]:.2f}; {result['seconds']} s")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
