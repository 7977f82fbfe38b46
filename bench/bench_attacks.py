"""Issue 11 attacks against a real ``coinfer-edge serve --memory-mb N`` subprocess: server memory and the
victim tenant's latency under each attack, side by side with the unattacked victim in the same run.

    python bench/bench_attacks.py [--memory-mb 1024] [--requests 20] [--fuzz 50000] [--out DIR]
        [--pinning unpinned,pinned] [--attacker-cpus 1] [--settle-s S]

For each attack: the server's peak RSS while it runs (sampled every 20 ms), the victim's median
request latency and its ratio to the unattacked median measured right before that attack (same run),
and what the attacker got back. The attacker always runs in its own process; ``--pinning pinned`` puts
it (and the processes it starts: ``cpu_control``'s busy loops) on ``--attacker-cpus`` and the servers
and the victim on the other CPUs, so that a ratio shows what the attack costs the victim through the
server, not the attacker's own client CPU (which an attacker on another machine would not take from
the server); each listed pinning is measured in every round, side by side. The victim also runs during
the attack's first ``--settle-s`` seconds (the ``first S s`` column: e.g. while an attacker spends its
ProfileGraph budget's bucket); ``victim ms`` is measured after them. Then ``--fuzz`` malformed messages
(0 INTERNAL/UNKNOWN expected; sent to a server of this checkout started with ``--tarpit-rate 0``, since
the check wants every answer, not a slowed flood) and the validation time of slices of 2.5k/5k/10k/20k chained ops (CPU
seconds). Prints a table and writes ``attacks.json`` under ``--out``.

    python bench/bench_attacks.py --only-validation [--compare-root DIR] [--validation-rounds 5]

measures only the validation times, in fresh processes, this checkout alternating round by round with
``--compare-root`` (e.g. main before a change), and writes ``validation.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from edge_server.attacks import ATTACKS, RssSampler, Victim, pin_process, run_attack, serve_subprocess  # noqa: E402

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


# One validation run in a fresh interpreter of a checkout (this one or --compare-root): that checkout's own
# ``validation_times``, CPU seconds per size.
_VALIDATION_CHILD = """
import json, sys
sys.path.insert(0, "bench")
from bench_attacks import validation_times
print(json.dumps(validation_times(json.loads(sys.argv[1]))))
"""


def validation_side_by_side(
    roots: dict[str, str], sizes=(2500, 5000, 10000, 20000), rounds: int = 5
) -> dict[str, dict[int, list[float]]]:
    """CPU seconds of ``compile_slice`` on chains of ``sizes`` relus, per checkout in ``roots`` (label ->
    directory), each round one fresh process per checkout, the checkouts alternating round by round so
    that they share the machine's load. Returns label -> size -> the rounds' times."""
    times: dict[str, dict[int, list[float]]] = {label: {n: [] for n in sizes} for label in roots}
    for r in range(rounds):
        order = list(roots.items()) if r % 2 == 0 else list(reversed(roots.items()))
        for label, root in order:
            env = {**os.environ, "PYTHONPATH": root}
            res = subprocess.run(
                [sys.executable, "-c", _VALIDATION_CHILD, json.dumps(list(sizes))],
                cwd=root,
                env=env,
                capture_output=True,
                text=True,
                check=True,
            )
            for n, t in json.loads(res.stdout.strip().splitlines()[-1]).items():
                times[label][int(n)].append(t)
    return times


def _validation_only(args, argv) -> int:
    roots = {"this": str(ROOT)}
    if args.compare_root:
        roots["compare"] = str(Path(args.compare_root).resolve())
    t0 = time.time()
    times = validation_side_by_side(roots, rounds=args.validation_rounds)
    load = os.getloadavg()
    print(
        f"slice validation (compile_slice of N chained relus after warm_up_validation), CPU s, "
        f"{args.validation_rounds} rounds alternating {', '.join(f'{k}={v}' for k, v in roots.items())}; "
        f"load average {load[0]:.1f} on {os.cpu_count()} CPUs"
    )
    ratio_col = "  ratio" if len(roots) > 1 else ""
    print(f"{'checkout':8} {'ops':>6} {'median s':>9} {'min s':>7} {'us/op':>6}{ratio_col}")
    summary = {}
    for label in roots:
        summary[label] = {}
        for n, ts in times[label].items():
            med = statistics.median(ts)
            summary[label][n] = {"median_s": med, "min_s": min(ts), "us_per_op": med / n * 1e6, "rounds": ts}
            ratio = ""
            if label == "this" and "compare" in times:
                ratio = f"  {med / statistics.median(times['compare'][n]):.2f}"
            print(f"{label:8} {n:6d} {med:9.3f} {min(ts):7.3f} {med / n * 1e6:6.1f}{ratio}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "validation.json").write_text(
        json.dumps(
            {
                "roots": roots,
                "load_average": load,
                "wall_s": time.time() - t0,
                "validation_cpu_s": summary,
                "command": "python bench/bench_attacks.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            },
            indent=2,
        )
    )
    return 0


def _stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--memory-mb", type=int, default=1024)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--requests", type=int, default=20, help="victim requests per measurement")
    ap.add_argument(
        "--rounds", type=int, default=1, help="unattacked/attacked pairs per attack (medians pooled over rounds)"
    )
    ap.add_argument("--fuzz", type=int, default=50_000, help="malformed messages (0: skip)")
    ap.add_argument("--attacks", default=",".join(ATTACKS), help="comma-separated subset")
    ap.add_argument(
        "--compare-root",
        default=None,
        help="another checkout whose server is measured too, round by round alternating with this one's "
        "(e.g. main before a change): both servers run all along, each idle while the other is measured",
    )
    ap.add_argument(
        "--this-flags",
        default="",
        help="extra `coinfer-edge serve` flags for this checkout's server only (e.g. '--profile-workers 0')",
    )
    ap.add_argument(
        "--pinning",
        default="unpinned",
        help="comma list of unpinned,pinned: measured side by side every round (pinned: the attacker's process "
        "on --attacker-cpus, the servers and the victim on the other CPUs)",
    )
    ap.add_argument(
        "--attacker-cpus",
        default=None,
        help="CPUs of the attacker when pinned, comma list (default: the last CPU this process may use)",
    )
    ap.add_argument(
        "--settle-s",
        type=float,
        default=1.0,
        help="seconds of attack before the victim's measured requests (the victim runs through them too)",
    )
    ap.add_argument("--out", default=str(ROOT / "docs" / "results" / "attacks"))
    ap.add_argument(
        "--only-validation",
        action="store_true",
        help="only the slice validation times (2.5k-20k chained ops), this checkout and --compare-root "
        "alternating in fresh processes; writes validation.json",
    )
    ap.add_argument("--validation-rounds", type=int, default=5, help="rounds of --only-validation")
    args = ap.parse_args(argv)
    if args.only_validation:
        return _validation_only(args, argv)

    flags = ("--threads", str(args.threads), "--memory-mb", str(args.memory_mb), "--cache-mb", "64")
    roots = {"this": None} if not args.compare_root else {"this": None, "compare": args.compare_root}
    all_cpus = os.sched_getaffinity(0)
    if not math.isfinite(args.settle_s) or args.settle_s < 0:
        ap.error(f"--settle-s must be a finite number >= 0, got {args.settle_s}")
    try:
        attacker_cpus = {int(c) for c in args.attacker_cpus.split(",")} if args.attacker_cpus else {max(all_cpus)}
    except ValueError:
        ap.error(f"--attacker-cpus: a comma list of CPU numbers, got {args.attacker_cpus!r}")
    server_cpus = all_cpus - attacker_cpus
    pinnings = args.pinning.split(",")
    if not set(pinnings) <= {"unpinned", "pinned"}:
        ap.error("--pinning: a comma list of unpinned, pinned")
    if "pinned" in pinnings and (not server_cpus or not attacker_cpus <= all_cpus):
        ap.error(
            f"--attacker-cpus {sorted(attacker_cpus)} must be a proper subset of this process's CPUs {sorted(all_cpus)}"
        )
    servers = {}
    rows = []
    fuzz = None
    alive = {}
    try:
        for label, root in roots.items():
            extra = tuple(args.this_flags.split()) if label == "this" else ()
            servers[label] = serve_subprocess(*flags, *extra, root=root)
        victims = {label: Victim(address) for label, (_, address) in servers.items()}
        for v in victims.values():
            v.run(3)  # warm: weights uploaded, kernels warm
        for name in ["(none)", *args.attacks.split(",")]:
            if name == "fuzz" and not args.fuzz:
                continue
            keys = [(label, pin) for label in servers for pin in pinnings]
            acc = {k: {"base": [], "lat": [], "early": [], "bq": [], "q": [], "peak": 0, "codes": {}} for k in keys}
            for _ in range(max(1, args.rounds)):
                for label, pin in keys:
                    proc, address = servers[label]
                    victim, a = victims[label], acc[label, pin]
                    # the server and the victim (this process) on the server CPUs when pinned, else on all
                    for pid in (proc.pid, os.getpid()):
                        pin_process(pid, server_cpus if pin == "pinned" else all_cpus)
                    # the unattacked victim right before each attack: the ratio compares neighbours in time
                    a["base"] += victim.run(args.requests)
                    a["bq"] += [q for _, q in victim.server_ms[-args.requests :]]

                    def settle(seconds, victim=victim, a=a):
                        t0 = time.monotonic()
                        while time.monotonic() - t0 < seconds:
                            a["early"] += victim.run(min(args.requests, 5))

                    with RssSampler(proc.pid) as rss:
                        if name == "(none)":
                            a["lat"] += victim.run(args.requests)
                        else:
                            lat, rep = run_attack(
                                name,
                                address,
                                during=lambda v=victim: v.run(args.requests),
                                settle_s=args.settle_s,
                                settle=settle,
                                cpus=attacker_cpus if pin == "pinned" else None,
                            )
                            a["lat"] += lat
                            for k, n in rep.codes.items():
                                a["codes"][k] = a["codes"].get(k, 0) + n
                    a["q"] += [q for _, q in victim.server_ms[-args.requests :]]
                    a["peak"] = max(a["peak"], rss.peak)
            for (label, pin), a in acc.items():
                med, base = statistics.median(a["lat"]), statistics.median(a["base"])
                rows.append(
                    {
                        "server": label,
                        "pinning": pin,
                        "attack": name,
                        "peak_rss_mb": a["peak"] / MiB,
                        "victim_ms": med,
                        "unattacked_ms": base,
                        "ratio": med / base,
                        "victim_first_s_ms": statistics.median(a["early"]) if a["early"] else None,
                        "first_s_ratio": statistics.median(a["early"]) / base if a["early"] else None,
                        "victim_queue_ms": statistics.median(a["q"]),
                        "unattacked_queue_ms": statistics.median(a["bq"]),
                        "victim_requests": len(a["lat"]),
                        "victim_lat_ms": [round(x, 3) for x in a["lat"]],
                        "unattacked_lat_ms": [round(x, 3) for x in a["base"]],
                        "first_s_lat_ms": [round(x, 3) for x in a["early"]],
                        "attacker": a["codes"],
                    }
                )
        for pid in [p.pid for p, _ in servers.values()] + [os.getpid()]:
            pin_process(pid, all_cpus)
        if args.fuzz:
            from edge_server.fuzzing import run_fuzz

            # the status check of every malformed message wants them answered at once: a server of this
            # checkout with the tarpit off (with it, 2,000 messages from one address take minutes)
            servers["fuzz"] = serve_subprocess(*flags, *tuple(args.this_flags.split()), "--tarpit-rate", "0")
            proc, address = servers["fuzz"]
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
        alive = {label: proc.poll() is None for label, (proc, _) in servers.items()}
    finally:
        for proc, _ in servers.values():
            _stop(proc)
    vt = validation_times()
    load = os.getloadavg()

    print(
        f"server: --memory-mb {args.memory_mb} --cache-mb 64 --threads {args.threads} {args.this_flags} (this); "
        f"victim: {args.requests} requests x {args.rounds} round(s) after {args.settle_s:g} s of attack, median "
        f"latency; pinned: attacker on CPUs {sorted(attacker_cpus)}, servers + victim on {sorted(server_cpus)}; "
        f"load average {load[0]:.1f} on {os.cpu_count()} CPUs"
    )
    print(
        f"{'server':8} {'pinning':8} {'attack':11} {'peak RSS MiB':>12} {'victim ms':>9} {'before ms':>9} "
        f"{'ratio':>6} {'first S s':>9} {'ratio':>6} {'queue ms':>8} {'before':>6}  attacker got"
    )
    for r in rows:
        first = (
            f"{r['victim_first_s_ms']:9.1f} {r['first_s_ratio']:6.2f}"
            if r["victim_first_s_ms"]
            else f"{'-':>9} {'-':>6}"
        )
        print(
            f"{r['server']:8} {r['pinning']:8} {r['attack']:11} {r['peak_rss_mb']:12.0f} {r['victim_ms']:9.1f} "
            f"{r['unattacked_ms']:9.1f} {r['ratio']:6.2f} {first} {r['victim_queue_ms']:8.2f} "
            f"{r['unattacked_queue_ms']:6.2f}  {r['attacker']}"
        )
    if fuzz:
        print(
            f"fuzz: {fuzz['messages']} messages, {fuzz['calls']} calls in {fuzz['seconds']:.0f} s: {fuzz['codes']}; "
            f"INTERNAL/UNKNOWN {fuzz['internal']}; peak RSS {fuzz['peak_rss_mb']:.0f} MiB"
        )
    print("validation (CPU s, this checkout): " + ", ".join(f"{n}: {s:.2f}" for n, s in vt.items()))
    print(f"servers alive after all: {alive}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "attacks.json").write_text(
        json.dumps(
            {
                "memory_mb": args.memory_mb,
                "threads": args.threads,
                "requests": args.requests,
                "rounds": args.rounds,
                "compare_root": args.compare_root,
                "this_flags": args.this_flags,
                "pinnings": pinnings,
                "attacker_cpus": sorted(attacker_cpus),
                "server_cpus": sorted(server_cpus),
                "settle_s": args.settle_s,
                "load_average": load,
                "rows": rows,
                "fuzz": fuzz,
                "validation_cpu_s": vt,
                "server_alive": alive,
                "command": "python bench/bench_attacks.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            },
            indent=2,
        )
    )
    ok = all(alive.values()) and (fuzz is None or fuzz["internal"] == 0)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
