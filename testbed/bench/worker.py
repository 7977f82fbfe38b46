"""One emulated UE: runs request streams of several policies against the edge server and writes JSON.

Started by the testbed launcher inside the UE's namespace and CPU cgroup (``python -m testbed.bench.worker
SPEC.json``). The spec says the model, the server address (the UE's delay relay), the true link (given to
the planner as an override so every policy plans with the same, correct link), the policies and the
number of requests. With ``handshake`` the worker prints ``STAGE <name>`` and waits for a line on stdin
at each stage, so the launcher can apply the CPU quota after the (offline, once per model) capture and
start several UEs' streams together.

Policies (all through the public ``ue_client`` API; each stream uses a fresh tenant, i.e. a cold server).
When ``local`` is asked for, every other policy's stream runs interleaved with a local stream, one request
of each in turn (``pairing``; the spec's ``pairing``: ``all``, the default; ``coinfer``: only coinfer, as up
to session 11; ``none``): coinfer's partner is the cell's local stream, every other policy gets a local
stream of its own (``paired_local`` in its result). So every policy runs under the same conditions (half its
requests right after a local one, half after its own; the same drift of the machine as a local stream), and a
comparison between two streams is not skewed by which ran alone or in which minute.

- any ``ue_client`` policy name (``auto``, ``local``, ``mjoa``, ``dads``, ...): the client as it is
  (parallel, need-ordered upload of what the split lacks);
- ``coinfer``: the client with ``auto`` (mjoa + progressive offloading);
- ``neurosurgeon-serial`` / ``dads-serial``: the policy's (warm-cost) split; before the first request
  ALL weights of that server part are uploaded with a timed ``UploadWeights`` (serial uploading), then
  the requests run; the first request's latency is upload + request;
- ``ionn``: the client's ``ionn`` policy (``partitioner.ionn``): every request runs the best warm split
  among the suffixes of the op order whose weights the server holds (known from the server's acks on
  the session), and the rest of the model streams behind the requests in pieces chosen by warm-latency
  gain per byte, whatever the UE computes meanwhile. Nothing is untimed.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

log = logging.getLogger("coinfer.testbed.worker")

SERIAL = {"neurosurgeon-serial": "neurosurgeon", "dads-serial": "dads"}
BENCH_POLICIES = ("local", "neurosurgeon-serial", "dads-serial", "ionn", "coinfer")
WARM_POLICIES = {"local": "local", "neurosurgeon": "neurosurgeon", "dads": "dads", "coinfer": "auto"}


def plan_at_share(report, cpu: float | None) -> dict[str, float | None]:
    """A request's ``cpu_share`` and ``plan_at_share_ms`` (``RequestReport``): the client's, except where it read no
    quota (share 1) in a UE the spec gave less than a core: ``ip netns exec`` remounts /sys, so a netns UE's
    process does not see its cgroup's quota (``profiler.device_info.cpu_share`` reads 1 there); then the spec's
    ``cpu`` (the quota the launcher set)."""
    share, cpu_ms = getattr(report, "cpu_share", None), getattr(report, "plan_cpu_ms", None)
    if share is None or cpu_ms is None:
        return {"cpu_share": share, "plan_at_share_ms": getattr(report, "plan_at_share_ms", None)}
    if share >= 1.0 and cpu and 0 < cpu < 1.0:
        share = float(cpu)
    return {"cpu_share": share, "plan_at_share_ms": cpu_ms / share}


def stage(name: str, handshake: bool) -> None:
    print(f"STAGE {name} {time.time():.3f}", flush=True)
    if handshake:
        line = sys.stdin.readline()
        if not line or line.strip() == "stop":
            print("STAGE stopped", flush=True)
            sys.exit(3)


def until_admitted(fn, timeout_s: float = 10.0):
    """``fn()``, retried while the server answers UNAUTHENTICATED for up to ``timeout_s``: the launcher
    issues a UE's tokens just before starting it and the server re-reads its tokens file on SIGHUP, so the
    very first call may race the reload. Any other refusal, or one that outlasts the wait, is raised."""
    from ue_client.errors import AccessDenied

    end = time.monotonic() + timeout_s
    while True:
        try:
            return fn()
        except AccessDenied as e:
            if e.code != "UNAUTHENTICATED" or time.monotonic() > end:
                raise
            log.info("not admitted yet (%s); retrying", e)
            time.sleep(0.2)


def connect_untimed(client) -> float:
    """Open the client's connection before its requests (not part of any request's latency); its ms."""
    t = time.perf_counter()
    client.engine.connect()
    return (time.perf_counter() - t) * 1e3


def supports_data_channel() -> bool:
    """The client has ``ClientOptions.data_address`` (a baseline checkout may not)."""
    from dataclasses import fields

    from ue_client.options import ClientOptions

    return "data_address" in {f.name for f in fields(ClientOptions)}


def supports_option(name: str) -> bool:
    """``ClientOptions`` has the field ``name`` (a baseline checkout may not)."""
    from dataclasses import fields

    from ue_client.options import ClientOptions

    return name in {f.name for f in fields(ClientOptions)}


def supports_fixed_split() -> bool:
    from dataclasses import fields

    from ue_client.options import ClientOptions

    return "server_ops" in {f.name for f in fields(ClientOptions)}



# COINFER_BENCH_THREAD_CPU=1: each request record carries ``thread_cpu_ms`` (thread name -> CPU ms of that
# thread during the call, from ``/proc/self/task/TID/schedstat``; threads that ended during the call are not
# seen): which of the UE's threads the call's process CPU went to.
_THREAD_CPU = os.environ.get("COINFER_BENCH_THREAD_CPU", "") not in ("", "0")

# COINFER_BENCH_GC_FREEZE=0: every client of this worker is built with ``ClientOptions.gc_freeze=False`` (Python's
# collector left alone; default: the client's own default, which freezes), to measure what the freeze costs or saves.
_GC_FREEZE = os.environ.get("COINFER_BENCH_GC_FREEZE", "") not in ("0", "false", "off")


# COINFER_BENCH_PLAN_BACKGROUND=1: the clients decide each next request on their background worker
# (``ClientOptions.plan_background``, the library's default). Off by default here: the worker interleaves a
# policy's stream with a local stream in this one process (``paired_streams``), so a decision made on the
# worker after a coinfer request would run during the paired local request, on the same CPU quota, and slow
# the baseline it is compared with; inline, every decision stays inside its own request.
_PLAN_BACKGROUND = os.environ.get("COINFER_BENCH_PLAN_BACKGROUND", "") not in ("", "0", "false", "off")


class _GcClock:
    """Python's garbage collections in this process: count and CPU ms (``time.thread_time`` of the thread
    that collected) per generation, from ``gc.callbacks``."""

    def __init__(self) -> None:
        self.n = [0, 0, 0]
        self.ms = [0.0, 0.0, 0.0]
        self._t = 0.0
        if _THREAD_CPU:
            import gc
            gc.callbacks.append(self._cb)

    def _cb(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._t = time.thread_time()
        else:
            g = int(info.get("generation", 0))
            self.n[g] += 1
            self.ms[g] += (time.thread_time() - self._t) * 1e3

    def snap(self) -> tuple[list[int], list[float]]:
        return list(self.n), list(self.ms)

    @staticmethod
    def diff(a, b) -> dict[str, list]:
        return {"n": [y - x for x, y in zip(a[0], b[0])], "ms": [round(y - x, 3) for x, y in zip(a[1], b[1])]}


def thread_cpu_ns(main_name: str | None = "main") -> dict[int, tuple[str, int]]:
    """tid -> (thread name, ns on CPU so far) for every thread of this process (``/proc/self/task``); the main
    thread is named ``main_name`` (None: its own name). Threads that end while it reads are left out."""
    names = {t.native_id: t.name for t in threading.enumerate()}
    out: dict[int, tuple[str, int]] = {}
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/schedstat") as f:
                ns = int(f.read().split()[0])
            with open(f"/proc/self/task/{tid}/comm") as f:
                comm = f.read().strip()
        except (OSError, ValueError):
            continue
        out[int(tid)] = ((main_name if main_name is not None and int(tid) == threading.main_thread().native_id
                          else names.get(int(tid), comm)), ns)
    return out


def _thread_ms(before: dict[int, tuple[str, int]], after: dict[int, tuple[str, int]]) -> dict[str, float]:
    """Thread name -> CPU ms between two ``thread_cpu_ns`` snapshots (names shared by threads summed); a thread
    that ended in between is listed as ``"ended:NAME": -1.0`` (its CPU is no longer readable)."""
    out: dict[str, float] = {}
    for tid, (name, ns) in after.items():
        ms = (ns - before.get(tid, (name, 0))[1]) / 1e6
        if ms > 0.005:
            out[name] = round(out.get(name, 0.0) + ms, 3)
    for tid, (name, _ns) in before.items():  # ended during the call: its CPU since ``before`` is not seen
        if tid not in after:
            out[f"ended:{name}"] = -1.0
    return out

def _call_predicted(r) -> float | None:
    """A report's prediction of the whole call (``RequestReport.call_predicted_ms``), else its plan's (a client
    before session 18, or a request without a call prediction)."""
    got = getattr(r, "call_predicted_ms", None)
    return r.predicted_ms if got is None else got


class Ue:
    """Model, costs and link shared by all the streams this UE runs."""

    def __init__(self, spec: dict[str, Any]):
        from ue_client.client import LinkOverride, prepare_model

        self.spec = spec
        self.server = spec["server"]
        self.stream_clients: dict[str, Any] = {}
        """policy -> the client of its stream while it runs (``steps``): ``paired_streams`` holds its background
        weights while the partner's request runs."""
        self.model = prepare_model(spec["model"])
        self.graph = self.model.graph
        self.slowdown = float(spec.get("slowdown", 1.0))
        self.threads = spec.get("threads")
        self.link = LinkOverride(uplink_mbps=spec["uplink_mbps"], downlink_mbps=spec.get("downlink_mbps"),
                                 rtt_ms=spec["rtt_ms"])
        self.costs = None
        self.ue_cpu = None
        self.serial_cpu = None
        """What the serial baselines' timed UploadWeights costs this UE to send (``bulk_send_cost``)."""
        self.bulk_probe: dict[str, Any] | None = None
        self.last_upload_cpu_ms: float | None = None
        self.last_call_cpu_ms: float | None = None
        self.prefix = spec.get("tenant_prefix") or f"ue-{uuid.uuid4().hex[:8]}"
        self._n = 0
        self.access = spec.get("access")
        """Secure testbed: {"tls_ca": PEM path, "pool": fresh tenants in order, "tokens": tenant -> token}."""
        self.inputs = None
        self.cell_uplink_mbps = spec.get("cell_uplink_mbps")
        """A shared cell's uplink rate: the UE paces to its share of it (``ClientOptions.cell_uplink_mbps``)."""
        self.op_timings = bool(spec.get("op_timings"))
        """Record the server's per-op timings of each remote request (``server_op_ms``: [[op name, start ms
        from the request's start on the server, ms], ...] in the order the ops ran; [] for a local one)."""
        self.builds: list[dict[str, Any]] = []
        """Each client this worker built: policy, tenant, when it was ready (time.time()), wall and process CPU
        ms of its construction (capture reuse, options, engine, ``gc_freeze``'s collection)."""
        self.closes: list[dict[str, Any]] = []
        """Each ``closed`` client: when (time.time()), wall and process CPU ms of its ``close``."""
        self.current = None
        """The client of the stream running now (``report_shares`` watches its session)."""
        from testbed.tcpstats import NamespaceCounters

        self.tcp = NamespaceCounters(spec["tcp_namespaces"]) if spec.get("tcp_namespaces") else None
        """TCP counters of the UE's and the server's network namespaces, recorded around each request."""
        if spec.get("report_shares"):
            threading.Thread(target=self._report_shares, name="share-report", daemon=True).start()

    def _report_shares(self) -> None:
        """Print ``UPLINK_SHARE <share>`` whenever the server changes this UE's uplink share (the launcher
        enforces it on the shared uplink's htb class, ``--enforce-shares``)."""
        last = None
        while True:
            time.sleep(0.05)
            sess = getattr(getattr(getattr(self.current, "engine", None), "conn", None), "session", None)
            share = getattr(sess, "uplink_share", 0.0) or None
            if share is not None and share != last:
                print(f"UPLINK_SHARE {share:.6f}", flush=True)
                last = share

    def tenant(self, tag: str) -> str:
        """A fresh tenant (a cold server) for the stream ``tag``: the next of the issued pool when secure."""
        self._n += 1
        if self.access is None:
            return f"{self.prefix}-{tag}-{self._n}"
        pool = self.access["pool"]
        if self._n > len(pool):
            raise RuntimeError(f"stream {tag!r} needs tenant {self._n}; the launcher issued {len(pool)} for this UE")
        log.info("stream %s runs as tenant %s", tag, pool[self._n - 1])
        return pool[self._n - 1]

    def credentials(self, tenant: str) -> dict[str, Any]:
        """``ClientOptions`` / ``wire.channel`` keywords to reach the server as ``tenant`` ({} if not secure)."""
        if self.access is None:
            return {}
        return {"token": self.access["tokens"][tenant], "tls_ca": self.access["tls_ca"]}

    def client(self, tenant: str, policy: str = "auto", **kw):
        from ue_client.client import CoinferClient

        opts = dict(link=self.link, tenant=tenant, ue_slowdown=self.slowdown, threads=self.threads,
                    costs=self.costs, deadline_slack_ms=5000.0, connect_timeout_s=30.0)
        if self.ue_cpu is not None:
            # Measured once (``connect``); no per-stream probe: it would leave ~1 MB of the model's tail on
            # the server before the stream starts, a head start the serial baselines do not get.
            opts.update(probe=False, send_cpu=self.ue_cpu)
        if self.cell_uplink_mbps:
            opts["cell_uplink_mbps"] = float(self.cell_uplink_mbps)
        if self.spec.get("weight") is not None:
            opts["weight"] = float(self.spec["weight"])
        if self.op_timings and supports_option("op_timings"):
            opts["op_timings"] = True
        if not _GC_FREEZE and supports_option("gc_freeze"):
            opts["gc_freeze"] = False
        if not _PLAN_BACKGROUND and supports_option("plan_background"):
            opts["plan_background"] = False
        if self.spec.get("data_address") and supports_data_channel():
            opts["data_address"] = self.spec["data_address"]  # the data channel through the UE's delay relay
        opts.update(self.credentials(tenant))
        opts.update(kw)
        t, cpu = time.perf_counter(), time.process_time()
        c = CoinferClient(self.model.graph, self.model.example_inputs, server=self.server, policy=policy, **opts)
        self.builds.append({"policy": policy, "tenant": tenant, "t_wall": time.time(),
                            "ms": round((time.perf_counter() - t) * 1e3, 3),
                            "cpu_ms": round((time.process_time() - cpu) * 1e3, 3)})
        self.current = c
        return c

    def closed(self, c) -> None:
        """``c.close()``, its wall and process CPU ms appended to ``self.closes``."""
        t, cpu = time.perf_counter(), time.process_time()
        try:
            c.close()
        finally:
            self.closes.append({"t_wall": time.time(), "ms": round((time.perf_counter() - t) * 1e3, 3),
                                "cpu_ms": round((time.process_time() - cpu) * 1e3, 3)})

    def process_record(self) -> dict[str, Any]:
        """What this process spent outside the timed calls so far: the clients' constructions and closes
        (``builds``, ``closes``), Python's collections per generation (``gc_stats``: ``gc.get_stats()``), the
        objects frozen now (``gc_frozen``), the process's CPU s (``process_cpu_s``) and whether the clients
        were asked to freeze (``gc_freeze``)."""
        import gc

        return {"builds": list(self.builds), "closes": list(self.closes), "gc_stats": gc.get_stats(),
                "gc_frozen": gc.get_freeze_count(), "process_cpu_s": round(time.process_time(), 3),
                "gc_freeze": _GC_FREEZE}

    def connect(self) -> None:
        """Profile this device (under its CPU quota) and get the server's costs, once."""
        import torch

        if self.threads:
            torch.set_num_threads(int(self.threads))
        tenant = self.tenant("profile")
        c = self.client(tenant, "auto")
        try:
            until_admitted(c.engine.connect)
            self.costs = c.engine.costs
            self.ue_cpu = c.engine.ue_cpu()  # what sending costs this UE (measured by the uplink probe)
        finally:
            self.closed(c)
        try:  # and what the serial baselines' UploadWeights costs it (recorded: ``bulk_probe``)
            self.serial_cpu = self.bulk_send_cost(tenant)
        except Exception:
            log.exception("the UploadWeights send-cost probe failed")
            self.serial_cpu = None
        g = torch.Generator().manual_seed(0)
        self.inputs = tuple(torch.randn(x.shape, generator=g) for x in self.model.example_inputs)

    def planning_link(self):
        from partitioner import Link

        lo = self.link
        return Link(lo.uplink_mbps, lo.downlink_mbps or lo.uplink_mbps, lo.rtt_ms)

    # ---- helpers ------------------------------------------------------------------------------------
    def weights_of(self, server_ops) -> list[str]:
        """Weight names (one per distinct sha256) the ops read, in op order."""
        g = self.graph
        out, seen = [], set()
        for op in g.ops:
            if op.name in server_ops:
                for w in op.weight_inputs:
                    sha = g.weight_sha256(w)
                    if sha not in seen:
                        seen.add(sha)
                        out.append(w)
        return out

    def _chunks(self, names: list[str]):
        """The UploadWeights chunks of these weights, in order (``MAX_CHUNK_BYTES`` each at most)."""
        from modelgraph import tensor_bytes
        from ue_client import wire

        g = self.graph
        for w in names:
            data = tensor_bytes(g.weight_values[w])
            meta = g.weights[w]
            sha = g.weight_sha256(w)
            for off, end in wire.chunk_spans(data.nbytes, wire.MAX_CHUNK_BYTES):
                yield wire.encode_weight_chunk(sha, meta.dtype, meta.shape, off, data.nbytes,
                                               data[off:end], field=wire.UPLOAD_CHUNK)

    def upload(self, tenant: str, names: list[str], empty_calls: int = 0) -> tuple[float, int]:
        """Upload these weights on one UploadWeights call (own session); returns (ms, bytes). Sets
        ``last_upload_cpu_ms`` (this process's CPU during the call, all threads) and, with ``empty_calls`` > 0,
        ``last_call_cpu_ms`` (the least CPU of that many UploadWeights calls without a chunk before it)."""
        from ue_client import wire
        from ue_client.session import SessionStream

        if not names:
            return 0.0, 0
        g = self.graph
        ch = wire.channel(self.server, **self.credentials(tenant))
        try:
            st = wire.stub(ch)
            until_admitted(lambda: wire.hello(st, tenant, timeout_s=30.0))  # a fresh token: wait for the reload
            sess = SessionStream(st, tenant, g.name)
            total = sum(g.weights[w].nbytes for w in names)
            sid = sess.opened.session_id
            calls = []
            for _ in range(empty_calls):
                c = time.process_time()
                wire.upload_weights(st, tenant, sid, iter(()), timeout_s=30.0)
                calls.append((time.process_time() - c) * 1e3)
            self.last_call_cpu_ms = min(calls) if calls else None
            t, c = time.perf_counter(), time.process_time()
            wire.upload_weights(st, tenant, sid, self._chunks(names), timeout_s=3600.0)
            ms = (time.perf_counter() - t) * 1e3
            self.last_upload_cpu_ms = (time.process_time() - c) * 1e3
            sess.close()
            return ms, total
        finally:
            ch.close()

    def bulk_send_cost(self, tenant: str):
        """What the serial baselines' timed ``UploadWeights`` costs this UE to send, per byte and per weight
        (a ``UeCpu``), measured as the client's connect-time probe measures its own path (process CPU, an
        empty call's CPU taken off) on two samples of the model's weights, each on one call: about 4 MiB of
        the weights nearest the model's mean size (``probe_weights``: mostly bytes) and its smallest weights
        (up to 32, at most half of them: mostly weights). The two costs are solved for a per-byte and a
        per-weight part (where either comes out negative: the per-byte model of the big sample), at this
        process's CPU capacity (``SendCpuEstimator.ue_cpu``). None where the client's send cost is not
        modelled (``self.ue_cpu`` None) or the model has too few weights.

        Session 15's quick bench predicted the serial uploads with the client's data-channel probe:
        mobilenet_v2 (10 %, 400 Mbit/s, 80 weights) sent 13.9 MB in 596 ms against ~278 predicted; a 1 MiB
        sample of this path alone read 3.8-4.2 ns/B against 1.3 (resnet18) and 2.8 (mobilenet_v2) for the
        whole uploads (coldpred16, session 16). The fit is recorded (``bulk_probe``), not used: its samples
        cost more per byte than the whole upload they are part of (mobilenet_v2's 75 near-mean weights, 4.7 MB:
        28 ms of CPU; the whole 13.9 MB with them: 33 ms), so it over-predicted that upload ~2x in the quick
        bench. ``tenant`` ends up holding the samples (use the profiling one, never a stream's)."""
        import torch

        from partitioner.uecpu import UeCpu
        from profiler.link import SendCpuEstimator
        from ue_client.probing import probe_weights

        g = self.graph
        big = [w for _, w in probe_weights(g, 4 << 20)]
        distinct = {g.weight_sha256(w): w for op in g.ops for w in op.weight_inputs}
        small = sorted(distinct.values(), key=lambda w: g.weights[w].nbytes)[:min(32, len(distinct) // 2)]
        if self.ue_cpu is None or not big or len(small) < 2:
            return None
        samples = []
        for names in (big, small):
            _, nbytes = self.upload(tenant, names, empty_calls=2)
            cpu_s = max(0.25 * self.last_upload_cpu_ms, self.last_upload_cpu_ms - (self.last_call_cpu_ms or 0.0)) / 1e3
            samples.append((nbytes, len(names), cpu_s, self.last_upload_cpu_ms, self.last_call_cpu_ms))
        (n1, w1, c1, *_), (n2, w2, c2, *_) = samples
        det = n1 * w2 - n2 * w1
        per_byte = (c1 * w2 - c2 * w1) / det if det else -1.0
        per_weight = (n1 * c2 - n2 * c1) / det if det else -1.0
        if per_weight < 0 or per_byte < 0:  # no two-part fit: the per-byte model on the big sample
            per_byte, per_weight = c1 / n1, 0.0
        threads = int(self.threads or torch.get_num_threads())
        est = SendCpuEstimator(cpu_s_per_byte=max(per_byte, 1e-15))
        cpu_b = est.ue_cpu(threads)
        scale = cpu_b.send_ms_per_byte / max(per_byte, 1e-15)  # ms per CPU second at this capacity
        cpu = UeCpu(cpu_b.send_ms_per_byte, cpu_b.shared, per_weight * scale)
        self.bulk_probe = {"samples": [{"bytes": n, "weights": w, "cpu_ms": c, "call_cpu_ms": e}
                                       for n, w, _, c, e in samples],
                           "cpu_ns_per_byte": per_byte * 1e9, "cpu_ms_per_weight": per_weight * 1e3,
                           "ue_cpu": cpu.to_dict()}
        return cpu

    def request(self, client, i: int, extra_ms: float = 0.0) -> dict[str, Any]:
        """One call, timed as the application sees it (planning included), plus ``extra_ms`` (a serial
        baseline's upload before its first request)."""
        tcp0 = self.tcp.snap() if self.tcp is not None else None  # outside the timed call
        path = getattr(getattr(client, "engine", None), "path", None)
        seq0 = getattr(path, "_slice_seq", None)  # slices this client defined on the server so far
        thr0 = thread_cpu_ns() if _THREAD_CPU else None  # read outside the timed call
        gc0 = _GC.snap() if _THREAD_CPU else None
        _COMPUTE.install()
        m0 = _COMPUTE.ms
        w = time.time()
        t, c = time.perf_counter(), time.process_time()
        client(*self.inputs)
        call_ms = (time.perf_counter() - t) * 1e3
        cpu_ms = (time.process_time() - c) * 1e3  # this process, all threads, during the call
        gc1 = _GC.snap() if gc0 is not None else None
        thr = _thread_ms(thr0, thread_cpu_ns()) if thr0 is not None else None
        tcp = self.tcp.diff(tcp0, self.tcp.snap()) if tcp0 is not None else None
        r = client.last_report
        return {
            "i": i, "t_wall": w, "latency_ms": call_ms + extra_ms, "call_ms": call_ms, "measured_ms": r.measured_ms,
            "plan_ms": r.plan_ms, "plan_cpu_ms": getattr(r, "plan_cpu_ms", 0.0),
            **plan_at_share(r, self.spec.get("cpu")),
            "offline": getattr(r, "offline", False), "cpu_ms": cpu_ms,
            # the call's prediction where the client reports one (since session 19: the earlier calls' mean
            # time before the run, per kind of call, + the plan's prediction of its run + the calls' mean time
            # after it; session 18 measured the time before the run in the call itself), as the latency is the
            # call's; ``run_predicted_ms`` is the plan's own (of ``measured_ms``); ``call_before_ms`` the call's
            # measured time before its run, ``call_before_forecast_ms`` the forecast of it
            "upload_ms": extra_ms, "predicted_ms": _call_predicted(r), "run_predicted_ms": r.predicted_ms,
            "call_before_ms": getattr(r, "call_before_ms", None),
            "call_before_forecast_ms": getattr(r, "call_before_forecast_ms", None),
            "call_mode": getattr(r, "call_mode", ""), "call_after_ms": getattr(r, "call_after_ms", None),
            # the client's own clock of the call (``RequestReport.call_ms``: ``CoinferClient.__call__``'s entry to
            # its return), against ``call_ms`` timed here around it
            "client_call_ms": getattr(r, "call_ms", None),
            "server_ops": r.server_ops, "ue_ops": r.ue_ops,
            "uploaded_bytes": r.uploaded_weight_bytes, "background_bytes": r.background_bytes,
            "fallback": r.fallback, "reason": (r.fallback_reason or "")[:200], "policy": r.policy,
            "serial_ms": r.serial_ms, "warm_ms": r.warm_ms, "invest": getattr(r, "invest", False),
            "plan_reason": (getattr(r, "plan_reason", "") or "")[:200],
            "plan_why": getattr(r, "plan_why", ""),
            # the decision made for this request on the background worker (``ClientOptions.plan_background``):
            # what became of it, its wall / CPU ms (outside the call unless it waited: ``plan_wait_ms``)
            "plan_wait_ms": getattr(r, "plan_wait_ms", 0.0), "plan_bg": getattr(r, "plan_bg", ""),
            "plan_bg_ms": getattr(r, "plan_bg_ms", 0.0), "plan_bg_cpu_ms": getattr(r, "plan_bg_cpu_ms", 0.0),
            # the server's own account of a remote request (None: local, offline or fell back before an answer)
            "server_timings": r.server_timings, "ue_compute_ms": r.ue_compute_ms, "tcp": tcp,
            "predicted_parts": getattr(r, "predicted_parts", None),
            # the uplink's backlog when a split request was planned and what it added to its prediction (ms;
            # ``ue_client.backlog``, since session 20; None: local)
            "uplink_backlog_ms": getattr(r, "uplink_backlog_ms", None),
            "uplink_backlog_added_ms": getattr(r, "uplink_backlog_added_ms", None),
            **({"thread_cpu_ms": thr, "gc": _GC.diff(gc0, gc1), "run_whole_cpu_ms": round(_COMPUTE.ms - m0, 3)}
               if thr is not None else {}),
            "load1": os.getloadavg()[0],  # the machine's 1-minute load average after the call (2 cores here)
            # the request defined a new slice: the server validated it before the request (not in its timings)
            "new_slice": None if seq0 is None else getattr(path, "_slice_seq", seq0) != seq0,
            # the server's per-op timings (``--op-timings``): which ops of a request ran slower than another's
            **({"server_op_ms": [[o.name, round(o.start_ms, 3), round(o.ms, 4)] for o in
                                 getattr(r, "server_op_times", ())]} if self.op_timings else {}),
        }

    # ---- policies -----------------------------------------------------------------------------------
    def steps(self, policy: str, k: int):
        """The stream of ``policy`` as a generator: it sets the stream up (client, connection, a serial
        baseline's split), yields None once ready, then yields each of the ``k`` requests' rows as it runs
        it, and returns the stream's result dict (``stream``'s). Closing it early closes its client. So a
        driver can run several streams request by request (``paired_streams``) or one alone (``stream``)."""
        if policy in SERIAL:
            return (yield from self.serial_steps(SERIAL[policy], k))
        name = "auto" if policy == "coinfer" else policy
        c = self.client(self.tenant(policy), name, horizon=k)  # the stream's length is known
        self.stream_clients[policy] = c
        try:
            # like every baseline: the connection is up before the stream starts
            connect_ms = None if name == "local" else connect_untimed(c)
            if self.spec.get("join_barrier"):  # every UE's session open before any request (the launcher
                stage("joined", True)  # waits for the allocation for all of them, then releases them)
            yield None
            t0, w0 = time.perf_counter(), time.time()
            rows = []
            for i in range(k):
                rows.append(self.request(c, i))
                yield rows[-1]
            uploads = getattr(c.engine, "uploads", None)
            samples = uploads.uplink_samples() if uploads is not None else []
            sess = getattr(getattr(getattr(c, "engine", None), "conn", None), "session", None)
            # (s from the stream's first request, compute share, uplink share) as the server set them
            shares = [(round(t - t0, 4), round(cs, 4), round(us, 4)) for t, cs, us in getattr(sess, "share_log", ())]
            cpu = c.engine.ue_cpu() if hasattr(c, "engine") else None  # its CPU-bound send rate (the probe's)
            send_cpu_mbps = cpu.rate_mbps if cpu is not None and cpu.rate_mbps < float("inf") else None
            # the send rates it reported to the server's allocator (s from the stream's first request; the
            # first: ARA's cap on its first upload, SendRateReport.rate_mbps)
            sent = [(round(t - w0, 3), mbps, src) for t, mbps, src in getattr(c.engine, "send_log", ())]
        finally:
            self.stream_clients.pop(policy, None)
            self.closed(c)
        return {"requests": rows, "connect_ms": connect_ms, "uplink_samples": samples, "share_log": shares,
                "send_mbps": sent[0][1] if sent else None, "send_cpu_mbps": send_cpu_mbps, "send_updates": sent}

    @staticmethod
    def _drain(gen) -> dict[str, Any]:
        """Run a ``steps`` generator to its end; its result dict."""
        try:
            while True:
                next(gen)
        except StopIteration as stop:
            return stop.value

    def stream(self, policy: str, k: int) -> dict[str, Any]:
        """``policy``'s stream of ``k`` requests alone."""
        return self._drain(self.steps(policy, k))

    def paired_streams(self, k: int, policy: str = "coinfer") -> tuple[dict[str, Any], dict[str, Any]]:
        """local and ``policy``, one request of each in turn (which goes first alternates: local in even
        rounds), each on its own client and fresh tenant, both set up before the first request. Both see the
        same drift of this shared machine (measured: the same local run's CPU time rose 35 % within one cell),
        and every policy paired so sees the same conditions: half its requests right after a local one (which
        may have spent the UE's CFS quota), half right after its own. Returns (local's, ``policy``'s) results,
        each naming the other in ``paired_with``. A failure of either stream ends both (both closed) and
        raises."""
        loc = self.steps("local", k)
        other = self.steps(policy, k)
        gens = {"local": loc, policy: other}
        out: dict[str, dict[str, Any]] = {}

        def step(name: str) -> None:
            if name in out:  # a stream that ended early (e.g. unavailable) is left out of the turns
                return
            held = self._hold_background(policy if name == "local" else "local")
            try:
                next(gens[name])
            except StopIteration as stop:
                out[name] = stop.value
            finally:
                held()

        try:
            step("local")
            step(policy)  # both set up (connected) before the first request of either
            for i in range(k):
                for name in (("local", policy) if i % 2 == 0 else (policy, "local")):
                    step(name)
            for name in (policy, "local"):  # closes the policy's client first, then local's (as before)
                if name not in out:
                    out[name] = self._drain(gens[name])
        finally:
            for g in (other, loc):
                g.close()  # a no-op for a finished one; closes the client of one left midway
        out["local"]["paired_with"] = policy
        out[policy]["paired_with"] = "local"
        return out["local"], out[policy]

    def _hold_background(self, policy: str):
        """Hold ``policy``'s stream's background weights off the uplink while the partner's request runs
        (``UploadScheduler.hold_background``); returns the callable that puts them back. One UE, one CPU quota:
        a stream whose client sends between its requests (IONN's background, coinfer's progressive weights)
        would otherwise have that upload paid by its partner's request (session 12's grid: IONN sent half of
        its weights so and beat the stream lower bound), where a caller sending its next request at once
        gives it no idle time."""
        ups = getattr(getattr(getattr(self, "stream_clients", {}).get(policy), "engine", None), "uploads", None)
        return ups.hold_background() if hasattr(ups, "hold_background") else (lambda: None)

    def serial_steps(self, planner: str, k: int, server_ops=None):
        """A serial baseline's stream as a ``steps`` generator: its split (``planner``'s, or ``server_ops``),
        every weight of it uploaded with one timed ``UploadWeights`` before the first request (that time is
        added to request 0's latency), then ``k`` requests on the split. The upload runs at the first request's
        turn, not at set-up: it is part of what the stream costs."""
        from ue_client import planning

        if not supports_fixed_split():
            yield None
            return {"requests": [], "unavailable": "ue_client RemoteEngine has no server_ops (fixed split)"}
        link = self.planning_link()
        if server_ops is None:  # the baseline's own split (it does not know the UE's cost of sending)
            server_ops = planning.choose(planner, self.costs, link).server_ops
        # predicted with the client's send cost (its data-channel probe), like every other prediction in the
        # bench: the fit of this path's own cost (``bulk_send_cost``, recorded) predicted mobilenet_v2's serial
        # request (10 %, 400 Mbit/s) at 973 ms against 494 / 531 measured (session 16's quick bench)
        predicted = planning.predict(self.costs, link, frozenset(server_ops), mode="serial", ue_cpu=self.ue_cpu)
        tenant = self.tenant(f"serial-{planner}")
        names = self.weights_of(server_ops)
        c = self.client(tenant, "auto", server_ops=sorted(server_ops))
        try:
            yield None
            up_ms, nbytes = self.upload(tenant, names)
            c.engine.connect()  # learns what the server holds (untimed: the connection is up before)
            rows = []
            for i in range(k):
                row = self.request(c, i, up_ms if i == 0 else 0.0)
                if i == 0:
                    row["predicted_ms"] = predicted
                    row["uploaded_bytes"] += nbytes
                rows.append(row)
                yield row
        finally:
            self.closed(c)
        return {"requests": rows, "serial_upload_ms": up_ms, "serial_upload_bytes": nbytes,
                "serial_upload_cpu_ms": self.last_upload_cpu_ms,
                "serial_upload_weights": len(names), "server_ops_total": len(server_ops)}

    def serial_stream(self, planner: str, k: int, server_ops=None) -> dict[str, Any]:
        """``serial_steps`` run alone."""
        return self._drain(self.serial_steps(planner, k, server_ops))

    def warm(self, tenant: str, policy: str, k: int, first: int = 0) -> dict[str, Any]:
        """``k`` requests on a server that holds the whole model, after one unrecorded warm-up request
        (it defines the slice on the server and warms both sides' caches); numbered from ``first``."""
        c = self.client(tenant, policy)
        try:
            warmup = self.request(c, -1)
            rows = [self.request(c, first + i) for i in range(k)]
        finally:
            self.closed(c)
        if policy == "local" and self.costs is not None:
            # what every planner of this bench predicts for running locally: the UE's times in the cost graph
            # all the clients are given (the profile, rescaled by the connect-time runs)
            local_ms = sum(op.ue_ms for op in self.costs.ops)
            for row in (warmup, *rows):
                row["predicted_ms"] = local_ms
        return {"requests": rows, "warmup": warmup}

    def warm_rounds(self, tenant: str, labels: list[str], k: int, rounds: int) -> dict[str, dict[str, Any]]:
        """Scenario c with the policies interleaved: ``rounds`` rounds, in each every policy in turn opens
        its client on ``tenant`` (which holds the whole model), makes one unrecorded warm-up request and
        ``ceil(k / rounds)`` recorded ones, and closes it; the policies' order rotates by one each round.
        So every policy sees the same drift of this shared machine (a policy run as the cell's last stream
        is not the one that meets a busier minute), and only one session is open at a time (none of them
        plans with the compute share of idle sessions). Returns label -> {"requests", "warmups", "rounds"}
        (a failed policy: its "error"; the other policies go on)."""
        per = max(1, -(-k // max(1, rounds)))
        out: dict[str, dict[str, Any]] = {lab: {"requests": [], "warmups": [], "rounds": []} for lab in labels}
        for r in range(max(1, rounds)):
            order = labels[r % len(labels):] + labels[:r % len(labels)] if labels else []
            for lab in order:
                res = out[lab]
                if res.get("error"):
                    continue
                try:
                    got = self.warm(tenant, WARM_POLICIES.get(lab, lab), per, first=len(res["requests"]))
                except Exception as e:
                    log.exception("warm %s failed", lab)
                    res["error"] = f"{type(e).__name__}: {e}"
                    continue
                for row in got["requests"]:
                    row["round"] = r
                res["requests"] += got["requests"]
                res["warmups"].append(got["warmup"])
                res["rounds"].append({"round": r, "position": order.index(lab), "requests": len(got["requests"])})
        return out

    def cold_compare(self, repeats: int = 1, local: bool = False) -> dict[str, Any]:
        """MJOA-MU comparison on one partition: coinfer's first plan, parallel vs serial upload.

        ``repeats`` rounds, each a fresh tenant per run (a cold server), the order alternating (parallel
        first in even rounds, serial first in odd ones) so that a drift of this shared machine does not
        favour one; ``local``: each round also times one local request (a fresh client). ``parallel`` and
        ``serial`` (and ``local``) are round 0's; every round is in ``runs`` when ``repeats`` > 1."""
        from ue_client import planning

        if not supports_fixed_split():
            return {"unavailable": "ue_client RemoteEngine has no server_ops (fixed split)"}
        link = self.planning_link()
        # MJOA's cold partition as the paper plans it (no model of the UE's CPU cost of sending), scored
        # with and without that cost
        choice = planning.choose("mjoa", self.costs, link, budget_s=1.0)
        server = choice.server_ops
        ops = sorted(server)
        out: dict[str, Any] = {
            "server_ops": len(ops),
            "predicted_parallel_ms": planning.predict(self.costs, link, server, mode="cold", ue_cpu=self.ue_cpu),
            "predicted_serial_ms": planning.predict(self.costs, link, server, mode="serial", ue_cpu=self.ue_cpu),
            "predicted_parallel_plain_ms": choice.predicted_ms, "predicted_serial_plain_ms": choice.serial_ms,
            "predicted_local_ms": choice.local_ms,
            "ue_cpu": None if self.ue_cpu is None else self.ue_cpu.to_dict(),
            "serial_ue_cpu": None if self.serial_cpu is None else self.serial_cpu.to_dict()}
        if not ops:
            out["note"] = "MJOA's cold plan is local: nothing to upload"
            if local:
                out["local"] = self.local_once()
            return out
        runs = []
        for i in range(max(1, repeats)):
            run: dict[str, Any] = {}
            if local:
                run["local"] = self.local_once()
            for kind in (("parallel", "serial") if i % 2 == 0 else ("serial", "parallel")):
                if kind == "parallel":
                    c = self.client(self.tenant("cold-par"), "auto", server_ops=ops)
                    try:
                        c.engine.connect()  # like the serial run: the connection is up before the request
                        run["parallel"] = self.request(c, i)
                    finally:
                        self.closed(c)
                else:
                    run["serial"] = self.serial_stream("fixed", 1, server_ops=frozenset(ops))["requests"][0]
            runs.append(run)
        out.update(runs[0])
        if repeats > 1:
            out["runs"] = runs
        return out

    def local_once(self) -> dict[str, Any]:
        """One local request on a fresh client (the cold scenario's reference)."""
        c = self.client(self.tenant("cold-local"), "local")
        try:
            return self.request(c, 0)
        finally:
            self.closed(c)


_GC = _GcClock()

PAIRINGS = ("all", "coinfer", "none")
"""Which stream policies run interleaved with a local stream of their own, request by request: ``all`` every
one (the default since session 12), ``coinfer`` only coinfer (sessions 6-11), ``none`` every stream alone."""


def pairing(spec: dict[str, Any], policies: list[str]) -> dict[str, str]:
    """Policy -> how its stream runs, from the spec's ``pairing`` (``PAIRINGS``; an older spec's ``"paired":
    false`` is ``none``): ``"with-local"`` (coinfer's pair: its partner is the cell's local stream),
    ``"own-local"`` (the policy interleaved with a local stream of its own, kept in its result as
    ``paired_local``), or ``"alone"``. Pairing needs ``local`` among the policies; local itself runs alone only
    when coinfer, its partner, is not there. Raises ValueError for an unknown pairing."""
    mode = spec.get("pairing") or ("none" if spec.get("paired", True) is False else "all")
    if mode not in PAIRINGS:
        raise ValueError(f"unknown pairing {mode!r}: use one of {', '.join(PAIRINGS)}")
    on = mode != "none" and "local" in policies
    out = {}
    for p in policies:
        if p == "local":
            continue
        if on and p == "coinfer":
            out[p] = "with-local"
        elif on and mode == "all":
            out[p] = "own-local"
        else:
            out[p] = "alone"
    if "local" in policies and out.get("coinfer") != "with-local":
        out["local"] = "alone"
    return out


def run_streams(ue: Ue, policies: list[str], k: int, how: dict[str, str], result: dict[str, Any],
                save=lambda: None) -> None:
    """Every stream of a cell in ``policies``' order, as ``how`` (``pairing``) says, into ``result["streams"]``
    (each with its ``wall_s``; a failed stream with its ``error``; ``save()`` after each). coinfer's pair runs
    at local's place in the order; a policy paired with a local stream of its own gets it as ``paired_local``."""
    for policy in policies:
        mode = how.get(policy)
        if mode == "with-local" or (policy == "local" and mode is None):
            if policy != "local":
                continue  # ran at local's place
            mode, policy = "with-local", "coinfer"
        t = time.time()
        names = ("local", "coinfer") if mode == "with-local" else (policy,)
        try:
            if mode == "with-local":
                result["streams"]["local"], result["streams"]["coinfer"] = ue.paired_streams(k, "coinfer")
            elif mode == "own-local":
                loc, res = ue.paired_streams(k, policy)
                result["streams"][policy] = {**res, "paired_local": loc}
            else:
                result["streams"][policy] = ue.stream(policy, k)
        except Exception as e:
            log.exception("policy %s failed", policy)
            for p in names:
                result["streams"][p] = {"requests": [], "error": f"{type(e).__name__}: {e}"}
        for p in names:
            result["streams"][p]["wall_s"] = time.time() - t
        save()


class _ComputeClock:
    """CPU ms (``time.thread_time``) the UE spent inside ``ue_client.model.run_whole`` (the whole captured
    model here: a local request's ops), wrapped from outside when COINFER_BENCH_THREAD_CPU is set: the
    caller thread's CPU outside it is the request's own bookkeeping."""

    def __init__(self) -> None:
        self.ms = 0.0
        self._on = False

    def install(self) -> None:
        if self._on or not _THREAD_CPU:
            return
        from ue_client import model as m

        inner = m.run_whole

        def run_whole(*a, **kw):
            t = time.thread_time()
            try:
                return inner(*a, **kw)
            finally:
                self.ms += (time.thread_time() - t) * 1e3

        m.run_whole = run_whole
        self._on = True


_COMPUTE = _ComputeClock()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m testbed.bench.worker SPEC.json", file=sys.stderr)
        return 2
    spec = json.loads(Path(argv[0]).read_text())
    logging.basicConfig(level=logging.INFO if spec.get("verbose") else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    handshake = bool(spec.get("handshake"))
    out_path = Path(spec["out"])
    from testbed.launcher import redacted

    result: dict[str, Any] = {"spec": redacted(spec), "pid": os.getpid(), "streams": {}, "warm": {}}
    t0 = time.time()
    ue = Ue(spec)
    result["capture_s"] = time.time() - t0
    if spec.get("preload"):  # runs next to the server: put every weight of the model in pre_tenant
        ms, nbytes = ue.upload(spec["pre_tenant"], ue.weights_of({op.name for op in ue.graph.ops}))
        print(f"preloaded {nbytes} bytes in {ms:.0f} ms", flush=True)
        return 0
    stage("captured", handshake)
    t1 = time.time()
    ue.connect()
    result["connect_s"] = time.time() - t1
    result["bulk_probe"] = ue.bulk_probe  # the serial baselines' send cost (``Ue.bulk_send_cost``)
    stage("connected", handshake)
    result["start_wall"] = time.time()
    k = int(spec.get("requests", 4))
    policies = list(spec.get("policies", ["coinfer"]))
    run_streams(ue, policies, k, pairing(spec, policies), result, lambda: out_path.write_text(
        json.dumps({**result, **ue.process_record()}, indent=1)))
    result["end_wall"] = time.time()
    if spec.get("cold_compare"):
        try:
            result["cold_compare"] = ue.cold_compare(int(spec.get("cold_repeats", 1)), bool(spec.get("cold_local")))
        except Exception as e:
            log.exception("cold compare failed")
            result["cold_compare"] = {"error": f"{type(e).__name__}: {e}"}
    pre = spec.get("pre_tenant")
    if pre:
        labels = list(spec.get("warm_policies", list(WARM_POLICIES)))
        result["warm"] = ue.warm_rounds(pre, labels, int(spec.get("warm_requests", 9)),
                                        int(spec.get("warm_rounds", 3)))
    result["total_s"] = time.time() - t0
    out_path.write_text(json.dumps({**result, **ue.process_record()}, indent=1))
    print("STAGE done", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
