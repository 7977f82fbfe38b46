"""Degenerate numbers from outside (issue 11): a denormal or tiny positive where a rate, a weight or a
refill is expected, refused where it comes in (``edge_server.ranges``: one check for client messages,
the tokens file and flags).

An attacker sent ``send_mbps=5e-324`` in a UE profile: ARA's cap became 0 and its planner raised on
every re-plan of that session (logged and ignored); ``--profile-cpu-share 5e-324`` (or the same quota
key) started a server whose ProfileGraph bucket never refills. A real server on port 0 with ARA, raw
stubs with the project's protos.
"""

from __future__ import annotations

import json

import grpc
import pytest

from edge_server.allocation import AraShareAllocator
from edge_server.auth import AuthConfigError, Quota
from edge_server.cli import main
from edge_server.config import MiB, ServerConfig
from edge_server.ranges import UE_PROFILE, Range
from edge_server.testing import ServerThread
from partitioner import chain
from protos.coinfer.v1 import coinfer_pb2 as pb
from protos.coinfer.v1 import coinfer_pb2_grpc as pb_grpc
from tests.waiting import wait_until
from ue_client import wire
from ue_client.errors import ServerError
from ue_client.session import SessionStream

TINY = 5e-324
GRAPH = chain([(40.0, 2.0, 4_000, 200_000)] * 3, input_bytes=4_000).to_json()


def _open(stub, **profile) -> grpc.RpcError | None:
    """OpenSession with a profile of ``profile``'s numbers (an honest one otherwise): the error, or None."""
    fields = {"uplink_mbps": 20.0, "rtt_ms": 5.0, "weight": 1.0, **profile}
    first = pb.SessionRequest(
        open=pb.OpenSession(tenant="t", model_id="m", profile=pb.UeProfile(cost_graph_json=GRAPH.encode(), **fields))
    )
    call = stub.Session(iter([first, pb.SessionRequest(close=pb.CloseSession())]), timeout=30)
    try:
        for _ in call:
            pass
    except grpc.RpcError as e:
        return e
    return None


def test_a_profile_number_outside_its_range_is_invalid_argument() -> None:
    """Denormal rates and weights, an absurd round trip: INVALID_ARGUMENT naming the field, at OpenSession
    and on the session (SessionRequest.profile); nothing reaches ARA's planner (no failed re-plan), and
    the server goes on serving honest profiles."""
    alloc = AraShareAllocator(policy="neurosurgeon")
    with ServerThread(config=ServerConfig(cache_bytes=32 * MiB, staging_bytes=16 * MiB), allocator=alloc) as srv:
        with grpc.insecure_channel(srv.address) as ch:
            stub = pb_grpc.EdgeServiceStub(ch)
            for name, value in [
                ("send_mbps", TINY),
                ("uplink_mbps", TINY),
                ("downlink_mbps", 1e-9),
                ("weight", TINY),
                ("rtt_ms", 1e300),
                ("send_mbps", 1e300),
            ]:
                err = _open(stub, **{name: value})
                assert err is not None, (name, value)
                assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and f"profile.{name} must be" in err.details()
            assert _open(stub) is None  # an honest profile opens
        assert alloc.wait_idle(60)
        replans = alloc.replans
        ch = wire.channel(srv.address)
        s = SessionStream(wire.stub(ch), "u", "m", profile=wire.UeProfile(GRAPH, 20.0, 5.0))
        try:
            assert alloc.wait_idle(60)
            replans = alloc.replans
            assert s.update_profile(wire.UeProfile("", 0.0, weight=0.0, send_mbps=TINY))
            wait_until(lambda: s.broken is not None, what="the bad update to end the stream")
            assert isinstance(s.broken, ServerError) and s.broken.code == "INVALID_ARGUMENT", s.broken
            assert "profile.send_mbps" in str(s.broken)
            assert alloc.wait_idle(60) and alloc.replans <= replans + 1  # (its leave), no re-plan of the update
        finally:
            s.close()
            ch.close()


def _open_graph(stub, graph: str) -> grpc.RpcError | None:
    first = pb.SessionRequest(
        open=pb.OpenSession(
            tenant="t", model_id="m", profile=pb.UeProfile(cost_graph_json=graph.encode(), uplink_mbps=20.0, rtt_ms=5.0)
        )
    )
    try:
        for _ in stub.Session(iter([first, pb.SessionRequest(close=pb.CloseSession())]), timeout=30):
            pass
    except grpc.RpcError as e:
        return e
    return None


BAD_GRAPHS = [
    # Python's json takes NaN / Infinity (not JSON): Infinity passed the cost graph's check and NaN failed
    # ARA's join; 1e300 overflowed ARA's sums: each left the session with an equal share, no error
    ("NaN", GRAPH.replace('"ue_ms": 40.0', '"ue_ms": NaN', 1)),
    ("Infinity", GRAPH.replace('"server_ms": 2.0', '"server_ms": Infinity', 1)),
    ("-Infinity", GRAPH.replace('"ue_var": 0.0', '"ue_var": -Infinity', 1)),
    ("1e300", GRAPH.replace('"out_bytes": 4000', '"out_bytes": 1e300', 1)),
    ("9999", GRAPH.replace('"out_bytes": 4000', '"out_bytes": ' + "9" * 30, 1)),
    ("JSON object", "[1, 2]"),
    ("nested too deeply", "[" * 40_000),  # (within the arrays 10,000 ops may have: edge_server.profile_intake)
]


def test_a_cost_graph_with_nan_infinity_or_huge_numbers_is_invalid_argument() -> None:
    """The UE's cost graph is standard JSON with finite numbers within ``ranges.COST_GRAPH_NUMBER``, checked
    at OpenSession and on the session (SessionRequest.profile), before ARA sees it: INVALID_ARGUMENT, no
    re-plan, and an honest graph still opens."""
    for _, g in BAD_GRAPHS[:5]:
        assert g != GRAPH  # each replacement hit
    alloc = AraShareAllocator(policy="neurosurgeon")
    with ServerThread(config=ServerConfig(cache_bytes=32 * MiB, staging_bytes=16 * MiB), allocator=alloc) as srv:
        with grpc.insecure_channel(srv.address) as ch:
            stub = pb_grpc.EdgeServiceStub(ch)
            for what, g in BAD_GRAPHS:
                err = _open_graph(stub, g)
                assert err is not None, what
                assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, (what, err)
                assert "profile.cost_graph_json" in err.details() and what in err.details(), (what, err.details())
            assert _open_graph(stub, GRAPH) is None
        assert alloc.wait_idle(60)
        ch = wire.channel(srv.address)
        s = SessionStream(wire.stub(ch), "u", "m", profile=wire.UeProfile(GRAPH, 20.0, 5.0))
        try:
            assert alloc.wait_idle(60)
            replans = alloc.replans
            assert s.update_profile(wire.UeProfile(BAD_GRAPHS[1][1], 0.0, weight=0.0))
            wait_until(lambda: s.broken is not None, what="the bad update to end the stream")
            assert isinstance(s.broken, ServerError) and s.broken.code == "INVALID_ARGUMENT", s.broken
            assert "Infinity" in str(s.broken)
            assert alloc.wait_idle(60) and alloc.replans <= replans + 1  # (its leave), no re-plan of the update
        finally:
            s.close()
            ch.close()


def test_the_ranges_refuse_only_the_degenerate() -> None:
    r = Range(1e-3, 10.0, "Mbit/s", zero="unset")
    assert r.check("x", 0) == 0.0 and r.check("x", 1e-3) == 1e-3 and r.check("x", 10) == 10.0
    for bad in (TINY, 1e-4, -1.0, 11.0, float("nan"), float("inf"), True, "1"):
        with pytest.raises(ValueError, match=r"x must be 0 \(unset\) or a number in \[0.001, 10\] Mbit/s"):
            r.check("x", bad)
    # what honest UEs send passes: the rates, round trips and weights of the tests and the testbed
    for name, v in [
        ("uplink_mbps", 0.5),
        ("uplink_mbps", 10_000.0),
        ("rtt_ms", 0.0),
        ("rtt_ms", 600.0),
        ("weight", 0.5),
        ("send_mbps", 0.05),
    ]:
        assert UE_PROFILE[name].check(name, v) == v


@pytest.mark.parametrize(
    ("key", "value"),
    [("profile_cpu_share", TINY), ("profile_cpu_s", TINY), ("compute_weight", TINY), ("compute_weight", 1e300)],
)
def test_a_degenerate_quota_is_refused_naming_the_key(key: str, value: float) -> None:
    doc = json.loads(json.dumps({key: value}))  # as the tokens file reader sees it
    with pytest.raises(AuthConfigError, match=f"t: quota {key} must be"):
        Quota.from_dict(doc, "t")
    assert Quota.from_dict({"profile_cpu_s": 0, "profile_cpu_share": 1e-4}, "t").profile_cpu_s == 0  # 0: none


@pytest.mark.parametrize(
    "args",
    [
        ["--profile-cpu-share", "5e-324"],
        ["--profile-cpu-s", "5e-324"],
        ["--op-time-ms", "5e-324"],
        ["--session-idle-s", "5e-324"],
    ],
)
def test_a_degenerate_flag_exits_2_with_one_line(args, capsys) -> None:
    assert main(["serve", "--port", "0", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"coinfer-edge: {args[0]} must be") and "\n" not in err, err
