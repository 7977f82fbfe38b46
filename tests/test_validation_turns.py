"""The validation slot's turns and the memory budget (review20 F6): a turn goes only to a validation whose working
memory fits beside the paused ones', so a validation that fits the budget alone is not refused RESOURCE_EXHAUSTED
because the turns paused another tenant's; a small one goes past a big one waiting for room (an honest tenant's
small slice is not held behind attackers' big ones), and the big one's wait for room is bounded (``room_wait_s``)."""

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
        finally:
            log.append(("answer", tenant))

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


def test_a_small_validation_goes_past_a_big_one_waiting_for_room():
    """Budget 1000 B: bob's and carol's 450 B validations take turns (both in progress); alice's 900 B one fits only
    alone and waits for room; dave's 50 B one, come after her, fits beside the paused and runs in its turn, ending
    before bob's and carol's (it waited behind alice until they drained: bound20 measured an honest tenant's small
    ProfileGraph 11-15 s behind attackers' big ones). alice runs once they end."""
    bounds = Bounds(MemoryBudget(1000, holder_fraction=1.0))
    out, log, peak = asyncio.run(_run(bounds, [("bob", 450, 60, 0.0), ("carol", 450, 60, 0.01),
                                               ("alice", 900, 5, 0.03), ("dave", 50, 5, 0.05)]))
    assert out == ["bob", "carol", "alice", "dave"], out
    assert peak <= 1000
    assert log.index(("end", "dave")) < min(log.index(("end", "bob")), log.index(("end", "carol"))), log
    assert log.index(("start", "alice")) > max(log.index(("end", "bob")), log.index(("end", "carol"))), log
    assert bounds.compile_slots.idle and bounds.memory.stats().reserved_bytes == 0


def test_a_big_validations_wait_for_room_is_bounded():
    """Small validations (100 B) of two tenants keep coming for ~1 s (every 20 ms), always one paused; alice's
    950 B one never finds room beside them (without a bound she waited until the last had started). With
    ``room_wait_s`` 0.1 s, after it each of bob and carol passes her once more, then the paused drain and she runs
    (not refused: nothing else holds memory then), long before the last small one starts."""
    bounds = Bounds(MemoryBudget(1000, holder_fraction=1.0))
    bounds.compile_slots.room_wait_s = 0.1
    jobs = [("bob", 100, 30, 0.0), ("carol", 100, 30, 0.01), ("alice", 950, 5, 0.02)]
    jobs += [("bob" if i % 2 else "carol", 100, 30, 0.03 + 0.02 * i) for i in range(50)]
    out, log, peak = asyncio.run(_run(bounds, jobs))
    assert out[2] == "alice", out
    assert not any(isinstance(o, Exception) for o in out), out
    assert peak <= 1000
    last_small_start = max(i for i, (k, n) in enumerate(log) if k == "start" and n != "alice")
    assert log.index(("answer", "alice")) < last_small_start, log
    assert bounds.compile_slots.idle and bounds.memory.stats().reserved_bytes == 0


def test_under_sustained_load_no_validation_that_fits_alone_is_refused():
    """review20b F3: bob's and carol's 400 B validations keep coming (one-client cap 500 B of a 1000 B budget: each
    fits alone, two at once), alice's 450 B one comes six times. When a wait for room ran out the turn was handed over
    whether it fitted or not, and the others' memory refused it (39 of 120 of bob's and carol's, room_wait_s 0.2 s).
    Now no validation that fits alone is refused, and alice runs every time."""
    bounds = Bounds(MemoryBudget(1000, holder_fraction=0.5))
    bounds.compile_slots.room_wait_s = 0.1
    jobs = [("bob" if i % 2 else "carol", 400, 20, 0.02 * i) for i in range(50)]
    jobs += [("alice", 450, 5, 0.05 + 0.2 * k) for k in range(6)]
    out, _, peak = asyncio.run(_run(bounds, jobs))
    assert not [o for o in out if isinstance(o, Exception)], out
    assert out[50:] == ["alice"] * 6
    assert peak <= 1000
    assert bounds.compile_slots.idle and bounds.memory.stats().reserved_bytes == 0


def test_a_validation_that_does_not_fit_even_alone_is_still_refused_naming_its_working_memory():
    bounds = Bounds(MemoryBudget(1000, holder_fraction=1.0))
    out, _, _ = asyncio.run(_run(bounds, [("alice", 450, 20, 0.0), ("bob", 1200, 5, 0.01)]))
    assert out[0] == "alice"
    assert isinstance(out[1], ResourceExhausted) and "bob's validation" in str(out[1]), out
    assert bounds.compile_slots.idle and bounds.memory.stats().reserved_bytes == 0
