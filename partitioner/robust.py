"""`robust`: minimise UE energy subject to P(latency > D) <= eps, from mean and variance only.

Distribution-free: by Cantelli's inequality P(T - mu >= k*sigma) <= 1/(1+k^2), so
mu + sqrt((1-eps)/eps) * sigma <= D guarantees the chance constraint for EVERY distribution with that
mean and variance, and is tight (a two-point distribution attains it). A Gaussian quantile
(``quantile="gaussian"``) is smaller and can miss; it exists to show that.

Latency mean comes from the simulator with UE op times scaled to the chosen frequency. Its variance is
Var(UE part) + Var(server part): the UE part's variance comes from the per-run sums of the raw
profiling samples when present (correlation between ops kept), else from summed per-op variances;
exact for chains (latency = UE prefix + constants + server suffix), a surrogate for DAGs.
Energy (DVFS model): t(f) = t0 + kappa/f, i.e. every UE time scales by
mem + (1-mem) * f_nominal / f; P(f) = P_static + zeta f^3; transmit energy = p_tx * bytes / R
(``request_energy_mj``: the one function the planner and the runtime's per-request report use).

The UE's CPU cost of sending (``ue_cpu``: a :class:`partitioner.uecpu.UeCpu`, ms of the UE's CPU budget
per byte at the nominal frequency) is in both moments, through the one cost model every planner's
prediction uses (:func:`partitioner.uecpu.run_shared`: the UE's compute and its sending on one CPU
budget): sending is CPU work like the ops, so at frequency f it costs ``time_factor(f)`` times more per
byte, the CPU-bound send rate drops by the same factor, and bytes sent while the UE computes slow the
computation. Its spread: the send time (bytes x ms/byte at f) varies with the UE's CPU as the ops do,
with the relative spread of the whole profile's per-run sums (``cpu_cv``), and fully correlated with the
UE part's (one CPU: a burst of other work slows both), so the two standard deviations add.

An uncertain uplink (``uplink_cv``: coefficient of variation of the uplink rate, measured by the
runtime from its recent uplink rate samples, or given) adds (bytes sent / R * cv)^2 to the variance: the
transfer time's spread to first order.

Moments (:func:`latency_moments`), for a partition U (UE ops) at frequency f with g = time_factor(f):

    mean = run_shared(U, a * g, send cost * g)                         (the simulator's latency)
    mean += g * o (+ t when U is not everything)   (o: the UE's per-request overhead; t: the transport residual)
    std  = sqrt((sd_UE + cpu_cv * bytes * s * g)^2 + Var_server / phi^2 + (bytes / R * cv)^2 + sd_t^2)
    sd_UE = max(g * sd_profile(U), ue_cv * g * (sum of a over U + o)),  cpu_cv = max(profile's, ue_cv)

where ``ue_cv`` is the UE's relative spread measured at run time over recent requests (the profile's short
runs can miss what slows the UE now and then: another process on its CPU, a quota's period), and ``sd_t``
(only when U is not everything) the spread of the transport residual t over recent split requests
(``transport_sd_ms``: what the transport took beyond the link model, e.g. a link whose rate drops for
short spells that transfers too small for a rate sample never show the link estimate; taken as
independent of the rest, and the same for every partition that uses the server, as t is).

Formulation: the chance-constrained partitioning of "Robust DNN partitioning and resource allocation
under uncertain inference time" (arXiv 2503.21476, Sec. III: the probabilistic deadline constraint;
Sec. IV-A: its mean-variance (Cantelli) reformulation, the joint choice of split and frequency). When
no (partition, frequency) meets mean + k std <= D the problem is infeasible: the planner says so
(``feasible=False``) and picks the pair with the least Cantelli bound on P(latency > D), std^2 / (std^2
+ (D - mean)^2) for mean < D, else 1 (:func:`cantelli_bound`), not the least quantile.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from statistics import NormalDist

import numpy as np

from partitioner.errors import PartitionerError, SearchSpaceTooLarge
from partitioner.mincut import CutStructure
from partitioner.oracle import can_serve_mask, partitions
from partitioner.prep import Prepared
from partitioner.simulate import Rates, run, server_ms, with_transport
from partitioner.state import ServerState
from partitioner.uecpu import UeCpu, effective_rates, run_shared


@dataclass(frozen=True)
class EnergyModel:
    freqs_ghz: tuple[float, ...] = (0.6, 1.0, 1.4, 1.8, 2.2)
    f_nominal_ghz: float = 2.2
    """Frequency at which ``ue_ms`` was profiled."""
    mem_fraction: float = 0.2
    """Share of an op's time that does not scale with frequency (t0)."""
    p_static_w: float = 0.4
    zeta_w_per_ghz3: float = 0.25
    tx_power_w: float = 1.2
    idle_power_w: float = 0.0

    @classmethod
    def gpu(cls) -> EnergyModel:
        """Rough mobile-GPU levels: higher static power, memory-bound ops."""
        return cls(freqs_ghz=(0.3, 0.5, 0.7, 0.9), f_nominal_ghz=0.9, mem_fraction=0.35, p_static_w=1.0,
                   zeta_w_per_ghz3=4.0)

    def __post_init__(self) -> None:
        if not self.freqs_ghz or any(not f > 0 for f in self.freqs_ghz):
            raise PartitionerError(f"frequency levels must be > 0, got {self.freqs_ghz}")
        if not 0 <= self.mem_fraction <= 1:
            raise PartitionerError(f"mem_fraction must be in [0, 1], got {self.mem_fraction}")

    def time_factor(self, f: float) -> float:
        return self.mem_fraction + (1 - self.mem_fraction) * self.f_nominal_ghz / f

    def power_w(self, f: float) -> float:
        return self.p_static_w + self.zeta_w_per_ghz3 * f ** 3


def request_energy_mj(em: EnergyModel, f_ghz: float, ue_busy_ms: float, uplink_bytes: float,
                      uplink_bytes_per_ms: float, idle_ms: float = 0.0) -> float:
    """Modelled UE energy of one request, mJ (= W x ms): compute at ``f_ghz`` for ``ue_busy_ms`` (the UE
    part's time at that frequency) at ``em.power_w(f)``, plus transmitting ``uplink_bytes`` at
    ``uplink_bytes_per_ms`` (bytes/ms = Mbit/s x 125) with ``em.tx_power_w``, plus ``idle_ms`` waiting at
    ``em.idle_power_w``. Raises PartitionerError on a negative time or byte count or a rate <= 0 with bytes
    to send. Model: the DVFS model of the module docstring (P = P_static + zeta f^3)."""
    if ue_busy_ms < 0 or uplink_bytes < 0 or idle_ms < 0:
        raise PartitionerError(f"energy needs times and bytes >= 0, got busy {ue_busy_ms!r} ms, "
                               f"{uplink_bytes!r} B, idle {idle_ms!r} ms")
    if uplink_bytes and not uplink_bytes_per_ms > 0:
        raise PartitionerError(f"energy needs an uplink rate > 0 to send {uplink_bytes} B, got {uplink_bytes_per_ms!r}")
    tx = em.tx_power_w * uplink_bytes / uplink_bytes_per_ms if uplink_bytes else 0.0
    return em.power_w(f_ghz) * ue_busy_ms + tx + em.idle_power_w * idle_ms


def cantelli_k(eps: float) -> float:
    return math.sqrt((1 - eps) / eps)


def gaussian_k(eps: float) -> float:
    return NormalDist().inv_cdf(1 - eps)


ALWAYS_SCORED = 3
"""Candidates scored whatever the budget: the link's min-cut, local-only, all-offloadable."""


@dataclass(frozen=True)
class RobustResult:
    mask: int
    freq_ghz: float
    mean_ms: float
    std_ms: float
    quantile_ms: float
    energy_mj: float
    feasible: bool
    reason: str
    k: float
    candidates: int
    exact: bool = True
    """True when every valid partition was scored at every frequency within the budget."""
    evaluated: int = 0
    """Partitions scored (each at every frequency) before the budget ran out or the list ended."""
    miss_bound: float = 1.0
    """Cantelli's bound on P(latency > D) for the chosen pair (<= eps when feasible)."""
    parts: dict = dataclasses.field(default_factory=dict)
    """The std's components (``Moments.parts``)."""


def candidate_partitions(P: Prepared, r: Rates, max_enum: int, deadline: float | None = None) -> tuple[list[int], bool]:
    """(candidates, complete): every valid partition when there are at most ``max_enum`` (complete), else
    a sweep of min-cuts and splits, most promising first (the link's own min-cut, local, all offloaded,
    then other prices, bandwidths and shares, then single splits of the topological order)."""
    cs = CutStructure(P)
    first = [cs.solve(r), 0, can_serve_mask(P)]  # likely winners first: a budget that runs out has scored them
    allp: list[int] = []
    try:
        for j, s in enumerate(partitions(P, limit=max_enum)):
            allp.append(s)
            if deadline is not None and j & 255 == 255 and time.perf_counter() > deadline:
                return list(dict.fromkeys(first + allp)), False
        return list(dict.fromkeys(first + allp)), True
    except SearchSpaceTooLarge:
        pass
    ok = can_serve_mask(P)
    cands = [first[0], 0, ok]
    for lam in (0.0, 1.0):
        if deadline is not None and time.perf_counter() > deadline:
            break
        cs = CutStructure(P, weight_coef=lam) if lam else cs
        for mu in (1.0, 0.1, 10.0):
            for ph in (1.0, 0.3):
                if (lam, mu, ph) != (0.0, 1.0, 1.0):  # that one is first already
                    cands.append(cs.solve(Rates(up=r.up * mu, dn=r.dn, L=r.L, phi=r.phi * ph, tup=r.tup * mu)))
    full = (1 << P.n) - 1
    for k in range(0, P.n + 1, max(1, P.n // 40)):
        s = full & ~((1 << k) - 1)
        if s & ~ok == 0:
            cands.append(s)
    return list(dict.fromkeys(cands)), False


def cantelli_bound(mean_ms: float, std_ms: float, deadline_ms: float) -> float:
    """Cantelli's (one-sided Chebyshev) upper bound on P(latency > D) for a latency of this mean and
    standard deviation (ms): std^2 / (std^2 + (D - mean)^2) when mean < D, else 1 (no bound below 1).
    Distribution-free and tight (a two-point distribution attains it)."""
    gap = deadline_ms - mean_ms
    if gap <= 0:
        return 1.0
    v = std_ms * std_ms
    return v / (v + gap * gap)


@dataclass(frozen=True)
class Moments:
    """Mean and standard deviation (ms) of one partition's latency at one frequency, with the parts."""

    mean_ms: float
    std_ms: float
    ue_finish_ms: float
    """When the UE's part finishes (ms, its compute slowed by the sending it overlaps)."""
    sent_bytes: int
    """Weights and cut tensors the partition sends."""
    sd_ue_ms: float
    """The UE ops' spread at this frequency."""
    sd_send_ms: float
    """The send CPU time's spread (cpu_cv x send ms at this frequency)."""
    sd_server_ms: float
    sd_link_ms: float
    sd_transport_ms: float = 0.0
    """The transport residual's spread (``transport_sd_ms``; 0 for local-only)."""

    def parts(self) -> dict[str, float]:
        return {"sd_ue_ms": self.sd_ue_ms, "sd_send_ms": self.sd_send_ms, "sd_server_ms": self.sd_server_ms,
                "sd_link_ms": self.sd_link_ms, "sd_transport_ms": self.sd_transport_ms}


class Spread:
    """The variance inputs of one cost graph, computed once: the UE ops' per-run samples (or per-op
    variances), the server ops' variances and ``cpu_cv``, the relative spread of the whole UE graph's
    per-run time (std / mean of the per-run sums; 0 without samples: then sqrt(sum of per-op variances) /
    sum of means)."""

    def __init__(self, P: Prepared):
        samples = P.graph.ue_samples_ms
        self.S = np.array(samples, dtype=float) if samples and len(samples[0]) >= 2 else None
        self.a_var = np.array(P.a_var, dtype=float)
        self.c_var = np.array(P.c_var, dtype=float)
        self.a = np.array(P.a, dtype=float)
        self.n = P.n
        self._ind: dict[int, np.ndarray] = {}
        self._parts: dict[int, list] = {}
        """server mask -> [``var_ue``, ``var_server`` at share 1, ``ue_indicator @ a``] of :meth:`std_parts` (each made
        when first needed; session 34: a partition's spread is asked again by later decisions on the same graph)."""
        if self.S is not None:
            tot = self.S.sum(axis=0)
            m = float(tot.mean())
            self.cpu_cv = float(tot.std(ddof=1)) / m if m > 0 else 0.0
        else:
            m = float(sum(P.a))
            self.cpu_cv = math.sqrt(float(self.a_var.sum())) / m if m > 0 else 0.0

    def scaled(self, ue: float, server: float) -> Spread:
        """This spread for the graph with UE times x ``ue`` and server times x ``server``
        (``CostGraph.scaled``): the samples and means x ue, the variances x ue^2 / x server^2 (the same
        arrays as building it from the scaled graph); ``cpu_cv``, a ratio, and the indicator memo (the
        structure's) are kept."""
        s = object.__new__(Spread)
        s.S = None if self.S is None else self.S * ue
        s.a_var = self.a_var * ue * ue
        s.c_var = self.c_var * server * server
        s.a = self.a * ue
        s.n = self.n
        s._ind = self._ind
        s._parts = {}
        s.cpu_cv = self.cpu_cv
        return s

    def ue_indicator(self, smask: int) -> np.ndarray:
        """Float vector over the ops: 1.0 for the UE's (not in ``smask``), 0.0 for the server's (memoised)."""
        got = self._ind.get(smask)
        if got is None:
            bits = np.unpackbits(np.frombuffer(smask.to_bytes((self.n + 7) // 8 or 1, "little"), dtype=np.uint8),
                                 bitorder="little")[: self.n]
            got = 1.0 - bits.astype(float)
            if len(self._ind) > 256:
                self._ind.clear()
            self._ind[smask] = got
        return got

    def var_ue(self, smask: int) -> float:
        """Variance (ms^2, at the profile's frequency) of the UE part (ops not in ``smask``)."""
        U = self.ue_indicator(smask)
        if self.S is not None:
            # ``(U @ S).var(ddof=1)`` as numpy computes it (its ``_var``: the sum's mean, the squared deviations'
            # sum over n - 1; the same reductions on the same arrays, the same float) without its Python wrapper
            # (~25 us of a 0.5-1.5 ms decision; session 30, tested against ``var``)
            x = U @ self.S
            n = x.shape[0]
            if n < 2:
                return float(x.var(ddof=1))
            d = x - np.add.reduce(x) / n
            return float(np.add.reduce(d * d) / (n - 1))
        return float(U @ self.a_var)

    def var_server(self, smask: int, phi: float) -> float:
        """Variance (ms^2) of the server part at compute share ``phi``."""
        return float((1 - self.ue_indicator(smask)) @ self.c_var) / phi ** 2

    def std_parts(self, smask: int, sent_bytes: float, r: Rates, *, g: float = 1.0, send_ms_per_byte: float = 0.0,
                  uplink_cv: float = 0.0, ue_cv: float = 0.0, var_ue: float | None = None,
                  fixed_ms: float = 0.0, transport_sd_ms: float = 0.0) -> tuple[float, float, float, float, float]:
        """(std, sd_ue, sd_send, sd_server, sd_link) in ms of partition ``smask`` that sends ``sent_bytes``,
        with the UE ``g`` times slower than profiled and sending costing ``send_ms_per_byte`` (already at
        that speed; 0: free): the formula of the module docstring. ``var_ue``: the UE part's variance at
        g = 1 when the caller has it; ``fixed_ms``: the UE's per-request overhead at g = 1 (its spread is
        the UE's run-time one, ``ue_cv``); ``transport_sd_ms`` (ms, >= 0): the transport residual's spread,
        in the std of a partition that uses the server (``smask`` not 0)."""
        kept = self._parts.get(smask)
        if kept is None:
            if len(self._parts) > 256:
                self._parts.clear()
            kept = self._parts[smask] = [None, None, None]
        if var_ue is None:
            vu = kept[0]
            if vu is None:
                vu = kept[0] = self.var_ue(smask)
        else:
            vu = var_ue
        sd_ue = g * math.sqrt(max(0.0, vu))
        if ue_cv > 0:
            mean = kept[2]
            if mean is None:
                mean = kept[2] = float(self.ue_indicator(smask) @ self.a)
            sd_ue = max(sd_ue, ue_cv * g * (mean + fixed_ms))
        cpu_cv = max(self.cpu_cv, ue_cv)
        sd_send = cpu_cv * sent_bytes * send_ms_per_byte
        if smask:
            vs = kept[1]
            if vs is None:
                vs = kept[1] = self.var_server(smask, 1.0)
            sd_srv = math.sqrt(max(0.0, vs / r.phi ** 2))
        else:
            sd_srv = 0.0
        sd_link = sent_bytes / r.up * uplink_cv if sent_bytes and uplink_cv else 0.0
        sd_t = transport_sd_ms if smask else 0.0
        return (math.sqrt((sd_ue + sd_send) ** 2 + sd_srv ** 2 + sd_link ** 2 + sd_t ** 2), sd_ue, sd_send, sd_srv,
                sd_link)


def latency_moments(P: Prepared, smask: int, r: Rates, state: ServerState | None = None, *, mode: str = "cold",
                    g: float = 1.0, ue_cpu: UeCpu | None = None, uplink_cv: float = 0.0,
                    spread: Spread | None = None, var_ue: float | None = None, ue_cv: float = 0.0,
                    fixed_ms: float = 0.0, transport_ms: float = 0.0, transport_sd_ms: float = 0.0) -> Moments:
    """Mean and std (ms) of partition ``smask`` (bitmask of server ops) with the UE ``g`` times slower than
    profiled (``EnergyModel.time_factor``; its ops and its sending alike), ``r.up`` the LINK's rate
    (bytes/ms; the CPU-bound send rate comes from ``ue_cpu``), ``uplink_cv`` the link rate's relative
    spread (module docstring). ``var_ue``: the UE part's variance at g = 1 when the caller has it.
    ``ue_cv``: the UE's relative spread measured at run time (std / mean of measured / profiled UE time
    over recent requests); the UE part's std is then at least ``ue_cv`` x its mean time, and the send
    time's relative spread at least ``ue_cv`` (the larger of what the profile and the requests saw).
    ``fixed_ms`` (>= 0): the UE's per-request overhead at g = 1 (``ue_client.calibration``: what every
    request costs the UE besides its ops), added to the mean as ``g x fixed_ms`` whatever the partition
    (not to the UE's busy time: it is mostly waiting); ``transport_ms``: what split requests' transport
    measured beyond the link model (``ue_client.calibration.CostModel.transport_ms``, may be negative),
    added to the mean of a partition that uses the server (its transport not below 0:
    ``partitioner.simulate.with_transport``), and
    ``transport_sd_ms`` (>= 0) its spread, in the std of such a partition. The std is
    :meth:`Spread.std_parts`."""
    spread = spread or Spread(P)
    a = [x * g for x in P.a] if g != 1.0 else list(P.a)
    cpu = None if ue_cpu is None or ue_cpu.send_ms_per_byte <= 0 else ue_cpu.at_factor(g)
    s = 0.0 if cpu is None else cpu.send_ms_per_byte
    if cpu is not None and cpu.shared and smask:
        res, _ = run_shared(P, smask, r, s, mode, state, a=a)
    else:
        res = run(P, smask, effective_rates(r, s), mode, state, a=a)
    sent = (res.upload_bytes + res.sent_tensor_bytes) if smask else 0
    sd, sd_ue, sd_send, sd_srv, sd_link = spread.std_parts(smask, sent, r, g=g, send_ms_per_byte=s,
                                                           uplink_cv=uplink_cv, ue_cv=ue_cv, var_ue=var_ue,
                                                           fixed_ms=fixed_ms, transport_sd_ms=transport_sd_ms)
    mean = with_transport(res.latency_ms, res.ue_finish_ms, server_ms(P, smask, r), transport_ms) if smask \
        else res.latency_ms
    return Moments(mean + g * fixed_ms, sd, res.ue_finish_ms, sent, sd_ue, sd_send, sd_srv, sd_link,
                   transport_sd_ms if smask else 0.0)


def robust(P: Prepared, r: Rates, state: ServerState | None, *, deadline_ms: float, eps: float = 0.05,
           energy: EnergyModel | None = None, quantile: str = "cantelli", mode: str = "cold",
           max_enum: int = 4096, budget_s: float = 1.0, uplink_cv: float = 0.0,
           ue_cpu: UeCpu | None = None, ue_cv: float = 0.0, fixed_ms: float = 0.0,
           transport_ms: float = 0.0, transport_sd_ms: float = 0.0) -> RobustResult:
    """Least-energy (partition, frequency) whose mean + k*std meets the deadline D (``deadline_ms``).

    The chance-constrained problem of arXiv 2503.21476 (Sec. III), in its mean-variance form (Sec. IV-A):
    minimise the UE's energy subject to P(latency > D) <= ``eps``, replaced by mean + k std <= D with
    Cantelli's k = sqrt((1 - eps) / eps) (distribution-free) or, to show the difference, the Gaussian one.

    ``r``: the link (``r.up`` the link's rate, NOT already capped by the send CPU); ``ue_cpu``: what
    sending costs the UE at the nominal frequency (None: free); ``uplink_cv`` (>= 0): the uplink rate's
    coefficient of variation; ``ue_cv`` (>= 0): the UE's run-time relative spread, ``fixed_ms`` (>= 0) its
    per-request overhead, ``transport_ms`` the transport's measured residual and ``transport_sd_ms`` (>= 0) its
    spread (:func:`latency_moments`).
    Moments: :func:`latency_moments` (module docstring).

    Infeasible (no pair meets the bound): ``feasible=False`` and the pair with the least Cantelli bound
    on the miss probability (``miss_bound``; ties: less energy), with the reason.

    ``budget_s`` bounds the search: candidates are scored most promising first and, when the budget
    runs out, the best scored so far is returned with ``exact=False`` (the first ``ALWAYS_SCORED``
    candidates, the link's own min-cut, local-only and all-offloadable, are always scored: on a loaded
    machine the enumeration alone can spend the budget, and local-only is often the feasible one).
    ``exact=True`` means every valid partition was scored at
    every frequency (so the result is optimal for this model of mean and variance).
    Raises PartitionerError on a deadline that is not finite and > 0, eps outside (0, 1), an unknown
    quantile, budget_s <= 0, a negative or infinite uplink_cv or transport_sd_ms.
    """
    t0 = time.perf_counter()
    if not (isinstance(deadline_ms, int | float) and deadline_ms > 0 and math.isfinite(deadline_ms)):
        raise PartitionerError(f"robust needs a finite deadline_ms > 0, got {deadline_ms!r}")
    if not 0 < eps < 1:
        raise PartitionerError(f"robust needs 0 < eps < 1, got {eps!r}")
    if quantile not in ("cantelli", "gaussian"):
        raise PartitionerError(f"quantile must be 'cantelli' or 'gaussian', got {quantile!r}")
    if not (isinstance(budget_s, int | float) and budget_s > 0):
        raise PartitionerError(f"robust needs budget_s > 0, got {budget_s!r}")
    if not (isinstance(uplink_cv, int | float) and 0 <= uplink_cv < math.inf):
        raise PartitionerError(f"robust needs a finite uplink_cv >= 0, got {uplink_cv!r}")
    if not (isinstance(ue_cv, int | float) and 0 <= ue_cv < math.inf):
        raise PartitionerError(f"robust needs a finite ue_cv >= 0, got {ue_cv!r}")
    if not (isinstance(fixed_ms, int | float) and 0 <= fixed_ms < math.inf):
        raise PartitionerError(f"robust needs a finite fixed_ms >= 0, got {fixed_ms!r}")
    if not (isinstance(transport_ms, int | float) and math.isfinite(transport_ms)):
        raise PartitionerError(f"robust needs a finite transport_ms, got {transport_ms!r}")
    if not (isinstance(transport_sd_ms, int | float) and 0 <= transport_sd_ms < math.inf):
        raise PartitionerError(f"robust needs a finite transport_sd_ms >= 0, got {transport_sd_ms!r}")
    em = energy or EnergyModel()
    k = cantelli_k(eps) if quantile == "cantelli" else gaussian_k(eps)
    stop = t0 + budget_s
    cands, complete = candidate_partitions(P, r, max_enum, stop)
    spread = Spread(P)
    best = None
    safest = None
    evaluated = 0
    for s in cands:
        if evaluated >= ALWAYS_SCORED and time.perf_counter() > stop:
            break
        vu = spread.var_ue(s)
        for f in em.freqs_ghz:
            g = em.time_factor(f)
            m = latency_moments(P, s, r, state, mode=mode, g=g, ue_cpu=ue_cpu, uplink_cv=uplink_cv,
                                spread=spread, var_ue=vu, ue_cv=ue_cv, fixed_ms=fixed_ms,
                                transport_ms=transport_ms, transport_sd_ms=transport_sd_ms)
            mu, sd = m.mean_ms, m.std_ms
            q = mu + k * sd
            e = request_energy_mj(em, f, m.ue_finish_ms, m.sent_bytes, r.up, max(0.0, mu - m.ue_finish_ms))
            pb = cantelli_bound(mu, sd, deadline_ms)
            row = (e, q, s, f, m, pb)
            if safest is None or (pb, q, e) < (safest[5], safest[1], safest[0]):
                safest = row
            if q <= deadline_ms and (best is None or (e, q) < (best[0], best[1])):
                best = row
        evaluated += 1
    exact = complete and evaluated == len(cands)
    scope = (f"{evaluated} of {len(cands)} candidate partitions" + ("" if complete else " (not all valid ones)")
             + (f", budget {budget_s:g} s ran out" if evaluated < len(cands) else "")
             + f"; {len(em.freqs_ghz)} frequencies each")
    if best is None:
        e, q, s, f, m, pb = safest
        reason = (f"infeasible: no partition and frequency meets the deadline; the least miss bound "
                  f"{pb:.3f} > eps {eps:g} (mean {m.mean_ms:.1f} + {k:.2f} x std {m.std_ms:.1f} = {q:.1f} ms > "
                  f"D = {deadline_ms:g} ms; {scope})")
        return RobustResult(s, f, m.mean_ms, m.std_ms, q, e, False, reason, k, len(cands), exact, evaluated,
                            pb, m.parts())
    e, q, s, f, m, pb = best
    return RobustResult(s, f, m.mean_ms, m.std_ms, q, e, True, "", k, len(cands), exact, evaluated, pb, m.parts())
