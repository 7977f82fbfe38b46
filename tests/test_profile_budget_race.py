"""Concurrent ProfileGraph calls racing one tenant's CPU budget (``edge_server.profile_budget``).

Validations run one at a time server-wide (``Bounds.compile``); a call admitted while the bucket still
held CPU time but queued behind the others' validations must not validate once the bucket is spent:
else a tenant with any budget left fires N large specs at once and all N are validated and charged
(N CPU seconds of GIL-bound work for 20k-op specs, everybody else's slice validations waiting behind
them). A real server on port 0 with authenticated tenants, real gRPC clients.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

from edge_server.config import MiB, ServerConfig
from edge_server.testing import ServerThread
from protos.coinfer.v1 import coinfer_pb2 as pb
from protos.coinfer.v1 import coinfer_pb2_grpc as pb_grpc
from tests.test_server_bounds import chain

TOKENS = {"greedy": "greedy-token-0123", "victim": "victim-token-4567"}


@pytest.mark.parametrize("workers", [0, pytest.param(1, marks=pytest.mark.slow)], ids=["in-process", "sandbox"])
def test_calls_queued_behind_a_validation_are_refused_once_the_budget_is_spent(tmp_path, workers) -> None:
    """Tenant greedy (0.01 CPU s, refilled at 1e-4 CPU s per s) sends 4 ProfileGraph calls at once, each
    a different 1500-op slice (a validation costs well over the bucket): the first validates and spends
    the bucket; at most one more may slip in beside it; the rest are refused RESOURCE_EXHAUSTED without
    being validated, and the tenant is charged at most two validations. Tenant victim still profiles. Both
    in the server process and with one profiling child (``--profile-workers 1``: calls queue for it; slow,
    ~15 s: the child imports torch)."""
    p = tmp_path / "tokens.json"
    quota = {"profile_cpu_s": 0.01, "profile_cpu_share": 1e-4}
    doc = {"tenants": {"greedy": {"token": TOKENS["greedy"], "quota": quota}, "victim": {"token": TOKENS["victim"]}}}
    p.write_text(json.dumps(doc))
    cfg = ServerConfig(cache_bytes=32 * MiB, staging_bytes=16 * MiB, auth_tokens_file=str(p), profile_workers=workers)
    n = 4
    bodies = [chain(1500 + i) for i in range(n)]
    with ServerThread(config=cfg) as srv, grpc.insecure_channel(srv.address) as ch:
        stub = pb_grpc.EdgeServiceStub(ch)

        def call(body: bytes, tenant: str = "greedy") -> str:
            try:
                stub.ProfileGraph(
                    pb.ProfileGraphRequest(slice_spec_json=body, iterations=1),
                    timeout=120,
                    metadata=(("authorization", f"Bearer {TOKENS[tenant]}"),),
                )
                return "OK"
            except grpc.RpcError as e:
                if e.code() == grpc.StatusCode.FAILED_PRECONDITION:  # stopped past the whole budget (session 19's
                    assert "can never pass under this budget" in e.details(), e.details()  # BudgetTooSmall: a
                    return "stopped"  # validation that costs more than the bucket, caught at a budget check)
                assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, (e.code(), e.details())
                return "refused" if "ProfileGraph refused" in e.details() else "stopped"

        with ThreadPoolExecutor(n) as pool:
            outcomes = list(pool.map(call, bodies))
        budget = srv.runtime.profile_budget
        validated = n - outcomes.count("refused")
        assert validated <= 2, outcomes
        assert outcomes.count("refused") >= n - 2
        one = budget.charged_s["greedy"] / validated
        assert one > 0.01  # a validation costs more than the whole bucket (else the test shows nothing)
        assert call(chain(5), "victim") == "OK"


@pytest.mark.parametrize("key", ["profile_cpu_s", "profile_cpu_share", "compute_weight"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_quota_numbers_are_refused(key: str, value: float) -> None:
    """A tokens file is JSON, and Python's JSON reader takes NaN and Infinity: a NaN profile_cpu_s made a
    bucket that never admits, a NaN compute_weight NaN shares of the cell. The file is refused instead."""
    from edge_server.auth import AuthConfigError, Quota

    doc = json.loads(json.dumps({key: value}))  # as the tokens file reader sees it
    with pytest.raises(AuthConfigError, match=f"quota {key} must be (0 .*or )?a number in"):
        Quota.from_dict(doc, "t")
