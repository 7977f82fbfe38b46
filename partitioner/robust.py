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

An uncertain uplink (``uplink_cv``: coefficient of variation of the uplink rate, e.g. measured by the
runtime) adds (bytes sent / R * cv)^2 to the variance: the transfer time's spread to first order.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from statistics import NormalDist

import numpy as np

from partitioner.errors import PartitionerError, SearchSpaceTooLarge
from partitioner.mincut import CutStructure
from partitioner.oracle import can_serve_mask, partitions
from partitioner.prep import Prepared
from partitioner.simulate import Rates, run
from partitioner.state import ServerState


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
                    cands.append(cs.solve(Rates(up=r.up * mu, dn=r.dn, L=r.L, phi=r.phi * ph)))
    full = (1 << P.n) - 1
    for k in range(0, P.n + 1, max(1, P.n // 40)):
        s = full & ~((1 << k) - 1)
        if s & ~ok == 0:
            cands.append(s)
    return list(dict.fromkeys(cands)), False


def robust(P: Prepared, r: Rates, state: ServerState | None, *, deadline_ms: float, eps: float = 0.05,
           energy: EnergyModel | None = None, quantile: str = "cantelli", mode: str = "cold",
           max_enum: int = 4096, budget_s: float = 1.0, uplink_cv: float = 0.0) -> RobustResult:
    """Least-energy (partition, frequency) whose mean + k*std meets the deadline.

    ``uplink_cv`` (>= 0): the uplink rate's coefficient of variation; each partition's variance gains
    (bytes it sends / R * cv)^2.

    ``budget_s`` bounds the search: candidates are scored most promising first and, when the budget
    runs out, the best scored so far is returned with ``exact=False`` (the first ``ALWAYS_SCORED``
    candidates, the link's own min-cut, local-only and all-offloadable, are always scored: on a loaded
    machine the enumeration alone can spend the budget, and local-only is often the feasible one).
    ``exact=True`` means every valid partition was scored at
    every frequency (so the result is optimal for this model of mean and variance).
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
    em = energy or EnergyModel()
    k = cantelli_k(eps) if quantile == "cantelli" else gaussian_k(eps)
    stop = t0 + budget_s
    cands, complete = candidate_partitions(P, r, max_enum, stop)
    n = P.n
    samples = P.graph.ue_samples_ms
    S = np.array(samples, dtype=float) if samples is not None and len(samples[0]) >= 2 else None
    a_var = np.array(P.a_var)
    c_var = np.array(P.c_var)
    best = None
    closest = None
    evaluated = 0
    for s in cands:
        if evaluated >= ALWAYS_SCORED and time.perf_counter() > stop:
            break
        U = np.array([not (s >> i & 1) for i in range(n)], dtype=float)
        var_ue = float((U @ S).var(ddof=1)) if S is not None else float(U @ a_var)
        var_srv = float((1 - U) @ c_var) / r.phi ** 2
        for f in em.freqs_ghz:
            g = em.time_factor(f)
            a = [x * g for x in P.a]
            res = run(P, s, r, mode, state, a=a)
            mu = res.latency_ms
            up_bytes = res.upload_bytes + res.sent_tensor_bytes
            var_link = (up_bytes / r.up * uplink_cv) ** 2
            sd = math.sqrt(max(0.0, g * g * var_ue + var_srv + var_link))
            q = mu + k * sd
            e = request_energy_mj(em, f, res.ue_finish_ms, up_bytes, r.up, max(0.0, mu - res.ue_finish_ms))
            row = (e, q, s, f, mu, sd)
            if closest is None or q < closest[1]:
                closest = row
            if q <= deadline_ms and (best is None or (e, q) < (best[0], best[1])):
                best = row
        evaluated += 1
    exact = complete and evaluated == len(cands)
    scope = (f"{evaluated} of {len(cands)} candidate partitions" + ("" if complete else " (not all valid ones)")
             + (f", budget {budget_s:g} s ran out" if evaluated < len(cands) else "")
             + f"; {len(em.freqs_ghz)} frequencies each")
    if best is None:
        e, q, s, f, mu, sd = closest
        reason = (f"infeasible: no partition and frequency meets the deadline; best mean + {k:.2f}*std = "
                  f"{q:.3f} ms > D = {deadline_ms:g} ms (eps={eps:g}, {scope})")
        return RobustResult(s, f, mu, sd, q, e, False, reason, k, len(cands), exact, evaluated)
    e, q, s, f, mu, sd = best
    return RobustResult(s, f, mu, sd, q, e, True, "", k, len(cands), exact, evaluated)
