"""Session 33, item 3: ``coinfer-ue profile`` (the UE profile ``plan`` measures) of resnet18 beside CPU hogs, per
thread count and OpenMP wait policy. Each hog is a busy loop that ends by itself and is killed by PID in a finally.

    .venv/bin/python docs/results/cli/session33/ue_threads.py [--hogs 1] [--cases default,1,2,2:PASSIVE]

A case is THREADS[:POLICY]: THREADS "default" runs without --threads; POLICY sets OMP_WAIT_POLICY (else unset).
Prints the whole-graph median and the per-op sum ``profile`` reports, and the threads it used."""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[4]
HOG = "import time\nt = time.monotonic() + {s}\nwhile time.monotonic() < t: pass\n"


def one(case: str, model: str, runs: int) -> tuple[str, float | None]:
    threads, _, policy = case.partition(":")
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS")}
    env["PYTHONPATH"] = str(ROOT)
    if policy:
        env["OMP_WAIT_POLICY"] = policy
    with tempfile.TemporaryDirectory() as cache:
        env["COINFER_CACHE_DIR"] = cache
        argv = [str(ROOT / ".venv/bin/coinfer-ue"), "profile", "--model", model, "--no-cache", "--runs", str(runs),
                "--verbose"]
        if threads != "default":
            argv += ["--threads", threads]
        t0 = time.monotonic()
        r = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
        wall = time.monotonic() - t0
    out = r.stdout
    head = re.search(r"(\d+) threads, (\d+) runs", out)
    tot = re.search(r"per-op sum ([\d.]+) ms .*whole-graph median ([\d.]+) ms", out)
    chosen = [ln.split(": ", 1)[-1] for ln in r.stderr.splitlines() if "torch thread" in ln or "OpenMP" in ln]
    if r.returncode or not head or not tot:
        return f"{case:<12} failed rc={r.returncode}: {r.stderr[-300:]}", None
    line = (f"{case:<12} {head.group(1)} threads: whole-graph median {float(tot.group(2)):7.1f} ms, per-op sum "
            f"{float(tot.group(1)):7.1f} ms ({wall:.0f} s wall){'; ' + ' | '.join(chosen) if chosen else ''}")
    return line, float(tot.group(2))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="torchvision:resnet18")
    ap.add_argument("--hogs", type=int, default=1)
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--cases", default="default,1,2,2:PASSIVE")
    ap.add_argument("--rounds", type=int, default=3, help="the cases in turn this many times (median reported)")
    ap.add_argument("--hog-s", type=float, default=400.0, help="each hog ends by itself after this long")
    a = ap.parse_args()
    print(f"{a.model}: coinfer-ue profile --runs {a.runs}, {a.hogs} busy-loop hog(s), {os.cpu_count()} cores, "
          f"loadavg before {os.getloadavg()[0]:.2f}", flush=True)
    hogs = []
    try:
        hogs = [subprocess.Popen([sys.executable, "-c", HOG.format(s=a.hog_s)]) for _ in range(a.hogs)]
        time.sleep(1.0)
        got: dict[str, list[float]] = {}
        for r in range(a.rounds):
            for case in a.cases.split(","):
                line, ms = one(case, a.model, a.runs)
                print(f"round {r + 1}: {line}", flush=True)
                if ms is not None:
                    got.setdefault(case, []).append(ms)
        print(f"median whole-graph ms over {a.rounds} rounds (loadavg after {os.getloadavg()[0]:.2f}): "
              + ", ".join(f"{c} {statistics.median(v):.1f}" for c, v in got.items()), flush=True)
    finally:
        for h in hogs:
            h.kill()
            h.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
