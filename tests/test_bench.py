"""Bench suite pieces without running models: rows from a worker result, tables, plots, config."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

from testbed.bench.report import write_markdown
from testbed.bench.suite import Bench, BenchConfig, stream_rows
from testbed.bench.worker import BENCH_POLICIES
from testbed.plots import make_plots

REPO = Path(__file__).resolve().parents[1]


def _req(ms: float, pred: float | None = None, ops: int = 0) -> dict:
    return {"latency_ms": ms, "predicted_ms": pred if pred is not None else ms, "server_ops": ops, "fallback": False,
            "uploaded_bytes": 0}


def fake_result() -> dict:
    return {
        "streams": {
            "local": {"requests": [_req(500), _req(510), _req(505)]},
            "neurosurgeon-serial": {"requests": [_req(9000, 8900, 60), _req(300), _req(290)]},
            "dads-serial": {"requests": [], "unavailable": "no fixed split"},
            "ionn": {"requests": [_req(500), _req(450, ops=20), _req(320, ops=60)]},
            "coinfer": {"requests": [_req(520, 500), _req(400, 380, 10), _req(310, 300, 60)]},
        },
        "warm": {"local": {"requests": [_req(505), _req(500)]}, "neurosurgeon": {"requests": [_req(290), _req(300)]},
                 "coinfer": {"requests": [_req(280), _req(290)]}},
        "cold_compare": {"server_ops": 60, "predicted_parallel_ms": 3000, "predicted_serial_ms": 9000,
                         "parallel": _req(3200, 3000, 60), "serial": {**_req(9100, 9000, 60), "upload_ms": 8800}},
    }


def test_stream_rows_ratios_and_warm() -> None:
    rows = stream_rows(fake_result(), "torchvision:resnet18", 0.1, 100.0, 20.0, 3)
    need = {"scenario", "model", "policy", "uplink_mbps", "rtt_ms", "ue_cpu", "requests", "mean_ms", "first_ms",
            "warm_ms", "predicted_ms"}
    for r in rows:
        assert need <= set(r), need - set(r)
    stream = {r["policy"]: r for r in rows if r["scenario"] == "stream"}
    co = stream["coinfer"]
    best = min(stream[p]["mean_ms"] for p in ("local", "neurosurgeon-serial", "ionn"))
    assert co["coinfer_over_best_baseline_mean"] == pytest.approx(co["mean_ms"] / best)
    assert co["coinfer_over_local_mean"] == pytest.approx(co["mean_ms"] / stream["local"]["mean_ms"])
    assert co["best_baseline"] == "ionn" and co["baselines_as_local"] == []
    assert co["predeployed_ms"] == pytest.approx(285)
    assert co["warm_after_request"] == 2 and co["time_to_warm_ms"] == pytest.approx(1230)
    assert stream["dads-serial"]["mean_ms"] is None and stream["dads-serial"]["unavailable"]
    cold = {r["policy"]: r for r in rows if r["scenario"] == "cold"}
    assert set(cold) == {"local", "coinfer-parallel", "serial-same-split"}
    warm = {r["policy"]: r for r in rows if r["scenario"] == "warm"}
    assert warm["coinfer"]["ratio_to_best"] == pytest.approx(1.0)


def test_stream_rows_count_a_ue_only_baseline_as_local() -> None:
    """A baseline stream that ran every request on the UE alone is not the best baseline: coinfer's ratio is
    to local (its paired stream), the row names the stream counted as local (failed before: 410 / 300)."""
    res = fake_result()
    res["streams"]["ionn"] = {"requests": [_req(310), _req(290), _req(300)]}  # all local, faster than local
    rows = stream_rows(res, "torchvision:resnet18", 0.1, 100.0, 20.0, 3)
    co = next(r for r in rows if r["scenario"] == "stream" and r["policy"] == "coinfer")
    assert co["best_baseline"] == "local" and co["baselines_as_local"] == ["ionn"]
    assert co["coinfer_over_best_baseline_mean"] == pytest.approx(co["mean_ms"] / 505.0)
    # with one IONN request on the server it is a remote baseline again, and the best
    res["streams"]["ionn"]["requests"][2]["server_ops"] = 60
    rows = stream_rows(res, "torchvision:resnet18", 0.1, 100.0, 20.0, 3)
    co = next(r for r in rows if r["scenario"] == "stream" and r["policy"] == "coinfer")
    assert co["best_baseline"] == "ionn" and co["coinfer_over_best_baseline_mean"] == pytest.approx(410.0 / 300.0)


def test_markdown_and_plots(tmp_path: Path) -> None:
    rows = stream_rows(fake_result(), "torchvision:resnet18", 0.1, 100.0, 20.0, 3)
    rows += stream_rows(fake_result(), "torchvision:resnet18", 0.1, 400.0, 20.0, 3)
    rows += [{"scenario": "multi_ue", "n_ues": n, "ue": i, "model": "resnet18", "policy": "coinfer",
              "uplink_mbps": 100.0, "rtt_ms": 20.0, "ue_cpu": 0.1, "requests": 2, "latency_ms": [300.0, 320.0],
              "predicted_per_request_ms": [290.0, 300.0], "mean_ms": 310.0 + n, "first_ms": 300.0, "warm_ms": None,
              "predicted_ms": 295.0, "server_throughput_rps": 3.0 * n} for n in (1, 2) for i in range(n)]
    plots = make_plots(rows, tmp_path)
    assert {Path(p).name for p in plots} == {"stream_latency.png", "latency_vs_bandwidth.png",
                                              "cold_parallel_vs_serial.png", "predicted_vs_measured.png",
                                              "multi_ue.png"}
    for p in plots:
        assert Path(p).read_bytes()[:4] == b"\x89PNG"
    meta = {"command": "coinfer-testbed bench --quick --out X", "commit": "abc123-dirty", "date": "today",
            "elapsed_s": 1.0, "complete": True, "mode": "netns", "plots": plots}
    md = tmp_path / "results.md"
    write_markdown(rows, meta, md)
    text = md.read_text()
    assert "coinfer / best baseline" in text and "abc123-dirty" in text and "bench --quick" in text
    mean_table = text.split("mean latency over the stream")[1].split("###")[0]
    head = [h.strip() for h in next(x for x in mean_table.splitlines() if x.startswith("| model")).split("|")]
    data = [[c.strip() for c in line.split("|")] for line in mean_table.splitlines() if line.startswith("| resnet18")]
    assert len(data) == 2 and all("n/a" in line for line in data)  # DADS unavailable, ratio still there
    for col in ("coinfer / best baseline", "coinfer / local [90 % CI]", "p (one-sided)", "coinfer vs local"):
        assert all(line[head.index(col)] != "n/a" for line in data), col
    assert "### e. Multi-UE" in text and "### d. Planner accuracy" in text
    json.dumps(rows)


def test_config_quick_and_overrides() -> None:
    q = BenchConfig.make(quick=True)
    assert q.quick and len(q.models) == 2 and max(q.multi_n) <= 4
    f = BenchConfig.make(quick=False, models="resnet18", uplinks=[50.0], cpus=[0.5], requests=3, multi_n="1,2",
                         scenarios="stream")
    assert f.models == ("resnet18",) and f.uplinks == (50.0,) and f.cpus == (0.5,) and f.requests == 3
    assert f.multi_n == (1, 2) and f.scenarios == ("stream",)
    with pytest.raises(ValueError):
        BenchConfig.make(quick=True, scenarios="nope")
    assert not q.op_timings and q.pairing == "all"  # the defaults: no per-op timings, every policy paired


def test_cli_op_timings_and_pairing_reach_the_config() -> None:
    """``--op-timings`` / ``--pairing`` / ``--unpaired`` become the config the cells' worker specs are written
    from."""
    from testbed.cli import build_parser
    from testbed.scenarios import ScenarioError

    for argv, want in ((["bench", "--out", "o"], (False, "all")),
                       (["bench", "--out", "o", "--op-timings", "--unpaired"], (True, "none")),
                       (["bench", "--out", "o", "--pairing", "coinfer"], (False, "coinfer"))):
        a = build_parser().parse_args(argv)
        cfg = BenchConfig.make(quick=False, op_timings=a.op_timings, paired=not a.unpaired, pairing=a.pairing)
        assert (cfg.op_timings, cfg.pairing) == want
    with pytest.raises(ScenarioError):
        BenchConfig.make(quick=False, pairing="some")
    with pytest.raises(SystemExit):
        build_parser().parse_args(["bench", "--out", "o", "--pairing", "some"])


class _FakeClient:
    def __init__(self, log: list, name: str):
        self.log, self.name = log, name

    def close(self) -> None:
        self.log.append(("close", self.name))


def _fake_ue(log: list, fail: str | None = None):
    """A worker ``Ue`` without model or server: only the order of the streams' set-ups, requests and closes is
    under test (each request logged as (policy, i))."""
    from testbed.bench.worker import Ue

    class FakeUe(Ue):
        def __init__(self):
            self.spec = {}

        def steps(self, policy, k):
            c = _FakeClient(log, policy)
            log.append(("setup", policy))
            try:
                yield None
                rows = []
                for i in range(k):
                    if policy == fail and i == 1:
                        raise RuntimeError("server gone")
                    log.append((policy, i))
                    rows.append({"i": i, "latency_ms": 1.0, "policy": policy})
                    yield rows[-1]
            finally:
                c.close()
            return {"requests": rows}

    return FakeUe()


def test_every_policy_is_paired_with_a_local_stream_of_its_own() -> None:
    """``pairing: all``: coinfer alternates with the cell's local stream, every other policy with a local stream
    of its own, in the policies' order, which goes first alternating (local in even rounds), both set up before
    the first request; ``coinfer`` pairs only coinfer (session 11); ``none`` runs every stream alone."""
    from testbed.bench.worker import pairing, run_streams

    pol = list(BENCH_POLICIES)
    assert pairing({}, pol) == {"coinfer": "with-local", "neurosurgeon-serial": "own-local",
                                "dads-serial": "own-local", "ionn": "own-local"}
    assert pairing({"pairing": "coinfer"}, pol) == {"coinfer": "with-local", "neurosurgeon-serial": "alone",
                                                    "dads-serial": "alone", "ionn": "alone"}
    assert set(pairing({"paired": False}, pol).values()) == {"alone"}  # an older spec
    assert pairing({}, ["local", "ionn"]) == {"ionn": "own-local", "local": "alone"}
    assert pairing({}, ["ionn", "coinfer"]) == {"ionn": "alone", "coinfer": "alone"}  # no local: nothing to pair
    with pytest.raises(ValueError):
        pairing({"pairing": "x"}, pol)

    log: list = []
    result: dict = {"streams": {}}
    run_streams(_fake_ue(log), ["local", "ionn", "coinfer"], 3, pairing({}, ["local", "ionn", "coinfer"]), result)
    assert log == [("setup", "local"), ("setup", "coinfer"), ("local", 0), ("coinfer", 0), ("coinfer", 1),
                   ("local", 1), ("local", 2), ("coinfer", 2), ("close", "coinfer"), ("close", "local"),
                   ("setup", "local"), ("setup", "ionn"), ("local", 0), ("ionn", 0), ("ionn", 1), ("local", 1),
                   ("local", 2), ("ionn", 2), ("close", "ionn"), ("close", "local")]
    st = result["streams"]
    assert st["coinfer"]["paired_with"] == "local" and st["local"]["paired_with"] == "coinfer"
    assert st["ionn"]["paired_with"] == "local" and st["ionn"]["paired_local"]["paired_with"] == "ionn"
    assert [r["policy"] for r in st["ionn"]["paired_local"]["requests"]] == ["local"] * 3
    assert all(len(st[p]["requests"]) == 3 and "wall_s" in st[p] for p in ("local", "ionn", "coinfer"))

    log.clear()
    run_streams(_fake_ue(log), ["local", "ionn", "coinfer"], 2,
                pairing({"pairing": "coinfer"}, ["local", "ionn", "coinfer"]), result)
    assert [e for e in log if e[0] == "setup"] == [("setup", "local"), ("setup", "coinfer"), ("setup", "ionn")]
    assert "paired_local" not in result["streams"]["ionn"]


def test_a_failing_paired_stream_closes_both_and_the_cell_goes_on() -> None:
    """A paired stream that fails midway: both its clients closed, the policy's error recorded, the next
    policy's pair still runs."""
    from testbed.bench.worker import pairing, run_streams

    log: list = []
    result: dict = {"streams": {}}
    pol = ["local", "ionn", "dads-serial"]
    run_streams(_fake_ue(log, fail="ionn"), pol, 3, pairing({}, pol), result)
    assert ("close", "ionn") in log and log.index(("close", "ionn")) < log.index(("setup", "dads-serial"))
    assert sum(e == ("close", "local") for e in log) == 3  # local alone (no coinfer here), two paired
    assert "server gone" in result["streams"]["ionn"]["error"] and not result["streams"]["ionn"]["requests"]
    assert len(result["streams"]["dads-serial"]["requests"]) == 3
    assert len(result["streams"]["dads-serial"]["paired_local"]["requests"]) == 3


def test_stream_rows_carry_each_policys_paired_local() -> None:
    """Every paired stream's row has its own local stream's latencies, mean and the ratio to it; coinfer's is
    the cell's local stream."""
    res = fake_result()
    res["streams"]["coinfer"]["paired_with"] = "local"
    res["streams"]["ionn"].update(paired_with="local", paired_local={"requests": [_req(400), _req(420), _req(410)]})
    rows = stream_rows(res, "torchvision:resnet18", 0.1, 100.0, 20.0, 3)
    by = {r["policy"]: r for r in rows if r["scenario"] == "stream"}
    assert by["ionn"]["paired_local_latency_ms"] == [400, 420, 410]
    assert by["ionn"]["over_paired_local"] == pytest.approx(by["ionn"]["mean_ms"] / 410.0)
    assert by["coinfer"]["paired_local_mean_ms"] == pytest.approx(505.0)
    assert by["coinfer"]["over_paired_local"] == pytest.approx(by["coinfer"]["coinfer_over_local_mean"])
    assert "paired_local_mean_ms" not in by["neurosurgeon-serial"] and "over_paired_local" not in by["local"]


def test_policies_flag_selects_the_stream_policies() -> None:
    """``--policies`` narrows scenario stream's policies (the worker specs are written from ``cfg.policies``);
    a name that is not a bench policy is refused with the valid ones named."""
    from testbed.cli import build_parser

    a = build_parser().parse_args(["bench", "--out", "o", "--policies", "local, ionn,coinfer"])
    assert BenchConfig.make(quick=False, policies=a.policies).policies == ("local", "ionn", "coinfer")
    assert BenchConfig.make(quick=False).policies == BENCH_POLICIES
    with pytest.raises(ValueError, match="dads-serial"):
        BenchConfig.make(quick=False, policies="local,dads")


# ---- Bench.run: complete only when every scenario ran to its end ---------------------------------------------
def _bench(tmp_path: Path, monkeypatch) -> Bench:
    monkeypatch.setenv("COINFER_CACHE_DIR", str(tmp_path / "cache"))  # run() sets it for the server: restore
    cfg = BenchConfig(quick=True, mode="userspace", scenarios=("stream",), models=("modelgraph.zoo:chain",))
    return Bench(cfg, tmp_path / "out", "coinfer-testbed bench (test)")


def _one_cell_then(exc: BaseException | None):
    def streams(self: Bench, tb) -> None:
        assert tb.server_port  # the real testbed, with its edge server, is up
        self.rows.extend(stream_rows(fake_result(), "torchvision:resnet18", 0.1, 100.0, 20.0, 3))
        self.save()
        if exc is not None:
            raise exc

    return streams


@pytest.mark.parametrize("exc", [None, KeyboardInterrupt(), RuntimeError("boom")], ids=["done", "ctrl-c", "error"])
def test_run_records_whether_complete(tmp_path: Path, monkeypatch, exc: BaseException | None) -> None:
    monkeypatch.setattr(Bench, "streams", _one_cell_then(exc))
    bench = _bench(tmp_path, monkeypatch)
    if exc is None:
        assert bench.run()["rows"] == len(bench.rows) > 0
    else:
        with pytest.raises(type(exc)):
            bench.run()
    meta = json.loads((bench.out / "meta.json").read_text())
    md = (bench.out / "results.md").read_text()
    assert len(json.loads((bench.out / "results.json").read_text())) == len(bench.rows) > 0  # the cell is kept
    assert not bench.cache.exists()
    if exc is None:
        assert meta["complete"] is True and "interrupted" not in meta
        assert "partial" not in md
    else:
        want = {KeyboardInterrupt: "KeyboardInterrupt", RuntimeError: "RuntimeError: boom"}[type(exc)]
        assert meta["complete"] is False and meta["interrupted"] == want
        assert f"(partial: interrupted by {want}" in md
    assert "mean latency over the stream" in md  # the tables of the cells that ran are still there


SIGTERM_SCRIPT = """
import os, signal, sys, time
from pathlib import Path
from testbed.bench.suite import Bench, BenchConfig

def streams(self, tb):
    self.rows.append({"scenario": "stream", "model": "m", "policy": "local", "ue_cpu": 0.1, "uplink_mbps": 1.0,
                      "latency_ms": [1.0], "mean_ms": 1.0, "first_ms": 1.0, "last_ms": 1.0, "requests": 1})
    self.save()
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(60)

Bench.streams = streams
cfg = BenchConfig(quick=True, mode="userspace", scenarios=("stream",), models=("modelgraph.zoo:chain",))
try:
    Bench(cfg, Path(sys.argv[1]), "test").run()
except KeyboardInterrupt as e:
    print("interrupted:", type(e).__name__, e)
    sys.exit(130)
"""


def test_run_records_sigterm(tmp_path: Path) -> None:
    """SIGTERM (e.g. from `timeout`) unwinds like Ctrl-C: the record says interrupted, and by what."""
    out = tmp_path / "out"
    p = subprocess.run([sys.executable, "-c", SIGTERM_SCRIPT, str(out)], cwd=REPO, capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 130, p.stdout + p.stderr
    assert "interrupted: BenchTerminated SIGTERM" in p.stdout
    meta = json.loads((out / "meta.json").read_text())
    assert meta["complete"] is False and meta["interrupted"] == "BenchTerminated: SIGTERM"
    assert "(partial: interrupted by BenchTerminated: SIGTERM" in (out / "results.md").read_text()
    assert len(json.loads((out / "results.json").read_text())) == 1


def test_warm_rounds_interleave_and_rotate() -> None:
    """Scenario c's rounds: every policy once per round, the order rotated by one each round, requests
    numbered on across rounds; a policy that fails stops, the others go on."""
    from testbed.bench.worker import Ue

    calls = []

    class FakeUe(Ue):
        def __init__(self):  # no model, no server: only the scheduling is under test
            pass

        def warm(self, tenant, policy, k, first=0):
            calls.append((policy, k, first))
            if policy == "dads" and first > 0:
                raise RuntimeError("server gone")
            return {"requests": [{"i": first + i, "latency_ms": 1.0} for i in range(k)], "warmup": {"i": -1}}

    out = FakeUe().warm_rounds("pre", ["local", "neurosurgeon", "dads", "coinfer"], 7, 3)
    assert [c[0] for c in calls] == ["local", "neurosurgeon", "dads", "auto",
                                     "neurosurgeon", "dads", "auto", "local",
                                     "auto", "local", "neurosurgeon"]  # dads failed in round 1: not asked again
    assert all(k == 3 for _, k, _ in calls)  # ceil(7 / 3)
    assert [r["i"] for r in out["local"]["requests"]] == list(range(9))
    assert [r["round"] for r in out["coinfer"]["requests"]] == [0] * 3 + [1] * 3 + [2] * 3
    assert out["coinfer"]["rounds"][1] == {"round": 1, "position": 2, "requests": 3}
    assert len(out["dads"]["requests"]) == 3 and "server gone" in out["dads"]["error"]


# ---- scenario b in its own cells (``--scenarios cold``) -------------------------------------------------------
def test_cold_cells_config_and_parsing() -> None:
    from testbed.bench.suite import COLD_CELLS, parse_cold_cells
    from testbed.scenarios import ScenarioError

    full, quick = BenchConfig.make(quick=False), BenchConfig.make(quick=True)
    assert "cold" in full.scenarios and full.cold_cells == COLD_CELLS and full.cold_repeats == 3
    assert "cold" not in quick.scenarios  # the quick bench keeps its <= 5 min
    c = BenchConfig.make(quick=False, scenarios="cold", cold_cells="torchvision:vit_b_16:25%:200, resnet18:0.05:400",
                         cold_repeats=2)
    assert c.scenarios == ("cold",) and c.cold_repeats == 2
    assert c.cold_cells == (("torchvision:vit_b_16", 0.25, 200.0), ("resnet18", 0.05, 400.0))
    for bad in ("vit_b_16:0.25", "vit_b_16:2:200", "vit_b_16:0.25:-1", ":0.1:100", "x:y:z", " , "):
        with pytest.raises(ScenarioError):
            parse_cold_cells(bad)


def _cold_result(par: list[float], ser: list[float], loc: list[float]) -> dict:
    runs = [{"local": {**_req(lo), "cpu_ms": 390.0},
             "parallel": {**_req(p, 1400, 40), "cpu_ms": 400.0, "uploaded_bytes": 30_000_000},
             "serial": {**_req(s, 2500, 40), "upload_ms": s / 2, "cpu_ms": 370.0, "uploaded_bytes": 30_000_000}}
            for p, s, lo in zip(par, ser, loc)]
    return {"cold_compare": {"server_ops": 40, "predicted_parallel_ms": 1400.0, "predicted_serial_ms": 2500.0,
                             "predicted_local_ms": 1500.0, "ue_cpu": {"send_ms_per_byte": 3.2e-6},
                             **runs[0], "runs": runs}}


def test_cold_rows_average_the_rounds_and_the_verdict_uses_the_prediction(tmp_path: Path) -> None:
    from testbed.bench.report import must_show
    from testbed.bench.suite import cold_rows

    rows = cold_rows(_cold_result([1500, 1300, 1400], [2500, 2600, 2400], [1500, 1480, 1490]),
                     "torchvision:vit_b_16", 0.25, 200.0, 20.0)
    by = {r["policy"]: r for r in rows}
    assert set(by) == {"local", "coinfer-parallel", "serial-same-split"}
    assert by["coinfer-parallel"]["latency_ms"] == [1500, 1300, 1400]
    assert by["coinfer-parallel"]["mean_ms"] == by["coinfer-parallel"]["first_ms"] == pytest.approx(1400)
    assert by["serial-same-split"]["upload_ms"] == pytest.approx(1250)
    assert by["local"]["predicted_ms"] == 1500.0 and all(r["model"] == "vit_b_16" for r in rows)
    # the upload's UE CPU in the request, (400 - 370) ms over 30 MB, beside the probe's 3.2e-6 ms/B at 25 %
    assert by["coinfer-parallel"]["send_cpu_ns_per_byte"] == pytest.approx(1.0)
    assert by["coinfer-parallel"]["probe_send_cpu_ns_per_byte"] == pytest.approx(0.8)
    text = "\n".join(must_show(rows))  # a cold-only run still gets its verdict
    assert "met in 1 of 1 cells" in text and "0.56 measured" in text and "0.56 predicted" in text
    assert "per round 0.60, 0.50, 0.58" in text
    # measured above the target in a cell the simulator says can hide: 0 of 1
    rows = cold_rows(_cold_result([2000], [2500], [1500]), "vit_b_16", 0.25, 200.0, 20.0)
    assert "met in 0 of 1 cells" in "\n".join(must_show(rows))
    # the cold plan is local: a note, no upload rows
    rows = cold_rows({"cold_compare": {"server_ops": 0, "predicted_parallel_ms": 900.0, "note": "local",
                                       "local": _req(900)}}, "resnet18", 0.1, 20.0, 20.0)
    assert [r["policy"] for r in rows] == ["local", "coinfer-parallel"] and rows[1]["note"] == "local"
    write_markdown(rows, {"command": "x", "commit": "c", "date": "d", "elapsed_s": 1.0, "complete": True},
                   tmp_path / "r.md")
    rows = cold_rows(_cold_result([1500, 1300, 1400], [2500, 2600, 2400], [1500, 1480, 1490]), "vit_b_16", 0.25,
                     200.0, 20.0)
    write_markdown(rows, {"command": "x", "commit": "c", "date": "d", "elapsed_s": 1.0, "complete": True},
                   tmp_path / "r.md")
    line = next(x for x in (tmp_path / "r.md").read_text().splitlines() if x.startswith("| vit_b_16"))
    assert line.rstrip(" |").endswith("1.00 / 0.80")


@contextlib.contextmanager
def _bench_ue(tmp_path: Path, monkeypatch, prefix: str):
    """``(ue, tags)``: a bench worker's ``Ue`` of ``modelgraph.zoo:chain`` connected to a real edge server, emulated
    30x slower than this machine on a 1000 Mbit/s link (MJOA's cold plan offloads), and the tag of every fresh
    tenant it takes, in order."""
    from edge_server.testing import ServerThread
    from testbed.bench.worker import Ue

    monkeypatch.setenv("COINFER_CACHE_DIR", str(tmp_path / "cache"))
    with ServerThread(cache_mb=64) as srv:
        ue = Ue({"server": srv.address, "model": "modelgraph.zoo:chain", "uplink_mbps": 1000.0, "rtt_ms": 1.0,
                 "slowdown": 30.0, "tenant_prefix": prefix})
        ue.connect()
        tags: list[str] = []
        tenant = ue.tenant
        monkeypatch.setattr(ue, "tenant", lambda tag: tags.append(tag) or tenant(tag))
        yield ue, tags


def test_cold_compare_alternates_rounds_on_fresh_tenants(tmp_path: Path, monkeypatch) -> None:
    """The worker's scenario b against a real edge server: every run a fresh tenant (a cold server), parallel
    first in even rounds and serial first in odd ones, one local run per round, each upload answered."""
    with _bench_ue(tmp_path, monkeypatch, "cold-test") as (ue, tags):
        out = ue.cold_compare(repeats=2, local=True)
    assert out["server_ops"] > 0, out.get("note")
    assert tags == ["cold-local", "cold-par", "serial-fixed", "cold-local", "serial-fixed", "cold-par"]
    assert len(out["runs"]) == 2 and out["parallel"] is out["runs"][0]["parallel"]
    for run in out["runs"]:
        assert set(run) == {"local", "parallel", "serial"}
        assert run["local"]["server_ops"] == 0 and run["parallel"]["server_ops"] == out["server_ops"]
        assert not run["parallel"]["fallback"] and not run["serial"]["fallback"]
        assert run["parallel"]["uploaded_bytes"] > 0  # a fresh tenant: the split's weights went up in the request
        assert run["serial"]["upload_ms"] > 0 and run["serial"]["uploaded_bytes"] > 0


def test_paired_streams_of_every_policy_against_a_real_server(tmp_path: Path, monkeypatch) -> None:
    """The worker's streams with ``pairing: all`` against a real edge server: every policy's stream and its own
    local stream complete with K requests each (no error), the local ones on the UE alone, the serial
    baseline's first request carrying its upload, every stream on a fresh tenant."""
    from testbed.bench.worker import pairing, run_streams

    pol = ["local", "dads-serial", "ionn", "coinfer"]
    with _bench_ue(tmp_path, monkeypatch, "pair-test") as (ue, tags):
        result: dict = {"streams": {}}
        run_streams(ue, pol, 3, pairing({}, pol), result)
    st = result["streams"]
    assert tags == ["local", "coinfer", "local", "serial-dads", "local", "ionn"]
    for p in pol:
        assert not st[p].get("error") and len(st[p]["requests"]) == 3, (p, st[p].get("error"))
    for p in ("dads-serial", "ionn"):
        loc = st[p]["paired_local"]["requests"]
        assert len(loc) == 3 and all(r["server_ops"] == 0 and not r["fallback"] for r in loc)
    assert "paired_local" not in st["coinfer"] and st["coinfer"]["paired_with"] == "local"
    first = st["dads-serial"]["requests"][0]
    # DADS's own split offloads on this slow UE: its upload is in request 0
    assert first["server_ops"] > 0 and first["upload_ms"] > 0 and first["uploaded_bytes"] > 0
    assert all(r["server_ops"] == first["server_ops"] for r in st["dads-serial"]["requests"])


# ---- multi-UE: the throughput's wall covers serving, not the UEs' start-up ----------------------------------
@pytest.mark.slow
def test_multi_wall_starts_after_every_ue_built_its_client_and_joined(tmp_path: Path, monkeypatch) -> None:
    """Two real UE workers and a real edge server (userspace mode): every UE's stream client is built (the
    worker's ``builds``) and its session joined before the release the wall starts from, every request starts
    after it, and the throughput is the requests over that wall (up to session 11 the wall began before the
    clients were built, so a client's construction counted as serving time)."""
    monkeypatch.setenv("COINFER_CACHE_DIR", str(tmp_path / "cache"))
    cfg = BenchConfig(quick=True, mode="userspace", scenarios=("multi",), models=("modelgraph.zoo:chain",),
                      cpus=(0.5,), uplinks=(100.0,), multi_n=(2,), multi_requests=2, cell_timeout_s=120.0)
    bench = Bench(cfg, tmp_path / "out", "coinfer-testbed bench (test)")
    bench.run()
    rows = [r for r in json.loads((bench.out / "results.json").read_text()) if r["scenario"] == "multi_ue"]
    assert len(rows) == 2 and not bench.failures
    released = rows[0]["released_wall"]
    for r in rows:
        assert r["requests"] == 2 and r["error"] is None
        assert r["released_wall"] == released and r["server_throughput_rps"] == pytest.approx(4 / r["wall_s"])
        assert 0 < r["wall_s"] <= r["wall_with_startup_s"]
        assert r["client_build_ms"] is not None and r["client_build_ms"] > 0
    results = [json.loads((bench.out / "logs" / f"ue{k}.json").read_text()) for k in range(2)]
    assert len(results) == 2
    for res in results:
        built = [b["t_wall"] for b in res["builds"] if b["policy"] == "auto"]
        reqs = res["streams"]["coinfer"]["requests"]
        assert built and max(built) < released <= min(q["t_wall"] for q in reqs)
        assert max(q["t_wall"] + q["call_ms"] / 1e3 for q in reqs) <= released + rows[0]["wall_s"] + 1e-6


def test_a_paired_stream_holds_the_partners_queued_background_only() -> None:
    """While one stream's request runs, its partner's background weights on the uplink are held back and put
    back after (IONN's upload must not be paid by its partner's request); weights the partner's client had
    parked itself (coinfer after a prefetch) stay parked. The real ``UploadScheduler`` and ``UplinkQueue``
    (the session holder is the only stand-in: no server is needed to queue)."""
    from types import SimpleNamespace

    import torch

    from modelgraph import tensor_bytes
    from testbed.bench.worker import Ue
    from ue_client.session import BACKGROUND, UplinkItem, UplinkQueue
    from ue_client.uploads import UploadScheduler

    graph = SimpleNamespace(weights={})
    queue = UplinkQueue()
    ups = UploadScheduler(graph, SimpleNamespace(session=SimpleNamespace(queue=queue)))

    def item(name: str) -> UplinkItem:
        return UplinkItem("weight", name, "float32", (4,), tensor_bytes(torch.ones(4)), (BACKGROUND, 0.0))

    own = item("own")
    ups.parked.append(own)  # the client parked it itself
    for name in ("w1", "w2"):
        queue.put(item(name))
    ue = Ue.__new__(Ue)
    ue.stream_clients = {"ionn": SimpleNamespace(engine=SimpleNamespace(uploads=ups))}
    put_back = ue._hold_background("ionn")
    assert [it.name for it in queue.pending()] == [] and ups.parked == [own]
    put_back()
    assert sorted(it.name for it in queue.pending()) == ["w1", "w2"] and ups.parked == [own]
    assert ue._hold_background("coinfer")() is None  # no such stream open: nothing to hold


def test_bulk_send_cost_measures_the_serial_baselines_upload_path(tmp_path: Path, monkeypatch) -> None:
    """``Ue.bulk_send_cost``: two samples of the model's weights (its near-mean ones, its smallest ones) uploaded
    on timed ``UploadWeights`` calls against a real server; the record says what each sent and its CPU, the send
    cost is a ``UeCpu`` with a per-byte and a per-weight part >= 0, and a serial prediction depends on it."""
    from partitioner.uecpu import UeCpu
    from ue_client import planning
    from ue_client.probing import probe_weights

    with _bench_ue(tmp_path, monkeypatch, "bulk-test") as (ue, _):
        assert ue.serial_cpu is None  # an emulated slow UE: sending is not modelled
        ue.ue_cpu = UeCpu(send_ms_per_byte=1e-6)
        cpu = ue.bulk_send_cost(ue.tenant("profile"))
        rec = ue.bulk_probe
        g = ue.graph
        big = [w for _, w in probe_weights(g, 4 << 20)]
        big_s, small_s = rec["samples"]
        assert big_s["weights"] == len(big) and big_s["bytes"] == sum(g.weights[w].nbytes for w in big)
        assert 2 <= small_s["weights"] <= 32 and small_s["bytes"] <= big_s["bytes"]
        assert all(x["cpu_ms"] > 0 and x["call_cpu_ms"] is not None for x in (big_s, small_s))
        assert cpu is not None and rec["ue_cpu"] == cpu.to_dict()
        assert cpu.send_ms_per_byte > 0 and cpu.send_ms_per_weight >= 0
        server = frozenset(op.name for op in g.ops)
        link = ue.planning_link()
        cheap = planning.predict(ue.costs, link, server, mode="serial", ue_cpu=UeCpu(1e-9))
        dear = planning.predict(ue.costs, link, server, mode="serial", ue_cpu=UeCpu(1e-9, send_ms_per_weight=50.0))
        assert dear > cheap
