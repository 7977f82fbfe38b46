"""coinfer vs local beyond noise: the rule (``compare_to_local``), its place in results.json and in the report."""

from __future__ import annotations

import json
import math
import random
import statistics
from pathlib import Path

import pytest
from scipy import stats

from testbed.bench.report import (
    FASTER,
    SLOWER,
    TOO_FEW,
    WITHIN,
    Comparison,
    compare_to_local,
    write_markdown,
)
from testbed.bench.suite import stream_rows

LOCAL = [601.0, 605.0, 598.0, 700.0, 602.0, 603.0, 599.0, 604.0]


def test_clearly_slower() -> None:
    co = [x + 100.0 for x in LOCAL]
    c = compare_to_local(co, LOCAL)
    assert c.verdict == SLOWER
    assert c.ratio == pytest.approx(sum(co) / sum(LOCAL))
    assert 1.0 < c.ci_low < c.ratio < c.ci_high
    assert c.p_value < 0.05 and (c.n_coinfer, c.n_local) == (8, 8)


def test_clearly_faster() -> None:
    co = [100.0, 110.0, 95.0, 105.0, 120.0, 98.0, 101.0, 99.0]
    c = compare_to_local(co, LOCAL)
    assert c.verdict == FASTER
    assert c.ci_low < c.ratio < c.ci_high < 1.0 and c.p_value < 0.05


def test_identical_distribution_is_within_noise() -> None:
    c = compare_to_local(LOCAL, LOCAL)
    assert c.verdict == WITHIN and c.ratio == pytest.approx(1.0) and c.p_value == pytest.approx(0.5)
    assert c.ci_low < 1.0 < c.ci_high
    # Same distribution, different draws (CFS-like quantized latencies): two one-sided 5 % tests call about
    # 10 % of the pairs different, and never more often than that by much.
    rng = random.Random(1234)
    draw = lambda: [rng.choice((200.0, 205.0, 210.0, 285.0)) + rng.gauss(0, 2) for _ in range(8)]
    verdicts = [compare_to_local(draw(), draw()).verdict for _ in range(400)]
    assert 0.03 <= sum(v != WITHIN for v in verdicts) / len(verdicts) <= 0.17
    assert sum(v == SLOWER for v in verdicts) > 0 and sum(v == FASTER for v in verdicts) > 0


def test_one_slow_cold_request_counts_but_is_noise() -> None:
    """The first request is part of the stream: it moves the ratio; one outlier alone is not beyond noise."""
    co = [1800.0, 600.0, 601.0, 599.0, 600.0, 602.0, 598.0, 600.0]
    c = compare_to_local(co, LOCAL)
    assert c.ratio == pytest.approx((sum(co) / 8) / (sum(LOCAL) / 8)) and c.ratio > 1.2
    assert c.verdict == WITHIN


@pytest.mark.parametrize(("co", "lo"), [([], LOCAL), ([700.0, 710.0], LOCAL), (LOCAL, [600.0, 601.0]), ([], [])])
def test_tiny_n_gives_no_verdict(co: list[float], lo: list[float]) -> None:
    c = compare_to_local(co, lo)
    assert c.verdict == TOO_FEW and c.p_value is None and c.ci_low is None and c.ci_high is None
    assert (c.n_coinfer, c.n_local) == (len(co), len(lo))
    assert (c.ratio is None) == (not co or not lo)


def test_no_spread_at_all() -> None:
    assert compare_to_local([700.0] * 4, [600.0] * 4).verdict == SLOWER
    assert compare_to_local([600.0] * 4, [600.0] * 4).verdict == WITHIN


def test_p_value_is_welchs_and_interval_agrees_with_the_test() -> None:
    rng = random.Random(7)
    for _ in range(200):
        n1, n2 = rng.randint(3, 10), rng.randint(3, 10)
        shift = rng.choice((0.0, 30.0, -30.0, 150.0))
        co = [rng.lognormvariate(6.0, 0.3) + shift for _ in range(n1)]
        lo = [rng.lognormvariate(6.0, 0.3) for _ in range(n2)]
        c = compare_to_local(co, lo)
        side = "greater" if c.ratio > 1 else "less"
        assert c.p_value == pytest.approx(stats.ttest_ind(co, lo, equal_var=False, alternative=side).pvalue)
        assert (c.verdict == SLOWER) == (c.ci_low > 1.0)
        assert (c.verdict == FASTER) == (c.ci_high < 1.0)
        assert c.ci_low <= c.ratio <= c.ci_high


def _hand_written_welch(co: list[float], lo: list[float], alpha: float = 0.05):
    """The formulas report.py used before it called scipy.stats.ttest_ind: (p, ci_low, ci_high)."""
    nc, nl = len(co), len(lo)
    mc, ml = sum(co) / nc, sum(lo) / nl
    vc, vl = statistics.variance(co) / nc, statistics.variance(lo) / nl
    se2 = vc + vl
    df = se2 * se2 / (vc * vc / (nc - 1) + vl * vl / (nl - 1))
    p = float(stats.t.sf(abs((mc - ml) / math.sqrt(se2)), df))
    q = float(stats.t.ppf(1.0 - alpha, df))
    a = ml * ml - q * q * vl
    root = q * math.sqrt(ml * ml * vc + mc * mc * vl - q * q * vc * vl)
    return p, max(0.0, (mc * ml - root) / a), (mc * ml + root) / a


def test_scipy_welch_gives_the_same_results_as_the_formulas_it_replaced() -> None:
    rng = random.Random(11)
    for _ in range(200):
        n1, n2 = rng.randint(3, 12), rng.randint(3, 12)
        shift = rng.choice((0.0, 20.0, -20.0, 200.0))
        co = [rng.lognormvariate(6.0, 0.4) + shift for _ in range(n1)]
        lo = [rng.lognormvariate(6.0, 0.4) for _ in range(n2)]
        c = compare_to_local(co, lo)
        p, ci_low, ci_high = _hand_written_welch(co, lo)
        assert c.p_value == pytest.approx(p, rel=1e-9, abs=1e-15)
        assert (c.ci_low, c.ci_high) == pytest.approx((ci_low, ci_high), rel=1e-12)


def _rows(co: list[float], lo: list[float], up: float) -> list[dict]:
    req = lambda ms: {"latency_ms": ms, "predicted_ms": ms, "server_ops": 0, "fallback": False, "uploaded_bytes": 0}
    res = {"streams": {"local": {"requests": [req(x) for x in lo]}, "coinfer": {"requests": [req(x) for x in co]}},
           "warm": {}}
    return stream_rows(res, "torchvision:resnet18", 0.1, up, 20.0, len(co))


def _grid() -> list[dict]:
    return (_rows([x + 100.0 for x in LOCAL], LOCAL, 20.0) + _rows(LOCAL, LOCAL, 100.0)
            + _rows([x / 3 for x in LOCAL], LOCAL, 400.0) + _rows([700.0, 710.0], [600.0, 601.0], 50.0))


def test_stream_rows_store_vs_local_as_json() -> None:
    rows = _grid()
    co = {r["uplink_mbps"]: r for r in rows if r["scenario"] == "stream" and r["policy"] == "coinfer"}
    assert {up: r["vs_local"]["verdict"] for up, r in co.items()} == {20.0: SLOWER, 100.0: WITHIN, 400.0: FASTER,
                                                                      50.0: TOO_FEW}
    assert co[20.0]["vs_local"]["ratio"] == pytest.approx(co[20.0]["coinfer_over_local_mean"])
    assert all("vs_local" not in r for r in rows if r["policy"] != "coinfer")
    assert json.loads(json.dumps(rows, allow_nan=False)) == rows
    assert Comparison(**co[20.0]["vs_local"]) == compare_to_local(co[20.0]["latency_ms"], LOCAL)


def _mean_table(text: str, by: int | slice = 2) -> dict:
    """The mean-latency table's rows by uplink (or by ``by`` columns), each as {header: cell}."""
    table = text.split("mean latency over the stream")[1].split("###")[0]
    lines = [[c.strip() for c in x.split("|")[1:-1]] for x in table.splitlines() if x.startswith("|")]
    head, body = lines[0], lines[2:]
    return {(tuple(row[by]) if isinstance(by, slice) else row[by]): dict(zip(head, row)) for row in body}


@pytest.mark.parametrize("old_file", [False, True], ids=["with-vs_local", "old-results-json"])
def test_report_verdicts_and_summary(tmp_path: Path, old_file: bool) -> None:
    rows = _grid()
    if old_file:  # results.json written before vs_local existed: the report computes it from the latencies
        rows = [{k: v for k, v in r.items() if k != "vs_local"} for r in rows]
    md = tmp_path / "results.md"
    write_markdown(rows, {"complete": True}, md)
    text = md.read_text()
    table = _mean_table(text)
    assert {up: r["coinfer vs local"] for up, r in table.items()} == {"20": SLOWER, "50": TOO_FEW, "100": WITHIN,
                                                                      "400": FASTER}
    c = compare_to_local([x + 100.0 for x in LOCAL], LOCAL)
    assert table["20"]["coinfer / local [90 % CI]"] == f"{c.ratio:.2f} [{c.ci_low:.2f}, {c.ci_high:.2f}]"
    assert table["50"]["p (one-sided)"] == "n/a"
    summary = text.split("### a. Stream: coinfer vs local")[1].split("###")[0]
    assert "coinfer slower than local beyond noise in 1 of 3 cells: resnet18 10 % 20 Mbps" in summary
    assert "coinfer faster than local beyond noise in 1 of 3 cells: resnet18 10 % 400 Mbps" in summary
    assert "within noise in 1 of 3 cells" in summary and "no verdict in 1 cells" in summary
    assert text.index("coinfer vs local") < text.index("mean latency over the stream")


def test_report_on_the_checked_in_results(tmp_path: Path) -> None:
    """Old results.json files (no vs_local) still give a verdict in every cell that has local and coinfer."""
    for name in ("quick", "full"):
        d = Path(__file__).resolve().parents[1] / "docs" / "results" / name
        if not (d / "results.json").exists():
            continue
        rows = json.loads((d / "results.json").read_text())
        meta = json.loads((d / "meta.json").read_text())
        write_markdown(rows, meta, tmp_path / f"{name}.md")  # not under docs/: the bench owns those
        table = _mean_table((tmp_path / f"{name}.md").read_text(), by=slice(0, 3))
        assert table and all(r["coinfer vs local"] in (SLOWER, FASTER, WITHIN) for r in table.values())


def test_partial_labels(tmp_path: Path) -> None:
    md = tmp_path / "r.md"
    rows = _grid()
    for meta, want in (({"complete": True}, None),
                       ({"complete": False, "interrupted": "KeyboardInterrupt"}, "(partial: interrupted by "
                                                                                 "KeyboardInterrupt"),
                       ({"complete": False}, "(partial: still running, or stopped without a record"),
                       ({"complete": True, "failures": ["stream x: boom"]}, "- failures: stream x: boom")):
        write_markdown(rows, meta, md)
        text = md.read_text()
        if want is None:
            assert "partial" not in text and "failures" not in text
        else:
            assert want in text


def test_ionn_caveat_only_for_results_that_need_it(tmp_path: Path) -> None:
    md = tmp_path / "r.md"
    rows = _grid()
    write_markdown(rows, {"complete": True}, md)
    assert "IONN caveat" not in md.read_text() and "`connect_ms`" not in md.read_text()
    write_markdown([*rows, {"scenario": "x", "policy": "ionn", "untimed_reconnect_ms": 40.0}], {"complete": True}, md)
    assert "IONN caveat" in md.read_text()
    write_markdown([*rows, {"scenario": "x", "policy": "ionn", "connect_ms": 40.0}], {"complete": True}, md)
    assert "IONN caveat" not in md.read_text() and "untimed (per-row `connect_ms`" in md.read_text()


def test_holm_keeps_the_family_wise_error():
    from testbed.bench.report import Comparison, holm_slower

    def c(p: float, ratio: float = 1.1) -> Comparison:
        return Comparison(ratio, None, None, p, "x", 8, 8)

    cells = {i: c(0.5) for i in range(22)}
    cells["a"] = c(0.031)  # significant alone at 5 %, not among 24 tests
    cells["b"] = c(0.04, ratio=0.9)  # faster: never counted as slower
    assert holm_slower(cells) == []
    cells["c"] = c(0.0001)
    assert holm_slower(cells) == ["c"]
    assert holm_slower({"a": c(0.031)}) == ["a"]  # one test: Holm is the plain test


def test_must_show_verdicts_per_cell() -> None:
    """Issue 12's verdicts from rows alone: coinfer vs the best baseline (per cell and family-wise), the 0.9x
    target only where a remote baseline beats local, cold parallel / serial only where the simulator says
    the upload hides, warm against the pre-deployed bound, planner accuracy against 10 % / 15 %."""
    from testbed.bench.report import must_show

    def stream(model, up, policy, lat):
        return {"scenario": "stream", "model": model, "ue_cpu": 0.1, "uplink_mbps": up, "policy": policy,
                "latency_ms": lat, "mean_ms": statistics.fmean(lat)}

    slow = [x + 300.0 for x in LOCAL]
    rows = [stream("a", 100.0, "local", LOCAL), stream("a", 100.0, "coinfer", slow),          # slower than local
            stream("a", 100.0, "neurosurgeon-serial", [x * 2 for x in LOCAL]),
            stream("b", 400.0, "local", LOCAL), {**stream("b", 400.0, "dads-serial", [x / 2 for x in LOCAL]),
                                                 "server_ops": [5] * 8},
            # a "remote" baseline whose plan stayed local does not make a remote cell, however fast it ran
            stream("c", 100.0, "local", LOCAL), {**stream("c", 100.0, "ionn", [x - 5 for x in LOCAL]),
                                                 "server_ops": [0] * 8}, stream("c", 100.0, "coinfer", LOCAL),
            stream("b", 400.0, "coinfer", [x / 2.5 for x in LOCAL])]                        # 0.8 of DADS
    rows += [{"scenario": "cold", "model": "b", "ue_cpu": 0.1, "uplink_mbps": 400.0, "policy": p, "first_ms": m,
              "predicted_ms": pr} for p, m, pr in (("coinfer-parallel", 500.0, 400.0),
                                                   ("serial-same-split", 1000.0, 1000.0))]
    rows += [{"scenario": "warm", "model": "b", "ue_cpu": 0.1, "uplink_mbps": 400.0, "policy": p, "mean_ms": m,
              "latency_ms": [m, m, m], "predicted_per_request_ms": [pr] * 3}
             for p, m, pr in (("local", 500.0, None), ("dads", 100.0, 95.0), ("coinfer", 120.0, 100.0))]
    text = "\n".join(must_show(rows))
    assert "slower than the best baseline beyond noise: 1 of 3 cells per cell (a 10 % 100 Mbps: local" in text
    assert ", 1 over all cells at once" in text and "a 10 % 100 Mbps **not met**" in text
    # only cell b has a remote baseline ahead of local: 0.80 vs DADS+serial, met
    assert "met in 1 of 1 cells (b 10 % 400 Mbps: 0.80 vs DADS+serial)" in text
    assert "never slower than local beyond noise: slower in 1 of 3 cells per cell, 1 family-wise **not met**" in text
    # predicted parallel / serial 0.40: the upload hides; measured 0.50 -> met
    assert "cold parallel / serial <= 0.6 where the upload can hide" in text and "met in 1 of 1 cells (b 10 % 400 " \
        "Mbps: 0.50 measured, 0.40 predicted)" in text
    assert "warm coinfer <= 1.1x the best measured (pre-deployed bound), medians: met in 0 of 1 cells (not met: " \
        "b 10 % 400 Mbps 1.20)" in text
    # coinfer's warm: |100/120 - 1| = 17 %; every policy: x3 5 % (DADS) and x3 17 % -> 11 %; cold: 20 % and 0 %
    assert "over coinfer's warm requests (3): 17% against 10% **not met**" in text
    assert "over the cold scenario's parallel and serial requests (2): 10% against 15% **met**" in text
    assert "NS, DADS and coinfer requests, for reference (6): 11%\n" in text + "\n"
    assert must_show([]) == []


def test_rerender_from_a_runs_outputs(tmp_path: Path) -> None:
    """``python -m testbed.bench.report DIR`` writes results.md again from the run's results.json and meta.json."""
    from testbed.bench.report import main

    rows = [{"scenario": "stream", "model": "m", "ue_cpu": 0.1, "uplink_mbps": 100.0, "policy": p, "latency_ms": lat,
             "mean_ms": statistics.fmean(lat), "first_ms": lat[0], "last_ms": lat[-1], "requests": len(lat)}
            for p, lat in (("local", LOCAL), ("coinfer", LOCAL))]
    (tmp_path / "results.json").write_text(json.dumps(rows))
    (tmp_path / "meta.json").write_text(json.dumps({"command": "coinfer-testbed bench --quick", "commit": "abc"}))
    assert main([str(tmp_path)]) == 0
    text = (tmp_path / "results.md").read_text()
    assert "commit abc" in text and "Issue 12's must-shows" in text and "| m | 10 % | 100 |" in text
    assert main([]) == 2 and main([str(tmp_path), "--out"]) == 2
    # into another directory (the stored run stays as it was), also through the CLI
    assert main([str(tmp_path), "--out", str(tmp_path / "again")]) == 0
    again = (tmp_path / "again" / "results.md").read_text()
    assert "commit abc" in again and "re-rendered" in again and f"from the rows of `{tmp_path}`" in again
    assert (tmp_path / "results.md").read_text() == text
    from testbed.cli import main as cli

    assert cli(["report", "--from", str(tmp_path), "--out", str(tmp_path / "cli")]) == 0
    assert "| m | 10 % | 100 |" in (tmp_path / "cli" / "results.md").read_text()
    assert cli(["report", "--from", str(tmp_path / "nothing")]) != 0


def test_cell_bound_from_rows() -> None:
    """The stream bound of a cell from its rows: local's mean, the remote streams' final split (bytes from the
    serial baseline, warm = least mean after the last upload), the send CPU per byte from coinfer's largest
    in-request upload; the 0.9x verdict names it."""
    from partitioner.streambound import Target, stream_bound
    from testbed.bench.report import bound_table, cell_bound, must_show

    def row(policy, lat, **kw):
        return {"scenario": "stream", "model": "m", "ue_cpu": 0.1, "uplink_mbps": 400.0, "rtt_ms": 20.0,
                "policy": policy, "latency_ms": lat, "mean_ms": statistics.fmean(lat), **kw}

    W = 40_000_000
    rows = [row("local", [300.0] * 8, cpu_ms_per_request=[30.0] * 8, server_ops=[0] * 8),
            row("neurosurgeon-serial", [1000.0] + [80.0] * 7, server_ops=[50] * 8, uploaded_bytes=W,
                uploaded_bytes_per_request=[W] + [0] * 7, cpu_ms_per_request=[4.0] * 8),
            # coinfer: 40 MB inside its first request for 30 ms of CPU above its warm requests' 3 ms
            row("coinfer", [950.0] + [70.0, 75.0] * 3 + [70.0], server_ops=[50] * 8, uploaded_bytes=W,
                uploaded_bytes_per_request=[W] + [0] * 7, cpu_ms_per_request=[33.0] + [3.0] * 7)]
    cell = {r["policy"]: r for r in rows}
    b = cell_bound(cell)
    c = 30.0 / W / 0.1
    assert b["send_ms_per_byte"] == pytest.approx(c)
    assert b["warm_ms"] == pytest.approx(statistics.fmean([70.0, 75.0] * 3 + [70.0]))  # coinfer's, the least
    want = stream_bound(8, 300.0, [Target(W, b["warm_ms"])], 400.0, 20.0, c)
    assert b["mean_ms"] == pytest.approx(want.mean_ms) and b["first_remote"] == want.first_remote
    # at the TLS payload the link carries (0.955 of 400 Mbit/s): a tighter bound, the same inputs
    from testbed.bench.report import TLS_GOODPUT

    assert abs(TLS_GOODPUT - 0.955) < 5e-4
    tight = stream_bound(8, 300.0, [Target(W, b["warm_ms"])], 400.0 * TLS_GOODPUT, 20.0, c)
    assert b["goodput_mean_ms"] == pytest.approx(tight.mean_ms) and tight.mean_ms > want.mean_ms
    best = statistics.fmean([1000.0] + [80.0] * 7)
    text = "\n".join(must_show(rows))
    assert f"bound {b['mean_ms'] / best:.2f}" in text
    assert ("unreachable" in text) == (b["mean_ms"] / best > 0.9)
    n_g = int(tight.mean_ms / best > 0.9)
    assert f"in {n_g} at the TLS goodput the link can carry" in text
    line = next(line for line in bound_table(rows) if "| m | 10 % | 400 |" in line)
    assert f"| {b['mean_ms'] / best:.2f} | {tight.mean_ms / best:.2f} |" in line
    # without what it needs (no uploads recorded), no bound and no table
    bare = [{k: v for k, v in r.items() if k != "uploaded_bytes"} for r in rows]
    assert cell_bound({r["policy"]: r for r in bare}) is None and bound_table(bare) == []


def test_cell_bound_on_session8_grid() -> None:
    """Session 8's full grid: a bound in each of the six cells where a remote baseline beat local, every one at
    most 0.9x the best baseline (0.9x reachable in the model; resnet18 10 % / 400 by 0.005)."""
    from testbed.bench.report import _cells, _goal, cell_bound

    d = Path(__file__).resolve().parents[1] / "docs" / "results" / "full" / "session8" / "results.json"
    if not d.exists():
        pytest.skip("no session 8 results")
    cells = _cells(json.loads(d.read_text()), "stream")
    got = {}
    for k, c in cells.items():
        g = _goal(c)
        if g is not None:
            b = cell_bound(c)
            got[k] = b["mean_ms"] / c[g[0]]["mean_ms"]
    assert len(got) == 6 and all(0.6 < x <= 0.9 for x in got.values())
    assert 0.89 < got[("resnet18", 0.1, 400.0)] <= 0.9


def test_ratio_test_against_a_target_ratio() -> None:
    """``rho0`` moves what the test is against: coinfer 1.2x the other with a tight spread is above 1.1x
    beyond noise; 1.05x is not above 1.1x (and its verdict says below, beyond noise); the p-value is Welch's
    on coinfer against the other's latencies scaled by rho0; the interval does not depend on rho0."""
    other = [100.0, 102.0, 98.0, 101.0, 99.0, 100.0, 103.0, 97.0, 100.0]
    above = [1.2 * x for x in other]
    c = compare_to_local(above, other, rho0=1.1)
    assert c.verdict == SLOWER and c.rho0 == 1.1 and c.ratio == pytest.approx(1.2)
    want = stats.ttest_ind(above, [1.1 * x for x in other], equal_var=False, alternative="greater").pvalue
    assert c.p_value == pytest.approx(want)
    plain = compare_to_local(above, other)
    assert (c.ci_low, c.ci_high) == (plain.ci_low, plain.ci_high) and c.ci_low > 1.1
    near = compare_to_local([1.05 * x for x in other], other, rho0=1.1)
    assert near.ratio == pytest.approx(1.05) and near.verdict == FASTER
    # 1.15x with a wide spread: above the target, but within noise
    noisy = compare_to_local([1.15 * x + d for x, d in zip(other, (60, -60, 50, -50, 0, 40, -40, 30, -30))],
                             other, rho0=1.1)
    assert noisy.ratio > 1.1 and noisy.verdict == WITHIN
    with pytest.raises(ValueError):
        compare_to_local(above, other, rho0=0.0)


def test_holm_tests_against_each_comparisons_target() -> None:
    """A 1.05x cell tested against 1.1x is never counted above it, however small its p-value."""
    from testbed.bench.report import holm_slower

    low = Comparison(1.05, 1.0, 1.1, 1e-9, FASTER, 9, 9, rho0=1.1)
    high = Comparison(1.3, 1.2, 1.4, 1e-9, SLOWER, 9, 9, rho0=1.1)
    assert holm_slower({"a": low, "b": high}) == ["b"]


def test_warm_rows_verdict_and_table(tmp_path: Path) -> None:
    """Scenario c's coinfer row carries its comparison against 1.1x the best other policy's mean; the report's
    warm table prints it with its interval and the must-shows count it family-wise."""
    from testbed.bench.report import must_show, warm_table

    def req(ms: float, ops: int = 5) -> dict:
        return {"latency_ms": ms, "predicted_ms": ms, "server_ops": ops, "fallback": False, "round": 0}

    other = [100.0, 102.0, 98.0, 101.0, 99.0, 100.0, 103.0, 97.0, 100.0]
    res = {"streams": {}, "warm": {"local": {"requests": [req(3 * x, 0) for x in other]},
                                   "dads": {"requests": [req(x) for x in other]},
                                   "neurosurgeon": {"requests": [req(x + 20) for x in other]},
                                   "coinfer": {"requests": [req(1.3 * x) for x in other]}}}
    rows = stream_rows(res, "torchvision:m", 0.1, 400.0, 20.0, 8)
    co = next(r for r in rows if r["scenario"] == "warm" and r["policy"] == "coinfer")
    assert co["best_other_policy"] == "dads" and co["vs_best"]["verdict"] == SLOWER
    assert co["vs_best"]["rho0"] == pytest.approx(1.1) and co["ratio_median_to_best_other"] == pytest.approx(1.3)
    assert co["round_per_request"] == [0] * 9 and co["avg_ms"] == pytest.approx(1.3 * statistics.fmean(other))
    json.dumps(rows)  # results.json
    table = "\n".join(warm_table(rows))
    assert "above 1.1x beyond noise" in table and "vs DADS" in table and "| 9 |" in table
    text = "\n".join(must_show(rows))
    assert "above 1.1x the bound beyond noise (means, `WARM_RULE`): 1 of 1 cells per cell" in text
    assert "1 family-wise (Holm-Bonferroni): m 10 % 400 Mbps **not met**" in text
    # within 1.1x: met
    res["warm"]["coinfer"] = {"requests": [req(1.02 * x) for x in other]}
    rows = stream_rows(res, "torchvision:m", 0.1, 400.0, 20.0, 8)
    assert "within 1.1x" in "\n".join(warm_table(rows))
    assert "0 family-wise (Holm-Bonferroni) **met**" in "\n".join(must_show(rows))


def _stream_row(policy: str, lat: list[float], ops: int | list[int] | None = None, **kw) -> dict:
    return {"scenario": "stream", "model": "m", "ue_cpu": 0.25, "uplink_mbps": 100.0, "policy": policy,
            "latency_ms": lat, "mean_ms": statistics.fmean(lat), "first_ms": lat[0], "last_ms": lat[-1],
            "requests": len(lat), **({} if ops is None else {"server_ops": ops if isinstance(ops, list)
                                                              else [ops] * len(lat)}), **kw}


def test_a_ue_only_baseline_is_local_in_the_best_baseline_verdict(tmp_path: Path) -> None:
    """Session 11's mobilenet_v2 25 % / 100 in miniature: IONN ran all 8 requests on the UE (server ops 0) in its
    own time window, 15 % below local's paired stream; coinfer equals local. Before the rule coinfer was
    'slower than the best baseline beyond noise' (vs IONN); now IONN counts as local, the verdict is within
    noise and the report names the stream it counted as local."""
    from testbed.bench.report import best_baseline, must_show

    fast_local = [x * 0.85 for x in LOCAL]
    rows = [_stream_row("local", LOCAL, 0), _stream_row("coinfer", LOCAL, 0),
            _stream_row("neurosurgeon-serial", [x * 3 for x in LOCAL], 40),
            _stream_row("ionn", fast_local, 0, fallbacks=0)]
    cell = {r["policy"]: r for r in rows}
    bb = best_baseline(cell)
    assert (bb.policy, bb.value, bb.as_local) == ("local", statistics.fmean(LOCAL), ("ionn",))
    assert compare_to_local(LOCAL, fast_local).verdict == SLOWER  # what the old rule called it
    text = "\n".join(must_show(rows))
    assert "slower than the best baseline beyond noise: 0 of 1 cells per cell, 0 over all cells at once" in text
    assert "count as local, not as remote baselines (`UE_ONLY_RULE`), in 1 cells; in 1 of them" in text
    assert "m 25 % 100 Mbps: IONN 522 vs local 614 (coinfer 614, within noise of local)" in text
    assert "the others" not in text
    write_markdown(rows, {"complete": True}, tmp_path / "r.md")
    row = _mean_table((tmp_path / "r.md").read_text())["100"]
    assert row["IONN"].endswith("(UE only)") and row["best baseline"] == "local"
    assert row["coinfer / best baseline"] == "1.00"
    assert "(UE only): the baseline ran every request on the UE alone" in (tmp_path / "r.md").read_text()


def test_which_baselines_count_as_local() -> None:
    """Only a stream whose every request ran on the UE with no fallback is local; one request on the server, a
    fallback (it waited for the server first) or rows without per-request server ops keep it a baseline; a
    cell without local's stream keeps the UE-only stream as its local measurement."""
    from testbed.bench.report import best_baseline, ue_only

    fast = [x * 0.8 for x in LOCAL]
    assert ue_only(_stream_row("ionn", fast, 0))
    assert not ue_only(_stream_row("ionn", fast, [0] * 7 + [30]))
    assert not ue_only(_stream_row("ionn", fast, 0, fallbacks=1))
    assert not ue_only(_stream_row("ionn", fast, 0, fallback_per_request=[False] * 7 + [True]))
    assert not ue_only(_stream_row("ionn", fast))  # old rows: unknown
    assert not ue_only(_stream_row("ionn", fast, [0] * 7))  # not one per request
    loc, co = _stream_row("local", LOCAL, 0), _stream_row("coinfer", LOCAL, 0)
    assert best_baseline({"local": loc, "coinfer": co, "ionn": _stream_row("ionn", fast, [0] * 7 + [30])}).policy \
        == "ionn"
    both = {"local": loc, "coinfer": co, "ionn": _stream_row("ionn", fast, 0),
            "dads-serial": _stream_row("dads-serial", [x * 0.9 for x in LOCAL], 0)}
    bb = best_baseline(both)
    assert bb.policy == "local" and bb.as_local == ("dads-serial", "ionn")
    alone = best_baseline({"coinfer": co, "ionn": _stream_row("ionn", fast, 0)})
    assert alone.policy == "ionn" and alone.as_local == ()
    assert best_baseline({"coinfer": co}) is None


def test_paired_table_and_the_header_say_how_streams_ran(tmp_path: Path) -> None:
    """Rows with each policy's own paired local get the ratio table; the header names the run's pairing (old
    runs: coinfer only)."""
    from testbed.bench.report import paired_table

    rows = [_stream_row("local", LOCAL, 0), _stream_row("coinfer", LOCAL, 0, paired_local_mean_ms=614.0),
            _stream_row("ionn", [x / 2 for x in LOCAL], 10, paired_local_mean_ms=600.0)]
    text = "\n".join(paired_table(rows))
    assert "| m | 25 % | 100 | n/a | n/a | 0.51 (307 / 600) | 1.00 (614 / 614) | 600-614 |" in text
    assert paired_table(rows[:2]) == []  # coinfer's pair alone (runs before session 12): no table
    write_markdown(rows, {"complete": True, "config": {"pairing": "all"}}, tmp_path / "a.md")
    assert "with a local stream of its own" in (tmp_path / "a.md").read_text()
    write_markdown(rows[:2], {"complete": True, "config": {"paired": True}}, tmp_path / "b.md")
    b = (tmp_path / "b.md").read_text()
    assert "the other policies' streams run alone" in b and "over the local stream interleaved" not in b


def test_plan_lines_count_the_wall_and_the_share_and_show_the_throttle() -> None:
    """Issue 12's planning line from stream rows (``suite.stream_rows`` of worker records): the wall ``plan_ms``
    over 5 % of the request's latency and the plan's cost at the UE's share (``plan_at_share_ms``) counted
    apart per UE CPU share, the requests over 5 % that waited about a CFS period beyond their CPU, and the fixed
    splits' own count; rows of runs before ``plan_at_share_ms`` get it from ``plan_cpu_ms`` / the cell's CPU."""
    from testbed.bench.report import must_show, plan_lines

    def req(lat, wall, cpu, at=None):
        return {"latency_ms": lat, "predicted_ms": lat, "server_ops": 5, "fallback": False, "uploaded_bytes": 0,
                "plan_ms": wall, "plan_cpu_ms": cpu, **({} if at is None else {"plan_at_share_ms": at})}

    res = {"streams": {
        # 100 ms requests on a 10 % UE: 5 ms is the 5 % line
        "coinfer": {"requests": [req(100.0, 9.9, 0.3, 3.0), req(100.0, 0.2, 0.2, 2.0), req(100.0, 0.6, 0.6, 6.0),
                                 req(100.0, 19.8, 0.3, 3.0)]},
        "neurosurgeon-serial": {"requests": [req(100.0, 9.6, 0.1), req(100.0, 0.1, 0.1)]},  # at share: 1 ms
        "local": {"requests": [req(100.0, 0.0, 0.0)] * 2}}, "warm": {}}
    rows = stream_rows(res, "torchvision:m", 0.1, 400.0, 20.0, 4)
    co = next(r for r in rows if r["policy"] == "coinfer")
    assert co["plan_at_share_ms_per_request"] == [3.0, 2.0, 6.0, 3.0]
    assert co["plan_cpu_ms_per_request"] == [0.3, 0.2, 0.6, 0.3]
    text = "\n".join(plan_lines(rows))
    assert "UEs at 10 % of a core (stream requests): the wall `plan_ms` over 5% in NS+serial 1 of 2, coinfer 2 of 4 " \
           "**not met**" in text
    assert "over 5% in NS+serial 0 of 2, coinfer 1 of 4 **not met**" in text  # 6.0 ms at the share
    # the three over 5 % on the wall waited 9.5, 9.6 and 19.5 ms beyond their CPU: all about a period or more
    assert "3 of the 3 requests over 5% waited at least half a CFS period (10 ms)" in text
    assert "median 9.6 ms, 9.5-19.5" in text
    assert "the fixed splits (no search, a reuse check: NS+serial) were over 5% in 1 of 2" in text
    assert "plan_lines" not in text and text in "\n".join(must_show(rows))
    # a run that met it at the share (and a full-CPU cell, counted apart)
    res["streams"]["coinfer"]["requests"][2] = req(100.0, 0.4, 0.4, 4.0)
    rows = stream_rows(res, "torchvision:m", 0.1, 400.0, 20.0, 4)
    rows += stream_rows({"streams": {"coinfer": {"requests": [req(50.0, 0.1, 0.1)]}}, "warm": {}},
                        "torchvision:m", 1.0, 400.0, 20.0, 1)
    lines = plan_lines(rows)
    assert "coinfer 0 of 4 **met**" in lines[0] and lines[0].startswith("- planning inside a request <= 5% of its "
                                                                        "latency, UEs at 10 %")
    assert "UEs at 100 % of a core" in lines[-1] and "coinfer 0 of 1 **met**; the plan's cost at the UE's share " \
        "(`plan_at_share_ms` = `plan_cpu_ms` / 1) over 5% in coinfer 0 of 1 **met**" in lines[-1]
    assert plan_lines([{k: v for k, v in r.items() if not k.startswith("plan_")} for r in rows]) == []


def test_worker_plan_at_share_takes_the_specs_quota_where_the_client_read_none() -> None:
    """A netns UE does not see its cgroup's quota (``ip netns exec`` remounts /sys): its client reports share 1,
    and the worker's record takes the spec's ``cpu``; a client that read a quota keeps its own."""
    from types import SimpleNamespace

    from testbed.bench.worker import plan_at_share

    blind = SimpleNamespace(cpu_share=1.0, plan_cpu_ms=0.3, plan_at_share_ms=0.3)
    assert plan_at_share(blind, 0.1) == {"cpu_share": 0.1, "plan_at_share_ms": pytest.approx(3.0)}
    assert plan_at_share(blind, None) == {"cpu_share": 1.0, "plan_at_share_ms": 0.3}
    seen = SimpleNamespace(cpu_share=0.25, plan_cpu_ms=0.3, plan_at_share_ms=1.2)
    assert plan_at_share(seen, 0.1) == {"cpu_share": 0.25, "plan_at_share_ms": pytest.approx(1.2)}
    assert plan_at_share(SimpleNamespace(plan_ms=1.0), 0.1) == {"cpu_share": None, "plan_at_share_ms": None}
