"""The robust scenario's variants (issue 13, part A: a mean-optimal offload with a heavy tail) and the
transport spread robust hedges against: the variant files parse, the two-state link schedule reaches the
link's shaper (a recording stand-in for ``NetnsTestbed.shape``: no root), the scaled deadline rule, the
transport residual's spread in the cost model and in robust's plan. The run itself is
``coinfer-testbed run robust --variant tail`` (README)."""

from __future__ import annotations

import dataclasses
import statistics
import threading
import time

import pytest

from partitioner import Link
from partitioner.costgraph import CostGraph, OpCost
from partitioner.prep import prepare
from partitioner.robust import latency_moments
from partitioner.simulate import Rates
from partitioner.state import ServerState, Shares


# ---- variants -------------------------------------------------------------------------------------------
def test_bundled_variants_parse_and_tail_is_a_two_state_link_with_offloading_small_enough_for_no_rate_sample():
    from profiler.link import MIN_RATE_SAMPLE_BYTES
    from testbed.robust import DEFAULT_VARIANT, RobustScenario, load_variant, variants
    from testbed.scenarios import bundled

    assert {"throttled", "tail"} <= set(variants()) and DEFAULT_VARIANT in variants()
    assert not {"throttled", "tail"} & set(bundled())  # not listed (nor loaded) as multi-UE scenarios
    assert load_variant("throttled") == RobustScenario()  # the defaults, spelled as a file
    tail = load_variant("tail")
    assert tail.name == "tail" and not tail.ue_bursts and tail.nominal_uplink and tail.seed_transport
    fast, slow = tail.rates_mbps
    long, short = tail.hold_means()
    assert fast >= 20 * slow and long >= 3 * short  # usually fast, sometimes very slow, for short spells
    assert tail.deadline_scale > 1 and tail.calib >= 1 / (1 - tail.deadline_quantile)
    dims = [int(x) for x in tail.input_shape.split(",")]
    assert 4 * dims[0] * dims[1] * dims[2] * dims[3] < MIN_RATE_SAMPLE_BYTES  # float32 input: no rate sample
    # the period fits the lowest emulated frequency level (the kernel's least quota is 1 ms)
    assert tail.cpu * 0.6 / 2.2 * tail.period_ms >= 1.0


def test_load_variant_refuses_bad_files(tmp_path):
    from testbed.robust import load_variant
    from testbed.scenarios import ScenarioError

    def write(text: str):
        p = tmp_path / "v.toml"
        p.write_text(text)
        return p

    assert load_variant(write('name = "x"\n[robust]\ncpu = 0.2\nrates_mbps = [10, 1]\n')).cpu == 0.2
    for text, match in (
        ("[robust]\nbogus = 1\n", "robust.bogus"),
        ("[robust]\ncpu = 'a'\n", "robust.cpu"),
        ("[robust]\nrates_mbps = [10, 1]\nholds_s = [1]\n", "one hold"),
        ("[robust]\nue_bursts = 1\n", "robust.ue_bursts"),
        ("[robust]\nrequests = 1.5\n", "integer"),
        ("other = 1\n", "top-level"),
        ("[robust]\neps = [0.5, 1.5]\n", "eps"),
        ("[robust]\nrates_mbps = [10, -1]\n", "rates_mbps"),
    ):
        with pytest.raises(ScenarioError, match=match):
            load_variant(write(text))
    with pytest.raises(ScenarioError, match=r"bundled: .*tail"):
        load_variant("no-such-variant")


def test_testbed_run_robust_names_an_unknown_variant(capsys):
    from testbed.cli import main

    assert main(["run", "robust", "--variant", "no-such-variant"]) == 2
    assert "no-such-variant" in capsys.readouterr().err


# ---- the link schedule -------------------------------------------------------------------------------------
class _Net:
    """Stands in for ``NetnsTestbed``: records every ``shape`` call (the one the schedule makes to tc)."""

    def __init__(self, fail_first: int = 0):
        self.calls: list[tuple] = []
        self.fail_first = fail_first
        self.lock = threading.Lock()

    def shape(self, link, up, down, rtt):
        with self.lock:
            if self.fail_first > 0:
                self.fail_first -= 1
                raise RuntimeError("tc failed")
            self.calls.append((link, up, down, rtt))


def test_link_schedule_alternates_the_rates_through_the_shaper_with_each_rates_hold():
    from testbed.robust import LinkSchedule

    link = dataclasses.make_dataclass("L", ["downlink_mbps", "rtt_ms"])(None, 10.0)
    net = _Net()
    sched = LinkSchedule(net, link, (40.0, 0.6), (0.04, 0.01), seed=1)
    sched.start()
    time.sleep(0.5)
    sched.stop()
    rates = [c[1] for c in net.calls]
    assert len(rates) >= 6 and rates == [(0.6, 40.0)[k % 2] for k in range(len(rates))]
    assert all(c[0] is link and c[2] is None and c[3] == 10.0 for c in net.calls)
    assert [r for _, r in sched.changes] == rates
    t1, r1 = sched.changes[0]
    assert sched.rate_at(t1 - 1e-3) == 40.0 and sched.rate_at(t1) == r1 == 0.6
    spent = sched.time_at()
    assert set(spent) == {"40", "0.6"} and spent["40"] > 2 * spent["0.6"] > 0  # holds of 4:1 on average
    assert sum(spent.values()) == pytest.approx(time.time() - sched.started, abs=0.05)
    with pytest.raises(ValueError, match="one mean hold per rate"):
        LinkSchedule(net, link, (40.0, 0.6), (1.0,), seed=1)


def test_link_schedule_keeps_its_state_when_the_shaper_fails():
    from testbed.robust import LinkSchedule

    link = dataclasses.make_dataclass("L", ["downlink_mbps", "rtt_ms"])(5.0, 0.0)
    net = _Net(fail_first=1)
    sched = LinkSchedule(net, link, (40.0, 0.6), 0.01, seed=2)
    sched.start()
    deadline = time.monotonic() + 30  # three changes at 10 ms each; a loaded machine may take longer
    while len(net.calls) < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    sched.stop()
    rates = [c[1] for c in net.calls]
    assert rates[0] == 0.6 and rates[:3] == [0.6, 40.0, 0.6], rates  # the failed change to 0.6 was tried again


def test_analysis_counts_requests_and_misses_that_started_in_the_slowest_rate():
    from testbed.robust import analyse

    def req(ms: float, rate: float) -> dict:
        return {"measured_ms": ms, "ue_compute_ms": 0.0, "uplink_at_start_mbps": rate, "server_ops": 1}

    a = analyse({"mjoa": [req(900.0, 0.6), req(100.0, 40.0), req(120.0, 0.6)], "local": [req(500.0, 40.0)]}, 600.0)
    assert a["mjoa"]["started_at_slowest"] == 2 and a["mjoa"]["misses_started_at_slowest"] == 1
    assert a["local"]["started_at_slowest"] == 0 and a["mjoa"]["slowest_uplink_mbps"] == 0.6
    assert "started_at_slowest" not in analyse({"local": [req(500.0, 40.0)]}, 600.0)["local"]  # one rate only


def test_link_schedule_holds_the_first_rate_while_paused(tmp_path):
    """While the driver's pause file exists (a client connecting) the link is put back to its first rate and
    stays there; the schedule resumes when the file goes."""
    from testbed.robust import LinkSchedule

    link = dataclasses.make_dataclass("L", ["downlink_mbps", "rtt_ms"])(None, 0.0)
    net, pause = _Net(), tmp_path / "hold"
    sched = LinkSchedule(net, link, (40.0, 0.6), (0.02, 0.06), seed=3, pause_path=pause)
    sched.start()
    try:
        deadline = time.monotonic() + 5.0
        while not (net.calls and net.calls[-1][1] == 0.6) and time.monotonic() < deadline:
            time.sleep(0.002)  # wait until the link is in its slow state
        pause.touch()
        time.sleep(0.2)
        held = len(net.calls)
        assert net.calls[-1][1] == 40.0  # put back at once, not after the slow hold
        time.sleep(0.3)
        assert len(net.calls) == held  # and held there
        pause.unlink()
        time.sleep(0.3)
        assert len(net.calls) > held
    finally:
        sched.stop()


def _tc_rate_bits(text: str) -> float:
    """The first ``rate`` of ``tc qdisc show`` output, bit/s (tc's decimal units)."""
    import re

    m = re.search(r"rate (\d+(?:\.\d+)?)([KMG]?)bit", text)
    assert m, text
    return float(m.group(1)) * {"": 1, "K": 1e3, "M": 1e6, "G": 1e9}[m.group(2)]


def test_link_schedule_reshapes_the_ue_links_tbf(tmp_path):
    """The schedule's changes reach tc: the UE's tbf rate (as tc shows it) follows the schedule, in a real
    namespace pair (skipped where namespaces + tc are not usable, e.g. without root)."""
    import subprocess

    from testbed.netns import L2_PER_GOODPUT, NetnsTestbed, detect_mode
    from testbed.robust import LinkSchedule

    mode = detect_mode()
    if mode.network != "netns+tc":
        pytest.skip(f"network namespaces + tc not usable here: {mode.describe()}")
    with NetnsTestbed() as tb:
        ue = tb.add_ue(uplink_mbps=40.0)
        pause = tmp_path / "hold"

        def shown() -> float:
            out = subprocess.run(
                ["tc", "-n", ue.netns, "qdisc", "show", "dev", ue.ue_if], capture_output=True, text=True, check=True
            ).stdout
            return _tc_rate_bits(out) / L2_PER_GOODPUT / 1e6

        sched = LinkSchedule(tb, ue, (40.0, 0.25), (0.05, 10.0), seed=4, pause_path=pause)
        sched.start()
        try:
            deadline = time.monotonic() + 5.0
            while not sched.changes and time.monotonic() < deadline:
                time.sleep(0.01)
            assert sched.changes and sched.changes[0][1] == 0.25
            assert shown() == pytest.approx(0.25, rel=0.02) and ue.uplink_mbps == 0.25
            pause.touch()  # a client connecting: back to the first rate
            while len(sched.changes) < 2 and time.monotonic() < deadline:
                time.sleep(0.01)
            assert shown() == pytest.approx(40.0, rel=0.02)
        finally:
            sched.stop()


# ---- the deadline rule ------------------------------------------------------------------------------------
def test_scaled_quantile_deadline():
    from testbed.robust import fix_deadline

    local = [float(v) for v in range(110, 210, 10)]
    d1, _, _ = fix_deadline(local, [], quantile=0.9)
    d, rule, inputs = fix_deadline(local, [], quantile=0.9, scale=1.25)
    assert d == pytest.approx(1.25 * d1) and "1.25 x the 0.9-quantile" in rule and f"{d:.1f}" in rule
    assert inputs["scale"] == 1.25 and inputs["quantile_ms"] == pytest.approx(d1)
    for bad in (0.0, -1.0, float("inf")):
        with pytest.raises(ValueError, match="scale"):
            fix_deadline(local, [], quantile=0.9, scale=bad)


# ---- the transport residual's spread -------------------------------------------------------------------------
def test_transport_spread_from_residuals_and_seeding_replays_them():
    from ue_client.calibration import CostModel

    cm = CostModel()
    assert cm.transport_sd_ms() is None
    residuals = [5.0, -3.0, 600.0, 2.0, 4.0, 1.0]
    for r in residuals[:3]:
        cm.calibrate_transport(100.0 + r, 100.0)
    assert cm.transport_sd_ms() is None  # fewer than MIN_SPREAD_SAMPLES
    for r in residuals[3:]:
        cm.calibrate_transport(100.0 + r, 100.0)
    assert cm.transport_sd_ms() == pytest.approx(statistics.stdev(residuals))
    assert cm.transport_residuals == pytest.approx(residuals)
    other = CostModel()
    other.seed_transport(cm.transport_residuals)
    assert other.transport_ms == pytest.approx(cm.transport_ms) and other.transport_sd_ms() == cm.transport_sd_ms()
    with pytest.raises(ValueError, match="finite"):
        other.seed_transport([1.0, float("nan")])


def _offload_wins_graph() -> CostGraph:
    """Two ops, 40 ms each on the UE, 1 ms each on the server, a 1 kB input: offloading is ~75 ms faster."""
    return CostGraph(
        ops=(
            OpCost("a", ("x",), (), 1000, ue_ms=40.0, ue_var=1.0, server_ms=1.0),
            OpCost("b", ("a",), (), 1000, ue_ms=40.0, ue_var=1.0, server_ms=1.0),
        ),
        inputs={"x": 1000},
        outputs=("b",),
        weights={},
    )


def test_transport_spread_widens_only_plans_that_use_the_server():
    g = _offload_wins_graph()
    P = prepare(g)
    r = Rates.of(Link(100.0, rtt_ms=1.0))
    off = P.mask_of(frozenset({"a", "b"}))
    base = latency_moments(P, off, r)
    wide = latency_moments(P, off, r, transport_sd_ms=30.0)
    assert wide.std_ms == pytest.approx((base.std_ms**2 + 900.0) ** 0.5) and wide.mean_ms == base.mean_ms
    assert wide.sd_transport_ms == 30.0 and wide.parts()["sd_transport_ms"] == 30.0
    local = latency_moments(P, 0, r, transport_sd_ms=30.0)
    assert local.std_ms == latency_moments(P, 0, r).std_ms and local.sd_transport_ms == 0.0


def test_robust_keeps_local_when_the_transport_spread_makes_the_mean_optimal_offload_unsafe():
    """The must-show's contrast in miniature: offloading wins on the mean (mjoa offloads whatever the spread),
    robust offloads while the transport is steady and runs local once the measured spread puts offloading's
    Cantelli bound above eps; through the decision cache the spread comes from the cost scales the client
    passes (``transport_sd_ms``)."""
    from ue_client import planning
    from ue_client.decisions import DecisionCache

    g = _offload_wins_graph()
    link = Link(100.0, rtt_ms=1.0)
    steady = planning.choose("robust", g, link, deadline_ms=100.0, eps=0.05)
    assert steady.server_ops == {"a", "b"} and steady.feasible
    spread = planning.choose("robust", g, link, deadline_ms=100.0, eps=0.05, transport_sd_ms=30.0)
    assert spread.server_ops == frozenset() and spread.feasible and spread.details["std_ms"] < 5.0
    mean_only = planning.choose("mjoa", g, link, transport_sd_ms=30.0)
    assert mean_only.server_ops == {"a", "b"} and mean_only.details["std_ms"] >= 30.0
    dc = DecisionCache("robust", fixed_server_ops=None, deadline_ms=100.0, plan_budget_s=0.3, horizon=None)
    kw = {"costs": g, "base": g, "link": link, "ue_cpu": None, "n": 1}
    assert dc.decide(ServerState(), Shares(), scale={"ue": 1.0, "server": 1.0, "transport_sd_ms": 0.0}, **kw).server_ops
    choice = dc.decide(ServerState(), Shares(), scale={"ue": 1.0, "server": 1.0, "transport_sd_ms": 30.0}, **kw)
    assert dc.why == "scale" and choice.server_ops == frozenset()
