"""Bench suite pieces without running models: rows from a worker result, tables, plots, config."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from testbed.bench.report import write_markdown
from testbed.bench.suite import BenchConfig, stream_rows
from testbed.plots import make_plots


def _req(ms: float, pred: float | None = None, ops: int = 0) -> dict:
    return {"latency_ms": ms, "predicted_ms": pred if pred is not None else ms, "server_ops": ops, "fallback": False,
            "uploaded_bytes": 0}


def fake_result() -> dict:
    return {
        "streams": {
            "local": {"requests": [_req(500), _req(510), _req(505)]},
            "neurosurgeon-serial": {"requests": [_req(9000, 8900, 60), _req(300), _req(290)]},
            "dads-serial": {"requests": [], "unavailable": "no fixed split"},
            "ionn": {"requests": [_req(500), _req(450), _req(320)]},
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
    assert co["predeployed_ms"] == pytest.approx(285)
    assert co["warm_after_request"] == 2 and co["time_to_warm_ms"] == pytest.approx(1230)
    assert stream["dads-serial"]["mean_ms"] is None and stream["dads-serial"]["unavailable"]
    cold = {r["policy"]: r for r in rows if r["scenario"] == "cold"}
    assert set(cold) == {"local", "coinfer-parallel", "serial-same-split"}
    warm = {r["policy"]: r for r in rows if r["scenario"] == "warm"}
    assert warm["coinfer"]["ratio_to_best"] == pytest.approx(1.0)


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
    data = [line for line in mean_table.splitlines() if line.startswith("| resnet18")]
    assert len(data) == 2 and all("n/a" in line for line in data)  # DADS unavailable, ratio still there
    assert all(line.split("|")[-3].strip() != "n/a" for line in data)
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
