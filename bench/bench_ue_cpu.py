"""Where a throttled UE process's CPU per request goes: the same model under several CPU quotas, CFS periods,
torch thread counts and process set-ups, side by side in one interleaved run.

    python bench/bench_ue_cpu.py [--models resnet18,mobilenet_v2] [--rounds 6] [--variants all|NAME,...]
                                 [--no-spin] [--json PATH]

Needs writable cgroups (root). One worker process per variant, each in its own CPU cgroup
(``testbed.cgroups.CpuCgroup``): it loads the model unthrottled, then the quota is applied and the requests
alternate between the workers, one request each in turn (so a drift of the shared machine hits every variant
alike, and every request follows an idle gap, as the testbed's paired streams do). A variant is
``MODEL/qQ/pP/tT/KIND``: quota Q % of one core over a CFS period of P ms, T torch threads, KIND ``eager``
(the torchvision module, ``torch.no_grad``), ``client`` (``CoinferClient(spec)`` without a server: the captured
graph, what the testbed worker's ``local`` requests run, with the client's ``gc.freeze``), optionally with
``+malloc`` (glibc told to keep freed memory: ``MALLOC_MMAP_THRESHOLD_``/``MALLOC_TRIM_THRESHOLD_``/``MALLOC_TOP_PAD_``)
or ``+passive`` (``OMP_WAIT_POLICY=PASSIVE``); threads 0 = torch's default (one per core the process sees).

Half the rounds run with two ``SCHED_IDLE`` busy loops, one pinned to each CPU (``spin``): they take no CPU
from any normal task but keep the (virtual) CPUs from going idle while a throttled worker waits for its next
period, which separates what the idle CPU costs (wake-up, caches and TLB refilled after the host ran something
else there) from what the process does itself.

Per request the worker reports wall ms, process CPU ms split into user and system time (``getrusage``), minor
page faults, voluntary / involuntary context switches, migrations between CPUs (``/proc/self/sched``), and the
CPU ms of a fixed pure-Python calibration loop run just before the request (a fixed instruction count with a
tiny footprint: its CPU time tracks the core's speed per instruction, which this VM's lack of hardware
counters, "PMU not available due to virtualization", does not let ``perf stat`` show). The parent adds the
group's ``cpu.stat`` deltas (``nr_throttled``, ``throttled_time``). Printed as a table (medians), written as
JSON with every request.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

WORKER = r"""
import json, os, resource, sys, time
threads, kind, spec = int(sys.argv[1]), sys.argv[2], sys.argv[3]
import torch
if threads:
    torch.set_num_threads(threads)
if kind == "client":
    from ue_client import CoinferClient
    c = CoinferClient(spec)
    x = c.example_inputs
    def run():
        return c(*x)
else:
    import modelgraph
    lm = modelgraph.load_model(spec)
    m, x = lm.module.eval(), lm.example_inputs
    def run():
        with torch.no_grad():
            return m(*x)

def sched():
    out = {}
    with open("/proc/self/sched") as f:
        for line in f:
            k, _, v = line.partition(":")
            k = k.strip()
            if k in ("se.nr_migrations", "nr_switches", "nr_voluntary_switches", "nr_involuntary_switches"):
                out[k] = float(v)
    return out

def calib(n=60000):
    t = time.thread_time()
    s = 0
    for i in range(n):
        s += i * i & 7
    return (time.thread_time() - t) * 1e3

for _ in range(3):
    run()
calib()
print("ready", flush=True)
for line in sys.stdin:
    cal = calib()
    r0, s0 = resource.getrusage(resource.RUSAGE_SELF), sched()
    t0, c0 = time.perf_counter(), time.process_time()
    run()
    wall, cpu = (time.perf_counter() - t0) * 1e3, (time.process_time() - c0) * 1e3
    r1, s1 = resource.getrusage(resource.RUSAGE_SELF), sched()
    print(json.dumps({"wall_ms": wall, "cpu_ms": cpu, "user_ms": (r1.ru_utime - r0.ru_utime) * 1e3,
                      "sys_ms": (r1.ru_stime - r0.ru_stime) * 1e3, "minflt": r1.ru_minflt - r0.ru_minflt,
                      "vcsw": r1.ru_nvcsw - r0.ru_nvcsw, "ivcsw": r1.ru_nivcsw - r0.ru_nivcsw,
                      "migrations": s1.get("se.nr_migrations", 0) - s0.get("se.nr_migrations", 0),
                      "calib_ms": cal}), flush=True)
"""

SPIN = r"""
import os, sys
os.sched_setaffinity(0, {int(sys.argv[1])})
os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
while True:
    pass
"""

ENVS = {"malloc": {"MALLOC_MMAP_THRESHOLD_": str(32 << 20), "MALLOC_TRIM_THRESHOLD_": str(1 << 30),
                   "MALLOC_TOP_PAD_": str(64 << 20)},
        "passive": {"OMP_WAIT_POLICY": "PASSIVE"}}
"""Environment of a variant's ``+EXTRA``: ``malloc`` keeps glibc's freed memory in the process (no ``mmap`` per
large tensor, no trimming: no page faults per request once warm); ``passive`` makes OpenMP's idle threads sleep
instead of spinning."""


def default_variants(models: list[str]) -> list[str]:
    """The variants of one run: for each model, the quota sweep at 10 ms / 1 thread / eager, the 100 ms period,
    default threads, and (first model only) the client path and the malloc setting, at 10 %."""
    out = []
    for i, m in enumerate(models):
        out += [f"{m}/q100/p10/t1/eager", f"{m}/q25/p10/t1/eager", f"{m}/q10/p10/t1/eager",
                f"{m}/q10/p100/t1/eager", f"{m}/q10/p10/t0/eager"]
        if i == 0:
            out += [f"{m}/q10/p10/t1/client", f"{m}/q10/p10/t1/eager+malloc", f"{m}/q100/p10/t1/client"]
    return out


def parse_variant(v: str) -> dict:
    model, q, p, t, kind = v.split("/")
    base, *extras = kind.split("+")
    if base not in ("eager", "client") or any(e not in ENVS for e in extras):
        raise ValueError(f"unknown kind {kind!r} in {v!r}: eager or client, then +malloc / +passive")
    return {"model": model, "cpus": int(q[1:]) / 100, "period_ms": float(p[1:]), "threads": int(t[1:]), "kind": base,
            "env": {k: val for e in extras for k, val in ENVS[e].items()}}


def machine() -> dict:
    """What the numbers depend on: CPU model and MHz as the guest sees them, kernel, idle driver, load."""
    info: dict = {"kernel": platform.release(), "load": os.getloadavg()}
    with open("/proc/cpuinfo") as f:
        lines = f.read().splitlines()
    info["cpu_model"] = next((x.split(":", 1)[1].strip() for x in lines if x.startswith("model name")), "")
    info["cpu_mhz"] = [float(x.split(":", 1)[1]) for x in lines if x.startswith("cpu MHz")]
    for key, path in (("cpuidle_driver", "/sys/devices/system/cpu/cpuidle/current_driver"),
                      ("cmdline", "/proc/cmdline")):
        try:
            info[key] = Path(path).read_text().strip()
        except OSError:
            info[key] = None
    return info


def steal_ticks() -> tuple[int, int]:
    """(steal, total) jiffies over all CPUs from /proc/stat."""
    with open("/proc/stat") as f:
        parts = [int(x) for x in f.readline().split()[1:]]
    return parts[7], sum(parts)


KEYS = ["wall_ms", "cpu_ms", "user_ms", "sys_ms", "minflt", "ivcsw", "migrations", "nr_throttled", "calib_ms"]


def summarize(records: dict[str, dict[str, list[dict]]]) -> dict:
    """Print the table of medians per variant and condition, with the correlation between a request's CPU ms and
    the calibration loop's CPU ms just before it (``corr``: near +1 when the request's cost follows the core's speed
    of the moment); return the medians (``corr`` included)."""
    table: dict = {}
    print("| variant | cond | " + " | ".join(KEYS) + " | corr(cpu, calib) |")
    print("|---|---|" + "---|" * (len(KEYS) + 1))
    for v, conds in records.items():
        for cond, recs in conds.items():
            if not recs:
                continue
            med = {key: statistics.median(r[key] for r in recs) for key in KEYS}
            cpu, cal = [r["cpu_ms"] for r in recs], [r["calib_ms"] for r in recs]
            ok = len(recs) > 2 and len(set(cpu)) > 1 and len(set(cal)) > 1
            med["corr"] = statistics.correlation(cpu, cal) if ok else float("nan")
            table.setdefault(v, {})[cond] = med
            print(f"| {v} | {cond} | " + " | ".join(f"{med[key]:.1f}" for key in KEYS) + f" | {med['corr']:+.2f} |")
    return table


def main(argv: list[str] | None = None) -> int:
    from testbed.cgroups import CpuCgroup, detect_cgroups

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="resnet18,mobilenet_v2", help="torchvision names (default: these two)")
    ap.add_argument("--variants", default="all", help="comma-separated MODEL/qQ/pP/tT/KIND, or all (the default set)")
    ap.add_argument("--rounds", type=int, default=6, help="requests per variant and spin condition (default 6)")
    ap.add_argument("--no-spin", action="store_true", help="skip the rounds with SCHED_IDLE busy loops")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--from", dest="source", type=Path, help="print the table of a run's JSON (runs nothing)")
    args = ap.parse_args(argv)
    if args.source:
        summarize(json.loads(args.source.read_text())["requests"])
        return 0
    support = detect_cgroups()
    if not support.usable:
        print(f"cgroups unusable: {support.reason}", file=sys.stderr)
        return 2
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    names = default_variants(models) if args.variants == "all" else [v.strip() for v in args.variants.split(",")]
    variants = {v: parse_variant(v) for v in names}
    root = Path(__file__).resolve().parents[1]
    m0, st0, t_start = machine(), steal_ticks(), time.time()
    groups: dict[str, CpuCgroup] = {}
    workers: dict[str, subprocess.Popen] = {}
    spinners: list[subprocess.Popen] = []
    records: dict[str, dict[str, list[dict]]] = {v: {"idle": [], "spin": []} for v in variants}
    try:
        for i, (v, cfg) in enumerate(variants.items()):
            cg = CpuCgroup(f"cfr-{os.getpid()}-uecpu{i}", cfg["cpus"], support=support,
                           period_us=round(cfg["period_ms"] * 1000))
            cg.set_cpus(None)  # loading and warm-up unthrottled: an offline step
            groups[v] = cg
            env = dict(os.environ, PYTHONPATH=str(root))
            env.update(cfg["env"])
            argv_w = [sys.executable, "-c", WORKER, str(cfg["threads"]), cfg["kind"], f"torchvision:{cfg['model']}"]
            workers[v] = cg.popen(argv_w, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=root, env=env)
            if workers[v].stdout.readline().strip() != "ready":  # one at a time: loads do not compete
                raise RuntimeError(f"worker {v} did not start")
        for v, cg in groups.items():
            cg.set_cpus(variants[v]["cpus"])
        time.sleep(0.5)
        conds = ["idle"] if args.no_spin else ["idle", "spin"]
        for k in range(args.rounds * len(conds)):
            cond = conds[k % len(conds)]
            if cond == "spin" and not spinners:
                cpus = sorted(os.sched_getaffinity(0))
                spinners = [subprocess.Popen([sys.executable, "-c", SPIN, str(c)]) for c in cpus]
                time.sleep(0.3)
            if cond == "idle" and spinners:
                for s in spinners:
                    s.send_signal(signal.SIGKILL)
                    s.wait()
                spinners = []
                time.sleep(0.3)
            order = list(variants) if k % 2 == 0 else list(reversed(variants))
            for v in order:
                a = groups[v].throttle_stats()
                workers[v].stdin.write("go\n")
                workers[v].stdin.flush()
                rec = json.loads(workers[v].stdout.readline())
                b = groups[v].throttle_stats()
                rec["nr_throttled"] = b.get("nr_throttled", 0) - a.get("nr_throttled", 0)
                thr = "throttled_time" if "throttled_time" in b else "throttled_usec"
                scale = 1e-6 if thr == "throttled_time" else 1e-3
                rec["throttled_ms"] = (b.get(thr, 0) - a.get(thr, 0)) * scale
                records[v][cond].append(rec)
    finally:
        for s in spinners:
            s.send_signal(signal.SIGKILL)
            s.wait()
        for cg in groups.values():
            cg.close()
    st1 = steal_ticks()
    m1 = machine()
    print(f"{len(variants)} variants, {args.rounds} requests each per condition, interleaved; "
          f"load {m0['load'][0]:.2f} -> {m1['load'][0]:.2f}; steal "
          f"{100 * (st1[0] - st0[0]) / max(1, st1[1] - st0[1]):.2f} %; MHz {m0['cpu_mhz']} -> {m1['cpu_mhz']}")
    table = summarize(records)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({
            "command": "python bench/bench_ue_cpu.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            "started": t_start, "elapsed_s": time.time() - t_start, "machine_before": m0, "machine_after": m1,
            "steal_pct": 100 * (st1[0] - st0[0]) / max(1, st1[1] - st0[1]), "variants": variants,
            "medians": table, "requests": records}, indent=1))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
