"""Profiler: per-op costs that add up to the real model, caching, device info, CLI and bad input."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from modelgraph import capture, load_model, make_slice
from profiler import LinkEstimator, ProfilerError, cost_graph, device_info, profile_graph, profile_model, profile_slice
from ue_client.cli import main as ue_main

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("COINFER_CACHE_DIR", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def captured():
    """(model with .module and .example_inputs, its graph) per spec, read only: through the device runtime's
    per-process capture cache (``ue_client.model.prepare_model``), which other test modules' clients of
    the same spec share (a torchvision capture is ~1-3 s)."""
    from ue_client.model import prepare_model

    specs = ("torchvision:resnet18", "torchvision:mobilenet_v2")
    return {spec: ((pm := prepare_model(spec)), pm.graph) for spec in specs}


@pytest.mark.parametrize("clock", [
    pytest.param(time.thread_time, id="cpu"),
    # the same property on the wall clock the profiles use; under load it also measures the other processes
    pytest.param(time.perf_counter, id="wall", marks=pytest.mark.slow),
])
@pytest.mark.parametrize("spec", ["torchvision:resnet18", "torchvision:mobilenet_v2"])
def test_per_op_sum_matches_whole_graph_and_eager_model(captured, spec, clock):
    """Op-by-op timings must add up to the whole graph (before calibration) and to the real eager
    model (after), measured in the same loop so both see the same machine load."""
    lm, g = captured[spec]
    # The property is the per-op accounting, not the machine's load: on the shared 2-core machine (load 7)
    # wall time put another process's time slices into some runs and ops and not others (mobilenet_v2
    # failed). This thread's CPU time (threads=1: torch's work runs on this thread) leaves them out and
    # keeps everything the accounting could get wrong (the interpreter's own overhead, a missed or
    # double-counted op). Three attempts remain for cache interference from the other core.
    # The executor pools through ATen's channels-last kernel (``modelgraph.execute.max_pool2d_channels_last``),
    # the eager module through the scalar NCHW one: resnet18's graph measured 25 ms against eager's 29.5 (its
    # stem pool, ~4.4 ms). With max pools the graph may be faster than eager by that, not slower.
    pools = any(op.target == "aten.max_pool2d.default" for op in g.ops)
    failures = []
    for _ in range(3):
        prof = profile_graph(g, lm.example_inputs, threads=1, runs=12, warmup=2, module=lm.module, clock=clock)
        assert prof.threads == 1
        assert prof.sum_mean_ms == pytest.approx(prof.whole_model_ms, rel=1e-9)
        raw_err = abs(prof.raw_sum_mean_ms - prof.whole_model_ms) / prof.whole_model_ms
        eager_err = (prof.sum_mean_ms - prof.eager_model_ms) / prof.eager_model_ms
        eager_err = max(eager_err, -0.15 - eager_err) if pools else abs(eager_err)  # pools: -30 % .. +15 %
        if raw_err <= 0.15 and eager_err <= 0.15:
            break
        failures.append(f"uncalibrated sum {prof.raw_sum_mean_ms:.2f} / whole {prof.whole_model_ms:.2f} / "
                        f"eager {prof.eager_model_ms:.2f} ms")
    else:
        pytest.fail("per-op sums off by > 15 %: " + "; ".join(failures))
    # Raw samples are kept per op and per run; totals correlate with the calibrated mean.
    assert len(prof.samples_ms) == len(g.ops)
    assert len({len(r) for r in prof.samples_ms}) == 1 and len(prof.samples_ms[0]) >= 6
    assert all(op.var_ms2 >= 0 and op.mean_ms > 0 for op in prof.ops)
    assert abs(statistics.fmean(prof.run_totals_ms) - prof.sum_mean_ms) < 1e-6 * prof.sum_mean_ms + 1e-9


# threads=1 where the thread count is not the property: two OpenMP threads on a loaded 2-core machine wait
# for each other (test_profile_json_shape took 30 s instead of ~1 s in one full run at load ~6).
def test_profile_json_shape_and_weight_accounting(captured, tmp_path):
    lm, g = captured["torchvision:resnet18"]
    prof = profile_graph(g, lm.example_inputs, threads=1, runs=3, warmup=1)
    d = json.loads(prof.to_json())
    for op in d["ops"]:
        assert {"name", "layer", "mean_ms", "var_ms2", "out_bytes", "weight_bytes"} <= op.keys()
    assert {"total_weight_bytes", "sum_mean_ms", "whole_model_ms"} <= d.keys()
    # Each weight is attributed to its first reader once, so per-op weight bytes add up exactly.
    assert sum(op["weight_bytes"] for op in d["ops"]) == d["total_weight_bytes"] == g.total_weight_bytes
    assert abs(g.total_weight_bytes / 2**20 - 44.6) < 0.1
    layers = prof.per_layer(depth=1)
    assert [x.layer for x in layers][:4] == ["conv1", "bn1", "relu", "maxpool"]
    assert abs(sum(x.mean_ms for x in layers) - prof.sum_mean_ms) < 1e-6


def test_cache_hit_and_key():
    # The cache does not depend on the model's size: a small zoo graph (resnet18 took ~3 s per profile).
    lm = load_model("modelgraph.zoo:diamond")
    g = capture(lm.module, lm.example_inputs, name=lm.name)
    first = profile_model(g, lm.example_inputs, threads=1, runs=3, warmup=1)
    second = profile_model(g, lm.example_inputs, threads=1, runs=3, warmup=1)
    # read back from JSON, field for field: a second measurement would differ in its samples and profile_seconds
    assert second == first and second.samples_ms == first.samples_ms
    assert second.profile_seconds == first.profile_seconds > 0
    files = list((Path(os.environ["COINFER_CACHE_DIR"]) / "profiles").glob("*.json"))
    assert len(files) == 1
    profile_model(g, lm.example_inputs, threads=2, runs=3, warmup=1)  # a different key
    assert len(list(files[0].parent.glob("*.json"))) == 2


def test_cost_graph_from_profile(captured):
    lm, g = captured["torchvision:mobilenet_v2"]
    prof = profile_graph(g, lm.example_inputs, threads=1, runs=3, warmup=1)
    cg = cost_graph(g, prof)
    assert [o.name for o in cg.ops] == [o.name for o in g.ops]
    assert cg.total_weight_bytes == g.total_weight_bytes
    assert cg.inputs == {"x": 3 * 224 * 224 * 4}
    assert all(o.offloadable for o in cg.ops)
    assert cg.ue_samples_ms is not None and len(cg.ue_samples_ms) == len(cg.ops)
    # Every op reads only earlier sources; the graph validated on construction.
    first = cg.ops[0]
    assert first.inputs == ("x",) and first.out_bytes == 32 * 112 * 112 * 4


def test_profile_slice_weightless(captured):
    _, g = captured["torchvision:resnet18"]
    spec = make_slice(g, g.split_at(40), with_hashes=False)
    per_op, mean, var = profile_slice(spec, threads=1, runs=3, warmup=1)
    assert set(per_op) == {op.name for op in spec.ops}
    assert mean > 0 and var >= 0 and all(m >= 0 for m, _ in per_op.values())


def test_cuda_requested_without_gpu_is_a_clear_error(captured):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    _, g = captured["torchvision:resnet18"]
    with pytest.raises(ProfilerError, match="CUDA is not available"):
        profile_graph(g, device="cuda", runs=2)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_profile_uses_events(captured):
    lm, g = captured["torchvision:resnet18"]
    prof = profile_graph(g, lm.example_inputs, device="cuda", runs=5, warmup=2)
    assert prof.device.startswith("cuda:") and prof.sum_mean_ms > 0


def test_device_info_degrades_without_nvml(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_pynvml(name, *a, **k):
        if name == "pynvml":
            raise ImportError("no pynvml")
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_pynvml)
    info = device_info()
    assert info.nvml == "absent" and info.gpus == ()
    assert info.logical_cores >= 1 and info.memory_total_mb > 0


def test_link_estimator_moving_average():
    est = LinkEstimator(uplink_mbps=10.0, rtt_ms=40.0, alpha=0.5)
    est.observe_upload(1_000_000, 0.4)  # 20 Mbps
    # averaged as time per bit: 1 / (0.5 / 10 + 0.5 / 20)
    assert est.link().uplink_mbps == pytest.approx(1 / (0.5 / 10 + 0.5 / 20))
    est.observe_upload(100, 1.0)  # too small to say anything about bandwidth
    assert est.link().uplink_mbps == pytest.approx(1 / (0.5 / 10 + 0.5 / 20))
    for _ in range(6):
        est.observe_upload(4_000_000, 0.4)  # 80 Mbps
    assert est.link().uplink_mbps > 70
    est.observe_rtt(20.0)
    assert est.link().rtt_ms == pytest.approx(30.0)


# ---- CLI -------------------------------------------------------------------------------------
def test_cli_profile_writes_documented_json(tmp_path, capsys):
    out = tmp_path / "p.json"
    rc = ue_main(["profile", "--model", "modelgraph.zoo:diamond", "--runs", "3", "--json", str(out)])
    assert rc == 0
    text = capsys.readouterr().out
    assert "total: per-op sum" in text and "layer" in text
    d = json.loads(out.read_text())
    assert d["ops"] and {"total_weight_bytes", "sum_mean_ms", "whole_model_ms", "device_info"} <= d.keys()


@pytest.fixture()
def bad_models(tmp_path):
    (tmp_path / "badmodels.py").write_text(textwrap.dedent("""
        import torch
        def boom():
            raise RuntimeError("factory exploded")
        class Branchy(torch.nn.Module):
            def forward(self, x):
                if x.sum() > 0:
                    return x * 2
                return x - 1
        def branchy():
            return Branchy(), (torch.randn(2, 3),)
    """))
    (tmp_path / "garbage.pt").write_bytes(b"this is not a state dict")
    return tmp_path


@pytest.mark.parametrize("model,extra,needle", [
    ("torchvision:resnet1800", [], "unknown torchvision model 'resnet1800'"),
    ("badmodels:boom", [], "factory badmodels:boom raised RuntimeError: factory exploded"),
    ("badmodels:nothing", [], "has no callable 'nothing'"),
    ("badmodels:branchy", [], "branches on a tensor's value"),
    ("torchvision:resnet18", ["--weights", "{dir}/garbage.pt"], "cannot read weights file"),
    ("torchvision:resnet18", ["--weights", "{dir}/missing.pt"], "does not exist"),
    ("nocolon", [], "must be 'torchvision:NAME' or 'package.module:factory'"),
])
def test_cli_bad_input_one_line_exit_2(bad_models, monkeypatch, capsys, model, extra, needle):
    monkeypatch.syspath_prepend(str(bad_models))
    argv = ["profile", "--model", model, "--runs", "2"] + [e.format(dir=bad_models) for e in extra]
    assert ue_main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err
    assert len(err.splitlines()) == 1 and "Traceback" not in err


def test_cli_console_script_verbose_traceback(bad_models):
    env = {**os.environ, "PYTHONPATH": f"{bad_models}{os.pathsep}{ROOT}"}
    cmd = [sys.executable, "-m", "ue_client.cli", "profile", "--model", "badmodels:boom"]
    # both processes at once: each spends seconds importing torch, on a machine with a second core
    procs = [subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for c in (cmd, [*cmd, "--verbose"])]
    try:
        (_, quiet_err), (_, loud_err) = (p.communicate(timeout=120) for p in procs)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    quiet, loud = procs
    assert quiet.returncode == 2 and "Traceback" not in quiet_err and "factory exploded" in quiet_err
    assert loud.returncode == 2 and "Traceback" in loud_err


def test_link_estimator_predicts_the_mean_transfer_time_of_a_varying_link():
    """A link alternating 40 and 10 Mbit/s: a transfer of B bytes takes B x E[1 / R] on average (here the
    harmonic mean, 16 Mbit/s), not B / E[R] (25 Mbit/s, 36 % short); the estimate, averaged as time per bit,
    predicts the mean time whatever the order of the samples."""
    nbytes = 200_000
    rates = [40.0, 10.0] * 100
    mean_s = statistics.fmean(nbytes * 8 / (r * 1e6) for r in rates)
    for alpha in (0.3, 0.05):
        est = LinkEstimator(alpha=alpha)
        for r in rates:
            est.observe_upload(nbytes, nbytes * 8 / (r * 1e6))
        predicted_s = nbytes * 8 / (est.link().uplink_mbps * 1e6)
        # an EWMA ends on its last samples: within its weight on the last sample of the mean
        assert predicted_s == pytest.approx(mean_s, rel=alpha * 1.2)
    est = LinkEstimator(alpha=0.05)
    for r in rates:
        est.observe_upload(nbytes, nbytes * 8 / (r * 1e6))
    assert est.link().uplink_mbps < 20.0  # the arithmetic mean (25) would under-predict the time


def test_link_estimator_uplink_spread_from_recent_samples():
    """The uplink rate's coefficient of variation comes from the recent rate samples (std / mean); small
    transfers (latency-dominated) give none; None until there are enough."""
    from profiler.link import MIN_CV_SAMPLES, RATE_WINDOW

    est = LinkEstimator()
    assert est.uplink_cv() is None
    est.observe_upload(1000, 0.001)  # too small to say anything about the rate
    rates = [40.0, 10.0, 40.0]
    for mbps in rates:
        est.observe_upload(1_000_000, 1_000_000 * 8 / (mbps * 1e6))
    assert len(est.uplink_samples) == 3 and est.uplink_cv() is None  # < MIN_CV_SAMPLES
    est.observe_upload(1_000_000, 1_000_000 * 8 / 10e6)
    rates.append(10.0)
    assert MIN_CV_SAMPLES <= 4
    assert est.uplink_cv() == pytest.approx(statistics.stdev(rates) / statistics.fmean(rates))
    for _ in range(RATE_WINDOW):  # the window forgets: a steady link has no spread
        est.observe_upload(1_000_000, 1_000_000 * 8 / 20e6)
    assert est.uplink_cv() == pytest.approx(0.0, abs=1e-9)
