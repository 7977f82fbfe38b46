"""`coinfer-testbed`: one edge server and N emulated UEs on this machine; the benchmark suite.

    coinfer-testbed probe                               what this machine supports (mode and why)
    coinfer-testbed run SCENARIO.toml [--mode M]        a scenario file (or a bundled name, e.g. tiny)
    coinfer-testbed run --model M --ues 2 --uplink-mbps 20,100 --rtt-ms 20 --cpu 0.1,0.25 --requests 5
    coinfer-testbed run robust --json PATH [--requests N]   robust vs mean-only vs local under real variation
    coinfer-testbed bench [--quick] --out DIR           the benchmark suite (results.json, results.md, PNGs)
    coinfer-testbed cleanup [--prefix cfr-PID-]         remove leftovers of dead testbeds

Exit status: 0 ok, 1 a UE or the server failed, 2 bad input, 130 interrupted. Whatever happens, the
namespaces, cgroups, relays and processes a run made are removed before it exits.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import shlex
import sys
import tempfile
from pathlib import Path

log = logging.getLogger("coinfer.testbed")

EXIT_FAILED = 1
EXIT_BAD_INPUT = 2


def _floats(text: str) -> list[float]:
    try:
        vals = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a number or a comma list of numbers") from None
    if not vals:
        raise argparse.ArgumentTypeError("empty list")
    return vals


def _rates(text: str) -> list[float]:
    """A rate or a comma list of rates in Mbit/s: each finite and > 0 (``--uplinks -5`` and ``nan`` were taken)."""
    vals = _floats(text)
    bad = [v for v in vals if not 0 < v < math.inf]
    if bad:
        raise argparse.ArgumentTypeError(f"{text!r}: every rate must be a finite number > 0 Mbit/s, got {bad[0]:g}")
    return vals


def _delays(text: str) -> list[float]:
    """A round-trip time or a comma list of them in ms: each finite and >= 0."""
    vals = _floats(text)
    bad = [v for v in vals if not 0 <= v < math.inf]
    if bad:
        raise argparse.ArgumentTypeError(f"{text!r}: every round trip must be a finite number >= 0 ms, got {bad[0]:g}")
    return vals


def _cpu(text: str) -> list[float]:
    """UE CPU shares: a comma list of shares of a core (``0.1``) or percentages (``10%``), each in (0, C] for the
    C cores this process may run on (``--cpus 0`` and ``--cpus 5`` on 2 cores were taken)."""
    from profiler.device_info import affinity_cores

    cores = affinity_cores()
    vals = []
    for x in text.split(","):
        x = x.strip()
        try:
            v = float(x[:-1]) / 100 if x.endswith("%") else float(x)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{x!r}: expected a share of a core (0.25) or a percent (25%)") from None
        if not 0 < v <= cores:  # also refuses nan
            raise argparse.ArgumentTypeError(f"{x!r}: a CPU share must be in (0, {cores}] (the cores here)")
        vals.append(v)
    return vals


def _parsed(text: str, kind: type, expected: str):
    """``kind(text)`` (``int`` or ``float``); ArgumentTypeError ``expected EXPECTED, got 'TEXT'`` when it is not one."""
    try:
        return kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None


def _count(text: str) -> int:
    """A count >= 1 (``--requests 0`` silently ran the default, ``-3`` was taken)."""
    v = _parsed(text, int, "an integer >= 1")
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {v}")
    return v


def _server_threads(text: str) -> int:
    """The edge server's torch threads: 1..C for the C cores this machine lets this process run on
    (``--server-threads 1000`` was taken and started a bench)."""
    from profiler.device_info import affinity_cores

    v = _count(text)
    cores = affinity_cores()
    if v > cores:
        raise argparse.ArgumentTypeError(f"{v} threads on {cores} core(s): give 1..{cores}")
    return v


def _seconds(text: str) -> float:
    """A finite number of seconds > 0 (``--timeout``)."""
    v = _parsed(text, float, "seconds")
    if not 0 < v < math.inf:
        raise argparse.ArgumentTypeError(f"must be a finite number of seconds > 0, got {text}")
    return v


def _period_ms(text: str) -> float:
    """``--cpu-period-ms``: a CFS period in ms, 1-1000 (the kernel's bounds on ``cpu.max``'s period)."""
    v = _parsed(text, float, "a period in ms")
    if not 1.0 <= v <= 1000.0:  # also refuses nan
        raise argparse.ArgumentTypeError(f"must be 1-1000 ms (the kernel's CFS periods), got {text}")
    return v


def _mode_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--mode", choices=["auto", "netns", "userspace"], default="auto",
                   help="netns: namespaces + tc + cgroups (root); userspace: loopback relays + ue_slowdown "
                        "(anywhere); auto: netns where possible (default)")
    p.add_argument("--cpu-period-ms", type=_period_ms, default=None,
                   help="CFS period of the UEs' CPU quotas in ms, same share (netns mode; default 10: latencies "
                        "move in steps of about one period, the kernel's default 100 ms made them 100 ms steps)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="coinfer-testbed", description=__doc__.splitlines()[0])
    parser.add_argument("--verbose", "-v", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    sub.add_parser("probe", help="print the mode this machine supports and why")

    r = sub.add_parser("run", help="one edge server and N UEs from a scenario file or flags")
    r.add_argument("scenario", nargs="?", help="TOML/JSON scenario file or bundled name (see `scenarios`)")
    r.add_argument("--model", help="model spec for every UE (flags mode), e.g. torchvision:resnet18")
    r.add_argument("--ues", type=_count, help="number of UEs (flags mode; default 1)")
    r.add_argument("--policy",
                   help="coinfer, local, neurosurgeon-serial, dads-serial, ionn or a ue_client policy")
    r.add_argument("--uplink-mbps", type=_rates, help="per UE, comma list cycled (default 20)")
    r.add_argument("--downlink-mbps", type=_rates, help="per UE, comma list cycled (default: = uplink)")
    r.add_argument("--rtt-ms", type=_delays, help="per UE, comma list cycled (default 20)")
    r.add_argument("--cpu", type=_cpu,
                   help="UE CPU share of one core, e.g. 0.1 or 10%%, comma list cycled (default 0.25)")
    r.add_argument("--requests", type=_count,
                   help="requests per UE (default 4; robust: rounds, default 100, and the calibration requests D is "
                        "fixed from are then min(200, max(2, 2N)))")
    r.add_argument("--server-threads", type=_server_threads, help="torch threads of the edge server")
    r.add_argument("--server-omp-wait", choices=("passive", "active", "default"), default="passive",
                   help="the edge server's OMP_WAIT_POLICY (default passive: a thread waiting at an OpenMP barrier "
                        "sleeps at once; 'default' leaves it unset: coinfer-edge's own default, PASSIVE since "
                        "session 33; libgomp's spin-first default now needs a server started outside the testbed)")
    r.add_argument("--allocator", choices=["equal", "ara"], default="equal")
    r.add_argument("--shared-uplink-mbps", type=float, metavar="R",
                   help="the UEs share one uplink bottleneck of R Mbit/s (htb parent, a class per UE; netns "
                        "mode); each UE plans with R and paces to the uplink share the server gives it")
    r.add_argument("--enforce-shares", action="store_true",
                   help="with --shared-uplink-mbps: also set each UE's htb class to its share x R")
    r.add_argument("--ignore-shares", action="store_true",
                   help="with --shared-uplink-mbps: UEs do not pace to their shares (the bottleneck alone)")
    r.add_argument("--out", type=Path, help="keep logs and per-UE JSON here (default: a temp dir)")
    r.add_argument("--json", type=Path, help="write the summary here")
    r.add_argument("--timeout", type=_seconds, default=1800.0, help="seconds for the whole run (default 1800)")
    r.add_argument("--deadline-frac", type=float,
                   help="run robust: D = mjoa's predicted mean + F x (local's measured median - it), F in [0, 1] "
                        "(instead of the default quantile rule)")
    r.add_argument("--deadline-quantile", type=float, metavar="Q",
                   help="run robust: D = the Q-quantile of local's measured calibration latencies, Q in (0, 1) "
                        "(default 0.99: local itself misses about 1 - Q, so the guarantee is attainable)")
    r.add_argument("--calib", type=int, metavar="N",
                   help="run robust: calibration requests of local and mjoa each, D is fixed from "
                        "(default 200)")
    r.add_argument("--gap-ms", type=float, metavar="MS",
                   help="run robust: idle time before every request (default 0)")
    r.add_argument("--eps", help="run robust: comma list of miss probabilities (default 0.05,0.1,0.2)")
    r.add_argument("--variant", metavar="NAME|FILE",
                   help="run robust: the scenario's variant, a bundled name (tail, the default; throttled) or a TOML "
                        "file with a [robust] table (testbed/scenarios/robust/)")
    r.add_argument("--uplink-cv", type=float,
                   help="run robust: the uplink spread robust hedges against (default: each UE measures it)")
    _mode_arg(r)

    b = sub.add_parser("bench", help="the benchmark suite against the baselines")
    b.add_argument("--quick", action="store_true", help="the small grid (<= 5 min on a 2-core machine)")
    b.add_argument("--out", type=Path, required=True, help="results directory")
    b.add_argument("--scenarios",
                   help="comma list of stream (a-d: stream, cold, warm, planner accuracy), cold (b in its own cells, "
                        "--cold-cells), warm (c alone: the whole model pre-deployed, the policies interleaved) and "
                        "multi (e) (default: stream,cold,multi; --quick: stream,multi)")
    b.add_argument("--cold-cells", metavar="MODEL:CPU:MBPS[,...]",
                   help="scenario cold's cells (default: the simulator's, testbed.bench.suite.COLD_CELLS: "
                        "vit_b_16:0.25:200)")
    b.add_argument("--cold-repeats", type=_count, help="rounds of scenario cold per cell (default 3)")
    b.add_argument("--models", help="override the models (comma list of names or specs)")
    b.add_argument("--uplinks", type=_rates, help="override the uplinks in Mbit/s")
    b.add_argument("--cpus", type=_cpu, help="override the UE CPU shares")
    b.add_argument("--requests", type=_count, help="override K (requests per stream)")
    b.add_argument("--multi-n", help="override the multi-UE sizes, e.g. 1,2,4")
    b.add_argument("--warm-requests", type=_count,
                   help="recorded warm requests per policy in scenario c, in 3 interleaved rounds (default 9; "
                        "quick 6)")
    b.add_argument("--warm-rounds", type=_count,
                   help="interleaved rounds of scenario c (default 3; 1: each policy's requests in one run, "
                        "one policy after another, as up to session 8)")
    b.add_argument("--op-timings", action="store_true",
                   help="record the server's per-op timings of every remote request in the UE logs "
                        "(logs/ueN.json, server_op_ms: [op, start ms, ms])")
    b.add_argument("--policies", metavar="P[,...]",
                   help="scenario stream's policies, a subset of local,neurosurgeon-serial,dads-serial,ionn,coinfer "
                        "(default: all; streams are paired with local only when local runs)")
    b.add_argument("--pairing", choices=("all", "coinfer", "none"),
                   help="which stream policies run interleaved with a local stream, request by request: all (the "
                        "default: coinfer with the cell's local stream, every other policy with a local stream of "
                        "its own), coinfer (only coinfer, as up to session 11), none (every stream alone)")
    b.add_argument("--unpaired", action="store_true", help="the same as --pairing none")
    b.add_argument("--server-threads", type=_server_threads,
                   help="the edge server's torch threads (default 2)")
    b.add_argument("--server-omp-wait", choices=("passive", "active", "default"),
                   help="the edge server's OMP_WAIT_POLICY (default passive: a thread waiting at an OpenMP barrier "
                        "sleeps at once; 'default' leaves it unset: coinfer-edge's own default, PASSIVE since "
                        "session 33 (up to session 13 libgomp's spin-first default)")
    b.add_argument("--server-device", default=None, metavar="DEV",
                   help="the edge server's --device: cpu (default), cuda or cuda:N (a GPU server)")
    _mode_arg(b)

    rp = sub.add_parser("report", help="render a bench run's tables and verdicts again from its stored rows")
    rp.add_argument("--from", dest="src", type=Path, required=True, metavar="DIR",
                    help="a bench run's --out directory (results.json and meta.json)")
    rp.add_argument("--out", type=Path, help="write results.md here (default: into DIR itself)")

    sub.add_parser("scenarios", help="list the bundled scenario files")

    c = sub.add_parser("cleanup", help="remove namespaces/cgroups of dead testbeds (or one prefix)")
    c.add_argument("--prefix", help="remove everything starting with this prefix, e.g. cfr-1234-")
    return parser


#: ``run``'s flags-mode options and their defaults (None in the parser, so a flag given beside a scenario file is seen).
FLAGS_MODE = {"model": None, "ues": 1, "policy": "coinfer", "uplink_mbps": [20.0], "downlink_mbps": None,
              "rtt_ms": [20.0], "cpu": [0.25]}


def _scenario_of(args: argparse.Namespace):
    """The scenario ``run`` runs: the file's, with ``--requests`` (when given) for every UE, or one built from the
    flags-mode options. Raises ScenarioError for a flags-mode option given beside a scenario file (it used to be
    taken and ignored: ``run tiny --policy local --ues 3`` ran the file's 2 coinfer UEs)."""
    import dataclasses

    from testbed import scenarios
    from testbed.scenarios import ScenarioError

    if args.scenario:
        sc = scenarios.load(args.scenario)  # first: a missing file is named as such (newuser32: `run smoke --model
        # M` said "the scenario file 'smoke' sets the UEs" of a file that does not exist)
        given = [f"--{k.replace('_', '-')}" for k in FLAGS_MODE if getattr(args, k) is not None]
        if given:
            raise ScenarioError(f"{', '.join(given)}: flags mode only; the scenario file {args.scenario!r} sets the "
                                "UEs (edit it, or give no scenario)")
        if args.requests is not None:
            sc = dataclasses.replace(sc, ues=tuple(dataclasses.replace(u, requests=args.requests) for u in sc.ues))
        return sc
    for k, default in FLAGS_MODE.items():
        if getattr(args, k) is None:
            setattr(args, k, default)
    if args.requests is None:
        args.requests = 4
    return _scenario_from_flags(args)


def _scenario_from_flags(args: argparse.Namespace):
    from testbed.scenarios import Scenario, ScenarioError, UeSpec

    if not args.model:
        raise ScenarioError("give a scenario file or --model")
    if args.ues < 1:
        raise ScenarioError("--ues must be >= 1")

    def pick(vals, i):
        return None if vals is None else vals[i % len(vals)]

    ues = tuple(UeSpec(model=args.model, policy=args.policy, uplink_mbps=pick(args.uplink_mbps, i),
                       downlink_mbps=pick(args.downlink_mbps, i), rtt_ms=pick(args.rtt_ms, i),
                       cpu=pick(args.cpu, i), requests=args.requests) for i in range(args.ues))
    return Scenario("flags", ues, args.server_threads, args.allocator)


def cmd_run(args: argparse.Namespace) -> int:
    from testbed.launcher import OMP_WAIT_CHOICES, run_scenario
    from testbed.scenarios import ScenarioError

    if args.scenario == "robust":
        return _run_robust(args)
    sc = _scenario_of(args)
    workdir = args.out or Path(tempfile.mkdtemp(prefix="coinfer-testbed-"))
    print(f"scenario {sc.name}: {len(sc.ues)} UEs; logs in {workdir}", flush=True)
    if (args.enforce_shares or args.ignore_shares) and args.shared_uplink_mbps is None:
        raise ScenarioError("--enforce-shares and --ignore-shares need --shared-uplink-mbps")
    if args.shared_uplink_mbps is not None and not args.shared_uplink_mbps > 0:
        raise ScenarioError("--shared-uplink-mbps must be > 0")
    res = run_scenario(sc, workdir, mode=args.mode, timeout_s=args.timeout,
                       on_mode=lambda tb: print(tb.describe(), flush=True),
                       shared_uplink_mbps=args.shared_uplink_mbps, enforce_shares=args.enforce_shares,
                       obey_shares=not args.ignore_shares, cpu_period_ms=args.cpu_period_ms,
                       server_env=OMP_WAIT_CHOICES[args.server_omp_wait])
    print(f"{'ue':>3} {'model':<28} {'policy':<20} {'up Mbps':>8} {'rtt':>5} {'cpu':>5} {'mean ms':>9}  latencies")
    for i, u in enumerate(res["ues"]):
        lat = " ".join(f"{x:.0f}" for x in u["latency_ms"])
        mean = "-" if u["mean_ms"] is None else f"{u['mean_ms']:.1f}"
        print(f"{i:>3} {u['model'][:28]:<28} {u['policy'][:20]:<20} {u['uplink_mbps'] or 0:>8g} {u['rtt_ms']:>5g} "
              f"{u['cpu'] or 1:>5g} {mean:>9}  {lat}{'  ERROR: ' + str(u['error']) if u['error'] else ''}")
    if res.get("shared_uplink_mbps"):
        for i, u in enumerate(res["ues"]):
            m, s = u.get("uplink_mbps_measured"), u.get("uplink_share_mbps")
            print(f"UE {i}: uplink measured {'-' if m is None else f'{m:.2f}'} Mbit/s, share "
                  f"{'-' if s is None else f'{s:.2f}'} Mbit/s"
                  + ("" if u.get("uplink_error") is None else f" ({u['uplink_error']:+.1%})"))
    print(f"{res['requests']} requests in {res['wall_s']:.1f} s: {res['throughput_rps'] or 0:.2f} req/s "
          f"(mode {res['mode']})")
    if args.json:
        args.json.write_text(json.dumps(res, indent=1))
        print(f"wrote {args.json}")
    return 0 if res["ok"] else EXIT_FAILED


def _run_robust(args: argparse.Namespace) -> int:
    """``run robust``: the bundled robust-partitioning scenario (``testbed.robust``); JSON + PNG beside it."""
    import dataclasses

    from testbed import robust
    from testbed.scenarios import ScenarioError

    sc = robust.load_variant(args.variant or robust.DEFAULT_VARIANT)
    if args.requests is not None:
        if args.requests < 1:
            raise ScenarioError("--requests must be >= 1")
        sc = dataclasses.replace(sc, requests=args.requests, calib=min(sc.calib, max(2, 2 * args.requests)))
    if args.deadline_frac is not None:
        if not 0 <= args.deadline_frac <= 1:
            raise ScenarioError("--deadline-frac must be in [0, 1] (D between the mean-only prediction and local)")
        sc = dataclasses.replace(sc, deadline_frac=args.deadline_frac, deadline_quantile=None)
    if args.deadline_quantile is not None:
        if args.deadline_frac is not None:
            raise ScenarioError("--deadline-frac and --deadline-quantile are two rules for D: give one")
        if not 0 < args.deadline_quantile < 1:
            raise ScenarioError(f"--deadline-quantile must be in (0, 1), got {args.deadline_quantile!r}")
        sc = dataclasses.replace(sc, deadline_quantile=args.deadline_quantile)
    if args.calib is not None:
        if args.calib < 2:
            raise ScenarioError(f"--calib must be >= 2, got {args.calib!r}")
        sc = dataclasses.replace(sc, calib=args.calib)
    if args.gap_ms is not None:
        if not 0 <= args.gap_ms <= 10_000:
            raise ScenarioError(f"--gap-ms must be in [0, 10000], got {args.gap_ms!r}")
        sc = dataclasses.replace(sc, gap_ms=args.gap_ms)
    if args.eps is not None:
        try:
            eps = tuple(float(x) for x in args.eps.split(","))
        except ValueError:
            eps = ()
        if not eps or not all(0 < e < 1 for e in eps):
            raise ScenarioError(f"--eps must be a comma list of numbers in (0, 1), got {args.eps!r}")
        sc = dataclasses.replace(sc, eps=eps)
    if args.uplink_cv is not None and not args.uplink_cv >= 0:
        raise ScenarioError(f"--uplink-cv must be >= 0, got {args.uplink_cv!r}")
    workdir = args.out or Path(tempfile.mkdtemp(prefix="coinfer-robust-"))
    command = "coinfer-testbed " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    print(f"scenario robust ({sc.name}): 1 UE, {sc.model} {sc.input_shape}; logs in {workdir}", flush=True)
    res = robust.run_robust(sc, workdir, mode=args.mode if args.mode != "auto" else "netns", timeout_s=args.timeout,
                            command=command, on_mode=lambda tb: print(tb.describe(), flush=True),
                            uplink_cv=args.uplink_cv)
    print(robust.format_rows(res))
    print("must show: " + json.dumps(res["must_show"]))
    if args.json:
        args.json.write_text(json.dumps(res, indent=1))
        print(f"wrote {args.json} and {robust.plot(res, args.json.with_suffix('.png'))}")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from testbed.bench.suite import BenchConfig, run_bench

    cfg = BenchConfig.make(quick=args.quick, mode=args.mode, scenarios=args.scenarios, models=args.models,
                           uplinks=args.uplinks, cpus=args.cpus, requests=args.requests, multi_n=args.multi_n,
                           cpu_period_ms=args.cpu_period_ms, warm_requests=args.warm_requests,
                           warm_rounds=args.warm_rounds, cold_cells=args.cold_cells, cold_repeats=args.cold_repeats,
                           op_timings=args.op_timings, paired=not args.unpaired,
                           policies=args.policies, pairing=args.pairing, server_threads=args.server_threads,
                           server_omp_wait=args.server_omp_wait, server_device=args.server_device)
    command = "coinfer-testbed " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    res = run_bench(cfg, args.out, command=command)
    return 0 if res.get("ok", True) else EXIT_FAILED


def cmd_report(args: argparse.Namespace) -> int:
    from testbed.bench.report import rerender
    from testbed.scenarios import ScenarioError

    try:
        print(rerender(args.src, args.out))
    except FileNotFoundError as e:
        raise ScenarioError(f"{args.src} is not a bench run's directory: {e}") from None
    except json.JSONDecodeError as e:
        raise ScenarioError(f"{args.src}: unreadable results: {e}") from None
    return 0


def cmd_probe(args: argparse.Namespace) -> int:
    from testbed.netns import detect_mode

    m = detect_mode()
    print(json.dumps(m.as_dict(), indent=2))
    print(m.describe())
    return 0


def cmd_cleanup(args: argparse.Namespace) -> int:
    from testbed.netns import cleanup_stale

    print(json.dumps(cleanup_stale(args.prefix), indent=2))
    return 0


def cmd_scenarios(args: argparse.Namespace) -> int:
    from testbed import scenarios

    for name in scenarios.bundled():
        sc = scenarios.load(name)
        print(f"{name:<12} {len(sc.ues)} UEs: " + ", ".join(sorted({u.model for u in sc.ues})))
    return 0


COMMANDS = {"probe": cmd_probe, "run": cmd_run, "bench": cmd_bench, "cleanup": cmd_cleanup,
            "scenarios": cmd_scenarios, "report": cmd_report}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from testbed.launcher import LaunchError
    from testbed.netns import NetnsError
    from testbed.scenarios import ScenarioError

    try:
        return COMMANDS[args.command](args)
    except KeyboardInterrupt:
        print("coinfer-testbed: interrupted; testbed removed", file=sys.stderr)
        return 130
    except ScenarioError as e:
        print(f"coinfer-testbed {args.command}: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except (LaunchError, NetnsError, OSError) as e:
        if args.verbose:
            log.exception("failed")
        print(f"coinfer-testbed {args.command}: failed: {e}", file=sys.stderr)
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
