"""Users' models, exactly: every model of ``tests/user_zoo.py`` through a real edge server (port 0) with the
policies local, offload, mjoa (and dads in the slow run) returns what the user's own ``model(*inputs)`` returns (same
Python structure; the captured graph's values bit for bit, the eager module's within
``ue_client.verify.TOLERANCES``), or is refused in one line (exit 2 from the CLI). The fallback with the
server process killed mid-request returns the reference's structure and bits.
"""

from __future__ import annotations

import json
import os
import re
import signal
import threading

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils._pytree import tree_map

from modelgraph.allowlist import is_allowed
from modelgraph.pinning import pin_off_allowlist
from tests import user_zoo as uz
from ue_client import CoinferClient, InputError, new_tenant
from ue_client.verify import max_abs_diff, structure, within_tolerance

POLICIES = ["local", "offload", "dads", "mjoa"]
FAST = {"uplink_mbps": 400.0, "rtt_ms": 2.0}
RUNS = [name for name, kind in uz.KINDS.items() if kind == "runs"]
REFUSED = [name for name, kind in uz.KINDS.items() if kind == "refused"]


def _eager(module: nn.Module, x) -> object:
    with torch.inference_mode():
        return module(*x)


def _requests(name: str, example: tuple) -> list[tuple]:
    """The inputs each zoo model is called with: its example, fresh values, and the kind's own twist."""
    g = torch.Generator().manual_seed(7)

    def fresh(t: torch.Tensor) -> torch.Tensor:
        if t.numel() == 0:
            return t.clone()
        if t.dtype == torch.bool:
            return torch.rand(t.shape, generator=g) > 0.5
        if t.is_floating_point():
            return torch.randn(t.shape, generator=g, dtype=t.dtype)
        return torch.randint(int(t.min()), int(t.max()) + 1, t.shape, generator=g, dtype=t.dtype)

    reqs = [example, tree_map(lambda t: fresh(t) if isinstance(t, torch.Tensor) else t, example)]
    if name.startswith("aliased"):  # distinct tensors at run time, and the same tensor twice again
        a = torch.randn(1, 16, generator=g)
        reqs += [(a, torch.randn(1, 16, generator=g)), (a, a)]
    if name.startswith("noncontig"):
        reqs.append((uz.hwc_image(seed=11),))
    if name == "channels_last":
        reqs += [(torch.randn(1, 3, 16, 16, generator=g),),  # contiguous at run time
                 (torch.randn(1, 3, 16, 16, generator=g).to(memory_format=torch.channels_last),)]
    if name == "batch1":
        reqs.append((torch.randn(4, 3, 16, 16, generator=g),))
    return reqs


def _check(c: CoinferClient, module: nn.Module, x: tuple, what) -> None:
    y = c(*x)
    rep = c.last_report
    assert not rep.fallback, (what, rep.fallback_reason)
    eager = _eager(module, x)
    assert structure(y) == structure(eager), (what, structure(y), structure(eager))
    assert max_abs_diff(y, c.reference(*x)) == 0.0, (what, rep)
    assert within_tolerance(y, eager), (what, max_abs_diff(y, eager))


MJOA_SLOW = {"tf_encoder_padded_flat"}
"""Models whose ``mjoa`` plan table takes ~10 s to search (``partitioner.online.precompute``): that policy runs in
``test_the_slow_policies_equal_the_eager_model`` (slow); ``mjoa`` stays here on ``tf_encoder`` (the same encoder
built with the nested fast path)."""
SLOW_POLICIES = ["dads"]
"""Run on every model in ``test_the_slow_policies_equal_the_eager_model`` (slow) only: on this suite's fast link
and 20x UE, dads chose the local run or full offload (the splits ``local`` and ``offload`` run here) on every model
(session 31); ``mjoa``, which chose interior splits on some (nested_input, pinned_mid, bool_half, gpt_causal), stays
in the default run, and ``tests/test_user_zoo_splits.py`` runs fixed interior cuts."""


def _every_policy(server, name: str, policies) -> None:
    module, example = getattr(uz, name)()
    graph = None
    for policy in policies:
        # The first policy's client captures the user's module (and checks it against eager); the others
        # take that graph (the ModelGraph form of the API): a capture per client was ~3/4 of this test's
        # time and checks nothing a policy changes. batch1 keeps the module: its 4-batch request captures
        # a second signature from it.
        model = module if graph is None or name == "batch1" else graph
        with CoinferClient(model, example, name=name, server=server.address, policy=policy, link=FAST,
                           tenant=new_tenant(), profile_runs=2, fallback=False, ue_slowdown=20.0) as c:
            graph = c.graph
            for i, x in enumerate(_requests(name, example)):
                _check(c, module, x, (name, policy, i))
            if policy == "offload":
                g, rep = c.graph, c.reports[0]
                assert rep.server_ops > 0, rep
                if all(is_allowed(op.target) for op in g.ops):
                    assert rep.ue_ops == 0 and rep.pinned == [], rep
                else:  # only the op off the allowlist and its descendants stay here
                    pinned = pin_off_allowlist(g)
                    assert rep.ue_ops == pinned.kept_on_ue and rep.server_ops == len(g.ops) - pinned.kept_on_ue, rep
                    assert rep.pinned == pinned.to_json()["pinned"] and rep.pinned, rep


@pytest.mark.parametrize("name", RUNS)
def test_user_model_every_policy_equals_the_eager_model(server, name):
    _every_policy(server, name, [p for p in POLICIES if p not in SLOW_POLICIES
                                 and not (p == "mjoa" and name in MJOA_SLOW)])


@pytest.mark.slow  # covered: test_user_model_every_policy_equals_the_eager_model (local, offload, mjoa; see above)
@pytest.mark.parametrize("name", RUNS)
def test_the_slow_policies_equal_the_eager_model(server, name):
    _every_policy(server, name, SLOW_POLICIES + (["mjoa"] if name in MJOA_SLOW else []))


@pytest.mark.parametrize("name", ["dict_out", "nested_out", "none_leaf", "topk_tail", "lstm"])
def test_structured_outputs_through_the_spec_string_and_the_local_engine(name):
    """The same models named by spec (as the CLI loads them) and run without a server."""
    module, example = getattr(uz, name)()
    c = CoinferClient(uz.spec(name))
    y = c(*example)
    assert structure(y) == structure(_eager(module, example))
    assert max_abs_diff(y, c.reference(*example)) == 0.0 and within_tolerance(y, _eager(module, example))


def test_aliased_example_inputs_are_captured_as_two_inputs():
    module, example = uz.aliased()
    c = CoinferClient(module, example)
    assert len(c.graph.inputs) == 2
    a, b = torch.randn(1, 16), torch.randn(1, 16)
    y = c(a, b)
    assert max_abs_diff(y, _eager(module, (a, b))) <= 1e-6
    assert max_abs_diff(y, module.fa(b) + module.fb(b)) > 1e-3  # what a merged capture would compute


def test_library_inputs_numpy_and_dtype_mismatch():
    module, example = uz.several_inputs()
    c = CoinferClient(module, example)
    y = c(*(t.numpy() for t in example))
    assert max_abs_diff(y, c.reference(*example)) == 0.0
    with pytest.raises(ValueError, match=r"input 'image' .*has dtype float64; the model expects float32"):
        c(example[0].double(), *example[1:])
    with pytest.raises(ValueError, match=r"input 'ids' .*has dtype float32; the model expects int64"):
        c(example[0], example[1], example[2].float().numpy())  # a numpy array of the wrong dtype too
    mn, (batch, scale) = uz.nested_input()
    cn = CoinferClient(mn, (batch, scale))
    as_np = {"image": batch["image"].numpy(), "extra": [batch["extra"][0].numpy(), {"ids": batch["extra"][1]["ids"]}]}
    assert max_abs_diff(cn(as_np, scale), cn.reference(batch, scale)) == 0.0
    as_np["image"] = as_np["image"].astype("float64")
    with pytest.raises(ValueError, match=r"\['image'\]\) has dtype float64; the model expects float32"):
        cn(as_np, scale)
    m64, ex64 = uz.float64()
    c64 = CoinferClient(m64, ex64)
    assert c64(np.asarray(ex64[0])).dtype == torch.float64
    with pytest.raises(InputError, match="float32"):
        c64(ex64[0].float())


# ---- refusals ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", REFUSED)
def test_refused_models_one_line_exit_2(server, cli, name):
    rc, _, err = cli("run", "--server", server.address, "--model", uz.spec(name), "--policy", "offload")
    lines = [x for x in err.strip().splitlines() if x]
    assert rc == 2 and len(lines) == 1, err
    assert uz.REFUSAL_HINTS[name] in lines[0] and "Traceback" not in err, lines[0]
    module, example = getattr(uz, name)()
    with pytest.raises(InputError, match=re.escape(uz.REFUSAL_HINTS[name])):
        CoinferClient(module, example)


# ---- the CLI's inputs through a real server -------------------------------------------------------------------
def test_cli_pt_dict_file_and_input_shape_with_dtypes(server, cli, tmp_path):
    _, (image, table, ids) = uz.several_inputs()
    x = tmp_path / "x.pt"
    torch.save({"ids": ids, "image": image, "table": table}, x)  # matched by name, not by order
    out = tmp_path / "r.json"
    rc, _, err = cli("run", "--server", server.address, "--model", uz.spec("several_inputs"), "--policy", "offload",
                        "--input", str(x), "--verify", "--requests", "2", "--uplink-mbps", "400", "--rtt-ms", "2",
                        "--tenant", new_tenant(), "--json", str(out))
    assert rc == 0, err
    d = json.loads(out.read_text())
    assert d["error"] is None and len(d["requests"]) == 2
    for r in d["requests"]:
        assert r["server_ops"] > 0 and not r["fallback"] and r["max_abs_diff_vs_local"] == 0.0
        assert r["max_abs_diff_vs_eager"] <= 1e-4

    rc, _, err = cli("run", "--server", server.address, "--model", uz.spec("int_input"), "--policy", "offload",
                        "--input-shape", "3,20:int64", "--verify", "--uplink-mbps", "400", "--rtt-ms", "2",
                        "--tenant", new_tenant(), "--json", str(out))
    assert rc == 0, err
    (r,) = json.loads(out.read_text())["requests"]
    assert r["server_ops"] > 0 and r["max_abs_diff_vs_local"] == 0.0

    torch.save(torch.randn(1, 8), x)
    rc, _, err = cli("run", "--server", server.address, "--model", uz.spec("int_input"), "--input", str(x))
    assert rc == 2 and "float32" in err and "int64" in err and len(err.strip().splitlines()) == 1, err


# ---- fallback: the server process killed mid-request -----------------------------------------------------------
class WideHeads(nn.Module):
    """A nested-output model with ~3 MB of weights: long enough to upload over a 2 Mbps link that the
    server can be killed while the request uploads them; one output through an op off the allowlist."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(64, 768)
        self.wide = nn.Linear(768, 1024)
        self.head = nn.Linear(1024, 4)

    def forward(self, x: torch.Tensor):
        h = self.wide(self.body(x).relu()).relu()
        # cumprod is off the server's allowlist: it and its mean run here after the rest (the pinned tail)
        return {"logits": self.head(h), "aux": [torch.cumprod(h[:, :8], 1).mean(1), None], "scale": 0.5}


def test_fallback_after_server_killed_mid_request_equals_the_reference():
    from testbed.launcher import edge_server_process
    from testbed.linkemu import emulated_link

    torch.manual_seed(0)
    module, x = WideHeads().eval(), (torch.randn(1, 64, generator=torch.Generator().manual_seed(1)),)
    with edge_server_process(threads=1) as (proc, port), \
            emulated_link("127.0.0.1", port, uplink_mbps=2, rtt_ms=5) as relay, \
            CoinferClient(module, x, server=f"127.0.0.1:{relay}", policy="offload", tenant=new_tenant(),
                          probe=False, timeout_ms=120_000, profile_runs=2, link={"uplink_mbps": 400, "rtt_ms": 2},
                          server_ops=0, data_channel=False) as c:  # weights on the relay's 2 Mbit/s
        c.engine.connect()
        killer = threading.Timer(1.0, lambda: os.kill(proc.pid, signal.SIGKILL))
        killer.start()
        try:
            y = c(*x)
        finally:
            killer.cancel()
        rep = c.last_report
        assert rep.fallback and rep.fallback_reason, rep
        assert [p["target"] for p in rep.pinned] == [uz.OFF_ALLOWLIST], rep.pinned
        ref = c.reference(*x)
        assert structure(y) == structure(ref) == structure(_eager(module, x))
        assert max_abs_diff(y, ref) == 0.0
        assert within_tolerance(y, _eager(module, x))


def test_cli_no_fallback_server_death_keeps_finished_requests_in_json(tmp_path):
    """``--no-fallback`` and the server killed between requests: exit 2 with one line, and the ``--json``
    report still holds the finished request, with the error that ended the run."""
    import subprocess
    import sys
    import time

    from testbed.launcher import edge_server_process

    out = tmp_path / "r.json"
    with edge_server_process(threads=1) as (proc, port):
        cli = subprocess.Popen(
            [sys.executable, "-m", "ue_client.cli", "run", "--server", f"127.0.0.1:{port}", "--model",
             uz.spec("dict_out"), "--policy", "offload", "--no-fallback", "--requests", "3", "--interval-ms", "1500",
             "--uplink-mbps", "400", "--rtt-ms", "2", "--tenant", new_tenant(), "--json", str(out)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            for line in cli.stdout:
                if line.split()[:2] == ["1", "offload"]:  # the first request's row: it finished
                    os.kill(proc.pid, signal.SIGKILL)
                    break
            _, err = cli.communicate(timeout=120)
        finally:
            if cli.poll() is None:
                cli.kill()
                cli.wait()
        deadline = time.monotonic() + 10
        while proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
    lines = [x for x in err.strip().splitlines() if x]
    assert cli.returncode == 2 and len(lines) == 1 and "Traceback" not in err, err
    d = json.loads(out.read_text())
    assert len(d["requests"]) >= 1 and d["error"], d
    assert d["requests"][0]["server_ops"] > 0 and not d["requests"][0]["fallback"]


# ---- an op off the server's allowlist pins only itself and its descendants ------------------------------------
def _ancestors(g, name: str) -> set[str]:
    out, todo = set(), [name]
    while todo:
        for r in g.op_by_name[todo.pop()].tensor_inputs:
            p = g.producer.get(r)
            if p is not None and p not in out:
                out.add(p)
                todo.append(p)
    return out


@pytest.mark.parametrize("policy", ["offload", "dads", "mjoa"])
def test_ops_before_an_off_allowlist_op_still_go_to_the_server(server, policy):
    module, example = uz.pinned_mid()
    # a UE 200x slower than this CPU: offloading the head pays for dads and mjoa too (at 20x this faster CPU
    # left the whole small model cheaper on the UE than a round trip, and they kept it local)
    with CoinferClient(module, example, server=server.address, policy=policy, link=FAST, tenant=new_tenant(),
                       profile_runs=2, fallback=False, ue_slowdown=200.0) as c:
        g = c.graph
        (off,) = [op.name for op in g.ops if op.target == uz.OFF_ALLOWLIST]
        assert not is_allowed(uz.OFF_ALLOWLIST)
        pinned = pin_off_allowlist(g)
        before = _ancestors(g, off)
        y = c(*example)
        rep = c.last_report
        assert max_abs_diff(y, c.reference(*example)) == 0.0 and not rep.fallback
        assert rep.pinned == [{"op": off, "target": uz.OFF_ALLOWLIST, "kept_on_ue": pinned.kept_on_ue}]
        assert rep.ue_ops + rep.server_ops == len(g.ops) and rep.ue_ops >= pinned.kept_on_ue
        # more ops on the server than the head has outside ``off``'s ancestors: some of those went too
        assert rep.server_ops > len(pinned.head.ops) - len(before), (rep, len(before))


def test_cli_names_the_pinned_op_and_its_count(server, cli, tmp_path):
    out = tmp_path / "r.json"
    rc, stdout, err = cli("run", "--server", server.address, "--model", uz.spec("pinned_mid"), "--policy", "offload",
                          "--verify", "--uplink-mbps", "400", "--rtt-ms", "2", "--tenant", new_tenant(),
                          "--json", str(out))
    assert rc == 0, err
    module, example = uz.pinned_mid()
    pinned = pin_off_allowlist(CoinferClient(module, example).graph)
    (p,) = pinned.to_json()["pinned"]
    (r,) = json.loads(out.read_text())["requests"]
    assert r["pinned"] == [p] and p["target"] == uz.OFF_ALLOWLIST and p["kept_on_ue"] == pinned.kept_on_ue >= 2
    assert r["ue_ops"] == p["kept_on_ue"] and r["server_ops"] > 0 and r["max_abs_diff_vs_local"] == 0.0
    assert f"pinned: {p['op']} ({uz.OFF_ALLOWLIST}) kept {p['kept_on_ue']} ops on the UE" in stdout


# ---- the CLI's inputs for a model whose argument is a dict holding a list holding a dict -------------------------
def test_cli_random_pt_and_input_shape_for_a_nested_input_model(server, cli, tmp_path):
    out = tmp_path / "r.json"
    base = ["run", "--server", server.address, "--model", uz.spec("nested_input"), "--policy", "offload", "--verify",
            "--uplink-mbps", "400", "--rtt-ms", "2", "--tenant", new_tenant(), "--json", str(out)]
    rc, _, err = cli(*base, "--input", "random", "--requests", "3")
    assert rc == 0, err
    reqs = json.loads(out.read_text())["requests"]
    assert len(reqs) == 3 and all(r["server_ops"] > 0 and not r["fallback"] for r in reqs)
    assert all(r["max_abs_diff_vs_local"] == 0.0 and r["max_abs_diff_vs_eager"] <= 1e-4 for r in reqs)

    _, (batch, _scale) = uz.nested_input()
    x = tmp_path / "x.pt"
    torch.save(batch, x)  # the first argument; the float one is the example's
    rc, _, err = cli(*base, "--input", str(x))
    assert rc == 0, err
    (r,) = json.loads(out.read_text())["requests"]
    assert r["server_ops"] > 0 and r["max_abs_diff_vs_local"] == 0.0

    rc, _, err = cli(*base, "--input-shape", "2,3,16,16:float32;2,5:float32;2,6:int64")  # batch 2, 6 ids
    assert rc == 0, err
    (r,) = json.loads(out.read_text())["requests"]
    assert r["server_ops"] > 0 and r["max_abs_diff_vs_local"] == 0.0

    batch["extra"][1]["ids"] = batch["extra"][1]["ids"].float()  # a float file for the int input: refused
    torch.save(batch, x)
    rc, _, err = cli(*base, "--input", str(x))
    lines = [ln for ln in err.strip().splitlines() if ln]
    assert rc == 2 and len(lines) == 1 and "args[0]['extra'][1]['ids'] is float32" in lines[0] and "int64" in lines[0]


def test_a_server_with_a_narrower_allowlist_gets_the_graph_cut_at_its_list(monkeypatch):
    """The server's Hello lists the ops it runs; an op this build allows but that server does not is
    pinned like an op off our own list (the engine cuts again before profiling), results unchanged."""
    from edge_server import runtime
    from edge_server.slices import allowed_ops
    from edge_server.testing import ServerThread

    linear = "aten.linear.default"
    monkeypatch.setattr(runtime, "allowed_ops", lambda: [t for t in allowed_ops() if t != linear])
    srv = ServerThread().start()
    try:
        module, example = uz.dict_out()  # {"logits": fc(feat), "feat": feat}: only fc is cut off
        with CoinferClient(module, example, server=srv.address, policy="offload", link=FAST, tenant=new_tenant(),
                           profile_runs=2, fallback=False) as c:
            y = c(*example)
            rep = c.last_report
            (fc,) = [op.name for op in c.graph.ops if op.target == linear]
            assert rep.pinned == [{"op": fc, "target": linear, "kept_on_ue": 1}], rep.pinned
            assert all(op.target != linear for op in c.engine.graph.ops)
            assert rep.server_ops == len(c.graph.ops) - 1 > 0 and rep.ue_ops == 1 and not rep.fallback
            assert max_abs_diff(y, c.reference(*example)) == 0.0
    finally:
        srv.stop()
