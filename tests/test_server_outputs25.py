"""The UE takes from the server only the outputs its own capture expects.

A server (compromised, buggy, or not the one the user meant: ``tests.liar_proxy`` in front of a real one) chose what
the UE allocated and how long it waited: before session 25 a chunk of any output name was taken, its ``total_bytes``
allocated at once (the server chose the size), and every output byte counted as progress, so a server trickling
1-byte chunks, each under a new name, held a request for ever (session 24's tester, F6). Now a chunk is taken only for
an output of the request's split, with the dtype, shape and size of the client's capture (``Pending.expected``), and
output bytes count as progress in ``deadline.OUTPUT_STEPS`` steps of the expected outputs.
"""

from __future__ import annotations

import time

import psutil
import pytest

from modelgraph import zoo
from protos.coinfer.v1 import coinfer_pb2 as pb
from tests.checks import equals_user_model, recorded_patience
from tests.liar_proxy import LiarProxy
from ue_client import CoinferClient, DeadlineExceeded, deadline, new_tenant, wire
from ue_client.errors import ProtocolError
from ue_client.session import Pending

FAST = {"uplink_mbps": 400.0, "rtt_ms": 2.0}
HUGE = 1 << 40
"""A TiB: what a hostile server may declare as an output's size."""
EXPECTED = {"out": ("float32", (2, 5), 40)}


def _chunk(name="out", dtype="float32", shape=(2, 5), offset=0, total=40, data=b"\0" * 40, rid=1):
    return wire.OutputChunk(rid, name, dtype, shape, offset, total, data)


@pytest.mark.parametrize("chunk", [
    _chunk(name="z"),  # not an output of the slice
    _chunk(name="z", shape=(1 << 38,), total=HUGE, data=b"\0"),  # ... declared a TiB
    _chunk(total=HUGE, data=b"\0"),  # the expected name, another size
    _chunk(shape=(5, 2)),  # another shape
    _chunk(dtype="float64", total=80, data=b"\0" * 80),  # another dtype
    _chunk(offset=4, data=b"\0" * 36),  # not from its start
], ids=["name", "name-huge", "size", "shape", "dtype", "offset"])
def test_pending_refuses_outputs_it_does_not_expect(chunk):
    p = Pending(1, EXPECTED)
    rss = psutil.Process().memory_info().rss
    with pytest.raises(ProtocolError):
        p.add(chunk)
    assert not p.buffers and not p.received
    assert psutil.Process().memory_info().rss - rss < 64 << 20
    p.add(_chunk())  # the expected output is still taken
    assert p.received == {"out": 40} and p.output_step() == deadline.OUTPUT_STEPS


def test_output_bytes_count_as_progress_in_steps():
    """1-byte chunks of a 4000-byte output move the progress the deadline counts ``OUTPUT_STEPS`` times, not
    4000: a trickle cannot hold a request longer than that many stall windows."""
    p = Pending(1, {"a": ("uint8", (1000,), 1000), "b": ("float32", (750,), 3000)})
    seen = {p.output_step()}
    for name, n in (("a", 1000), ("b", 3000)):
        for i in range(n):
            p.add(wire.OutputChunk(1, name, *p.expected[name][:2], i, n, b"\1"))
            seen.add(p.output_step())
    assert sorted(seen) == list(range(deadline.OUTPUT_STEPS + 1))
    assert Pending(2, {}).output_step() == 0  # a request expecting no output bytes


def _client(address, **kw):
    return CoinferClient(zoo.spec("chain"), server=address, tenant=new_tenant(), policy="offload", server_ops=1,
                         link=FAST, profile_runs=2, probe=False, data_channel=False, **kw)


def _separate_outputs(o: pb.OpenSession) -> None:
    o.outputs_in_done = False  # outputs as their own chunks (the liar rewrites chunks)


class Liar:
    """The proxy's rewrite: honest until ``mode`` is set; "extra": a TiB output under a name the slice does not have
    before each answer; "trickle": each output chunk resent one byte every ``pace_s`` and the answer withheld."""

    def __init__(self):
        self.mode = None
        self.pace_s = 0.1
        self.trickled = 0

    def __call__(self, r: pb.SessionResponse):
        kind = r.WhichOneof("msg")
        if self.mode == "extra" and kind == "request_done":
            rid = r.request_done.request_id
            yield pb.SessionResponse(output=pb.TensorChunk(
                request_id=rid, meta=pb.TensorMeta(name="z", dtype="uint8", shape=[HUGE]), offset=0,
                total_bytes=HUGE, data=b"\0" * 16))
        if self.mode == "trickle" and kind in ("output", "request_done"):
            if kind == "output":
                c = r.output
                for i in range(len(c.data)):
                    time.sleep(self.pace_s)
                    if self.mode != "trickle":  # the test is over
                        return
                    self.trickled += 1
                    one = pb.TensorChunk()
                    one.CopyFrom(c)
                    one.offset, one.data = c.offset + i, c.data[i:i + 1]
                    yield pb.SessionResponse(output=one)
            return
        yield r


@pytest.mark.parametrize("fallback", [True, False])
def test_an_output_the_slice_does_not_have_fails_the_request_not_the_session(server, fallback):
    """The liar adds, to each answer, an output the split does not have, declared 1 TiB. The UE allocates nothing
    for it; the request fails (with fallback: completed locally, equal to the user's model), and the session
    honest answer is the server's again (after the client's back-off)."""
    liar = Liar()
    with LiarProxy(server.address, liar, _separate_outputs) as proxy, _client(proxy.address, fallback=fallback) as c:
        x = c.example_inputs
        c(*x)  # cold, honest
        liar.mode = "extra"
        rss = psutil.Process().memory_info().rss
        if fallback:
            y = c(*x)
            rep = c.last_report
            assert rep.fallback and "not an output of its slice" in rep.fallback_reason, rep.fallback_reason
            assert equals_user_model(c, y, x)
        else:
            with pytest.raises(ProtocolError, match="not an output of its slice"):
                c(*x)
        assert psutil.Process().memory_info().rss - rss < 256 << 20
        liar.mode = None
        end = time.monotonic() + 10.0
        while True:  # past the client's back-off after the trouble (0.5 s at first), on the same session
            try:
                y = c(*x)
            except ProtocolError:  # without fallback, the back-off answers with the trouble's error
                assert not fallback and time.monotonic() < end
                time.sleep(0.2)
                continue
            rep = c.last_report
            if not rep.fallback or time.monotonic() > end:
                break
            time.sleep(0.2)
        assert not rep.fallback and rep.server_ops > 0, rep.fallback_reason
        assert equals_user_model(c, y, x)


def test_a_server_trickling_output_bytes_does_not_hold_a_request(server, monkeypatch):
    """The liar resends the request's output one byte at a time, each 0.6 stall windows after the last, and never
    answers. Each byte used to count as progress: the request waited for all 40 of them (24 stall windows) before
    it could be given up; now bytes count in ``OUTPUT_STEPS`` steps of the expected 40 (2.5 bytes a step, each step
    slower than a stall window), so it is given up after one stall window past its expected time."""
    liar = Liar()
    with LiarProxy(server.address, liar, _separate_outputs) as proxy, \
            _client(proxy.address, fallback=False, deadline_slack_ms=300, timeout_ms=None) as c:
        x = c.example_inputs
        c(*x)  # cold, honest
        rule = recorded_patience(monkeypatch, 30.0)
        c(*x)  # warm, honest: the rule's stall window for this split
        stall_s = rule[-1].stall_s
        liar.pace_s, liar.mode = 0.6 * stall_s, "trickle"
        t0 = time.perf_counter()
        with pytest.raises(DeadlineExceeded):
            c(*x)
        took = time.perf_counter() - t0
        liar.mode = None
        r = rule[-1]
        # the trickle was under way when the client gave up (its first byte in). Since session 33 the request's own
        # input is handed to gRPC before the wait begins (the call's weight check runs there, ``DeferredCheck``), so
        # that hand-off no longer counts as progress within it and the client gives up at the first stall window
        # (before: at the third, with 2-4 bytes trickled)
        assert liar.trickled >= 1, liar.trickled
        # a step (2.5 bytes) takes 1.5 stall windows: given up at the first; all 40 bytes would take 24 windows
        assert took < r.expected_s + 6 * r.stall_s + 1.0, (took, r, liar.trickled)
