"""`coinfer-testbed run robust`: does the robust policy keep P(latency > D) <= eps when the UE and the
link really vary? One edge server and one UE (netns mode: namespaces, tc, a cgroup quota).

Uncertainty, for real:

- UE op times vary: a burst process in the UE's cgroup spins for random bursts (``burst_ms``) after
  random pauses (``pause_ms``, exponential), taking a share of the UE's quota while it spins;
- the uplink rate changes mid-run: ``tc`` re-shapes the UE's link between ``rates_mbps`` after random
  holds (uniform in 0.5..1.5 x ``hold_s``);
- frequency levels are emulated with the UE cgroup's CPU quota (share = f / f_max of ``cpu``): the
  robust UE writes its chosen level itself (``coinfer-ue run --freq-quota``), so it runs slower for real.

The server holds the model's weights first (one offloaded request next to the server, unshaped), so
every policy chooses among warm partitions. Streams (``coinfer-ue run`` in the UE's namespace and
cgroup, the same tenant, ``warmup`` requests first, dropped from the statistics): ``local`` and ``mjoa``
(mean-only), then ``robust`` at each eps, in rounds of ``chunk`` requests (the policies interleaved, so
the shared machine's drifting load falls on all of them alike; by default one round).
The deadline is fixed before any robust stream, from the first two: D = mjoa's median predicted mean +
``deadline_frac`` x (local's median measured latency - mjoa's median predicted mean), i.e. between the
mean-only prediction and local execution (stated in the JSON). local and mjoa do not depend on eps:
their one stream each is judged against D in every eps row.

The robust UE is told the uplink's relative spread (``--uplink-cv``, the rate schedule's coefficient of
variation: a stated assumption, not measured by the UE).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import random
import statistics
import sys
import threading
import time
from pathlib import Path

from ue_client.report import miss_rate_ci, percentile

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class RobustScenario:
    """The bundled scenario's parameters (``coinfer-testbed run robust``)."""

    model: str = "torchvision:mobilenet_v3_small"
    input_shape: str = "1,3,224,224"
    cpu: float = 0.1
    """The UE's quota at the highest frequency level, cores."""
    rtt_ms: float = 10.0
    rates_mbps: tuple[float, ...] = (40.0, 10.0)
    hold_s: float = 2.0
    burst_ms: tuple[float, float] = (20.0, 120.0)
    pause_ms: float = 400.0
    eps: tuple[float, ...] = (0.05, 0.1, 0.2)
    requests: int = 100
    chunk: int = 100
    """Streams run in rounds of this many requests, policies interleaved (the machine's load drifts); the
    default is one round: at 10 % CPU each stream's start (capture, profile) costs ~2.5 min here."""
    warmup: int = 3
    deadline_frac: float = 0.5
    server_threads: int = 1
    seed: int = 13

    def uplink_cv(self) -> float:
        """Coefficient of variation of the rate schedule (equal expected time at each rate)."""
        r = self.rates_mbps
        return statistics.pstdev(r) / statistics.fmean(r) if len(r) > 1 else 0.0


def burst_main(seed: int, burst_lo_ms: float, burst_hi_ms: float, pause_ms: float) -> None:
    """The burst process: forever, pause Exp(pause_ms), then spin for U(burst_lo, burst_hi) ms."""
    rng = random.Random(seed)
    while True:
        time.sleep(rng.expovariate(1.0 / pause_ms) / 1e3)
        end = time.perf_counter() + rng.uniform(burst_lo_ms, burst_hi_ms) / 1e3
        x = 0
        while time.perf_counter() < end:
            x += 1


class _LinkSchedule(threading.Thread):
    """Re-shape one UE link between rates after random holds until stopped; records (t, rate)."""

    def __init__(self, net, link, rates: tuple[float, ...], hold_s: float, seed: int):
        super().__init__(name="coinfer-robust-link", daemon=True)
        self.net, self.link, self.rates, self.hold_s = net, link, rates, hold_s
        self.rng = random.Random(seed)
        self.stop_event = threading.Event()
        self.changes: list[tuple[float, float]] = []

    def run(self) -> None:
        k = 0
        while not self.stop_event.wait(self.hold_s * self.rng.uniform(0.5, 1.5)):
            k = (k + 1) % len(self.rates)
            rate = self.rates[k]
            try:
                self.net.shape(self.link, rate, self.link.downlink_mbps, self.link.rtt_ms)
            except Exception as e:  # the run goes on with the rate it has; the JSON lists what was applied
                log.warning("re-shaping the uplink failed: %s", e)
                continue
            self.changes.append((time.time(), rate))

    def stop(self) -> None:
        self.stop_event.set()
        self.join(5.0)


def _load() -> dict:
    la = os.getloadavg()
    return {"loadavg_1_5_15": [round(x, 2) for x in la], "cpus": os.cpu_count()}


def stream_stats(reqs: list[dict], deadline_ms: float) -> dict:
    """Miss rate (with its 90 % Clopper-Pearson interval), energy and latency of one stream's requests."""
    lat = [r["measured_ms"] for r in reqs]
    misses = sum(1 for x in lat if x > deadline_ms)
    lo, hi = miss_rate_ci(misses, len(lat), 0.9)
    energy = [r["energy_j"] for r in reqs if r.get("energy_j") is not None]
    freqs = [r["frequency_ghz"] for r in reqs if r.get("frequency_ghz") is not None]
    return {"requests": len(lat), "misses": misses, "miss_rate": misses / len(lat), "miss_rate_ci_low": lo,
            "miss_rate_ci_high": hi, "energy_j_mean": statistics.fmean(energy) if energy else None,
            "mean_ms": statistics.fmean(lat), "p99_ms": percentile(lat, 99),
            "frequency_ghz_mean": statistics.fmean(freqs) if freqs else None,
            "offloaded": sum(1 for r in reqs if r["server_ops"] > 0),
            "fallbacks": sum(1 for r in reqs if r["fallback"]),
            "predicted_mean_ms_median": statistics.median([r["predicted_mean_ms"] for r in reqs
                                                           if r.get("predicted_mean_ms") is not None] or [0.0])}


def run_robust(sc: RobustScenario, workdir: Path, *, mode: str = "netns", timeout_s: float = 3600.0,
               command: str = "", on_mode=None) -> dict:
    """Run the scenario (module docstring); returns the result with ``rows`` (one per policy and eps)."""
    from testbed.launcher import LaunchError, Testbed

    if mode == "userspace":
        raise LaunchError("the robust scenario needs netns mode (tc re-shaping, a cgroup quota); see probe")
    workdir = Path(workdir)
    t_start = time.time()
    load_before = _load()
    streams: dict[str, dict] = {}
    with Testbed(workdir, mode="netns", server_threads=sc.server_threads) as tb:
        if on_mode is not None:
            on_mode(tb)
        if tb.net is None:
            raise LaunchError("the robust scenario needs netns mode")
        tb.start_server()
        tenant = f"{tb.prefix}robust"
        token = tb.issue_tenants([tenant]).get(tenant)
        ue = tb.add_ue(sc.rates_mbps[0], None, sc.rtt_ms, sc.cpu)
        tb.throttle(ue)
        cg = ue.cgroup
        quota_file = cg.path / ("cpu.max" if cg.support.version == "v2" else "cpu.cfs_quota_us")
        # ``ip netns exec`` mounts a fresh /sys: the UE reaches its quota file through our mount namespace
        quota_path = f"/proc/{os.getpid()}/root{quota_file}"
        burst = cg.popen([sys.executable, "-m", "testbed.robust", "burst", str(sc.seed), str(sc.burst_ms[0]),
                          str(sc.burst_ms[1]), str(sc.pause_ms)], stdout=open(os.devnull, "wb"))  # noqa: SIM115
        sched = _LinkSchedule(tb.net, tb.net.ues[ue.index], sc.rates_mbps, sc.hold_s, sc.seed)
        sched.start()
        env = {"COINFER_CACHE_DIR": str(workdir / "cache")}
        access = ["--tenant", tenant] + (["--token", token, "--tls-ca", str(tb.credentials.ca_cert)] if token else [])
        # The server holds the model's weights before the streams (one offloaded request next to the server,
        # unshaped): every policy chooses among warm partitions, none pays a cold upload.
        pre = [sys.executable, "-m", "ue_client.cli", "run", "--server", tb.local_server_address, "--model",
               sc.model, "--input-shape", sc.input_shape, "--policy", "offload", "--requests", "1", *access]
        if tb.run_next_to_server(pre, "preload.log") != 0:
            raise LaunchError(f"preloading the weights failed; see {workdir / 'preload.log'}")
        deadline_ms: float | None = None
        deadline_rule = ""
        try:
            plan = [("local", None), ("mjoa", None)] + [("robust", e) for e in sc.eps]
            chunks = [min(sc.chunk, sc.requests - k) for k in range(0, sc.requests, sc.chunk)]
            for c, (n_req, (policy, eps)) in enumerate((n, pe) for n in chunks for pe in plan):
                if policy == "robust" and deadline_ms is None:
                    local_med = statistics.median(r["measured_ms"] for r in streams["local"]["requests"])
                    mjoa_pred = statistics.median(r["predicted_mean_ms"] for r in streams["mjoa"]["requests"])
                    deadline_ms = mjoa_pred + sc.deadline_frac * (local_med - mjoa_pred)
                    deadline_rule = (f"D = mjoa median predicted mean {mjoa_pred:.1f} ms + {sc.deadline_frac:g} x "
                                     f"(local median measured {local_med:.1f} ms - {mjoa_pred:.1f} ms), fixed before "
                                     "any robust stream")
                    print(f"deadline: {deadline_rule} = {deadline_ms:.1f} ms", flush=True)
                name = policy if eps is None else f"robust@{eps:g}"
                out = workdir / f"{name}.{c // len(plan)}.json"
                argv = [sys.executable, "-m", "ue_client.cli", "run", "--server", ue.server_address,
                        "--model", sc.model, "--input-shape", sc.input_shape, "--policy", policy,
                        "--requests", str(n_req + sc.warmup), "--threads", "1", "--json", str(out), *access]
                if policy == "robust":
                    argv += ["--deadline-ms", f"{deadline_ms:.3f}", "--eps", str(eps), "--uplink-cv",
                             f"{sc.uplink_cv():.4f}", "--freq-quota", f"{quota_path}@{sc.cpu}"]
                print(f"stream {name}, round {c // len(plan) + 1}/{len(chunks)}: {n_req} requests "
                      f"(+{sc.warmup} warm-up)", flush=True)
                t0 = time.time()
                proc = tb.spawn(ue, argv, env=env)
                left = timeout_s - (time.time() - t_start)
                try:
                    code = proc.wait(max(1.0, left))
                except Exception as e:
                    raise LaunchError(f"stream {name} did not finish within the run's {timeout_s:.0f} s") from e
                d = json.loads(out.read_text()) if out.exists() else {"requests": [], "error": "no report"}
                if code != 0 or d.get("error"):
                    raise LaunchError(f"stream {name} failed (exit {code}): {d.get('error')}; see {ue.log_path}")
                st = streams.setdefault(name, {"policy": policy, "eps": eps, "requests": [], "wall_s": 0.0})
                st["requests"] += d["requests"][sc.warmup:]
                st["wall_s"] += time.time() - t0
        finally:
            sched.stop()
            cg.set_cpus(sc.cpu)
            burst.kill()
            burst.wait(5)
        mode_desc = tb.describe()
    rows = []
    for eps in sc.eps:
        for name in (f"robust@{eps:g}", "mjoa", "local"):
            s = streams[name]
            st = stream_stats(s["requests"], deadline_ms)
            rows.append({"policy": s["policy"], "eps": eps, "stream": name, "deadline_ms": deadline_ms, **st})
    robust_rows = [r for r in rows if r["policy"] == "robust"]
    must = {
        "robust_miss_rate_le_eps": {str(r["eps"]): r["miss_rate"] <= r["eps"] for r in robust_rows},
        "robust_ci_high_le_1.5eps": {str(r["eps"]): r["miss_rate_ci_high"] <= 1.5 * r["eps"] for r in robust_rows},
        "mean_only_misses_more_than_eps_somewhere": any(r["miss_rate"] > r["eps"] for r in rows
                                                        if r["policy"] == "mjoa"),
    }
    return {
        "scenario": {**dataclasses.asdict(sc), "uplink_cv": sc.uplink_cv()}, "command": command,
        "mode": mode_desc, "deadline_ms": deadline_ms, "deadline_rule": deadline_rule,
        "rate_changes": len(sched.changes), "load_before": load_before, "load_after": _load(),
        "elapsed_s": time.time() - t_start, "rows": rows, "must_show": must,
        "streams": {k: {"wall_s": v["wall_s"], "measured_ms": [r["measured_ms"] for r in v["requests"]],
                        "frequency_ghz": [r["frequency_ghz"] for r in v["requests"]],
                        "server_ops": [r["server_ops"] for r in v["requests"]]} for k, v in streams.items()},
    }


def format_rows(res: dict) -> str:
    """The result's rows as a fixed-width table."""
    head = (f"{'policy':<8} {'eps':>5} {'n':>4} {'miss':>6} {'CI90 hi':>7} {'E J':>7} {'mean ms':>8} {'p99 ms':>8} "
            f"{'GHz':>4} {'offl':>4}")
    lines = [f"deadline {res['deadline_ms']:.1f} ms ({res['deadline_rule']})", head]
    for r in res["rows"]:
        e = "-" if r["energy_j_mean"] is None else f"{r['energy_j_mean']:.3f}"
        f = "-" if r["frequency_ghz_mean"] is None else f"{r['frequency_ghz_mean']:.1f}"
        lines.append(f"{r['policy']:<8} {r['eps']:>5g} {r['requests']:>4} {r['miss_rate']:>6.3f} "
                     f"{r['miss_rate_ci_high']:>7.3f} {e:>7} {r['mean_ms']:>8.1f} {r['p99_ms']:>8.1f} {f:>4} "
                     f"{r['offloaded']:>4}")
    return "\n".join(lines)


def plot(res: dict, path: Path) -> Path:
    """Miss rate (with the 90 % interval's upper end) and mean energy per policy and eps (PNG)."""
    from testbed.plots import COLORS, _plt, _save

    plt = _plt()
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.4))
    eps = sorted({r["eps"] for r in res["rows"]})
    pols = ["robust", "mjoa", "local"]
    w = 0.25
    colors = {**COLORS, "robust": "tab:red", "mjoa": "tab:blue"}
    for j, p in enumerate(pols):
        rs = {r["eps"]: r for r in res["rows"] if r["policy"] == p}
        xs = [i + (j - 1) * w for i in range(len(eps))]
        miss = [rs[e]["miss_rate"] for e in eps]
        hi = [rs[e]["miss_rate_ci_high"] - rs[e]["miss_rate"] for e in eps]
        a1.bar(xs, miss, w, yerr=[[0] * len(eps), hi], label=p, color=colors.get(p), capsize=2)
        a2.bar(xs, [rs[e]["energy_j_mean"] or 0 for e in eps], w, label=p, color=colors.get(p))
    for i, e in enumerate(eps):
        a1.hlines(e, i - 1.5 * w, i + 1.5 * w, colors="k", linestyles="--", lw=1)
    a1.set_yscale("symlog", linthresh=0.05)
    for a, t in ((a1, "miss rate (bar: 90 % CI high; dashed: eps)"), (a2, "modelled UE energy, J/request")):
        a.set_xticks(range(len(eps)), [f"eps {e:g}" for e in eps])
        a.set_title(t, fontsize=9)
    a1.legend(fontsize=7)
    return _save(fig, Path(path), plt)


if __name__ == "__main__" and len(sys.argv) == 6 and sys.argv[1] == "burst":
    burst_main(int(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4]), float(sys.argv[5]))
