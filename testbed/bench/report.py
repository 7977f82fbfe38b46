"""Markdown tables of a bench run: one table per scenario, the coinfer / best-baseline ratio in every cell, and
whether coinfer is slower or faster than local beyond noise (``compare_to_local``)."""

from __future__ import annotations

import dataclasses
import math
import statistics
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

STREAM_POLICIES = ("local", "neurosurgeon-serial", "dads-serial", "ionn", "coinfer")
HEAD = {"local": "local", "neurosurgeon-serial": "NS+serial", "dads-serial": "DADS+serial", "ionn": "IONN",
        "coinfer": "coinfer"}
WARM_POLICIES = ("local", "neurosurgeon", "dads", "coinfer")
WARM_HEAD = {"local": "local", "neurosurgeon": "NS", "dads": "DADS", "coinfer": "coinfer"}

ALPHA = 0.05
MIN_REQUESTS = 3
SLOWER, FASTER, WITHIN, TOO_FEW = "slower beyond noise", "faster beyond noise", "within noise", "too few requests"
COMPARISON_RULE = (
    "coinfer vs local: one-sided Welch t-tests at 5 % on the per-request latencies of the two streams of a "
    "cell, the first (cold) request included because it is part of what the stream costs; the K requests are "
    "treated as independent samples (coinfer's stream is not stationary: its cold first request inflates its "
    "variance and widens the interval, so a stream with one slow cold request is rarely called different from "
    "local). `slower beyond noise`: the mean ratio is above 1 and the test for coinfer > local rejects "
    "equality; `faster` symmetrically; else `within noise`; no verdict with fewer than "
    f"{MIN_REQUESTS} requests on either side. The interval is the 90 % Fieller interval of the ratio of means "
    "with the Welch degrees of freedom (lower end clipped at 0): it excludes 1 exactly when one of the "
    "one-sided tests rejects.")


@dataclasses.dataclass(frozen=True)
class Comparison:
    """coinfer against local on one cell's per-request latencies (see ``COMPARISON_RULE``)."""

    ratio: float | None
    """mean(coinfer) / mean(local)."""
    ci_low: float | None
    """90 % two-sided Fieller interval of the ratio (low end clipped at 0); None where unbounded (or no verdict)."""
    ci_high: float | None
    p_value: float | None
    """One-sided Welch p-value in the direction of the observed difference (coinfer > local if ratio > 1)."""
    verdict: str
    n_coinfer: int
    n_local: int
    test: str = "welch-one-sided"
    alpha: float = ALPHA
    rho0: float = 1.0
    """The ratio of means the test is against (1: slower than the other at all; 1.1: above 1.1x of it)."""


def compare_to_local(coinfer_lat: Sequence[float], local_lat: Sequence[float], *, alpha: float = ALPHA,
                     min_n: int = MIN_REQUESTS, rho0: float = 1.0) -> Comparison:
    """Is coinfer's stream slower (or faster) than local's beyond noise? Pure; deterministic.

    ``rho0`` (> 0): the ratio of means tested against, 1 for "slower than local". With ``rho0`` = 1.1 the
    verdict says whether coinfer's mean is above 1.1x the other's beyond noise (Welch's test of
    mean(coinfer) - rho0 x mean(other) = 0, the other's latencies scaled by ``rho0``); the interval does
    not depend on ``rho0``. Raises ValueError for ``rho0`` <= 0."""
    if not rho0 > 0:
        raise ValueError(f"rho0 must be > 0, got {rho0!r}")
    co = [float(x) for x in coinfer_lat if x is not None]
    lo = [float(x) for x in local_lat if x is not None]
    nc, nl = len(co), len(lo)
    mc = sum(co) / nc if nc else None
    ml = sum(lo) / nl if nl else None
    ratio = mc / ml if mc is not None and ml else None
    if nc < min_n or nl < min_n or ratio is None:
        return Comparison(ratio, None, None, None, TOO_FEW, nc, nl, alpha=alpha, rho0=rho0)
    from scipy import stats

    vc = statistics.variance(co) / nc
    vl = statistics.variance(lo) / nl
    se2 = vc + vl
    if se2 == 0.0:  # no spread at all: any difference is beyond noise (scipy's t would be nan)
        p = 1.0 if mc == rho0 * ml else 0.0
        lo_ci = hi_ci = ratio
    else:
        above = mc >= rho0 * ml
        welch = stats.ttest_ind(co, lo, equal_var=False, alternative="greater" if mc >= ml else "less")
        if rho0 != 1.0:
            p = float(stats.ttest_ind(co, [rho0 * x for x in lo], equal_var=False,
                                      alternative="greater" if above else "less").pvalue)
        else:
            p = float(welch.pvalue)
        q = float(stats.t.ppf(1.0 - alpha, welch.df))
        # Fieller: the set of rho with (mc - rho*ml)^2 <= q^2 (vc + rho^2 vl); bounded iff local's mean is
        # itself significantly above 0 (a > 0), always the case for latencies.
        a = ml * ml - q * q * vl
        if a > 0:
            root = q * math.sqrt(ml * ml * vc + mc * mc * vl - q * q * vc * vl)
            lo_ci, hi_ci = max(0.0, (mc * ml - root) / a), (mc * ml + root) / a  # latencies: ratio >= 0
        else:
            lo_ci = hi_ci = None
    if p < alpha and ratio > rho0:
        verdict = SLOWER
    elif p < alpha and ratio < rho0:
        verdict = FASTER
    else:
        verdict = WITHIN
    return Comparison(ratio, lo_ci, hi_ci, p, verdict, nc, nl, alpha=alpha, rho0=rho0)


def cell_comparison(cell: dict[str, dict]) -> Comparison | None:
    """The cell's coinfer-vs-local comparison: the one stored on the coinfer row (``vs_local``), else computed
    from the two rows' latency lists (results.json files written before ``vs_local`` existed)."""
    co, loc = cell.get("coinfer"), cell.get("local")
    if co is None or loc is None:
        return None
    stored = co.get("vs_local")
    if isinstance(stored, dict):
        try:
            return Comparison(**stored)
        except TypeError:
            pass
    if not co.get("latency_ms") or not loc.get("latency_ms"):
        return None
    return compare_to_local(co["latency_ms"], loc["latency_ms"])


def _ci(c: Comparison | None) -> str:
    if c is None or c.ratio is None:
        return "n/a"
    if c.verdict == TOO_FEW:
        return f"{c.ratio:.2f}"
    if c.ci_low is None or c.ci_high is None:
        return f"{c.ratio:.2f} [unbounded]"
    return f"{c.ratio:.2f} [{c.ci_low:.2f}, {c.ci_high:.2f}]"


def _p(c: Comparison | None) -> str:
    if c is None or c.p_value is None:
        return "n/a"
    return f"{c.p_value:.3f}" if c.p_value >= 0.001 else "<0.001"


def _f(x, nd: int = 0) -> str:
    return "n/a" if x is None else f"{x:.{nd}f}"


def _r(x) -> str:
    return "n/a" if x is None else f"{x:.2f}"


def _cells(rows: list[dict], scenario: str) -> dict[tuple, dict[str, dict]]:
    out: dict[tuple, dict[str, dict]] = defaultdict(dict)
    for r in rows:
        if r.get("scenario") == scenario:
            out[(r["model"], r["ue_cpu"], r["uplink_mbps"])][r["policy"]] = r
    return out


def _key_name(k) -> list[str]:
    model, cpu, up = k
    return [model, f"{cpu * 100:g} %", f"{up:g}"]


def _table(head: list[str], body: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in body]
    return [*lines, ""]


def stream_table(rows: list[dict], key: str, title: str) -> list[str]:
    cells = _cells(rows, "stream")
    if not cells:
        return []
    head = ["model", "UE CPU", "uplink Mbps", *(HEAD[p] for p in STREAM_POLICIES)]
    if key == "mean_ms":
        head.append("pre-deployed")
    head += ["best baseline", "coinfer / best baseline"]
    head += ["coinfer / local [90 % CI]", "p (one-sided)", "coinfer vs local"] if key == "mean_ms" else [
        "coinfer / local"]
    body = []
    for k in sorted(cells):
        c = cells[k]
        vals = {p: c[p][key] if p in c else None for p in STREAM_POLICIES}
        bb = best_baseline(c, key)
        local_like = bb.as_local if bb else ()
        row = _key_name(k) + [_f(vals[p]) + (" (UE only)" if p in local_like else "") for p in STREAM_POLICIES]
        if key == "mean_ms":
            row.append(_f(next((r.get("predeployed_ms") for r in c.values() if r.get("predeployed_ms")), None)))
        co = vals.get("coinfer")
        row += [HEAD.get(bb.policy, bb.policy) if bb else "n/a",
                _r(co / bb.value if co is not None and bb and bb.value else None)]
        if key == "mean_ms":
            cmp = cell_comparison(c)
            row += [_ci(cmp), _p(cmp), cmp.verdict if cmp else "n/a"]
        else:
            row.append(_r(co / vals["local"] if co is not None and vals.get("local") else None))
        body.append(row)
    notes = ["- (UE only): the baseline ran every request on the UE alone; " + UE_ONLY_RULE + ".", ""] if any(
        "(UE only)" in x for row in body for x in row) else []
    return [f"### {title}", "", *_table(head, body), *notes]


def paired_table(rows: list[dict]) -> list[str]:
    """Per cell: each policy's stream mean over the mean of the local stream interleaved with it (its own;
    coinfer's is the cell's local stream), where the rows have them (``pairing: all``, session 12 on). A
    ratio within one time window: how far a baseline's or coinfer's comparison with another stream's mean
    could move by the window alone is the spread of the paired local means beside it."""
    cells = _cells(rows, "stream")
    pols = [p for p in STREAM_POLICIES if p != "local"]
    if not any(r.get("paired_local_mean_ms") for c in cells.values() for p, r in c.items() if p != "coinfer"):
        return []
    head = ["model", "UE CPU", "uplink Mbps", *(f"{HEAD[p]} / its local" for p in pols), "paired local means"]
    body = []
    for k in sorted(cells):
        c = cells[k]
        row = _key_name(k)
        for p in pols:
            r = c.get(p) or {}
            m, lm = r.get("mean_ms"), r.get("paired_local_mean_ms")
            row.append("n/a" if m is None or not lm else f"{m / lm:.2f} ({_f(m)} / {_f(lm)})")
        means = [c[p]["paired_local_mean_ms"] for p in pols if (c.get(p) or {}).get("paired_local_mean_ms")]
        row.append(f"{_f(min(means))}-{_f(max(means))}" if means else "n/a")
        body.append(row)
    return ["### a. Stream: each policy over the local stream interleaved with it (ratio of means, ms)", "",
            *_table(head, body)]


def holm_slower(comparisons: dict, alpha: float = ALPHA) -> list:
    """Keys of the cells where coinfer is slower than local with the family-wise error held at ``alpha``
    over all the tested cells (Holm-Bonferroni on the one-sided "coinfer > local" p-values): at 5 % per
    cell, 24 cells give ~1.2 "slower" verdicts by chance alone when coinfer and local are the same."""
    m = len(comparisons)
    ps = sorted((c.p_value, k) for k, c in comparisons.items()
                if c.p_value is not None and c.ratio is not None and c.ratio > c.rho0)
    out = []
    for i, (pv, k) in enumerate(ps):
        if pv > alpha / (m - i):
            break
        out.append(k)
    return out


def local_summary(rows: list[dict]) -> list[str]:
    """One line each: in how many cells coinfer is slower / faster than local beyond noise, and which."""
    cells = _cells(rows, "stream")
    if not cells:
        return []
    tested: dict[tuple, Comparison] = {}
    for k in sorted(cells):
        cmp = cell_comparison(cells[k])
        if cmp is not None and cmp.verdict != TOO_FEW:
            tested[k] = cmp

    def listed(verdict: str) -> str:
        ks = [k for k, c in tested.items() if c.verdict == verdict]
        return f"{len(ks)} of {len(tested)} cells" + (": " + "; ".join(
            f"{' '.join(_key_name(k)[:2])} {_key_name(k)[2]} Mbps ({_ci(tested[k])})" for k in ks) if ks else "")

    lines = [f"- coinfer slower than local beyond noise in {listed(SLOWER)}",
             f"- coinfer faster than local beyond noise in {listed(FASTER)}",
             f"- within noise in {sum(c.verdict == WITHIN for c in tested.values())} of {len(tested)} cells"]
    holm = holm_slower(tested)
    named = "; ".join(f"{' '.join(_key_name(k)[:2])} {_key_name(k)[2]} Mbps" for k in holm)
    lines.append(f"- over all {len(tested)} cells at once (Holm-Bonferroni, family-wise 5 %): coinfer slower "
                 f"than local in {len(holm)} cells" + (f": {named}" if holm else "")
                 + f" (per-cell tests at 5 % call ~{ALPHA * len(tested):.1f} cells slower by chance when coinfer "
                 "and local are the same)")
    if len(tested) < len(cells):
        lines.append(f"- no verdict in {len(cells) - len(tested)} cells (local or coinfer missing, or fewer than "
                     f"{MIN_REQUESTS} requests)")
    return ["### a. Stream: coinfer vs local", "", *lines, f"- rule: {COMPARISON_RULE}", ""]


REMOTE_BASELINES = ("neurosurgeon-serial", "dads-serial", "ionn")
UE_ONLY_RULE = (
    "a baseline stream whose every request ran on the UE alone (server ops 0 in all, no fallback) is a "
    "measurement of local, taken in another time window, not a distinct remote baseline: where the cell has "
    "local's stream (the one paired with coinfer, request by request), it stands for local and the best "
    "baseline is chosen among local and the baselines that ran ops on the server (where the cell has no "
    "local stream, such a stream stands as local itself)")


def ue_only(r: dict | None) -> bool:
    """Did this stream row run every request on the UE alone? True when ``server_ops`` lists 0 for each of its
    requests (one per ``latency_ms`` entry) and none fell back (a fallback waited for the server first: its
    latency is not a local run's). Rows without per-request ``server_ops`` are not (unknown: old files)."""
    if not r:
        return False
    ops, lat = r.get("server_ops"), r.get("latency_ms") or []
    if not isinstance(ops, list) or not ops or len(ops) != len(lat) or any(o is None or o != 0 for o in ops):
        return False
    return not r.get("fallbacks") and not any(r.get("fallback_per_request") or ())


@dataclasses.dataclass(frozen=True)
class BestBaseline:
    """The baseline coinfer is judged against in one stream cell (``best_baseline``)."""

    policy: str
    """The baseline stream with the least ``key`` among the candidates (``UE_ONLY_RULE``)."""
    value: float
    """That stream's ``key`` (ms)."""
    as_local: tuple[str, ...]
    """Baseline streams left out as measurements of local (every request on the UE alone), in policy order."""


def best_baseline(cell: dict[str, dict], key: str = "mean_ms") -> BestBaseline | None:
    """The best baseline of a stream cell (policy -> row) by ``key`` (``mean_ms``, ``first_ms`` or
    ``last_ms``), by ``UE_ONLY_RULE``: candidates are local's stream and the other baselines except those
    that ran every request on the UE alone (``ue_only``), which count as local when local's stream is there.
    None when no baseline has a value."""
    base = {p: r for p, r in cell.items() if p != "coinfer" and r.get(key) is not None}
    if not base:
        return None
    has_local = "local" in base
    as_local = tuple(p for p in (*STREAM_POLICIES, *sorted(base)) if p in base and p != "local"
                     and ue_only(base[p]) and has_local)
    as_local = tuple(dict.fromkeys(as_local))
    cand = {p: r for p, r in base.items() if p not in as_local}
    best = min(cand, key=lambda p: cand[p][key])
    return BestBaseline(best, float(cand[best][key]), as_local)
BEST_TARGET = 0.9
"""coinfer / best baseline where a remote baseline beats local (issue 12)."""
COLD_TARGET = 0.6
"""Cold parallel / serial where the upload can hide behind the UE's compute (issue 12)."""
WARM_TARGET = 1.1
"""Warm coinfer / the best measured warm latency, the pre-deployed bound (issue 12)."""
PLAN_TARGET = 0.05
"""Planning inside a request: at most this fraction of the request's latency on a 10 % UE (issue 12)."""
FIXED_SPLITS = ("neurosurgeon-serial", "dads-serial")
"""Stream policies whose client plans no search (a fixed split: its decisions are reuse checks)."""
CFS_PERIOD_MS = 10.0
"""The UEs' CFS period when a run's meta does not say (``testbed.cgroups.DEFAULT_PERIOD_US``)."""
ACCURACY_TARGETS = {"warm": 0.10, "cold": 0.15}
"""Median |predicted - measured| / measured over the grid's warm and cold requests (issue 12)."""


SERIAL_BASELINES = ("neurosurgeon-serial", "dads-serial")
MIN_SEND_SAMPLE_BYTES = 1 << 20
"""Least weight bytes a request must have uploaded for its CPU to give the UE's send cost per byte."""


TLS_GOODPUT = 1448 / 1514 * 16384 / 16413
"""The most TLS payload a link carries per byte of its rate where its shaper counts Ethernet frames (the testbed's tc
tbf on a veth): a 1448-byte TCP segment (MSS with timestamps) is a 1514-byte frame (TCP 32 + IP 20 + Ethernet 14 bytes
of headers) and a TLS record carries 16384 bytes in 16413 (5 header + 24): 0.955, before TCP's slow start. Session 21
measured 363-387 Mbit/s of payload over whole uploads at 400 Mbit/s (408-414 from the first acknowledgement on)."""


def _warm_after_upload(r: dict) -> list[float]:
    """A stream's requests after its last upload that ran on its final split (ms)."""
    lat = r.get("latency_ms") or []
    up = r.get("uploaded_bytes_per_request") or [0] * len(lat)
    ops = r.get("server_ops") or []
    if not lat or not ops or not ops[-1]:
        return []
    last = max((i for i, b in enumerate(up) if b), default=-1)
    return [x for i, x in enumerate(lat) if i > last and i < len(ops) and ops[i] == ops[-1] and x is not None]


def _send_ms_per_byte(cell: dict[str, dict], cpu: float) -> float:
    """The UE's CPU budget per byte sent (ms / byte at its share ``cpu`` of a core) from the in-process request
    (coinfer's, IONN's) that uploaded the most bytes, at least ``MIN_SEND_SAMPLE_BYTES`` (the CPU noise of a
    request, ~1 ms, is the least part of it): its CPU above the least CPU of the same policy's requests on as
    many server ops without an upload (local's for a local request). 0 (a weaker bound that still holds)
    when no request measured it."""
    loc = [x for x in (cell.get("local", {}).get("cpu_ms_per_request") or []) if x is not None]
    best = None
    for p in ("coinfer", "ionn"):
        r = cell.get(p) or {}
        cpu_ms, up, ops = (r.get(k) or [] for k in ("cpu_ms_per_request", "uploaded_bytes_per_request", "server_ops"))
        for i, b in enumerate(up):
            if b < MIN_SEND_SAMPLE_BYTES or i >= len(cpu_ms) or i >= len(ops) or cpu_ms[i] is None:
                continue
            same = [cpu_ms[k] for k in range(min(len(cpu_ms), len(ops), len(up)))
                    if not up[k] and ops[k] == ops[i] and cpu_ms[k] is not None]
            base = min(same) if same else (min(loc) if not ops[i] and loc else None)
            if base is None:
                continue
            if best is None or b > best[0]:
                best = (b, max(0.0, cpu_ms[i] - base) / b / cpu)
    return best[1] if best else 0.0


def cell_bound(cell: dict[str, dict]) -> dict | None:
    """``partitioner.streambound.stream_bound`` of one stream cell from its rows: K = coinfer's requests;
    local = the local stream's mean; the target = the final split of the remote streams (weight bytes: what
    a serial baseline uploaded for it, else the most a stream uploaded; warm: the least mean over the
    streams of their requests after their last upload); the send cost per byte: ``_send_ms_per_byte``; the
    uplink and round trip of the cell; a warm request's UE compute counted 0. None when the cell lacks
    any of them. Keys: ``mean_ms``, ``first_remote``, ``prefetch_bytes``, ``per_request_ms`` and the inputs;
    ``goodput_mean_ms``: the same bound with the uplink at ``TLS_GOODPUT`` of its rate (what TLS payload the link
    can carry: still a bound of every strategy in the space, a tighter one)."""
    from partitioner.streambound import Target, stream_bound

    co, loc = cell.get("coinfer") or {}, cell.get("local") or {}
    k = len(co.get("latency_ms") or [])
    ell = loc.get("mean_ms")
    any_row = co or loc
    up, rtt, cpu = any_row.get("uplink_mbps"), any_row.get("rtt_ms"), any_row.get("ue_cpu")
    if not k or ell is None or not up or rtt is None or not cpu:
        return None
    groups: dict[int, list[dict]] = defaultdict(list)
    for p, r in cell.items():
        if p != "local" and r.get("server_ops") and r["server_ops"][-1] and r.get("uploaded_bytes"):
            groups[r["server_ops"][-1]].append((p, r))
    targets, names = [], []
    for ops, rs in sorted(groups.items()):
        warm = [statistics.fmean(w) for _, r in rs if (w := _warm_after_upload(r))]
        serial = [r["uploaded_bytes"] for p, r in rs if p in SERIAL_BASELINES]
        wb = min(serial) if serial else max(r["uploaded_bytes"] for _, r in rs)
        if warm:
            targets.append(Target(float(wb), min(warm)))
            names.append(ops)
    if not targets:
        return None
    c = _send_ms_per_byte(cell, cpu)
    b = stream_bound(k, float(ell), targets, float(up), float(rtt), c)
    g = stream_bound(k, float(ell), targets, float(up) * TLS_GOODPUT, float(rtt), c)
    t = None if b.target is None else targets[b.target]
    return {"mean_ms": b.mean_ms, "goodput_mean_ms": g.mean_ms, "total_ms": b.total_ms, "requests": k,
            "first_remote": b.first_remote,
            "prefetch_bytes": b.prefetch_bytes, "per_request_ms": list(b.per_request_ms), "local_ms": ell,
            "target_server_ops": None if b.target is None else names[b.target],
            "weight_bytes": None if t is None else t.weight_bytes, "warm_ms": None if t is None else t.warm_ms,
            "targets": [{"server_ops": n, "weight_bytes": x.weight_bytes, "warm_ms": x.warm_ms}
                        for n, x in zip(names, targets)],
            "send_ms_per_byte": c, "uplink_mbps": up, "rtt_ms": rtt}


def bound_table(rows: list[dict]) -> list[str]:
    """Per cell where a remote baseline beats local: the stream lower bound (``cell_bound``) beside coinfer."""
    cells = _cells(rows, "stream")
    body = []
    for k in sorted(cells):
        c = cells[k]
        goal = _goal(c)
        if goal is None:
            continue
        best, _ = goal
        b = cell_bound(c)
        if b is None:
            continue
        bm = c[best]["mean_ms"]
        co = c.get("coinfer", {}).get("mean_ms")
        plan = ("all local" if b["first_remote"] is None else
                f"local x{b['first_remote'] - 1}, {b['prefetch_bytes'] / 1e6:.1f} MB ahead, remote from "
                f"#{b['first_remote']}" if b["first_remote"] > 1 else "remote from #1")
        body.append([*_key_name(k), _f(b["local_ms"]), _f(b["warm_ms"]),
                     "n/a" if b["weight_bytes"] is None else f"{b['weight_bytes'] / 1e6:.1f}",
                     f"{b['send_ms_per_byte'] * 1e6:.2f}", plan, _f(b["mean_ms"]), HEAD[best], _f(bm),
                     f"{b['mean_ms'] / bm:.2f}", f"{b['goodput_mean_ms'] / bm:.2f}",
                     _r(None if co is None else co / bm)])
    if not body:
        return []
    return ["### Stream lower bound where a remote baseline beats local (`partitioner.streambound`)", "",
            "The least mean over the K requests of any strategy in auto's space (requests local while the "
            "target's weights go up in the background, then the target: cold once, warm after; the UE's CPU "
            "shared by its compute and its sending), from this cell's measured means: local, the target's "
            "warm latency (least mean of the remote streams after their last upload), its weight bytes, the "
            "UE's send CPU per byte (ms of its CPU budget per MB: from coinfer's or IONN's largest upload "
            "inside a request), the uplink and round trip. A bound of the means (not of one noisy run); IONN-style "
            "intermediate splits are outside its space. At TLS goodput: the same with the uplink at the TLS payload "
            f"it can carry ({TLS_GOODPUT:.3f} of its rate: TCP/IP/Ethernet and TLS record headers).", "",
            *_table(["model", "UE CPU", "uplink Mbps", "local", "warm", "weights MB", "send ms/MB",
                     "bound's strategy", "bound", "best baseline", "best", "bound / best",
                     "at TLS goodput / best", "coinfer / best"],
                    body), ""]


def _goal(c: dict[str, dict]) -> tuple[str, float] | None:
    """(best baseline, coinfer / best) where a remote baseline that ran on the server beats local; else None."""
    co = c.get("coinfer")
    bb = best_baseline(c)
    if co is None or co.get("mean_ms") is None or bb is None:
        return None
    base = {p: r for p, r in c.items() if p != "coinfer" and r.get("mean_ms") is not None}
    loc = c.get("local", {}).get("mean_ms")
    remote = [p for p in REMOTE_BASELINES if p in base and loc is not None and base[p]["mean_ms"] < loc
              and any(base[p].get("server_ops") or ())]  # ran on the server (not local by its own plan)
    return (bb.policy, co["mean_ms"] / bb.value) if remote else None


def _cell_name(k) -> str:
    model, cpu, up = k
    return f"{model} {cpu * 100:g} % {up:g} Mbps"


def _median_abs_error(pairs) -> float | None:
    errs = [abs(p / m - 1.0) for p, m in pairs if p is not None and m]
    return statistics.median(errs) if errs else None


def must_show(rows: list[dict], period_ms: float = CFS_PERIOD_MS) -> list[str]:
    """Issue 12's must-show verdicts, each per cell and from this run's rows alone:

    - coinfer vs the best baseline (the policy with the least mean latency of the cell, local included; a
      baseline that ran every request on the UE alone counts as local, ``UE_ONLY_RULE``, ``best_baseline``):
      the coinfer-vs-local rule (``compare_to_local``) against that policy's per-request latencies, per cell
      and family-wise (Holm-Bonferroni over the cells); the cells where a baseline counted as local are listed;
    - coinfer / best baseline <= ``BEST_TARGET`` in the cells where a remote baseline's mean beats local's
      (a baseline that ran ops on the server: one whose own plan kept every request local is local);
    - coinfer vs local beyond noise, family-wise (``local_summary``);
    - cold parallel / serial <= ``COLD_TARGET`` in the cells where the upload can hide behind local
      compute, which the simulator says: its predicted parallel / serial for that split is at most the target
      (the measured ratio of every cell is listed);
    - warm coinfer / the best measured warm latency <= ``WARM_TARGET``;
    - planner accuracy: median |pred / meas - 1| of coinfer's requests in the warm scenario and of the cold
      scenario's two uploads (both predicted by coinfer's simulator) against ``ACCURACY_TARGETS``, and of
      every remote policy's warm requests for reference.
    - planning inside a request (``plan_lines``; ``period_ms``: the UEs' CFS period).
    Tails are the ``tails_summary`` section. Empty when the rows have no stream cell."""
    cells = _cells(rows, "stream")
    if not cells and not _cells(rows, "warm") and not _cells(rows, "cold"):
        return []
    lines = []
    if cells:  # scenarios a, b (a warm-only run has none)
        tested, goal, as_local = {}, [], []
        for k in sorted(cells):
            c = cells[k]
            co = c.get("coinfer")
            bb = best_baseline(c)
            if co is None or co.get("mean_ms") is None or bb is None:
                continue
            base = {p: r for p, r in c.items() if p != "coinfer" and r.get("mean_ms") is not None}
            best = bb.policy
            if bb.as_local:
                as_local.append((k, bb))
            cmp = compare_to_local(co["latency_ms"], base[best]["latency_ms"])
            if cmp.verdict != TOO_FEW:
                tested[k] = (best, cmp)
            g = _goal(c)
            if g is not None:
                bound = cell_bound(c)
                goal.append((k, best, g[1], None if bound is None else bound["mean_ms"] / base[best]["mean_ms"],
                             None if bound is None else bound["goodput_mean_ms"] / base[best]["mean_ms"]))
        slower = [k for k, (_, c) in tested.items() if c.verdict == SLOWER]
        holm = holm_slower({k: c for k, (_, c) in tested.items()})
        lines.append(f"- coinfer slower than the best baseline beyond noise: {len(slower)} of {len(tested)} cells "
                     "per cell"
                     + (" (" + "; ".join(f"{_cell_name(k)}: {HEAD[tested[k][0]]} {_ci(tested[k][1])}" for k in slower)
                        + ")" if slower else "")
                     + f", {len(holm)} over all cells at once (Holm-Bonferroni, family-wise 5 %)"
                     + (": " + "; ".join(_cell_name(k) for k in holm) if holm else "")
                     + (" **met**" if not holm else " **not met**"))
        if as_local:
            # where the rule moved the verdict: a UE-only stream had the cell's least mean
            moved = [(k, bb) for k, bb in as_local if min(
                (p for p, r in cells[k].items() if p != "coinfer" and r.get("mean_ms") is not None),
                key=lambda p: cells[k][p]["mean_ms"]) in bb.as_local]
            lines.append(
                f"  - baseline streams that ran every request on the UE alone count as local, not as remote "
                f"baselines (`UE_ONLY_RULE`), in {len(as_local)} cells; in {len(moved)} of them such a stream had "
                "the cell's least mean, and coinfer is compared with local's stream (the one interleaved with "
                "coinfer's) instead"
                + (": " + "; ".join(
                    f"{_cell_name(k)}: " + ", ".join(f"{HEAD.get(p, p)} {_f(cells[k][p]['mean_ms'])}"
                                                     for p in bb.as_local)
                    + f" vs local {_f(cells[k].get('local', {}).get('mean_ms'))} (coinfer "
                    f"{_f(cells[k]['coinfer']['mean_ms'])}, {tested[k][1].verdict if k in tested else 'n/a'} of "
                    f"{HEAD.get(bb.policy, bb.policy)})" for k, bb in moved) if moved else "")
                + "".join("; in the others the best baseline is the same either way: " + "; ".join(
                    f"{_cell_name(k)} (" + ", ".join(HEAD.get(p, p) for p in bb.as_local) + ")"
                    for k, bb in as_local if (k, bb) not in moved) for _ in [0] if len(moved) < len(as_local)))
        if goal:
            met = [g for g in goal if g[2] <= BEST_TARGET]
            out = [g for g in goal if g[3] is not None and g[3] > BEST_TARGET]
            out_g = [g for g in goal if g[4] is not None and g[4] > BEST_TARGET]
            lines.append(f"- coinfer / best baseline <= {BEST_TARGET:g} where a remote baseline beats local: met in "
                         f"{len(met)} of {len(goal)} cells (" + "; ".join(
                             f"{_cell_name(k)}: {r:.2f} vs {HEAD[b]}{'' if r <= BEST_TARGET else ' not met'}"
                             + ("" if x is None else f", bound {x:.2f}" + (": unreachable" if x > BEST_TARGET else ""))
                             for k, b, r, x, _ in goal) + ")"
                         + (f"; the stream lower bound (below) is above {BEST_TARGET:g} in {len(out)} of them, "
                            f"in {len(out_g)} at the TLS goodput the link can carry"
                            if any(g[3] is not None for g in goal) else ""))
        else:
            lines.append(f"- coinfer / best baseline <= {BEST_TARGET:g} where a remote baseline beats local: no cell "
                         "where a remote baseline beats local")
        loc_tested = {k: cmp for k in sorted(cells) if (cmp := cell_comparison(cells[k])) and cmp.verdict != TOO_FEW}
        loc_holm = holm_slower(loc_tested)
        lines.append(f"- coinfer never slower than local beyond noise: slower in "
                     f"{sum(c.verdict == SLOWER for c in loc_tested.values())} of {len(loc_tested)} cells per cell, "
                     f"{len(loc_holm)} family-wise" + (" **met**" if not loc_holm else " **not met**"))
    cold = _cells(rows, "cold")
    hide, other = [], []
    for k in sorted(cold):
        c = cold[k]
        par, ser = c.get("coinfer-parallel", {}), c.get("serial-same-split", {})
        pp, ps = par.get("predicted_ms"), ser.get("predicted_ms")
        mp, ms = par.get("first_ms"), ser.get("first_ms")
        pred = pp / ps if pp and ps else None
        meas = mp / ms if mp is not None and ms else None
        lp, ls = par.get("latency_ms") or [], ser.get("latency_ms") or []
        rounds = [a / b for a, b in zip(lp, ls) if b] if len(lp) > 1 else []
        (hide if pred is not None and pred <= COLD_TARGET else other).append((k, pred, meas, rounds))
    if cold:
        if hide:
            ok = [h for h in hide if h[2] is not None and h[2] <= COLD_TARGET]
            lines.append(f"- cold parallel / serial <= {COLD_TARGET:g} where the upload can hide (simulator's "
                         f"parallel / serial <= {COLD_TARGET:g}): met in {len(ok)} of {len(hide)} cells ("
                         + "; ".join(
                             f"{_cell_name(k)}: {_r(m)} measured"
                             + (f" (means of {len(rd)} rounds; per round " + ", ".join(_r(x) for x in rd) + ")"
                                if rd else "")
                             + f", {_r(p)} predicted" for k, p, m, rd in hide) + ")")
        else:
            lines.append(f"- cold parallel / serial <= {COLD_TARGET:g} where the upload can hide: the simulator "
                         f"says it can hide that far in no cell of this grid (predicted parallel / serial above "
                         f"{COLD_TARGET:g} or no upload in all {len(cold)})")
        shown = [o for o in other if o[2] is not None]
        if shown:
            lines.append("  - the other cells, measured (predicted): " + "; ".join(
                f"{_cell_name(k)} {_r(m)} ({_r(p)})" for k, p, m, _ in shown))
    warm = _cells(rows, "warm")
    wr = []
    verdicts = {}
    for k in sorted(warm):
        c = warm[k]
        vals = {p: r["mean_ms"] for p, r in c.items() if r.get("mean_ms") is not None}
        if "coinfer" in vals:
            wr.append((k, vals["coinfer"] / min(vals.values())))
            cmp = warm_verdict(c["coinfer"])
            if cmp is not None and cmp.verdict != TOO_FEW:
                verdicts[k] = cmp
    if wr:
        bad = [w for w in wr if w[1] > WARM_TARGET]
        lines.append(f"- warm coinfer <= {WARM_TARGET:g}x the best measured (pre-deployed bound), medians: met in "
                     f"{len(wr) - len(bad)} of {len(wr)} cells" + (" (not met: " + "; ".join(
                         f"{_cell_name(k)} {r:.2f}" for k, r in bad) + ")" if bad else ""))
    if verdicts:
        above = [k for k, c in verdicts.items() if c.verdict == SLOWER]
        holm = holm_slower(verdicts)
        lines.append(f"- warm coinfer above {WARM_TARGET:g}x the bound beyond noise (means, `WARM_RULE`): "
                     f"{len(above)} of {len(verdicts)} cells per cell"
                     + (" (" + "; ".join(f"{_cell_name(k)} {_ci(verdicts[k])}" for k in above) + ")" if above else "")
                     + f", {len(holm)} family-wise (Holm-Bonferroni)"
                     + (": " + "; ".join(_cell_name(k) for k in holm) if holm else "")
                     + (" **met**" if not holm else " **not met**"))
    pairs: dict[str, list] = {"warm": [], "cold": [], "warm, every remote policy": []}
    for r in rows:
        if r.get("scenario") == "warm" and r.get("policy") != "local":
            got = list(zip(r.get("predicted_per_request_ms") or [], r.get("latency_ms") or []))
            pairs["warm, every remote policy"] += got
            if r.get("policy") == "coinfer":
                pairs["warm"] += got
        elif r.get("scenario") == "cold" and r.get("policy") in ("coinfer-parallel", "serial-same-split"):
            pairs["cold"].append((r.get("predicted_ms"), r.get("first_ms")))
    what = {"warm": "coinfer's warm requests", "cold": "the cold scenario's parallel and serial requests",
            "warm, every remote policy": "the warm scenario's NS, DADS and coinfer requests, for reference"}
    for kind in pairs:
        err = _median_abs_error(pairs[kind])
        if err is not None:
            n = sum(1 for p, m in pairs[kind] if p is not None and m)
            target = ACCURACY_TARGETS.get(kind)
            lines.append(f"- planner accuracy, median |pred / meas - 1| over {what[kind]} ({n}): {err:.0%}"
                         + ("" if target is None else f" against {target:.0%}"
                            + (" **met**" if err <= target else " **not met**")))
    lines += plan_lines(rows, period_ms)
    return ["### Issue 12's must-shows on this run (computed from the rows above and below)", "", *lines, ""]


def _plan_requests(row: dict) -> list[tuple[float, float, float, float]]:
    """(``plan_ms``, ``plan_cpu_ms``, ``plan_at_share_ms``, latency ms) of a stream row's requests that recorded
    a plan; ``plan_at_share_ms`` from ``plan_cpu_ms`` / min(1, the cell's UE CPU) where a run before session 16
    did not record it."""
    wall, cpu = row.get("plan_ms_per_request") or [], row.get("plan_cpu_ms_per_request") or []
    share = row.get("plan_at_share_ms_per_request") or [None] * len(wall)
    lat = row.get("latency_ms") or []
    ue = min(1.0, row.get("ue_cpu") or 1.0)
    out = []
    for w, c, a, x in zip(wall, cpu, share, lat, strict=False):
        if w is None or c is None or not x:
            continue
        out.append((w, c, c / ue if a is None else a, x))
    return out


def plan_lines(rows: list[dict], period_ms: float = CFS_PERIOD_MS) -> list[str]:
    """Issue 12's "planning inside a request <= 5 % of it on a 10 % UE", per UE CPU share of the stream cells,
    counted two ways: the wall ``plan_ms`` (the decision on the request's clock, as drawn) and the plan's cost at
    the UE's share (``plan_at_share_ms``: its CPU / the share); and the evidence that the wall's steps are the
    CFS throttle, not the decision: how many of the requests over 5 % waited (``plan_ms`` - ``plan_cpu_ms``)
    about one ``period_ms`` or more, and the fixed splits' (``FIXED_SPLITS``: no search) own count. Empty
    without stream rows that recorded ``plan_ms`` / ``plan_cpu_ms`` per request."""
    by_cpu: dict[float, dict[str, list]] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        if r.get("scenario") == "stream" and r.get("policy") != "local":
            got = _plan_requests(r)
            if got:
                by_cpu[r.get("ue_cpu") or 1.0][r["policy"]] += got
    lines = []
    for cpu in sorted(by_cpu):
        pols = by_cpu[cpu]
        order = [p for p in STREAM_POLICIES if p in pols] + sorted(p for p in pols if p not in STREAM_POLICIES)

        def over(p: str, i: int, pols=pols) -> int:
            return sum(q[i] > PLAN_TARGET * q[3] for q in pols[p])

        def counts(i: int, pols=pols, order=order) -> str:
            return ", ".join(f"{HEAD.get(p, p)} {over(p, i)} of {len(pols[p])}" for p in order)

        co = "coinfer" in pols
        lines.append(
            f"- planning inside a request <= {PLAN_TARGET:.0%} of its latency, UEs at {cpu * 100:g} % of a core "
            f"(stream requests): the wall `plan_ms` over {PLAN_TARGET:.0%} in {counts(0)}"
            + (" **met**" if co and over("coinfer", 0) == 0 else " **not met**" if co else "")
            + f"; the plan's cost at the UE's share (`plan_at_share_ms` = `plan_cpu_ms` / {min(1.0, cpu):g}) over "
            f"{PLAN_TARGET:.0%} in {counts(2)}"
            + (" **met**" if co and over("coinfer", 2) == 0 else " **not met**" if co else ""))
        high = [q for p in order for q in pols[p] if q[0] > PLAN_TARGET * q[3]]
        if high:
            waits = sorted(q[0] - q[1] for q in high)
            step = sum(w >= 0.5 * period_ms for w in waits)
            fixed = [q for p in FIXED_SPLITS if p in pols for q in pols[p]]
            fixed_over = [q for q in fixed if q[0] > PLAN_TARGET * q[3]]
            lines.append(
                f"  - the wall's steps: {step} of the {len(high)} requests over {PLAN_TARGET:.0%} waited at least half "
                f"a CFS period ({period_ms:g} ms) beyond the decision's CPU (their `plan_ms` - `plan_cpu_ms`: median "
                f"{statistics.median(waits):.1f} ms, {waits[0]:.1f}-{waits[-1]:.1f}): the quota ran out while it ran"
                + ("; the fixed splits (no search, a reuse check: "
                   + ", ".join(HEAD[p] for p in FIXED_SPLITS if p in pols)
                   + f") were over {PLAN_TARGET:.0%} in {len(fixed_over)} of {len(fixed)} with `plan_cpu_ms` median "
                   f"{statistics.median(q[1] for q in fixed):.2f} ms" if fixed else ""))
    return lines


def warm_progress_table(rows: list[dict]) -> list[str]:
    cells = _cells(rows, "stream")
    if not cells:
        return []
    head = ["model", "UE CPU", "uplink Mbps", *(HEAD[p] for p in STREAM_POLICIES)]
    body = []
    for k in sorted(cells):
        c = cells[k]
        row = _key_name(k)
        for p in STREAM_POLICIES:
            r = c.get(p)
            if r is None or r.get("mean_ms") is None:
                row.append("n/a")
            elif r.get("warm_after_request") is None:
                row.append(f"not in {r['requests']} (last {_f(r.get('last_ms'))} vs {_f(r.get('warm_ms'))})")
            else:
                row.append(f"{_f(r['time_to_warm_ms'])} (#{r['warm_after_request'] + 1})")
        body.append(row)
    return ["### a. Stream: time until warm, ms of stream until the first request within 10 % (+5 ms) of the "
            "policy's own warm latency (request #)", "", *_table(head, body)]


def cold_table(rows: list[dict]) -> list[str]:
    cells = _cells(rows, "cold")
    if not cells:
        return []
    head = ["model", "UE CPU", "uplink Mbps", "local", "serial upload (same split)", "coinfer parallel upload",
            "parallel / serial", "parallel / local", "predicted parallel / serial",
            "upload's UE CPU in the request / the probe's, ns/B"]
    body = []
    for k in sorted(cells):
        c = cells[k]
        loc = c.get("local", {}).get("first_ms")
        ser = c.get("serial-same-split", {}).get("first_ms")
        par_row = c.get("coinfer-parallel", {})
        par = par_row.get("first_ms")
        ps = c.get("serial-same-split", {}).get("predicted_ms")
        pp = par_row.get("predicted_ms")
        note = par_row.get("note")
        body.append([*_key_name(k), _f(loc), _f(ser), _f(par) if par is not None else f"n/a ({note})",
                     _r(par / ser if par is not None and ser else None),
                     _r(par / loc if par is not None and loc else None),
                     _r(pp / ps if pp is not None and ps else None),
                     f"{_r(par_row.get('send_cpu_ns_per_byte'))} / {_r(par_row.get('probe_send_cpu_ns_per_byte'))}"
                     if par_row.get("send_cpu_ns_per_byte") is not None else "n/a"])
    return ["### b. Cold single request: parallel vs serial upload of the same partition (MJOA-MU), vs local (ms)",
            "", *_table(head, body)]


WARM_RULE = (
    f"warm coinfer vs the pre-deployed bound: the policies' warm requests run interleaved (rounds; in each "
    f"every policy in turn opens its client on the tenant that holds the whole model, makes one unrecorded "
    f"warm-up request and its share of the recorded ones, and closes it; the order rotates each round). The "
    f"bound is the other policy (local, NS or DADS) with the least mean. coinfer is above {WARM_TARGET:g}x the "
    f"bound beyond noise when the one-sided Welch test of mean(coinfer) = {WARM_TARGET:g} x mean(bound) rejects "
    f"at 5 % in coinfer's disfavour (the coinfer-vs-local rule with the bound's latencies scaled by "
    f"{WARM_TARGET:g}), family-wise over the cells by Holm-Bonferroni; the interval is the 90 % Fieller interval "
    f"of the ratio of means. The bound is the least of three means, so it is biased low (against coinfer).")


def warm_verdict(row: dict | None) -> Comparison | None:
    """The coinfer warm row's stored comparison against ``WARM_TARGET`` x its bound (``vs_best``), or None."""
    stored = (row or {}).get("vs_best")
    if not isinstance(stored, dict):
        return None
    try:
        return Comparison(**stored)
    except TypeError:
        return None


def _warm_word(c: Comparison | None) -> str:
    if c is None or c.ratio is None:
        return "n/a"
    if c.verdict == TOO_FEW:
        return TOO_FEW
    if c.ratio <= c.rho0:
        return f"within {c.rho0:g}x"
    return f"above {c.rho0:g}x " + ("beyond noise" if c.verdict == SLOWER else "within noise")


def warm_table(rows: list[dict]) -> list[str]:
    cells = _cells(rows, "warm")
    if not cells:
        return []
    head = ["model", "UE CPU", "uplink Mbps", *WARM_POLICIES, "best measured", "coinfer / best",
            "n per policy", "coinfer / bound, means [90 % CI]", "verdict"]
    body = []
    for k in sorted(cells):
        c = cells[k]
        vals = {p: c[p]["mean_ms"] if p in c else None for p in WARM_POLICIES}
        ok = {p: v for p, v in vals.items() if v is not None}
        best = min(ok.values()) if ok else None
        row = _key_name(k) + [_f(vals[p]) + (f" ({vals[p] / best:.2f}x)" if vals[p] and best else "")
                              for p in WARM_POLICIES]
        row += [_f(best), _r(vals["coinfer"] / best if vals.get("coinfer") and best else None)]
        co = c.get("coinfer")
        cmp = warm_verdict(co)
        ns = sorted({r.get("requests") for r in c.values() if r.get("requests") is not None})
        row += ["/".join(str(n) for n in ns) or "n/a",
                (_ci(cmp) + f" vs {WARM_HEAD.get(co.get('best_other_policy'), co.get('best_other_policy'))}"
                 if cmp is not None and co else "n/a"), _warm_word(cmp)]
        body.append(row)
    return ["### c. Warm: median latency with the whole model on the server (ms; x = over the best measured)", "",
            *_table(head, body), "", f"- rule: {WARM_RULE}", ""]


def accuracy_table(rows: list[dict]) -> list[str]:
    """Section d: per scenario and policy, the reported prediction against the request's latency (the whole call;
    since session 18 the prediction is the call's, ``RequestReport.call_predicted_ms``), and, where the rows carry
    them, the plan's own prediction of its run against the run's measured time (``run_predicted_ms_per_request``
    vs ``measured_ms_per_request``): the second shows the plan's forecast of its run alone, without the call's
    time around it. Since session 19 every term of the call's prediction is a forecast from earlier calls (session
    18's added the call's own measured time before its run)."""
    pairs: dict[str, list[tuple[float, float]]] = defaultdict(list)
    runs: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for r in rows:
        if r.get("scenario") in ("stream", "warm", "multi_ue"):
            k = f"{r['scenario']}:{r['policy']}"
            preds = r.get("predicted_per_request_ms") or []
            for p, m in zip(preds, r.get("latency_ms") or []):
                if p is not None and m:
                    pairs[k].append((p, m))
            for p, m in zip(r.get("run_predicted_ms_per_request") or [], r.get("measured_ms_per_request") or []):
                if p is not None and m:
                    runs[k].append((p, m))
        elif r.get("scenario") == "cold" and r.get("predicted_ms") and r.get("first_ms"):
            pairs[f"cold:{r['policy']}"].append((r["predicted_ms"], r["first_ms"]))
    if not pairs:
        return []
    head = ["scenario:policy", "n", "median abs error", "median signed error (pred/meas - 1)", "within 25 %",
            "the plan's own: its run vs measured_ms (n)"]
    body = []
    for k in sorted(pairs):
        errs = [p / m - 1 for p, m in pairs[k]]
        own = [abs(p / m - 1) for p, m in runs.get(k, ())]
        body.append([k, str(len(errs)), f"{statistics.median(abs(e) for e in errs):.0%}",
                     f"{statistics.median(errs):+.0%}", f"{sum(abs(e) <= 0.25 for e in errs) / len(errs):.0%}",
                     f"{statistics.median(own):.0%} ({len(own)})" if own else "n/a"])
    return ["### d. Planner accuracy: predicted (the client's, as reported: the whole call's since session 18) vs "
            "measured (the call's latency) per request", "", *_table(head, body)]


def multi_table(rows: list[dict]) -> list[str]:
    by_n: dict[int, list[dict]] = defaultdict(list)
    for r in rows:
        if r.get("scenario") == "multi_ue":
            by_n[r["n_ues"]].append(r)
    if not by_n:
        return []
    head = ["N UEs", "per-UE mean latency ms (model, uplink, CPU)", "mean over UEs", "server throughput req/s"]
    body = []
    for n in sorted(by_n):
        rs = sorted(by_n[n], key=lambda r: r["ue"])
        per = "; ".join(f"{_f(r['mean_ms'])} ({r['model']}, {r['uplink_mbps']:g}, {r['ue_cpu'] * 100:g} %)"
                        for r in rs)
        means = [r["mean_ms"] for r in rs if r["mean_ms"] is not None]
        body.append([str(n), per, _f(sum(means) / len(means) if means else None),
                     _r(rs[0].get("server_throughput_rps"))])
    return ["### e. Multi-UE: heterogeneous UEs on one edge server (coinfer, all streams at once)", "",
            "Throughput = requests / wall; the wall starts when every UE has built its stream's client, connected "
            "and joined (all released together) and ends with the last request: serving only, no UE's start-up "
            "(up to session 11 it began before the clients were built: `wall_with_startup_s` in results.json).",
            "", *_table(head, body)]


def quantile(xs, q: float) -> float | None:
    """The ``q`` quantile (0..1) of ``xs`` (None values dropped) by linear interpolation between order
    statistics (numpy's default, Hyndman & Fan type 7); None when empty. With K requests a cell's p95 and
    p99 lie between its two slowest requests: they say how bad the tail is, not how often it happens."""
    v = sorted(x for x in xs if x is not None)
    if not v:
        return None
    h = (len(v) - 1) * q
    lo = math.floor(h)
    return v[lo] + (v[min(lo + 1, len(v) - 1)] - v[lo]) * (h - lo)


def _mean_tail(r: dict | None) -> str:
    """``mean / p95 / p99`` of one row (p95/p99 computed from ``latency_ms`` when the row predates them)."""
    if r is None or r.get("mean_ms") is None:
        return "n/a"
    lat = r.get("latency_ms") or []
    p95 = r.get("p95_ms", quantile(lat, 0.95))
    p99 = r.get("p99_ms", quantile(lat, 0.99))
    return f"{_f(r['mean_ms'])} / {_f(p95)} / {_f(p99)}"


def tail_table(rows: list[dict]) -> list[str]:
    """Per cell and policy: mean, p95 and p99 of the stream's per-request latencies (ms)."""
    cells = _cells(rows, "stream")
    if not cells:
        return []
    head = ["model", "UE CPU", "uplink Mbps", *(HEAD[p] for p in STREAM_POLICIES)]
    body = [_key_name(k) + [_mean_tail(cells[k].get(p)) for p in STREAM_POLICIES] for k in sorted(cells)]
    return ["### a. Stream: mean / p95 / p99 of the per-request latencies (ms; linear interpolation between "
            "order statistics: with K requests p95 and p99 lie between the two slowest)", "", *_table(head, body)]


TAIL_FACTOR = 3.0
"""A warm remote request slower than this many times its own prediction is a tail stall."""


def _at(r: dict, key: str, i: int):
    v = r.get(key)
    return v[i] if isinstance(v, list) and i < len(v) else None


def warm_remote_requests(rows: list[dict]):
    """Every warm remote request of the stream, warm and multi-UE scenarios: ``(row, i)`` for the requests
    that ran ops on the server and put no weight bytes on the uplink (nothing uploaded before or while it
    ran, no fallback). Rows that predate the per-request lists count by their policy (not local)."""
    for r in rows:
        if r.get("scenario") not in ("stream", "warm", "multi_ue") or r.get("policy") == "local":
            continue
        for i, lat in enumerate(r.get("latency_ms") or []):
            ops = _at(r, "server_ops", i)
            if lat is None or ops == 0 or _at(r, "fallback_per_request", i):
                continue
            if (_at(r, "uploaded_bytes_per_request", i) or 0) > 0 or (_at(r, "upload_ms_per_request", i) or 0) > 0:
                continue
            if "uploaded_bytes_per_request" not in r and r.get("scenario") in ("stream", "multi_ue") and i == 0:
                continue  # an old row: its first request uploaded
            yield r, i


def tail_cause(r: dict, i: int) -> str:
    """Where a slow request's time went, from its recorded diagnostics: the server's timings, the UE's
    compute, TCP losses/retransmits in either namespace and the delay relay's stalls."""
    lat = r["latency_ms"][i]
    st = _at(r, "server_timings_per_request", i)
    ue = _at(r, "ue_compute_ms_per_request", i)
    tcp = _at(r, "tcp_per_request", i)
    relay = _at(r, "relay_stalls_per_request", i) or []
    parts = []
    if "server_timings_per_request" not in r:
        return "not recorded (results from before per-request diagnostics)"
    if st is None:
        parts.append("no server timings (no answer from the server)")
    else:
        parts.append(f"server {_f(st.get('total_ms'))} ms (queue {_f(st.get('queue_ms'))}, compute "
                     f"{_f(st.get('compute_ms'))}, input wait {_f(st.get('input_wait_ms'))}, weight wait "
                     f"{_f(st.get('weight_wait_ms'))})")
        if st.get("validation_ms"):  # measured by the server (rows since session 8)
            parts.append(f"slice validation {_f(st['validation_ms'])} ms before it (not in the server's total)")
    if ue is not None:
        parts.append(f"UE compute {_f(ue)} ms")
    if st is not None and ue is not None:
        parts.append(f"unaccounted {_f(lat - ue - (st.get('total_ms') or 0))} ms")
    moved = {ns: d for ns, d in (tcp or {}).items() if d}
    if moved:
        parts.append("TCP " + "; ".join(f"{ns}: " + ", ".join(f"{k} {v}" for k, v in d.items())
                                        for ns, d in moved.items()))
    elif tcp is not None:
        parts.append("no TCP loss or retransmit")
    if relay:
        parts.append("relay " + ", ".join(f"{d} {kind} {ms:.0f} ms" for _, d, kind, ms, _q in relay))
    if _at(r, "new_slice_per_request", i) and (st is None or "validation_ms" not in st):
        parts.append("first request on a new slice (the server validated it first: not in its timings)")
    load = _at(r, "load1_per_request", i)
    if load is not None:
        parts.append(f"machine load {load:.1f}")
    return "; ".join(parts)


def tails_summary(rows: list[dict], factor: float = TAIL_FACTOR) -> list[str]:
    """The tails line: warm remote requests above ``factor`` x their prediction (count, which, cause)."""
    total, slow = 0, []
    for r, i in warm_remote_requests(rows):
        pred = _at(r, "predicted_per_request_ms", i)
        if pred is None:
            continue
        total += 1
        if r["latency_ms"][i] > factor * pred:
            slow.append((r, i, pred))
    if not total:
        return []
    lines = [f"- warm remote requests above {factor:g}x their prediction: {len(slow)} of {total}"]
    for r, i, pred in slow:
        where = " ".join(_key_name((r["model"], r["ue_cpu"], r["uplink_mbps"])))
        who = f"{r['scenario']} {where} Mbps {HEAD.get(r['policy'], r['policy'])}" + (
            f" (UE {r['ue']} of {r['n_ues']})" if r.get("scenario") == "multi_ue" else "")
        lines.append(f"  - {who} request #{i + 1}: {_f(r['latency_ms'][i])} ms vs predicted {_f(pred)} ms; "
                     + tail_cause(r, i))
    return ["### Tails", "", *lines, ""]


def unavailable(rows: list[dict]) -> list[str]:
    notes = sorted({f"{r['policy']}: {r.get('unavailable') or r.get('error')}" for r in rows
                    if r.get("unavailable") or r.get("error")})
    return (["### Not available / errors", "", *(f"- {n}" for n in notes), ""]) if notes else []


def _connect_note(rows: list[dict]) -> str:
    if any(r.get("untimed_reconnect_ms") for r in rows):  # results of the bench's former IONN worker
        return (" IONN caveat: the client cannot learn what another connection uploaded except by reconnecting, "
                "so the IONN worker reconnects before every request; that time is not in its latency while its "
                "background upload goes on (IONN rows are optimistic; the per-row `untimed_reconnect_ms` in "
                "results.json says by how much).")
    if any(r.get("connect_ms") for r in rows):
        return (" Remote policies open their connection before the stream starts, untimed (per-row `connect_ms` "
                "in results.json).")
    return ""


def _status(meta: dict) -> str:
    if meta.get("complete"):
        return ""
    if meta.get("interrupted"):
        return f" (partial: interrupted by {meta['interrupted']}; not every scenario ran)"
    return " (partial: still running, or stopped without a record, e.g. killed)"


def _pairing_note(meta: dict) -> str:
    """How the run's streams were scheduled (``BenchConfig.pairing``; runs before session 12: ``paired``)."""
    cfg = meta.get("config") or {}
    mode = cfg.get("pairing") or ("none" if cfg.get("paired") is False else "coinfer")
    if mode == "all":
        return ("every policy's stream runs interleaved with a local stream, one request of each in turn (which "
                "goes first alternates): coinfer's with the cell's local stream, every other policy's with a local "
                "stream of its own, so every stream meets the same conditions and drift as a local one")
    if mode == "coinfer":
        return ("local and coinfer run interleaved (one request of each in turn, which goes first alternates: "
                "one drift of the shared machine for both); the other policies' streams run alone, one after another")
    return "every stream runs alone, one after another"


def write_markdown(rows: list[dict], meta: dict, path: Path) -> None:
    m = meta.get("machine") or {}
    cpu = m.get("cpu_model") or m.get("cpu") or m.get("processor") or ""
    lines = [
        "## Results", "",
        f"- command: `{meta.get('command')}`",
        f"- commit {meta.get('commit')}, {meta.get('date')}, elapsed {meta.get('elapsed_s')} s" + _status(meta),
        *([f"- {meta['rerendered']} (the tables and verdicts of this version of `testbed.bench.report`)"]
          if meta.get("rerendered") else []),
        *([f"- failures: {'; '.join(meta['failures'])}"] if meta.get("failures") else []),
        f"- testbed: {meta.get('mode_description', meta.get('mode'))}",
        f"- machine: {cpu}, {m.get('logical_cores', '?')} logical cores, {m.get('memory_total_mb', 0) / 1024:.0f} GiB, "
        f"host {m.get('hostname', '?')}; torch {meta.get('torch', '?')}, python {meta.get('python', '?')}",
        "- policies: " + _pairing_note(meta) + "; "
        "NS+serial = Neurosurgeon split, all its server weights uploaded first (timed "
        "UploadWeights), then the request; DADS+serial = the same with the DADS min-cut; IONN = best warm "
        "split among suffixes the server already holds, weights uploaded in the background by gain per byte; "
        "coinfer = mjoa + parallel upload + progressive offloading. Every stream starts on a cold server "
        "(a fresh tenant). Latencies in ms, measured by the UE." + _connect_note(rows),
        "",
        *must_show(rows, (meta.get("config") or {}).get("cpu_period_ms") or CFS_PERIOD_MS),
        *bound_table(rows),
        *local_summary(rows),
        *stream_table(rows, "mean_ms", "a. Stream: mean latency over the stream (ms)"),
        *paired_table(rows),
        *tail_table(rows),
        *tails_summary(rows),
        *stream_table(rows, "first_ms", "a. Stream: first (cold) request (ms)"),
        *stream_table(rows, "last_ms", "a. Stream: last request of the stream (ms)"),
        *warm_progress_table(rows),
        *cold_table(rows),
        *warm_table(rows),
        *accuracy_table(rows),
        *multi_table(rows),
        *unavailable(rows),
    ]
    plots = meta.get("plots") or []
    if plots:
        lines += ["### Plots", "", *(f"![{Path(p).stem}]({Path(p).name})" for p in plots), ""]
    path.write_text("\n".join(lines))


def rerender(src: Path, out: Path | None = None) -> Path:
    """Write ``results.md`` again from a bench run's stored ``results.json`` and ``meta.json`` in ``src`` with
    this version of the tables and verdicts, into ``out`` (default: ``src`` itself; created if missing; the
    meta's command and commit stay the run's, a line says when and from where it was re-rendered). Returns
    the path written. Raises FileNotFoundError / ValueError (bad JSON) for a directory that is not a run's."""
    import datetime
    import json

    src = Path(src)
    rows = json.loads((src / "results.json").read_text())
    meta = json.loads((src / "meta.json").read_text())
    dest = Path(out) if out is not None else src
    if dest.resolve() != src.resolve():
        dest.mkdir(parents=True, exist_ok=True)
        now = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
        meta = {**meta, "plots": [], "rerendered": f"re-rendered {now} from the rows of `{src}` by "
                                                   f"`coinfer-testbed report --from {src} --out {dest}`"}
    path = dest / "results.md"
    write_markdown(rows, meta, path)
    return path


def main(argv: list[str] | None = None) -> int:
    """``python -m testbed.bench.report DIR [--out OUT]``: write results.md again from DIR/results.json and
    DIR/meta.json (a bench's own outputs) with this version of the tables, in DIR or in OUT."""
    import sys

    args = sys.argv[1:] if argv is None else list(argv)
    out = None
    if "--out" in args:
        i = args.index("--out")
        if i + 1 >= len(args):
            args = []
        else:
            out = Path(args[i + 1])
            args = args[:i] + args[i + 2:]
    if len(args) != 1:
        print("usage: python -m testbed.bench.report RESULTS_DIR [--out DIR]", file=sys.stderr)
        return 2
    rerender(Path(args[0]), out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
