"""Session 34's review findings, each fixed: attention with broadcast batch / heads priced as the flash kernel,
a server's out-of-memory answered as the request's data failing an op, a failed re-plan's CPU billed to its causer
once a retry planned, and the planner's per-identity totals growing by one entry per connection
(``docs/results/review/session34/``)."""

from __future__ import annotations

import pytest
import torch

from edge_server.op_budget import _sdpa_flash_ready
from edge_server.planner_budget import PlannerBudgets
from modelgraph import SliceError
from modelgraph.execute import Program
from modelgraph.tensors import TensorMeta
from ue_client import CoinferClient
from ue_client.errors import RequestFailed
from ue_client.request import op_failure


def _meta(*shape: int) -> TensorMeta:
    return TensorMeta(shape, "float32", tuple(torch.empty(shape).stride()))


@pytest.mark.parametrize(("q", "k", "ready", "torch_flash"), [
    ((8, 8, 64, 32), (8, 8, 64, 32), True, True),
    ((1, 8, 64, 32), (8, 8, 64, 32), False, False),  # broadcast batch: torch takes the math path
    ((8, 1, 64, 32), (8, 8, 64, 32), False, False),  # broadcast heads
])
def test_attention_is_flash_priced_only_where_torch_takes_the_flash_kernel(q, k, ready, torch_flash) -> None:
    metas = [_meta(*q), _meta(*k), _meta(*k)]
    assert _sdpa_flash_ready(*metas, tuple(m.stride for m in metas), 0.0) is ready
    choice = int(torch._fused_sdp_choice(torch.randn(*q), torch.randn(*k), torch.randn(*k)))
    assert (choice == 1) is torch_flash  # the budget's rule agrees with torch's own choice


class _M(torch.nn.Module):
    def forward(self, x):
        return (x * 2).relu()


def test_an_out_of_memory_inside_an_op_is_not_the_requests_data() -> None:
    with CoinferClient(_M().eval(), (torch.randn(3),)) as c:
        graph = c.graph
    prog = Program(tuple(graph.ops), frozenset(o.name for o in graph.ops), torch.device("cpu"), trusted=False)

    def oom(*a, **k):
        raise torch.OutOfMemoryError("out of memory. Tried to allocate 2.00 GiB")

    prog._fns[0] = oom
    prog._binders[0] = None
    env = {name: torch.randn(meta.shape) for name, meta in graph.inputs.items()}
    with pytest.raises(torch.OutOfMemoryError):  # to the server's RESOURCE_EXHAUSTED branch, not INVALID_ARGUMENT
        prog.run_op(0, env, {})
    with pytest.raises(SliceError):  # a kernel refusing its inputs still is the typed op error
        prog._fns[0] = lambda *a, **k: torch.empty(2)[5]
        prog.run_op(0, env, {})
    # an older server's answer wrapping the OOM as an op failure is not taken as the inputs' fault either
    def answer(message: str, code: str = "INVALID_ARGUMENT") -> RequestFailed:  # as the session receiver makes it
        return RequestFailed(f"server: code {code}: {message}", code, message)

    assert op_failure(answer("OpExecutionError: op 'mul' (aten.mul.Tensor) failed: OutOfMemoryError: out of memory")) \
        is None
    bad = "OpExecutionError: op 'embedding' (aten.embedding.default) failed: IndexError: index out of range"
    assert op_failure(answer(bad)) is not None
    assert op_failure(answer(bad, "INTERNAL")) is None  # only the status that says the request's data was at fault
    # a CPU allocator's failure is a RuntimeError (torch 2.13): the server's memory, not the request's data (break45)
    assert op_failure(answer("OpExecutionError: op 'linear' (aten.linear.default) failed: RuntimeError: [enforce fail "
                             "at alloc_cpu.cpp:127] DefaultCPUAllocator: can't allocate memory")) is None
    assert op_failure(RequestFailed(f"server rejected the slice: code INVALID_ARGUMENT: {bad}", "INVALID_ARGUMENT")) \
        is None  # a refusal of the slice (no server message of a run): not an op that ran


def test_planner_totals_forget_identities_without_sessions_or_buckets() -> None:
    b = PlannerBudgets(share=0.05, burst=2.0)
    for i in range(3000):  # one identity per connection (no --auth-tokens), each charged once, then gone
        b.charge(f"peer:127.0.0.1:{i}", 1e-6, live=frozenset({"honest"}), others={"honest": 1e-6})
    assert len(b.cpu_s) <= 4 + 64 + 1 and len(b.passive_cpu_s) <= 4 + 64 + 1
    assert "honest" in b.passive_cpu_s  # a live identity's total is kept


@pytest.mark.parametrize("retry_fails", [False, True])
def test_a_failed_replan_without_reports_is_split_by_size_even_when_its_retry_plans(retry_fails: bool) -> None:
    """A re-plan stopped at its CPU budget before any progress report, whose retry without the heavy identity's
    sessions plans: before, the whole failed attempt (5 CPU s here) went to the honest joiner's own bucket. When the
    retry fails too, the first attempt's split by size is kept (the retry's own CPU is the joiner's)."""
    from edge_server.allocation import AraShareAllocator, SessionInfo
    from edge_server.plan_process import PlannerFailed
    from partitioner import chain
    from partitioner.allocation import SubproblemCache, ara
    from partitioner.synthetic import random_dag
    from protos.values import UeProfile

    def info(sid: str, key: str, graph: str) -> SessionInfo:
        i = SessionInfo(sid, key, "m", planner_key=key)
        i.extra["profile"] = UeProfile(cost_graph_json=graph, uplink_mbps=50.0, rtt_ms=5.0)
        return i

    class FakeChild:  # ChildPlanner's interface; "fail" = stopped at its budget before any report
        def __init__(self) -> None:
            self.cpu_s, self.closed, self.fail_next, self.cache = 0.0, False, 0, SubproblemCache()

        def __call__(self, problems, *, policy="mjoa", max_rounds=10, policy_options=None, frozen=frozenset()):
            if self.fail_next:
                self.fail_next -= 1
                self.cpu_s += 5.0
                raise PlannerFailed("a plan used 5.00 CPU s, over its budget", over_limit=True)
            self.cpu_s += 0.01
            return ara(problems, policy=policy, max_rounds=max_rounds, policy_options=policy_options,
                       cache=self.cache, frozen=frozen)

        def close(self) -> None:
            self.closed = True

    alloc = AraShareAllocator(policy="neurosurgeon", background=False, planner="inline")
    fake = FakeChild()
    alloc.child = fake
    alloc._ara.planner = fake
    alloc.on_join(info("big", "att", random_dag(1, 120, "random").to_json()))
    own0, pas0 = dict(alloc.plan_cpu_s), dict(alloc.passive_cpu_s)
    fake.fail_next = 2 if retry_fails else 1
    alloc.on_join(info("hon", "hon", chain([(3.0, 0.3, 20_000, 400_000)] * 10, input_bytes=60_000).to_json()))
    honest = alloc.plan_cpu_s.get("hon", 0.0) - own0.get("hon", 0.0)
    passive = alloc.passive_cpu_s.get("att", 0.0) - pas0.get("att", 0.0)
    assert alloc.dropped_heavy == 1
    assert passive > 3.0, (honest, passive)
    assert honest < (7.0 if retry_fails else 2.0), (honest, passive)
