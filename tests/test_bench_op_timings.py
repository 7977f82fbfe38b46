"""The bench's per-op server timings (``coinfer-testbed bench --op-timings``): a real edge server on port 0,
the bench worker's own request path (``testbed.bench.worker.Ue``), no mocks.

What they are for: telling which server ops of a request ran slower than the same ops of another policy's
request on the same split (issue 12: coinfer's warm requests against DADS+serial's on googlenet)."""

from __future__ import annotations

import pytest

from edge_server.testing import ServerThread
from modelgraph import zoo
from testbed.bench.worker import Ue
from ue_client import new_tenant


@pytest.fixture(scope="module")
def server():
    with ServerThread(cache_mb=64) as srv:
        yield srv


def _ue(server, **extra) -> Ue:
    spec = {"model": zoo.spec("diamond"), "server": server.address, "uplink_mbps": 1000.0, "rtt_ms": 1.0,
            "tenant_prefix": new_tenant(), **extra}
    ue = Ue(spec)
    ue.connect()
    return ue


def test_rows_carry_the_server_ops_in_the_order_they_ran(server) -> None:
    ue = _ue(server, op_timings=True)
    c = ue.client(ue.tenant("offload"), "offload")
    try:
        rows = [ue.request(c, i) for i in range(2)]
        report = c.last_report
    finally:
        c.close()
    server_order = [op.name for op in ue.graph.ops]  # offload: every op on the server, in graph order
    for row in rows:
        assert row["server_ops"] == len(server_order) and not row["fallback"]
        ops = row["server_op_ms"]
        assert [name for name, _, _ in ops] == server_order
        starts = [start for _, start, _ in ops]
        assert starts == sorted(starts) and all(ms >= 0 for _, _, ms in ops)
        # the ops' run times are what the server reports as the request's compute
        assert sum(ms for _, _, ms in ops) == pytest.approx(row["server_timings"]["compute_ms"], rel=1e-3, abs=0.01)
    # the report keeps them out of its dict form (560 entries for googlenet)
    assert len(report.server_op_times) == len(server_order)
    assert "server_op_times" not in report.to_dict()


def test_rows_have_no_op_timings_unless_asked(server) -> None:
    ue = _ue(server)
    c = ue.client(ue.tenant("offload"), "offload")
    try:
        row = ue.request(c, 0)
    finally:
        c.close()
    assert "server_op_ms" not in row and row["server_timings"]["compute_ms"] > 0
    ue.op_timings = True
    c = ue.client(ue.tenant("local"), "local")
    try:
        local = ue.request(c, 0)
    finally:
        c.close()
    assert local["server_op_ms"] == [] and local["server_timings"] is None  # a local request: no server ops


def test_compare_server_ops_tables_two_policies(tmp_path) -> None:
    """``bench/compare_server_ops.py`` on a log of this worker's rows: per request the op kinds' ms, and the
    ops whose medians differ most."""
    import importlib.util
    import json
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "bench" / "compare_server_ops.py"
    spec = importlib.util.spec_from_file_location("compare_server_ops", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)

    def row(i, ops, uploaded=0):
        return {"i": i, "latency_ms": 10.0 + i, "cpu_ms": 1.0, "plan_ms": 0.0, "uploaded_bytes": uploaded,
                "new_slice": False, "server_timings": {"compute_ms": sum(ms for _, _, ms in ops),
                                                       "input_wait_ms": 2.0},
                "server_op_ms": ops}

    fast = [["conv2d", 0.0, 1.0], ["max_pool2d", 1.0, 4.0], ["max_pool2d_1", 5.0, 2.0]]
    slow = [["conv2d", 0.0, 1.5], ["max_pool2d", 1.5, 4.0], ["max_pool2d_1", 5.5, 2.0]]
    log = {"streams": {"coinfer": {"requests": [row(0, slow, uploaded=5), row(1, slow), row(2, slow)]},
                       "dads-serial": {"requests": [row(0, fast), row(1, fast), row(2, fast)]}}}
    (tmp_path / "ue0.json").write_text(json.dumps(log))
    out = tmp_path / "cmp.json"
    assert mod.main([str(tmp_path / "ue0.json"), "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert [r["i"] for r in res["coinfer"]["requests"]] == [1, 2]  # the first (it uploaded) is not warm
    assert res["coinfer"]["requests"][0]["kinds_ms"] == {"conv2d": 1.5, "max_pool2d": 6.0}
    assert res["dads-serial"]["mean_compute_ms"] == 7.0 and res["coinfer"]["mean_compute_ms"] == 7.5
    assert res["top_op_differences"][0] == {"op": "conv2d", "coinfer_ms": 1.5, "dads-serial_ms": 1.0}
    assert mod.main([str(tmp_path / "ue0.json"), "--b", "nope"]) == 2
