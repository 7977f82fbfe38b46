"""Device runtime against a real edge server (in-process, free port): every policy cold and warm,
bit-exact results, no weight uploaded twice, fallback, CLI.

Default run: resnet18 + the synthetic zoo. ``slow``: mobilenet_v2, googlenet, densenet121.
"""

from __future__ import annotations

import itertools
import json

import pytest
import torch

from edge_server.testing import ServerThread
from modelgraph import zoo
from profiler.device_info import cpu_share
from ue_client import CoinferClient, InputError, RequestFailed, ServerUnavailable, new_tenant
from ue_client.cli_run import load_inputs, max_abs_diff
from ue_client.client import prepare_model

POLICIES = ["local", "offload", "neurosurgeon", "dads", "cic", "mjoa", "robust", "auto"]
STATEFUL = {"auto", "mjoa", "robust"}
"""Policies that plan with what the server holds: a warm request may move the split (and upload more).
Any policy may move it when the measured times recalibrate the cost model."""
# A fast link and a UE 4x slower than this CPU: the policies pick different, non-trivial partitions.
FAST = {"uplink_mbps": 400.0, "rtt_ms": 2.0}


def _stats(server) -> dict:
    from ue_client import wire

    ch = wire.channel(server.address)
    try:
        from protos.coinfer.v1 import coinfer_pb2 as pb

        r = wire.stub(ch).Stats(pb.StatsRequest(), timeout=10)
        return {"commits": r.store.commits, "requests_done": r.requests_done, "requests_failed": r.requests_failed}
    finally:
        ch.close()


def _acks(client) -> list:
    return client.engine.weight_acks


def check_policy(server, model: str, policy: str, *, slowdown: float = 4.0, requests: int = 2, **kw):
    """Cold then warm requests: exact results, no fallback, and nothing the server holds is re-sent."""
    if policy == "robust":  # a generous deadline: these runs check results, not deadlines
        kw.setdefault("deadline_ms", 60_000.0)
    with CoinferClient(model, server=server.address, policy=policy, link=FAST, tenant=new_tenant(),
                       ue_slowdown=slowdown, **kw) as c:
        reps = []
        for i in range(requests):
            x = load_inputs("random", c.example_inputs, seed=i)
            y = c(*x)
            assert max_abs_diff(y, c.reference(*x)) == 0.0, (model, policy, i, c.last_report)
            reps.append(c.last_report)
            assert not reps[-1].fallback, reps[-1].fallback_reason
        if policy != "local":
            acks = _acks(c)
            assert not [a for a in acks if a.already_present], "a weight the server held was uploaded again"
            assert len({a.sha256 for a in acks}) == len(acks), "a weight was uploaded twice"
        for a, b in itertools.pairwise(reps):  # same split again: warm, nothing to upload
            if policy not in STATEFUL and b.server_ops == a.server_ops:
                assert b.needed_upload_bytes == 0 and b.uploaded_weight_bytes == 0, b
        return reps


RESNET18_SLOW = ["dads", "cic", "mjoa", "robust"]
"""Policies run on resnet18 in the slow suite only (``test_resnet18_more_policies_cold_and_warm``): each is run on
every synthetic zoo model by ``test_synthetic_zoo_every_policy``, and the splits they pick inside resnet18 by the
fixed interior cuts below (~2 s a policy on resnet18)."""


def test_resnet18_every_policy_cold_and_warm(server):
    for policy in [p for p in POLICIES if p not in RESNET18_SLOW]:
        reps = check_policy(server, "torchvision:resnet18", policy)
        if policy == "local":
            assert reps[0].server_ops == 0
        if policy == "offload":
            assert reps[0].ue_ops == 0 and reps[0].uploaded_weight_bytes > 40e6
    # Which splits the policies pick depends on measured costs (machine load); interior splits are
    # covered here explicitly, cold and warm, over the wire.
    n = len(prepare_model("torchvision:resnet18").graph.ops)
    for k in (1, n // 3, n // 2, n - 2):
        reps = check_policy(server, "torchvision:resnet18", "offload", server_ops=k)
        assert reps[0].server_ops == n - k and reps[1].uploaded_weight_bytes == 0, reps


@pytest.mark.slow  # covered: test_synthetic_zoo_every_policy (these policies), test_resnet18_every_policy_cold_and_warm
def test_resnet18_more_policies_cold_and_warm(server):
    for policy in RESNET18_SLOW:
        check_policy(server, "torchvision:resnet18", policy)


@pytest.mark.parametrize("name", zoo.SYNTHETIC)
def test_synthetic_zoo_every_policy(server, name):
    for policy in POLICIES:
        check_policy(server, zoo.spec(name), policy, slowdown=20.0)


def test_tiny_vit_correct_whatever_the_split(server):
    """Attention (SDPA, non-contiguous views) split anywhere: the server accepts every slice (no
    fallback) and the results are bit-identical to local execution, cold and warm."""
    for policy in ("offload", "neurosurgeon", "mjoa"):
        check_policy(server, zoo.spec("tiny_vit"), policy, slowdown=20.0, fallback=False)
    # fixed cuts around the attention op: its inputs, or its output, travel as cut tensors
    c0 = CoinferClient(zoo.spec("tiny_vit"))
    ops = [op.name for op in c0.graph.ops]
    sdpa = next(i for i, op in enumerate(c0.graph.ops) if "scaled_dot_product_attention" in op.target)
    for k in sorted({1, sdpa - 1, sdpa, sdpa + 1, len(ops) // 2, len(ops) - 1}):
        with CoinferClient(zoo.spec("tiny_vit"), server=server.address, policy="offload", link=FAST,
                           tenant=new_tenant(), fallback=False, server_ops=k) as c:
            x = c.example_inputs
            assert max_abs_diff(c(*x), c.reference(*x)) == 0.0, k
            assert not c.last_report.fallback and c.last_report.server_ops == len(ops) - k, (k, c.last_report)


def test_rejected_slice_falls_back_with_reason():
    """A slice the server refuses (here: over its slice size limit) is refused alone: the request on it
    runs locally with the server's reason, the same split is not sent again (the planner leaves it out:
    ``ue_client.refusals``; at most ``MAX_REFUSALS`` splits are tried), and the session stays."""
    from edge_server.config import ServerConfig
    from ue_client.refusals import MAX_REFUSALS

    cfg = ServerConfig(max_slice_bytes=4096)
    with ServerThread(config=cfg) as srv:
        with CoinferClient(zoo.spec("diamond"), server=srv.address, policy="offload", link=FAST,
                           tenant=new_tenant()) as c:
            x = c.example_inputs
            reps = []
            for _ in range(MAX_REFUSALS + 1):
                assert max_abs_diff(c(*x), c.reference(*x)) == 0.0
                reps.append(c.last_report)
            rep = reps[0]
            assert rep.fallback and "rejected the slice" in rep.fallback_reason, rep
            assert "ShapeError" in rep.fallback_reason, rep.fallback_reason
            assert rep.fallback_kind == "server error" and rep.fallback_code, rep
            assert "retry in" not in rep.fallback_reason  # a refused slice is no reason to back off
            assert not reps[-1].fallback, reps[-1]
            assert "refused" in reps[1].plan_reason, reps[1]
            sess = c.engine.conn.session
            assert sess is not None and sess.alive
        assert srv.runtime.stats().slices_rejected == sum(r.fallback for r in reps)  # none asked twice
        with CoinferClient(zoo.spec("diamond"), server=srv.address, policy="offload", link=FAST,
                           tenant=new_tenant(), fallback=False) as c, pytest.raises(RequestFailed) as ei:
            c(*c.example_inputs)
        assert "rejected the slice" in str(ei.value)


def test_progressive_offloading_reuses_held_weights(server):
    """A second client of the same tenant starts warm: it uploads nothing the first one uploaded."""
    tenant = new_tenant()
    with CoinferClient("torchvision:resnet18", server=server.address, policy="offload", link=FAST,
                       tenant=tenant) as c1:
        c1(*c1.example_inputs)
        assert c1.last_report.uploaded_weight_bytes > 40e6
    with CoinferClient("torchvision:resnet18", server=server.address, policy="offload", link=FAST,
                       tenant=tenant) as c2:
        y = c2(*c2.example_inputs)
        assert c2.last_report.uploaded_weight_bytes == 0 and c2.last_report.needed_upload_bytes == 0
        assert max_abs_diff(y, c2.reference(*c2.example_inputs)) == 0.0


def test_auto_streams_background_weights_then_offloads(server):
    """auto: the warm target's weights stream between requests and the split moves to the server."""
    with CoinferClient("torchvision:resnet18", server=server.address, policy="auto",
                       link={"uplink_mbps": 400.0, "rtt_ms": 2.0}, tenant=new_tenant(), ue_slowdown=10.0) as c:
        x = c.example_inputs
        ref = c.reference(*x)
        ops = []
        for _ in range(6):
            assert max_abs_diff(c(*x), ref) == 0.0
            ops.append(c.last_report.server_ops)
            c.engine.wait_uploads(30.0)
        assert ops[-1] > 0 and ops[-1] >= ops[0]
        assert not [a for a in _acks(c) if a.already_present]


def test_multi_output_model_returns_tuple(server):
    with CoinferClient(zoo.spec("multi_io"), server=server.address, policy="offload", link=FAST,
                       tenant=new_tenant()) as c:
        y = c(*c.example_inputs)
        ref = c.reference(*c.example_inputs)
        assert isinstance(y, tuple) and len(y) == len(ref)
        assert max_abs_diff(y, ref) == 0.0


# ---- fallback -----------------------------------------------------------------------------------
def test_unreachable_server_falls_back_and_backs_off():
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    with CoinferClient(zoo.spec("diamond"), server=f"127.0.0.1:{port}", policy="offload",
                       connect_timeout_s=2.0) as c:
        x = c.example_inputs
        y = c(*x)
        assert c.last_report.fallback and "unavailable" in c.last_report.fallback_reason
        assert c.last_report.fallback_kind == "unreachable" and c.last_report.fallback_code == "UNAVAILABLE"
        assert max_abs_diff(y, c.reference(*x)) == 0.0
        c(*x)
        assert c.last_report.fallback and "retry in" in c.last_report.fallback_reason
        assert c.last_report.fallback_kind == "unreachable"


def test_no_fallback_raises(server):
    with CoinferClient(zoo.spec("diamond"), server="127.0.0.1:1", policy="offload", fallback=False,
                       connect_timeout_s=1.0) as c, pytest.raises(ServerUnavailable):
        c(*c.example_inputs)


def test_deadline_exceeded_completes_locally(server):
    from testbed.linkemu import emulated_link

    # 50 Mbit/s: resnet18's 45 MB take ~7 s, far past the 300 ms deadline; at 5 Mbit/s the close after the fallback
    # waited ~5 s (Session.close's timeout) for the relay's buffered upload to drain
    with emulated_link("127.0.0.1", server.port, uplink_mbps=50, rtt_ms=20) as relay, \
            CoinferClient("torchvision:resnet18", server=f"127.0.0.1:{relay}", policy="offload",
                          tenant=new_tenant(), timeout_ms=300, probe=False, data_channel=False) as c:  # relay
        x = c.example_inputs
        y = c(*x)
        rep = c.last_report
        assert rep.fallback and "deadline" in rep.fallback_reason and rep.fallback_kind == "deadline"
        assert max_abs_diff(y, c.reference(*x)) == 0.0


def test_bad_input_shape_is_input_error(server):
    with CoinferClient(zoo.spec("diamond"), server=server.address) as c, pytest.raises(InputError):
        c(torch.randn(1, 2, 3))


def test_local_engine_without_server():
    c = CoinferClient(zoo.spec("chain"))
    x = c.example_inputs
    assert max_abs_diff(c(*x), c.reference(*x)) == 0.0
    assert c.last_report.policy == "local" and not c.last_report.fallback


# ---- CLI ----------------------------------------------------------------------------------------
def test_cli_run_json_report(server, cli, tmp_path):
    """``coinfer-ue run --json`` through its ``main`` in-process; ``coinfer-ue run`` as a process (exit
    status, one-line stderr, the JSON it leaves) is test_user_zoo's
    test_cli_no_fallback_server_death_keeps_finished_requests_in_json."""
    out = tmp_path / "r.json"
    x = tmp_path / "x.pt"
    torch.save(torch.randn(1, 3, 32, 32), x)
    rc, _, err = cli("run", "--server", server.address, "--model", zoo.spec("diamond"), "--policy", "offload",
                     "--requests", "2", "--verify", "--input", str(x), "--uplink-mbps", "100", "--rtt-ms", "1",
                     "--tenant", new_tenant(), "--json", str(out))
    assert rc == 0, err
    d = json.loads(out.read_text())
    assert set(d) == {"model", "server", "link", "capture_check", "error", "probe_bytes", "requests", "summary"}
    assert set(d["link"]) == {"uplink_mbps", "rtt_ms"} and d["link"]["uplink_mbps"] == 100
    assert d["error"] is None and d["capture_check"]["within_tolerance"] is True
    assert len(d["requests"]) == 2
    for r in d["requests"]:
        assert set(r) == {"request", "policy", "server_ops", "ue_ops", "uploaded_weight_bytes", "sent_tensor_bytes",
                          "probe_bytes", "predicted_ms", "measured_ms", "call_predicted_ms", "call_ms",
                          "max_abs_diff_vs_local",
                          "max_abs_diff_vs_eager", "fallback", "fallback_reason", "fallback_kind", "fallback_code",
                          "plan_ms", "plan_cpu_ms", "plan_at_share_ms", "cpu_share", "plan_reason", "plan_why",
                          "plan_wait_ms", "plan_bg", "plan_bg_ms", "plan_bg_cpu_ms",
                          "pinned", "deadline_ms", "met_deadline",
                          "predicted_mean_ms", "predicted_std_ms",
                          "frequency_ghz", "frequency_applied", "uplink_mbps", "energy_j", "ue_compute_ms",
                          "feasible", "miss_bound", "uplink_cv", "server_timings",
                          "uplink_backlog_ms", "uplink_backlog_added_ms"}
        assert r["deadline_ms"] is None and r["met_deadline"] is None and r["energy_j"] > 0
        assert r["call_ms"] >= r["measured_ms"] and r["call_predicted_ms"] >= r["predicted_ms"]  # the whole call's
        assert r["feasible"] is None and r["miss_bound"] is None and r["uplink_cv"] is None  # robust's only
        assert r["plan_ms"] >= 0.0 and r["pinned"] == [] and isinstance(r["plan_reason"], str)
        assert 0.0 <= r["plan_cpu_ms"] <= r["plan_ms"] + 1.0  # CPU of the decision, not more than its wall time
        # the plan's CPU at this process's share of a core (its cgroup quota, at most 1; 1 without one)
        assert r["cpu_share"] == pytest.approx(cpu_share()) and 0 < r["cpu_share"] <= 1
        assert r["plan_at_share_ms"] == pytest.approx(r["plan_cpu_ms"] / r["cpu_share"])
        assert r["max_abs_diff_vs_local"] == 0.0 and r["fallback"] is False and r["server_ops"] > 0
        assert r["max_abs_diff_vs_eager"] <= 1e-4 and r["fallback_reason"] == r["fallback_kind"] == ""
        assert r["server_timings"]["total_ms"] >= r["server_timings"]["compute_ms"] > 0
    # the slice was validated once, before the first request: that request carries the time, the second none
    first, second = (r["server_timings"]["validation_ms"] for r in d["requests"])
    assert first > 0 and second == 0.0
    assert d["probe_bytes"] == sum(r["probe_bytes"] for r in d["requests"])


@pytest.mark.parametrize("args, needle", [
    (["--model", "torchvision:nope"], "unknown torchvision model"),
    (["--model", zoo.spec("diamond"), "--input", "/nonexistent.pt"], "does not exist"),
    (["--model", zoo.spec("diamond"), "--no-fallback", "--server", "127.0.0.1:1"], "UNAVAILABLE"),
])
def test_cli_bad_input_exit_2(server, cli, args, needle):
    """In-process ``main`` (the console script's): a process's exit status and stderr are checked by
    test_user_zoo's test_cli_no_fallback_server_death_keeps_finished_requests_in_json (``run``) and
    test_profiler's test_cli_console_script_verbose_traceback (``profile``)."""
    base = ["--server", server.address] if "--server" not in args else []
    rc, out, err = cli("run", *base, *args)
    assert rc == 2, out + err
    lines = [x for x in err.strip().splitlines() if x]
    assert len(lines) == 1 and needle in lines[0], err
    assert "Traceback" not in err


def test_image_input_resized(tmp_path):
    from PIL import Image

    path = tmp_path / "x.jpg"
    Image.new("RGB", (50, 40), (200, 10, 10)).save(path)
    (x,) = load_inputs(str(path), (torch.zeros(1, 3, 32, 32),))
    assert x.shape == (1, 3, 32, 32) and x.dtype == torch.float32


# ---- slow: the bigger torchvision models --------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("model", ["torchvision:mobilenet_v2", "torchvision:googlenet", "torchvision:densenet121"])
def test_big_models_every_policy(server, model):
    for policy in POLICIES:
        check_policy(server, model, policy, profile_runs=3)
