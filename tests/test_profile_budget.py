"""The per-tenant ProfileGraph CPU budget (issue 11: what one tenant's profiling may cost the others).

Unit tests of the token bucket (a fake clock), then a real server on port 0 with authenticated tenants:
a tenant over its budget is stopped and then refused before its spec is decoded, while another tenant's
ProfileGraph and session requests run; the budget refills.
"""

from __future__ import annotations

import functools
import json
import math
import os
import time
from collections import Counter

import grpc
import pytest
import torch

from edge_server.attacks import Victim
from edge_server.auth import AuthConfigError, Quota
from edge_server.config import MiB, ServerConfig
from edge_server.profile_budget import ANONYMOUS, BudgetLimits, ProfileBudget, ProfileBudgetExceeded
from edge_server.testing import ServerThread
from protos.coinfer.v1 import coinfer_pb2 as pb
from protos.coinfer.v1 import coinfer_pb2_grpc as pb_grpc
from tests.test_server_bounds import chain

TIMEOUT = 60
TOKENS = {"greedy": "greedy-token-0123", "victim": "victim-token-4567"}


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def test_bucket_admits_charges_stops_and_refills() -> None:
    clock = Clock()
    b = ProfileBudget(lambda t: BudgetLimits(1.0, 0.5), clock)
    b.admit("a")  # full: 1 CPU s
    b.charge("a", 0.75)
    b.check("a")  # 0.25 left: a run goes on
    b.admit("a")
    b.charge("a", 0.5)  # -0.25: in debt
    with pytest.raises(ProfileBudgetExceeded, match="stopped") as stopped:
        b.check("a")
    assert stopped.value.code == "RESOURCE_EXHAUSTED"
    with pytest.raises(ProfileBudgetExceeded, match=r"refused.*retry in 0\.5 s") as refused:
        b.admit("a")
    assert refused.value.retry_after_s == pytest.approx(0.25 / 0.5, abs=0.01)
    b.admit("b")  # another tenant's bucket is its own
    clock.t += 0.4  # +0.2: still -0.05
    with pytest.raises(ProfileBudgetExceeded):
        b.admit("a")
    clock.t += 0.2  # +0.1: 0.05
    b.admit("a")
    clock.t += 100  # refills up to the capacity, no further
    assert b.balance("a") == pytest.approx(1.0)
    assert (b.refused, b.stopped) == (2, 1)
    assert b.charged_s["a"] == pytest.approx(1.25)


def test_zero_capacity_means_no_budget() -> None:
    b = ProfileBudget(lambda t: BudgetLimits(0.0, 0.1), Clock())
    b.charge("a", 1e6)
    b.admit("a")
    b.check("a")
    assert b.balance("a") == float("inf")


def test_quota_keys_are_parsed_and_checked() -> None:
    q = Quota.from_dict({"profile_cpu_s": 2.5, "profile_cpu_share": 0.05}, "t")
    assert (q.profile_cpu_s, q.profile_cpu_share) == (2.5, 0.05)
    assert Quota.from_dict({}, "t").profile_cpu_s is None  # the server's default
    with pytest.raises(AuthConfigError, match=r"quota profile_cpu_share must be a number in \[1e-06, 1000\]"):
        Quota.from_dict({"profile_cpu_share": 0}, "t")


BUCKET_S = 0.02
"""Tenant greedy's ProfileGraph budget in these tests (CPU s)."""
OVERRUN = 5
"""How many buckets the profile meant to overrun one costs (sized by a measurement on this machine)."""
SHAPE = (256, 4096)
"""Each relu of the sized chains: 4 MiB (its compute outweighs the per-op overhead of validation and
profiling)."""


@functools.cache
def _op_run_cpu_s(shape: tuple[int, int], iterations: int, threads: int) -> float:
    cfg = ServerConfig(cache_bytes=32 * MiB, staging_bytes=16 * MiB, profile_cpu_s=0)  # no budget: runs to the end
    with ServerThread(config=cfg) as srv, grpc.insecure_channel(srv.address) as ch:
        stub = pb_grpc.EdgeServiceStub(ch)
        charged = srv.runtime.profile_budget.charged_s
        n = 10
        runs = []
        for k in range(3):  # the first warms the worker (its intra-op threads start)
            body = chain(n + k, shape=shape)  # another slice each time: never a cache hit
            c0 = charged.get(ANONYMOUS, 0.0)
            stub.ProfileGraph(pb.ProfileGraphRequest(slice_spec_json=body, iterations=iterations), timeout=TIMEOUT)
            runs.append((charged[ANONYMOUS] - c0) / ((n + k) * (iterations + srv.runtime.config.profile_warmup)))
        return min(runs[1:])


def op_run_cpu_s(shape: tuple[int, int] = SHAPE, iterations: int = 50) -> float:
    """CPU seconds a ProfileGraph of a relu chain is charged per op and iteration (warmup included) on a
    server in this process, with the process's torch intra-op threads now: measured on a server without a
    budget (validation and profiling overhead included; the less of two runs). The tests size their
    workloads from it: a relu of 64x1024 cost ~0.3 ms of CPU on the CPU these tests were first sized on,
    7 us on an EPYC with AVX-512 and one intra-op thread (session 8), and whether an earlier test left
    torch at one thread or more changes it several-fold."""
    return _op_run_cpu_s(tuple(shape), iterations, torch.get_num_threads())


def sized_chain(cpu_s: float, shape: tuple[int, int] = SHAPE, iterations: int = 50, at_least: int = 2) -> bytes:
    """A chain of relus of ``shape`` whose ProfileGraph run of ``iterations`` costs at least about ``cpu_s``
    CPU seconds here (:func:`op_run_cpu_s`), at least ``at_least`` ops."""
    n = math.ceil(cpu_s / (op_run_cpu_s(shape, iterations) * (iterations + ServerConfig().profile_warmup)))
    return chain(max(at_least, n), shape=shape)


def long_profile() -> bytes:
    """A profile (50 iterations) that costs ``OVERRUN`` times greedy's bucket of ``BUCKET_S`` CPU s."""
    return sized_chain(OVERRUN * BUCKET_S)


def budget_server(tmp_path, rate: float) -> ServerThread:
    """A server whose tenant ``greedy`` has ``BUCKET_S`` CPU s of ProfileGraph budget refilled at ``rate``."""
    p = tmp_path / "tokens.json"
    quota = {"profile_cpu_s": BUCKET_S, "profile_cpu_share": rate}
    doc = {"tenants": {"greedy": {"token": TOKENS["greedy"], "quota": quota}, "victim": {"token": TOKENS["victim"]}}}
    p.write_text(json.dumps(doc))
    return ServerThread(config=ServerConfig(cache_bytes=32 * MiB, staging_bytes=16 * MiB, auth_tokens_file=str(p)))


def profile(srv, tenant: str, body: bytes, iterations: int = 50) -> pb.ProfileGraphResponse:
    with grpc.insecure_channel(srv.address) as ch:
        return pb_grpc.EdgeServiceStub(ch).ProfileGraph(
            pb.ProfileGraphRequest(slice_spec_json=body, iterations=iterations),
            timeout=TIMEOUT,
            metadata=(("authorization", f"Bearer {TOKENS[tenant]}"),),
        )


def test_over_budget_tenant_is_stopped_then_refused_while_others_run(tmp_path) -> None:
    with budget_server(tmp_path, 1e-4) as srv:
        over_budget_then_others(srv)


def over_budget_then_others(srv: ServerThread) -> None:
    budget = srv.runtime.profile_budget
    body = long_profile()
    # a profile that costs more than the whole bucket stops at a step boundary once it is spent
    with pytest.raises(grpc.RpcError) as e:
        profile(srv, "greedy", body)
    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "ProfileGraph stopped" in e.value.details() and "tenant 'greedy'" in e.value.details()
    assert budget.stopped == 1
    assert budget.balance("greedy") < 0  # in debt by the last step's overrun (refilled at 1e-4 CPU s per s)
    spent = budget.charged_s["greedy"]
    assert spent > BUCKET_S
    misses = srv.runtime.profiles.misses
    # the next call is refused before its spec is decoded: nothing charged, nothing validated; even
    # garbage that would be INVALID_ARGUMENT is refused for the budget first
    for garbage in (body, b"{not json"):
        with pytest.raises(grpc.RpcError) as e:
            profile(srv, "greedy", garbage)
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "ProfileGraph refused" in e.value.details() and "retry in" in e.value.details()
    assert budget.charged_s["greedy"] == spent
    assert srv.runtime.profiles.misses == misses
    assert budget.refused == 2
    # another tenant profiles the same slice to the end and its session's requests run exactly
    r = profile(srv, "victim", body)
    assert len(r.ops) == body.count(b'"aten.relu.default"') and not r.cached
    assert budget.charged_s["victim"] > BUCKET_S  # what greedy's call would have cost: more than its bucket
    lat = Victim(srv.address, token=TOKENS["victim"]).run(3)
    assert len(lat) == 3

    async def snapshot():
        return srv.runtime.metrics_snapshot()

    snap = srv.call(snapshot())  # what the Prometheus collector exports per tenant
    assert snap["profile_refused"] == {"greedy": 2.0, "victim": 0.0}
    assert snap["profile_cpu_seconds"]["greedy"] == spent


def test_budget_refills_at_its_rate(tmp_path) -> None:
    # once more on a fresh server when the charge bound missed: a CI run at 3 workers on 2 cores charged one admitted
    # call 0.4 s (session 33, 1 of 4 runs; 3 of 3 alone); a real overcharge fails both times
    for attempt in range(2):
        d = tmp_path / str(attempt)
        d.mkdir()
        try:
            with budget_server(d, 0.05) as srv:
                refills(srv)
            return
        except AssertionError:
            if attempt:
                raise


def refills(srv: ServerThread) -> None:
    """A tenant that keeps asking gets in again as its bucket refills, and over the whole time it is
    charged at most the bucket + the refill + one validation and one step per call admitted."""
    budget = srv.runtime.profile_budget
    body = long_profile()
    t0 = time.monotonic()
    codes = []
    while time.monotonic() - t0 < 2.0:
        try:
            profile(srv, "greedy", body)
            codes.append("OK")
        except grpc.RpcError as e:
            assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, e
            codes.append("stopped" if "ProfileGraph stopped" in e.details() else "refused")
        time.sleep(0.01)
    elapsed = time.monotonic() - t0
    admitted = codes.count("stopped") + codes.count("OK")
    assert codes[0] == "stopped" and codes.count("refused") >= 1
    assert admitted >= 2, codes  # refilled at 0.05 CPU s per s: the debt of one step is repaid in < 0.2 s
    assert budget.charged_s["greedy"] <= BUCKET_S + 0.05 * elapsed + admitted * 0.05, (budget.charged_s, codes)


def test_anonymous_callers_share_one_bucket() -> None:
    cfg = ServerConfig(cache_bytes=32 * MiB, staging_bytes=16 * MiB, profile_cpu_s=BUCKET_S, profile_cpu_share=1e-4)
    body = long_profile()
    with ServerThread(config=cfg) as srv:
        with grpc.insecure_channel(srv.address) as ch:
            stub = pb_grpc.EdgeServiceStub(ch)
            with pytest.raises(grpc.RpcError) as e:
                stub.ProfileGraph(pb.ProfileGraphRequest(slice_spec_json=body, iterations=50), timeout=TIMEOUT)
            assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "anonymous ProfileGraph callers" in e.value.details()
            with pytest.raises(grpc.RpcError) as e:
                stub.ProfileGraph(pb.ProfileGraphRequest(slice_spec_json=chain(2), iterations=1), timeout=TIMEOUT)
            assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        # sessions are not ProfileGraph: they still run
        assert len(Victim(srv.address).run(2)) == 2


def _compute_thread_names() -> Counter:
    names = Counter()
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/comm") as f:
                names[f.read().strip()] += 1
        except OSError:
            pass
    return Counter({k: v for k, v in names.items() if k.startswith("coinfer-cw")})


def test_a_profile_is_charged_the_cpu_of_its_intra_op_threads() -> None:
    """A server with 2 torch intra-op threads: an op that parallelizes runs half on the compute worker's
    OpenMP team, which ``time.thread_time`` of the worker does not count (before: 0.037 CPU s charged of
    0.074 s of process CPU for the same profile). Now the ProfileGraph budget is charged the worker's and
    its team's CPU: at least 0.75 of this process's CPU over the calls (the rest: the client, the event
    loop, gRPC) and no more than all of it."""
    old = torch.get_num_threads()
    cfg = ServerConfig(cache_bytes=32 * MiB, staging_bytes=16 * MiB, threads=2, profile_cpu_s=0)
    try:
        with ServerThread(config=cfg) as srv, grpc.insecure_channel(srv.address) as ch:
            stub = pb_grpc.EdgeServiceStub(ch)
            charged = srv.runtime.profile_budget.charged_s

            def call(n: int) -> None:
                stub.ProfileGraph(
                    pb.ProfileGraphRequest(slice_spec_json=chain(n, shape=(256, 1024)), iterations=50), timeout=TIMEOUT
                )

            call(4)  # the worker's team starts
            assert max(_compute_thread_names().values()) >= 2, "the worker's ops ran on one thread: nothing to test"
            got = cpu = 0.0
            n = 20
            while cpu < 0.3 and n < 60:  # a few tenths of a CPU second: the client's share stays small
                n += 1  # another slice: no cache hit
                c0, p0 = charged.get(ANONYMOUS, 0.0), time.process_time()
                call(n)
                cpu += time.process_time() - p0
                got += charged[ANONYMOUS] - c0
            assert 0.75 * cpu <= got <= cpu + 1e-3, (got, cpu)
    finally:
        torch.set_num_threads(old)


@pytest.mark.parametrize("workers", [0, pytest.param(1, marks=pytest.mark.slow)], ids=["in-process", "sandbox"])
def test_the_profile_cache_answers_only_the_tenant_that_profiled(tmp_path, workers) -> None:
    """Tenants a and b (no group) and lab1, lab2 (group lab). a profiles a slice; b's identical call is
    not answered from a's entry (a cached answer costs nothing and comes back at once: it told b that
    another tenant had profiled that slice): it runs, and b's budget is charged. a's repeat is a hit; the
    same slice with another warmup is not (the key holds warmup in process too); lab2 is answered from
    lab1's entry (a group the operator declared shares, as weights do). In the server process and with one
    profiling child (slow: the child imports torch)."""
    tokens = {t: f"{t}-token-0123456" for t in ("a", "b", "lab1", "lab2")}
    p = tmp_path / "tokens.json"
    p.write_text(
        json.dumps({"tenants": {t: {"token": tok} for t, tok in tokens.items()}, "groups": {"lab": ["lab1", "lab2"]}})
    )
    cfg = ServerConfig(cache_bytes=32 * MiB, staging_bytes=16 * MiB, auth_tokens_file=str(p), profile_workers=workers)
    body = chain(20, shape=(8, 64))
    with ServerThread(config=cfg) as srv, grpc.insecure_channel(srv.address) as ch:
        stub = pb_grpc.EdgeServiceStub(ch)
        cache, budget = srv.runtime.profiles, srv.runtime.profile_budget

        def call(tenant: str, warmup: int = 1) -> bool:
            r = stub.ProfileGraph(
                pb.ProfileGraphRequest(slice_spec_json=body, iterations=3, warmup=warmup),
                timeout=TIMEOUT,
                metadata=(("authorization", f"Bearer {tokens[tenant]}"),),
            )
            assert len(r.ops) == 20
            return r.cached

        assert not call("a")
        hits = cache.hits
        assert not call("b")  # its own run: not a's entry
        assert cache.hits == hits and budget.charged_s["b"] > 0
        assert call("a") and cache.hits == hits + 1  # a's own entry
        assert not call("a", warmup=2)  # another warmup: another answer
        assert not call("lab1") and call("lab2")  # one group: one entry

        def stats(tenant: str) -> tuple[int, int]:
            s = stub.Stats(
                pb.StatsRequest(), timeout=TIMEOUT, metadata=(("authorization", f"Bearer {tokens[tenant]}"),)
            )
            return s.profile_cache_hits, s.profile_cache_misses

        # each tenant's Stats count its own calls (its group's), not whether others' calls hit
        assert (stats("a"), stats("b"), stats("lab1")) == ((1, 2), (0, 1), (1, 1))
