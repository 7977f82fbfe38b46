"""Session 15's attacker, from outside: faults found with raw gRPC clients (not our client) and fixed.

Each test starts a real server on port 0 and attacks it as a stranger would; each failed before its fix.
"""

from __future__ import annotations

import json
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from edge_server.config import MiB, ServerConfig
from edge_server.health_service import MAX_SERVICE_NAME, MAX_WATCHES_PER_PEER
from edge_server.server import SERVICE_NAME
from edge_server.testing import ServerThread

SERVING = health_pb2.HealthCheckResponse.SERVING


def _wait(pred, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, "condition not reached before the deadline"
        time.sleep(0.02)


@pytest.fixture
def token_server(tmp_path):
    p = tmp_path / "tokens.json"
    p.write_text(json.dumps({"tenants": {"alice": {"token": "alice-secret-123"}}}))
    cfg = ServerConfig(cache_bytes=8 * MiB, staging_bytes=8 * MiB, auth_tokens_file=str(p))
    with ServerThread(config=cfg) as srv:
        yield srv


def test_health_names_are_bounded_for_a_stranger_without_a_token(token_server):
    """grpcio's health servicer kept each Watch's request (a service name up to the 8 MiB message limit) for
    the stream's life: 40 streams of 7 MiB names from a client without a token took the server from 349 to
    1524 MiB RSS under --memory-mb 1024 (session 15). A name over MAX_SERVICE_NAME is INVALID_ARGUMENT now."""
    ch = grpc.insecure_channel(token_server.address, options=[("grpc.max_send_message_length", 16 * MiB)])
    stub = health_pb2_grpc.HealthStub(ch)
    long_name = "x" * (MAX_SERVICE_NAME + 1)
    for call in (stub.Check, lambda r, timeout: next(iter(stub.Watch(r, timeout=timeout)))):
        with pytest.raises(grpc.RpcError) as e:
            call(health_pb2.HealthCheckRequest(service=long_name), timeout=20)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert str(MAX_SERVICE_NAME) in e.value.details()
    # the names the server serves still answer, to Check and Watch, without a token
    assert stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=20).status == SERVING
    w = stub.Watch(health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=20)
    assert next(w).status == SERVING
    w.cancel()
    # an unknown short name: NOT_FOUND to Check, SERVICE_UNKNOWN to Watch, as grpcio answers
    with pytest.raises(grpc.RpcError) as e:
        stub.Check(health_pb2.HealthCheckRequest(service="nope"), timeout=20)
    assert e.value.code() == grpc.StatusCode.NOT_FOUND
    w = stub.Watch(health_pb2.HealthCheckRequest(service="nope"), timeout=20)
    assert next(w).status == health_pb2.HealthCheckResponse.SERVICE_UNKNOWN
    w.cancel()
    ch.close()


def test_health_watch_streams_are_capped_per_host_and_server_wide(token_server):
    """Watch streams needed no token and had no cap (each holds a coroutine, a condition and an HTTP/2 stream
    for as long as the client likes). Over the per-host cap one more is RESOURCE_EXHAUSTED; the open ones go on,
    and a closed one makes room again; the same for the server-wide cap."""
    health = token_server.server.health
    ch = grpc.insecure_channel(token_server.address)
    stub = health_pb2_grpc.HealthStub(ch)

    def watch():
        w = stub.Watch(health_pb2.HealthCheckRequest(service=""), timeout=60)
        assert next(w).status == SERVING
        return w

    open_ = [watch() for _ in range(MAX_WATCHES_PER_PEER)]
    _wait(lambda: health.watching == MAX_WATCHES_PER_PEER)
    with pytest.raises(grpc.RpcError) as e:
        watch()
    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    # the server goes on answering, and a closed stream gives its place back
    assert stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=20).status == SERVING
    open_.pop().cancel()
    _wait(lambda: health.watching == MAX_WATCHES_PER_PEER - 1)
    open_.append(watch())
    # the server-wide cap, below the per-host one here
    token_server.call(_set_caps(health, MAX_WATCHES_PER_PEER, 100))
    with pytest.raises(grpc.RpcError) as e:
        watch()
    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    for w in open_:
        w.cancel()
    _wait(lambda: health.watching == 0)
    ch.close()


async def _set_caps(health, total: int, per_peer: int) -> None:
    health.max_watches, health.max_watches_per_peer = total, per_peer
