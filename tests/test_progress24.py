"""The server's progress reports of a request in flight (``SessionResponse.request_progress``) and the client's deadline
that counts them.

Before session 24 a server computing a request sent nothing until its answer, so a client could not tell a slow server
from a stalled one: after its expected time it gave a silent server ``max(1 s, 2 x the split's expected compute +
3 sigma)`` and then completed the request locally, redoing the server's part on the UE. A server slower than its
profile (load on the edge box, a slice validated under load: 96-320 ms seen in session 23) was abandoned while it was
moving. Now a client that sets ``OpenSession.progress_events`` hears, at most every ``progress_interval_ms``, how far
each request got (ops run, cut-tensor bytes received) whenever that moved and nothing else waits to be sent.

The server is real (in-process, a free port); its compute is made slow by running one op per scheduler step and
sleeping after it on the worker thread (what a loaded edge box looks like from the client: the ops end late, the event
loop stays free). The clients are a minimal one written against the proto and the project's own client.
"""

from __future__ import annotations

import functools
import time

import pytest

from edge_server import requests as server_requests
from edge_server.config import ServerConfig
from edge_server.tensor_codec import encode_tensor_chunks
from modelgraph import zoo
from protos.coinfer.v1 import coinfer_pb2 as pb
from tests.checks import recorded_patience
from tests.test_server import model, open_msg, split_of, ue_part, weight_msgs  # noqa: F401  (fixture)
from ue_client import CoinferClient, DeadlineExceeded, deadline, new_tenant, wire
from ue_client import request as ue_request
from ue_client.cli_run import max_abs_diff

INTERVAL_MS = 40
OP_DELAY_S = 0.12
"""Sleep after each server op (one op per scheduler step) in the slowed server."""


@pytest.fixture(scope="module")
def server_options():
    return {"threads": 1, "config": ServerConfig(progress_interval_ms=INTERVAL_MS)}


@pytest.fixture
def slow_ops(monkeypatch):
    """The server runs one op per scheduler step and then sleeps ``delay`` s on its worker thread."""
    orig = server_requests.run_batch
    delay = [OP_DELAY_S]

    def slow(req, start, stop, *a, **k):
        n = orig(req, start, min(stop, start + 1), *a, **k)
        time.sleep(delay[0])
        return n

    monkeypatch.setattr(server_requests, "run_batch", slow)
    return delay


def _paced(msgs: list, pause_s: float, after: int):
    """The messages, with ``pause_s`` before each one from index ``after`` on (a slow uplink, chunk by chunk)."""
    for i, m in enumerate(msgs):
        if i >= after:
            time.sleep(pause_s)
        yield m


def _session(stub, msgs) -> list[pb.SessionResponse]:
    return list(stub.Session(msgs, timeout=60))


@pytest.mark.parametrize("asked", [True, False])
def test_reports_follow_the_inputs_and_the_ops(server, stub, model, slow_ops, asked):  # noqa: F811
    graph, x = model
    split, spec = split_of(graph, 1)
    cut = ue_part(graph, split, x)
    tenant = f"progress-{asked}"
    # the weights first (acknowledged), then the request; its cut tensor in small chunks, 0.1 s apart
    first = open_msg(tenant, spec)
    first.open.progress_events = asked
    setup = [first, *weight_msgs(graph, spec)]
    (name, t), = cut.items()
    chunks = [pb.SessionRequest(tensor=c) for c in encode_tensor_chunks(7, name, t, max(1, t.nbytes // 4))]
    assert len(chunks) >= 4
    begin = pb.SessionRequest(begin_request=pb.BeginRequest(request_id=7))
    msgs = [*setup, begin, *chunks]
    out = _session(stub, _paced(msgs, 0.1, len(setup)))
    kinds = [r.WhichOneof("msg") for r in out]
    assert kinds[0] == "opened" and out[0].opened.limits.progress_interval_ms == INTERVAL_MS
    assert "request_done" in kinds, kinds
    reports = [r.request_progress for r in out if r.WhichOneof("msg") == "request_progress"]
    if not asked:
        assert reports == []
        return
    done_at = kinds.index("request_done")
    assert all(i < done_at for i, k in enumerate(kinds) if k == "request_progress")
    assert {p.request_id for p in reports} == {7}
    assert {p.ops_total for p in reports} == {len(spec.ops)}
    seen = [(p.ops_done, p.input_bytes) for p in reports]
    assert seen == sorted(seen) and len(set(seen)) == len(seen), seen  # only when it moved, never back
    got = [b for _, b in seen]
    assert 0 < got[0] < t.nbytes and got[-1] == t.nbytes, got  # the chunks as they arrived
    ops = [o for o, _ in seen]
    assert len(spec.ops) >= 3 and len({o for o in ops if 0 < o < len(spec.ops)}) >= 2, ops  # op by op


# ---- the project's client: its deadline counts the reports -------------------------------------------------------

FAST = {"uplink_mbps": 400.0, "rtt_ms": 2.0}
SERVER_OPS = 7
"""Ops of the chain model on the server (all but its first: ``server_ops=1``, ops from position 1 on)."""
LATE_S = 0.45
"""Each server op ends this late: reports come that often (well inside the 1 s stall window), and the request is
silent ``SERVER_OPS x LATE_S`` = 3.15 s, past two stall windows (the last cut-tensor bytes may be seen leaving the UE
at the first check, one window into the wait: that is progress too)."""


def _client(server):
    return CoinferClient(zoo.spec("chain"), server=server.address, tenant=new_tenant(), policy="offload",
                         server_ops=1, link=FAST, fallback=False, profile_runs=2, probe=False, data_channel=False)


@pytest.mark.parametrize("reports", [True, False])
def test_a_slow_server_that_reports_is_waited_for(server, slow_ops, monkeypatch, reports):
    """Each of the server's ops ends ``LATE_S`` late: the request is silent for 3.15 s beyond its expected time, past
    the library rule's 1 s stall window twice. With reports it is answered by the server (equal to the user's model);
    without (a client that does not ask, as before session 24) it is given up as stalled."""
    slow_ops[0] = 0.0
    if not reports:
        monkeypatch.setattr(wire, "open_session", functools.partial(wire.open_session, progress_events=False))
    with _client(server) as c:
        x = c.example_inputs
        c(*x)  # cold, under the tests' patient rule: the slice and its weights go up
        rules = []

        def recorded(*a, **k):
            rules.append(deadline.patience_of(*a, **k))
            return rules[-1]

        monkeypatch.setattr(ue_request, "patience_of", recorded)  # the library's rule from here
        slow_ops[0] = LATE_S
        if reports:
            y = c(*x)
            rep = c.last_report
            assert not rep.fallback and rep.server_ops == SERVER_OPS, rep.fallback_reason
            assert max_abs_diff(y, c.reference(*x)) == 0.0
            assert rep.measured_ms >= SERVER_OPS * LATE_S * 1e3
        else:
            with pytest.raises(DeadlineExceeded):
                c(*x)
        rule = rules[-1]
        assert rule.stall_s >= 2 * LATE_S and rule.expected_s + 2 * rule.stall_s < SERVER_OPS * LATE_S, rules


def test_old_server_without_reports_is_understood(server, stub):
    """A server that sends no reports says so (``Limits.progress_interval_ms`` 0); the client reads the field."""
    lim = wire._limits(pb.Limits())
    assert lim.progress_interval_ms == 0
    lim = wire._limits(pb.Limits(progress_interval_ms=250))
    assert lim.progress_interval_ms == 250
    ev = wire.decode_event(pb.SessionResponse(request_progress=pb.RequestProgress(
        request_id=3, ops_done=2, ops_total=5, input_bytes=10)))
    assert ev == wire.Progress(3, 2, 5, 10)


def test_a_server_reporting_without_end_does_not_hold_a_request_for_ever(server, slow_ops, monkeypatch):
    """A server whose reports move for ever (ops run and bytes received counting up without end) while it never
    answers: the client counts reports only up to what its request truly has (its server ops, its cut tensors' bytes
    in ``deadline.INPUT_STEPS``), so it gives the request up as stalled after at most that many stall windows. Before
    the cap it waited for ever (here: until a 20 s hard deadline). The liar is this server with its reports forged
    and its compute held until the request is stopped."""
    slow_ops[0] = 0.0
    with CoinferClient(zoo.spec("chain"), server=server.address, tenant=new_tenant(), policy="offload", server_ops=6,
                       link=FAST, fallback=False, profile_runs=2, probe=False, data_channel=False,
                       deadline_slack_ms=200, timeout_ms=None) as c:
        x = c.example_inputs
        c(*x)  # cold, honest
        monkeypatch.setattr(ue_request, "patience_of", deadline.patience_of)  # the library's rule from here
        count = [0]

        def lying(self):
            count[0] += 1
            return count[0], count[0] * 1000

        def held(req, *a, **k):
            while not req.stopped:
                time.sleep(0.01)
            return 0

        monkeypatch.setattr(server_requests._Request, "progress", lying)
        monkeypatch.setattr(server_requests, "run_batch", held)
        rule = recorded_patience(monkeypatch, 20.0)
        t0 = time.perf_counter()
        with pytest.raises(DeadlineExceeded):
            c(*x)
        took = time.perf_counter() - t0
        steps = 2 + deadline.INPUT_STEPS  # the chain's last two ops on the server
        assert count[0] > 2, count  # the server reported moves past the request's two ops
        assert took < (steps + 2) * rule[-1].stall_s + 2.0 < 20.0, (took, rule[-1])
