"""The validation slot's turns and the memory budget (review20 F6): a turn goes only to a validation whose working
memory fits beside the paused ones', so a validation that fits the budget alone is not refused RESOURCE_EXHAUSTED
because the turns paused another tenant's; and one that does not fit while others are paused is not starved by
new ones that do."""

import asyncio
import time

import pytest

import edge_server.profile_budget
from edge_server.errors import ResourceExhausted
from edge_server.memory import Bounds, MemoryBudget


class _Bucket:
    """A tenant's turn without a CPU budget (the turns are ``bucket.tenant``'s; ``CpuMeter`` is replaced below)."""

    budget = None

    def __init__(self, tenant: str) -> None:
        self.tenant = tenant

    def admit(self) -> None:
        pass


class _NoMeter:
    def __init__(self, *a) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        pass

    def check(self) -> None:
        pass


def _validation(checks: int, log: list, name: str, peak: list, bounds: Bounds):
    """A validation of ``checks`` check points ~2 ms of CPU apart; records the budget's reserved bytes it saw."""

    def fn(check):
        log.append(("start", name))
        for _ in range(checks):
            t = time.perf_counter()
            while time.perf_counter() - t < 0.002:
                pass
            peak[0] = max(peak[0], bounds.memory.stats().reserved_bytes)
            check()
        log.append(("end", name))
        return name

    return fn


async def _run(bounds: Bounds, jobs: list[tuple[str, int, int, float]]):
    log: list = []
    peak = [0]

    async def one(tenant, hold, checks, delay):
        await asyncio.sleep(delay)
        try:
            return await bounds.compile(_validation(checks, log, tenant, peak, bounds), _Bucket(tenant),
                                        hold_bytes=hold, holder=tenant, what=f"{tenant}'s validation")
        except ResourceExhausted as e:
            return e

    out = await asyncio.gather(*(one(*j) for j in jobs))
    return out, log, peak[0]


@pytest.fixture(autouse=True)
def _no_cpu_meter(monkeypatch):
    monkeypatch.setattr(edge_server.profile_budget, "CpuMeter", _NoMeter)


def test_a_turn_goes_only_to_a_validation_whose_working_memory_fits_beside_the_paused_ones():
    """Budget 1000 B, three tenants' validations of 450 B each (each fits alone, two fit at once). Before: alice
    yielded to bob (900 B reserved), bob yielded to carol, whose reservation (1350 B) was refused. Now bob's turn
    passes carol over (she does not fit beside alice's paused 450 B) and goes back to alice; carol runs once one of
    them has ended. All three succeed, the budget is never over, the slot ends free."""
    bounds = Bounds(MemoryBudget(1000, holder_fraction=1.0))
    out, log, peak = asyncio.run(_run(bounds, [("alice", 450, 40, 0.0), ("bob", 450, 40, 0.02),
                                               ("carol", 450, 40, 0.04)]))
    assert out == ["alice", "bob", "carol"], out
    assert peak <= 1000
    assert bounds.compile_slots.yields >= 2  # turns were still taken (alice <-> bob)
    starts = [n for k, n in log if k == "start"]
    assert starts.index("carol") > 0 and log.index(("start", "carol")) > min(log.index(("end", "alice")),
                                                                             log.index(("end", "bob")))
    assert bounds.compile_slots.idle and bounds.memory.stats().reserved_bytes == 0


def test_one_that_does_not_fit_beside_the_paused_is_not_starved_by_new_ones_that_do():
    """Budget 1000 B: alice's 900 B validation fits only alone. bob and carol's small ones (100 B) keep arriving and
    take turns; once alice is first in turn order and does not fit, only the paused ones run (they drain), and then
    she does: she succeeds before the last small one is started."""
    bounds = Bounds(MemoryBudget(1000, holder_fraction=1.0))
    jobs = [("bob", 100, 30, 0.0), ("carol", 100, 30, 0.01), ("alice", 900, 5, 0.02)]
    jobs += [("bob" if i % 2 else "carol", 100, 30, 0.03 + 0.03 * i) for i in range(10)]
    out, log, peak = asyncio.run(_run(bounds, jobs))
    assert out[2] == "alice", out
    assert not any(isinstance(o, Exception) for o in out), out
    assert peak <= 1000
    last_small_start = max(i for i, (k, n) in enumerate(log) if k == "start" and n != "alice")
    assert log.index(("end", "alice")) < last_small_start, log
    assert bounds.compile_slots.idle and bounds.memory.stats().reserved_bytes == 0


def test_a_validation_that_does_not_fit_even_alone_is_still_refused_naming_its_working_memory():
    bounds = Bounds(MemoryBudget(1000, holder_fraction=1.0))
    out, _, _ = asyncio.run(_run(bounds, [("alice", 450, 20, 0.0), ("bob", 1200, 5, 0.01)]))
    assert out[0] == "alice"
    assert isinstance(out[1], ResourceExhausted) and "bob's validation" in str(out[1]), out
    assert bounds.compile_slots.idle and bounds.memory.stats().reserved_bytes == 0
