"""The benchmark suite: coinfer against local, serial-upload Neurosurgeon/DADS and IONN-style offloading.

Scenarios (one edge server per model, the first started by the launcher; one UE at a time except e.):

a. stream: K back-to-back requests per (model, UE CPU share, uplink), each policy on a cold server
   (a fresh tenant): per-request latency, mean, first, time until warm, the pre-deployed bound;
b. cold: coinfer's first plan with parallel upload vs serial upload of the same partition, and local: once
   in every cell of a., and (``--scenarios cold``, part of the full grid) in ``COLD_CELLS``, the cells
   where the simulator says the upload can hide behind the UE's prefix (``bench/bench_cold_hiding.py``),
   alone and in ``cold_repeats`` alternating rounds;
c. warm: every policy on a server that already holds the whole model (preloaded next to the server,
   unshaped) vs the best measured, the policies interleaved in rotating rounds (``worker.Ue.warm_rounds``;
   the verdict: ``report.WARM_RULE``); ``--scenarios warm`` runs this part alone;
d. planner accuracy: predicted vs measured for every request of a and b;
e. multi: N heterogeneous UEs on one server at once: per-UE latency and server throughput (requests over
   the wall from the release of all the joined UEs, each with its client built, to the last request's end).

Output in ``--out``: ``results.json`` (a list of rows), ``meta.json`` (commit, machine, mode, command,
date, elapsed), ``results.md`` (tables) and PNG plots; partial results are written after every cell.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import logging
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from testbed.bench.report import WARM_TARGET, best_baseline, compare_to_local, quantile
from testbed.bench.worker import BENCH_POLICIES, PAIRINGS
from testbed.cgroups import stop_processes
from testbed.launcher import Testbed, collect, start_workers, worker_argv, write_spec

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[2]
WARM_LABEL = {"local": "local", "neurosurgeon-serial": "neurosurgeon", "dads-serial": "dads",
              "ionn": "neurosurgeon", "coinfer": "coinfer"}
"""The warm measurement that stands for each policy's steady state: the serial baselines and IONN end on
their warm-optimal chain/DAG split; IONN's best held suffix with everything held is Neurosurgeon's split."""


def model_spec(name: str) -> str:
    return name if ":" in name else f"torchvision:{name}"


def short(name: str) -> str:
    return name.split(":")[-1]


COLD_CELLS: tuple[tuple[str, float, float], ...] = (("vit_b_16", 0.25, 200.0),)
"""(model, UE CPU share, uplink Mbit/s) of scenario b's own cells: where the simulator predicts MJOA's cold
split at parallel / serial <= 0.6 (``bench/bench_cold_hiding.py``, docs/results/cold/session10/): a UE whose
prefix computes about as long as the server part's weights take to upload, with the CPU those bytes cost
to send small beside the prefix's. No cell of the stream grid qualifies."""
SCENARIOS = ("stream", "cold", "warm", "multi")


@dataclasses.dataclass
class BenchConfig:
    quick: bool
    mode: str = "auto"
    scenarios: tuple[str, ...] = ("stream", "cold", "multi")
    models: tuple[str, ...] = ("resnet18", "mobilenet_v2", "googlenet", "resnet50")
    cpus: tuple[float, ...] = (0.1, 0.25)
    uplinks: tuple[float, ...] = (20.0, 100.0, 400.0)
    rtt_ms: float = 20.0
    requests: int = 8
    warm_requests: int = 9
    """Recorded warm requests per policy in scenario c (split over ``warm_rounds`` interleaved rounds)."""
    warm_rounds: int = 3
    policies: tuple[str, ...] = BENCH_POLICIES
    multi_n: tuple[int, ...] = (1, 2, 4, 8)
    multi_requests: int = 5
    cell_timeout_s: float = 1800.0
    cpu_period_ms: float | None = None
    """CFS period of the UEs' quotas (None: ``testbed.cgroups.DEFAULT_PERIOD_US``, 10 ms)."""
    cold_cells: tuple[tuple[str, float, float], ...] = COLD_CELLS
    """Scenario ``cold``'s cells (model, UE CPU share, uplink Mbit/s)."""
    cold_repeats: int = 3
    """Rounds of scenario ``cold`` per cell (parallel, serial and local each once per round, alternating)."""
    op_timings: bool = False
    """Record the server's per-op timings of every remote request (``server_op_ms`` in the UE logs)."""
    server_threads: int | None = 2
    """The edge server's ``--threads`` (None: the server's own default rule, ``edge_server.cpus.compute_threads``:
    1 on a 2-core machine)."""
    server_omp_wait: str | None = "PASSIVE"
    """The edge server's OpenMP wait policy (``OMP_WAIT_POLICY``; None: left unset, so ``coinfer-edge serve``'s own
    default, PASSIVE since session 33; before, libgomp's default: spin ~300,000 rounds at each barrier before
    sleeping). Up to session 13 the bench ran the server with 2 threads and the default on this
    2-core machine, beside the UEs, their relays and tc: its compute of one slice then varied 1.3-2x between the
    streams of one cell; PASSIVE (a thread waiting at a barrier sleeps at once, leaving the core to whatever
    else runs) made it steady (``bench/bench_server_noise.py``, docs/results/srvnoise/session14/)."""
    server_device: str = "cpu"
    """The edge server's ``--device`` (``cpu``, ``cuda``, ``cuda:N``): a GPU server is the deployment the papers
    assume; the bench's rows up to session 28 are all of a CPU server (no GPU was lent before session 29)."""
    pairing: str = "all"
    """Which stream policies run interleaved with a local stream, request by request (``worker.PAIRINGS``,
    ``worker.Ue.paired_streams``): ``all`` (every policy; coinfer's partner is the cell's local stream, every
    other policy has its own), ``coinfer`` (only coinfer, as up to session 11), ``none`` (every stream alone)."""

    @classmethod
    def make(cls, *, quick: bool, mode: str = "auto", scenarios: str | None = None, models: str | None = None,
             uplinks=None, cpus=None, requests: int | None = None, multi_n: str | None = None,
             cpu_period_ms: float | None = None, warm_requests: int | None = None,
             warm_rounds: int | None = None, cold_cells: str | None = None,
             cold_repeats: int | None = None, op_timings: bool = False,
             paired: bool = True, policies: str | None = None, pairing: str | None = None,
             server_threads: int | None = None, server_omp_wait: str | None = None,
             server_device: str | None = None) -> BenchConfig:
        if quick:
            cfg = cls(quick=True, mode=mode, scenarios=("stream", "multi"), models=("resnet18", "mobilenet_v2"),
                      cpus=(0.1,), uplinks=(100.0, 400.0), requests=4, warm_requests=6, multi_n=(2, 4),
                      multi_requests=3, cell_timeout_s=240.0)
            # scenario c: 6 warm requests per policy in 3 interleaved rounds (3 in one run made verdicts coin
            # flips: one request whose server compute took 154 ms against 34-43 ms for the others, on this
            # shared machine, made mobilenet_v2 / 100 Mbps 1.32x the best in the session-7 quick bench)
        else:
            cfg = cls(quick=False, mode=mode)
        if scenarios:
            cfg.scenarios = tuple(s.strip() for s in scenarios.split(",") if s.strip())
            bad = set(cfg.scenarios) - set(SCENARIOS)
            if bad:
                from testbed.scenarios import ScenarioError

                raise ScenarioError(f"unknown bench scenarios {sorted(bad)}: use {', '.join(SCENARIOS)}")
        if models:
            cfg.models = tuple(m.strip() for m in models.split(",") if m.strip())
            _check_models(cfg.models)
        if uplinks:
            cfg.uplinks = tuple(uplinks)
        if cpus:
            cfg.cpus = tuple(cpus)
        if requests:
            cfg.requests = int(requests)
        if multi_n:
            try:
                cfg.multi_n = tuple(int(x) for x in multi_n.split(",") if x.strip())
            except ValueError:
                cfg.multi_n = ()
            if not cfg.multi_n or min(cfg.multi_n) < 1:
                from testbed.scenarios import ScenarioError

                raise ScenarioError(f"--multi-n must be a comma list of UE counts >= 1, got {multi_n!r}")
        if warm_requests:
            cfg.warm_requests = int(warm_requests)
        if warm_rounds:
            cfg.warm_rounds = int(warm_rounds)
        if cold_cells:
            cfg.cold_cells = parse_cold_cells(cold_cells)
        if cold_repeats:
            cfg.cold_repeats = int(cold_repeats)
        if policies:
            cfg.policies = tuple(p.strip() for p in policies.split(",") if p.strip())
            bad = [p for p in cfg.policies if p not in BENCH_POLICIES]
            if bad or not cfg.policies:
                from testbed.scenarios import ScenarioError

                raise ScenarioError(f"unknown stream policies {bad}: use some of {', '.join(BENCH_POLICIES)}")
        cfg.cpu_period_ms = cpu_period_ms
        if server_threads is not None:
            from profiler.device_info import affinity_cores

            if not 1 <= server_threads <= affinity_cores():
                from testbed.scenarios import ScenarioError

                raise ScenarioError(f"server threads must be in 1..{affinity_cores()} (the cores this process may "
                                    f"run on), got {server_threads}")
            cfg.server_threads = int(server_threads)
        if server_omp_wait is not None:  # "default": leave OMP_WAIT_POLICY unset
            w = server_omp_wait.strip().upper()
            if w not in ("PASSIVE", "ACTIVE", "DEFAULT"):
                from testbed.scenarios import ScenarioError

                raise ScenarioError("server OpenMP wait policy must be passive, active or default, "
                                    f"got {server_omp_wait!r}")
            cfg.server_omp_wait = None if w == "DEFAULT" else w
        if server_device is not None:
            d = server_device.strip()
            if not re.fullmatch(r"cpu|cuda(:\d+)?", d):
                from testbed.scenarios import ScenarioError

                raise ScenarioError(f"server device must be cpu, cuda or cuda:N, got {server_device!r}")
            cfg.server_device = d
        cfg.op_timings = bool(op_timings)
        cfg.pairing = pairing or ("all" if paired else "none")
        if cfg.pairing not in PAIRINGS:
            from testbed.scenarios import ScenarioError

            raise ScenarioError(f"unknown pairing {cfg.pairing!r}: use one of {', '.join(PAIRINGS)}")
        return cfg


def _check_models(models: tuple[str, ...]) -> None:
    """A bench model is a torchvision name (``resnet18``) or a spec with ``:``; an unknown torchvision name is
    refused here (ScenarioError) instead of failing each of its cells after the bench started."""
    names = [m for m in models if ":" not in m]
    if not models or not names:
        if not models:
            from testbed.scenarios import ScenarioError

            raise ScenarioError("--models names no model")
        return
    from modelgraph.tv_compat import import_torchvision

    known = set(import_torchvision().models.list_models())
    bad = [m for m in names if m not in known]
    if bad:
        from testbed.scenarios import ScenarioError

        raise ScenarioError(f"unknown torchvision model(s) {bad}: see torchvision.models.list_models(), or give a "
                            "spec such as torchvision:resnet18 or package.module:factory")


def parse_cold_cells(text: str) -> tuple[tuple[str, float, float], ...]:
    """``MODEL:CPU:MBPS[,...]`` (e.g. ``vit_b_16:0.25:200``; CPU a share of a core in (0, 1] or a percentage
    with ``%``) -> cells. Raises ``testbed.scenarios.ScenarioError`` for a malformed cell."""
    from testbed.scenarios import ScenarioError

    cells = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        bits = part.rsplit(":", 2)
        try:
            if len(bits) != 3:
                raise ValueError("needs MODEL:CPU:MBPS")
            cpu = float(bits[1][:-1]) / 100.0 if bits[1].endswith("%") else float(bits[1])
            up = float(bits[2])
            if not (0.0 < cpu <= 1.0 and up > 0.0 and bits[0]):
                raise ValueError("CPU must be in (0, 1], the uplink > 0")
        except ValueError as e:
            raise ScenarioError(f"bad cold cell {part!r}: {e}") from None
        cells.append((bits[0], cpu, up))
    if not cells:
        raise ScenarioError(f"no cold cell in {text!r}")
    return tuple(cells)


# ---- stamp ----------------------------------------------------------------------------------------------
def git_commit() -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                             timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return (sha or "unknown") + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def machine() -> dict[str, Any]:
    try:
        from profiler import device_info

        return device_info().to_dict()
    except Exception as e:  # the stamp must not fail the bench
        return {"error": f"{type(e).__name__}: {e}"}


def _torch_version() -> str:
    try:
        import torch

        return torch.__version__
    except ImportError:
        return "?"


# ---- rows -----------------------------------------------------------------------------------------------
def _median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def _mean(xs):
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def _tails(lat) -> dict[str, float | None]:
    return {"p95_ms": quantile(lat, 0.95), "p99_ms": quantile(lat, 0.99)}


def _overlapping(stalls, req: dict) -> list:
    """The relay stalls (``LinkStats.stalls`` tuples) that began while the request ran: from its serial
    upload's start (``upload_ms`` before the call) to the end of the call."""
    t0, ms = req.get("t_wall"), req.get("call_ms", req.get("latency_ms"))
    if t0 is None or ms is None:
        return []
    start = t0 - (req.get("upload_ms") or 0.0) / 1e3
    return [s for s in stalls if start <= s[0] <= t0 + ms / 1e3]


def request_details(reqs: list[dict], relay: dict | None) -> dict[str, list]:
    """Per-request diagnostics of a stream, as lists parallel to ``latency_ms``: the server's own timings
    (None for a request that ran nothing there or got no answer), the UE's compute and CPU time, the weight
    bytes the request put on the uplink, the TCP loss/retransmit counters that moved in the UE's and the
    server's namespaces while it ran (``testbed.tcpstats.losses``; {} when none moved, None when not
    recorded), the delay relay's stalls that began while it ran, the machine's 1-minute load average after it,
    whether it defined a new slice on the server (validated there before the request, outside its timings),
    its decision's wall ms, CPU ms and cost at the UE's CPU share (``RequestReport.plan_at_share_ms``), and the
    plan's own prediction of its run with the run's measured ms (None before session 18's worker)."""
    from testbed.tcpstats import losses

    stalls = (relay or {}).get("stalls") or []
    return {
        "server_timings_per_request": [r.get("server_timings") for r in reqs],
        "ue_compute_ms_per_request": [r.get("ue_compute_ms") for r in reqs],
        "cpu_ms_per_request": [r.get("cpu_ms") for r in reqs],
        "uploaded_bytes_per_request": [r.get("uploaded_bytes") for r in reqs],
        "upload_ms_per_request": [r.get("upload_ms") for r in reqs],
        "fallback_per_request": [bool(r.get("fallback")) for r in reqs],
        "load1_per_request": [r.get("load1") for r in reqs],
        "new_slice_per_request": [r.get("new_slice") for r in reqs],
        "plan_ms_per_request": [r.get("plan_ms") for r in reqs],
        # since session 18 ``predicted_ms`` is the call's (``RequestReport.call_predicted_ms``); the plan's own
        # prediction of its run and the run's measured time (``measured_ms``), for the accuracy table's second column
        "run_predicted_ms_per_request": [r.get("run_predicted_ms") for r in reqs],
        "measured_ms_per_request": [r.get("measured_ms") for r in reqs],
        "plan_cpu_ms_per_request": [r.get("plan_cpu_ms") for r in reqs],
        "plan_at_share_ms_per_request": [r.get("plan_at_share_ms") for r in reqs],
        "tcp_per_request": [None if r.get("tcp") is None else {ns: losses(d) for ns, d in r["tcp"].items()}
                            for r in reqs],
        "relay_stalls_per_request": [_overlapping(stalls, r) for r in reqs],
    }


def relay_summary(relay: dict | None) -> dict[str, float | None]:
    """The cell's delay relay in three numbers: the most bytes it held in one direction, its latest
    delivery and its longest wait for the next hop (``LinkStats``); None without a relay."""
    relay = relay or {}
    return {"relay_max_queued_bytes": relay.get("max_queued_bytes"), "relay_max_late_ms": relay.get("max_late_ms"),
            "relay_max_drain_ms": relay.get("max_drain_ms")}


def paired_local_fields(st: dict | None) -> dict:
    """The local stream a policy's stream was interleaved with (``worker.Ue.paired_streams``), as row fields:
    ``paired_local_latency_ms``, ``paired_local_mean_ms``, ``paired_local_cpu_ms_per_request``; {} without one."""
    reqs = (st or {}).get("requests") or []
    if not reqs:
        return {}
    lat = [r["latency_ms"] for r in reqs]
    return {"paired_local_latency_ms": lat, "paired_local_mean_ms": _mean(lat),
            "paired_local_cpu_ms_per_request": [r.get("cpu_ms") for r in reqs]}


def stream_rows(res: dict, model: str, cpu: float, up: float, rtt: float, k: int) -> list[dict]:
    relay = res.get("relay")
    base = {"model": short(model), "uplink_mbps": up, "rtt_ms": rtt, "ue_cpu": cpu, **relay_summary(relay)}
    warm = {label: _median([r["latency_ms"] for r in w.get("requests", [])])
            for label, w in res.get("warm", {}).items()}
    warm_n = {label: len(w.get("requests", [])) for label, w in res.get("warm", {}).items()}
    warm_ok = [v for v in warm.values() if v is not None]
    predeployed = min(warm_ok) if warm_ok else None
    rows = []
    for policy, st in res.get("streams", {}).items():
        reqs = st.get("requests", [])
        lat = [r["latency_ms"] for r in reqs]
        w = warm.get(WARM_LABEL.get(policy, policy))
        warm_after = ttw = None
        if w is not None:
            for i, x in enumerate(lat):
                if x <= 1.1 * w + 5.0:
                    warm_after, ttw = i, sum(lat[: i + 1])
                    break
        rows.append({
            "scenario": "stream", **base, "policy": policy, "requests": len(lat), "latency_ms": lat,
            "mean_ms": _mean(lat), **_tails(lat), "first_ms": lat[0] if lat else None,
            "last_ms": lat[-1] if lat else None,
            "warm_ms": w, "predicted_ms": _mean([r.get("predicted_ms") for r in reqs]),
            "predicted_per_request_ms": [r.get("predicted_ms") for r in reqs], **request_details(reqs, relay),
            "predeployed_ms": predeployed, "warm_after_request": warm_after, "time_to_warm_ms": ttw,
            "server_ops": [r.get("server_ops") for r in reqs], "fallbacks": sum(bool(r.get("fallback")) for r in reqs),
            "uploaded_bytes": sum(r.get("uploaded_bytes") or 0 for r in reqs),
            "connect_ms": st.get("connect_ms"),
            "unavailable": st.get("unavailable"), "error": st.get("error"),
            "paired_with": st.get("paired_with"), **paired_local_fields(st.get("paired_local")),
        })
    # coinfer / best baseline and coinfer / local, on every row of the cell
    by = {r["policy"]: r for r in rows}
    co = by.get("coinfer")
    for key in ("mean_ms", "first_ms", "last_ms"):
        bb = best_baseline(by, key)  # a baseline that ran every request on the UE alone counts as local
        for r in rows:
            r[f"coinfer_over_best_baseline_{key[:-3]}"] = (co[key] / bb.value) if (
                co and co[key] is not None and bb and bb.value) else None
            if key == "mean_ms":
                r["best_baseline"] = bb.policy if bb else None
                r["baselines_as_local"] = list(bb.as_local) if bb else []
            loc = by.get("local")
            r[f"coinfer_over_local_{key[:-3]}"] = (co[key] / loc[key]) if (
                co and loc and co[key] is not None and loc[key]) else None
    loc = by.get("local")
    if co and loc and co.get("paired_with") == "local" and "paired_local_mean_ms" not in co:
        # coinfer's partner is the cell's local stream
        co.update(paired_local_fields({"requests": [{"latency_ms": x, "cpu_ms": c} for x, c in zip(
            loc["latency_ms"], loc.get("cpu_ms_per_request") or [None] * len(loc["latency_ms"]))]}))
    for r in rows:
        if r.get("paired_local_mean_ms") and r.get("mean_ms") is not None:
            r["over_paired_local"] = r["mean_ms"] / r["paired_local_mean_ms"]
    if co and loc and co["latency_ms"] and loc["latency_ms"]:
        # Is the stream slower/faster than local beyond noise? (report.COMPARISON_RULE; all requests, first included)
        co["vs_local"] = dataclasses.asdict(compare_to_local(co["latency_ms"], loc["latency_ms"]))
    warm_rows = {}
    for label, v in warm.items():
        if v is None:
            continue
        reqs = res["warm"][label].get("requests", [])
        lat = [r["latency_ms"] for r in reqs]
        warm_rows[label] = {
            "scenario": "warm", **base, "policy": label, "requests": warm_n[label],
            "latency_ms": lat, "mean_ms": v, "median_ms": v, "avg_ms": _mean(lat), "first_ms": lat[0],
            **_tails(lat), "warm_ms": v, "predicted_ms": _mean([r.get("predicted_ms") for r in reqs]),
            "predicted_per_request_ms": [r.get("predicted_ms") for r in reqs],
            "round_per_request": [r.get("round") for r in reqs],
            "server_ops": [r.get("server_ops") for r in reqs], **request_details(reqs, relay),
            "best_warm_ms": predeployed, "ratio_to_best": v / predeployed if predeployed else None,
            "fallbacks": sum(bool(r.get("fallback")) for r in reqs), "error": res["warm"][label].get("error")}
    rows.extend(warm_rows.values())
    wco = warm_rows.get("coinfer")
    others = {p: r for p, r in warm_rows.items() if p != "coinfer" and r["avg_ms"] is not None}
    if wco is not None and others:
        # warm coinfer against the pre-deployed bound beyond noise (report.WARM_RULE): its mean against
        # WARM_TARGET x the mean of the best other policy, by the coinfer-vs-local test
        best = min(others, key=lambda p: others[p]["avg_ms"])
        cmp = compare_to_local(wco["latency_ms"], others[best]["latency_ms"], rho0=WARM_TARGET)
        wco.update({"best_other_policy": best, "vs_best": dataclasses.asdict(cmp),
                    "ratio_median_to_best_other": (wco["median_ms"] / others[best]["median_ms"]
                                                   if others[best]["median_ms"] else None)})
    cc = res.get("cold_compare") or {}
    loc = by.get("local")
    cold_base = {"scenario": "cold", **base, "requests": 1, "warm_ms": None}
    if loc and loc["first_ms"] is not None:
        rows.append({**cold_base, "policy": "local", "mean_ms": loc["first_ms"], "first_ms": loc["first_ms"],
                     "predicted_ms": loc["predicted_per_request_ms"][0]})
    for key, label, pred in (("parallel", "coinfer-parallel", "predicted_parallel_ms"),
                             ("serial", "serial-same-split", "predicted_serial_ms")):
        r = cc.get(key)
        if r:
            rows.append({**cold_base, "policy": label, "mean_ms": r["latency_ms"], "first_ms": r["latency_ms"],
                         "predicted_ms": cc.get(pred), "server_ops": [cc.get("server_ops")],
                         "fallbacks": int(bool(r.get("fallback"))), "upload_ms": r.get("upload_ms")})
    if cc.get("note") or cc.get("error") or cc.get("unavailable"):
        rows.append({**cold_base, "policy": "coinfer-parallel", "mean_ms": None, "first_ms": None,
                     "predicted_ms": cc.get("predicted_parallel_ms"),
                     "note": cc.get("note") or cc.get("error") or cc.get("unavailable")})
    for r in rows:
        r.setdefault("requests", k)
    return rows


def cold_rows(res: dict, model: str, cpu: float, up: float, rtt: float) -> list[dict]:
    """Scenario b's rows of one of its own cells (``Bench.cold``): local, coinfer-parallel and
    serial-same-split, each with its per-round latencies (``latency_ms``), their mean (``mean_ms``, also
    ``first_ms``: each is a cold first request), the prediction, and for the two uploads their server ops,
    upload and per-request diagnostics; on the parallel row ``send_cpu_ns_per_byte``, the UE CPU its upload
    took per byte (mean request CPU of parallel minus serial, over the bytes) beside
    ``probe_send_cpu_ns_per_byte``, the connect-time probe's cost the prediction used (both of one core);
    a note row when the cold plan is local or the cell failed."""
    cc = res.get("cold_compare") or {}
    relay = res.get("relay")
    base = {"scenario": "cold", "model": short(model), "uplink_mbps": up, "rtt_ms": rtt, "ue_cpu": cpu,
            "cold_cell": True, "warm_ms": None, **relay_summary(relay)}
    runs = cc.get("runs") or ([{k: cc[k] for k in ("local", "parallel", "serial") if cc.get(k)}]
                              if any(cc.get(k) for k in ("local", "parallel", "serial")) else [])
    rows = []
    for key, label, pred in (("local", "local", "predicted_local_ms"),
                             ("parallel", "coinfer-parallel", "predicted_parallel_ms"),
                             ("serial", "serial-same-split", "predicted_serial_ms")):
        reqs = [r[key] for r in runs if r.get(key)]
        if not reqs:
            continue
        lat = [r["latency_ms"] for r in reqs]
        row = {**base, "policy": label, "requests": len(lat), "latency_ms": lat, "mean_ms": _mean(lat),
               "first_ms": _mean(lat), "predicted_ms": cc.get(pred),
               "fallbacks": sum(bool(r.get("fallback")) for r in reqs), **request_details(reqs, relay)}
        if key != "local":
            row.update(server_ops=[cc.get("server_ops")] * len(lat), ue_cpu_send=cc.get("ue_cpu"),
                       upload_ms=_mean([r.get("upload_ms") for r in reqs]))
        rows.append(row)
    by = {r["policy"]: r for r in rows}
    par, ser = by.get("coinfer-parallel"), by.get("serial-same-split")
    if par and ser:
        # the UE CPU the parallel upload took in its request: the same split's request CPU with its weights
        # uploaded before (serial) taken off; against what the connect-time probe measured (both one core's)
        pc, sc = _mean(par["cpu_ms_per_request"]), _mean(ser["cpu_ms_per_request"])
        nbytes = _mean(par["uploaded_bytes_per_request"])
        probe = (cc.get("ue_cpu") or {}).get("send_ms_per_byte")
        par["send_cpu_ns_per_byte"] = (pc - sc) * 1e6 / nbytes if pc is not None and sc is not None and nbytes else None
        par["probe_send_cpu_ns_per_byte"] = probe * cpu * 1e6 if probe is not None else None
    note = cc.get("note") or cc.get("error") or cc.get("unavailable")
    if note:
        rows.append({**base, "policy": "coinfer-parallel", "requests": 0, "mean_ms": None, "first_ms": None,
                     "predicted_ms": cc.get("predicted_parallel_ms"), "note": note})
    return rows


def multi_profiles(cfg: BenchConfig) -> list[tuple[str, float, float]]:
    """Heterogeneous UEs: (model, uplink, cpu) cycled."""
    models = [model_spec(m) for m in cfg.models[:2]]
    lo, hi = min(cfg.cpus), max(cfg.cpus)
    ups = sorted(cfg.uplinks)
    table = [(models[0], ups[-1], hi), (models[-1], ups[0], lo), (models[0], ups[0], lo), (models[-1], ups[-1], hi)]
    return [table[i % len(table)] for i in range(max(cfg.multi_n))]


def client_build(res: dict, policy: str) -> dict:
    """The last construction of a ``policy`` client in a worker's result (``worker.Ue.builds``): its wall and
    process CPU ms as ``client_build_ms`` / ``client_build_cpu_ms`` (None: the worker did not record it)."""
    b = next((b for b in reversed(res.get("builds") or []) if b.get("policy") == policy), None)
    return {"client_build_ms": b and b.get("ms"), "client_build_cpu_ms": b and b.get("cpu_ms")}


def relay_record(ue) -> dict | None:
    """The UE's delay relay counters (``LinkStats``: stalls, the most it queued, how late it delivered)
    as a dict, or None without a relay (netem delay) or when it cannot be read."""
    relay = getattr(ue, "relay", None)
    if relay is None:
        return None
    try:
        return dataclasses.asdict(relay.stats())
    except Exception as e:  # diagnostics must not fail the bench
        log.warning("relay stats of UE %s unreadable: %s", getattr(ue, "index", "?"), e)
        return None


# ---- driver ---------------------------------------------------------------------------------------------
class BenchTerminated(KeyboardInterrupt):
    """SIGTERM or SIGHUP while a bench runs: unwinds like Ctrl-C (the testbed is removed, the CLI exits 130),
    so that the bench can record that it was interrupted, and by what."""


_TERM_SIGNALS = (signal.SIGTERM, signal.SIGHUP)


def _raise_on_termination():
    """Make SIGTERM/SIGHUP raise ``BenchTerminated`` until the returned ``restore()`` is called.

    The testbed's cleanup registry may install its own handlers meanwhile and chain to this one; after
    ``restore()`` this handler therefore behaves as the handler it replaced (default: die of the signal)."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    active = [True]
    previous: dict[int, Any] = {}

    def handler(signum, frame):
        if active[0]:
            raise BenchTerminated(signal.Signals(signum).name)
        prev = previous.get(signum, signal.SIG_DFL)
        if callable(prev):
            prev(signum, frame)
        elif prev != signal.SIG_IGN:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)

    for sig in _TERM_SIGNALS:
        try:
            previous[sig] = signal.getsignal(sig)
            signal.signal(sig, handler)
        except (ValueError, OSError):
            previous.pop(sig, None)

    def restore() -> None:
        active[0] = False
        for sig, prev in previous.items():
            if signal.getsignal(sig) is handler:  # else someone chained to us: leave theirs in place
                signal.signal(sig, prev if prev is not None else signal.SIG_DFL)

    return restore


class Bench:
    def __init__(self, cfg: BenchConfig, out: Path, command: str):
        self.cfg = cfg
        self.out = Path(out)
        self.command = command
        self.rows: list[dict] = []
        self.t0 = time.time()
        self.meta: dict[str, Any] = {
            "commit": git_commit(), "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "command": command, "config": dataclasses.asdict(cfg), "machine": machine(),
            "python": sys.version.split()[0], "torch": _torch_version(),
        }
        self.cache = Path(tempfile.mkdtemp(prefix="coinfer-bench-cache-"))
        self.failures: list[str] = []

    def stamp_rows(self) -> None:
        for r in self.rows:
            r.setdefault("commit", self.meta["commit"])
            r.setdefault("mode", self.meta.get("mode"))
            r.setdefault("date", self.meta["date"])

    def save(self, final: bool = False, interrupted: str | None = None) -> None:
        """``final``: every scenario ran to its end; ``interrupted``: why the run stopped before that."""
        from testbed.bench.report import write_markdown

        self.meta["elapsed_s"] = round(time.time() - self.t0, 1)
        self.meta["complete"] = final and interrupted is None
        if interrupted:
            self.meta["interrupted"] = interrupted
        else:
            self.meta.pop("interrupted", None)
        self.meta["failures"] = self.failures
        self.stamp_rows()
        (self.out / "results.json").write_text(json.dumps(self.rows, indent=1))
        (self.out / "meta.json").write_text(json.dumps(self.meta, indent=1))
        write_markdown(self.rows, self.meta, self.out / "results.md")

    def ue_env(self, cpu: float | None) -> dict[str, str]:
        # UE profiles are measured under the CPU quota: one profile cache per CPU share.
        return {"COINFER_CACHE_DIR": str(self.cache / f"ue-cpu{cpu}")}

    def run(self) -> dict:
        cfg = self.cfg
        self.out.mkdir(parents=True, exist_ok=True)
        logs = self.out / "logs"
        if logs.exists():
            shutil.rmtree(logs)
        os.environ["COINFER_CACHE_DIR"] = str(self.cache / "server")
        interrupted: str | None = None
        restore = _raise_on_termination()
        try:
            # 4 GiB: a model's cells on one server (``streams``) need at most (1 + 6 cells x 6 tenants that upload)
            # x its weight bytes: 3.5 GiB for resnet50 (102 MB)
            server_env = {"OMP_WAIT_POLICY": cfg.server_omp_wait} if cfg.server_omp_wait else {}
            with Testbed(logs, mode=cfg.mode, server_threads=cfg.server_threads, cache_mb=4096,
                         cpu_period_ms=cfg.cpu_period_ms, server_env=server_env,
                         server_device=cfg.server_device) as tb:
                self.meta["mode"] = tb.mode_name
                self.meta["mode_description"] = tb.describe()
                print(tb.describe(), flush=True)
                tb.start_server()
                if "stream" in cfg.scenarios or "warm" in cfg.scenarios:
                    self.streams(tb)
                if "cold" in cfg.scenarios:
                    self.cold(tb, restart=("stream" in cfg.scenarios or "warm" in cfg.scenarios))
                if "multi" in cfg.scenarios:
                    self.multi(tb)
        except BaseException as e:  # Ctrl-C, SIGTERM/SIGHUP (BenchTerminated) or a failure outside a cell
            interrupted = type(e).__name__ + (f": {e}" if str(e) else "")
            raise
        finally:
            try:
                shutil.rmtree(self.cache, ignore_errors=True)
                try:
                    self.meta["plots"] = self.plots()
                finally:  # a second Ctrl-C during the plots must not lose the record
                    self.save(final=interrupted is None, interrupted=interrupted)
            finally:
                restore()
        print(f"bench done in {time.time() - self.t0:.0f} s: {self.out / 'results.md'}", flush=True)
        return {"ok": not self.failures, "rows": len(self.rows)}

    def plots(self) -> list[str]:
        try:
            from testbed.plots import make_plots

            return make_plots(self.rows, self.out)
        except Exception as e:  # plots must not lose the numbers
            log.exception("plots failed")
            self.failures.append(f"plots: {type(e).__name__}: {e}")
            return []

    def preload(self, tb: Testbed, model: str) -> str:
        tenant = f"{tb.prefix}pre-{short(model)}"
        path = tb.workdir / f"preload-{short(model)}.spec.json"
        spec = {"model": model, "server": tb.local_server_address, "preload": True, "pre_tenant": tenant,
                "uplink_mbps": None, "rtt_ms": 0.0, "out": str(tb.workdir / f"preload-{short(model)}.json")}
        access = tb.access_spec([], [tenant])  # secure testbed: the preloaded tenant's token
        if access is not None:
            spec["access"] = access
        write_spec(path, spec)
        tb.spec_paths.append(path)  # its token is redacted at teardown like every worker's
        code = tb.run_next_to_server(worker_argv(path), f"preload-{short(model)}.log")
        if code != 0:
            raise RuntimeError(f"preloading {model} failed (exit {code}); see {tb.workdir}")
        return tenant

    def streams(self, tb: Testbed) -> None:
        """Scenarios a-d per cell (or c alone: ``warm`` without ``stream``). Each model's cells run on a
        fresh edge server (the first on the one ``run`` started): every stream is a fresh tenant and a server
        never evicts one tenant's weights for another's (DESIGN.md section 10), so one server for the whole
        grid filled its 3 GiB cache with earlier cells' tenants (session 8: resnet50's last cell got
        RESOURCE_EXHAUSTED); a model's own cells need at most (1 + cells x (policies + 2)) x its weight bytes."""
        cfg = self.cfg
        stream = "stream" in cfg.scenarios
        for n_model, name in enumerate(cfg.models):
            model = model_spec(name)
            if n_model:
                tb.restart_server()
            try:
                pre = self.preload(tb, model)
            except Exception as e:
                self.failures.append(f"preload {name}: {e}")
                pre = None
            for cpu in cfg.cpus:
                for up in cfg.uplinks:
                    t = time.time()
                    spec = {"model": model, "uplink_mbps": up, "rtt_ms": cfg.rtt_ms, "cpu": cpu,
                            "policies": list(cfg.policies) if stream else [], "requests": cfg.requests,
                            "cold_compare": stream, "pre_tenant": pre, "warm_requests": cfg.warm_requests,
                            "warm_rounds": cfg.warm_rounds, "op_timings": cfg.op_timings, "pairing": cfg.pairing}
                    res = self.run_cell(tb, spec, f"stream {name} cpu={cpu} up={up}",
                                        lambda e: {"streams": {}, "warm": {}}, partial=True)
                    rows = stream_rows(res, model, cpu, up, cfg.rtt_ms, cfg.requests)
                    self.rows.extend(rows)
                    co = next((r for r in rows if r["scenario"] == "stream" and r["policy"] == "coinfer"), None)
                    ratio = co.get("coinfer_over_best_baseline_mean") if co else None
                    print(f"[{time.time() - self.t0:6.0f} s] stream {short(model)} cpu={cpu:g} up={up:g}: "
                          + ", ".join(f"{r['policy']}={r['mean_ms']:.0f}" for r in rows
                                      if r["scenario"] == "stream" and r["mean_ms"] is not None)
                          + (f"; coinfer/best={ratio:.2f}" if ratio else "")
                          + "; warm " + ", ".join(f"{r['policy']}={r['mean_ms']:.0f}" for r in rows
                                                   if r["scenario"] == "warm")
                          + "".join(f" (coinfer/{r['best_other_policy']} {r['vs_best']['ratio']:.2f}: "
                                    f"{r['vs_best']['verdict']} of {WARM_TARGET:g}x)" for r in rows
                                    if r["scenario"] == "warm" and r.get("vs_best") and r["vs_best"].get("ratio"))
                          + f" ({time.time() - t:.0f} s)", flush=True)
                    self.save()

    def run_cell(self, tb: Testbed, spec: dict, label: str, on_error, partial: bool = False) -> dict:
        """Run one UE worker on ``spec`` (its CPU quota from ``spec["cpu"]``) and return its result with the relay's
        record. If it fails: the failure is logged and recorded under ``label``, a worker still running is
        stopped, and the result is ``on_error(exc)``, or (``partial``) what the worker's log holds so far."""
        try:
            handles = start_workers(tb, [spec], env=self.ue_env(spec["cpu"]))
            tb.release(handles)
            tb.wait_all(handles, self.cfg.cell_timeout_s)
            res = collect(handles)[0]
            res["relay"] = relay_record(handles[0])
            return res
        except Exception as e:
            log.exception("%s failed", label)
            self.failures.append(f"{label}: {e}")
            res = on_error(e)
            for ue in tb.ues[-1:]:
                if ue.proc is not None and ue.proc.poll() is None:
                    stop_processes([ue.proc])
                if partial and ue.log_path is not None:
                    res = collect([ue])[0]
            return res

    def cold(self, tb: Testbed, restart: bool) -> None:
        """Scenario b in its own cells (``cfg.cold_cells``): each on a fresh edge server (``restart``: the one
        running has served other cells), one UE running local, MJOA's cold split with parallel upload and
        the same split with serial upload, ``cfg.cold_repeats`` rounds (``worker.Ue.cold_compare``)."""
        cfg = self.cfg
        for n, (name, cpu, up) in enumerate(cfg.cold_cells):
            model = model_spec(name)
            if n or restart:
                tb.restart_server()
            t = time.time()
            spec = {"model": model, "uplink_mbps": up, "rtt_ms": cfg.rtt_ms, "cpu": cpu, "policies": [],
                    "requests": 1, "cold_compare": True, "cold_repeats": cfg.cold_repeats, "cold_local": True}
            res = self.run_cell(tb, spec, f"cold {name} cpu={cpu} up={up}",
                                lambda e: {"cold_compare": {"error": f"{type(e).__name__}: {e}"}})
            rows = cold_rows(res, model, cpu, up, cfg.rtt_ms)
            self.rows.extend(rows)
            by = {r["policy"]: r for r in rows}
            par, ser = by.get("coinfer-parallel", {}), by.get("serial-same-split", {})
            ratio = par["mean_ms"] / ser["mean_ms"] if par.get("mean_ms") and ser.get("mean_ms") else None
            pred = (par["predicted_ms"] / ser["predicted_ms"] if par.get("predicted_ms") and ser.get("predicted_ms")
                    else None)
            print(f"[{time.time() - self.t0:6.0f} s] cold {short(model)} cpu={cpu:g} up={up:g}: "
                  + ", ".join(f"{r['policy']}={r['mean_ms']:.0f}" for r in rows if r.get("mean_ms") is not None)
                  + (f"; parallel/serial={ratio:.2f}" if ratio else "")
                  + (f" (predicted {pred:.2f})" if pred else "")
                  + "".join(f"; {r['note']}" for r in rows if r.get("note"))
                  + f" ({time.time() - t:.0f} s)", flush=True)
            self.save()

    def multi(self, tb: Testbed) -> None:
        """Scenario e: N UEs (``multi_profiles``) stream coinfer's requests to one edge server at once. Every
        UE builds its stream's client, connects and joins (the workers stop at stage ``joined``) before any
        is released, so the throughput's wall (``wall_s``) covers serving only: from the release of all the
        joined UEs to the end of the last request (the workers' clocks). ``wall_with_startup_s`` is the wall
        as measured up to session 11: from the first UE's stream start (before it built its client) to the
        last UE's stream end (after it closed it)."""
        cfg = self.cfg
        profiles = multi_profiles(cfg)
        for n in cfg.multi_n:
            t = time.time()
            specs = [{"model": m, "uplink_mbps": up, "rtt_ms": cfg.rtt_ms, "cpu": cpu, "policies": ["coinfer"],
                      "requests": cfg.multi_requests, "env": self.ue_env(cpu), "join_barrier": True}
                     for m, up, cpu in profiles[:n]]
            try:
                handles = start_workers(tb, specs)
                tb.release(handles)  # each builds its stream's client, connects and joins, then waits
                tb.wait_stage(handles, "joined", cfg.cell_timeout_s)
                t_start = time.time()
                tb.release(handles)
                tb.wait_all(handles, cfg.cell_timeout_s)
                wall = time.time() - t_start
                results = collect(handles)
                for h, res in zip(handles, results):
                    res["relay"] = relay_record(h)
            except Exception as e:
                log.exception("multi-UE cell failed")
                self.failures.append(f"multi n={n}: {e}")
                continue
            # Throughput over the requests themselves (the workers' clocks), not until the processes exit.
            ends = [q["t_wall"] + q["call_ms"] / 1e3 for r in results
                    for q in r.get("streams", {}).get("coinfer", {}).get("requests", []) if q.get("t_wall")]
            if ends:
                wall = max(ends) - t_start
            starts = [r["start_wall"] for r in results if r.get("start_wall")]
            stops = [r["end_wall"] for r in results if r.get("end_wall")]
            wall_startup = max(stops) - min(starts) if starts and stops else None
            total = 0
            rows = []
            for i, (s, res) in enumerate(zip(specs, results)):
                st = res.get("streams", {}).get("coinfer", {})
                reqs = st.get("requests", [])
                lat = [r["latency_ms"] for r in st.get("requests", [])]
                total += len(lat)
                rows.append({"scenario": "multi_ue", "n_ues": n, "ue": i, "model": short(s["model"]),
                             "policy": "coinfer", "uplink_mbps": s["uplink_mbps"], "rtt_ms": s["rtt_ms"],
                             "ue_cpu": s["cpu"], "requests": len(lat), "latency_ms": lat, "mean_ms": _mean(lat),
                             **_tails(lat), "first_ms": lat[0] if lat else None, "last_ms": lat[-1] if lat else None,
                             "warm_ms": None, "predicted_ms": _mean([r.get("predicted_ms") for r in reqs]),
                             "predicted_per_request_ms": [r.get("predicted_ms") for r in reqs],
                             "server_ops": [r.get("server_ops") for r in reqs],
                             **request_details(reqs, res.get("relay")), **relay_summary(res.get("relay")),
                             "fallbacks": sum(bool(r.get("fallback")) for r in reqs),
                             "connect_ms": st.get("connect_ms"), **client_build(res, "auto"),
                             "error": st.get("error")})
            for r in rows:
                r["wall_s"] = wall
                r["wall_with_startup_s"] = wall_startup
                r["released_wall"] = t_start  # time.time() when the joined UEs were released
                r["server_throughput_rps"] = total / wall if wall > 0 else None
            self.rows.extend(rows)
            print(f"[{time.time() - self.t0:6.0f} s] multi n={n}: "
                  + ", ".join(f"ue{r['ue']}={r['mean_ms']:.0f}" for r in rows if r["mean_ms"] is not None)
                  + f"; {total / wall:.2f} req/s ({time.time() - t:.0f} s)", flush=True)
            self.save()


def run_bench(cfg: BenchConfig, out: Path, *, command: str) -> dict:
    return Bench(cfg, out, command).run()
