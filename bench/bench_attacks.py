"""Issue 11 attacks against a real ``coinfer-edge serve --memory-mb N`` subprocess: server memory and the
victim tenant's latency under each attack, side by side with the unattacked victim in the same run.

    python bench/bench_attacks.py [--memory-mb 1024] [--requests 20] [--fuzz 50000] [--out DIR]

For each attack: the server's peak RSS while it runs (sampled every 20 ms), the victim's median
request latency and its ratio to the unattacked median measured right before that attack (same run),
and what the attacker got back. Then ``--fuzz`` malformed messages (0 INTERNAL/UNKNOWN expected) and
the validation time of slices of 2.5k/5k/10k/20k chained ops (CPU seconds). Prints a table and
writes ``attacks.json`` under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from edge_server.attacks import ATTACKS, RssSampler, Victim, run_attack, serve_subprocess  # noqa: E402

MiB = 1 << 20


def validation_times(sizes=(2500, 5000, 10000, 20000)) -> dict[int, float]:
    from edge_server.slices import compile_slice, warm_up_validation
    from tests.test_server_bounds import chain

    warm_up_validation()  # the server does this at start (edge_server.runtime)
    out = {}
    for n in sizes:
        body = chain(n)
        t0 = time.process_time()
        compile_slice(body, require_hashes=False)
        out[n] = time.process_time() - t0
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--memory-mb", type=int, default=1024)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--requests", type=int, default=20, help="victim requests per measurement")
    ap.add_argument("--fuzz", type=int, default=50_000, help="malformed messages (0: skip)")
    ap.add_argument("--attacks", default=",".join(ATTACKS), help="comma-separated subset")
    ap.add_argument("--out", default=str(ROOT / "docs" / "results" / "attacks"))
    args = ap.parse_args(argv)

    proc, address = serve_subprocess(
        "--threads", str(args.threads), "--memory-mb", str(args.memory_mb), "--cache-mb", "64"
    )
    rows = []
    try:
        victim = Victim(address)
        victim.run(3)  # warm: weights uploaded, kernels warm
        for name in ["(none)", *args.attacks.split(",")]:
            if name == "fuzz" and not args.fuzz:
                continue
            # the unattacked victim right before each attack: the ratio compares neighbours in time
            base = statistics.median(victim.run(args.requests))
            if name == "(none)":
                with RssSampler(proc.pid) as rss:
                    med = statistics.median(victim.run(args.requests))
                rep_codes = {}
            else:
                with RssSampler(proc.pid) as rss:
                    lat, rep = run_attack(name, address, during=lambda: victim.run(args.requests))
                med, rep_codes = statistics.median(lat), dict(rep.codes)
            rows.append(
                {
                    "attack": name,
                    "peak_rss_mb": rss.peak / MiB,
                    "victim_ms": med,
                    "unattacked_ms": base,
                    "ratio": med / base,
                    "attacker": rep_codes,
                }
            )
        fuzz = None
        if args.fuzz:
            from edge_server.fuzzing import run_fuzz

            t0 = time.time()
            with RssSampler(proc.pid) as rss:
                r = run_fuzz(address, args.fuzz, seed=1)
            fuzz = {
                "messages": r.messages,
                "calls": r.calls,
                "codes": dict(r.codes),
                "internal": r.internal,
                "seconds": time.time() - t0,
                "peak_rss_mb": rss.peak / MiB,
                "examples": r.bad,
            }
        alive = proc.poll() is None
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
    vt = validation_times()

    print(
        f"server: --memory-mb {args.memory_mb} --cache-mb 64 --threads {args.threads}; victim: "
        f"{args.requests} requests, median latency"
    )
    print(f"{'attack':10} {'peak RSS MiB':>13} {'victim ms':>10} {'before ms':>10} {'ratio':>6}  attacker got")
    for r in rows:
        print(
            f"{r['attack']:10} {r['peak_rss_mb']:13.0f} {r['victim_ms']:10.1f} {r['unattacked_ms']:10.1f} "
            f"{r['ratio']:6.2f}  {r['attacker']}"
        )
    if fuzz:
        print(
            f"fuzz: {fuzz['messages']} messages, {fuzz['calls']} calls in {fuzz['seconds']:.0f} s: {fuzz['codes']}; "
            f"INTERNAL/UNKNOWN {fuzz['internal']}; peak RSS {fuzz['peak_rss_mb']:.0f} MiB"
        )
    print("validation (CPU s): " + ", ".join(f"{n}: {s:.2f}" for n, s in vt.items()))
    print(f"server alive after all: {alive}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "attacks.json").write_text(
        json.dumps(
            {
                "memory_mb": args.memory_mb,
                "threads": args.threads,
                "requests": args.requests,
                "rows": rows,
                "fuzz": fuzz,
                "validation_cpu_s": vt,
                "server_alive": alive,
                "command": "python bench/bench_attacks.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            },
            indent=2,
        )
    )
    return 0 if alive and (fuzz is None or fuzz["internal"] == 0) else 1


if __name__ == "__main__":
    sys.exit(main())
