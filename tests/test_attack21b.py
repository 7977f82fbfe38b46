"""review21b's findings on the server-wide reading slots (session 21): a call's receive window beyond grpc's default
is held in the memory budget until its first message (finding 1: 24 tenants x 31 waiting calls of 1.5 MiB each took
the server +780 MiB over a 658 MiB budget, nothing reserved); a slot is not left idle while a call waits for it
(finding 3); a call ended while it waited for a slot is never handed one (finding 2: InvalidStateError in the
deadline sweep and in a revoked holder's clean-up). Real servers on port 0 and the gate itself; each test failed
before its fix."""

from __future__ import annotations

import asyncio
import contextlib

import grpc

from edge_server.calls import CallGate
from edge_server.config import MiB
from edge_server.errors import DeadlineExceeded
from tests.test_attack21 import _scrape, _server, _Silent, _until


def test_a_waiting_calls_receive_window_is_held_in_the_memory_budget(tmp_path):
    """Before: a silent call reserved nothing (its client may fill a 1 MiB window grpc holds outside the budget)."""
    with _server(tmp_path, max_reading_bytes=32 * MiB, first_message_s=20.0, metrics_port=0) as srv, \
            grpc.insecure_channel(srv.address) as ch:
        gate, port = srv.runtime.calls, srv.server.metrics_server.server_port
        assert gate.window_bytes == srv.runtime.config.read_window_bytes - (64 << 10) > 0
        silent = _Silent(ch, ["alice", "alice", "bob"])
        try:
            _until(lambda: gate.open_calls() == 3)
            m = _scrape(port)
            assert m['coinfer_memory_reserved_bytes{tenant="alice"}'] == 2 * gate.window_bytes
            assert m['coinfer_memory_reserved_bytes{tenant="bob"}'] == gate.window_bytes
        finally:
            silent.stop()
        _until(lambda: gate.open_calls() == 0)
        assert _scrape(port)["coinfer_memory_reserved_total_bytes"] == 0


def test_a_free_slot_goes_to_a_waiting_call_even_over_its_share(tmp_path):
    """4 slots; alice, bob and carol hold one each and alice's second call waits. Before: the fourth slot stayed
    free (alice at her share: 4 // 3 = 1) until the others' deadlines (p4_slots A: 'free 1, queued {alice: 1}' at
    6 s)."""
    with _server(tmp_path, max_reading_bytes=32 * MiB, first_message_s=20.0, reading_grace_s=0.3) as srv, \
            grpc.insecure_channel(srv.address) as ch:
        gate = srv.runtime.calls
        silent = _Silent(ch, ["alice", "bob", "carol"])
        try:
            _until(lambda: sum(gate.reading_held().values()) == 3)
            second = _Silent(ch, ["alice"])
            try:
                _until(lambda: gate.reading_held().get("tenant:alice") == 2 and gate.server_free == 0)
                assert not gate.reading_queued()
            finally:
                second.stop()
        finally:
            silent.stop()


def test_a_call_ended_while_it_waits_is_never_handed_a_slot():
    """Slots: 1 (held by H). W waits; the deadline sweep ends W, then hands H's slot on in the same pass. Before: the
    slot went to W's cancelled future, ``set_result`` raised InvalidStateError out of the timer callback and the slot
    was lost (p7_grant_ended)."""

    async def main() -> None:
        gate = CallGate(max_calls=8, max_waiting=8, first_message_s=0, server_reading=1)
        holder = gate.enter("tenant:a", "a", "", "Hello")
        assert await gate.reading(holder)
        box = []

        async def waiting() -> None:  # the waiting call's handler: the call's task is this one
            box.append(gate.enter("tenant:b", "b", "", "Hello"))
            await gate.reading(box[0])

        task = asyncio.ensure_future(waiting())
        await asyncio.sleep(0)
        assert gate.reading_queued() == {"tenant:b": 1}
        box[0].end(DeadlineExceeded("test: ended while waiting"))  # cancels its task, hence the future it awaits
        gate.read_done(holder)  # hands the slot on in the same pass, before the ended task unwinds
        assert gate.server_free == 1 and not gate.reading_queued()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        gate.leave(box[0])
        gate.leave(holder)
        assert gate.server_free == 1

    asyncio.run(main())


def test_tenant_labels_named_by_callers_are_bounded_in_every_series():
    """Without ``--auth-tokens`` a caller names its tenant: 80 UploadWeights calls naming fresh tenants. Before: 80
    labels in each of the 14 older per-tenant series (review21b finding 7: 300 in 300); the new ones were capped."""
    from edge_server.config import ServerConfig
    from edge_server.metrics import MAX_TENANT_LABELS
    from edge_server.testing import ServerThread
    from protos.coinfer.v1 import coinfer_pb2 as pb
    from protos.coinfer.v1 import coinfer_pb2_grpc as pbg

    cfg = ServerConfig(cache_bytes=16 * MiB, staging_bytes=16 * MiB, threads=1)  # no --memory-mb: an xdist worker
    # process holds ~1 GiB already (CI: "--memory-mb 1024 leaves 12 MiB for work in flight")
    with ServerThread(config=cfg) as srv, grpc.insecure_channel(srv.address) as ch:
        stub = pbg.EdgeServiceStub(ch)
        for i in range(80):
            def upload(i=i):
                yield pb.UploadWeightsRequest(header=pb.UploadHeader(tenant=f"x{i:04d}"))
                yield pb.UploadWeightsRequest(chunk=pb.WeightChunk(sha256="0" * 64, offset=0, total_bytes=8,
                                                                   data=b"12345678", dtype="float32", shape=[2]))
            with contextlib.suppress(grpc.RpcError):
                stub.UploadWeights(upload(), timeout=5)

        async def snap():
            return srv.runtime.metrics_snapshot()

        series = srv.call(snap())
    sizes = {k: len(v) for k, v in series.items() if k != "server"}
    assert sizes["requests_done"] > MAX_TENANT_LABELS - 1  # every name made a label before
    assert max(sizes.values()) <= MAX_TENANT_LABELS


def test_request_series_labels_are_bounded():
    """The request latency histogram and failure counter (prometheus_client, labels kept for ever): at most
    ``MAX_TENANT_LABELS`` tenants, the later ones under ``(other)``. Before: one label per name."""
    from edge_server.metrics import MAX_TENANT_LABELS, OTHER_LABEL, ServerMetrics

    m = ServerMetrics()
    for i in range(80):
        m.request_finished(f"t{i}", None, 5.0)
        m.request_finished(f"t{i}", "INVALID_ARGUMENT", 5.0)
    labels = {s.labels.get("tenant") for fam in m.registry.collect() for s in fam.samples if "tenant" in s.labels}
    assert len(labels) <= MAX_TENANT_LABELS and OTHER_LABEL in labels and "t0" in labels
