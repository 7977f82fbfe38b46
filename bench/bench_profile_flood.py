"""A victim's offloaded request while other sessions flood the edge server with profile updates.

N attacker sessions (each its own tenant) send ``SessionRequest.profile`` updates carrying a 10k-op cost
graph (2 MB, the default ``max_cost_graph_ops``) back to back (5 ms apart); a victim ``CoinferClient``
offloads ``modelgraph.zoo:chain`` (~1 ms of compute) and times its requests before and during the flood.
Server, victim and attackers run in one process (``edge_server.testing.ServerThread``): the numbers are
relative (before / during, one allocator against the other), not a deployment's.

Under ARA an honest UE (tenant ``honest``, its own connection, a 20-op graph) also opens a session and
sends ``--updates`` profile updates during the flood: its re-plan delay is the time from the allocator
taking its join / update (``on_join`` / ``on_profile``) to the end of that plan (``_apply_job``), measured
by wrapping those methods (the same script measures an older server on PYTHONPATH).

``python bench/bench_profile_flood.py [--attackers 3] [--allocator equal|ara] [--requests 15] [--updates 2]
[--planner child|inline] [--plan-nice K] [--json PATH]`` (``--planner``: ARA's plans in a child process,
the default, or on the server's planner thread; ``--plan-nice``: the child's added niceness).
Run it under the bench lock (``flock /work/wt/.bench.lock``): it measures latency.
"""

from __future__ import annotations

import argparse
import json
import statistics
import threading
import time

import grpc

from edge_server.allocation import AraShareAllocator
from edge_server.testing import ServerThread
from modelgraph import zoo
from partitioner import chain
from protos.coinfer.v1 import coinfer_pb2 as pb
from protos.coinfer.v1 import coinfer_pb2_grpc as pb_grpc
from ue_client import CoinferClient, new_tenant


def _connection(address: str) -> grpc.Channel:
    """A channel on its own TCP connection (gRPC shares one among a process's channels of equal arguments;
    each attacker and the honest UE are separate UEs, each its own peer)."""
    return grpc.insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1),
                                                   ("grpc.max_send_message_length", 64 << 20)])


def _attacker(address: str, i: int, graph: bytes, stop: threading.Event, sent: list[int]) -> None:
    ch = _connection(address)
    stub = pb_grpc.EdgeServiceStub(ch)

    def msgs():
        prof = pb.UeProfile(cost_graph_json=graph, uplink_mbps=20.0 + i, rtt_ms=5.0)
        yield pb.SessionRequest(open=pb.OpenSession(tenant=f"flood{i}", model_id="m", profile=prof))
        k = 0
        while not stop.is_set():
            k += 1
            yield pb.SessionRequest(profile=pb.UeProfile(cost_graph_json=graph, uplink_mbps=20.0 + k % 50, rtt_ms=5.0))
            sent[0] += 1
            time.sleep(0.005)
        yield pb.SessionRequest(close=pb.CloseSession())

    try:
        for _ in stub.Session(msgs(), timeout=300):
            pass
    except grpc.RpcError as e:
        print(f"attacker {i}: {e.code().name}: {e.details()[:120]}")
    finally:
        ch.close()


class _ReplanClock:
    """Seconds from an allocator taking a join or profile update of a session of tenant ``tenant`` to the
    end of its plan (wraps ``on_join``, ``on_profile`` and ``_apply_job``; coalesced updates count from
    the first)."""

    def __init__(self, alloc, tenant: str) -> None:
        self.sids: set[str] = set()
        self.queued: dict[str, float] = {}
        self.delays: list[tuple[str, float]] = []
        on_join, on_profile, apply = alloc.on_join, alloc.on_profile, alloc._apply_job

        def _on_join(info):
            if info.tenant == tenant and info.extra.get("profile") is not None:
                self.sids.add(info.session_id)
                self.queued.setdefault(info.session_id, time.monotonic())
            return on_join(info)

        def _on_profile(sid, profile, hold=None):
            if sid in self.sids:
                self.queued.setdefault(sid, time.monotonic())
            return on_profile(sid, profile, hold)

        def _apply(job):
            kind, sid, _ = job
            try:
                return apply(job)
            finally:
                if kind in ("join", "profile") and sid in self.queued:
                    self.delays.append((kind, time.monotonic() - self.queued.pop(sid)))

        alloc.on_join, alloc.on_profile, alloc._apply_job = _on_join, _on_profile, _apply

    def wait(self, n: int, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while len(self.delays) < n and time.monotonic() < deadline:
            time.sleep(0.05)
        return len(self.delays) >= n


def _honest(address: str, updates: int, clock: _ReplanClock, out: dict) -> None:
    """An honest UE's session during the flood: open with a 20-op graph, then ``updates`` profile
    updates, each sent once the previous one was planned (or 60 s passed)."""
    from ue_client import wire
    from ue_client.session import SessionStream

    graph = chain([(4.0, 1.0, 40_000, 20_000)] * 20, input_bytes=4_000).to_json()
    ch = _connection(address)
    try:
        s = SessionStream(wire.stub(ch), "honest", "m", profile=wire.UeProfile(graph, 20.0, 5.0))
        out["joined"] = clock.wait(1, 60.0)
        for k in range(updates):
            s.update_profile(wire.UeProfile(graph, 30.0 + 10 * k, 5.0))
            out[f"update{k}"] = clock.wait(2 + k, 60.0)
        s.close()
    except Exception as e:  # reported, the victim's numbers still count
        out["error"] = f"{type(e).__name__}: {e}"
    finally:
        ch.close()


def _latencies(client: CoinferClient, n: int) -> list[float]:
    x = client.example_inputs
    out = []
    for _ in range(n):
        t = time.perf_counter()
        client(*x)
        out.append((time.perf_counter() - t) * 1e3)
    return out


def _summary(ms: list[float]) -> dict[str, float]:
    return {"median_ms": statistics.median(ms), "p95_ms": sorted(ms)[int(0.95 * (len(ms) - 1))], "max_ms": max(ms)}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--attackers", type=int, default=3)
    ap.add_argument("--allocator", choices=("equal", "ara"), default="equal")
    ap.add_argument("--requests", type=int, default=15)
    ap.add_argument("--updates", type=int, default=2, help="the honest UE's profile updates (ARA only)")
    ap.add_argument("--planner", choices=("child", "inline"), default="child",
                    help="ARA's plans in a child process or on the server's planner thread")
    ap.add_argument("--plan-nice", type=int, default=None, help="the planner child's added niceness")
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    graph = chain([(40.0, 2.0, 4_000, 200_000)] * 9_999, input_bytes=4_000).to_json()
    graph = graph.encode() if isinstance(graph, str) else graph
    kw_ara = {} if a.planner == "child" and a.plan_nice is None else {"planner": a.planner}
    if a.plan_nice is not None:
        kw_ara["plan_nice"] = a.plan_nice
    alloc = AraShareAllocator(**kw_ara) if a.allocator == "ara" else None
    clock = _ReplanClock(alloc, "honest") if alloc is not None else None
    honest: dict = {}
    kw = {"allocator": alloc} if alloc is not None else {}
    stop, sent = threading.Event(), [0]
    with ServerThread(threads=1, cache_mb=128, **kw) as srv:
        client = CoinferClient(zoo.spec("chain"), server=srv.address, policy="offload",
                               link={"uplink_mbps": 400.0, "rtt_ms": 2.0}, tenant=new_tenant())
        _latencies(client, 3)
        base = _latencies(client, a.requests)
        threads = [threading.Thread(target=_attacker, args=(srv.address, i, graph, stop, sent))
                   for i in range(a.attackers)]
        for t in threads:
            t.start()
        time.sleep(2.0)
        ht = None
        if clock is not None:
            ht = threading.Thread(target=_honest, args=(srv.address, a.updates, clock, honest))
            ht.start()
        under = _latencies(client, a.requests)
        if ht is not None:
            ht.join()
        stop.set()
        for t in threads:
            t.join()
        fallbacks = sum(r.fallback for r in client.reports[-a.requests:])
        client.close()
    result = {"attackers": a.attackers, "allocator": a.allocator, "planner": a.planner, "plan_nice": a.plan_nice,
              "graph_bytes": len(graph),
              "updates_sent": sent[0], "before": _summary(base), "during": _summary(under),
              "fallbacks_during": fallbacks, "during_ms": under}
    if alloc is not None:  # (getattr: the same script measures an older server on PYTHONPATH)
        result["ara"] = {"replans": alloc.replans, "deferred": getattr(alloc, "deferred", None),
                         "plan_cpu_s": getattr(alloc, "plan_cpu_s", None), "bounded": getattr(alloc, "bounded", None),
                         "failed_plans": getattr(alloc, "failed_plans", None),
                         "child_cpu_s": getattr(getattr(alloc, "child", None), "cpu_s", None)}
        result["honest_replans"] = {"delays_s": clock.delays, "done": honest}
    print(f"{'phase':<8} {'median ms':>10} {'p95 ms':>8} {'max ms':>8}")
    for phase in ("before", "during"):
        s = result[phase]
        print(f"{phase:<8} {s['median_ms']:>10.1f} {s['p95_ms']:>8.1f} {s['max_ms']:>8.1f}")
    print(f"{a.attackers} attackers ({a.allocator}), {sent[0]} updates of {len(graph)} B; "
          f"victim fallbacks during: {fallbacks}")
    if "ara" in result:
        print(f"ARA: {result['ara']}")
        print("honest UE's re-plan delays (s): " + ", ".join(f"{k} {d:.2f}" for k, d in clock.delays)
              + f" {honest}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
