"""The resource attacks of issue 11 as drivers, a victim client, and an RSS sampler (tests and benchmarks).

Each attack runs against a server address until ``stop`` is set (or its own bound is reached) and
returns what it saw (status counts). The victim is a well-behaved tenant: one session, its weights
uploaded once, then requests one at a time, each answer checked against local execution and timed.

Attacks:
  * ``no_read``: a session whose client never reads its stream, sending requests with 32 MiB outputs;
  * ``waiting``: requests that get their first cut tensor (whose intermediates the server computes)
    and never the second;
  * ``conv64``: ProfileGraph of a float64 conv2d whose im2col scratch is gigabytes (declared: MiBs);
  * ``abandon``: concurrent ProfileGraph calls of a long slice, abandoned after a short deadline, a
    round every 0.3 s;
  * ``fuzz``: malformed messages on every RPC (``edge_server.fuzzing``);
  * ``cpu_control``: not an attack: busy processes that never talk to the server (the machine's share
    of a ratio).
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import json
import os
import queue
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import grpc
import torch

from edge_server.tensor_codec import TensorAssembler, decode_tensor_chunk, encode_tensor_chunks, encode_weight_chunks
from protos.coinfer.v1 import coinfer_pb2 as pb
from protos.coinfer.v1 import coinfer_pb2_grpc as pb_grpc

__all__ = ["ATTACKS", "RssSampler", "Victim", "pin_process", "run_attack", "serve_subprocess"]

MiB = 1 << 20


def _meta(shape, dtype="float32"):
    return {"dtype": dtype, "shape": list(shape)}


def _op(name, target, args, out, kwargs=None):
    return {"name": name, "target": target, "args": args, "kwargs": kwargs or {}, "outputs": [out]}


# ------------------------------------------------------------------------------------------------------
# the victim


class Victim:
    """A tenant running an MLP slice (``layers`` x Linear(width, width) + ReLU) on ``batch`` rows
    (``token``: its bearer token, for a server run with ``--auth-tokens``).

    :meth:`run` sends ``n`` requests one after another on one session and returns their latencies in
    ms; every output is compared with local execution (``torch.testing.assert_close``, bitwise on CPU
    with one thread) and a wrong or failed answer raises AssertionError.
    """

    def __init__(
        self,
        address: str,
        *,
        tenant: str = "victim",
        layers: int = 4,
        width: int = 256,
        batch: int = 16,
        seed: int = 0,
        token: str | None = None,
    ) -> None:
        self.address = address
        self.tenant = tenant
        self.metadata = (("authorization", f"Bearer {token}"),) if token else None
        """Call metadata: the bearer token of a server run with ``--auth-tokens``."""
        gen = torch.Generator().manual_seed(seed)
        self.weights = {}
        ops, prev = [], "x"
        for i in range(layers):
            w = torch.randn(width, width, generator=gen) / width**0.5
            b = torch.randn(width, generator=gen)
            self.weights[f"w{i}"], self.weights[f"b{i}"] = w, b
            ops.append(
                _op(
                    f"fc{i}",
                    "aten.linear.default",
                    [{"t": prev}, {"w": f"w{i}"}, {"w": f"b{i}"}],
                    _meta([batch, width]),
                )
            )
            ops.append(_op(f"r{i}", "aten.relu.default", [{"t": f"fc{i}"}], _meta([batch, width])))
            prev = f"r{i}"
        self.sha = {k: hashlib.sha256(v.numpy().tobytes()).hexdigest() for k, v in self.weights.items()}
        self.spec = json.dumps(
            {
                "version": 1,
                "ops": ops,
                "inputs": {"x": _meta([batch, width])},
                "outputs": [prev],
                "weights": {k: {**_meta(list(v.shape)), "sha256": self.sha[k]} for k, v in self.weights.items()},
            }
        ).encode()
        self.out_name = prev
        self.layers = layers
        self.server_ms: list[tuple[float, float]] = []
        """(total_ms, queue_ms) of each request's RequestDone timings: the server's own time and its wait
        for a compute worker (the fair pool's part of the latency), in request order."""
        self.x = torch.randn(batch, width, generator=gen)

    def expected(self, x: torch.Tensor) -> torch.Tensor:
        y = x
        with torch.inference_mode():
            for i in range(self.layers):
                y = torch.relu(torch.nn.functional.linear(y, self.weights[f"w{i}"], self.weights[f"b{i}"]))
        return y

    def run(self, n: int, *, timeout: float = 60.0) -> list[float]:
        """``n`` sequential requests on one session; returns per-request latency in ms (weights upload
        and session open not included)."""
        q: queue.Queue = queue.Queue()
        with grpc.insecure_channel(self.address) as ch:
            stub = pb_grpc.EdgeServiceStub(ch)
            responses = stub.Session(iter(q.get, None), timeout=timeout, metadata=self.metadata)
            try:
                q.put(
                    pb.SessionRequest(
                        open=pb.OpenSession(tenant=self.tenant, model_id="victim", slice_spec_json=self.spec)
                    )
                )
                opened = next(responses)
                assert opened.WhichOneof("msg") == "opened", opened
                defined = next(responses)
                assert defined.WhichOneof("msg") == "slice_defined", defined
                missing = set(defined.slice_defined.missing_weights)
                for k, t in self.weights.items():
                    if self.sha[k] in missing:
                        missing.discard(self.sha[k])
                        for c in encode_weight_chunks(self.sha[k], t, 1 * MiB):
                            q.put(pb.SessionRequest(weight=c))
                latencies = []
                for rid in range(1, n + 1):
                    x = self.x + rid
                    t0 = time.perf_counter()
                    q.put(pb.SessionRequest(begin_request=pb.BeginRequest(request_id=rid)))
                    for c in encode_tensor_chunks(rid, "x", x, 1 * MiB):
                        q.put(pb.SessionRequest(tensor=c))
                    out = self._await(responses, rid)
                    latencies.append((time.perf_counter() - t0) * 1e3)
                    torch.testing.assert_close(out, self.expected(x), rtol=0, atol=0)
                q.put(pb.SessionRequest(close=pb.CloseSession()))
                for _ in responses:
                    pass
                return latencies
            finally:
                q.put(None)
                responses.cancel()

    def _await(self, responses, rid: int) -> torch.Tensor:
        asm: TensorAssembler | None = None
        out = None
        for r in responses:
            kind = r.WhichOneof("msg")
            if kind == "output" and r.output.request_id == rid:
                p = decode_tensor_chunk(r.output, 64 * MiB)
                asm = asm or TensorAssembler(p.name, p.dtype, p.shape, p.total_bytes)
                if asm.add(p):
                    out = asm.tensor()
            elif kind == "request_done" and r.request_done.request_id == rid:
                assert out is not None, "request done without its output"
                t = r.request_done.timings
                self.server_ms.append((t.total_ms, t.queue_ms))
                return out
            elif kind == "request_failed":
                raise AssertionError(
                    f"victim request {r.request_failed.request_id} failed: "
                    f"{r.request_failed.code} {r.request_failed.message}"
                )
        raise AssertionError("the victim's stream ended early")


# ------------------------------------------------------------------------------------------------------
# attacks


@dataclass
class AttackReport:
    name: str
    calls: int = 0
    codes: collections.Counter = field(default_factory=collections.Counter)


def _code(e: grpc.RpcError) -> str:
    return e.code().name if isinstance(e, grpc.Call) else "UNKNOWN"


def _no_read(address: str, stop: threading.Event, report: AttackReport, *, requests: int = 64) -> None:
    """Requests whose 4 MiB outputs the client never reads (it never iterates the response stream)."""
    spec = json.dumps(
        {
            "version": 1,
            "ops": [_op("big", "aten.repeat.default", [{"t": "x"}, [1024, 1]], _meta([1024, 1024]))],
            "inputs": {"x": _meta([1, 1024])},
            "outputs": ["big"],
            "weights": {},
        }
    ).encode()
    x = torch.ones(1, 1024)

    def msgs() -> Iterator[pb.SessionRequest]:
        yield pb.SessionRequest(open=pb.OpenSession(tenant="noread", slice_spec_json=spec))
        for rid in range(1, requests + 1):
            yield pb.SessionRequest(begin_request=pb.BeginRequest(request_id=rid))
            yield from (pb.SessionRequest(tensor=c) for c in encode_tensor_chunks(rid, "x", x, MiB))
            if stop.is_set():
                return
        stop.wait()

    with grpc.insecure_channel(address) as ch:
        call = pb_grpc.EdgeServiceStub(ch).Session(msgs(), timeout=600)
        stop.wait()
        call.cancel()
        report.calls += 1


def _waiting(address: str, stop: threading.Event, report: AttackReport, *, requests: int = 16) -> None:
    """Requests that send the cut tensor feeding 64 MiB of intermediates and never the second one."""
    spec = json.dumps(
        {
            "version": 1,
            "ops": [
                _op("big", "aten.repeat.default", [{"t": "a"}, [4096, 4]], _meta([4096, 4096])),
                _op("r", "aten.relu.default", [{"t": "big"}], _meta([4096, 4096])),
                _op("s", "aten.add.Tensor", [{"t": "r"}, {"t": "b"}], _meta([4096, 4096])),
            ],
            "inputs": {"a": _meta([1, 1024]), "b": _meta([1, 1])},
            "outputs": ["s"],
            "weights": {},
        }
    ).encode()
    a = torch.ones(1, 1024)
    refused = []

    def msgs() -> Iterator[pb.SessionRequest]:
        yield pb.SessionRequest(open=pb.OpenSession(tenant="waiter", slice_spec_json=spec))
        for rid in range(1, requests + 1):
            yield pb.SessionRequest(begin_request=pb.BeginRequest(request_id=rid))
            yield from (pb.SessionRequest(tensor=c) for c in encode_tensor_chunks(rid, "a", a, MiB))
        stop.wait()

    with grpc.insecure_channel(address) as ch:
        call = pb_grpc.EdgeServiceStub(ch).Session(msgs(), timeout=600)
        try:
            for r in call:
                if r.WhichOneof("msg") == "request_failed":
                    refused.append(r.request_failed.code)
                    report.codes[f"request:{r.request_failed.code}"] += 1
                if stop.is_set():
                    break
        except grpc.RpcError as e:
            report.codes[_code(e)] += 1
        finally:
            call.cancel()
        report.calls += 1


def _conv64(address: str, stop: threading.Event, report: AttackReport) -> None:
    """ProfileGraph of one float64 conv2d: 67 MiB declared, 3.6 GiB of im2col scratch."""
    n, c, h, o, k = 8, 64, 128, 1, 8
    oh = h - k + 1
    spec = json.dumps(
        {
            "version": 1,
            "ops": [_op("c", "aten.conv2d.default", [{"t": "x"}, {"w": "w"}], _meta([n, o, oh, oh], "float64"))],
            "inputs": {"x": _meta([n, c, h, h], "float64")},
            "outputs": ["c"],
            "weights": {"w": {**_meta([o, c, k, k], "float64"), "sha256": ""}},
        }
    ).encode()
    with grpc.insecure_channel(address) as ch:
        stub = pb_grpc.EdgeServiceStub(ch)
        while not stop.is_set():
            try:
                stub.ProfileGraph(pb.ProfileGraphRequest(slice_spec_json=spec, iterations=1), timeout=60)
                report.codes["OK"] += 1
            except grpc.RpcError as e:
                report.codes[_code(e)] += 1
            report.calls += 1
            stop.wait(0.05)


def long_chain(ops: int = 400, shape=(64, 4096), seed: int = 0) -> bytes:
    """A slice of ``ops`` chained 1 MiB relus (a distinct graph per ``seed``: no profile cache hit)."""
    m = _meta(shape)
    out, prev = [], "x"
    for i in range(ops):
        out.append(_op(f"r{seed}_{i}", "aten.relu.default", [{"t": prev}], m))
        prev = f"r{seed}_{i}"
    return json.dumps({"version": 1, "ops": out, "inputs": {"x": m}, "outputs": [prev], "weights": {}}).encode()


def _abandon(
    address: str, stop: threading.Event, report: AttackReport, *, parallel: int = 6, period_s: float = 0.3
) -> None:
    """``parallel`` ProfileGraph calls at a time of long slices, each abandoned after 0.3 s; a round
    starts every ``period_s`` at most (a call refused at once does not make it a flood of calls)."""
    seq = 0

    def one(i: int) -> None:
        with grpc.insecure_channel(address) as ch:
            stub = pb_grpc.EdgeServiceStub(ch)
            try:
                stub.ProfileGraph(
                    pb.ProfileGraphRequest(slice_spec_json=long_chain(seed=i), iterations=50), timeout=0.3
                )
                report.codes["OK"] += 1
            except grpc.RpcError as e:
                report.codes[_code(e)] += 1
            report.calls += 1

    while not stop.is_set():
        t0 = time.monotonic()
        threads = [threading.Thread(target=one, args=(seq + j,)) for j in range(parallel)]
        seq += parallel
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        stop.wait(max(0.0, t0 + period_s - time.monotonic()))


def _cpu_control(address: str, stop: threading.Event, report: AttackReport, *, procs: int = 2) -> None:
    """Control, not an attack: ``procs`` busy-looping processes that never talk to the server. What the
    victim's latency does when the machine's CPUs are merely busy (an attacker's own client work and
    the server's work for it take CPU too): an attack's ratio near this one is the machine, not the
    server letting the attacker ahead."""
    burners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(procs)]
    try:
        stop.wait()
    finally:
        for p in burners:
            p.kill()
            p.wait()


def _fuzz(address: str, stop: threading.Event, report: AttackReport) -> None:
    from edge_server.fuzzing import run_fuzz

    seed = 0
    while not stop.is_set():
        r = run_fuzz(address, 200, seed=seed)
        seed += 1
        report.calls += r.calls
        report.codes.update(r.codes)


ATTACKS: dict[str, Callable[[str, threading.Event, AttackReport], None]] = {
    "no_read": _no_read,
    "waiting": _waiting,
    "conv64": _conv64,
    "abandon": _abandon,
    "fuzz": _fuzz,
    "cpu_control": _cpu_control,
}


class RssSampler:
    """Samples a process's resident set size every ``interval`` seconds; ``peak`` in bytes."""

    def __init__(self, pid: int, interval: float = 0.02) -> None:
        import psutil

        self._proc = psutil.Process(pid)
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.peak = max(self.peak, self._proc.memory_info().rss)
            except Exception:  # the process went away
                return
            self._stop.wait(self.interval)

    def __enter__(self) -> RssSampler:
        self.peak = self._proc.memory_info().rss
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)


def _attack_main(name: str, address: str, stop, started, out, cpus=None) -> None:
    """Child process: run attack ``name`` until ``stop`` is set; put its report's counts on ``out``.
    ``cpus``: the CPU set it runs on (``os.sched_setaffinity``; processes it starts inherit it)."""
    if cpus:
        os.sched_setaffinity(0, cpus)
    report = AttackReport(name)
    t = threading.Thread(target=ATTACKS[name], args=(address, _MpStop(stop), report), daemon=True)
    t.start()
    started.set()
    stop.wait()
    t.join(60)
    out.put((report.calls, dict(report.codes)))


def pin_process(pid: int, cpus: set[int] | None) -> None:
    """Put every thread of process ``pid`` on ``cpus`` (all CPUs when None). ``os.sched_setaffinity(pid)``
    moves only the thread whose id is ``pid``; threads started later inherit their creator's set.
    Raises OSError (e.g. ProcessLookupError) as ``sched_setaffinity`` does."""
    cpus = cpus or set(range(os.cpu_count() or 1))
    for tid in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(ProcessLookupError):  # the thread ended meanwhile
            os.sched_setaffinity(int(tid), cpus)


class _MpStop:
    """A multiprocessing.Event with threading.Event's is_set/wait/set (what the attacks call)."""

    def __init__(self, ev) -> None:
        self._ev = ev

    def is_set(self) -> bool:
        return self._ev.is_set()

    def wait(self, timeout: float | None = None) -> bool:
        return self._ev.wait(timeout)

    def set(self) -> None:
        self._ev.set()


def run_attack(
    name: str,
    address: str,
    *,
    during: Callable[[], object],
    settle_s: float = 1.0,
    cpus: set[int] | None = None,
    settle: Callable[[float], object] | None = None,
):
    """Start attack ``name`` in its own process (its client CPU and GIL are not the victim's), wait until
    it runs plus ``settle_s``, call ``during()`` (e.g. the victim), stop the attack; returns
    ``(during's result, AttackReport)``. ``cpus``: pin the attacker's process (and the processes it
    starts) to these CPUs. ``settle(settle_s)``, if given, runs instead of sleeping through the settle
    time (e.g. the victim measuring the attack's first seconds) and must return after about that long."""
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    stop, started, out = ctx.Event(), ctx.Event(), ctx.Queue()
    proc = ctx.Process(target=_attack_main, args=(name, address, stop, started, out, cpus), daemon=True)
    proc.start()
    report = AttackReport(name)
    try:
        if not started.wait(120):
            raise RuntimeError(f"attack {name} did not start")
        if settle is not None:
            settle(settle_s)
        else:
            time.sleep(settle_s)
        result = during()
    finally:
        stop.set()
        try:
            report.calls, codes = out.get(timeout=90)
            report.codes.update(codes)
        except Exception:  # the child died: report what we know (nothing)
            pass
        proc.join(30)
        if proc.is_alive():
            proc.kill()
            proc.join(10)
    return result, report


def serve_subprocess(*flags: str, root: str | None = None) -> tuple[subprocess.Popen, str]:
    """``coinfer-edge serve --port 0 FLAGS`` as a child process on loopback; returns it and its address.
    ``root``: the checkout whose server runs (default: this one; another one compares versions).

    The caller terminates it (``proc.terminate(); proc.wait()``). Raises RuntimeError if it does not start.
    """
    root = root or os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cmd = [sys.executable, "-m", "edge_server.cli", "serve", "--host", "127.0.0.1", "--port", "0", *flags]
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    # cwd=root: ``python -m`` puts the working directory first on sys.path, ahead of PYTHONPATH (before,
    # a --compare-root server ran the code of the directory the bench was started from)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env, cwd=root)
    line = proc.stdout.readline()
    if "listening on" not in line:
        proc.kill()
        proc.wait()
        raise RuntimeError(f"server did not start: {line!r}")
    return proc, line.split("listening on", 1)[1].strip()
