"""Session 25's hostile-server sweep: one bounded attack per run, a real server behind ``tests.liar_proxy``.

``python -m tests.hostile_attacks25 NAME [NAME ...]`` runs each named attack in this process and prints one JSON line
per attack: each request's time, whether it fell back (and why), whether its answer equals the user's eager model,
RSS growth, the log's errors and whether honest requests recover once the liar stops (and after how long). Every
attack is bounded: a fixed number of requests, a 10 s recovery window, a flood of at most ``FLOOD`` messages.
Not collected by pytest (``tests/test_hostile_server25.py`` holds the regression tests of what it found).
"""

from __future__ import annotations

import json
import logging
import math
import sys
import threading
import time

import psutil

from modelgraph import zoo
from protos.coinfer.v1 import coinfer_pb2 as pb
from tests.liar_proxy import END, LiarProxy

FLOOD = 200_000
"""Messages of a flood attack (bogus acks, slice answers, progress reports)."""
NAN, INF = math.nan, math.inf


class Errors(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.records: list[str] = []

    def emit(self, record):
        self.records.append(f"{record.levelname} {record.name}: {record.getMessage()[:200]}")


class Liar:
    """Honest until ``on``; then ``session(r)`` / ``unary[name](r)`` apply the attack's lie."""

    def __init__(self, session=None, unary=None, from_start=False):
        self.on = from_start
        self._session = session
        self._unary = unary or {}
        self.state: dict = {}
        self.unary = {k: (lambda r, k=k: self._unary[k](r, self.state) if self.on else r) for k in self._unary}

    def __call__(self, r):
        if not self.on or self._session is None:
            yield r
            return
        yield from self._session(r, self.state)


def _opened(field, value, limits=False):  # (from the start: a session opens once)
    def f(r, st):
        if r.WhichOneof("msg") == "opened":
            setattr(r.opened.limits if limits else r.opened, field, value)
        yield r
    return f


def _inject_after_done(make):
    def f(r, st):
        yield r
        if r.WhichOneof("msg") == "request_done":
            yield from make(r.request_done.request_id, st)
    return f


def _timings(**kw):
    def f(r, st):
        if r.WhichOneof("msg") == "request_done":
            for k, v in kw.items():
                setattr(r.request_done.timings, k, v)
        yield r
    return f


def _ack_before_sent(r, st):
    """Every weight the server says it lacks is acknowledged at once (never sent)."""
    kind = r.WhichOneof("msg")
    if kind in ("opened", "slice_defined"):
        missing = list(getattr(r, kind).missing_weights)
        del getattr(r, kind).missing_weights[:]
        yield r
        if missing:
            yield pb.SessionResponse(weights_stored=pb.WeightsStored(
                weights=[pb.WeightStored(sha256=s, nbytes=1) for s in missing]))
        return
    yield r


def _ack_flood(r, st):
    yield r
    if r.WhichOneof("msg") == "opened" or (r.WhichOneof("msg") == "request_done" and not st.get("flooded")):
        st["flooded"] = True
        for i in range(FLOOD // 1000):
            yield pb.SessionResponse(weights_stored=pb.WeightsStored(
                weights=[pb.WeightStored(sha256=f"{i:032x}{j:032x}", nbytes=1 << 30) for j in range(1000)]))


def _slice_flood(r, st):
    yield r
    if r.WhichOneof("msg") == "request_done" and not st.get("flooded"):
        st["flooded"] = True
        for i in range(FLOOD):
            yield pb.SessionResponse(slice_defined=pb.SliceDefined(slice_id=f"bogus{i:040d}", graph_hash="x" * 64))


def _progress_flood(r, st):
    yield r
    if r.WhichOneof("msg") == "request_done" and not st.get("flooded"):
        st["flooded"] = True
        for i in range(FLOOD):
            yield pb.SessionResponse(request_progress=pb.RequestProgress(request_id=10**9 + i, ops_done=1))


def _progress_extreme(r, st):
    """Before each answer, the largest reports the wire can carry, then the answer withheld for 3 s."""
    kind = r.WhichOneof("msg")
    if kind == "request_done":
        rid = r.request_done.request_id
        yield pb.SessionResponse(request_progress=pb.RequestProgress(
            request_id=rid, ops_done=2**32 - 1, ops_total=2**32 - 1, input_bytes=2**64 - 1))
        time.sleep(3.0)
    yield r


def _done_before_output(r, st):
    kind = r.WhichOneof("msg")
    if kind == "output":
        st.setdefault("held", []).append(r)
        return
    if kind == "request_done":
        yield r
        yield from st.pop("held", [])
        return
    yield r


def _done_twice(r, st):
    yield r
    if r.WhichOneof("msg") == "request_done":
        yield r


def _done_unknown(rid, st):
    d = pb.SessionResponse()
    d.request_done.request_id = rid + 1000
    d.request_done.output_names.append("out")
    yield d
    yield pb.SessionResponse(request_failed=pb.RequestFailed(request_id=rid + 1001, code=13, message="x"))
    yield pb.SessionResponse(request_failed=pb.RequestFailed(request_id=rid, code=13, message="late"))


def _fail_huge(r, st):
    if r.WhichOneof("msg") == "request_done":
        yield pb.SessionResponse(request_failed=pb.RequestFailed(
            request_id=r.request_done.request_id, code=13, message="E" * (6 << 20)))
        return
    yield r


def _end_after_opened(r, st):
    yield r
    if r.WhichOneof("msg") == "opened":
        yield END  # the stream closes after Opened


def _share_changed(**kw):
    def f(r, st):
        if r.WhichOneof("msg") == "opened" or r.WhichOneof("msg") == "request_done":
            yield r
            yield pb.SessionResponse(share_changed=pb.ShareChanged(**kw))
            return
        yield r
    return f


def _hello(field, value, limits=False):
    def f(r, st):
        setattr(r.limits if limits else r, field, value)
        return r
    return f


def _profile_costs(mean, var=0.0):
    def f(r, st):
        for o in r.ops:
            o.mean_ms, o.var_ms2 = mean, var
        r.total_mean_ms = mean
        return r
    return f


def _query_all(r, st):
    st["query"] = True
    return r


ATTACKS: dict[str, dict] = {"none": {}}
for name, v in [("nan", NAN), ("inf", INF), ("neg", -1.0), ("tiny", 1e-300), ("big", 5.0)]:
    ATTACKS[f"opened-share-{name}"] = dict(session=_opened("share", v), from_start=True, policy="auto")
    ATTACKS[f"opened-uplink-{name}"] = dict(session=_opened("uplink_share", v), cell=True, from_start=True)
    ATTACKS[f"opened-requplink-{name}"] = dict(session=_opened("request_uplink_share", v), cell=True,
                                               from_start=True)
    ATTACKS[f"changed-share-{name}"] = dict(session=_share_changed(share=v), policy="auto")
    ATTACKS[f"changed-uplink-{name}"] = dict(session=_share_changed(uplink_share=v), cell=True)
    ATTACKS[f"hello-share-{name}"] = dict(unary={"Hello": _hello("share", v)}, from_start=True)
    ATTACKS[f"profile-{name}"] = dict(unary={"ProfileGraph": _profile_costs(v)}, from_start=True, policy="auto")
    ATTACKS[f"profile-var-{name}"] = dict(unary={"ProfileGraph": _profile_costs(1.0, v)}, from_start=True,
                                          policy="auto")
    ATTACKS[f"timings-{name}"] = dict(session=_timings(compute_ms=v * 1e3 if name == "big" else v,
                                                       queue_ms=v * 1e3 if name == "big" else v,
                                                       total_ms=v), policy="auto", requests=8)
ATTACKS["profile-zero"] = dict(unary={"ProfileGraph": _profile_costs(0.0)}, from_start=True, policy="auto")
ATTACKS["timings-1e300"] = dict(session=_timings(compute_ms=1e300, queue_ms=1e300, total_ms=1e300), policy="auto",
                                requests=8)
ATTACKS["timings-neg1e300"] = dict(session=_timings(compute_ms=-1e300, queue_ms=-1e300, total_ms=-1e300),
                                   policy="auto", requests=8)
for name, v in [("1", 1), ("2", 2), ("max", 2**64 - 1)]:
    ATTACKS[f"limits-chunk-{name}"] = dict(session=_opened("max_chunk_bytes", v, limits=True), from_start=True)
    ATTACKS[f"hello-chunk-{name}"] = dict(unary={"Hello": _hello("max_chunk_bytes", v, limits=True)},
                                          from_start=True)
ATTACKS["limits-pack-max"] = dict(session=_opened("max_chunks_per_message", 2**32 - 1, limits=True), from_start=True)
ATTACKS["limits-preferred-0"] = dict(session=_opened("preferred_chunk_bytes", 0, limits=True), from_start=True)
ATTACKS["limits-progress-max"] = dict(session=_opened("progress_interval_ms", 2**32 - 1, limits=True), from_start=True)
ATTACKS["limits-dataport-bogus"] = dict(session=lambda r, st: _bogus_port(r), data_channel=True,
                                       from_start=True)
ATTACKS["hello-costops-1"] = dict(unary={"Hello": _hello("max_cost_graph_ops", 1, limits=True)}, from_start=True)
ATTACKS["hello-allowed-none"] = dict(unary={"Hello": lambda r, st: (r.ClearField("allowed_ops"), r)[1]},
                                     from_start=True)
ATTACKS["query-all-present"] = dict(unary={"QueryWeights": None}, from_start=True)
ATTACKS["ack-before-sent"] = dict(session=_ack_before_sent)
ATTACKS["ack-before-sent-auto"] = dict(session=_ack_before_sent, policy="auto", cold_lie=True)
ATTACKS["ack-flood"] = dict(session=_ack_flood)
ATTACKS["slice-flood"] = dict(session=_slice_flood)
ATTACKS["progress-flood"] = dict(session=_progress_flood)
ATTACKS["progress-extreme"] = dict(session=_progress_extreme, requests=2)
ATTACKS["done-before-output"] = dict(session=_done_before_output)
ATTACKS["done-twice"] = dict(session=_done_twice)
ATTACKS["done-unknown"] = dict(session=_inject_after_done(_done_unknown))
ATTACKS["failed-huge-message"] = dict(session=_fail_huge, requests=5)
ATTACKS["end-after-opened"] = dict(session=_end_after_opened, requests=4, from_start=True)


def _bogus_port(r):
    if r.WhichOneof("msg") == "opened":
        r.opened.limits.data_port = 1
        r.opened.data_ticket = b"\0" * 32
    yield r


def _query_present(names):
    def f(r, st):
        r.present[:] = names
        return r
    return f


def _r(v):
    return None if v is None else round(v, 1)


def run(name: str) -> dict:
    from edge_server.testing import ServerThread
    from ue_client import CoinferClient, new_tenant
    from ue_client.verify import max_abs_diff

    a = dict(ATTACKS[name])
    errors = Errors()
    logging.getLogger().addHandler(errors)
    logging.getLogger().setLevel(logging.INFO)
    crashes: list[str] = []
    threading.excepthook = lambda args: crashes.append(f"{args.thread.name}: {args.exc_type.__name__}: "
                                                       f"{str(args.exc_value)[:200]}")
    srv = ServerThread(threads=1).start()
    unary = a.get("unary") or {}
    liar = Liar(a.get("session"), unary, from_start=a.get("from_start", False))
    out: dict = {"attack": name}
    opts = dict(policy=a.get("policy", "offload"), link={"uplink_mbps": 400.0, "rtt_ms": 2.0}, profile_runs=2,
                probe=False, data_channel=a.get("data_channel", False), timeout_ms=None)
    if opts["policy"] == "offload":
        opts["server_ops"] = 1
    else:  # a UE 40x slower than this machine: the planner offloads the chain while the server's costs are honest
        opts["ue_slowdown"] = 40.0
    if a.get("cell"):
        opts["cell_uplink_mbps"] = 400.0
    spec = zoo.spec("chain")
    proc = psutil.Process()
    try:
        with LiarProxy(srv.address, liar, _separate if a.get("separate") else None, unary=liar.unary) as proxy:
            t0 = time.perf_counter()
            c = CoinferClient(spec, server=proxy.address, tenant=new_tenant(), **opts)
            if name == "query-all-present":
                liar._unary["QueryWeights"] = _query_present(list(c.engine.uploads.sha_names)) \
                    if hasattr(c, "engine") else (lambda r, st: r)
            liar.state["shas"] = list(c.engine.uploads.sha_names)
            x = c.example_inputs
            ref = c.reference(*x)
            reqs = []

            def one():
                t = time.perf_counter()
                try:
                    y = c(*x)
                    rep = c.last_report
                    return {"ms": round((time.perf_counter() - t) * 1e3), "eq": max_abs_diff(y, ref) == 0.0,
                            "fb": rep.fallback, "srv": rep.server_ops, "pred": _r(rep.predicted_ms),
                            "why": rep.fallback_reason[:160]}
                except Exception as e:
                    return {"ms": round((time.perf_counter() - t) * 1e3), "raised": f"{type(e).__name__}: {e}"[:200]}

            if not liar.on and not a.get("cold_lie"):
                out["honest"] = one()
            liar.on = True
            rss0 = proc.memory_info().rss
            for _ in range(a.get("requests", 3)):
                reqs.append(one())
            out["rss_mb"] = round((proc.memory_info().rss - rss0) / 2**20, 1)
            out["lied"] = reqs
            liar.on = False
            t_off = time.perf_counter()
            rec = None
            while time.perf_counter() - t_off < 12.0:
                r = one()
                if not r.get("fb") and "raised" not in r and r.get("srv", 0) > 0:
                    rec = r
                    break
                time.sleep(0.2)
            out["recovered_s"] = None if rec is None else round(time.perf_counter() - t_off, 2)
            out["after"] = rec or r
            out["wall_s"] = round(time.perf_counter() - t0, 1)
            out["scale"] = {k: round(v, 4) for k, v in c.engine.cost_model.scale.items()} \
                if hasattr(c, "engine") else None
            c.close()
    finally:
        srv.stop()
    out["log"] = sorted(set(errors.records))[:6]
    out["crashes"] = crashes
    return out


def _swallow(r, st):
    """Takes every weight and answers nothing: no acknowledgement, no output, no answer (health checks answered)."""
    if r.WhichOneof("msg") in ("weight_stored", "weights_stored", "output", "request_done", "request_progress"):
        return
    yield r


def _ack_flood_known(r, st):
    """The model's own weights acknowledged again and again (200,000 acks) after an answer."""
    yield r
    if r.WhichOneof("msg") == "request_done" and not st.get("flooded"):
        st["flooded"] = True
        shas = st["shas"]
        for _ in range(FLOOD // 1000):
            yield pb.SessionResponse(weights_stored=pb.WeightsStored(
                weights=[pb.WeightStored(sha256=shas[j % len(shas)], nbytes=1) for j in range(1000)]))


def _separate(o: pb.OpenSession) -> None:
    o.outputs_in_done = False


ATTACKS["ack-flood-known"] = dict(session=_ack_flood_known)
ATTACKS["done-before-output-separate"] = dict(session=_done_before_output, separate=True)
ATTACKS["done-twice-separate"] = dict(session=_done_twice, separate=True)
class Blackhole:
    """A data channel that takes the hello, answers ACCEPTED and never reads again (at most 8 connections; each closed
    after ``hold_s``)."""

    def __init__(self, hold_s: float = 30.0):
        import socket

        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.hold_s = hold_s
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self):
        from protos import datachannel as dc

        for _ in range(8):
            try:
                conn, _ = self.sock.accept()
            except OSError:  # closed
                return
            conn.recv(dc.HELLO.size + 64)
            conn.sendall(dc.ACCEPTED)
            t = threading.Timer(self.hold_s, conn.close)
            t.daemon = True
            t.start()


def _data_blackhole(r, st):
    if r.WhichOneof("msg") == "opened":
        if "hole" not in st:
            st["hole"] = Blackhole()
        r.opened.limits.data_port = st["hole"].port
        r.opened.data_ticket = b"\1" * 32
    yield r


ATTACKS["data-blackhole"] = dict(session=_data_blackhole, data_channel=True, from_start=True, requests=2)
def _stall(seconds):
    def f(r, st):
        time.sleep(seconds)
        return r
    return f


def _no_opened(r, st):
    if r.WhichOneof("msg") != "opened":
        yield r


ATTACKS["profile-stall-30s"] = dict(unary={"ProfileGraph": _stall(30.0)}, from_start=True, requests=1)
ATTACKS["hello-stall-30s"] = dict(unary={"Hello": _stall(30.0)}, from_start=True, requests=1)
ATTACKS["query-stall-30s"] = dict(unary={"QueryWeights": _stall(30.0)}, from_start=True, requests=1)
ATTACKS["no-opened"] = dict(session=_no_opened, from_start=True, requests=2)
ATTACKS["swallow-cold"] = dict(session=_swallow, from_start=True, requests=1)
ATTACKS["none-auto"] = dict(policy="auto")


if __name__ == "__main__":
    names = sys.argv[1:] or list(ATTACKS)
    for n in names:
        print(json.dumps(run(n)), flush=True)
