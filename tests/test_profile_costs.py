"""A UE's cost graph whose costs no planner may use, from outside through the protos (a real server on a
free port, ARA allocator).

A graph that parsed as JSON but carried negative, null or string op costs, references to nothing, or
per-run samples of the wrong shape was accepted at OpenSession and on a profile update: ARA logged its
failure and gave the session an equal share, and the client heard nothing. Now each is INVALID_ARGUMENT
naming the field (``edge_server.profile_intake.cost_graph_of``), before ARA sees it (no re-plan).
"""

from __future__ import annotations

import json

import grpc
import pytest

from edge_server.allocation import AraShareAllocator
from edge_server.config import MiB, ServerConfig
from edge_server.testing import ServerThread
from partitioner import chain
from protos.coinfer.v1 import coinfer_pb2_grpc as pb_grpc
from tests.test_number_ranges import _open_graph
from tests.waiting import wait_until
from ue_client import wire
from ue_client.errors import ServerError
from ue_client.session import SessionStream


def _graph() -> str:
    d = chain([(40.0, 2.0, 4_000, 200_000)] * 3, input_bytes=4_000).to_dict()
    d["ue_samples_ms"] = [[40.0, 41.0], [39.0, 40.0], [40.5, 40.0]]
    return json.dumps(d)  # (only the text is kept: a parsed graph alive fails test_ara_profile_flood's check)


GRAPH = _graph()


def _bad(edit) -> str:
    d = json.loads(GRAPH)
    edit(d)
    return json.dumps(d)


def _op(i: int, **fields):
    return lambda d: d["ops"][i].update(fields)


BAD = [
    ("negative ue_ms", _bad(_op(1, ue_ms=-1.0)), "ue_ms=-1.0"),
    ("null server_ms", _bad(_op(0, server_ms=None)), "server_ms=None"),
    ("string server_var", _bad(_op(2, server_var="2")), "server_var='2'"),
    ("negative out_bytes", _bad(_op(0, out_bytes=-5)), "negative out_bytes"),
    ("string out_bytes", _bad(_op(0, out_bytes="big")), "cost_graph_json"),
    ("negative weight size", _bad(lambda d: d["weights"].update(w0=-1)), "negative size"),
    ("dangling input", _bad(_op(1, inputs=["nowhere"])), "'nowhere'"),
    ("cycle", _bad(_op(0, inputs=["op2"])), "later op"),
    ("output of nothing", _bad(lambda d: d.update(outputs=["ghost"])), "'ghost'"),
    ("missing sample row", _bad(lambda d: d["ue_samples_ms"].pop()), "one row per op"),
    ("ragged samples", _bad(lambda d: d["ue_samples_ms"][0].append(1.0)), "same number of runs"),
    ("negative sample", _bad(lambda d: d["ue_samples_ms"][1].__setitem__(0, -3.0)), "ue_samples_ms of op 'op1'"),
    ("null sample", _bad(lambda d: d["ue_samples_ms"][2].__setitem__(1, None)), "ue_samples_ms of op 'op2'"),
    ("no ops", _bad(lambda d: d.pop("ops")), "cost_graph_json"),
    ("unknown op field", _bad(_op(0, flops=3)), "cost_graph_json"),
    # JSON booleans where numbers are expected (a Python bool is an int: "ue_ms": true was a cost of 1 ms)
    ("boolean ue_ms", _bad(_op(1, ue_ms=True)), "ue_ms=True"),
    ("boolean server_ms", _bad(_op(0, server_ms=False)), "server_ms=False"),
    ("boolean ue_var", _bad(_op(2, ue_var=True)), "ue_var=True"),
    ("boolean server_var", _bad(_op(2, server_var=True)), "server_var=True"),
    ("boolean out_bytes", _bad(_op(0, out_bytes=True)), "out_bytes=True"),
    ("boolean weight size", _bad(lambda d: d["weights"].update(w0=True)), "weight 'w0' has size True"),
    ("boolean input size", _bad(lambda d: d["inputs"].update(x=False)), "input 'x' has size False"),
    ("boolean sample", _bad(lambda d: d["ue_samples_ms"][0].__setitem__(1, True)), "ue_samples_ms of op 'op0'"),
    ("string offloadable", _bad(_op(1, offloadable="no")), "offloadable='no'"),
    ("number as op name", _bad(_op(1, name=7)), "op #1's name must be a string"),
]


@pytest.fixture(scope="module")
def ara_server():
    alloc = AraShareAllocator(policy="neurosurgeon")
    with ServerThread(config=ServerConfig(cache_bytes=32 * MiB, staging_bytes=16 * MiB), allocator=alloc) as srv:
        yield srv, alloc


def test_malformed_costs_are_refused_at_open_session(ara_server) -> None:
    srv, alloc = ara_server
    with grpc.insecure_channel(srv.address) as ch:
        stub = pb_grpc.EdgeServiceStub(ch)
        assert _open_graph(stub, GRAPH) is None  # the honest graph opens
        assert alloc.wait_idle(60)
        replans = alloc.replans
        for what, g, needle in BAD:
            assert g != GRAPH, what
            err = _open_graph(stub, g)
            assert err is not None, what
            assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, (what, err)
            assert "profile.cost_graph_json" in err.details() and needle in err.details(), (what, err.details())
        assert alloc.wait_idle(60)
        assert alloc.replans == replans, "a refused profile reached ARA"
        assert _open_graph(stub, GRAPH) is None


@pytest.mark.parametrize("what,graph,needle", [BAD[0], BAD[6], BAD[11]], ids=["negative", "dangling", "sample"])
def test_malformed_costs_in_a_profile_update_end_the_session(ara_server, what, graph, needle) -> None:
    """On the session (SessionRequest.profile, honest rates so that only the graph is wrong): the stream
    ends INVALID_ARGUMENT naming the field; ARA never re-plans the update; the server serves on."""
    srv, alloc = ara_server
    ch = wire.channel(srv.address)
    s = SessionStream(wire.stub(ch), "u", "m", profile=wire.UeProfile(GRAPH, 20.0, 5.0))
    try:
        assert alloc.wait_idle(60)
        replans = alloc.replans
        assert s.update_profile(wire.UeProfile(graph, 25.0, 5.0, weight=1.0, send_mbps=30.0))
        wait_until(lambda: s.broken is not None, what="the bad update to end the stream")
        assert isinstance(s.broken, ServerError) and s.broken.code == "INVALID_ARGUMENT", s.broken
        assert "profile.cost_graph_json" in str(s.broken) and needle in str(s.broken), s.broken
        assert alloc.wait_idle(60) and alloc.replans <= replans + 1  # (its leave), no re-plan of the update
    finally:
        s.close()
        ch.close()
    with grpc.insecure_channel(srv.address) as ch2:
        assert _open_graph(pb_grpc.EdgeServiceStub(ch2), GRAPH) is None


def test_an_honest_update_is_planned_from_the_graph_built_at_intake(ara_server) -> None:
    """The allocator plans the ``CostGraph`` the intake built (no second parse on ARA's thread): the
    session's ARA problem holds a graph equal to the UE's."""
    from partitioner import CostGraph

    srv, alloc = ara_server
    ch = wire.channel(srv.address)
    s = SessionStream(wire.stub(ch), "h", "m", profile=wire.UeProfile(GRAPH, 20.0, 5.0))
    try:
        sid = s.opened.session_id
        assert alloc.wait_idle(60)
        g2 = json.loads(GRAPH)
        g2["ops"][0]["ue_ms"] = 7.0
        assert s.update_profile(wire.UeProfile(json.dumps(g2), 25.0, 5.0, weight=1.0))
        wait_until(lambda: sid in alloc._ara and alloc._ara._ues[sid].graph.ops[0].ue_ms == 7.0,
                   what="the update planned")
        assert alloc._ara._ues[sid].graph == CostGraph.from_dict(g2)
        assert s.broken is None
    finally:
        s.close()
        ch.close()
