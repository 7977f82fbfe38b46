"""Resource bounds and status codes of the edge server (issue 11), against a real server on port 0.

Covers: ProfileGraph of slices that pass the shape checks but fail to run (INVALID_ARGUMENT, no
traceback), deeply nested JSON, ops over the scratch/time budget refused up front
(RESOURCE_EXHAUSTED), and a cancelled ProfileGraph that stops at the next op boundary.
"""

from __future__ import annotations

import json
import logging
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from edge_server.config import MiB, ServerConfig
from protos.coinfer.v1 import coinfer_pb2 as pb

TIMEOUT = 60

CFG = ServerConfig(
    # thousands of bad calls from one address (the fuzz test): their statuses are the point here, not the
    # tarpit that would slow them to 10 per s (tests/test_tarpit.py)
    tarpit_rate=0,
    cache_bytes=32 * MiB,
    staging_bytes=16 * MiB,
    max_sessions=8,
    max_chunk_bytes=1 * MiB,
    max_message_bytes=2 * MiB,
    preferred_chunk_bytes=256 * 1024,
)


def meta(shape, dtype="float32"):
    return {"dtype": dtype, "shape": list(shape)}


def spec(ops, inputs, outputs, weights=None) -> bytes:
    return json.dumps(
        {"version": 1, "ops": ops, "inputs": inputs, "outputs": outputs, "weights": weights or {}}
    ).encode()


def op(name, target, args, out, kwargs=None):
    return {"name": name, "target": target, "args": args, "kwargs": kwargs or {}, "outputs": [out]}


def chain(n: int, shape=(1, 8), target="aten.relu.default") -> bytes:
    m = meta(shape)
    ops, prev = [], "x"
    for i in range(n):
        ops.append(op(f"r{i}", target, [{"t": prev}], m))
        prev = f"r{i}"
    return spec(ops, {"x": m}, [prev])


def conv(dtype, n, c, h, o, k, bias_shape=None) -> bytes:
    oh = h - k + 1
    weights = {"w": {**meta([o, c, k, k], dtype), "sha256": ""}}
    args = [{"t": "x"}, {"w": "w"}]
    if bias_shape is not None:
        weights["b"] = {**meta(bias_shape, dtype), "sha256": ""}
        args.append({"w": "b"})
    return spec(
        [op("c", "aten.conv2d.default", args, meta([n, o, oh, oh], dtype))],
        {"x": meta([n, c, h, h], dtype)},
        ["c"],
        weights,
    )


@pytest.fixture(scope="module")
def server_options():
    return {"config": CFG}



def profile_error(stub, body: bytes, **kw) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as ei:
        stub.ProfileGraph(pb.ProfileGraphRequest(slice_spec_json=body, iterations=1, warmup=0), timeout=TIMEOUT, **kw)
    return ei.value


def assert_serving(channel) -> None:
    h = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
    assert h.status == health_pb2.HealthCheckResponse.SERVING


RUNTIME_FAILURES = {
    "relu_complex64": spec(
        [op("r", "aten.relu.default", [{"t": "x"}], meta([4], "complex64"))], {"x": meta([4], "complex64")}, ["r"]
    ),
    "mm_float_bool": spec(
        [op("m", "aten.mm.default", [{"t": "a"}, {"t": "b"}], meta([2, 2]))],
        {"a": meta([2, 3]), "b": meta([3, 2], "bool")},
        ["m"],
    ),
    "conv_bias_misshaped": conv("float32", 1, 3, 8, 4, 3, bias_shape=[1, 4]),
}


@pytest.mark.parametrize("name", sorted(RUNTIME_FAILURES))
def test_slice_that_fails_to_run_is_invalid_argument(server, channel, stub, name, caplog) -> None:
    with caplog.at_level(logging.INFO):
        err = profile_error(stub, RUNTIME_FAILURES[name])
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err.details()
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], "a client mistake logged an ERROR"
    assert_serving(channel)


def test_deeply_nested_json_is_invalid_argument(server, channel, stub, caplog) -> None:
    with caplog.at_level(logging.INFO):
        err = profile_error(stub, b"[" * 200_000)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "nested" in err.details()
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert_serving(channel)


def test_op_over_scratch_budget_is_refused_before_it_runs(server, channel, stub) -> None:
    """The issue's attack: a float64 conv whose im2col scratch is gigabytes while its tensors are MiBs."""
    # 67 MiB of input, 1 output channel; im2col scratch 8 x (64*8*8) x 121^2 float64 = 3.6 GiB (measured
    # on this torch: the estimate is within 1 % of the peak RSS increase of such a conv)
    body = conv("float64", 8, 64, 128, 1, 8)
    before = server.runtime.scheduler.stats().tasks_run
    err = profile_error(stub, body)
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err.details()
    assert "op 'c'" in err.details() and "scratch" in err.details()
    assert server.runtime.scheduler.stats().tasks_run == before  # refused before anything ran
    assert_serving(channel)


def test_op_over_time_budget_is_refused(server, stub) -> None:
    """A float32 matmul of 2 x 8192^3 FLOPs (1.1 TFLOP) is over a 2 s budget by the estimate."""
    rt = server.runtime
    n = 8192
    body = spec(
        [op("m", "aten.mm.default", [{"t": "a"}, {"t": "b"}], meta([n, n]))],
        {"a": meta([n, n]), "b": meta([n, n])},
        ["m"],
    )
    flops = 2.0 * n**3
    err = profile_error(stub, body) if flops > rt.op_limits.max_flops else None
    if err is not None:
        assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "time budget" in err.details()
    else:  # a device fast enough to do it within the budget: nothing to refuse
        pytest.skip(f"device rate {rt.op_limits.device_flops / 1e9:.0f} GFLOP/s runs it within the budget")


def test_cancelled_profile_stops_at_the_next_op(server, channel, stub) -> None:
    """A ProfileGraph whose client goes away stops within one op: ops started after the cancel <= 1."""
    rt = server.runtime
    body = chain(400, shape=(64, 4096))  # 400 relus of 1 MiB; 50 iterations: several seconds of work
    b = rt.bounds
    before_ops, before_stopped, before_cancel = b.ops_after_cancel, b.stopped_runs, rt.profiles_cancelled
    # in the server's own workers (profile_workers=0) or in a profiling child (the default)
    started = (lambda: rt.sandbox.runs_started) if rt.sandbox is not None else (lambda: rt.scheduler.stats().tasks_run)
    start_tasks = started()
    # cancelled once its first step has run (not by a wall-clock deadline: on a quiet machine a warm server
    # finished the whole profile inside 1.5 s, and a cold one was still validating when it expired)
    fut = stub.ProfileGraph.future(pb.ProfileGraphRequest(slice_spec_json=body, iterations=50, warmup=0),
                                   timeout=120)
    deadline = time.monotonic() + 60
    while started() == start_tasks and not fut.done() and time.monotonic() < deadline:
        time.sleep(0.002)
    time.sleep(0.05)  # a few ops into the run
    assert not fut.done(), "the profile ended before it could be cancelled"
    assert fut.cancel()
    with pytest.raises(grpc.FutureCancelledError):
        fut.result()
    deadline = time.monotonic() + 30
    while rt.profiles_cancelled == before_cancel and time.monotonic() < deadline:
        time.sleep(0.02)
    assert rt.profiles_cancelled == before_cancel + 1
    while b.stopped_runs == before_stopped and time.monotonic() < deadline:
        time.sleep(0.02)  # the step running at the cancel ends at its next op boundary
    assert b.stopped_runs == before_stopped + 1
    assert b.ops_after_cancel - before_ops <= 1
    assert started() > start_tasks  # it did run before the cancel
    assert rt.memory.stats().reserved_bytes == 0
    assert_serving(channel)


def test_fuzz_every_rpc_no_internal(server, channel, caplog) -> None:
    """2,000 malformed messages (random bytes, truncated/mutated protos, nested and inconsistent JSON, bad
    chunks) on every RPC: no INTERNAL/UNKNOWN, no ERROR log, and the server keeps serving."""
    from edge_server.fuzzing import run_fuzz

    with caplog.at_level(logging.INFO):
        report = run_fuzz(server.address, 2000, seed=11)
    assert report.messages >= 2000
    assert report.internal == 0, report.bad
    assert report.codes["INVALID_ARGUMENT"] > report.calls // 2  # the malformed ones were seen as such
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert_serving(channel)
    rt = server.runtime
    deadline = time.monotonic() + 30
    while rt.sessions.sessions and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not rt.sessions.sessions and rt.store.stats().staging_bytes == 0
    assert rt.memory.stats().reserved_bytes == 0


def test_validation_is_linear_in_slice_size() -> None:
    """20k chained ops compile (validation + budget) with work per op that does not grow with the size:
    counted in meta-kernel runs (one per distinct call), not in time."""
    from edge_server.slices import compile_slice
    from modelgraph import slice as mgslice

    calls = []
    real = mgslice._meta_call

    def counting(*a, **kw):
        calls.append(1)
        return real(*a, **kw)

    mgslice._meta_call = counting
    try:
        cs = compile_slice(chain(20_000), require_hashes=False)
    finally:
        mgslice._meta_call = real
    assert len(cs.order) == 20_000 and [op.name for op in cs.order[:3]] == ["r0", "r1", "r2"]
    assert len(calls) == 1  # one distinct (target, shapes) call: one meta-kernel run


@pytest.mark.slow
def test_validation_time_20k_ops() -> None:
    """The issue's target: 20k chained ops validate in under 1 s (timed: slow-marked)."""
    from edge_server.slices import compile_slice, warm_up_validation

    warm_up_validation()  # what the server does at start
    body = chain(20_000)
    t0 = time.process_time()
    compile_slice(body, require_hashes=False)
    assert time.process_time() - t0 < 1.0


def test_cancelled_request_stops_at_the_next_op(server, channel, stub) -> None:
    """A request cancelled (CancelRequest) mid-run stops at its next op boundary: at most one op finishes
    after the cancel (the scheduler's recorded counter), the answer is CANCELLED, the session goes on."""
    import queue

    import torch

    from edge_server.tensor_codec import encode_tensor_chunks

    rt = server.runtime
    b = rt.bounds
    before_ops, before_stopped = b.ops_after_cancel, b.stopped_runs
    # 1000 x 1 MiB tanhs: seconds of compute (2000 relus ran in 0.25-0.5 s: on a loaded machine the run could
    # end between the moment it was seen running and the cancel's arrival)
    body = chain(1000, shape=(64, 4096), target="aten.tanh.default")
    q: queue.Queue = queue.Queue()
    responses = stub.Session(iter(q.get, None), timeout=TIMEOUT)
    try:
        q.put(pb.SessionRequest(open=pb.OpenSession(tenant="canceller", slice_spec_json=body)))
        assert next(responses).WhichOneof("msg") == "opened"
        assert next(responses).WhichOneof("msg") == "slice_defined"
        (sid,) = [k for k, s in rt.sessions.sessions.items() if s.tenant == "canceller"]  # not an earlier test's
        q.put(pb.SessionRequest(begin_request=pb.BeginRequest(request_id=1)))
        for c in encode_tensor_chunks(1, "x", torch.ones(64, 4096), 1 << 20):
            q.put(pb.SessionRequest(tensor=c))
        deadline = time.monotonic() + 30
        while rt.scheduler.busy_ms(sid) < 50 and time.monotonic() < deadline:
            time.sleep(0.01)  # it is running
        q.put(pb.SessionRequest(cancel_request=pb.CancelRequest(request_id=1)))
        r = next(responses)
        assert r.WhichOneof("msg") == "request_failed" and r.request_failed.code == grpc.StatusCode.CANCELLED.value[0]
        while b.stopped_runs == before_stopped and time.monotonic() < deadline:
            time.sleep(0.01)
        assert b.stopped_runs == before_stopped + 1
        assert b.ops_after_cancel - before_ops <= 1
        q.put(pb.SessionRequest(close=pb.CloseSession()))
        assert list(responses) == []
    finally:
        q.put(None)
        responses.cancel()
    assert rt.memory.stats().reserved_bytes == 0
    assert_serving(channel)


def test_defined_slices_hold_their_memory_in_the_budget(server, channel, stub) -> None:
    """A slice a session defines and never uses (as the UE's prefetch defines its warm target ahead) stays
    compiled until it is replaced or the session ends: ~11-16 bytes of Python objects per byte of its JSON
    (tracemalloc, relu chains and resnet18 / mobilenet_v2 / tiny_vit slices), ~128 MiB for a 60k-op slice
    of 8.6 MB. Those bytes are counted in the ``--memory-mb`` budget while the slice lives (one tenant at
    most half of it): before, eight such slices per session were held outside it (none reserved)."""
    import gc
    import queue
    import tracemalloc

    from edge_server.memory import MemoryBudget
    from edge_server.slices import compile_slice

    body = chain(3000)
    gc.collect()
    tracemalloc.start()
    held = compile_slice(body, require_hashes=False)
    gc.collect()
    real = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    del held
    rt = server.runtime
    b = rt.bounds
    old_memory = b.memory
    budget = b.memory = MemoryBudget(int(4.5 * real) * 2)  # one tenant may hold 4.5 such slices
    q: queue.Queue = queue.Queue()
    responses = stub.Session(iter(q.get, None), timeout=TIMEOUT)
    try:
        q.put(pb.SessionRequest(open=pb.OpenSession(tenant="definer")))
        assert next(responses).WhichOneof("msg") == "opened"
        answers = []
        for i in range(6):  # never used: no request follows
            q.put(pb.SessionRequest(define_slice=pb.DefineSlice(slice_id=f"s{i}", slice_spec_json=body)))
            r = next(responses)
            answers.append(r.WhichOneof("msg"))
            if answers[-1] == "slice_defined":
                assert b.memory.stats().reserved_bytes >= 0.8 * real * len(answers)
        assert answers[:3] == ["slice_defined"] * 3 and answers[-1] == "slice_rejected", answers
        assert r.slice_rejected.code == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0], r.slice_rejected.message
        # replacing a slice moves its charge, it does not add one
        kept = b.memory.stats().reserved_bytes
        q.put(pb.SessionRequest(define_slice=pb.DefineSlice(slice_id="s0", slice_spec_json=chain(3))))
        assert next(responses).WhichOneof("msg") == "slice_defined"
        assert b.memory.stats().reserved_bytes < kept
        q.put(pb.SessionRequest(close=pb.CloseSession()))
        assert list(responses) == []
    finally:
        q.put(None)
        responses.cancel()
        b.memory = old_memory
    assert_charges_released(budget, channel)


def assert_charges_released(budget, channel, timeout_s: float = 10.0) -> None:
    """The session's end released every charge it held in ``budget`` (within ``timeout_s``: the server's
    teardown runs after the stream closes), and the server still serves."""
    deadline = time.monotonic() + timeout_s
    while budget.stats().reserved_bytes and time.monotonic() < deadline:
        time.sleep(0.01)
    assert budget.stats().reserved_bytes == 0
    assert_serving(channel)


def test_redefining_a_slice_id_at_the_budget_replaces_its_charge(server, channel, stub) -> None:
    """A UE at its slice cap redefines its least recently used id with another split
    (``ue_client.request``): the old slice under that id is dropped then (its requests in flight keep
    theirs), so its charge is given back before the new one is reserved. Before, both were held during
    the new slice's validation: a tenant whose slices filled its part of ``--memory-mb`` had the same-size
    redefinition refused RESOURCE_EXHAUSTED, its old slice dropped as well, and the UE never sent that
    split again on the session. Redefined 20 times, the charge stays that of the slices held."""
    import queue

    from edge_server.memory import MemoryBudget
    from edge_server.session import SLICE_BYTES_PER_SPEC_BYTE

    body = chain(300)
    charge = SLICE_BYTES_PER_SPEC_BYTE * len(body)
    b = server.runtime.bounds
    old_memory = b.memory
    budget = b.memory = MemoryBudget(2 * int(2.5 * charge))  # the tenant may hold 2.5 such slices
    q: queue.Queue = queue.Queue()
    responses = stub.Session(iter(q.get, None), timeout=TIMEOUT)
    try:
        q.put(pb.SessionRequest(open=pb.OpenSession(tenant="redefiner")))
        assert next(responses).WhichOneof("msg") == "opened"
        for sid in ["s0", "s1"] + ["s0", "s1"] * 10:
            q.put(pb.SessionRequest(define_slice=pb.DefineSlice(slice_id=sid, slice_spec_json=body)))
            r = next(responses)
            assert r.WhichOneof("msg") == "slice_defined", (sid, r)
            assert budget.stats().reserved_bytes <= 2 * charge
        q.put(pb.SessionRequest(close=pb.CloseSession()))
        assert list(responses) == []
    finally:
        q.put(None)
        responses.cancel()
        b.memory = old_memory
    assert_charges_released(budget, channel)
