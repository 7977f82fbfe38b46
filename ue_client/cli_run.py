"""`coinfer-ue run`: serve a stream of requests through an edge server and print what happened.

Hooked into ``ue_client.cli`` (which owns the parser, logging and error handling) by
``add_run_parser``. Output: one table row per request; ``--json`` writes the report.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import threading
import time
from pathlib import Path

import torch
from tqdm import tqdm

from ue_client.errors import InputError, ServerError
from ue_client.frequency import DEFAULT_CPUFREQ_ROOT
from ue_client.inputs import load_inputs  # also imported from here by tests and scripts
from ue_client.options import DEFAULTS, ClientOptions, LinkOverride
from ue_client.planning import POLICIES
from ue_client.report import format_summary, run_summary
from ue_client.verify import max_abs_diff, within_tolerance

log = logging.getLogger(__name__)


def add_connection_args(p: argparse.ArgumentParser) -> None:
    """--token (env COINFER_TOKEN), --tls-ca, --tls-cert, --tls-key: how to reach a secured server."""
    p.add_argument("--token", default=os.environ.get("COINFER_TOKEN"),
                   help="bearer token for a server run with --auth-tokens (default: $COINFER_TOKEN)")
    p.add_argument("--tls-ca", metavar="PEM", help="CA that signed the server's certificate: connect with TLS")
    p.add_argument("--tls-cert", metavar="PEM", help="client certificate for mutual TLS (with --tls-key)")
    p.add_argument("--tls-key", metavar="PEM", help="private key of --tls-cert")


def connection_args(args: argparse.Namespace) -> dict:
    """The ``wire.channel`` / ``ClientOptions`` keyword arguments of ``add_connection_args``' flags."""
    return {"token": args.token or None, "tls_ca": args.tls_ca, "tls_cert": args.tls_cert, "tls_key": args.tls_key}


def add_run_parser(sub, add_model_args, add_common) -> None:
    """Add ``run`` to the ``coinfer-ue`` subparsers; its defaults are ``ClientOptions()``'s."""
    p = sub.add_parser("run", help="run requests split between this device and an edge server")
    add_model_args(p)
    p.add_argument("--server", required=True, help="edge server HOST:PORT")
    p.add_argument("--policy", default=DEFAULTS.policy, choices=list(POLICIES),
                   help=f"partitioning policy (default {DEFAULTS.policy}; auto: mjoa + progressive offloading)")
    p.add_argument("--requests", type=int, default=1, help="number of requests (default 1)")
    p.add_argument("--interval-ms", type=float, default=0.0, help="pause between requests (default 0)")
    p.add_argument("--input", default="random", help="random, an image (.jpg/.png) or a tensor file (.pt)")
    p.add_argument("--verify", action="store_true", help="compare every result with local execution")
    p.add_argument("--uplink-mbps", type=float, help="override the uplink estimate used for planning")
    p.add_argument("--rtt-ms", type=float, help="override the RTT estimate used for planning")
    p.add_argument("--cell-uplink-mbps", type=float, metavar="R",
                   help="a shared cell of R Mbit/s: pace the uplink to the share the server gives (x R)")
    p.add_argument("--weight", type=float, default=1.0, metavar="W",
                   help="this UE's priority in the server's weighted latency sum (--allocator ara; capped at the "
                        "tenant's quota compute_weight; default 1)")
    p.add_argument("--deadline-ms", type=float, default=DEFAULTS.deadline_ms,
                   help="latency deadline D in ms: robust plans P(latency > D) <= --eps (required with --policy "
                        "robust); with any policy each request reports whether it met D and the run its miss rate")
    p.add_argument("--eps", type=float, default=DEFAULTS.eps,
                   help=f"robust: allowed probability of missing --deadline-ms (default {DEFAULTS.eps:g})")
    p.add_argument("--uplink-cv", type=float, default=DEFAULTS.uplink_cv,
                   help="robust: relative spread (std/mean) of the uplink rate to hedge against (default: "
                        "measured by the UE from its recent uplink rate samples; a value overrides it)")
    p.add_argument("--timeout-ms", type=float, default=DEFAULTS.timeout_ms,
                   help="give up on the server after this long and finish locally (default: once the request is "
                        "past its predicted time + 3 sigma and showed no progress for "
                        f">= {DEFAULTS.deadline_slack_ms:g} ms)")
    p.add_argument("--cpufreq-root", type=Path, default=DEFAULT_CPUFREQ_ROOT,
                   help="robust: apply the chosen CPU frequency through cpufreq under this sysfs folder "
                        f"(default {DEFAULT_CPUFREQ_ROOT}; where it is not writable: plan at the current frequency)")
    p.add_argument("--freq-quota", metavar="CPU_MAX@CPUS",
                   help="robust: emulate frequency levels with this cgroup v2 cpu.max file, CPUS cores at the "
                        "highest level (the testbed)")
    p.add_argument("--tenant", default=DEFAULTS.tenant,
                   help=f"weight namespace on the server (default {DEFAULTS.tenant!r}; with --token: the token's)")
    p.add_argument("--ue-slowdown", type=float, default=DEFAULTS.ue_slowdown,
                   help="emulate a device this many times slower than this CPU (demos on one machine)")
    p.add_argument("--no-fallback", action="store_true", help="fail instead of computing locally")
    p.add_argument("--keep-session", action="store_true",
                   help="keep the session open while plans stay local (default: close it, re-open on demand)")
    p.add_argument("--plan", choices=("background", "inline"), default="background",
                   help="when the next request is decided: on a background thread while the caller is away "
                        "(default; a caller that comes back at once decides inside its requests), or always "
                        "inside the request")
    p.add_argument("--json", type=Path, help="write the per-request report here")
    p.add_argument("--data-channel", choices=["on", "off"], default="on" if DEFAULTS.data_channel else "off",
                   help="send weights on the server's data channel (raw bytes on a side TCP/TLS connection, less "
                   "CPU) when it advertises one, else in the Session stream; off: always in-stream "
                   f"(default {'on' if DEFAULTS.data_channel else 'off'})")
    p.add_argument("--data-address", metavar="HOST:PORT",
                   help="reach the data channel here instead of the server's host and advertised port (a relay)")
    add_connection_args(p)
    add_common(p)
    p.set_defaults(func=cmd_run)


# ---- inputs and results: see ue_client.inputs / ue_client.verify ---------------------------------------
HEADER = (f"{'#':>3} {'policy':<12} {'srv/ue ops':>11} {'upload MB':>9} {'bg MB':>6} {'tensor KB':>9} "
          f"{'pred ms':>8} {'meas ms':>8} {'GHz':>4} {'E J':>6} {'D':>2} {'max|diff|':>9} {'eager':>8}  note")


def format_row(rep) -> str:
    """One table row; ``GHz`` the frequency it ran at, ``E J`` its modelled UE energy, ``D`` ok/X whether
    it met ``--deadline-ms``; ``max|diff|`` is against the captured graph, ``eager`` against the user's
    module; a fallback's note starts with its kind (and gRPC code); ops off the server's allowlist are
    named with the number of ops each kept here (``pinned: ...``)."""
    diff = "-" if rep.max_abs_diff_vs_local is None else f"{rep.max_abs_diff_vs_local:.2g}"
    eager = "-" if rep.max_abs_diff_vs_eager is None else f"{rep.max_abs_diff_vs_eager:.2g}"
    pred = "-" if rep.predicted_ms is None else f"{rep.predicted_ms:.1f}"
    ghz = "-" if rep.frequency_ghz is None else f"{rep.frequency_ghz:.1f}"
    energy = "-" if rep.energy_j is None else f"{rep.energy_j:.3f}"
    met = "-" if rep.met_deadline is None else ("ok" if rep.met_deadline else "X")
    if rep.fallback:
        kind = " ".join(x for x in (rep.fallback_kind, rep.fallback_code) if x)
        note = f"FALLBACK ({kind}): {rep.fallback_reason}" if kind else f"FALLBACK: {rep.fallback_reason}"
    else:
        note = rep.fallback_reason or ""
    if rep.probe_bytes:
        note = f"probe {rep.probe_bytes / 1e6:.2f} MB; {note}" if note else f"probe {rep.probe_bytes / 1e6:.2f} MB"
    pinned = rep.pinned_note()
    if pinned:  # which op off the server's allowlist kept how many ops here
        note = f"{pinned}; {note}" if note else pinned
    return (f"{rep.request:>3} {rep.policy:<12} {f'{rep.server_ops}/{rep.ue_ops}':>11} "
            f"{rep.uploaded_weight_bytes / 1e6:>9.2f} {rep.background_bytes / 1e6:>6.2f} "
            f"{rep.sent_tensor_bytes / 1e3:>9.1f} {pred:>8} {rep.measured_ms:>8.1f} {ghz:>4} {energy:>6} {met:>2} "
            f"{diff:>9} {eager:>8}  {note[:160]}")


def json_report(model: str, server: str, link, reports, *, capture_check=None, error: str | None = None,
                summary: dict | None = None) -> dict:
    """The report file: exactly these keys (documented in the README's CLI reference).

    ``requests`` holds every request that finished, also when the run ended early (``error`` then says
    why, e.g. the server died under ``--no-fallback``); ``probe_bytes`` sums the connect-time uplink
    probes' uploads (each request reports those since the previous one); ``capture_check`` is the
    capture-time comparison of the captured graph with the user's module (``--verify``); ``summary`` is
    ``ue_client.report.run_summary`` (miss rate against ``--deadline-ms`` with its 90 % interval).
    """
    return {
        "model": model,
        "server": server,
        "link": {"uplink_mbps": None if link is None else link.uplink_mbps,
                 "rtt_ms": None if link is None else link.rtt_ms},
        "capture_check": capture_check,
        "error": error,
        "probe_bytes": sum(r.probe_bytes for r in reports),
        "requests": [{
            "request": r.request, "policy": r.policy, "server_ops": r.server_ops, "ue_ops": r.ue_ops,
            "uploaded_weight_bytes": r.uploaded_weight_bytes, "sent_tensor_bytes": r.sent_tensor_bytes,
            "probe_bytes": r.probe_bytes, "predicted_ms": r.predicted_ms, "measured_ms": r.measured_ms,
            # the whole call's prediction and wall time (``RequestReport.call_predicted_ms``, ``call_ms``)
            "call_predicted_ms": r.call_predicted_ms, "call_ms": r.call_ms,
            "max_abs_diff_vs_local": r.max_abs_diff_vs_local, "max_abs_diff_vs_eager": r.max_abs_diff_vs_eager,
            "fallback": r.fallback, "fallback_reason": r.fallback_reason if r.fallback else "",
            "fallback_kind": r.fallback_kind, "fallback_code": r.fallback_code, "plan_ms": r.plan_ms,
            "plan_cpu_ms": r.plan_cpu_ms, "plan_at_share_ms": r.plan_at_share_ms, "cpu_share": r.cpu_share,
            "plan_reason": r.plan_reason,
            "plan_why": r.plan_why,
            "plan_wait_ms": r.plan_wait_ms, "plan_bg": r.plan_bg, "plan_bg_ms": r.plan_bg_ms,
            "plan_bg_cpu_ms": r.plan_bg_cpu_ms,
            "deadline_ms": r.deadline_ms, "met_deadline": r.met_deadline, "predicted_mean_ms": r.predicted_mean_ms,
            "predicted_std_ms": r.predicted_std_ms, "frequency_ghz": r.frequency_ghz,
            "frequency_applied": r.frequency_applied, "uplink_mbps": r.uplink_mbps, "energy_j": r.energy_j,
            "ue_compute_ms": r.ue_compute_ms, "feasible": r.feasible, "miss_bound": r.miss_bound,
            "uplink_cv": r.uplink_cv, "server_timings": r.server_timings,
            "pinned": r.pinned,
            "uplink_backlog_ms": r.uplink_backlog_ms, "uplink_backlog_added_ms": r.uplink_backlog_added_ms,
        } for r in reports],
        "summary": summary,
    }


class _Progress:
    """An upload progress bar (tqdm) while a request runs; nothing when stdout is not a terminal or the
    upload is small (< ``MIN_BYTES``). A daemon thread polls ``engine.upload_status()`` every 0.2 s."""

    MIN_BYTES = 4e6

    def __init__(self, engine, enabled: bool):
        self.engine = engine
        self.enabled = enabled and hasattr(engine, "upload_status")
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._bar: tqdm | None = None

    def __enter__(self):
        if self.enabled:
            self._base = self.engine.upload_status()[0]
            self._thread = threading.Thread(target=self._run, name="coinfer-progress", daemon=True)
            self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(0.2):
            sent, waiting = self.engine.upload_status()
            sent -= self._base
            if waiting <= 0 or sent + waiting < self.MIN_BYTES:
                continue
            if self._bar is None:
                self._bar = tqdm(total=sent + waiting, desc="  uploading weights", unit="B", unit_scale=True,
                                 leave=False, file=sys.stdout, dynamic_ncols=True)
            self._bar.total = sent + waiting
            self._bar.n = sent
            self._bar.refresh()

    def __exit__(self, *exc):
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            if self._bar is not None:
                self._bar.close()


def capture_check(client) -> dict | None:
    """Capture time: the captured graph against the user's eager module on the example inputs.

    ``modelgraph.capture`` already ran this check (and refused a graph beyond its tolerance); its
    measured max |diff| is ``graph.eager_max_diff``. For a graph captured without the check it is
    measured here. Returns ``{"max_abs_diff", "within_tolerance"}`` (``ue_client.verify.TOLERANCES``),
    or None when the eager module is not at hand (a client built from a ModelGraph)."""
    from ue_client.verify import within_tolerance

    measured = client.graph.eager_max_diff
    if measured is not None:
        return {"max_abs_diff": measured, "within_tolerance": True}
    x = client.example_inputs
    eager = client.eager(*x, **client.example_kwargs)
    if eager is None:
        return None
    ref = client.reference(*x, **client.example_kwargs)
    return {"max_abs_diff": max_abs_diff(ref, eager), "within_tolerance": within_tolerance(ref, eager)}


def _build_client(args: argparse.Namespace, server: str, override):
    from modelgraph import load_model
    from ue_client.client import CoinferClient
    from ue_client.inputs import example_inputs, parse_input_shapes

    model, example, name = args.model, None, ""
    if args.input_shape is not None:  # the factory's own example gives int inputs their value range
        specs = parse_input_shapes(args.input_shape)
        lm = load_model(args.model, weights=args.weights)
        model, example, name = lm.module, example_inputs(specs, lm.example_inputs), lm.name
    options = ClientOptions(policy=args.policy, link=override, tenant=args.tenant, deadline_ms=args.deadline_ms,
                            timeout_ms=args.timeout_ms, eps=args.eps, uplink_cv=args.uplink_cv,
                            frequency=frequency_control(args), threads=args.threads, ue_slowdown=args.ue_slowdown,
                            fallback=not args.no_fallback, horizon=args.requests, suspend_idle=not args.keep_session,
                            cell_uplink_mbps=args.cell_uplink_mbps, weight=args.weight,
                            data_channel=args.data_channel == "on", data_address=args.data_address,
                            plan_background=getattr(args, "plan", "background") == "background",
                            **connection_args(args))
    return CoinferClient(model, example, server=server, options=options, name=name,
                         weights=None if name else args.weights,
                         example_kwargs=lm.example_kwargs if name else None)


def frequency_control(args: argparse.Namespace):
    """The ``ue_client.frequency`` control of ``run``'s flags: only the robust policy chooses a frequency
    (``--freq-quota``: the testbed's quota emulation, else cpufreq under ``--cpufreq-root``); None for
    the other policies (they run at the current frequency). Prints what it can apply."""
    if args.policy != "robust":
        return None
    from ue_client.frequency import CpuFreq, nvml_clocks, parse_quota_spec

    ctl = parse_quota_spec(args.freq_quota) if args.freq_quota else CpuFreq(args.cpufreq_root)
    print(f"frequency: {ctl.describe()}; {nvml_clocks()}", flush=True)
    return ctl


def check_run_args(args: argparse.Namespace) -> None:
    """Flag combinations ``run`` refuses (InputError naming the flag)."""
    if args.requests < 1:
        raise InputError("--requests must be >= 1")
    if args.policy == "robust" and args.deadline_ms is None:
        raise InputError("--policy robust needs --deadline-ms D (the latency deadline it plans for, with --eps)")
    if args.deadline_ms is not None and not args.deadline_ms > 0:
        raise InputError(f"--deadline-ms must be > 0, got {args.deadline_ms:g}")
    if not 0 < args.eps < 1:
        raise InputError(f"--eps must be in (0, 1), got {args.eps:g}")
    if args.timeout_ms is not None and not args.timeout_ms > 0:
        raise InputError(f"--timeout-ms must be > 0, got {args.timeout_ms:g}")
    if args.freq_quota and args.policy != "robust":
        raise InputError("--freq-quota applies the robust policy's frequency: use it with --policy robust")
    if not 0 <= args.interval_ms <= 3.6e6:  # also refuses nan
        raise InputError(f"--interval-ms must be in [0, 3600000] ms, got {args.interval_ms:g}")


def cmd_run(args: argparse.Namespace) -> int:
    """``coinfer-ue run``; the ``--json`` report is written on every exit, with the finished requests."""
    from ue_client.inputs import parse_server_address

    reports: list = []
    state: dict = {"link": None, "check": None}
    try:
        server = parse_server_address(args.server)
        check_run_args(args)
        if args.threads is not None:
            if args.threads < 1:
                raise InputError("--threads must be >= 1")
            torch.set_num_threads(args.threads)
        override = None
        if args.uplink_mbps is not None or args.rtt_ms is not None:
            override = LinkOverride(uplink_mbps=args.uplink_mbps, rtt_ms=args.rtt_ms)
        client = _build_client(args, server, override)
        try:
            _serve(args, client, reports, state)
            state["link"] = client.link
        finally:
            client.close()
    except BaseException as e:
        if args.json:
            err = f"{type(e).__name__}: {e}".splitlines()[0] if str(e) else type(e).__name__
            _write_json(args, reports, state, err)
        raise
    link = state["link"]
    if link is not None:
        print(f"link estimate: uplink {link.uplink_mbps:.1f} Mbps, rtt {link.rtt_ms:.1f} ms")
    print(format_summary(run_summary(reports, args.deadline_ms, args.eps if args.policy == "robust" else None)))
    if args.json and _write_json(args, reports, state, None):
        print(f"wrote {args.json}")
    return 0


def _write_json(args: argparse.Namespace, reports, state, error: str | None) -> bool:
    """Write the ``--json`` report; False (logged) when it could not be written."""
    d = json_report(args.model, args.server, state["link"], reports, capture_check=state["check"], error=error,
                    summary=run_summary(reports, args.deadline_ms, args.eps if args.policy == "robust" else None))
    try:
        args.json.write_text(json.dumps(d, indent=1))
    except OSError as e:  # the run's own error (if any) is the one to report
        log.error("cannot write %s: %s", args.json, e)
        return False
    return True


def _serve(args: argparse.Namespace, client, reports: list, state: dict) -> None:
    names = list(client.graph.inputs)
    inputs = load_inputs(args.input, client.example_inputs, names=names)
    print(f"{client.graph.name}: {len(client.graph.ops)} ops, {client.graph.total_weight_bytes / 1e6:.1f} MB "
          f"weights; server {client.server}, policy {args.policy}", flush=True)
    if args.verify:
        state["check"] = check = capture_check(client)
        if check is not None and not check["within_tolerance"]:
            print(f"warning: the captured graph differs from the model on the example inputs "
                  f"(max |diff| {check['max_abs_diff']:.3g}, beyond the tolerance of ue_client.verify)",
                  file=sys.stderr, flush=True)
    connect = getattr(client.engine, "connect", None)
    if connect is not None:
        # Connect before the first request, untimed, as a long-lived client would: the first request's
        # decision (and the partitioner's offline step for this model) is then made while connecting.
        try:
            connect()
        except ServerError as e:  # the first request tries again and falls back as it would have
            log.info("connect before the first request failed: %s", e)
            from ue_client.connection import TlsMismatch

            if isinstance(e, TlsMismatch) and not args.no_fallback:  # said once, up front (--no-fallback: the
                # first request ends the run with it): every request would fall back for the same reason
                print(f"coinfer-ue run: {e.reason}: {e}; until then every request runs locally", file=sys.stderr,
                      flush=True)
    print(HEADER, flush=True)
    for i in range(args.requests):
        if i and args.interval_ms > 0:
            time.sleep(args.interval_ms / 1e3)
        x = inputs if args.input != "random" or i == 0 else load_inputs("random", client.example_inputs, i)
        with _Progress(client.engine, sys.stdout.isatty()):
            y = client(*x, **client.example_kwargs)  # a factory's example kwargs (session 18)
        rep = client.last_report
        if args.verify:
            rep.max_abs_diff_vs_local = max_abs_diff(y, client.reference(*x, **client.example_kwargs))
            eager = client.eager(*x, **client.example_kwargs)
            rep.max_abs_diff_vs_eager = None if eager is None else max_abs_diff(y, eager)
            if eager is not None and not within_tolerance(y, eager):  # the user's module is the reference
                print(f"warning: request {i + 1} differs from the model's own output beyond the tolerance of "
                      f"ue_client.verify (max |diff| {rep.max_abs_diff_vs_eager:.3g})", file=sys.stderr, flush=True)
        reports.append(rep)
        print(format_row(rep), flush=True)
