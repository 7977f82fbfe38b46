"""`coinfer-ue`: the device-side command line (profile, plan, run).

Logging is configured here and only here. Known bad input ends with one line on stderr naming the
cause and exit status 2; ``--verbose`` adds the traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import warnings
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from ue_client.cli_run import add_connection_args, add_run_parser, connection_args

log = logging.getLogger("coinfer.ue")

EXIT_BAD_INPUT = 2


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="torchvision:NAME or package.module:factory")
    p.add_argument("--weights", help="local state dict for the model (default: random init)")
    p.add_argument("--input-shape", help="example inputs: shapes with an optional dtype, ';' between inputs, "
                   "e.g. 1,3,224,224 or 1,3,224,224:float32;1,128:int64 (default: the model's own example)")
    p.add_argument("--threads", type=int, help="torch intra-op threads on this device (default: the least of "
                   "torch's default, the cores this process may use (its affinity mask, a cgroup CPU quota rounded "
                   "up) and the cores other processes leave idle, measured over 0.25 s at start and rounded, at "
                   "least 1: on a busy machine torch's OpenMP threads otherwise spin at every op's barrier while "
                   "a descheduled one holds it up; resnet18 beside a busy loop on 2 cores: 570 ms with torch's 2 "
                   "threads, 94 with 1). With OMP_WAIT_POLICY=PASSIVE in the environment (its threads sleep at a "
                   "barrier instead of spinning; 66 ms there with 2 threads) the load is not counted: start so "
                   "where the load comes and goes")


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--verbose", "-v", action="store_true", help="debug logging and tracebacks")


def load_graph(args: argparse.Namespace):
    """Model spec -> (LoadedModel, ModelGraph), as every subcommand needs it; ``--input-shape`` replaces
    the example inputs (``ue_client.inputs.example_inputs``)."""
    from modelgraph import ModelGraphError, capture, load_model
    from modelgraph.sources import with_given_hint
    from ue_client.errors import InputError
    from ue_client.inputs import example_inputs, parse_input_shapes

    specs = None if args.input_shape is None else parse_input_shapes(args.input_shape)
    lm = load_model(args.model, weights=args.weights)
    lm.example_inputs = example_inputs(specs, lm.example_inputs)
    try:
        return lm, capture(lm.module, lm.example_inputs, kwargs=lm.example_kwargs, name=lm.name)
    except ModelGraphError as e:
        raise InputError(lm.with_example_hint(e) if specs is None
                         else with_given_hint(e, f"--input-shape {args.input_shape}")) from e


# ---- profile -----------------------------------------------------------------------------------
def _profile_parser(sub) -> None:
    p = sub.add_parser("profile", help="measure per-op latency of a model on this device")
    _add_model_args(p)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--runs", type=int, default=20, help="timed runs (default 20)")
    p.add_argument("--warmup", type=int, default=3, help="untimed runs before the timed ones (default 3)")
    p.add_argument("--depth", type=int, default=None, help="group the table by the first N module-path parts")
    p.add_argument("--no-cache", action="store_true", help="measure even if a cached profile exists")
    p.add_argument("--json", type=Path, help="write the profile here")
    _add_common(p)
    p.set_defaults(func=cmd_profile)


def cmd_profile(args: argparse.Namespace) -> int:
    from modelgraph.execute import bind_inputs
    from profiler import device_info, profile_model
    from ue_client.heap import retain_freed_buffers

    retain_freed_buffers()  # the heap a client's requests run with (``CoinferClient``)
    lm, graph = load_graph(args)
    example = lm.example_inputs if not lm.example_kwargs else bind_inputs(graph, lm.example_inputs,
                                                                          lm.example_kwargs)
    prof = profile_model(graph, example, device=args.device, threads=args.threads, runs=args.runs,
                         warmup=args.warmup, use_cache=not args.no_cache)
    print(f"{graph.name}: {len(graph.ops)} ops, {graph.total_weight_bytes / 2**20:.2f} MiB weights; "
          f"{prof.device}, {prof.threads} threads, {prof.runs} runs")
    print(f"{'layer':<40} {'ops':>4} {'mean_ms':>9} {'std_ms':>8} {'out_KiB':>9} {'weights_KiB':>12}")
    for row in prof.per_layer(args.depth):
        print(f"{row.layer[:40]:<40} {row.ops:>4} {row.mean_ms:>9.3f} {row.var_ms2 ** 0.5:>8.3f} "
              f"{row.out_bytes / 1024:>9.1f} {row.weight_bytes / 1024:>12.1f}")
    err = (prof.raw_sum_mean_ms - prof.whole_model_ms) / prof.whole_model_ms if prof.whole_model_ms else 0.0
    print(f"total: per-op sum {prof.sum_mean_ms:.2f} ms (uncalibrated {prof.raw_sum_mean_ms:.2f} ms, "
          f"{err:+.1%} vs whole); whole-graph median {prof.whole_model_ms:.2f} ms; "
          f"weights {prof.total_weight_bytes} bytes")
    if args.json:
        d = prof.to_dict()
        d["device_info"] = device_info().to_dict()
        args.json.write_text(json.dumps(d, indent=1))
        print(f"wrote {args.json}")
    return 0


# ---- plan --------------------------------------------------------------------------------------
def _plan_parser(sub) -> None:
    p = sub.add_parser("plan", help="compare partitioning policies for a model and a link")
    _add_model_args(p)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--server-profile", type=Path, help="JSON of the server's per-op costs "
                     "(a `coinfer-ue profile --json` made on the server, or {op: [mean_ms, var_ms2]})")
    src.add_argument("--server", help="ask this edge server (HOST:PORT) to profile the graph")
    src.add_argument("--server-speedup", type=float, help="what-if: server op time = UE op time / X")
    p.add_argument("--uplink-mbps", type=float, required=True)
    p.add_argument("--downlink-mbps", type=float, help="default: same as the uplink")
    p.add_argument("--rtt-ms", type=float, required=True)
    p.add_argument("--policy", default="all", help="a policy name, a comma list, or 'all'")
    p.add_argument("--deadline-ms", type=float, help="deadline for the robust policy")
    p.add_argument("--eps", type=float, default=0.05, help="robust: allowed deadline-miss probability")
    p.add_argument("--runs", type=int, default=20, help="timed runs for the UE profile")
    p.add_argument("--json", type=Path, help="write the plans here")
    add_connection_args(p)
    _add_common(p)
    p.set_defaults(func=cmd_plan)


def _ms(path: Path, op: object, what: str, v: object) -> float:
    """A time from a server profile file: a JSON number (``float(true)`` and ``float("3")`` would pass)."""
    if isinstance(v, bool) or not isinstance(v, int | float):
        raise ValueError(f"server profile {path}: op {op!r} has {what}={v!r} (must be a number)")
    return float(v)


def _server_costs_from_file(path: Path, model_hash: str | None = None) -> dict[str, tuple[float, float]]:
    """``{op name: (mean ms, variance ms^2)}`` from ``coinfer-ue profile --json``'s file or ``{op: [mean_ms,
    var_ms2]}``. Raises ValueError for another model's profile, another form, or a time that is not a JSON
    number (a boolean was a time of 1 ms); ranges are ``CostGraph``'s."""
    d = json.loads(path.read_text())
    if isinstance(d, dict) and isinstance(d.get("ops"), list):
        other = d.get("model_hash")
        if model_hash and other and other != model_hash:
            raise ValueError(f"server profile {path} is for model {d.get('model', '?')!r} (hash {other}), not this "
                             f"graph (hash {model_hash}); was it made for the same model and input shape?")
        return {op["name"]: (_ms(path, op["name"], "mean_ms", op["mean_ms"]),
                             _ms(path, op["name"], "var_ms2", op.get("var_ms2", 0.0))) for op in d["ops"]}
    if isinstance(d, dict):
        return {k: (_ms(path, k, "mean_ms", v[0]), _ms(path, k, "var_ms2", v[1]) if len(v) > 1 else 0.0)
                for k, v in d.items()}
    raise ValueError(f"{path}: expected a profile JSON or {{op: [mean_ms, var_ms2]}}")


def _server_costs_from_server(graph, address: str, **channel_args) -> dict[str, tuple[float, float]]:
    from modelgraph import make_slice
    from ue_client import wire

    spec = make_slice(graph, graph.split(op.name for op in graph.ops), with_hashes=False)
    from ue_client.connection import tls_problem
    from ue_client.errors import ServerUnavailable

    ch = wire.channel(address, **channel_args)
    try:
        prof = wire.profile_graph(wire.stub(ch), spec.to_json(), timeout_s=600.0)
    except ServerUnavailable as e:  # a TLS mismatch named, with the flag to pass (session 33)
        better = tls_problem(e, address, channel_args, 10.0)
        if better is e:
            raise
        raise better from e
    finally:
        ch.close()
    return dict(prof.ops)


def cmd_plan(args: argparse.Namespace) -> int:
    from modelgraph.execute import bind_inputs
    from modelgraph.pinning import pin_off_allowlist
    from partitioner import Link
    from partitioner.report import format_table, plan_table
    from profiler import cost_graph, profile_model

    lm, full = load_graph(args)
    # ops off the allowlist and their descendants run on the UE after the rest: plan the rest (the head)
    pinned = pin_off_allowlist(full)
    graph = pinned.head
    example = lm.example_inputs if graph is full and not lm.example_kwargs else bind_inputs(
        full, lm.example_inputs, lm.example_kwargs or None)
    from ue_client.heap import retain_freed_buffers

    retain_freed_buffers()  # the heap a client's requests run with (``CoinferClient``)
    prof = profile_model(graph, example, threads=args.threads, runs=args.runs)
    if args.server_speedup is not None:
        costs = cost_graph(graph, prof).with_server_speedup(args.server_speedup)
    else:
        if args.server_profile is not None:
            server = _server_costs_from_file(args.server_profile, full.model_hash)
            label = f"profiled ({args.server_profile})"
        else:
            server = _server_costs_from_server(graph, args.server, **connection_args(args))
            label = f"profiled by {args.server}"
        missing = [op.name for op in graph.ops if op.name not in server]
        if missing:
            raise ValueError(f"server profile lacks {len(missing)} ops of this graph (e.g. {missing[0]!r}); "
                             "was it made for the same model and input shape?")
        costs = cost_graph(graph, prof, server)
        costs = replace(costs, meta={**costs.meta, "server_costs": label})
    link = Link(uplink_mbps=args.uplink_mbps, downlink_mbps=args.downlink_mbps, rtt_ms=args.rtt_ms)
    options = {"robust": {"deadline_ms": args.deadline_ms, "eps": args.eps}} if args.deadline_ms is not None else {}
    table = plan_table(costs, link, args.policy, options=options,
                       deadline_hint="pass --deadline-ms D (and --eps, default 0.05)")
    table["pinned"] = pinned.to_json()["pinned"]
    if pinned.pins:
        print(f"{full.name}: {pinned.note()} (planned: the other {len(graph.ops)} ops)")
    print(format_table(table))
    if args.json:
        args.json.write_text(json.dumps(table, indent=1))
        print(f"wrote {args.json}")
    return 0


# ---- entry point -------------------------------------------------------------------------------
SUBCOMMANDS: list[Callable] = [_profile_parser, _plan_parser]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="coinfer-ue", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for add in SUBCOMMANDS:
        add(sub)
    add_run_parser(sub, _add_model_args, _add_common)
    return parser


def known_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that mean bad input or an unavailable resource, not a bug."""
    from modelgraph import ModelGraphError
    from partitioner import CostGraphError
    from partitioner.errors import PartitionerError
    from profiler import ProfilerError
    from ue_client.errors import CoinferError

    return (ModelGraphError, CostGraphError, PartitionerError, ProfilerError, CoinferError, OSError, ValueError)


def configure_logging(verbose: bool) -> None:
    """Our loggers at INFO/DEBUG; torch's own chatter (graph dumps on a failed export, deprecation
    warnings) only with --verbose, so a bad input stays one line."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not verbose:
        import torch  # noqa: F401 - torch installs its own stderr handler on import; quiet it

        for h in logging.getLogger("torch").handlers:
            h.setLevel(logging.CRITICAL)
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=UserWarning, module="torch")


IDLE_WINDOW_S = 0.25
"""How long ``default_threads`` watches the machine's idle time before it picks a thread count."""


def idle_cores(window_s: float = IDLE_WINDOW_S) -> float:
    """Cores of this process's affinity mask that other processes left idle over the next ``window_s`` (summed
    idle fractions from ``/proc/stat``, via psutil; this process sleeps meanwhile). The affinity's core count
    when it cannot be read."""
    import os
    import time

    import psutil

    try:
        cpus = sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = list(range(os.cpu_count() or 1))
    try:
        t0 = psutil.cpu_times(percpu=True)
        time.sleep(window_s)
        t1 = psutil.cpu_times(percpu=True)
    except (OSError, RuntimeError, AttributeError):
        return float(len(cpus))
    idle = 0.0
    for c in cpus:
        if c >= len(t0) or c >= len(t1):
            idle += 1.0
            continue
        total = sum(t1[c]) - sum(t0[c])
        free = (t1[c].idle - t0[c].idle) + (getattr(t1[c], "iowait", 0.0) - getattr(t0[c], "iowait", 0.0))
        idle += 1.0 if total <= 0 else min(1.0, max(0.0, free / total))
    return idle


def default_threads(args: argparse.Namespace) -> None:
    """Without ``--threads``: set ``args.threads`` to the least of torch's default intra-op thread count (the
    machine's cores), the cores this process may use (``profiler.device_info.usable_cores``: affinity mask, cgroup
    CPU quota rounded up) and the cores other processes leave idle (``idle_cores``, over ``IDLE_WINDOW_S``,
    rounded, at least 1; not with OMP_WAIT_POLICY=PASSIVE in the environment), when that is fewer than torch's
    default.

    Why the quota: in a CPU cgroup below the machine's cores, torch's extra OpenMP threads spin on the quota while
    they wait for each other: eager resnet18 in a 10 % group on this 2-core machine took 452 ms of CPU per request
    with torch's 2 threads against 54 ms with 1, mobilenet_v2 640 against 34 (``bench/bench_ue_cpu.py``,
    ``docs/results/ue_cpu/session13``). Why the load (session 33): the same spinning on cores other processes
    keep busy; ``coinfer-ue plan`` measured resnet18's UE profile beside one busy loop on 2 cores at 570 ms per
    inference with torch's 2 threads, 94 with 1, 66 with 2 under OMP_WAIT_POLICY=PASSIVE
    (``docs/results/cli/session33/ue_threads*``). libgomp reads OMP_WAIT_POLICY when torch loads, before this runs
    (the ``ue_client`` package imports torch), so the CLI cannot make its threads passive itself; a user who
    starts it with PASSIVE gets the usable cores. Leaves ``args.threads`` alone when given or when the subcommand
    has none."""
    if getattr(args, "threads", 0) is not None:
        return
    import os

    import torch

    from profiler.device_info import usable_cores

    default = torch.get_num_threads()
    cores = usable_cores()
    threads = min(default, cores)
    idle = None
    if threads > 1 and os.environ.get("OMP_WAIT_POLICY", "").strip().upper() != "PASSIVE":  # passive threads
        # sleep at a barrier instead of spinning: there the machine's cores serve better (resnet18 beside a busy
        # loop on 2 cores: 66 ms with 2 passive threads, 94 with 1)
        idle = idle_cores()
        threads = max(1, min(threads, int(idle + 0.5)))
    if threads < default:
        log.info("%d torch thread(s): %d usable core(s), %s idle, torch's default %d (--threads to change)",
                 threads, cores, "-" if idle is None else f"{idle:.2f}", default)
        args.threads = threads


def check_common_args(args: argparse.Namespace) -> None:
    """Values every subcommand refuses before it loads a model (InputError naming the flag): ``--threads``
    beyond the cores this process may run on (its affinity mask: ``--threads 1000`` ran 1000 OpenMP threads on
    2 cores), ``--json`` into a directory that does not exist (``run`` did all its requests, logged the failed
    write and printed ``wrote PATH``), and ``profile``'s ``--warmup`` / ``--depth`` and ``plan``'s ``--eps`` /
    ``--deadline-ms`` out of range (plan showed ``--eps 3`` as a note in the table and exited 0), ``--runs``
    below 2 and ``plan``'s link, ``--server-speedup`` and a missing ``--server-profile`` file (session 32,
    newuser32: refused only after the model's capture and UE profile, the file as a bare ``[Errno 2]``)."""
    import math

    from profiler.device_info import affinity_cores
    from ue_client.errors import InputError

    threads = getattr(args, "threads", None)
    if threads is not None:
        cores = affinity_cores()
        if not 1 <= threads <= cores:
            raise InputError(f"--threads must be in 1..{cores} (the cores this process may run on), got {threads}")
    out = getattr(args, "json", None)
    if out is not None and not Path(out).parent.is_dir():
        raise InputError(f"--json {out}: directory {Path(out).parent} does not exist")
    for flag in ("tls_ca", "tls_cert", "tls_key"):  # newuser32: a missing --tls-ca was "data channel TLS files:
        # [Errno 2] No such file or directory", naming neither the flag nor the file
        pem = getattr(args, flag, None)
        if pem is not None and not Path(pem).is_file():
            raise InputError(f"--{flag.replace('_', '-')} {pem}: no such file")
    if args.command in ("profile", "plan") and args.runs < 2:
        raise InputError(f"--runs must be >= 2 (a variance needs two runs), got {args.runs}")
    if args.command == "profile":
        if args.warmup < 0:
            raise InputError(f"--warmup must be >= 0, got {args.warmup}")
        if args.depth is not None and args.depth < 1:
            raise InputError(f"--depth must be >= 1 (module-path parts), got {args.depth}")
    if args.command == "plan":
        if not 0 < args.eps < 1:
            raise InputError(f"--eps must be in (0, 1), got {args.eps:g}")
        if args.deadline_ms is not None and not (args.deadline_ms > 0 and math.isfinite(args.deadline_ms)):
            raise InputError(f"--deadline-ms must be > 0, got {args.deadline_ms:g}")
        # the link and the what-if speedup were checked only after the UE profile (29 s for resnet50 here)
        for flag, v in (("--uplink-mbps", args.uplink_mbps), ("--downlink-mbps", args.downlink_mbps),
                        ("--server-speedup", args.server_speedup)):
            if v is not None and not (math.isfinite(v) and v > 0):
                raise InputError(f"{flag} must be a finite number > 0, got {v:g}")
        if not (math.isfinite(args.rtt_ms) and args.rtt_ms >= 0):
            raise InputError(f"--rtt-ms must be a finite number >= 0, got {args.rtt_ms:g}")
        if args.server_profile is not None and not args.server_profile.is_file():
            raise InputError(f"--server-profile {args.server_profile}: no such file")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging(args.verbose)
    try:
        check_common_args(args)
    except known_errors() as e:
        print(f"coinfer-ue {args.command}: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    default_threads(args)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except known_errors() as e:
        if args.verbose:
            log.exception("failed")
        print(f"coinfer-ue {args.command}: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())
