"""Spurious fallbacks: how often a request gives up on a healthy server and finishes on the UE.

    .venv/bin/python bench/bench_fallbacks.py [--repetitions 20] [--requests 3] [--json PATH]
        [--sequence torchvision:resnet18=mjoa,torchvision:googlenet=offload,torchvision:mobilenet_v2=dads]

Issue 12's check: one ``coinfer-edge serve`` with default settings (a subprocess on a free loopback
port) for the whole run, and per repetition one client per (model, policy) of ``--sequence``, one
after the other, each running N requests (``horizon`` N, as ``coinfer-ue run --requests N`` does). By
default the clients run in this process (``CoinferClient``; each model captured once for the whole
run: a capture is ~15 s of CPU and not what is measured); ``--cli`` runs ``coinfer-ue run --requests
N --json`` processes instead, as a user would (about 35 s of start-up each). Each repetition uses a
fresh tenant name, so every repetition starts cold (its first request uploads the
server part while it runs: the case where a deadline derived from a bad prediction gives up). Nothing
fails on the server's side here, so every fallback is spurious. Prints one row per (model, policy)
and writes JSON with every request's ``fallback``, ``fallback_kind``, ``fallback_reason``,
``predicted_ms``, ``measured_ms`` and the load average at the start and end.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from edge_server.attacks import serve_subprocess  # noqa: E402

DEFAULT_SEQUENCE = "torchvision:resnet18=mjoa,torchvision:googlenet=offload,torchvision:mobilenet_v2=dads"


def parse_sequence(text: str) -> list[tuple[str, str]]:
    """``MODEL=POLICY,...`` -> [(model, policy), ...]; raises ValueError on an item without '='."""
    out = []
    for item in text.split(","):
        model, sep, policy = item.strip().rpartition("=")
        if not sep or not model or not policy:
            raise ValueError(f"--sequence item {item!r} is not MODEL=POLICY")
        out.append((model, policy))
    return out


def run_ue(address: str, model: str, policy: str, requests: int, tenant: str, out: Path,
           timeout_s: float) -> dict:
    """One ``coinfer-ue run`` process; its JSON report (``error`` set when the process failed)."""
    cmd = [sys.executable, "-m", "ue_client.cli", "run", "--model", model, "--policy", policy,
           "--server", address, "--requests", str(requests), "--tenant", tenant, "--json", str(out)]
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout_s,
                       env=dict(os.environ, PYTHONPATH=str(ROOT)))
    if not out.exists():
        return {"requests": [], "error": f"exit {p.returncode}: {p.stderr.strip()[-400:]}"}
    rep = json.loads(out.read_text())
    if p.returncode != 0 and not rep.get("error"):
        rep["error"] = f"exit {p.returncode}: {p.stderr.strip()[-400:]}"
    return rep


def run_library(address: str, prepared, policy: str, requests: int, tenant: str) -> dict:
    """One in-process client on a prepared model's captured graph: its per-request reports, each with
    ``matches_eager`` (the answer against the user's own module on the same inputs, within
    ``ue_client.verify.TOLERANCES``) and ``max_abs_diff_vs_eager``; ``error`` if the client raised."""
    import torch

    from ue_client.client import CoinferClient
    from ue_client.verify import max_abs_diff, within_tolerance

    reqs, error = [], None
    try:
        with CoinferClient(prepared.graph, server=address, policy=policy, tenant=tenant, horizon=requests) as c:
            for _ in range(requests):
                x = c.example_inputs
                got = c(*x)
                rep = c.last_report.to_dict()
                with torch.no_grad():
                    want = prepared.module(*x)
                rep["max_abs_diff_vs_eager"] = max_abs_diff(got, want)
                rep["matches_eager"] = within_tolerance(got, want)
                reqs.append(rep)
    except Exception as e:  # a client that fails is a row, not the end of the bench
        error = f"{type(e).__name__}: {e}"
    return {"requests": reqs, "error": error}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repetitions", type=int, default=20)
    ap.add_argument("--requests", type=int, default=3)
    ap.add_argument("--sequence", default=DEFAULT_SEQUENCE, help="MODEL=POLICY,... run in this order")
    ap.add_argument("--timeout-s", type=float, default=600.0, help="per UE process")
    ap.add_argument("--cli", action="store_true", help="run coinfer-ue run processes instead of in-process clients")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    if args.repetitions < 1 or args.requests < 1:
        ap.error("--repetitions and --requests must be >= 1")
    try:
        sequence = parse_sequence(args.sequence)
    except ValueError as e:
        ap.error(str(e))
    from ue_client.planning import POLICIES

    bad = sorted({p for _, p in sequence} - set(POLICIES))
    if bad:
        ap.error(f"--sequence: unknown policy {', '.join(bad)} (one of {', '.join(POLICIES)})")
    if not (args.timeout_s > 0 and args.timeout_s != float("inf")):
        ap.error(f"--timeout-s must be a finite number > 0, got {args.timeout_s}")

    graphs = {}
    if not args.cli:
        from ue_client.client import prepare_model

        for model in dict.fromkeys(m for m, _ in sequence):
            graphs[model] = prepare_model(model)
    load0 = os.getloadavg()
    t0 = time.monotonic()
    server, address = serve_subprocess()
    rows: list[dict] = []
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for rep in range(args.repetitions):
                for k, (model, policy) in enumerate(sequence):
                    tenant = f"fallbacks-{os.getpid()}-{rep}"
                    if args.cli:
                        report = run_ue(address, model, policy, args.requests, tenant, Path(tmp) / f"r{rep}_{k}.json",
                                        args.timeout_s)
                    else:
                        report = run_library(address, graphs[model], policy, args.requests, tenant)
                    reqs = report.get("requests", [])
                    rows.append({
                        "repetition": rep, "model": model, "policy": policy, "error": report.get("error"),
                        "requests": [{key: r.get(key) for key in (
                            "request", "fallback", "fallback_kind", "fallback_reason", "fallback_code",
                            "predicted_ms", "measured_ms", "server_ops", "plan_ms", "matches_eager",
                            "max_abs_diff_vs_eager")} for r in reqs],
                    })
                    fb = sum(bool(r.get("fallback")) for r in reqs)
                    print(f"rep {rep:2d} {model:28s} {policy:8s} requests {len(reqs)} fallbacks {fb}"
                          + (f"  error: {report['error']}" if report.get("error") else ""), flush=True)
    finally:
        server.terminate()
        server.wait(timeout=30)
    load1 = os.getloadavg()

    print(f"\n{'model':28s} {'policy':8s} {'requests':>8s} {'fallbacks':>9s} {'errors':>6s} {'wrong':>5s}  kinds")
    summary = []
    for model, policy in sequence:
        mine = [r for r in rows if r["model"] == model and r["policy"] == policy]
        reqs = [q for r in mine for q in r["requests"]]
        fbs = [q for q in reqs if q["fallback"]]
        kinds = sorted({q["fallback_kind"] or "?" for q in fbs})
        errors = sum(r["error"] is not None for r in mine)
        wrong = sum(q.get("matches_eager") is False for q in reqs)  # in-process clients only (not --cli)
        summary.append({"model": model, "policy": policy, "requests": len(reqs), "fallbacks": len(fbs),
                        "process_errors": errors, "wrong_vs_eager": wrong, "fallback_kinds": kinds})
        print(f"{model:28s} {policy:8s} {len(reqs):8d} {len(fbs):9d} {errors:6d} {wrong:5d}  {', '.join(kinds) or '-'}")
    total = sum(s["fallbacks"] for s in summary)
    print(f"total: {total} fallbacks in {sum(s['requests'] for s in summary)} requests, "
          f"{time.monotonic() - t0:.0f} s, load average {load0[0]:.1f} -> {load1[0]:.1f}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({
            "command": "python bench/bench_fallbacks.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            "clients": "coinfer-ue run processes" if args.cli else "in-process CoinferClient",
            "repetitions": args.repetitions, "requests_per_run": args.requests,
            "sequence": [f"{m}={p}" for m, p in sequence], "server": "coinfer-edge serve (defaults), loopback",
            "loadavg_start": load0, "loadavg_end": load1, "elapsed_s": time.monotonic() - t0,
            "fallbacks": total, "summary": summary, "runs": rows}, indent=1))
    failed = sum(s["process_errors"] for s in summary)
    if failed:  # a run that could not ask is no evidence of "no fallbacks"
        print(f"{failed} client run(s) failed (see 'error' in the rows): no verdict", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
