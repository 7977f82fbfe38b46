"""A UE's profile (``UeProfile``, at OpenSession and as ``SessionRequest.profile``) is bounded before its
cost graph is parsed, parsed off the event loop and charged to the tenant (``edge_server.profile_intake``).

Before: every profile was strictly parsed on the server's event loop (0.26 s for a 7.6 MiB 40k-op
chain, 2.8 s for an 8 MiB list of zeros, ~185 MiB transient for ``{}`` ops) and not charged to
``--memory-mb``: one client stalled every session and took memory that was not its own. A real server
on port 0, attacked through the protos.
"""

from __future__ import annotations

import threading
import time
import tracemalloc

import grpc
import psutil
import pytest

from edge_server import profile_intake
from edge_server.allocation import MAX_COST_GRAPH_OPS, AraShareAllocator
from edge_server.config import MiB, ServerConfig
from edge_server.profile_intake import SEPARATORS_PER_OP, SLACK, CostGraphShape
from edge_server.testing import ServerThread
from partitioner import chain
from protos.coinfer.v1 import coinfer_pb2 as pb
from protos.coinfer.v1 import coinfer_pb2_grpc as pb_grpc
from ue_client import wire
from ue_client.errors import ServerError
from ue_client.session import SessionStream

CFG = ServerConfig(cache_bytes=32 * MiB, staging_bytes=16 * MiB)
OK = chain([(40.0, 2.0, 4_000, 200_000)] * 3, input_bytes=4_000).to_json()


def _open(stub, graph: bytes, tenant: str = "t", timeout: float = 30) -> grpc.RpcError | None:
    first = pb.SessionRequest(
        open=pb.OpenSession(
            tenant=tenant, model_id="m", profile=pb.UeProfile(cost_graph_json=graph, uplink_mbps=20.0, rtt_ms=5.0)
        )
    )
    try:
        for _ in stub.Session(iter([first, pb.SessionRequest(close=pb.CloseSession())]), timeout=timeout):
            pass
    except grpc.RpcError as e:
        return e
    return None


def _wait(cond, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, what
        time.sleep(0.01)


def test_limits_advertise_the_cost_graph_op_limit():
    """Hello's and SessionOpened's Limits carry ``max_cost_graph_ops`` (ARA's bound by default)."""
    assert ServerConfig().max_cost_graph_ops == MAX_COST_GRAPH_OPS
    with ServerThread(config=CFG) as srv:
        ch = wire.channel(srv.address)
        try:
            assert wire.hello(wire.stub(ch), "t", 10).limits.max_cost_graph_ops == MAX_COST_GRAPH_OPS
            s = SessionStream(wire.stub(ch), "t", "m", profile=wire.UeProfile(OK, 20.0, 5.0))
            assert s.opened.limits.max_cost_graph_ops == MAX_COST_GRAPH_OPS
            s.close()
        finally:
            ch.close()


def test_a_cost_graph_over_the_op_limit_is_refused_unparsed(monkeypatch):
    """The 40k-op chain of session 9's repro (7.6 MiB) and an 8 MiB list of zeros are INVALID_ARGUMENT
    naming ``max_cost_graph_ops`` at OpenSession, and a profile update carrying one ends its session the
    same way, all without the strict parser running on them (their text's objects / separators already
    exceed what 10,000 ops hold); a graph just over the limit whose text does not show it (10,001 ops,
    within the slack of objects) is refused after the parse. The server serves on."""
    parsed = []
    real = profile_intake.strict_json
    monkeypatch.setattr(profile_intake, "strict_json", lambda t, *a: (parsed.append(len(t)), real(t, *a))[1])
    big = chain([(1.0, 0.5, 400, 400)] * 40_000, input_bytes=400).to_json().encode()
    zeros = b'{"ops": [' + b"0," * ((4 << 20) - 64) + b"0]}"  # 8 MiB, within the message limit
    just_over = chain([(1.0, 0.5, 400, 400)] * (MAX_COST_GRAPH_OPS + 1), input_bytes=400).to_json().encode()
    assert CostGraphShape.of(just_over).fits(MAX_COST_GRAPH_OPS) == ""  # only the parse shows it
    with ServerThread(config=CFG) as srv:
        with grpc.insecure_channel(srv.address, options=[("grpc.max_send_message_length", 16 * MiB)]) as ch:
            stub = pb_grpc.EdgeServiceStub(ch)
            for graph in (big, zeros):
                err = _open(stub, graph)
                assert err is not None and err.code() == grpc.StatusCode.INVALID_ARGUMENT, err
                assert "max_cost_graph_ops=10000" in err.details(), err.details()
            assert parsed == [], "the strict parser ran on a graph its shape refuses"
            err = _open(stub, just_over)
            assert err is not None and err.code() == grpc.StatusCode.INVALID_ARGUMENT, err
            assert f"has {MAX_COST_GRAPH_OPS + 1} ops" in err.details(), err.details()
            assert _open(stub, OK.encode()) is None
        ch = wire.channel(srv.address)
        try:
            s = SessionStream(wire.stub(ch), "u", "m", profile=wire.UeProfile(OK, 20.0, 5.0))
            n = len(parsed)
            assert s.update_profile(wire.UeProfile(big.decode(), 0.0, weight=0.0))
            _wait(lambda: s.broken is not None, "the over-limit update to end the stream")
            assert isinstance(s.broken, ServerError) and s.broken.code == "INVALID_ARGUMENT", s.broken
            assert "max_cost_graph_ops" in str(s.broken)
            assert len(parsed) == n
            s.close()
            s = SessionStream(wire.stub(ch), "u", "m", profile=wire.UeProfile(OK, 20.0, 5.0))
            assert s.alive
            s.close()
        finally:
            ch.close()


def test_the_shape_limits_follow_the_configured_op_limit():
    """``max_cost_graph_ops`` (here 50): a 50-op graph opens, a 51-op one does not, nor a text of
    separators or arrays beyond what 50 ops hold; 0 turns the limit off."""
    g50 = chain([(1.0, 0.5, 400, 400)] * 50, input_bytes=400).to_json().encode()
    g51 = chain([(1.0, 0.5, 400, 400)] * 51, input_bytes=400).to_json().encode()
    seps = b'{"ops": [], "x": [' + b"1," * (SEPARATORS_PER_OP * 50 + SLACK) + b"1]}"
    arrays = b'{"ops": [], "x": [' + b"[]" * (4 * 50 + SLACK + 1) + b"]}"
    for limit, refused in ((50, (g51, seps, arrays)), (0, ())):
        cfg = ServerConfig(cache_bytes=32 * MiB, staging_bytes=16 * MiB, max_cost_graph_ops=limit)
        with ServerThread(config=cfg) as srv, grpc.insecure_channel(srv.address) as ch:
            stub = pb_grpc.EdgeServiceStub(ch)
            assert _open(stub, g50) is None
            for graph in refused:
                err = _open(stub, graph)
                assert err is not None and err.code() == grpc.StatusCode.INVALID_ARGUMENT, err
                assert "max_cost_graph_ops=50" in err.details(), err.details()
            if not refused:
                assert _open(stub, g51) is None


def test_the_profile_is_parsed_off_the_event_loop_and_charged_to_its_tenant(monkeypatch):
    """While one tenant's profile update is being parsed (held in the parser here), another client's
    Hello and a new session are served (on the loop they waited for the whole parse), the parse's memory
    (``CostGraphShape.parse_bytes``) is reserved for that tenant, and it is given back once the profile
    reached the allocator; the session then has the new profile."""
    gate, inside = threading.Event(), threading.Event()
    real = profile_intake.strict_json

    def held(text, *args):
        inside.set()
        assert gate.wait(60)
        return real(text, *args)

    g = chain([(40.0, 2.0, 4_000, 200_000)] * 200, input_bytes=4_000).to_json()
    alloc = AraShareAllocator(policy="neurosurgeon")
    with ServerThread(config=CFG, allocator=alloc) as srv:
        ch = wire.channel(srv.address)
        try:
            a = SessionStream(wire.stub(ch), "a", "m", profile=wire.UeProfile(OK, 20.0, 5.0))
            assert alloc.wait_idle(60)
            memory = srv.runtime.memory
            assert memory.held_by("a") == 0
            monkeypatch.setattr(profile_intake, "strict_json", held)
            try:
                assert a.update_profile(wire.UeProfile(g, 20.0, 5.0, send_mbps=7.0))
                assert inside.wait(30), "the update was never parsed"
                assert memory.held_by("a") == CostGraphShape.of(g.encode()).parse_bytes()
                t0 = time.monotonic()
                assert wire.hello(wire.stub(ch), "b", 10).limits.max_cost_graph_ops
                monkeypatch.setattr(profile_intake, "strict_json", real)
                b = SessionStream(wire.stub(ch), "b", "m", profile=wire.UeProfile(OK, 20.0, 5.0))
                assert b.alive and not gate.is_set(), "served only after the parse"
                assert time.monotonic() - t0 < 20
                b.close()
            finally:
                gate.set()
            sid = a.opened.session_id
            _wait(lambda: getattr(srv.runtime.sessions.profile_of(sid), "send_mbps", 0) == 7.0, "the update applied")
            _wait(lambda: memory.held_by("a") == 0, "the reservation to be given back")
            assert alloc.wait_idle(60) and len(alloc._ara._ues[sid].graph.ops) == 200
            assert a.alive
            a.close()
        finally:
            ch.close()


def test_a_profile_over_the_tenants_memory_share_is_resource_exhausted():
    """Under ``--memory-mb`` a cost graph whose parse would take more than the tenant's share of the
    in-flight budget (half of it) is RESOURCE_EXHAUSTED before it is parsed; nothing stays reserved, and
    a small graph still opens. (Its meta carries 2M non-ASCII characters: its reservation is then ~125 MB,
    over half of the ~120 MiB budget whatever this process's RSS, which moves by tens of MB in a full run
    between its measurement here and the server's.)"""
    g = chain([(40.0, 2.0, 4_000, 200_000)] * 9_900, input_bytes=4_000).to_json()
    g = g.replace('"meta": {}', '"meta": {"note": "' + "\u00f6" * 2_000_000 + '"}').encode()
    assert not g.isascii()
    rss = psutil.Process().memory_info().rss
    cfg = ServerConfig(cache_bytes=32 * MiB, staging_bytes=16 * MiB, memory_bytes=rss + (48 + 120 << 20))
    with ServerThread(config=cfg) as srv:
        need = CostGraphShape.of(g).parse_bytes()
        assert need > srv.runtime.memory.limit_bytes // 2, (need, srv.runtime.memory.limit_bytes)
        with grpc.insecure_channel(srv.address) as ch:
            stub = pb_grpc.EdgeServiceStub(ch)
            err = _open(stub, g)
            assert err is not None and err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err
            assert "cost graph" in err.details(), err.details()
            assert srv.runtime.memory.stats().reserved_bytes == 0
            assert _open(stub, OK.encode()) is None
            assert srv.runtime.memory.stats().reserved_bytes == 0


def _shapes(max_ops: int) -> dict[str, bytes]:
    """Texts at the edge of what ``max_ops`` ops admit, each built to make the parse allocate much."""
    n = SEPARATORS_PER_OP * max_ops  # values in one list
    samples = tuple((0.1 + i, 0.2 + i, 0.3 + i) for i in range(max_ops))
    honest = chain([(1.0, 0.5, 400, 400)] * max_ops, input_bytes=400)
    from dataclasses import replace

    return {
        "floats": b'{"ops": [], "x": [' + b",".join(b"%d.5" % i for i in range(n)) + b"]}",
        "ints": b'{"ops": [], "x": [' + b",".join(b"%d" % (10**12 + i) for i in range(n)) + b"]}",
        "strings": b'{"ops": [], "x": [' + b",".join(b'"ab"' for _ in range(n)) + b"]}",
        "keys": b'{"ops": [], "m": {' + b",".join(b'"k%d": 0' % i for i in range(n // 2)) + b"}}",
        "dicts": b'{"ops": [], "x": [' + b",".join(b'{"a%d": %d}' % (i, i) for i in range(max_ops + SLACK - 2)) + b"]}",
        "arrays": b'{"ops": [], "x": [' + b",".join(b"[]" for _ in range(4 * max_ops + SLACK - 2)) + b"]}",
        "wide": b'{"ops": [], "m": "' + b"a" * 200_000 + "\U0001f600".encode() + b'"}',
        "honest": replace(honest, ue_samples_ms=samples).to_json().encode(),
    }


@pytest.mark.parametrize("name", list(_shapes(1)))
def test_parse_bytes_bounds_what_the_parse_allocates(name, monkeypatch):
    """``CostGraphShape.parse_bytes`` (the reservation) is at least the peak the parse allocates
    (tracemalloc), for texts at the shape limits built to allocate much per byte; for the honest graph the
    peak includes the ``CostGraph`` built from it. (The others are no cost graphs, refused after the
    parse: measured here with the parse's document kept instead.)"""
    max_ops = 1000
    text = _shapes(max_ops)[name]
    shape = CostGraphShape.of(text)
    assert shape.fits(max_ops) == "", shape
    if name != "honest":
        with pytest.raises(profile_intake.InvalidArgument, match=r"profile\.cost_graph_json"):
            profile_intake.decode_profile(pb.UeProfile(cost_graph_json=text, uplink_mbps=1.0), max_ops=max_ops)
        monkeypatch.setattr(profile_intake, "cost_graph_of", lambda doc: doc)
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        doc = profile_intake.decode_profile(
            pb.UeProfile(cost_graph_json=text, uplink_mbps=1.0), max_ops=max_ops
        ).cost_graph
        peak = tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()
    assert doc is not None
    assert peak <= shape.parse_bytes(), (name, peak, shape.parse_bytes())


def test_a_ue_whose_cost_graph_is_over_the_servers_limit_opens_without_a_profile():
    """A UE reads ``max_cost_graph_ops`` in Hello's Limits: with more ops it opens its session without a
    profile (the allocator gives it an equal share) instead of being refused, and its requests run
    remote, equal to the module's own output."""
    import torch

    from modelgraph import zoo
    from ue_client.client import CoinferClient

    module, example = zoo.chain()
    with ServerThread(config=ServerConfig(cache_bytes=32 * MiB, staging_bytes=16 * MiB, max_cost_graph_ops=2)) as srv:
        c = CoinferClient(module, example, server=srv.address, policy="offload", suspend_idle=False)
        try:
            out = c(*example)
            assert len(c.engine.cost_model.costs.ops) > 2
            assert c.last_report.fallback is False and c.last_report.server_ops > 0, c.last_report
            torch.testing.assert_close(out, module(*example), rtol=0, atol=0)
            sid = c.engine.conn.session.opened.session_id
            assert srv.runtime.sessions.profile_of(sid) is None
        finally:
            c.close()
