"""What a hostile edge server sends cannot hang the UE, grow its memory without bound, or poison its later requests.

A server (compromised, buggy, or not the one the user meant: ``tests.liar_proxy`` in front of a real one) chose, before
session 25: the pace of the UE's uplink (an uplink share of 1e-300 scheduled one chunk 1e297 s ahead: the session never
sent again, and every later request fell back), the size of every message the UE sent (``max_chunk_bytes`` 1: weights
a byte a message, a cold request that never ended), how long a request waited (a server that took the weights and never
acknowledged them, answering health checks, held a cold request for ever), what the UE kept in memory (acks of weights
never sent, answers of slices never defined: 200,000 acks grew it by 66 MB), and what its cost model learnt (NaN or
1e300 compute times). ``tests/hostile_attacks25.py`` is the sweep these came from
(docs/results/attack/session25/hostile_server.md).
"""

from __future__ import annotations

import math
import time

import pytest

from modelgraph import zoo
from protos.coinfer.v1 import coinfer_pb2 as pb
from protos.values import ServerTimings
from tests.checks import equals_user_model, recorded_patience
from tests.liar_proxy import LiarProxy
from ue_client import CoinferClient, DeadlineExceeded, deadline, new_tenant, wire
from ue_client import request as ue_request

FAST = {"uplink_mbps": 400.0, "rtt_ms": 2.0}
FLOOR = 1e-3
"""``wire.MIN_SHARE`` (a literal here: the tests are collected against code without it, to show they fail there)."""


def _client(address, **kw):
    return CoinferClient(zoo.spec("chain"), server=address, tenant=new_tenant(), policy="offload", server_ops=1,
                         link=FAST, profile_runs=2, probe=False, data_channel=False, **kw)


class Liar:
    """The proxy's rewrite: honest while ``lie`` is None, else ``lie(response)`` (an iterable of responses)."""

    def __init__(self):
        self.lie = None

    def __call__(self, r: pb.SessionResponse):
        if self.lie is None:
            yield r
        else:
            yield from self.lie(r)


# ---- what the decoder takes ------------------------------------------------------------------------------------
@pytest.mark.parametrize("sent, taken", [(math.nan, 1.0), (-1.0, 1.0), (math.inf, 1.0), (0.0, 1.0),
                                         (1e-300, FLOOR), (5.0, 1.0), (0.25, 0.25)])
def test_a_servers_compute_share_is_a_number_in_its_range(sent, taken):
    """SessionOpened's compute share is taken in [MIN_SHARE, 1], a value that is not a positive number as none given
    (1.0); ShareChanged's likewise, none given (0.0) keeping the session's. A NaN share made every later plan of the
    session local (the planner read it as the floor: the server 1000x slower), for good."""
    opened = wire.decode_event(pb.SessionResponse(opened=pb.SessionOpened(session_id="s", share=sent)))
    assert opened.share == taken
    changed = wire.decode_event(pb.SessionResponse(share_changed=pb.ShareChanged(share=sent)))
    assert changed.share == (taken if math.isfinite(sent) and sent > 0 else 0.0)


@pytest.mark.parametrize("sent, taken", [(math.nan, 0.0), (-1.0, 0.0), (math.inf, 0.0), (1e-300, FLOOR),
                                         (5.0, 1.0), (0.25, 0.25)])
def test_a_servers_uplink_share_is_a_number_in_its_range(sent, taken):
    ev = wire.decode_event(pb.SessionResponse(share_changed=pb.ShareChanged(uplink_share=sent,
                                                                            request_uplink_share=sent)))
    assert ev.uplink_share == taken and ev.request_uplink_share == taken


def test_the_share_floor_is_the_planners():
    assert wire.MIN_SHARE == FLOOR


def test_a_servers_limits_on_what_the_ue_sends_are_clamped():
    """``max_chunk_bytes`` sizes every message the UE sends (1 byte: a cold request of the chain model took > 90 s,
    2 bytes: 16 s, each warm one 6 s instead of 4 ms); it is taken within ``SERVER_CHUNK_BYTES``, the pack count
    within ``MAX_PACK``, the data port within TCP's."""
    lo, hi = wire.SERVER_CHUNK_BYTES
    for sent, taken in ((1, lo), (2, lo), (2**64 - 1, hi), (4 << 20, 4 << 20), (0, 4 << 20)):
        assert wire._limits(pb.Limits(max_chunk_bytes=sent)).max_chunk_bytes == taken
    assert wire._limits(pb.Limits(max_chunks_per_message=2**32 - 1)).max_chunks_per_message == wire.MAX_PACK
    assert wire._limits(pb.Limits(data_port=70000)).data_port == 0
    assert wire._limits(pb.Limits(data_port=5000)).data_port == 5000


def test_timings_that_cannot_be_true_are_not_learnt_from():
    ok = ServerTimings(total_ms=5.0, compute_ms=3.0, input_wait_ms=0.0, weight_wait_ms=0.0, queue_ms=1.0)
    assert ue_request.plausible_timings(ok, 10.0)
    for c, q in ((math.nan, 0.0), (math.inf, 0.0), (-1.0, 0.0), (1e300, 0.0), (3.0, -5.0), (3.0, 9.0)):
        t = ServerTimings(total_ms=5.0, compute_ms=c, input_wait_ms=0.0, weight_wait_ms=0.0, queue_ms=q)
        assert not ue_request.plausible_timings(t, 10.0), (c, q)


# ---- against a real server behind the liar ----------------------------------------------------------------------
def test_a_tiny_uplink_share_does_not_stop_the_uplink(server):
    """The liar gives the session an uplink share of 1e-300 once, then is honest. Before: the share paced the uplink at
    1e-300 x the cell, one chunk was scheduled 1e297 s ahead, and every later request of the session fell back
    (deadline) for good. Now the share counts as ``MIN_SHARE``: requests are slow while it holds (the server's right)
    and answered by the server."""
    liar = Liar()
    with LiarProxy(server.address, liar) as proxy, _client(proxy.address, cell_uplink_mbps=400.0,
                                                           deadline_slack_ms=300) as c:
        x = c.example_inputs
        c(*x)  # cold, honest

        def tiny(r):
            yield r
            if r.WhichOneof("msg") == "request_done":
                yield pb.SessionResponse(share_changed=pb.ShareChanged(uplink_share=1e-300))
                liar.lie = None

        liar.lie = tiny
        c(*x)  # answered; the share comes after it
        time.sleep(0.2)
        for _ in range(2):
            y = c(*x)
            rep = c.last_report
            assert not rep.fallback, rep.fallback_reason
            assert equals_user_model(c, y, x)


def test_a_server_that_takes_the_weights_and_never_answers_does_not_hold_a_cold_request(server, monkeypatch):
    """The liar passes every weight to the server and the client nothing back: no acknowledgement, no output, no
    answer; health checks are answered. Each answered check counted as the server still reading the unacknowledged
    weights: the cold request waited for ever (> 60 s; here a 20 s hard deadline ends it). Now the same unacknowledged
    bytes are waited for at most ``deadline.read_window_s``: given up after a few stall windows, completed locally."""
    liar = Liar()

    def swallow(r):
        if r.WhichOneof("msg") not in ("weight_stored", "weights_stored", "output", "request_done",
                                       "request_progress"):
            yield r

    liar.lie = swallow
    rule = recorded_patience(monkeypatch, 20.0)
    with LiarProxy(server.address, liar) as proxy, _client(proxy.address, deadline_slack_ms=300, fallback=False) as c:
        x = c.example_inputs
        t0 = time.perf_counter()
        with pytest.raises(DeadlineExceeded):
            c(*x)
        took = time.perf_counter() - t0
        r = rule[-1]
        assert took < r.expected_s + 6 * r.stall_s + 2.0, (took, r)
        liar.lie = None
        end = time.monotonic() + 10.0
        while True:  # honest again: past the back-off, the server answers (the weights are sent again)
            try:
                y = c(*x)
                break
            except Exception:
                assert time.monotonic() < end
                time.sleep(0.2)
        assert equals_user_model(c, y, x)


def test_acks_and_slice_answers_of_what_the_ue_never_sent_are_not_kept(server):
    """After an answer the liar sends 20,000 acknowledgements of weights never sent and 20,000 SliceDefined under ids
    never defined. Before, the session kept each (200,000 acks: +66 MB); now slice answers only of ids it defined,
    acks of weights never sent only up to ``MAX_UNSOLICITED_ACKS``, and the session still works."""
    n = 20_000
    liar = Liar()

    def flood(r):
        yield r
        if r.WhichOneof("msg") == "request_done":
            liar.lie = None
            for i in range(n // 1000):
                yield pb.SessionResponse(weights_stored=pb.WeightsStored(weights=[
                    pb.WeightStored(sha256=f"{i:032x}{j:032x}", nbytes=1) for j in range(1000)]))
            for i in range(n):
                yield pb.SessionResponse(slice_defined=pb.SliceDefined(slice_id=f"bogus{i}", graph_hash="x"))
            yield pb.SessionResponse(weight_stored=pb.WeightStored(sha256="f" * 64, nbytes=1))

    with LiarProxy(server.address, liar) as proxy, _client(proxy.address) as c:
        x = c.example_inputs
        c(*x)  # cold, honest
        sess = c.engine.conn.session
        held, slices, acks = len(sess.held), len(sess.slice_acks), sess.ack_messages
        liar.lie = flood
        c(*x)
        end = time.monotonic() + 20.0
        while sess.ack_messages < acks + n // 1000 + 1 and time.monotonic() < end:
            time.sleep(0.05)  # (the flood is read by the session's receiver; its last message an ack)
        assert sess.ack_messages >= acks + n // 1000 + 1
        # (a warm request sends no weights; ``session.MAX_UNSOLICITED_ACKS``, 1024, of weights never sent are kept)
        assert len(sess.held) <= held + 1024, len(sess.held)
        assert len(sess.slice_acks) <= slices + 1, len(sess.slice_acks)
        y = c(*x)
        assert not c.last_report.fallback and equals_user_model(c, y, x)


@pytest.mark.parametrize("cost", [math.nan, -1.0, math.inf])
def test_a_profile_that_is_not_a_time_is_refused_not_raised(server, cost):
    """The liar's ProfileGraph gives every op a cost of NaN, -1 or inf ms. Before: NaN and -1 reached the planner's cost
    graph and every call of the user raised CostGraphError; inf went into the profile sent at each OpenSession, which
    the server refused: every request fell back, for good. Now the profile is refused (the client plans with its own
    op times) and the server answers."""
    def lie(r):
        for o in r.ops:
            o.mean_ms = cost
        return r

    with LiarProxy(server.address, Liar(), unary={"ProfileGraph": lie}) as proxy, _client(proxy.address) as c:
        x = c.example_inputs
        for _ in range(2):
            y = c(*x)
            assert equals_user_model(c, y, x)
        rep = c.last_report
        assert not rep.fallback and rep.server_ops > 0, rep.fallback_reason


def test_a_huge_error_message_is_cut(server):
    """The liar answers a request with RequestFailed carrying a 6 MB message: it went whole into the exception, the
    log line and the report (one such answer: +77 MB of RSS). Now the UE keeps its first ``MAX_MESSAGE_CHARS``."""
    liar = Liar()

    def fail(r):
        if r.WhichOneof("msg") == "request_done":
            liar.lie = None
            yield pb.SessionResponse(request_failed=pb.RequestFailed(request_id=r.request_done.request_id, code=13,
                                                                     message="E" * (6 << 20)))
            return
        yield r

    with LiarProxy(server.address, liar) as proxy, _client(proxy.address) as c:
        x = c.example_inputs
        c(*x)  # cold, honest
        liar.lie = fail
        y = c(*x)
        rep = c.last_report
        assert rep.fallback and equals_user_model(c, y, x)
        assert "EEEE" in rep.fallback_reason and len(rep.fallback_reason) < 10_000


def test_a_query_claiming_every_weight_does_not_poison_the_session(server, monkeypatch):
    """The liar's QueryWeights says the server holds every weight (it holds none). The UE sent none, the request waited
    for them and fell back, and so did every later request of the session, for good (honest answers notwithstanding:
    the UE never doubted the claim). Now a request given up doubts the weights only the query vouched for: the next
    requests send them and the server answers."""
    liar = Liar()
    claimed = []
    monkeypatch.setattr(ue_request, "patience_of", deadline.patience_of)  # the library's rule (conftest: 20 s stalls)

    def all_present(r):
        r.present[:] = claimed
        return r

    with LiarProxy(server.address, liar, unary={"QueryWeights": all_present}) as proxy, \
            _client(proxy.address, deadline_slack_ms=300) as c:
        claimed += list(c.engine.uploads.sha_names)
        x = c.example_inputs
        end = time.monotonic() + 20.0
        served = 0
        while served < 2:
            assert time.monotonic() < end, "the server never answered"
            y = c(*x)
            assert equals_user_model(c, y, x)
            served += not c.last_report.fallback and c.last_report.server_ops > 0
            time.sleep(0.1)


def test_an_honest_server_that_stalls_once_is_not_sent_the_weights_it_holds(server, monkeypatch):
    """The tenant's weights are on the server (another client of the tenant sent them); this client's QueryWeights is
    told so, truly. One request goes unanswered (the server stalled: here the proxy holds its answer back) and is given
    up. The server's answer to the slice's definition listed no weight as missing, so none is doubted: nothing is sent
    again. Before (session 25's first rule, doubting every weight no acknowledgement confirmed) the next request
    re-sent them all (resnet18: 46.7 MB after one 2.5 s stall, session 25's fresh tester)."""
    tenant = new_tenant()
    opts = dict(tenant=tenant, policy="offload", server_ops=1, link=FAST, profile_runs=2, probe=False,
                data_channel=False)
    with CoinferClient(zoo.spec("chain"), server=server.address, **opts) as a:
        a(*a.example_inputs)  # the tenant's weights go up
        assert a.last_report.server_ops > 0 and not a.last_report.fallback
    monkeypatch.setattr(ue_request, "patience_of", deadline.patience_of)  # the library's rule (conftest: 20 s stalls)
    liar = Liar()

    def stalled(r):
        if r.WhichOneof("msg") not in ("output", "request_done", "request_progress", "progress_batch"):
            yield r

    with LiarProxy(server.address, liar) as proxy, \
            CoinferClient(zoo.spec("chain"), server=proxy.address, deadline_slack_ms=300, **opts) as b:
        x = b.example_inputs
        b(*x)
        assert b.last_report.server_ops > 0 and not b.last_report.fallback
        q = b.engine.conn.session.queue
        sent = q.sent.weight_bytes
        assert sent == 0, sent  # the server held them: QueryWeights said so
        liar.lie = stalled
        b(*x)
        assert b.last_report.fallback  # given up, completed locally
        liar.lie = None
        end = time.monotonic() + 10.0
        while True:  # past the client's back-off after the trouble
            y = b(*x)
            if not b.last_report.fallback or time.monotonic() > end:
                break
            time.sleep(0.2)
        assert not b.last_report.fallback and equals_user_model(b, y, x)
        assert b.engine.conn.session.queue is q and q.sent.weight_bytes == 0, q.sent.weight_bytes


@pytest.mark.parametrize("lie", [math.nan, 1e300, -1e300])
def test_timings_that_cannot_be_true_do_not_move_the_cost_model(server, lie):
    """The liar reports each answered request's compute and queueing as NaN, 1e300 or -1e300 ms. Before, each moved the
    transport residual to its clamp (-1000 or +1000 ms: the planner's predictions went from 2.4 ms to 0.2 or 1002 ms,
    for the 32 requests of the window); now they are not learnt from."""
    liar = Liar()

    def timings(r):
        if r.WhichOneof("msg") == "request_done":
            r.request_done.timings.compute_ms = r.request_done.timings.queue_ms = lie
        yield r

    with LiarProxy(server.address, liar) as proxy, CoinferClient(
            zoo.spec("chain"), server=proxy.address, tenant=new_tenant(), policy="auto", link=FAST, profile_runs=2,
            probe=False, data_channel=False, ue_slowdown=40.0) as c:  # (a slow UE: the plans offload)
        x = c.example_inputs
        for _ in range(2):
            c(*x)  # honest
        liar.lie = timings
        for _ in range(6):
            y = c(*x)
            assert equals_user_model(c, y, x)
        assert c.last_report.server_ops > 0
        cm = c.engine.cost_model
        assert abs(cm.transport_ms) < 200 and 0.1 < cm.scale["server"] < 10, (cm.transport_ms, cm.scale)


def test_acks_posted_while_the_client_idles_are_bounded(server):
    """Acknowledgements of the model's own weights, repeated by a server while the client runs no request (nothing
    drains them), are kept up to ``MAX_WEIGHT_ACKS``: 200,000 of them grew the client by 12.7 MB before."""
    from ue_client.uploads import MAX_WEIGHT_ACKS

    with _client(server.address) as c:
        c(*c.example_inputs)
        up = c.engine.uploads
        post = up.ack_handler(c.engine.conn.generation)
        sha = next(iter(up.sha_names))
        for _ in range(3 * MAX_WEIGHT_ACKS):
            post(wire.WeightAck(sha, 1, True), 0.0)
        assert len(up._events) <= MAX_WEIGHT_ACKS


def test_a_data_channel_that_delivers_nothing_is_abandoned(server, monkeypatch):
    """The liar advertises a data channel that takes the ticket and then reads nothing (the gRPC stream and its health
    checks work). Before: the first request waited for ever (F1), and with F1's bound alone every request of the
    session still sent its weights there and fell back at its deadline. Now the request that gives up on them
    abandons the channel: its weights go in the session stream and the next requests are served."""
    from tests.hostile_attacks25 import Blackhole

    hole = Blackhole(hold_s=60.0)
    liar = Liar()

    def blackhole(r):
        if r.WhichOneof("msg") == "opened":
            r.opened.limits.data_port, r.opened.data_ticket = hole.port, b"\1" * 32
        yield r

    liar.lie = blackhole
    rule = recorded_patience(monkeypatch, 20.0)
    try:
        with LiarProxy(server.address, liar) as proxy, CoinferClient(
                zoo.spec("chain"), server=proxy.address, tenant=new_tenant(), policy="offload", server_ops=1,
                link=FAST, profile_runs=2, probe=False, data_channel=True, deadline_slack_ms=300) as c:
            x = c.example_inputs
            t0 = time.perf_counter()
            y = c(*x)
            assert c.last_report.fallback and equals_user_model(c, y, x)
            assert time.perf_counter() - t0 < rule[-1].expected_s + 6 * rule[-1].stall_s + 2.0
            end = time.monotonic() + 10.0
            while True:  # past the back-off: served, the weights in-stream
                y = c(*x)
                assert equals_user_model(c, y, x)
                if not c.last_report.fallback:
                    break
                assert time.monotonic() < end, c.last_report.fallback_reason
                time.sleep(0.2)
    finally:
        hole.sock.close()


def test_op_timings_not_asked_for_are_not_kept(server):
    """The liar adds 100,000 per-op timings to each answer, unasked. Every report is kept (``CoinferClient.reports``)
    and each kept them (a few MB per request, without bound over a stream); now op timings are kept only when asked
    for (``op_timings``) and no more than the split's server ops."""
    liar = Liar()

    def many(r):
        if r.WhichOneof("msg") == "request_done":
            r.request_done.timings.ops.extend(pb.OpTiming(name=f"op{i}", start_ms=0.0, ms=0.0) for i in range(100_000))
        yield r

    with LiarProxy(server.address, liar) as proxy, _client(proxy.address) as c:
        x = c.example_inputs
        c(*x)  # cold, honest
        liar.lie = many
        for _ in range(2):
            y = c(*x)
            assert equals_user_model(c, y, x)
            rep = c.last_report
            assert not rep.fallback and len(rep.server_op_times) <= rep.server_ops, len(rep.server_op_times)


def test_a_profile_that_never_comes_costs_one_wait(server, monkeypatch):
    """The liar's ProfileGraph answers after 4 s (here: past the client's wait, ``PROFILE_TIMEOUT_S``, set to 1 s).
    Before, a timeout failed the connect (600 s at most), so every connect attempt waited it again; now the client
    plans with its own op times as the server's after one wait, and the next calls do not ask again."""
    from ue_client import calibration

    monkeypatch.setattr(calibration, "PROFILE_TIMEOUT_S", 1.0, raising=False)
    asked = []

    def slow(r):
        asked.append(time.monotonic())
        time.sleep(4.0)
        return r

    with LiarProxy(server.address, Liar(), unary={"ProfileGraph": slow}) as proxy, _client(proxy.address) as c:
        x = c.example_inputs
        t0 = time.perf_counter()
        y = c(*x)
        assert time.perf_counter() - t0 < 3.5
        assert equals_user_model(c, y, x)
        y = c(*x)
        assert equals_user_model(c, y, x)
        assert not c.last_report.fallback and c.last_report.server_ops > 0, c.last_report.fallback_reason
        assert len(asked) == 1
