"""Holes in issue 11's bounds found by attacking them (each test failed before its fix), against real
servers on loopback port 0 with real gRPC clients: uploads whose declared size disagrees with what the
server holds, staging bytes held by a client that stops sending, sessions kept alive by requests that
wait for data that never comes."""

from __future__ import annotations

import hashlib
import threading
import time

import grpc
import pytest
import torch
from torch import nn

import modelgraph as mg
from edge_server.config import MiB, ServerConfig
from edge_server.errors import InvalidArgument
from edge_server.tensor_codec import encode_tensor_chunks, encode_weight_chunks
from edge_server.testing import ServerThread
from edge_server.weight_store import MIN_WEIGHT_CHARGE, WeightStore
from protos.coinfer.v1 import coinfer_pb2 as pb
from protos.coinfer.v1 import coinfer_pb2_grpc as pb_grpc
from tests.raw_stream import RawStream

TIMEOUT = 30
TENANT = "t"


def sha_of(t: torch.Tensor) -> str:
    return hashlib.sha256(t.numpy().tobytes()).hexdigest()


def wait_for(pred, timeout: float = TIMEOUT, what: str = "condition") -> None:
    end = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < end, f"{what} not reached in {timeout} s"
        time.sleep(0.02)


Stream = RawStream


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(256, 256)

    def forward(self, x):
        return torch.relu(self.fc(x))


@pytest.fixture(scope="module")
def tiny():
    """A captured one-layer model, its whole-model slice (JSON) and one input."""
    torch.manual_seed(11)
    net = Tiny().eval()
    x = torch.randn(4, 256)
    graph = mg.capture(net, (x,), name="tiny")
    split = graph.split_at(0)
    spec = mg.make_slice(graph, split)
    return graph, split, spec.to_json().encode(), x


def upload_msgs(t: torch.Tensor, *, sha: str | None = None, session_id: str = "") -> list:
    msgs = [pb.UploadWeightsRequest(header=pb.UploadHeader(tenant=TENANT, session_id=session_id))]
    return msgs + [pb.UploadWeightsRequest(chunk=c) for c in encode_weight_chunks(sha or sha_of(t), t, 1 << 16)]


def code_of(fn, *a, **kw):
    try:
        fn(*a, **kw)
    except grpc.RpcError as e:
        return e.code()
    return None


# ------------------------------------------------------------------------------------------------------
# declared sizes


def test_upload_of_a_held_weight_must_declare_its_size() -> None:
    """A weight the tenant holds was accepted again under any shape and size (its bytes counted and
    dropped, answered already_present): now the declared size must be the held one."""
    w = torch.arange(256, dtype=torch.float32)
    with ServerThread(config=ServerConfig(cache_bytes=16 * MiB)) as srv, grpc.insecure_channel(srv.address) as ch:
        stub = pb_grpc.EdgeServiceStub(ch)
        assert not stub.UploadWeights(iter(upload_msgs(w)), timeout=TIMEOUT).weights[0].already_present
        again = stub.UploadWeights(iter(upload_msgs(w)), timeout=TIMEOUT).weights[0]
        assert again.already_present and again.nbytes == w.numel() * 4
        lie = torch.zeros(4096, dtype=torch.float32)  # 16 KiB of other bytes under the held weight's hash
        with pytest.raises(grpc.RpcError) as ei:
            stub.UploadWeights(iter(upload_msgs(lie, sha=sha_of(w))), timeout=TIMEOUT)
        assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "held with 1024 bytes" in ei.value.details()
        # the same on a session's stream: the stream ends INVALID_ARGUMENT
        msgs = [pb.SessionRequest(open=pb.OpenSession(tenant=TENANT, model_id="m"))]
        msgs += [pb.SessionRequest(weight=m.chunk) for m in upload_msgs(lie, sha=sha_of(w))[1:]]
        with pytest.raises(grpc.RpcError) as ei:
            list(stub.Session(iter(msgs), timeout=TIMEOUT))
        assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert srv.runtime.store.stats().staging_bytes == 0


def test_weight_store_checks_shape_against_total_bytes() -> None:
    """The store itself refuses a dtype x shape that does not make total_bytes (the wire decoder checked
    it already; the store is also used directly)."""
    store = WeightStore(1 * MiB)
    sha = "a" * 64
    for kw in (
        {"dtype": "float32", "shape": (4,)},  # 16 bytes, declared 1000
        {"dtype": "float32", "shape": (1000,)},  # 4000 bytes
        {"dtype": "float32", "shape": None},  # no shape for a typed weight
        {"dtype": "complex999", "shape": (250,)},
        {"dtype": "float32", "shape": (-250, -1)},
    ):
        with pytest.raises(InvalidArgument):
            store.begin_upload(TENANT, sha, 1000, **kw)
    assert store.staging.used == 0
    up = store.begin_upload(TENANT, sha, 1000, dtype="float32", shape=(250,))
    assert store.staging.used == 0 and store.stats(TENANT).staging_bytes == 1000  # the tenant, not the area
    up.abort()
    assert store.put(TENANT, b"x" * 10).nbytes == 10  # raw bytes: shape (n,) of uint8


# ------------------------------------------------------------------------------------------------------
# staging held by a client that stops sending


def test_stalled_upload_gives_its_staging_back() -> None:
    """A client that sends an upload's header and first chunk, then nothing (alive, so keepalive does
    not end the call), held the weight's staging bytes for ever; the call now ends after
    --session-idle-s without a message, DEADLINE_EXCEEDED, and the bytes are free."""
    big = torch.full((1 * MiB,), 7.0)  # 4 MiB
    msgs = upload_msgs(big)
    cfg = ServerConfig(cache_bytes=64 * MiB, session_idle_s=0.5)
    with ServerThread(config=cfg) as srv, grpc.insecure_channel(srv.address) as ch:
        stub = pb_grpc.EdgeServiceStub(ch)
        s = Stream(stub.UploadWeights, msgs[0])
        s.send(msgs[1])
        wait_for(lambda: srv.runtime.store.stats(TENANT).staging_bytes == 4 * MiB or s.done.is_set())
        t0 = time.monotonic()
        assert s.done.wait(TIMEOUT - 5), "the stalled upload was not ended by the server"
        assert s.error is not None and s.error.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert "idle" in s.error.details() and time.monotonic() - t0 < TIMEOUT - 5
        assert srv.runtime.store.stats().staging_bytes == 0
        s.close()


# ------------------------------------------------------------------------------------------------------
# sessions held open by requests that wait for the client


def test_half_closed_session_gives_back_its_half_sent_weights(tiny) -> None:
    """A client that half-closes its session stream with a weight half sent and a request waiting for a
    weight kept the half-sent weight's staging bytes until the session ended (and it never ended)."""
    graph, split, spec_json, x = tiny
    name = next(iter(graph.weight_values))
    w = graph.weight_values[name]
    chunks = list(encode_weight_chunks(sha_of(w), w, 1 << 16))
    assert len(chunks) > 1
    cfg = ServerConfig(cache_bytes=64 * MiB, session_idle_s=0)
    with ServerThread(config=cfg) as srv, grpc.insecure_channel(srv.address) as ch:
        stub = pb_grpc.EdgeServiceStub(ch)
        s = Stream(stub.Session, pb.SessionRequest(open=pb.OpenSession(tenant=TENANT, slice_spec_json=spec_json)))
        s.send(pb.SessionRequest(weight=chunks[0]))  # the first chunk only
        s.send(pb.SessionRequest(begin_request=pb.BeginRequest(request_id=1)))
        for c in encode_tensor_chunks(1, split.cut_tensors[0], x, 1 << 16):
            s.send(pb.SessionRequest(tensor=c))
        tensor_bytes = max(x.numel() * 4, MIN_WEIGHT_CHARGE)  # a request tensor counts at least that (break39 F1)
        store = srv.runtime.store
        wait_for(lambda: store.stats(TENANT).staging_bytes == w.numel() * w.element_size() + tensor_bytes)
        s.half_close()  # the request still waits for its weights (UploadWeights may bring them)
        wait_for(lambda: store.stats(TENANT).staging_bytes == tensor_bytes, what="half-sent weight released")
        assert [x.requests.in_flight for x in srv.runtime.sessions.sessions.values()] == [1]
    s.close()  # the server's stop ended the session
    assert s.done.is_set()


def test_session_waiting_for_the_client_expires_and_frees_everything(tiny) -> None:
    """A request waiting for a cut tensor kept its session out of the idle timeout for ever (with its
    pins, staging bytes and memory reservation): now waiting for the client is idle time."""
    graph, split, spec_json, x = tiny
    names = list(graph.weight_values)
    w0 = graph.weight_values[names[0]]
    cfg = ServerConfig(cache_bytes=64 * MiB, session_idle_s=0.5)
    with ServerThread(config=cfg) as srv, grpc.insecure_channel(srv.address) as ch:
        stub = pb_grpc.EdgeServiceStub(ch)
        for n in names[1:]:  # held, so the session pins it
            stub.UploadWeights(iter(upload_msgs(graph.weight_values[n])), timeout=TIMEOUT)
        s = Stream(stub.Session, pb.SessionRequest(open=pb.OpenSession(tenant=TENANT, slice_spec_json=spec_json)))
        s.send(pb.SessionRequest(weight=next(iter(encode_weight_chunks(sha_of(w0), w0, 1 << 16)))))
        s.send(pb.SessionRequest(begin_request=pb.BeginRequest(request_id=1)))
        s.send(pb.SessionRequest(tensor=next(iter(encode_tensor_chunks(1, split.cut_tensors[0], x, 1 << 10)))))
        rt = srv.runtime
        wait_for(lambda: rt.store.stats().pinned_bytes > 0 and rt.memory.stats().reserved_bytes > 0)
        # then nothing: the session ends DEADLINE_EXCEEDED and gives everything back
        assert s.done.wait(TIMEOUT - 5), "the idle session was not ended"
        assert s.error is not None and s.error.code() == grpc.StatusCode.DEADLINE_EXCEEDED, s.error
        assert "idle" in s.error.details()
        wait_for(lambda: not rt.sessions.sessions)
        st = rt.store.stats()
        assert (st.staging_bytes, st.pinned_bytes, rt.memory.stats().reserved_bytes) == (0, 0, 0)
        stats = stub.Stats(pb.StatsRequest(), timeout=TIMEOUT)
        assert (stats.active_sessions, stats.requests_failed) == (0, 1)
        s.close()


# ------------------------------------------------------------------------------------------------------
# abandoned work


def test_abandoned_validations_never_run_side_by_side(monkeypatch) -> None:
    """A ProfileGraph abandoned while its slice validated gave its validation slot back at once, though
    the validating thread cannot be stopped: the next one started beside it, and abandoned calls piled
    up validations holding the GIL together. Now the slot is held until the thread ends."""
    import json

    from edge_server import profile_service as rt_module

    running, peak = [0], [0]
    lock = threading.Lock()

    def counted(real):
        def run(*a, **kw):
            with lock:
                running[0] += 1
                peak[0] = max(peak[0], running[0])
            try:
                return real(*a, **kw)
            finally:
                with lock:
                    running[0] -= 1

        return run

    # the two validation steps of a ProfileGraph (parsing the spec, then the full check)
    monkeypatch.setattr(rt_module, "compile_slice", counted(rt_module.compile_slice))
    monkeypatch.setattr(rt_module, "parse_spec", counted(rt_module.parse_spec))

    def chain(n: int, seed: int) -> bytes:
        m = {"dtype": "float32", "shape": [1, 8]}
        ops, prev = [], "x"
        for i in range(n):
            ops.append({"name": f"r{seed}_{i}", "target": "aten.relu.default", "args": [{"t": prev}], "outputs": [m]})
            prev = f"r{seed}_{i}"
        return json.dumps({"version": 1, "ops": ops, "inputs": {"x": m}, "outputs": [prev], "weights": {}}).encode()

    bodies = [chain(10_000, s) for s in range(3)]  # ~0.5 CPU s to validate each
    # validation in the server process (profile_workers=0; in a child, one job per child anyway)
    cfg = ServerConfig(cache_bytes=16 * MiB, profile_workers=0)
    with ServerThread(config=cfg) as srv, grpc.insecure_channel(srv.address) as ch:
        stub = pb_grpc.EdgeServiceStub(ch)
        codes = []
        for body in bodies:  # one after another: each abandoned while the one before still validates
            req = pb.ProfileGraphRequest(slice_spec_json=body, iterations=1, warmup=0)
            codes.append(code_of(stub.ProfileGraph, req, timeout=0.1))
        assert codes == [grpc.StatusCode.DEADLINE_EXCEEDED] * 3
        wait_for(lambda: srv.runtime.bounds.compile_slots.idle and running[0] == 0, what="validations done")
        assert peak[0] == 1, f"{peak[0]} validations ran at once"
        # the server goes on: a small profile still answers
        ok = stub.ProfileGraph(pb.ProfileGraphRequest(slice_spec_json=chain(3, 9), iterations=1), timeout=TIMEOUT)
        assert len(ok.ops) == 3


def test_running_work_yields_to_a_waiting_tenant_at_the_next_op() -> None:
    """A long compute step (a profile of long ops) ran its whole time slice while another tenant's
    request waited for the worker; now it ends its slice at the next op boundary once a task waits."""
    from edge_server.scheduler import ComputeScheduler

    sched = ComputeScheduler(1)
    try:
        started, ops_run = threading.Event(), [0]

        def long_step() -> int:  # ops of 20 ms in a 2 s slice, yielding like run_batch / ProfileRun.step
            started.set()
            deadline = time.perf_counter() + 2.0
            while time.perf_counter() < deadline:
                time.sleep(0.02)
                ops_run[0] += 1
                if sched.contended("attacker"):
                    break
            return ops_run[0]

        sched.set_group("attacker", "a")
        sched.set_group("attacker2", "a")
        sched.set_group("victim", "v")
        first = sched.submit("attacker", long_step)
        assert started.wait(TIMEOUT)
        sched.submit("attacker2", lambda: None)  # its own tenant's work does not preempt it
        time.sleep(0.2)
        assert ops_run[0] >= 5
        before = ops_run[0]
        victim = sched.submit("victim", lambda: "done")
        assert victim.result(TIMEOUT).value == "done"
        assert first.result(TIMEOUT).value <= before + 3  # it yielded within an op or two of the victim's arrival
        assert not sched.contended("attacker") and not sched.contended("victim")
    finally:
        sched.close()


def test_idle_session_whose_client_reads_nothing_is_ended() -> None:
    """A client that sends requests with big outputs, never reads its stream and then goes silent: its
    session expires although the expiry cannot be delivered (the stream is full), and closing it
    frees its buffered outputs' memory and its session slot."""
    import json

    m_in, m_out = {"dtype": "float32", "shape": [1, 1024]}, {"dtype": "float32", "shape": [1024, 1024]}
    spec = json.dumps(
        {
            "version": 1,
            "ops": [
                {"name": "big", "target": "aten.repeat.default", "args": [{"t": "x"}, [1024, 1]], "outputs": [m_out]}
            ],
            "inputs": {"x": m_in},
            "outputs": ["big"],
            "weights": {},
        }
    ).encode()
    x = torch.ones(1, 1024)
    import psutil

    # An in-process server's cap covers this whole test process (after the full suite ~0.9 GiB of
    # models): 1 GiB on top of what it holds now, so the memory budget (what this test watches) is on.
    rss = psutil.Process().memory_info().rss
    cfg = ServerConfig(cache_bytes=64 * MiB, memory_bytes=rss + 1024 * MiB, session_idle_s=0.5)
    with ServerThread(config=cfg) as srv, grpc.insecure_channel(srv.address) as ch:
        stop = threading.Event()

        def msgs():
            yield pb.SessionRequest(open=pb.OpenSession(tenant=TENANT, slice_spec_json=spec))
            for rid in range(1, 17):  # 16 x 4 MiB of outputs: more than the stream and 16 MiB buffer take
                yield pb.SessionRequest(begin_request=pb.BeginRequest(request_id=rid))
                yield from (pb.SessionRequest(tensor=c) for c in encode_tensor_chunks(rid, "x", x, MiB))
            stop.wait(TIMEOUT)

        call = pb_grpc.EdgeServiceStub(ch).Session(msgs(), timeout=TIMEOUT)  # never read
        rt = srv.runtime
        try:
            wait_for(lambda: rt.sessions.sessions and rt.memory.stats().reserved_bytes > 0)
            wait_for(lambda: not rt.sessions.sessions, what="the unread idle session closed")
            wait_for(lambda: rt.memory.stats().reserved_bytes == 0, what="its outputs' memory freed")
        finally:
            stop.set()
            call.cancel()


# ------------------------------------------------------------------------------------------------------
# a client that sends and never reads its Session stream


@pytest.mark.slow  # ~10-30 s: ~400 000 acknowledgements produced, most of them before the bound stops it
def test_acknowledgements_a_client_never_reads_stop_its_session_stream() -> None:
    """In-stream twin of the data channel's bound (issue 12): one 1-byte weight resent 400 000 times,
    256 chunks a message, on a Session stream the client never reads. Each duplicate is a WeightStored
    event; the client's unread stream blocked their sending, and the session kept every one queued
    (an unbounded list: ~200 B of server memory per ~90 B the client sent, and one WeightsStored
    message over gRPC's message limit once they were sent). The session now stops reading the client's
    messages while :data:`~edge_server.session.MAX_EVENTS_WAITING` events wait unsent, so no more
    than that plus one message's worth are ever queued, and the idle timeout ends the session."""
    from edge_server.session import MAX_EVENTS_WAITING
    from ue_client import wire

    raw = b"\x05"
    sha = hashlib.sha256(raw).hexdigest()
    per_msg, n_msgs = 256, 1600
    body = wire.encode_weight_chunks([(sha, "uint8", (1,), 0, 1, raw)] * per_msg)
    stop = threading.Event()
    sent = [0]

    def requests():
        yield wire.open_session(TENANT, "m", None)
        for _ in range(n_msgs):
            if stop.is_set():
                return
            yield body
            sent[0] += 1
        stop.wait(60)

    cfg = ServerConfig(cache_bytes=64 * MiB, session_idle_s=1.0)
    with ServerThread(config=cfg) as srv:
        ch = wire.channel(srv.address)
        call = wire.session_call(wire.stub(ch), requests())
        try:
            opened = wire.decode_event(next(iter(call)))  # the one message this client reads
            session = srv.runtime.sessions.sessions[opened.session_id]
            peak = 0
            end = time.monotonic() + 120
            while not session.closed and time.monotonic() < end:
                peak = max(peak, session.events_waiting)
                time.sleep(0.005)
            assert session.closed, "the idle timeout did not end the session"
            assert peak <= MAX_EVENTS_WAITING + per_msg, peak
            assert sent[0] < n_msgs, "the server read every message: nothing held the client back"
        finally:
            stop.set()
            call.cancel()
            ch.close()
