"""The UE's CPU per request, by phase: a warm all-server request, a local request with the session
suspended, and plain local, against a real ``coinfer-edge serve`` on loopback.

    python bench/bench_ue_request_cpu.py [--models resnet18,mobilenet_v2,googlenet] [--requests 40]
        [--baseline DIR] [--profile] [--json PATH]

On a UE with 10 % of a core every ms of its CPU is ~10 ms of latency, so what a request costs the UE
besides its model's ops is latency. Every measurement runs in a fresh UE process (``CoinferClient``, the
library API users call) and counts that process's CPU: ``resource.getrusage(RUSAGE_SELF)`` (user + system
of all its threads) per request, each thread's run time from ``/proc/self/task/TID/schedstat`` (ns) over
the measured requests, and, in the calling thread, ``time.thread_time`` around each phase (wrappers put
around the runtime's functions from outside; the code measured is not changed). Modes, per model (input
1x3x224x224 float32, 602 kB; output 1000 floats):

- ``warm``: policy ``offload`` (every op on the server) after the weights were uploaded and a few
  requests warmed the session: what a warm all-server request costs the UE (send the input, wait,
  receive the output).
- ``suspended``: policy ``auto`` over a link (``--uplink-mbps``, ``--rtt-ms``) on which every plan stays
  local, after the first request suspended the session: a local request planned offline.
- ``local``: the same model's eager ``model(x)`` (``torch.inference_mode``), and ``graph``: the captured
  graph run the way coinfer's local path runs it (``modelgraph.run_graph``), both in the suspended mode's
  process, each round one suspended request, one ``model(x)`` and one ``run_graph`` in turn.
- ``floor_socket`` / ``floor_grpc``: the floor of a warm request, the same bytes sent and the answer
  received with nothing else: on a plain TCP socket (``sendall`` of the input, ``recv`` of 4000 bytes), and
  on a gRPC bidi stream (identity serialisers; a generator fed from a queue, like the session's uplink; a
  receiver thread; the caller waiting on an event) to a server that answers each input message with 4000
  bytes. Both receivers run in another process. ``floor_grpc_delayed``: the same gRPC floor with a
  receiver that answers each input after ``--floor-delay-ms`` (default 30): a warm request's answer comes
  tens of ms after its input (the server computes), and the same client then costs 2-3x the hot loop's
  CPU (caches and the threads' wake-ups after the wait; 0.56-0.71 vs 0.25-0.35 ms measured in session 10).

Phases of the calling thread: ``plan`` (``RemoteEngine._decide_now``, ``Decider.decide``; before session 25
``RemoteEngine._decide``), ``bind`` (the inputs bound to the graph), ``encode`` (the inputs handed to the
uplink: ``run_prefix`` of an empty prefix), ``wait`` (waiting for the answer), ``decode`` (the outputs from their
bytes), ``compute`` (the model's ops, local runs),
``other`` (the rest of the calling thread: the split's set-up, reports, calibration, bookkeeping). Other
threads by name: ``grpc-py`` (gRPC's Python threads: the one that pulls the uplink's messages and
the channel's poller), ``session-rx``, ``data`` (data channel), ``watch`` (queue watch), ``grpc-core``
(gRPC's C threads), ``torch`` (OpenMP workers), ``other``.

``--baseline DIR`` runs the same modes with another checkout's code (its ``ue_client`` in the UE process and
its ``coinfer-edge`` as the server), alternating with this tree's runs, so before and after are measured
side by side. Medians over ``--repeats`` UE processes of the per-request means. ``--profile`` adds
cProfile's top functions of the calling thread and the receiver thread (warm mode, this tree).
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import io
import json
import os
import platform
import pstats
import queue
import resource
import socket
import statistics
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import edge_process  # bench/edge_process.py, beside this script

from testbed.bench.worker import thread_cpu_ns

ROOT = Path(__file__).resolve().parents[1]
MODES = ("floor_socket", "floor_grpc", "floor_grpc_delayed", "warm", "suspended", "warm_auto", "warm_fixed",
         "warm_fixed_bulk")
SPLIT_MODES = ("warm_auto", "warm_fixed", "warm_fixed_bulk")
"""The two warm all-server modes run with ``--split-modes`` (``ue_split_modes``)."""
CALLER_PHASES = ("plan", "bind", "encode", "wait", "decode", "compute", "other")
OUT_BYTES = 4000


def cpu_s() -> float:
    """User + system CPU seconds of this process so far (all threads)."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def wakeups() -> int:
    """Context switches of this process so far (voluntary + involuntary, all threads)."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_nvcsw + r.ru_nivcsw


def thread_runtimes() -> dict[int, tuple[str, int]]:
    """tid -> (thread name, ns on CPU so far) for every thread of this process (``/proc``)."""
    return thread_cpu_ns(main_name=None)


def thread_group(name: str, tid: int) -> str:
    if tid == threading.main_thread().native_id:
        return "caller"
    n = name.lower()
    if "session-rx" in n:
        return "session-rx"
    if "(_run)" in n:  # gRPC's Python threads: the uplink's message pump and the channel's spin thread
        return "grpc-py"
    if "data" in n and "coinfer" in n:
        return "data"
    if "queue-watch" in n:
        return "watch"
    if n.startswith("grpc") or "executor" in n or "timer" in n or "resolver" in n or "event_engine" in n:
        return "grpc-core"
    if n.startswith("python") or n.startswith("pt_") or "omp" in n or n.startswith("torch"):
        return "torch"
    return "other"


def per_thread_ms(before: dict, after: dict, n: int) -> tuple[dict[str, float], dict[str, float]]:
    """CPU ms per request (by thread group, by thread name) between two ``thread_runtimes`` (threads that
    began in between count from 0; threads that ended in between are not seen)."""
    groups: dict[str, float] = {}
    names: dict[str, float] = {}
    for tid, (name, ns) in after.items():
        ns0 = before.get(tid, (name, 0))[1]
        g = thread_group(name, tid)
        ms = (ns - ns0) / 1e6 / n
        groups[g] = groups.get(g, 0.0) + ms
        if ms > 0:
            names[name] = names.get(name, 0.0) + ms
    return groups, names


# ---- phases of the calling thread (wrappers from outside) -----------------------------------------------
class Phases:
    """``time.thread_time`` spent in wrapped functions, by phase; nested wrapped calls count once (the
    outermost phase)."""

    def __init__(self):
        self.s = dict.fromkeys(CALLER_PHASES, 0.0)
        self._depth = 0
        self.on = False

    def wrap(self, owner, attr: str, phase: str) -> bool:
        fn = getattr(owner, attr, None)
        if fn is None:
            return False
        ph = self

        def wrapped(*a, **k):
            if not ph.on or ph._depth or threading.current_thread() is not threading.main_thread():
                return fn(*a, **k)
            ph._depth += 1
            t0 = time.thread_time()
            try:
                return fn(*a, **k)
            finally:
                ph.s[phase] += time.thread_time() - t0
                ph._depth -= 1

        setattr(owner, attr, wrapped)
        return True

    def reset(self):
        self.s = dict.fromkeys(CALLER_PHASES, 0.0)


def install_phases(ph: Phases) -> list[str]:
    """Wrap the runtime's functions (whichever of them this checkout has); returns the wrapped names."""
    import ue_client.client as C
    import ue_client.deadline as D
    import ue_client.model as M
    import ue_client.request as R

    try:
        from ue_client.decider import Decider
    except ImportError:  # a checkout before session 25: its engine decided itself (``RemoteEngine._decide``)
        Decider = None
    done = []
    for owner, attr, phase in ((C.RemoteEngine, "_decide_now", "plan"), (C.RemoteEngine, "_decide", "plan"),
                               (Decider, "decide", "plan"),
                               (C, "bind", "bind"),
                               (M, "run_prefix", "encode"), (D, "wait", "wait"), (R.RequestPath, "_outputs", "decode"),
                               (M, "run_whole", "compute"), (M, "finish_tail", "compute")):
        if ph.wrap(owner, attr, phase):
            done.append(f"{getattr(owner, '__name__', owner)}.{attr}")
    return done


# ---- UE process: the coinfer modes ----------------------------------------------------------------------
def measure_loop(fn, n: int, ph: Phases | None = None) -> dict:
    """Run ``fn()`` ``n`` times; per request: process CPU ms (list), wall ms (list); means of the thread
    groups, the calling thread's phases and the wake-ups."""
    cpu, wall = [], []
    if ph is not None:
        ph.reset()
        ph.on = True
    thr0, w0, tt0 = thread_runtimes(), wakeups(), time.thread_time()
    for _ in range(n):
        c0, t0 = cpu_s(), time.perf_counter()
        fn()
        cpu.append((cpu_s() - c0) * 1e3)
        wall.append((time.perf_counter() - t0) * 1e3)
    caller = (time.thread_time() - tt0) * 1e3 / n
    thr1, w1 = thread_runtimes(), wakeups()
    groups, names = per_thread_ms(thr0, thr1, n)
    out = {"cpu_ms": cpu, "wall_ms": wall, "threads_ms": groups, "thread_names_ms": names,
           "wakeups": (w1 - w0) / n, "caller_ms": caller}
    if ph is not None:
        ph.on = False
        phases = {k: v * 1e3 / n for k, v in ph.s.items()}
        phases["other"] = max(0.0, caller - sum(v for k, v in phases.items() if k != "other"))
        out["phases_ms"] = phases
    return out


def measure_interleaved(fns: dict, n: int, ph: Phases, phased: str) -> dict[str, dict]:
    """Run each of ``fns`` (name -> function) in turn, ``n`` rounds, so that all see the same machine; per
    name as ``measure_loop`` (the threads split into the calling thread and the rest of the process), the
    phases for ``phased`` only."""
    acc = {k: {"cpu_ms": [], "wall_ms": [], "caller": 0.0, "wakeups": 0} for k in fns}
    ph.reset()
    for _ in range(n):
        for name, fn in fns.items():
            a = acc[name]
            ph.on = name == phased
            w0, tt0, c0, t0 = wakeups(), time.thread_time(), cpu_s(), time.perf_counter()
            fn()
            t1, c1, tt1 = time.perf_counter(), cpu_s(), time.thread_time()
            ph.on = False
            a["cpu_ms"].append((c1 - c0) * 1e3)
            a["wall_ms"].append((t1 - t0) * 1e3)
            a["caller"] += (tt1 - tt0) * 1e3
            a["wakeups"] += wakeups() - w0
    out = {}
    for name, a in acc.items():
        caller = a["caller"] / n
        rest = max(0.0, statistics.fmean(a["cpu_ms"]) - caller)
        out[name] = {"cpu_ms": a["cpu_ms"], "wall_ms": a["wall_ms"], "caller_ms": caller,
                     "threads_ms": {"caller": caller, "other": rest}, "thread_names_ms": {},
                     "wakeups": a["wakeups"] / n}
        if name == phased:
            phases = {k: v * 1e3 / n for k, v in ph.s.items()}
            phases["other"] = max(0.0, caller - sum(v for k, v in phases.items() if k != "other"))
            out[name]["phases_ms"] = phases
    return out


def ue_main(args) -> int:
    sys.path.insert(0, str(Path(args.root).resolve()))
    import logging

    import torch

    from modelgraph import run_graph

    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(1)
    from ue_client.client import CoinferClient

    ph = Phases()
    wrapped = install_phases(ph)
    spec = f"torchvision:{args.model}" if ":" not in args.model else args.model
    address = f"127.0.0.1:{args.port}"
    res: dict = {"wrapped": wrapped}
    torch.manual_seed(0)
    if args.mode == "warm":
        with CoinferClient(spec, server=address, policy="offload", tenant=args.tenant) as c:
            x = c.example_inputs[0].clone()
            c(x)  # cold: the weights go up
            c.engine.wait_uploads(120)
            for _ in range(args.warmup):
                c(x)
            ref = c.reference(x)

            def one():
                y = c(x)
                if c.last_report.fallback or c.last_report.server_ops == 0:
                    raise RuntimeError(f"request did not run on the server: {c.last_report.fallback_reason}")
                return y

            prof = cProfile.Profile(time.thread_time) if args.profile else None
            rx_prof = cProfile.Profile(time.thread_time) if args.profile else None
            if args.profile:
                _profile_rx(c, rx_prof)
                prof.enable()
            r = measure_loop(one, args.requests, ph)
            if prof is not None:
                prof.disable()
                rx_prof.disable()
                res["profile_caller"] = _top(prof)
                res["profile_rx"] = _top(rx_prof)
            y = c(x)
            res["equal_to_reference"] = bool(torch.equal(y, ref))
            res["max_abs_diff_eager"] = float((y - c.eager(x)).abs().max())
            res["ops_on_server"] = c.last_report.server_ops
    elif args.mode in SPLIT_MODES:
        r = ue_split_mode(args, spec, address, ph, res)
    elif args.mode == "suspended":
        with CoinferClient(spec, server=address, policy="auto", tenant=args.tenant,
                           link=(args.uplink_mbps, args.rtt_ms)) as c:
            x = c.example_inputs[0].clone()
            for _ in range(args.warmup + 1):
                c(x)
            if c.engine.conn.suspended is None:
                raise RuntimeError("the session was not suspended: plans did not stay local")
            offline = [0]
            module, graph = c.model.module, c.graph

            def one():
                c(x)
                offline[0] += bool(getattr(c.last_report, "offline", False))
                if c.last_report.server_ops:
                    raise RuntimeError("a suspended request ran on the server")

            def local():
                with torch.inference_mode():
                    module(x)

            def graph_run():
                run_graph(graph, (x,))

            fns = {"suspended": one, "local": local, "graph": graph_run}
            for _ in range(args.warmup):
                local()
                graph_run()
            by = measure_interleaved(fns, args.requests, ph, "suspended")
            res["offline_requests"] = offline[0]
            res["suspensions"] = c.engine.suspensions
            if c.engine.conn.suspended is None or offline[0] != args.requests:
                raise RuntimeError(f"only {offline[0]} of {args.requests} requests were planned offline")
            res.update(by["suspended"])
            res["same_process"] = {"local": by["local"], "graph": by["graph"]}
            print("RESULT " + json.dumps(res), flush=True)
            return 0
    res.update(r)
    print("RESULT " + json.dumps(res), flush=True)
    return 0


def ue_split_mode(args, spec: str, address: str, ph: Phases, res: dict) -> dict:
    """``warm_auto`` / ``warm_fixed``: the same warm all-server request as coinfer and neurosurgeon-serial run it
    in the testbed's 10 % / 400 Mbit/s cells: ``policy="auto"`` after it settled on every op on the server, and
    ``policy="auto", server_ops=<every op>`` (the serial baselines' client, ``testbed/bench/worker.py``
    ``serial_steps``), with the same options otherwise (the planning link ``--split-uplink-mbps`` /
    ``--split-rtt-ms``, a UE ``--split-slowdown`` x slower than profiled, so that ``auto`` offloads everything;
    decisions inline). ``--no-quick-reuse``: ``ClientOptions.quick_reuse=False`` (every decision through
    ``DecisionCache.decide``; a checkout without the option is measured as it is). Records each request's
    ``plan_cpu_ms`` (``RequestReport``) and why it planned; RuntimeError if a request did not run every op on the
    server."""
    import torch

    from ue_client.client import CoinferClient
    from ue_client.options import ClientOptions

    kw = dict(server=address, policy="auto", tenant=args.tenant, link=(args.split_uplink_mbps, args.split_rtt_ms),
              ue_slowdown=args.split_slowdown)
    if "plan_background" in ClientOptions.__dataclass_fields__:
        kw["plan_background"] = False  # (the testbed decides inline: ``worker._PLAN_BACKGROUND``)
    if args.no_quick_reuse and "quick_reuse" in ClientOptions.__dataclass_fields__:
        kw["quick_reuse"] = False
    if args.mode in ("warm_fixed", "warm_fixed_bulk"):
        probe = CoinferClient(spec)  # (the capture is cached: the same graph)
        kw["server_ops"] = [op.name for op in probe.graph.ops]
        if args.mode == "warm_fixed_bulk":  # its weights up before its session, as the testbed's serial baselines
            bulk_upload(probe.graph, address, args.tenant)
        probe.close()
    with CoinferClient(spec, **kw) as c:
        x = c.example_inputs[0].clone()
        c(x)  # cold: the weights go up (warm_fixed_bulk: they are there already)
        c.engine.wait_uploads(120)
        for _ in range(args.warmup):
            c(x)
        ops = len(c.graph.ops)
        ref = c.reference(x)

        def one():
            c(x)
            rep = c.last_report
            if rep.fallback or rep.server_ops != ops:
                raise RuntimeError(f"request {rep.request} ran {rep.server_ops} of {ops} ops on the server "
                                   f"({rep.fallback_reason or rep.plan_reason})")

        k0 = len(c.reports)
        r = measure_loop(one, args.requests, ph)
        reps = c.reports[k0:]
        r["plan_cpu_ms"] = [rep.plan_cpu_ms for rep in reps]
        r["plan_ms"] = [rep.plan_ms for rep in reps]
        whys: dict[str, int] = {}
        for rep in reps:
            why = (rep.plan_why or "").split(":")[0]
            whys[why] = whys.get(why, 0) + 1
        r["plan_why"] = whys
        y = c(x)
        res["equal_to_reference"] = bool(torch.equal(y, ref))
        res["max_abs_diff_eager"] = float((y - c.eager(x)).abs().max())
        res["ops_on_server"] = c.last_report.server_ops
        res["quick_reuse"] = bool(getattr(c.engine.options, "quick_reuse", False))
        res["pieces_us"] = decision_pieces(c.engine)
    return r


def bulk_upload(g, address: str, tenant: str) -> None:
    """Every weight of ``g`` on one ``UploadWeights`` call of its own session (``testbed/bench/worker.py``
    ``Ue.upload``, which the serial baselines' streams run before their first request)."""
    from modelgraph import tensor_bytes
    from ue_client import wire
    from ue_client.session import SessionStream

    ch = wire.channel(address)
    try:
        st = wire.stub(ch)
        wire.hello(st, tenant, timeout_s=30.0)
        sess = SessionStream(st, tenant, g.name)

        def chunks():
            for w in g.weights:
                data = tensor_bytes(g.weight_values[w])
                meta = g.weights[w]
                for off, end in wire.chunk_spans(data.nbytes, wire.MAX_CHUNK_BYTES):
                    yield wire.encode_weight_chunk(g.weight_sha256(w), meta.dtype, meta.shape, off, data.nbytes,
                                                   data[off:end], field=wire.UPLOAD_CHUNK)

        wire.upload_weights(st, tenant, sess.opened.session_id, chunks(), timeout_s=600.0)
        sess.close()
    finally:
        ch.close()


def decision_pieces(eng, n: int = 2000) -> dict[str, float]:
    """CPU us per call (``time.thread_time``, hot: ``n`` calls in a row after 50) of each piece of a warm
    request's decision path and of auto's work around it, on a warm engine (whichever of them this checkout
    has): the whole path on the request's clock (``_decide_now``), ``decide`` on inputs already read, the
    inputs' reading (``_decide_inputs``), ``reuse`` (the shortcut), the three refreshes of a reused prediction
    one after another and in one (``refresh_reused``), the transport residual's mean and std recomputed (once
    per request: every warm split adds a residual), one residual added (``calibrate_transport`` on a
    model without memory), the warm target's split, the background key (``marks``), a pair of the timers that
    time ``plan_ms``. In a request the same code runs once with cold caches, several times slower."""
    from ue_client import planning
    from ue_client.calibration import CostModel

    def tm(fn) -> float:
        for _ in range(50):
            fn()
        c0 = time.thread_time()
        for _ in range(n):
            fn()
        return (time.thread_time() - c0) / n * 1e6

    out: dict[str, float] = {}
    cm, pr, dc = eng.cost_model, eng.probe, eng.decisions
    state, share = eng.server_state(), eng._shares()
    if hasattr(eng, "_decide_now"):
        out["decide_now"] = tm(eng._decide_now)
    kw = eng._decide_inputs()
    out["decide_inputs"] = tm(eng._decide_inputs)
    out["decide"] = tm(lambda: dc.decide(state, share, n=eng._n, **kw))
    if hasattr(dc, "reuse"):
        sc = cm.scale
        out["reuse"] = tm(lambda: dc.reuse(state, share, link=pr.planning_link(), ue_cpu=pr.ue_cpu(), base=cm.base,
                                           ue=sc["ue"], server=sc["server"], overhead_ms=cm.overhead_ms,
                                           transport_ms=cm.transport_ms, transport_se=cm.transport_se_ms, n=eng._n))
    choice = dc.last[1]
    t = cm.transport_ms + 1.0

    def three():
        c = planning.refresh_transport(choice, t)
        c = planning.refresh_ue_scale(c, 1.0, 1.01)
        return planning.refresh_server_scale(c, 1.0, 1.01)
    out["refresh_three"] = tm(three)
    if hasattr(planning, "refresh_reused"):
        out["refresh_reused"] = tm(lambda: planning.refresh_reused(choice, t, 1.0, 1.01, 1.0, 1.01))

    def stats():
        cm._transport_stats = None
        return cm.transport_ms, cm.transport_se_ms(), cm.transport_sd_ms()
    out["transport_stats"] = tm(stats)
    fresh = CostModel()
    out["calibrate_transport"] = tm(lambda: fresh.calibrate_transport(5.0, 1.0))
    if choice.warm_target:
        out["target_split"] = tm(lambda: eng.graph.split(choice.warm_target))
    if hasattr(eng, "marks"):
        out["marks"] = tm(lambda: eng.marks(eng._n + 1))
    out["timers"] = tm(lambda: (time.perf_counter(), time.thread_time()))
    return {k: round(v, 3) for k, v in out.items()}


def _profile_rx(client, prof: cProfile.Profile) -> None:
    """Profile the session's receiver thread from now on (a profiler enabled from inside that thread, by
    its next dispatched event)."""
    sess = client.engine.conn.session
    orig = sess._dispatch
    state = {"on": False}

    def dispatch(ev):
        if not state["on"]:
            state["on"] = True
            prof.enable()
        return orig(ev)

    sess._dispatch = dispatch


def _top(prof: cProfile.Profile, n: int = 60) -> str:
    s = io.StringIO()
    pstats.Stats(prof, stream=s).sort_stats(os.environ.get("BENCH_PROFILE_SORT", "cumulative")).print_stats(n)
    return s.getvalue()


# ---- floors ----------------------------------------------------------------------------------------------
SINK = r"""
import socket, struct, sys
srv = socket.create_server(("127.0.0.1", 0))
print(srv.getsockname()[1], flush=True)
buf = bytearray(1 << 20)
out = bytes(OUT_BYTES)
while True:
    c, _ = srv.accept()
    c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    with c:
        while True:
            h = c.recv(8, socket.MSG_WAITALL)
            if len(h) < 8:
                break
            n = struct.unpack("<Q", h)[0]
            view = memoryview(buf)
            while n:
                k = c.recv_into(view[:min(n, len(buf))])
                if not k:
                    break
                n -= k
            c.sendall(out)
""".replace("OUT_BYTES", str(OUT_BYTES))

ECHO = r"""
import grpc, sys, time
DELAY_S = float(sys.argv[1]) if len(sys.argv) > 1 else 0.0
from concurrent import futures
OUT = bytes(OUT_BYTES)
def handler(req_iter, ctx):
    for m in req_iter:
        if DELAY_S:
            time.sleep(DELAY_S)
        yield OUT
ident = lambda b: b
h = grpc.method_handlers_generic_handler("floor.Floor", {"Run": grpc.stream_stream_rpc_method_handler(
    handler, request_deserializer=ident, response_serializer=ident)})
srv = grpc.server(futures.ThreadPoolExecutor(4), handlers=[h],
                  options=[("grpc.max_receive_message_length", 64 << 20)])
port = srv.add_insecure_port("127.0.0.1:0")
srv.start()
print(port, flush=True)
srv.wait_for_termination()
""".replace("OUT_BYTES", str(OUT_BYTES))


@contextlib.contextmanager
def receiver(code: str, *argv: str):
    proc = subprocess.Popen([sys.executable, "-c", code, *argv], stdout=subprocess.PIPE, text=True)
    try:
        yield int(proc.stdout.readline())
    finally:
        proc.kill()
        proc.wait()


def floor_main(args) -> int:
    payload = os.urandom(3 * 224 * 224 * 4)  # the input's size (float32); no numpy: its BLAS threads spin
    if args.mode == "floor_socket":
        s = socket.create_connection(("127.0.0.1", args.port))
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        head = struct.pack("<Q", len(payload))
        buf = bytearray(OUT_BYTES)

        def one():
            s.sendall(head)
            s.sendall(payload)
            view, got = memoryview(buf), 0
            while got < OUT_BYTES:
                got += s.recv_into(view[got:])
        close = s.close
    else:
        import grpc

        ch = grpc.insecure_channel(f"127.0.0.1:{args.port}", options=[("grpc.max_send_message_length", 64 << 20)])
        ident = lambda b: b
        call_fn = ch.stream_stream("/floor.Floor/Run", request_serializer=ident, response_deserializer=ident)
        q: queue.Queue = queue.Queue()

        def reqs():
            while True:
                m = q.get()
                if m is None:
                    return
                yield m

        call = call_fn(reqs())
        got = threading.Event()
        box = []

        def rx():
            for m in call:
                box.append(m)
                got.set()
        threading.Thread(target=rx, daemon=True).start()

        def one():
            got.clear()
            q.put(payload)
            got.wait()

        def close():
            q.put(None)
            ch.close()
    for _ in range(args.warmup):
        one()
    r = measure_loop(one, args.requests)
    close()
    r["bytes_sent"] = len(payload)
    print("RESULT " + json.dumps(r), flush=True)
    return 0


# ---- parent ----------------------------------------------------------------------------------------------
def edge_server(root: Path):
    """``coinfer-edge serve --port 0`` from ``root`` as users start it (defaults, data channel on); yields
    its port."""
    return edge_process.edge_server(root)


def run_child(mode: str, root: Path, port: int, model: str, args, tenant: str) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", mode, "--root", str(root), "--port",
           str(port), "--model", model, "--requests", str(args.requests), "--warmup", str(args.warmup),
           "--tenant", tenant, "--uplink-mbps", str(args.uplink_mbps), "--rtt-ms", str(args.rtt_ms),
           "--split-uplink-mbps", str(args.split_uplink_mbps), "--split-rtt-ms", str(args.split_rtt_ms),
           "--split-slowdown", str(args.split_slowdown)]
    if args.no_quick_reuse:
        cmd.append("--no-quick-reuse")
    if args.profile and mode == "warm" and root == ROOT:
        cmd.append("--profile")
    return edge_process.child_result(cmd, root, f"{mode} UE ({root}, {model})")



def summarise(rows: list[dict]) -> dict:
    """Medians over UE processes of each process's per-request mean (CPU, wall) and median (CPU), and of
    the thread groups and phases."""
    s = {"cpu_ms": statistics.median(statistics.fmean(r["cpu_ms"]) for r in rows),
         **({"plan_cpu_ms_p50": statistics.median(statistics.median(r["plan_cpu_ms"]) for r in rows),
             "plan_ms_p50": statistics.median(statistics.median(r["plan_ms"]) for r in rows)}
            if all("plan_cpu_ms" in r for r in rows) else {}),
         "cpu_ms_p50": statistics.median(statistics.median(r["cpu_ms"]) for r in rows),
         "wall_ms": statistics.median(statistics.fmean(r["wall_ms"]) for r in rows),
         "caller_ms": statistics.median(r["caller_ms"] for r in rows),
         "wakeups": statistics.median(r["wakeups"] for r in rows), "processes": len(rows)}
    groups = sorted({g for r in rows for g in r["threads_ms"]})
    s["threads_ms"] = {g: statistics.median(r["threads_ms"].get(g, 0.0) for r in rows) for g in groups}
    if all("pieces_us" in r for r in rows):
        keys = sorted({k for r in rows for k in r["pieces_us"]})
        s["pieces_us"] = {k: statistics.median(r["pieces_us"][k] for r in rows if k in r["pieces_us"]) for k in keys}
    if all("phases_ms" in r for r in rows):
        s["phases_ms"] = {p: statistics.median(r["phases_ms"][p] for r in rows) for p in CALLER_PHASES}
    return s


def _split_verdict(summary: dict, model: str) -> tuple[dict, str] | None:
    """auto's warm all-server request against the fixed split's (``warm_auto`` - ``warm_fixed``: process CPU ms
    per request, the calling thread's plan phase, the reports' median ``plan_cpu_ms``) per code version
    measured; (JSON entries, a line) or None without both modes."""
    out, parts = {}, []
    for k, v in summary.items():
        a, f = v.get(f"{model}/warm_auto"), v.get(f"{model}/warm_fixed")
        fb = v.get(f"{model}/warm_fixed_bulk")
        if a is None or f is None:
            continue
        d = {"auto_cpu_ms": a["cpu_ms"], "fixed_cpu_ms": f["cpu_ms"],
             "auto_minus_fixed_cpu_ms": a["cpu_ms"] - f["cpu_ms"],
             "auto_plan_cpu_ms_p50": a.get("plan_cpu_ms_p50"), "fixed_plan_cpu_ms_p50": f.get("plan_cpu_ms_p50"),
             "auto_plan_phase_ms": a.get("phases_ms", {}).get("plan"),
             "fixed_plan_phase_ms": f.get("phases_ms", {}).get("plan")}
        if fb is not None:
            d["fixed_bulk_cpu_ms"] = fb["cpu_ms"]
            d["fixed_bulk_plan_cpu_ms_p50"] = fb.get("plan_cpu_ms_p50")
        out[k] = d
        parts.append(f"{k}: auto {a['cpu_ms']:.3f} - fixed {f['cpu_ms']:.3f} = {d['auto_minus_fixed_cpu_ms']:+.3f} ms "
                     f"CPU/request, plan_cpu_ms p50 {d['auto_plan_cpu_ms_p50']:.4f} / {d['fixed_plan_cpu_ms_p50']:.4f}"
                     + (f"; fixed with its weights bulk-uploaded first {fb['cpu_ms']:.3f}" if fb is not None else ""))
    if not out:
        return None
    return {"warm_split": out}, f"{model} warm all-server: " + "; ".join(parts)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="resnet18,mobilenet_v2,googlenet")
    p.add_argument("--requests", type=int, default=40, help="measured requests per UE process (default 40)")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--repeats", type=int, default=3, help="UE processes per mode and code (default 3)")
    p.add_argument("--uplink-mbps", type=float, default=1.0, help="suspended mode's link (default 1: plans stay local)")
    p.add_argument("--rtt-ms", type=float, default=50.0)
    p.add_argument("--baseline", type=Path, default=None, help="another checkout, measured side by side")
    p.add_argument("--profile", action="store_true", help="cProfile of the warm mode (this tree)")
    p.add_argument("--floor-delay-ms", type=float, default=30.0,
                   help="the delayed gRPC floor's receiver answers each input after this long (default 30 ms: "
                        "a warm request's answer comes tens of ms after its input)")
    p.add_argument("--modes", default="warm,suspended",
                   help="coinfer modes per model, of warm, suspended, warm_auto, warm_fixed, warm_fixed_bulk (default "
                        "warm,suspended; warm_auto,warm_fixed: auto's warm all-server request against the fixed "
                        "split's; warm_fixed_bulk: the fixed split with its weights uploaded before its session, "
                        "as the testbed's serial baselines)")
    p.add_argument("--no-floors", action="store_true", help="skip the socket / gRPC floors")
    p.add_argument("--split-uplink-mbps", type=float, default=400.0,
                   help="warm_auto / warm_fixed: the planning link's uplink (default 400)")
    p.add_argument("--split-rtt-ms", type=float, default=5.0)
    p.add_argument("--split-slowdown", type=float, default=10.0,
                   help="warm_auto / warm_fixed: ClientOptions.ue_slowdown (default 10: a UE with 10 %% of this "
                        "core, as planned, so auto offloads every op)")
    p.add_argument("--no-quick-reuse", action="store_true",
                   help="warm_auto / warm_fixed with ClientOptions.quick_reuse=False")
    p.add_argument("--json", type=Path, default=None)
    # UE process (internal)
    p.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    p.add_argument("--mode", help=argparse.SUPPRESS)
    p.add_argument("--root", default=str(ROOT), help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--tenant", default="bench", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        args.mode = args.child
        return floor_main(args) if args.child.startswith("floor") else ue_main(args)

    impls = {"this": ROOT}
    if args.baseline is not None:
        impls["baseline"] = args.baseline.resolve()
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    up0, t_start = edge_process.uptime(), time.time()
    print(f"uptime before: {up0}", flush=True)
    samples: dict = {k: {} for k in impls}
    profiles: dict = {}
    with contextlib.ExitStack() as stack:
        sock_port = stack.enter_context(receiver(SINK))
        grpc_port = stack.enter_context(receiver(ECHO))
        delayed_port = stack.enter_context(receiver(ECHO, str(args.floor_delay_ms / 1e3)))
        floor_ports = {"floor_socket": sock_port, "floor_grpc": grpc_port, "floor_grpc_delayed": delayed_port}
        ports = {k: stack.enter_context(edge_server(root)) for k, root in impls.items()}
        modes = [m.strip() for m in args.modes.split(",") if m.strip()]
        bad = [m for m in modes if m not in MODES or m.startswith("floor")]
        if bad:
            p.error(f"unknown --modes {bad}")
        for rep in range(args.repeats):
            for mode in () if args.no_floors else ("floor_socket", "floor_grpc", "floor_grpc_delayed"):
                r = run_child(mode, ROOT, floor_ports[mode], "-", args, "-")
                samples["this"].setdefault(mode, []).append(r)
                print(f"  {rep + 1}/{args.repeats} {mode:<12} {statistics.fmean(r['cpu_ms']):7.3f} ms CPU/request",
                      flush=True)
            for model in models:
                for mode in modes:
                    for k, root in (impls.items() if rep % 2 == 0 else reversed(impls.items())):
                        tenant = f"bench-{k}-{model}-{rep}-{os.getpid()}"
                        r = run_child(mode, root, ports[k], model, args, tenant)
                        for other, rr in r.pop("same_process", {}).items():  # plain local, in the same process
                            samples[k].setdefault(f"{model}/{other}", []).append(rr)
                        samples[k].setdefault(f"{model}/{mode}", []).append(r)
                        if "profile_caller" in r:
                            profiles[model] = {"caller": r.pop("profile_caller"), "rx": r.pop("profile_rx")}
                        print(f"  {rep + 1}/{args.repeats} {k:>8} {model:<13} {mode:<10} "
                              f"{statistics.fmean(r['cpu_ms']):7.3f} ms CPU/request "
                              f"(wall {statistics.fmean(r['wall_ms']):6.1f} ms)", flush=True)
    up1 = edge_process.uptime()
    summary = {k: {m: summarise(rows) for m, rows in v.items()} for k, v in samples.items()}
    this = summary["this"]
    fs, fg, fd = (this[m]["cpu_ms"] if m in this else float("nan")
                  for m in ("floor_socket", "floor_grpc", "floor_grpc_delayed"))
    print(f"\nUE process CPU per request, ms (mean per request, median of {args.repeats} UE processes of "
          f"{args.requests} requests); floors: socket {fs:.3f}, gRPC stream {fg:.3f}, gRPC stream answering after "
          f"{args.floor_delay_ms:g} ms {fd:.3f}\n")
    groups = sorted({g for v in summary.values() for s in v.values() for g in s["threads_ms"]})
    others = [g for g in groups if g != "caller"]
    print("| code | model | mode | CPU ms | wall ms | caller | " + " | ".join(CALLER_PHASES) + " | "
          + " | ".join(others) + " | wake-ups |")
    print("|---" * (7 + len(CALLER_PHASES) + len(others)) + "|")
    for k, v in summary.items():
        for m, s in v.items():
            model, _, mode = m.rpartition("/")
            ph = s.get("phases_ms", {})
            if "plan_cpu_ms_p50" in s:
                mode += f" (plan_cpu_ms p50 {s['plan_cpu_ms_p50']:.4f})"
            cells = [f"{ph[x]:.3f}" if x in ph else "" for x in CALLER_PHASES]
            cells += [f"{s['threads_ms'].get(g, 0.0):.3f}" for g in others]
            print(f"| {k} | {model or '-'} | {mode} | {s['cpu_ms']:.3f} | {s['wall_ms']:.1f} | "
                  f"{s['threads_ms'].get('caller', 0.0):.3f} | " + " | ".join(cells)
                  + f" | {s['wakeups']:.1f} |")
    verdicts = {}
    for model in models:
        split = _split_verdict(summary, model)
        if split is not None:
            verdicts.setdefault(model, {}).update(split[0])
            print(split[1])
        w, sp, loc = (this.get(f"{model}/{m}") for m in ("warm", "suspended", "local"))
        gr = this.get(f"{model}/graph")
        if w is None or sp is None:
            continue
        verdicts.setdefault(model, {}).update({
                           "warm_over_grpc_floor": w["cpu_ms"] / fg, "warm_over_socket_floor": w["cpu_ms"] / fs,
                           "warm_over_delayed_grpc_floor": w["cpu_ms"] / fd,
                           "suspended_minus_local_ms": sp["cpu_ms"] - loc["cpu_ms"],
                           "suspended_minus_graph_ms": sp["cpu_ms"] - gr["cpu_ms"],
                           "graph_minus_local_ms": gr["cpu_ms"] - loc["cpu_ms"]})
        line = (f"{model}: warm {w['cpu_ms']:.2f} ms = {w['cpu_ms'] / fg:.2f}x the gRPC floor, "
                f"{w['cpu_ms'] / fd:.2f}x the delayed one "
                f"({w['cpu_ms'] / fs:.1f}x the socket floor); suspended - local "
                f"{sp['cpu_ms'] - loc['cpu_ms']:+.2f} ms (suspended - graph {sp['cpu_ms'] - gr['cpu_ms']:+.2f}, "
                f"graph - eager {gr['cpu_ms'] - loc['cpu_ms']:+.2f})")
        if "baseline" in summary:
            b = summary["baseline"]
            line += (f"; baseline warm {b[f'{model}/warm']['cpu_ms']:.2f}, suspended "
                     f"{b[f'{model}/suspended']['cpu_ms']:.2f}")
        print(line)
    pieces = [(k, m, v["pieces_us"]) for k, vs in summary.items() for m, v in vs.items() if "pieces_us" in v]
    if pieces:
        names = sorted({x for *_, d in pieces for x in d})
        print("\nDecision path pieces, CPU us per call (hot loop; median over UE processes):\n")
        print("| code | model/mode | " + " | ".join(names) + " |")
        print("|---" * (2 + len(names)) + "|")
        for k, m, d in pieces:
            print(f"| {k} | {m} | " + " | ".join(f"{d[x]:.1f}" if x in d else "" for x in names) + " |")
    for model, pr in profiles.items():
        print(f"\n---- cProfile, {model} warm, calling thread ----\n{pr['caller']}")
        print(f"---- cProfile, {model} warm, session receiver thread ----\n{pr['rx']}")
    print(f"uptime after: {up1} ({time.time() - t_start:.0f} s)")
    result = {"models": models, "requests": args.requests, "warmup": args.warmup, "repeats": args.repeats,
              "floor_socket_cpu_ms": fs, "floor_grpc_cpu_ms": fg, "floor_grpc_delayed_cpu_ms": fd,
              "floor_delay_ms": args.floor_delay_ms, "verdicts": verdicts, "summary": summary,
              "samples": samples, "profiles": profiles, "uptime_before": up0, "uptime_after": up1,
              "seconds": time.time() - t_start,
              "baseline": None if args.baseline is None else str(impls["baseline"]),
              "machine": {"python": platform.python_version(), "cpus": os.cpu_count(),
                          "platform": platform.platform()},
              "command": " ".join([Path(sys.argv[0]).name] + (argv if argv is not None else sys.argv[1:]))}
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
