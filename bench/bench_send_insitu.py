"""The UE's CPU per uploaded byte inside the testbed: netns + veth + tc tbf + the delay relay, TLS, a 10 % cgroup.

    flock /work/wt/.bench.lock .venv/bin/python bench/bench_send_insitu.py [--model resnet18] [--cpus 0.1]
        [--uplinks 100,400] [--repeats 2] [--conditions floor_tls,floor_plain,session_alone,session_beside]
        [--json PATH]

Root only (namespaces, tc, cgroups). One ``testbed.launcher.Testbed`` in netns mode, as ``coinfer-testbed bench``
builds it: the edge server (TLS, bearer tokens, a data channel) in the server namespace, per uplink rate one UE
namespace joined by a veth shaped by tc tbf (uplink and downlink at the rate), the round trip (``--rtt-ms``, 20 as
the bench) from the userspace delay relay in the UE's namespace (one for gRPC, one for the data channel, as the
launcher makes them), the UE process in a CPU cgroup of ``--cpus`` cores over 10 ms CFS periods, one torch thread.
A byte sink (TLS and plain ports, ``--sink``) runs in the server namespace behind its own delay relay, for the floor.

Per repeat and rate, one UE process (the model captured unthrottled, then throttled) measures, each condition once:

- ``floor_tls``: a Python ``ssl`` socket's ``sendall`` of the model's weight bytes (1 MiB writes) through the same
  link to the sink (the in-situ floor: what TLS + TCP + the relay cost the UE per byte);
- ``floor_plain``: the same on a plain TCP socket;
- ``session_alone``: coinfer's Session upload of every weight of the model on the data channel (a fresh client and
  tenant: a cold server), the calling thread waiting (``Event.wait`` of 50 ms) until the server acknowledged them;
- ``session_beside``: the same while the calling thread runs the model's forward in a loop (a cold request's
  shape: the upload beside local compute); ``compute_extra_ns_per_byte``: the forwards' CPU beyond the same
  number of forwards alone, per byte;
- ``request`` (``request+server=F``): one cold split request of a fresh client (``server_ops``: the last F of
  the ops, default all), the UE's prefix computed beside the upload, from the connection on, per weight byte sent.

Knobs (``CONDITION+knob[=value]``): ``+inflight`` (as while a split request is in flight), ``+unpaced``,
``+chunk_s=S``, ``+lowat=BYTES``, ``+target=S`` (the queue watch's target), ``+probe`` (session 21): a thread pings
on the session's gRPC channel every 50 ms during the upload (the path a cut tensor takes) and reports the round
trips beyond the idle one (``tensor_wait_ms``: p50 / p90 / max, ms), the goodput (Mbit/s) and the data channel
socket's ``SIOCOUTQ`` at each ping (``data_outq``, bytes); ``--tbf`` samples the UE's uplink tbf backlog (``tc -s
qdisc``, every 50 ms over the whole child run, ``tbf_backlog``, bytes).

For each: the process's CPU (``time.process_time``) per byte, and per thread (``/proc/self/task/*/schedstat``:
CPU ns and time slices, i.e. times the thread was scheduled in; ``status``: voluntary and involuntary context
switches), grouped by thread name; the cgroup's throttled periods over the condition; wall time. "beyond caller"
is the process's CPU minus the calling thread's (what sending costs when the caller computes). Prints a table and
writes JSON. Session 16: ``docs/results/sendcost/session16``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import edge_process  # bench/edge_process.py, beside this script

ROOT = Path(__file__).resolve().parents[1]

WRITE = 1 << 20


# ---- per-thread CPU ----------------------------------------------------------------------------------------
def threads_snapshot() -> dict[int, dict]:
    """tid -> {name, cpu_ns, slices, vol, invol} of this process's threads now (Linux /proc)."""
    out = {}
    base = Path("/proc/self/task")
    for d in base.iterdir():
        try:
            name = (d / "comm").read_text().strip()
            cpu, _wait, slices = (int(x) for x in (d / "schedstat").read_text().split()[:3])
            vol = invol = 0
            for line in (d / "status").read_text().splitlines():
                if line.startswith("voluntary_ctxt_switches"):
                    vol = int(line.split()[1])
                elif line.startswith("nonvoluntary_ctxt_switches"):
                    invol = int(line.split()[1])
            out[int(d.name)] = {"name": name, "cpu_ns": cpu, "slices": slices, "vol": vol, "invol": invol}
        except (OSError, ValueError):
            continue
    return out


def threads_delta(before: dict, after: dict, caller_tid: int) -> dict[str, dict]:
    """Per thread name (the caller as ``<caller>``): CPU ms, slices, context switches between two snapshots
    (threads born between them count from zero; threads that ended are not seen)."""
    out: dict[str, dict] = {}
    py_names = {t.native_id: t.name for t in threading.enumerate()}
    for tid, a in after.items():
        b = before.get(tid, {"cpu_ns": 0, "slices": 0, "vol": 0, "invol": 0})
        name = "<caller>" if tid == caller_tid else py_names.get(tid, a["name"])
        g = out.setdefault(name, {"cpu_ms": 0.0, "slices": 0, "vol": 0, "invol": 0, "threads": 0})
        d_cpu = a["cpu_ns"] - b["cpu_ns"]
        if d_cpu <= 0 and a["slices"] == b["slices"]:
            continue
        g["cpu_ms"] += d_cpu / 1e6
        g["slices"] += a["slices"] - b["slices"]
        g["vol"] += a["vol"] - b["vol"]
        g["invol"] += a["invol"] - b["invol"]
        g["threads"] += 1
    return {k: v for k, v in sorted(out.items(), key=lambda kv: -kv[1]["cpu_ms"]) if v["threads"]}


class Meter:
    """Process and per-thread CPU over a ``with`` block; ``result(nbytes)`` the numbers."""

    def __enter__(self):
        self.tid = threading.get_native_id()
        self.snap = threads_snapshot()
        self.t, self.p, self.th = time.perf_counter(), time.process_time(), time.thread_time()
        return self

    def __exit__(self, *exc):
        self.wall = time.perf_counter() - self.t
        self.proc = time.process_time() - self.p
        self.thread = time.thread_time() - self.th
        self.per_thread = threads_delta(self.snap, threads_snapshot(), self.tid)

    def result(self, nbytes: int) -> dict:
        return {"bytes": nbytes, "wall_s": round(self.wall, 4), "proc_cpu_ms": round(self.proc * 1e3, 3),
                "caller_cpu_ms": round(self.thread * 1e3, 3),
                "ns_per_byte": self.proc * 1e9 / max(1, nbytes),
                "beyond_caller_ns_per_byte": (self.proc - self.thread) * 1e9 / max(1, nbytes),
                "threads": {k: {kk: round(vv, 3) if isinstance(vv, float) else vv for kk, vv in v.items()}
                            for k, v in self.per_thread.items()}}


# ---- the sink (server namespace) ---------------------------------------------------------------------------
def sink(args) -> None:
    """Accept connections on a TLS and a plain port; each connection: 8-byte length N, then N bytes, answered
    with one byte. Prints ``SINK <tls port> <plain port>``."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(args.cert, args.key)

    def serve(ls: socket.socket, tls: bool) -> None:
        while True:
            c, _ = ls.accept()
            threading.Thread(target=conn, args=(c, tls), daemon=True).start()

    def conn(c: socket.socket, tls: bool) -> None:
        try:
            s = ctx.wrap_socket(c, server_side=True) if tls else c
            with s:
                hdr = b""
                while len(hdr) < 8:
                    hdr += s.recv(8 - len(hdr))
                n = int.from_bytes(hdr, "big")
                buf = bytearray(1 << 20)
                got = 0
                while got < n:
                    k = s.recv_into(buf)
                    if not k:
                        return
                    got += k
                s.sendall(b"\x01")
        except OSError:
            pass

    socks = []
    for tls in (True, False):
        ls = socket.socket()
        ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        ls.bind(("0.0.0.0", 0))
        ls.listen(8)
        socks.append(ls)
        threading.Thread(target=serve, args=(ls, tls), daemon=True).start()
    print(f"SINK {socks[0].getsockname()[1]} {socks[1].getsockname()[1]}", flush=True)
    threading.Event().wait()


# ---- the UE ------------------------------------------------------------------------------------------------
def child(args) -> None:
    import torch

    from modelgraph import tensor_bytes
    from ue_client import wire
    from ue_client.client import CoinferClient
    from ue_client.session import FOREGROUND, UplinkItem

    model, access, tenants, link = edge_process.ue_child(args.model, args.access, args.uplink_mbps, args.rtt_ms)
    g, x = model.graph, model.example_inputs
    all_names, seen = [], set()
    for op in g.ops:
        for w in op.weight_inputs:
            sha = g.weight_sha256(w)
            if sha not in seen:
                seen.add(sha)
                all_names.append(w)
    total = sum(g.weights[w].nbytes for w in all_names)
    payload = bytearray(os.urandom(1 << 20)) * max(1, total >> 20)

    def fwd():
        return model.module(*x)

    with torch.no_grad():
        fwd()
    print("READY", flush=True)
    sys.stdin.readline()  # the parent throttles us, then says go
    fwd_alone_s = edge_process.forward_cpu_s(fwd, warmup=1)

    def floor(tls: bool, lowat: int | None = None, write: int = WRITE) -> dict:
        host, port = args.sink_address.rsplit(":", 1) if tls else args.sink_plain_address.rsplit(":", 1)
        raw = socket.create_connection((host, int(port)))
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if lowat:
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NOTSENT_LOWAT, lowat)
        s = raw
        if tls:
            ctx = ssl.create_default_context(cafile=access["tls_ca"])
            ctx.check_hostname = False
            s = ctx.wrap_socket(raw)
        view = memoryview(payload)
        with s, Meter() as m:
            s.sendall(len(view).to_bytes(8, "big"))
            for off in range(0, len(view), write):
                s.sendall(view[off:off + write])
            if s.recv(1) != b"\x01":
                raise RuntimeError("sink did not confirm")
        return m.result(len(view))

    def session(beside: bool, knobs: dict) -> dict:
        t = next(tenants)
        c = CoinferClient(g, x, server=args.server, policy="auto", tenant=t, token=access["tokens"][t],
                          tls_ca=access["tls_ca"], data_address=args.data_address, link=link, probe=False,
                          gc_freeze=False, connect_timeout_s=30.0)
        try:
            c.engine.connect()
            sess = c.engine.conn.session
            ds = sess.data_sender
            if ds is not None:
                ds.settled.wait(10.0)
            on_side = bool(ds is not None and ds.active)
            q = sess.queue
            if knobs.get("inflight"):  # as while a split request is in flight: a cut tensor may become ready
                q.tensors_expected = lambda: True
            q.unpaced = bool(knobs.get("unpaced"))
            if "chunk_s" in knobs:
                q.chunk_s = float(knobs["chunk_s"])
            if "lowat" in knobs:
                q.side_unsent_bytes = lambda: int(knobs["lowat"])
            watch = c.engine.conn.watch
            if watch is not None and "target" in knobs:
                watch.target_s = float(knobs["target"])
            pings: list[float] = []
            outq: list[int] = []
            base_rtt = None
            if knobs.get("probe"):  # what a cut tensor waits behind the upload: pings on the session's channel
                ch = c.engine.conn.channel
                base_rtt = min(wire.ping(ch, 10.0) for _ in range(5))
                stop_ping = threading.Event()

                def pinger() -> None:
                    while not stop_ping.wait(0.05):
                        with contextlib.suppress(Exception):  # a bench: a failed ping is a missing sample
                            pings.append(wire.ping(ch, 10.0))
                        u = ds.unacked_bytes() if ds is not None else None
                        if u is not None:
                            outq.append(u)

                pt = threading.Thread(target=pinger, daemon=True)
            items = [UplinkItem("weight", g.weight_sha256(w), g.weights[w].dtype, g.weights[w].shape,
                                tensor_bytes(g.weight_values[w]), (FOREGROUND, 0, k)) for k, w in enumerate(all_names)]
            shas = {it.name for it in items}
            nbytes = sum(it.data.nbytes for it in items)
            n_fwd = 0
            wake = threading.Event()
            end = time.monotonic() + 300.0
            with torch.no_grad(), Meter() as m:
                if base_rtt is not None:
                    pt.start()
                for it in items:
                    q.put(it)
                while not shas <= sess.held and sess.alive and time.monotonic() < end:
                    if beside:
                        fwd()
                        n_fwd += 1
                    else:
                        wake.wait(0.05)
            r = m.result(nbytes)
            if base_rtt is not None:
                stop_ping.set()
                pt.join(15.0)
                ex = sorted((x - base_rtt) * 1e3 for x in pings)
                if ex:
                    r["tensor_wait_ms"] = {"base_rtt_ms": round(base_rtt * 1e3, 2), "n": len(ex),
                                           "p50": round(ex[len(ex) // 2], 1),
                                           "p90": round(ex[int(0.9 * (len(ex) - 1))], 1),
                                           "max": round(ex[-1], 1), "mean": round(statistics.fmean(ex), 1)}
                r["goodput_mbps"] = round(nbytes * 8 / m.wall / 1e6, 1)
                if outq:  # the data channel socket's SIOCOUTQ at each ping (bytes)
                    oq = sorted(outq)
                    r["data_outq"] = {"n": len(oq), "p50": oq[len(oq) // 2], "max": oq[-1]}
                if watch is not None:
                    r["watch"] = {"target_ms": watch.target_s * 1e3, "deferred_ms": round(watch.deferred_s * 1e3, 1),
                                  "max_excess_ms": round(watch.max_excess_s * 1e3, 1)}
            r.update(weights=len(items), data_channel=on_side, acked=shas <= sess.held, forwards=n_fwd,
                     side_bytes=q.side_bytes, ack_messages=getattr(sess, "ack_messages", None),
                     watch_socket_reads=getattr(watch, "socket_reads", None))
            if beside:
                r["compute_extra_ns_per_byte"] = (m.thread - n_fwd * fwd_alone_s) * 1e9 / max(1, nbytes)
            q.delivered()
            return r
        finally:
            c.close()

    def request(server_frac: float) -> dict:
        """One cold split request (a fresh tenant): the server runs the last ``server_frac`` of the ops, the
        UE the rest beside the upload; CPU from the connection on (the session's opening, its TLS handshakes) per
        weight byte the session sent."""
        t = next(tenants)
        k = max(1, round(server_frac * len(g.ops)))
        c = CoinferClient(g, x, server=args.server, policy="offload", server_ops=k, tenant=t,
                          token=access["tokens"][t], tls_ca=access["tls_ca"], data_address=args.data_address,
                          link=link, probe=False, gc_freeze=False, connect_timeout_s=30.0, fallback=False,
                          deadline_slack_ms=5000.0)
        try:
            with torch.no_grad(), Meter() as m:  # from the connection on: a static plan's upload may start there
                c.engine.connect()
                sess = c.engine.conn.session
                ds = sess.data_sender
                if ds is not None:
                    ds.settled.wait(10.0)
                y = c(*x)
            rep = c.last_report
            with torch.no_grad():
                ok = bool((y - fwd()).abs().max() <= 1e-4)
            r = m.result(sess.queue.sent.weight_bytes)
            r.update(server_ops=rep.server_ops, ue_ops=rep.ue_ops, latency_ms=rep.measured_ms, equal_to_eager=ok,
                     data_channel=bool(ds is not None and ds.active))
            return r
        finally:
            c.close()

    out = {"forward_alone_cpu_ms": fwd_alone_s * 1e3, "weights": len(all_names), "weight_bytes": total}
    for k in args.conditions.split(","):
        base, *rest = k.split("+")  # knobs for exploring: +unpaced, +chunk_s=S, +lowat=BYTES, +write=BYTES
        knobs = dict([*kv.split("="), "1"][:2] for kv in rest)
        if base.startswith("request"):
            out[k] = request(float(knobs.get("server", 1.0)))
        elif base.startswith("floor"):
            out[k] = floor(base == "floor_tls", int(knobs["lowat"]) if "lowat" in knobs else None,
                           int(knobs.get("write", WRITE)))
        else:
            out[k] = session(base == "session_beside", knobs)
        print(f"  {k}: {out[k]['ns_per_byte']:.2f} ns/B (beyond caller {out[k]['beyond_caller_ns_per_byte']:.2f}),"
              f" {out[k]['wall_s']:.2f} s", file=sys.stderr, flush=True)
    print("RESULT " + json.dumps(out), flush=True)


# ---- the parent --------------------------------------------------------------------------------------------
def _read_line(proc: subprocess.Popen, prefix: str, timeout_s: float) -> str:
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        line = proc.stdout.readline()
        if not line:
            if proc.poll() is not None:
                raise RuntimeError(f"process exited ({proc.returncode}) before {prefix!r}")
            continue
        if line.startswith(prefix):
            return line.strip()
    raise RuntimeError(f"no {prefix!r} within {timeout_s} s")


def _sample_tbf(net, ue, out: list[int], stop: threading.Event) -> None:
    """Append the backlog in bytes of the UE's uplink qdisc (tc tbf on its veth) every 50 ms until ``stop``."""
    import re

    while not stop.wait(0.05):
        try:
            txt = net.exec(ue.link.netns, ["tc", "-s", "qdisc", "show", "dev", ue.link.ue_if], timeout=5.0).stdout
        except Exception:  # a bench: a failed sample is a missing sample
            continue
        m = re.search(r"backlog (\d+)b", txt)
        if m:
            out.append(int(m.group(1)))


def run(args) -> dict:
    from testbed import cgroups
    from testbed.launcher import Testbed

    load = [edge_process.uptime()]
    work = Path(tempfile.mkdtemp(prefix="sendinsitu-"))
    ups = [float(u) for u in args.uplinks.split(",")]
    n_sess = max(1, sum(c.startswith(("session", "request")) for c in args.conditions.split(",")))
    checkouts = [("now", ROOT)] + ([("before", args.baseline.resolve())] if args.baseline else [])
    per_ue = n_sess * args.repeats * len(checkouts)
    results: list[dict] = []
    with Testbed(work, mode="netns") as tb:
        pool = [f"insitu{k}" for k in range(per_ue * len(ups))]
        tb.start_server(tenants=pool)
        tokens = tb.issue_tenants(pool)
        cred = tb.credentials
        sinkp = tb.net.popen(tb.net.server_ns, [sys.executable, __file__, "--sink", "--cert", str(cred.server_cert),
                                                "--key", str(cred.server_key)],
                             stdout=subprocess.PIPE, text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)))
        _, tls_port, plain_port = _read_line(sinkp, "SINK ", 60).split()
        for ui, up in enumerate(ups):
            ue = tb.add_ue(up, up, args.rtt_ms, args.cpus)
            r_tls = tb.net.delay_relay(ue.link, int(tls_port))
            r_plain = tb.net.delay_relay(ue.link, int(plain_port))
            for rep, (tag, root) in enumerate((t, r) for _ in range(args.repeats) for t, r in checkouts):
                mine = pool[ui * per_ue + rep * n_sess: ui * per_ue + (rep + 1) * n_sess]
                acc = work / f"access-{ui}-{rep}.json"
                acc.write_text(json.dumps({"tenants": mine, "tokens": {t: tokens[t] for t in mine},
                                           "tls_ca": str(cred.ca_cert)}))
                ue.cgroup.set_cpus(None)
                cmd = [sys.executable, __file__, "--child", "--model", args.model, "--uplink-mbps", str(up),
                       "--rtt-ms", str(args.rtt_ms), "--server", ue.server_address, "--data-address",
                       ue.data_address, "--sink-address", f"127.0.0.1:{r_tls.port}", "--sink-plain-address",
                       f"127.0.0.1:{r_plain.port}", "--access", str(acc), "--conditions", args.conditions,
                       "--root", str(root)]
                errf = open(work / f"child-{ui}-{rep}.err", "w")  # noqa: SIM115 - closed after the child
                p = tb.net.popen(ue.netns, cmd, cgroup=ue.cgroup, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                 stderr=errf, text=True, env=dict(os.environ, PYTHONPATH=str(root)))
                tbf: list[int] = []
                stop_tbf = threading.Event()
                tbf_t = threading.Thread(target=_sample_tbf, args=(tb.net, ue, tbf, stop_tbf), daemon=True)
                try:
                    _read_line(p, "READY", 600)
                    ue.cgroup.set_cpus(args.cpus)
                    th0 = ue.cgroup.throttle_stats()
                    if args.tbf:
                        tbf_t.start()
                    p.stdin.write("go\n")
                    p.stdin.flush()
                    line = _read_line(p, "RESULT ", 900)
                    th1 = ue.cgroup.throttle_stats()
                    p.wait(60)
                finally:
                    stop_tbf.set()
                    if p.poll() is None:
                        cgroups.stop_processes([p])
                    errf.close()
                r = json.loads(line[len("RESULT "):])
                if tbf:  # the uplink tbf's backlog (bytes), sampled every 50 ms over the whole child run
                    nz = sorted(b for b in tbf if b > 0)
                    r["tbf_backlog"] = {"samples": len(tbf), "nonzero": len(nz), "max": max(tbf),
                                        "p50_nonzero": nz[len(nz) // 2] if nz else 0,
                                        "p90_nonzero": nz[int(0.9 * (len(nz) - 1))] if nz else 0}
                    print(f"  tbf backlog: {r['tbf_backlog']}", flush=True)
                r.update(uplink_mbps=up, repeat=rep // len(checkouts), checkout=tag, root=str(root),
                         throttle={k: th1.get(k, 0) - th0.get(k, 0) for k in th1})
                results.append(r)
                print(f"{up:g} Mbit/s {tag} repeat {rep // len(checkouts)}: " + "; ".join(
                    f"{k} {r[k]['ns_per_byte']:.2f} ns/B" + (
                        f" {r[k]['goodput_mbps']} Mbit/s, tensor wait p50/p90/max {r[k]['tensor_wait_ms']['p50']}/"
                        f"{r[k]['tensor_wait_ms']['p90']}/{r[k]['tensor_wait_ms']['max']} ms, watch {r[k].get('watch')}"
                        f" outq {r[k].get('data_outq')}"
                        if "tensor_wait_ms" in r[k] else "") for k in args.conditions.split(",")), flush=True)
        sinkp.terminate()
    load.append(edge_process.uptime())
    return {"model": args.model, "cpus": args.cpus, "uplinks": ups, "rtt_ms": args.rtt_ms,
            "checkouts": [t for t, _ in checkouts],
            "conditions": args.conditions.split(","), "load": load, "describe": "netns testbed (see docstring)",
            "results": results}


def table(out: dict) -> list[str]:
    """Median over repeats per rate and condition: ns/B of process CPU, beyond the caller, and the top threads."""
    lines = [f"{out['model']}, UE {out['cpus']:g} CPU (10 ms CFS periods), TLS, RTT {out['rtt_ms']:g} ms, "
             f"median of {len(out['results']) // max(1, len(out['uplinks']) * len(out.get('checkouts', [1])))} "
             "(ns of UE CPU per byte; budget: ms of the UE's CPU share per MB)", "",
             "| uplink | code | condition | MB | wall s | process ns/B | beyond caller ns/B | budget ms/MB "
             "| data-tx thread ns/B | compute extra ns/B | ack messages | top threads (CPU ms / slices) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    med = statistics.median
    for up, tag, k in ((u, t, c) for u in out["uplinks"] for c in out["conditions"]
                       for t in out.get("checkouts", ["now"])):
        rs = [r for r in out["results"] if r["uplink_mbps"] == up and r.get("checkout", "now") == tag]
        if rs:
            xs = [r[k] for r in rs]
            nb = med(x["ns_per_byte"] for x in xs)
            bc = med(x["beyond_caller_ns_per_byte"] for x in xs)
            top = xs[len(xs) // 2]["threads"]
            tops = ", ".join(f"{n} {v['cpu_ms']:.1f}/{v['slices']}" for n, v in list(top.items())[:4])
            tx = med(x["threads"].get("coinfer-data-tx", {}).get("cpu_ms", 0.0) * 1e6 / max(1, x["bytes"]) for x in xs)
            ce = [x["compute_extra_ns_per_byte"] for x in xs if x.get("compute_extra_ns_per_byte") is not None]
            acks = [x["ack_messages"] for x in xs if x.get("ack_messages") is not None]
            lines.append(f"| {up:g} | {tag} | {k} | {xs[0]['bytes'] / 1e6:.1f} | {med(x['wall_s'] for x in xs):.2f} | "
                         f"{nb:.2f} | {bc:.2f} | {bc / out['cpus']:.1f} | {tx:.2f} | "
                         f"{f'{med(ce):.2f}' if ce else ''} | {f'{med(acks):g}' if acks else ''} | {tops} |")
    lines += ["", "load: " + " / ".join(out["load"])]
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="resnet18")
    ap.add_argument("--cpus", type=float, default=0.1)
    ap.add_argument("--uplinks", default="100,400")
    ap.add_argument("--rtt-ms", type=float, default=20.0)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--conditions", default="floor_tls,floor_plain,session_alone,session_beside")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--tbf", action="store_true", help="sample the UE uplink tbf's backlog every 50 ms (tc)")
    ap.add_argument("--baseline", type=Path, help="another checkout (main before the change): its UE runs beside, "
                                                   "interleaved per repeat, same testbed")
    ap.add_argument("--from", dest="from_json", type=Path, help="print the table of an earlier run's JSON")
    for hidden in ("--child", "--sink"):
        ap.add_argument(hidden, action="store_true", help=argparse.SUPPRESS)
    for hidden in ("--uplink-mbps", "--server", "--data-address", "--sink-address", "--sink-plain-address",
                   "--access", "--cert", "--key", "--root"):
        ap.add_argument(hidden, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    sys.path.insert(0, str(args.root or ROOT))
    if args.sink:
        sink(args)
        return 0
    if args.child:
        args.uplink_mbps = float(args.uplink_mbps)
        child(args)
        return 0
    out = json.loads(args.from_json.read_text()) if args.from_json else run(args)
    print("\n".join(table(out)))
    if args.json and not args.from_json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
