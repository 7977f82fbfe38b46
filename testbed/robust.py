"""`coinfer-testbed run robust`: does the robust policy keep P(latency > D) <= eps when the UE and the
link really vary? One edge server and one UE (netns mode: namespaces, tc, a cgroup quota).

Uncertainty, for real:

- UE op times vary: a burst process in the UE's cgroup spins for random bursts (``burst_ms``) after
  random pauses (``pause_ms``, exponential), taking a share of the UE's quota while it spins (unless
  ``ue_bursts`` is off);
- the uplink rate changes mid-run: ``tc`` re-shapes the UE's link between ``rates_mbps`` in turn, each held
  for a random time (uniform in 0.5..1.5 x ``holds_s`` of that rate, or ``hold_s`` for all);
- frequency levels are emulated with the UE cgroup's CPU quota (share = f / f_max of ``cpu``): the
  robust UE writes its chosen level itself (``coinfer-ue run --freq-quota``), so it runs slower for real.

The server holds the model's weights first (one offloaded request next to the server, unshaped), so
every policy chooses among warm partitions. Streams (``coinfer-ue run`` in the UE's namespace and
cgroup, the same tenant, ``warmup`` requests first, dropped from the statistics): ``local`` and ``mjoa``
(mean-only), then ``robust`` at each eps, in rounds of ``chunk`` requests (the policies interleaved, so
the shared machine's drifting load falls on all of them alike; by default one round).
The deadline is fixed before any robust stream, from the first two: by default D = the q-quantile
(``deadline_quantile``, 0.99) of local's measured calibration latencies, where the guarantee is attainable
at every eps (``RobustScenario.deadline_quantile``), or (``deadline_quantile`` None) D = mjoa's median
predicted mean + ``deadline_frac`` x (local's median measured latency - mjoa's median predicted mean), i.e.
between the mean-only prediction and local execution (``fix_deadline``; stated in the JSON with its inputs).
local and mjoa do not depend on eps:
their one stream each is judged against D in every eps row.

The robust UE measures the uplink's relative spread itself unless ``--uplink-cv`` gives it.

Variants (``coinfer-testbed run robust --variant NAME|FILE``; bundled in ``testbed/scenarios/robust/``,
``load_variant``): ``tail`` (the default: a link usually fast with spells of a very slow rate, and a model
whose offloading wins on the mean: the mean-only plan offloads and its tail crosses D) and ``throttled``
(the dataclass defaults below: a 10 % UE on a link alternating 40 and 10 Mbit/s, where local is the
mean-optimal plan).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
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

    name: str = "throttled"
    """The variant's name (``load_variant``)."""
    model: str = "torchvision:mobilenet_v3_small"
    input_shape: str = "1,3,224,224"
    cpu: float = 0.1
    """The UE's quota at the highest frequency level, cores."""
    period_ms: float = 40.0
    """The UE cgroup's CFS period (``Testbed(cpu_period_ms=...)``, so the result's ``mode`` names it). Not the
    testbed's 10 ms: the UE sets its frequency levels by writing the quota alone (``QuotaFreq``) and the
    kernel's least quota is 1 ms, so the lowest emulated level (0.6 GHz = 2.7 % of a core) needs a period
    >= 37 ms."""
    rtt_ms: float = 10.0
    rates_mbps: tuple[float, ...] = (40.0, 10.0)
    """The uplink's rates (Mbit/s, TCP goodput), applied in turn; the first at the start."""
    hold_s: float = 2.0
    holds_s: tuple[float, ...] = ()
    """Mean hold of each rate (s; each hold uniform in 0.5..1.5 x it); empty: ``hold_s`` for every rate. A
    two-state schedule (usually fast, sometimes very slow) is ``rates_mbps = (fast, slow)``, ``holds_s =
    (long, short)``."""
    ue_bursts: bool = True
    """Run the burst process in the UE's cgroup (``burst_ms``, ``pause_ms``)."""
    burst_ms: tuple[float, float] = (20.0, 120.0)
    pause_ms: float = 400.0
    eps: tuple[float, ...] = (0.05, 0.1, 0.2)
    requests: int = 100
    warmup: int = 3
    calib: int = 200
    """Requests of local and mjoa (interleaved, not counted) the deadline is fixed from: enough for the
    0.99-quantile (two above it; 20 left it to the largest sample or two)."""
    deadline_frac: float = 0.5
    deadline_quantile: float | None = 0.99
    """A number q in (0, 1) (default 0.99): D = the q-quantile of local's measured calibration latencies
    (``fix_deadline``): local, the plan whose latency does not depend on the link, meets D with probability
    about q >= 1 - eps at every eps of the scenario, so the guarantee is attainable at each (the paper's
    setting: a deadline a stable plan meets with probability 1 - eps while the mean-optimal plan's tail,
    the link's slow periods, can cross it); the test asks whether robust finds a plan at least as safe
    and cheaper in energy. None: the ``deadline_frac`` rule (the earlier default, at which no plan could
    meet any eps)."""
    gap_ms: float = 0.0
    """Idle time before every request (ms; default none: each request starts in the quota state the one
    before it, another policy's, left, the same rotation for all). With more than one CFS period each request
    starts with the UE's quota refilled, and a UE part under one quota (~4 ms CPU) runs at full speed:
    measured 0.3 x its profiled time for a 50 ms prefix, 0.7 x for the whole model, a concave time the
    cost model's affine UE calibration does not represent."""
    deadline_scale: float = 1.0
    """With ``deadline_quantile``: D = this x the quantile (a deadline local meets with margin, e.g. 1.25);
    stated in the rule."""
    nominal_uplink: bool = False
    """Every client plans with the first rate of ``rates_mbps`` as its uplink (a ``LinkOverride``: the
    link's nominal rate, as a UE that knows its radio's rate but not its spells) instead of its connect-time
    probe, which may fall in a slow spell and then, with transfers too small for rate samples, stay."""
    seed_transport: bool = False
    """Each robust client starts with the transport residuals mjoa measured in the calibration phase
    (``CostModel.seed_transport``: the same UE and link, before any counted request), so its transport
    spread (``transport_sd_ms``) is known before its first request instead of learnt from its misses."""
    hold_link_on_connect: bool = False
    """Hold the link at ``rates_mbps[0]`` while a client connects (``LinkSchedule.pause_path``)."""
    timeout_ms: float | None = None
    """Every client's give-up time on the server (``ClientOptions.timeout_ms``; None: its own patience rule,
    which gives up on a request that shows no progress for ~1 s and completes it locally). The scenario
    measures latency against D; a long give-up keeps a request in a slow spell on the path it was planned
    on, so its transport is measured (a request given up teaches the cost model nothing)."""
    setup_cpu: float | None = None
    """The UE's quota (cores) while the driver captures the model (setup, untimed; its profile and every
    request run at ``cpu``); None: ``cpu`` throughout. A 10 % UE spends minutes exporting a larger model."""
    server_threads: int = 1
    seed: int = 13

    def hold_means(self) -> tuple[float, ...]:
        """The mean hold (s) of each rate of ``rates_mbps``."""
        return tuple(self.holds_s) if self.holds_s else (self.hold_s,) * len(self.rates_mbps)


VARIANT_DIR = Path(__file__).parent / "scenarios" / "robust"
DEFAULT_VARIANT = "tail"
"""The variant ``coinfer-testbed run robust`` runs without ``--variant`` (the must-show's: README)."""


def variants() -> list[str]:
    """The bundled variants' names (``testbed/scenarios/robust/*.toml``)."""
    return sorted(p.stem for p in VARIANT_DIR.glob("*.toml"))


def load_variant(name_or_path: str | Path) -> RobustScenario:
    """A ``RobustScenario`` from a TOML file: a bundled variant's name (``variants()``) or a path. The file
    has ``name`` and a ``[robust]`` table of ``RobustScenario`` fields (lists for the tuple ones); fields
    it omits keep their defaults. Raises ``testbed.scenarios.ScenarioError`` naming the file and the key on
    an unreadable file, an unknown key, a value of the wrong type or out of range."""
    import tomllib

    from testbed.scenarios import ScenarioError

    p = Path(name_or_path)
    if not p.exists() and (VARIANT_DIR / f"{name_or_path}.toml").exists():
        p = VARIANT_DIR / f"{name_or_path}.toml"
    try:
        d = tomllib.loads(p.read_text())
    except OSError as e:
        raise ScenarioError(f"cannot read robust variant {str(name_or_path)!r} (bundled: {', '.join(variants())}): "
                            f"{e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise ScenarioError(f"{p}: {e}") from None
    unknown = set(d) - {"name", "robust"}
    if unknown:
        raise ScenarioError(f"{p}: unknown top-level keys {sorted(unknown)} (known: name, [robust])")
    table = d.get("robust", {})
    if not isinstance(table, dict):
        raise ScenarioError(f"{p}: [robust] must be a table")
    fields = {f.name: f for f in dataclasses.fields(RobustScenario)}
    kw: dict = {"name": str(d.get("name", p.stem))}
    defaults = RobustScenario()
    for k, v in table.items():
        if k not in fields or k == "name":
            raise ScenarioError(f"{p}: unknown key robust.{k} (known: {', '.join(sorted(set(fields) - {'name'}))})")
        ref = getattr(defaults, k)
        if isinstance(ref, tuple):
            if not isinstance(v, list) or not all(isinstance(x, int | float) and not isinstance(x, bool) for x in v):
                raise ScenarioError(f"{p}: robust.{k} must be a list of numbers, got {v!r}")
            v = tuple(float(x) for x in v)
        elif isinstance(ref, bool):
            if not isinstance(v, bool):
                raise ScenarioError(f"{p}: robust.{k} must be true or false, got {v!r}")
        elif isinstance(ref, int | float) or ref is None:  # None: an optional number (deadline_quantile, ...)
            if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
                raise ScenarioError(f"{p}: robust.{k} must be a number, got {v!r}")
            if isinstance(ref, int) and not isinstance(ref, bool):
                if v != int(v):
                    raise ScenarioError(f"{p}: robust.{k} must be an integer, got {v!r}")
                v = int(v)
        elif not isinstance(v, str):
            raise ScenarioError(f"{p}: robust.{k} must be text, got {v!r}")
        kw[k] = v
    sc = RobustScenario(**kw)
    problems = []
    if not sc.rates_mbps or any(not r > 0 for r in sc.rates_mbps):
        problems.append("rates_mbps must be a non-empty list of rates > 0")
    if sc.holds_s and (len(sc.holds_s) != len(sc.rates_mbps) or any(not h > 0 for h in sc.holds_s)):
        problems.append(f"holds_s must give one hold > 0 per rate ({len(sc.rates_mbps)})")
    if not sc.hold_s > 0 or not 0 < sc.cpu <= 64 or not sc.period_ms >= 1 or not sc.deadline_scale > 0:
        problems.append("hold_s, cpu, period_ms (>= 1) and deadline_scale must be > 0")
    if sc.timeout_ms is not None and not sc.timeout_ms > 0:
        problems.append("timeout_ms must be > 0")
    if sc.setup_cpu is not None and not 0 < sc.setup_cpu <= 64:
        problems.append("setup_cpu must be in (0, 64] cores")
    if sc.deadline_quantile is not None and not 0 < sc.deadline_quantile < 1:
        problems.append("deadline_quantile must be in (0, 1)")
    if not sc.eps or any(not 0 < e < 1 for e in sc.eps):
        problems.append("eps must be a non-empty list in (0, 1)")
    if sc.requests < 1 or sc.calib < 2 or sc.warmup < 0:
        problems.append("requests >= 1, calib >= 2, warmup >= 0")
    if len(sc.burst_ms) != 2 or not 0 <= sc.burst_ms[0] <= sc.burst_ms[1] or not sc.pause_ms > 0:
        problems.append("burst_ms must be [lo, hi] with 0 <= lo <= hi, pause_ms > 0")
    if problems:
        raise ScenarioError(f"{p}: " + "; ".join(problems))
    return sc


def burst_main(seed: int, burst_lo_ms: float, burst_hi_ms: float, pause_ms: float) -> None:
    """The burst process: forever, pause Exp(pause_ms), then spin for U(burst_lo, burst_hi) ms."""
    rng = random.Random(seed)
    while True:
        time.sleep(rng.expovariate(1.0 / pause_ms) / 1e3)
        end = time.perf_counter() + rng.uniform(burst_lo_ms, burst_hi_ms) / 1e3
        x = 0
        while time.perf_counter() < end:
            x += 1


class LinkSchedule(threading.Thread):
    """Re-shape one UE link through ``rates`` (Mbit/s) in turn until stopped, each held U(0.5, 1.5) x its
    mean hold (``holds_s``, s; one number: the same for all), starting at ``rates[0]`` (which the link has
    when the schedule starts). Each change goes through ``net.shape(link, rate, link.downlink_mbps,
    link.rtt_ms)`` (``testbed.netns.NetnsTestbed.shape``: tc); ``changes`` records (time, rate) of each
    change applied, ``started`` the start time.

    ``pause_path``: while that file exists the schedule holds ``rates[0]`` (applied at once if the link is
    elsewhere; the hold of ``rates[0]`` restarts when the file goes): the scenario's driver creates it while a
    client connects, so a session's set-up and its probe do not meet a slow spell (they are not what the
    scenario measures; a 5 s session open failed at 0.25 Mbit/s). Raises ValueError unless there is one
    hold per rate."""

    def __init__(self, net, link, rates: tuple[float, ...], holds_s, seed: int, pause_path: str | Path | None = None):
        super().__init__(name="coinfer-robust-link", daemon=True)
        if isinstance(holds_s, int | float):
            holds_s = (float(holds_s),) * len(rates)
        if not rates or len(holds_s) != len(rates):
            raise ValueError(f"one mean hold per rate: {len(rates)} rates, {len(holds_s)} holds")
        self.net, self.link, self.rates, self.holds_s = net, link, tuple(rates), tuple(holds_s)
        self.pause_path = None if pause_path is None else Path(pause_path)
        self.rng = random.Random(seed)
        self.stop_event = threading.Event()
        self.changes: list[tuple[float, float]] = []
        self.started = time.time()
        self.poll_s = min(0.05, min(self.holds_s) / 8)

    def _apply(self, k: int) -> bool:
        rate = self.rates[k]
        try:
            self.net.shape(self.link, rate, self.link.downlink_mbps, self.link.rtt_ms)
        except Exception as e:  # the run goes on with the rate it has; the JSON lists what was applied
            log.warning("re-shaping the uplink failed: %s", e)
            return False
        self.changes.append((time.time(), rate))
        return True

    def run(self) -> None:
        k = 0
        self.started = time.time()
        until = time.monotonic() + self.holds_s[k] * self.rng.uniform(0.5, 1.5)
        while not self.stop_event.wait(self.poll_s):
            if self.pause_path is not None and self.pause_path.exists():
                if k != 0 and self._apply(0):
                    k = 0
                until = time.monotonic() + self.holds_s[0] * self.rng.uniform(0.5, 1.5)
                continue
            if time.monotonic() >= until:
                nk = (k + 1) % len(self.rates)
                if self._apply(nk):
                    k = nk
                until = time.monotonic() + self.holds_s[k] * self.rng.uniform(0.5, 1.5)

    def stop(self) -> None:
        self.stop_event.set()
        self.join(5.0)

    def rate_at(self, t: float) -> float:
        """The rate (Mbit/s) the schedule had applied at time ``t`` (``time.time()``)."""
        rate = self.rates[0]
        for tc, rc in self.changes:
            if tc > t:
                break
            rate = rc
        return rate

    def time_at(self, until: float | None = None) -> dict[str, float]:
        """Seconds spent at each rate (keys: the rate as text) from ``started`` to ``until`` (default now)."""
        until = time.time() if until is None else until
        out: dict[str, float] = {}
        t, rate = self.started, self.rates[0]
        for tc, rc in [*self.changes, (until, None)]:
            out[f"{rate:g}"] = out.get(f"{rate:g}", 0.0) + max(0.0, min(tc, until) - t)
            t, rate = tc, rc
            if tc >= until:
                break
        return out


def _load() -> dict:
    la = os.getloadavg()
    return {"loadavg_1_5_15": [round(x, 2) for x in la], "cpus": os.cpu_count()}


def fix_deadline(local_measured_ms: list[float], mjoa_predicted_ms: list[float], *, frac: float = 0.5,
                 quantile: float | None = None, scale: float = 1.0) -> tuple[float, str, dict]:
    """The scenario's deadline D (ms) from the calibration phase, fixed before any robust client exists.

    ``local_measured_ms``: local's measured latencies (ms); ``mjoa_predicted_ms``: mjoa's predicted means
    (ms), one per calibration request. Two rules:

    - ``quantile`` None: D = median(mjoa predicted) + ``frac`` x (median(local measured) - that), i.e.
      between the mean-only prediction and local's median (``frac`` in [0, 1]);
    - ``quantile`` q in (0, 1): D = the q-quantile of local's measured latencies (linear interpolation,
      numpy's default), so local itself meets P(latency > D) <= eps for eps >= about 1 - q: the guarantee
      is attainable at such eps, which the median rule (D near every stream's median) does not give;
      ``scale`` (> 0, default 1) multiplies it (D = scale x the quantile: a deadline local meets with margin).

    Returns (D, the rule in words with its numbers, its inputs for the JSON; the quantile rule says there
    whether the samples were enough: at least 1 / (1 - q), one expected above the quantile). Raises
    ValueError on an empty list or a parameter out of range."""
    if not local_measured_ms:
        raise ValueError("no local calibration latencies")
    if quantile is not None:
        if not 0 < quantile < 1:
            raise ValueError(f"deadline quantile must be in (0, 1), got {quantile!r}")
        if not (isinstance(scale, int | float) and 0 < scale < math.inf):
            raise ValueError(f"deadline scale must be a finite number > 0, got {scale!r}")
        q = percentile(list(local_measured_ms), 100 * quantile)
        d = scale * q
        n, need = len(local_measured_ms), math.ceil(1 / (1 - quantile) - 1e-9)
        times = "" if scale == 1 else f"{scale:g} x "
        rule = (f"D = {times}the {quantile:g}-quantile of local's {n} measured calibration latencies "
                + ("" if scale == 1 else f"({q:.1f} ms) ") + f"= {d:.1f} ms, fixed before any robust client existed"
                + ("" if n >= need else f" (fewer than the {need} samples this quantile needs: an extrapolation)"))
        inputs = {"rule": "local-quantile", "quantile": quantile, "samples": n, "samples_needed": need,
                  "local_measured_ms": list(local_measured_ms)}
        if scale != 1:
            inputs.update(scale=scale, quantile_ms=q)
        return d, rule, inputs
    if not mjoa_predicted_ms:
        raise ValueError("no mjoa calibration predictions")
    if not 0 <= frac <= 1:
        raise ValueError(f"deadline frac must be in [0, 1], got {frac!r}")
    local_med = statistics.median(local_measured_ms)
    mjoa_pred = statistics.median(mjoa_predicted_ms)
    d = mjoa_pred + frac * (local_med - mjoa_pred)
    rule = (f"D = mjoa median predicted mean {mjoa_pred:.1f} ms + {frac:g} x (local median measured "
            f"{local_med:.1f} ms - {mjoa_pred:.1f} ms), from {len(local_measured_ms)} interleaved calibration "
            "requests of each, fixed before any robust client existed")
    return d, rule, {"rule": "median-frac", "mjoa_predicted_median_ms": mjoa_pred,
                     "local_measured_median_ms": local_med, "frac": frac}


def stream_stats(reqs: list[dict], deadline_ms: float) -> dict:
    """Miss rate (with its 90 % Clopper-Pearson interval), energy and latency of one stream's requests."""
    lat = [r["measured_ms"] for r in reqs]
    misses = sum(1 for x in lat if x > deadline_ms)
    misses_offloaded = sum(1 for r in reqs if r["measured_ms"] > deadline_ms and r["server_ops"] > 0)
    lo, hi = miss_rate_ci(misses, len(lat), 0.9)
    energy = [r["energy_j"] for r in reqs if r.get("energy_j") is not None]
    freqs = [r["frequency_ghz"] for r in reqs if r.get("frequency_ghz") is not None]
    return {"requests": len(lat), "misses": misses, "miss_rate": misses / len(lat), "miss_rate_ci_low": lo,
            "miss_rate_ci_high": hi, "energy_j_mean": statistics.fmean(energy) if energy else None,
            "mean_ms": statistics.fmean(lat), "p99_ms": percentile(lat, 99),
            "frequency_ghz_mean": statistics.fmean(freqs) if freqs else None,
            "offloaded": sum(1 for r in reqs if r["server_ops"] > 0), "misses_offloaded": misses_offloaded,
            "infeasible": sum(1 for r in reqs if r.get("feasible") is False),
            "measured_std_ms": statistics.stdev(lat) if len(lat) > 1 else 0.0,
            "predicted_std_ms_median": statistics.median([r["predicted_std_ms"] for r in reqs
                                                          if r.get("predicted_std_ms") is not None] or [0.0]),
            "fallbacks": sum(1 for r in reqs if r["fallback"]),
            "predicted_mean_ms_median": statistics.median([r["predicted_mean_ms"] for r in reqs
                                                           if r.get("predicted_mean_ms") is not None] or [0.0])}


def _client(graph, example, server: str, policy: str, cfg: dict, **kw):
    from ue_client.client import CoinferClient
    from ue_client.options import ClientOptions

    access = cfg["access"]
    if cfg.get("data_address"):
        kw.setdefault("data_address", cfg["data_address"])  # the data channel through the UE's delay relay
    if cfg.get("timeout_ms") is not None:
        kw["timeout_ms"] = cfg["timeout_ms"]
    if cfg.get("nominal_uplink_mbps") is not None:
        from ue_client.options import LinkOverride

        kw["link"] = LinkOverride(uplink_mbps=cfg["nominal_uplink_mbps"])
    # the driver decides what each client starts from (``seed_transport``), not the process's memory
    opts = ClientOptions(policy=policy, tenant=access["tenant"], token=access.get("token"),
                         tls_ca=access.get("tls_ca"), threads=1, horizon=None, transport_memory=False, **kw)
    return CoinferClient(graph, example, server=server, options=opts)


def _connect(client, hold: str | None = None) -> None:
    """Connect ``client`` (its session and probe), with the link held at its first rate while ``hold`` (a
    path: ``LinkSchedule.pause_path``) is given."""
    connect = getattr(client.engine, "connect", None)
    if connect is None:
        return
    if hold is None:
        connect()
        return
    Path(hold).touch()
    try:
        time.sleep(0.3)  # the schedule polls every 50 ms, tc takes a few
        connect()
    finally:
        Path(hold).unlink(missing_ok=True)


def driver_main(cfg_path: str) -> None:
    """The UE side of the scenario, one process in the UE's namespace and cgroup (``run_robust`` starts it).

    One capture, one client per policy (``local``, ``mjoa``, then ``robust`` at each eps, all on the same
    graph and cache), their requests interleaved one by one in a rotating order, so the machine's load,
    the burst process and the link schedule fall on every policy alike. Phases:

    1. ``local`` and ``mjoa``: ``warmup`` requests each, then ``calib`` interleaved requests each: the
       deadline D is fixed from these by the stated rule (module docstring), before any robust client
       exists;
    2. the robust clients (deadline D) connect (with ``seed_transport``: starting from the transport
       residuals mjoa measured in phase 1) and warm up;
    3. ``requests`` rounds, each one request of every policy (the order rotates every round); only these
       are counted.

    Before every request the quota is set back to the full one (the nominal frequency): a robust client
    then applies its own choice, so no policy runs at another's frequency.
    """
    from modelgraph import load_model
    from ue_client.frequency import QuotaFreq
    from ue_client.inputs import example_inputs, parse_input_shapes

    cfg = json.loads(Path(cfg_path).read_text())
    import torch

    torch.set_num_threads(1)
    lm = load_model(cfg["model"])
    example = example_inputs(parse_input_shapes(cfg["input_shape"]), lm.example_inputs)
    nominal = QuotaFreq(cfg["quota_path"], cfg["cpu"])
    out: dict = {"streams": {}, "phases": {}}

    def save() -> None:
        Path(cfg["out"]).write_text(json.dumps(out))

    gap_s = float(cfg.get("gap_ms") or 0.0) / 1e3

    def one(name: str, client, x) -> dict:
        nominal.apply(nominal.nominal_ghz)
        if gap_s > 0:
            time.sleep(gap_s)
        eng = client.engine
        cm = getattr(eng, "cost_model", None)
        scale = dict(cm.scale) if cm is not None else None
        transport = None if cm is None else {"mean_ms": cm.transport_ms, "sd_ms": cm.transport_sd_ms()}
        link = eng.probe.planning_link() if hasattr(eng, "probe") else None
        t_start = time.time()
        client(*x)
        rep = client.last_report.to_dict()
        rep["t_start"] = t_start
        choice = getattr(eng, "_choice", None)
        if choice is not None:  # the plan's std by component (robust's) and its mean's parts, for the analysis
            rep["plan_parts"] = {k: choice.details[k] for k in ("sd_ue_ms", "sd_send_ms", "sd_server_ms",
                                                                  "sd_link_ms", "sd_transport_ms", "miss_bound",
                                                                  "ue_finish_ms")
                                 if k in choice.details}
            rep["plan_parts"]["local_ms"] = choice.local_ms
            rep["send_ms_per_byte"] = choice.details.get("send_ms_per_byte")
        if scale is not None:
            rep["scale"] = scale
            rep["transport"] = transport
        if link is not None:
            rep["plan_link"] = {"uplink_mbps": link.uplink_mbps, "rtt_ms": link.rtt_ms}
        return rep

    t = time.time()
    clients: dict = {}
    if cfg.get("setup_cpu"):  # the capture only; the profile (at connect) and the requests run at the nominal quota
        QuotaFreq(cfg["quota_path"], cfg["setup_cpu"]).apply(nominal.nominal_ghz)
    first = _client(lm.module, example, cfg["server"], "local", cfg)
    nominal.apply(nominal.nominal_ghz)
    out["phases"]["capture_s"] = time.time() - t
    clients["local"] = first
    graph, ex = first.graph, first.example_inputs
    clients["mjoa"] = _client(graph, ex, cfg["server"], "mjoa", cfg)
    hold = cfg.get("link_hold_path")
    for c in clients.values():
        _connect(c, hold)
    for name, c in clients.items():
        for _ in range(cfg["warmup"]):
            one(name, c, ex)
    out["phases"]["start_s"] = time.time() - t
    print(f"driver: local and mjoa ready in {time.time() - t:.0f} s", flush=True)
    calib: dict[str, list[dict]] = {"local": [], "mjoa": []}
    for k in range(cfg["calib"]):
        for name in (("local", "mjoa") if k % 2 == 0 else ("mjoa", "local")):
            calib[name].append(one(name, clients[name], ex))
    D, rule, inputs = fix_deadline([r["measured_ms"] for r in calib["local"]],
                                   [r["predicted_mean_ms"] for r in calib["mjoa"]], frac=cfg["deadline_frac"],
                                   quantile=cfg.get("deadline_quantile"), scale=cfg.get("deadline_scale", 1.0))
    out.update(deadline_ms=D, calibration={k: [r["measured_ms"] for r in v] for k, v in calib.items()},
               calibration_offloaded={k: sum(1 for r in v if r["server_ops"] > 0) for k, v in calib.items()},
               deadline_rule=rule, deadline_inputs=inputs)
    print(f"driver: deadline {D:.1f} ms ({out['deadline_rule']})", flush=True)
    seed = None
    if cfg.get("seed_transport"):
        seed = clients["mjoa"].engine.cost_model.transport_residuals
        out["transport_seed_ms"] = seed
        print(f"driver: robust clients start from mjoa's {len(seed)} calibration transport residuals", flush=True)
    save()
    t = time.time()
    for e in cfg["eps"]:
        kw = {"deadline_ms": D, "eps": e, "frequency": QuotaFreq(cfg["quota_path"], cfg["cpu"])}
        if cfg.get("uplink_cv") is not None:
            kw["uplink_cv"] = cfg["uplink_cv"]
        c = _client(graph, ex, cfg["server"], "robust", cfg, **kw)
        if seed:
            c.engine.cost_model.seed_transport(seed)
        clients[f"robust@{e:g}"] = c
        _connect(c, hold)
        for _ in range(cfg["warmup"]):
            one("robust", c, ex)
    out["phases"]["robust_start_s"] = time.time() - t
    names = list(clients)
    streams = out["streams"]
    for name in names:
        streams[name] = []
    t = time.time()
    for k in range(cfg["requests"]):
        rot = names[k % len(names):] + names[:k % len(names)]
        for name in rot:
            rep = one(name, clients[name], ex)
            rep["round"] = k
            streams[name].append(rep)
        if k % 10 == 9:
            print(f"driver: round {k + 1}/{cfg['requests']} ({time.time() - t:.0f} s)", flush=True)
            save()
    out["phases"]["rounds_s"] = time.time() - t
    nominal.apply(nominal.nominal_ghz)
    for c in clients.values():
        c.close()
    out["done"] = True
    save()


def run_robust(sc: RobustScenario, workdir: Path, *, mode: str = "netns", timeout_s: float = 3600.0,
               command: str = "", on_mode=None, uplink_cv: float | None = None) -> dict:
    """Run the scenario (module docstring); returns the result with ``rows`` (one per policy and eps).

    ``uplink_cv``: None (default) lets each robust UE measure its uplink's spread; a number overrides it."""
    from testbed.launcher import LaunchError, Testbed

    if mode == "userspace":
        raise LaunchError("the robust scenario needs netns mode (tc re-shaping, a cgroup quota); see probe")
    workdir = Path(workdir)
    t_start = time.time()
    load_before = _load()
    with Testbed(workdir, mode="netns", server_threads=sc.server_threads, cpu_period_ms=sc.period_ms) as tb:
        if on_mode is not None:
            on_mode(tb)
        if tb.net is None:
            raise LaunchError("the robust scenario needs netns mode")
        tb.start_server()
        tenant = f"{tb.prefix}robust"
        token = tb.issue_tenants([tenant]).get(tenant)
        ue = tb.add_ue(sc.rates_mbps[0], None, sc.rtt_ms, sc.cpu)
        cg = ue.cgroup
        tb.throttle(ue)
        quota_file = cg.path / ("cpu.max" if cg.support.version == "v2" else "cpu.cfs_quota_us")
        # ``ip netns exec`` mounts a fresh /sys: the UE reaches its quota file through our mount namespace
        quota_path = f"/proc/{os.getpid()}/root{quota_file}"
        burst = None
        if sc.ue_bursts:
            burst = cg.popen([sys.executable, "-m", "testbed.robust", "burst", str(sc.seed), str(sc.burst_ms[0]),
                              str(sc.burst_ms[1]), str(sc.pause_ms)], stdout=open(os.devnull, "wb"))  # noqa: SIM115
        hold_path = workdir / "link_hold" if sc.hold_link_on_connect else None
        sched = LinkSchedule(tb.net, tb.net.ues[ue.index], sc.rates_mbps, sc.hold_means(), sc.seed,
                             pause_path=hold_path)
        sched.start()
        env = {"COINFER_CACHE_DIR": str(workdir / "cache")}
        access = {"tenant": tenant}
        if token:
            access.update(token=token, tls_ca=str(tb.credentials.ca_cert))
        pre_access = ["--tenant", tenant]
        if token:
            pre_access += ["--token", token, "--tls-ca", str(tb.credentials.ca_cert)]
        # The server holds the model's weights before the streams (one offloaded request next to the server,
        # unshaped): every policy chooses among warm partitions, none pays a cold upload.
        pre = [sys.executable, "-m", "ue_client.cli", "run", "--server", tb.local_server_address, "--model",
               sc.model, "--input-shape", sc.input_shape, "--policy", "offload", "--requests", "1", *pre_access]
        if tb.run_next_to_server(pre, "preload.log") != 0:
            raise LaunchError(f"preloading the weights failed; see {workdir / 'preload.log'}")
        out = workdir / "driver.json"
        cfg = {"model": sc.model, "input_shape": sc.input_shape, "server": ue.server_address, "access": access,
               "data_address": ue.data_address,
               "quota_path": quota_path, "cpu": sc.cpu, "eps": list(sc.eps), "warmup": sc.warmup,
               "calib": sc.calib, "requests": sc.requests, "deadline_frac": sc.deadline_frac,
               "deadline_quantile": sc.deadline_quantile, "deadline_scale": sc.deadline_scale, "gap_ms": sc.gap_ms,
               "uplink_cv": uplink_cv, "nominal_uplink_mbps": sc.rates_mbps[0] if sc.nominal_uplink else None,
               "seed_transport": sc.seed_transport, "setup_cpu": sc.setup_cpu, "timeout_ms": sc.timeout_ms,
               "link_hold_path": None if hold_path is None else str(hold_path),
               "out": str(out)}
        cfg_path = workdir / "driver_cfg.json"
        cfg_path.write_text(json.dumps(cfg))
        print(f"driver: {sc.requests} interleaved rounds of {2 + len(sc.eps)} policies (+{sc.warmup} warm-up, "
              f"{sc.calib} calibration requests)", flush=True)
        try:
            proc = tb.spawn(ue, [sys.executable, "-m", "testbed.robust", "driver", str(cfg_path)], env=env)
            left = timeout_s - (time.time() - t_start)
            try:
                code = proc.wait(max(1.0, left))
            except Exception as e:
                proc.kill()
                raise LaunchError(f"the UE driver did not finish within the run's {timeout_s:.0f} s; see "
                                  f"{ue.log_path}") from e
            d = json.loads(out.read_text()) if out.exists() else {}
            if code != 0 or not d.get("done"):
                raise LaunchError(f"the UE driver failed (exit {code}); see {ue.log_path}")
        finally:
            # each step on its own: on an interrupted run the testbed's teardown may already have removed
            # the cgroup, and a failing step here must not hide the error that ended the run
            steps = [("link schedule", sched.stop), ("quota reset", lambda: cg.set_cpus(sc.cpu))]
            if burst is not None:
                steps += [("burst process", burst.kill), ("burst process", lambda: burst.wait(5))]
            for what, step in steps:
                try:
                    step()
                except Exception as e:
                    log.warning("robust scenario cleanup: %s: %s: %s", what, type(e).__name__, e)
        mode_desc = tb.describe()
    deadline_ms = d["deadline_ms"]
    streams = d["streams"]
    for reqs in streams.values():
        for r in reqs:
            r["uplink_at_start_mbps"] = sched.rate_at(r["t_start"])
    rows = []
    for eps in sc.eps:
        for name in (f"robust@{eps:g}", "mjoa", "local"):
            reqs = streams[name]
            st = stream_stats(reqs, deadline_ms)
            rows.append({"policy": name.split("@")[0], "eps": eps, "stream": name, "deadline_ms": deadline_ms, **st})
    robust_rows = [r for r in rows if r["policy"] == "robust"]
    must = {
        "robust_miss_rate_le_eps": {str(r["eps"]): r["miss_rate"] <= r["eps"] for r in robust_rows},
        "robust_ci_high_le_1.5eps": {str(r["eps"]): r["miss_rate_ci_high"] <= 1.5 * r["eps"] for r in robust_rows},
        "mean_only_misses_more_than_eps_somewhere": any(r["miss_rate"] > r["eps"] for r in rows
                                                        if r["policy"] == "mjoa"),
    }
    keep = ("round", "measured_ms", "predicted_mean_ms", "predicted_std_ms", "frequency_ghz", "server_ops",
            "feasible", "miss_bound", "uplink_cv", "uplink_mbps", "ue_compute_ms", "sent_tensor_bytes",
            "energy_j", "fallback", "plan_ms", "plan_parts", "server_timings", "uploaded_weight_bytes", "scale",
            "plan_link", "link", "send_ms_per_byte", "transport", "t_start", "uplink_at_start_mbps")
    return {
        "scenario": dataclasses.asdict(sc), "uplink_cv_override": uplink_cv, "command": command,
        "mode": mode_desc, "deadline_ms": deadline_ms, "deadline_rule": d["deadline_rule"],
        "deadline_inputs": d["deadline_inputs"], "calibration": d["calibration"],
        "calibration_offloaded": d.get("calibration_offloaded"), "phases": d["phases"],
        "rate_changes": len(sched.changes), "link_time_s": sched.time_at(),
        "transport_seed_ms": d.get("transport_seed_ms"),
        "load_before": load_before, "load_after": _load(),
        "elapsed_s": time.time() - t_start, "rows": rows, "must_show": must,
        "analysis": analyse(streams, deadline_ms),
        "requests": {k: [{f: r.get(f) for f in keep} for r in v] for k, v in streams.items()},
    }


def analyse(requests: dict[str, list[dict]], deadline_ms: float) -> dict[str, dict]:
    """Why a stream missed, per stream: the predicted mean and std (medians over its requests) against the
    measured mean and std, the std's components (medians of ``plan_parts``: UE ops, send CPU, server,
    uplink), the measured spread of the UE's compute and of the rest (latency - UE compute), the
    requests run infeasible, and the best any plan could do at D (the stream's own miss rate is in its
    row). Streams without predictions (local) report the measured side only. Where the requests say the
    uplink rate at their start (``uplink_at_start_mbps``) and it took several values: how many of each
    stream's requests (and of its misses) started at the slowest one."""
    out = {}
    starts = {r.get("uplink_at_start_mbps") for v in requests.values() for r in v}
    slowest = min(starts) if None not in starts and len(starts) > 1 else None
    for name, reqs in requests.items():
        lat = [r["measured_ms"] for r in reqs]
        ue = [r.get("ue_compute_ms") or 0.0 for r in reqs]
        rest = [a - b for a, b in zip(lat, ue, strict=True)]
        pm = [r["predicted_mean_ms"] for r in reqs if r.get("predicted_mean_ms") is not None]
        ps = [r["predicted_std_ms"] for r in reqs if r.get("predicted_std_ms") is not None]
        parts = [r["plan_parts"] for r in reqs if r.get("plan_parts")]
        def sd(xs: list[float]) -> float:
            return statistics.stdev(xs) if len(xs) > 1 else 0.0

        d = {"measured_mean_ms": statistics.fmean(lat), "measured_std_ms": sd(lat),
             "ue_compute_mean_ms": statistics.fmean(ue), "ue_compute_std_ms": sd(ue),
             "rest_mean_ms": statistics.fmean(rest), "rest_std_ms": sd(rest),
             "predicted_mean_ms_median": statistics.median(pm) if pm else None,
             "predicted_std_ms_median": statistics.median(ps) if ps else None,
             "infeasible": sum(1 for r in reqs if r.get("feasible") is False),
             "uplink_cv_median": statistics.median([r["uplink_cv"] for r in reqs if r.get("uplink_cv") is not None]
                                                   or [0.0])}
        if slowest is not None:
            slow = [r for r in reqs if r["uplink_at_start_mbps"] == slowest]
            d["slowest_uplink_mbps"] = slowest
            d["started_at_slowest"] = len(slow)
            d["misses_started_at_slowest"] = sum(1 for r in slow if r["measured_ms"] > deadline_ms)
        for k in ("sd_ue_ms", "sd_send_ms", "sd_server_ms", "sd_link_ms", "sd_transport_ms"):
            v = [p[k] for p in parts if k in p]
            d[f"predicted_{k}_median"] = statistics.median(v) if v else None
        if pm and len(pm) == len(reqs):  # the measured latency against the request's own prediction
            z = [(r["measured_ms"] - r["predicted_mean_ms"]) for r in reqs]
            d["error_mean_ms"] = statistics.fmean(z)
            d["error_std_ms"] = sd(z)
        out[name] = d
    return out


def format_rows(res: dict) -> str:
    """The result's rows as a fixed-width table."""
    head = (f"{'policy':<8} {'eps':>5} {'n':>4} {'miss':>6} {'CI90 hi':>7} {'E J':>7} {'mean ms':>8} {'p99 ms':>8} "
            f"{'GHz':>4} {'offl':>4} {'infeas':>6}")
    lines = [f"deadline {res['deadline_ms']:.1f} ms ({res['deadline_rule']})", head]
    for r in res["rows"]:
        e = "-" if r["energy_j_mean"] is None else f"{r['energy_j_mean']:.3f}"
        f = "-" if r["frequency_ghz_mean"] is None else f"{r['frequency_ghz_mean']:.1f}"
        lines.append(f"{r['policy']:<8} {r['eps']:>5g} {r['requests']:>4} {r['miss_rate']:>6.3f} "
                     f"{r['miss_rate_ci_high']:>7.3f} {e:>7} {r['mean_ms']:>8.1f} {r['p99_ms']:>8.1f} {f:>4} "
                     f"{r['offloaded']:>4} {r.get('infeasible', 0):>6}")
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
    name = (res.get("scenario") or {}).get("name")
    fig.suptitle(f"robust scenario{' ' + name if name else ''}: D = {res['deadline_ms']:.0f} ms, "
                 f"{res['rows'][0]['requests']} requests per stream", fontsize=9)
    return _save(fig, Path(path), plt)


if __name__ == "__main__" and len(sys.argv) == 6 and sys.argv[1] == "burst":
    burst_main(int(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4]), float(sys.argv[5]))
elif __name__ == "__main__" and len(sys.argv) == 3 and sys.argv[1] == "driver":
    logging.basicConfig(level=logging.WARNING)
    driver_main(sys.argv[2])
