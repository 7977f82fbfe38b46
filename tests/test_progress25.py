"""The server's progress reports (session 24) under two loads session 24's tester found them wrong in (F3, F4).

- F3: the reporter looked at every request in flight every ``progress_interval_ms``, also when all of them waited for
  their client's cut tensors and nothing could move: 60 sessions of 16 waiting requests cost 0.34 server CPU s in 20 s
  (0.02 without reports). Now a session whose requests all wait on the client costs no look at all until something
  arrives (its request's bytes are then reported).
- F4: each report was queued on its own, one per request that moved and interval, and gRPC's flow-control window
  (~4 MiB on loopback, grown by its bandwidth probe) took them whether the client read or not: a client that stopped
  reading for 25 s with 16 requests moving found ~1000 reports per session ahead of its answers. Now a session has at
  most one round of reports waiting, filled when the stream takes it, the next one an interval after it was written,
  dropped when an answer waits behind it; a client that sets ``OpenSession.batch_progress`` gets each round as one
  message, so it finds at most about one message per interval it was away ahead of its answers.

The server is real (in-process, a free port); the clients are written against the proto. Its compute is made slow by
running one op per scheduler step and sleeping after it on the worker thread (as in tests/test_progress24.py).
"""

from __future__ import annotations

import asyncio
import json
import queue
import time

import torch

from edge_server import events as ev
from edge_server import requests as server_requests
from edge_server.config import ServerConfig
from edge_server.scheduler import ComputeScheduler
from edge_server.session import Session
from edge_server.tensor_codec import encode_tensor_chunks
from edge_server.weight_store import WeightStore
from protos.coinfer.v1 import coinfer_pb2 as pb
from tests.test_progress24 import INTERVAL_MS, server_options, slow_ops  # noqa: F401  (fixtures: 40 ms reports)

TIMEOUT = 60
WIDTH = 64


def _chain_spec(ops: int) -> bytes:
    """x (1, WIDTH) -> ``ops`` relus -> sum: a slice with no weights, a tiny input and a scalar output."""
    meta = {"dtype": "float32", "shape": [1, WIDTH]}
    out, prev = [], "x"
    for i in range(ops):
        out.append({"name": f"r{i}", "target": "aten.relu.default", "args": [{"t": prev}], "kwargs": {},
                    "outputs": [meta]})
        prev = f"r{i}"
    out.append({"name": "s", "target": "aten.sum.default", "args": [{"t": prev}], "kwargs": {},
                "outputs": [{"dtype": "float32", "shape": []}]})
    return json.dumps({"version": 1, "ops": out, "inputs": {"x": meta}, "outputs": ["s"], "weights": {}}).encode()


class _Stream:
    """One Session stream fed from a queue; opened with progress reports (``batch``: as ProgressBatch messages)."""

    def __init__(self, stub, tenant: str, spec: bytes, *, batch: bool) -> None:
        self.q: queue.Queue = queue.Queue()
        self.call = stub.Session(iter(self.q.get, None), timeout=TIMEOUT)
        self.q.put(pb.SessionRequest(open=pb.OpenSession(tenant=tenant, model_id="m", slice_spec_json=spec,
                                                         outputs_in_done=True, progress_events=True,
                                                         batch_progress=batch)))
        assert next(self.call).WhichOneof("msg") == "opened"
        assert next(self.call).WhichOneof("msg") == "slice_defined"

    def begin(self, rid: int) -> None:
        self.q.put(pb.SessionRequest(begin_request=pb.BeginRequest(request_id=rid)))

    def send_x(self, rid: int, chunk: int | None = None) -> None:
        x = torch.full((1, WIDTH), float(rid))
        for c in encode_tensor_chunks(rid, "x", x, chunk or x.nbytes):
            self.q.put(pb.SessionRequest(tensor=c))

    def end(self) -> None:
        self.q.put(None)
        self.call.cancel()


def _reports(r: pb.SessionResponse) -> list[pb.RequestProgress]:
    kind = r.WhichOneof("msg")
    if kind == "request_progress":
        return [r.request_progress]
    if kind == "progress_batch":
        return list(r.progress_batch.requests)
    return []


def test_requests_waiting_for_the_client_cost_the_reporter_nothing(server, stub, monkeypatch):
    """Eight requests wait for their cut tensors: over 0.6 s (15 intervals) the reporter reads no request's progress
    (before: all eight every interval, ~120 reads); a chunk that arrives is reported within about an interval."""
    reads = [0]
    orig = server_requests._Request.progress

    def counted(self):
        reads[0] += 1
        return orig(self)

    monkeypatch.setattr(server_requests._Request, "progress", counted)
    s = _Stream(stub, "waiting25", _chain_spec(4), batch=True)
    try:
        for rid in range(1, 9):
            s.begin(rid)
        time.sleep(0.3)  # the requests began and wait (the reporter looked once or twice)
        before = reads[0]
        time.sleep(0.6)
        idle_reads = reads[0] - before
        assert idle_reads <= 8, f"{idle_reads} progress reads in 0.6 s while every request waited for the client"
        # one chunk of request 3's cut tensor arrives: that moved, and is reported
        x = torch.full((1, WIDTH), 3.0)
        first = next(encode_tensor_chunks(3, "x", x, x.nbytes // 4))
        t0 = time.monotonic()
        s.q.put(pb.SessionRequest(tensor=first))
        for r in s.call:
            got = _reports(r)
            if got:
                assert [(p.request_id, p.input_bytes, p.ops_done) for p in got] == [(3, x.nbytes // 4, 0)]
                break
        assert time.monotonic() - t0 < 10 * INTERVAL_MS / 1e3 + 1.0
    finally:
        s.end()


def test_a_client_that_stops_reading_finds_a_round_per_interval_not_a_pile(server, stub, slow_ops):  # noqa: F811
    """Six requests move together (one op each in turn, 10 ms an op) while the client reads nothing for 1 s, then it
    reads: the report messages ahead of its first answer are at most one per interval since the requests began (+2),
    each a round of every request that moved. Before: one message per request that moved and interval (~5 per
    interval here), all of them ahead of the answers. The reports still follow each request, never back, none
    after its answer."""
    slow_ops[0] = 0.01  # a slice of 0.01 s per op: requests move all through the test
    n_req, n_ops, away_s = 6, 30, 1.0
    s = _Stream(stub, "nonreader25", _chain_spec(n_ops), batch=True)
    msgs: list[tuple[float, pb.SessionResponse]] = []
    try:
        t0 = time.monotonic()
        for rid in range(1, n_req + 1):
            s.begin(rid)
            s.send_x(rid)
        time.sleep(away_s)  # not reading: what the server sends meanwhile waits in the transport
        done: set[int] = set()
        for r in s.call:
            msgs.append((time.monotonic(), r))
            kind = r.WhichOneof("msg")
            assert kind != "request_failed", r
            if kind == "request_done":
                done.add(r.request_done.request_id)
                if len(done) == n_req:
                    break
    finally:
        s.end()
    kinds = [r.WhichOneof("msg") for _, r in msgs]
    first = kinds.index("request_done")
    ahead = [r for _, r in msgs[:first] if _reports(r)]
    elapsed = msgs[first][0] - t0
    bound = elapsed / (INTERVAL_MS / 1e3) + 2
    assert len(ahead) <= bound, f"{len(ahead)} report messages ahead of the first answer after {elapsed:.2f} s"
    assert all(k in ("progress_batch", "share_changed", "request_done") for k in kinds), set(kinds)
    last: dict[int, tuple[int, int]] = {}
    finished: set[int] = set()
    for _, r in msgs:
        if r.WhichOneof("msg") == "request_done":
            finished.add(r.request_done.request_id)
        got = _reports(r)
        assert len({p.request_id for p in got}) == len(got)  # a request at most once a round
        for p in got:
            assert p.request_id not in finished  # none after its answer
            assert p.ops_total == n_ops + 1 and p.ops_done <= p.ops_total
            now = (p.ops_done, p.input_bytes)
            before = last.get(p.request_id, (0, 0))
            assert now != before and now[0] >= before[0] and now[1] >= before[1], (before, now)
            last[p.request_id] = now


def test_a_round_never_goes_ahead_of_an_answer():
    """The session's side: a round of reports queued while the stream was quiet is dropped, unread, when an answer
    was queued behind it before the stream took it; one taken alone is filled then (the counts of that moment) and
    counts as written once the stream asks for its next event; one with nothing that moved is dropped."""

    async def main():
        store = WeightStore(1 << 20)
        scheduler = ComputeScheduler(1)
        session = Session("s25", "t", "m", config=ServerConfig(), store=store, scheduler=scheduler,
                          device=torch.device("cpu"), host=None)
        built = [0]

        def build(reports):
            def b():
                built[0] += 1
                return reports
            return b

        try:
            one = [ev.RequestProgress(1, 2, 5, 10)]
            behind = ev.ProgressRound(build(one))
            session.emit(behind)
            session.emit(ev.RequestFailed(1, "CANCELLED", "x"))
            assert isinstance(await session.next_event(), ev.RequestFailed)
            assert behind.written.is_set() and built[0] == 0
            empty = ev.ProgressRound(build([]))
            alone = ev.ProgressRound(build(one))
            session.emit(empty)
            taking = asyncio.get_running_loop().create_task(session.next_event())
            await asyncio.sleep(0.05)  # the stream took it alone: nothing moved, dropped
            assert empty.written.is_set() and built[0] == 1 and not taking.done()
            session.emit(alone)
            got = await taking
            assert got is alone and got.reports == one and built[0] == 2
            assert not alone.written.is_set()  # being written: the reporter waits
            session.emit(ev.RequestFailed(2, "CANCELLED", "y"))
            assert isinstance(await session.next_event(), ev.RequestFailed) and alone.written.is_set()
        finally:
            await session.close()
            scheduler.close()

    asyncio.run(main())


def test_a_client_that_does_not_batch_gets_one_message_per_request(server, stub, slow_ops):  # noqa: F811
    """A client that asked for reports but not ``batch_progress`` (session 24's) gets each round as one
    ``request_progress`` per request that moved, as before."""
    slow_ops[0] = 0.01  # a slice of 0.01 s per op: requests move all through the test
    s = _Stream(stub, "unbatched25", _chain_spec(20), batch=False)
    kinds = []
    try:
        for rid in (1, 2):
            s.begin(rid)
            s.send_x(rid)
        done = 0
        for r in s.call:
            kinds.append(r.WhichOneof("msg"))
            done += kinds[-1] == "request_done"
            if done == 2:
                break
    finally:
        s.end()
    assert "request_progress" in kinds and "progress_batch" not in kinds, kinds


def test_the_client_reads_batches():
    """The project's client decodes a ProgressBatch into the reports of each request."""
    from ue_client import wire

    m = pb.SessionResponse(progress_batch=pb.ProgressBatch(requests=[
        pb.RequestProgress(request_id=3, ops_done=2, ops_total=5, input_bytes=10),
        pb.RequestProgress(request_id=4, ops_done=1, ops_total=5, input_bytes=7)]))
    assert wire.decode_event(m) == wire.Progresses((wire.Progress(3, 2, 5, 10), wire.Progress(4, 1, 5, 7)))
    opened = pb.SessionRequest.FromString(wire.open_session("t", "m")).open
    assert opened.progress_events and opened.batch_progress

