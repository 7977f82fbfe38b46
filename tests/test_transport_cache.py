"""A client of a new process starts from what an earlier process of this UE learned about the same server process,
model, given link, slowdown and CPU share (``ue_client.transport_cache``, ``ClientOptions.transport_memory``).

Session 32 (``docs/results/margin/session32/connect_bias.md``): the first decision of a process, made while
connecting, predicted remote requests without the UE's own cost of one (the transport residual and the calls' times
before and after their runs, which ``TransportMemory`` kept for the process only): the investing streams of
session 31's grid took 1.09-1.54x (median 1.17) the stream totals predicted while connecting.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from edge_server.testing import ServerThread
from modelgraph import zoo
from ue_client import transport_cache
from ue_client.calibration import MIN_TRANSPORT_SAMPLES, TRANSPORT_MEMORY
from ue_client.client import CoinferClient

FAST = {"uplink_mbps": 400.0, "rtt_ms": 2.0}
ROOT = Path(__file__).resolve().parents[1]


def _learn(srv, **kw) -> tuple[list[float], dict]:
    """A client that makes split requests and closes: (its residuals, its snapshot)."""
    opts = dict(server=srv.address, policy="offload", link=FAST, probe=False, **kw)
    with CoinferClient(zoo.spec("chain"), **opts) as c:
        x = torch.randn(*c.model.example_inputs[0].shape)
        for _ in range(2 + MIN_TRANSPORT_SAMPLES):  # the first defines the slice (no residual)
            c(x)
        return c.engine.cost_model.transport_residuals, c.engine.cost_model.snapshot()


def test_a_new_process_starts_from_what_the_last_one_kept_for_that_server():
    with ServerThread(threads=1) as srv, ServerThread(threads=1) as other:
        kept, snap = _learn(srv)
        assert len(kept) >= MIN_TRANSPORT_SAMPLES and snap["after"]
        TRANSPORT_MEMORY.forget()  # a new process: nothing in memory
        opts = dict(policy="offload", link=FAST, probe=False)
        with CoinferClient(zoo.spec("chain"), server=srv.address, **opts) as again:
            again.engine.connect()
            cm = again.engine.cost_model
            assert cm.transport_residuals == pytest.approx(kept)
            assert cm.call_after("plan") == pytest.approx(statistics.fmean(snap["after"]["plan"]))
            x = torch.randn(*again.model.example_inputs[0].shape)
            again(x)
            rep = again.last_report
            assert rep.server_ops > 0 and not rep.fallback
            assert rep.predicted_parts["transport_ms"] == pytest.approx(statistics.fmean(kept))
        TRANSPORT_MEMORY.forget()
        # another server process (another instance id), another link given, or the option off: nothing
        for server, kw in ((other.address, {}), (srv.address, {"link": {"uplink_mbps": 100.0, "rtt_ms": 2.0}}),
                           (srv.address, {"transport_memory": False})):
            with CoinferClient(zoo.spec("chain"), server=server, **{**opts, **kw}) as c:
                c.engine.connect()
                assert c.engine.cost_model.transport_residuals == [], (server, kw)
            TRANSPORT_MEMORY.forget()


def test_a_client_with_residuals_in_its_process_keeps_them_over_the_disk():
    with ServerThread(threads=1) as srv:
        kept, _ = _learn(srv)
        path = next(Path(os.environ["COINFER_TRANSPORT_DIR"]).glob("*.json"))
        doc = json.loads(path.read_text())
        doc["residuals"] = [999.0] * len(doc["residuals"])  # what another process wrote since
        path.write_text(json.dumps(doc))
        with CoinferClient(zoo.spec("chain"), server=srv.address, policy="offload", link=FAST, probe=False) as c:
            c.engine.connect()
            assert c.engine.cost_model.transport_residuals[:len(kept)] == pytest.approx(kept)  # the process's own


@pytest.mark.parametrize("bad", [
    "not json", json.dumps([1, 2]), json.dumps({"version": 99}),
    "RESIDUALS:[1e309]", "RESIDUALS:[5000.0]", "RESIDUALS:[true]", "RESIDUALS:" + json.dumps([1.0] * 1000),
    "SCALE:-1", "SCALE:1e9", "SCALE:1e-300", "AFTER:{\"plan\": [-1.0]}", "AFTER:{\"nope\": [1.0]}", "SAVED:0",
    "SAVED:1e30", "SAVED:" + "9" * 400, "VERSION:true", "[" * 100000 + "]" * 100000, "BYTES",
])
def test_a_malformed_or_stale_entry_is_ignored(bad, caplog):
    good = {"version": transport_cache.VERSION, "saved": 1e12, "residuals": [5.0, 6.0], "server_scale": 1.2,
            "after": {"plan": [3.0]}, "before": {}}
    import time

    good["saved"] = time.time()
    key = transport_cache.cache_key("abc", "m", None, 1.0, 0.1)
    transport_cache.store(key, {k: v for k, v in good.items() if k not in ("version", "saved")})
    assert transport_cache.load(key)["residuals"] == [5.0, 6.0]
    path = Path(os.environ["COINFER_TRANSPORT_DIR"]) / f"{key}.json"
    if bad == "BYTES":  # not UTF-8
        path.write_bytes(b"\xff\xfe" + b"\x00" * 10)
    elif ":" in bad and bad.split(":", 1)[0].isupper():
        field, value = bad.split(":", 1)
        doc = dict(good)
        doc[{"RESIDUALS": "residuals", "SCALE": "server_scale", "AFTER": "after", "SAVED": "saved",
             "VERSION": "version"}[field]] = json.loads(value)
        path.write_text(json.dumps(doc))
    else:
        path.write_text(bad)
    caplog.clear()
    with caplog.at_level("WARNING", logger="ue_client.transport_cache"):
        assert transport_cache.load(key) is None
    # a stale entry is just not used; every other one is logged as ignored, naming the file
    assert (caplog.text == "") if bad == "SAVED:0" else (f"{key}.json" in caplog.text and "ignoring" in caplog.text)


def test_no_instance_id_keeps_nothing_and_an_unwritable_directory_loses_the_memory_not_the_request(tmp_path,
                                                                                                    monkeypatch):
    assert transport_cache.cache_key("", "m", None, 1.0, 1.0) is None
    blocked = tmp_path / "file"
    blocked.write_text("")
    monkeypatch.setenv("COINFER_TRANSPORT_DIR", str(blocked / "sub"))
    with ServerThread(threads=1) as srv:
        kept, _ = _learn(srv)  # closing could not write: logged, nothing raised
        assert kept


def test_a_real_second_process_predicts_with_the_first_ones_residuals(tmp_path):
    """Two ``python`` processes in turn against one server, as two runs of ``coinfer-ue run`` would be."""
    script = textwrap.dedent("""
        import json, sys, torch
        from modelgraph import zoo
        from ue_client.client import CoinferClient
        with CoinferClient(zoo.spec("chain"), server=sys.argv[1], policy="offload",
                           link={"uplink_mbps": 400.0, "rtt_ms": 2.0}, probe=False) as c:
            x = torch.randn(*c.model.example_inputs[0].shape)
            c.engine.connect()
            start = c.engine.cost_model.transport_residuals
            for _ in range(4):
                c(x)
            print(json.dumps({"start": start, "end": c.engine.cost_model.transport_residuals}))
    """)
    with ServerThread(threads=1) as srv:
        outs = []
        for _ in range(2):
            p = subprocess.run([sys.executable, "-c", script, srv.address], capture_output=True, text=True,
                               timeout=240, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
            assert p.returncode == 0, p.stderr[-2000:]
            outs.append(json.loads(p.stdout.strip().splitlines()[-1]))
    assert outs[0]["start"] == [] and outs[0]["end"]
    assert outs[1]["start"] == pytest.approx(outs[0]["end"])


def test_a_failed_store_leaves_no_temp_file():
    """break40 F3: a directory where the entry goes (os.replace fails) left the temp file behind."""
    key = transport_cache.cache_key("abc", "m", None, 1.0, 0.1)
    d = Path(os.environ["COINFER_TRANSPORT_DIR"])
    (d / f"{key}.json").mkdir(parents=True)
    snap = {"residuals": [1.0], "server_scale": 1.0, "after": {}, "before": {}}
    assert transport_cache.store(key, snap) is None
    assert transport_cache.store(key, {**snap, "residuals": [float("nan")]}) is None  # not JSON: refused, not written
    assert [p.name for p in d.iterdir()] == [f"{key}.json"]
