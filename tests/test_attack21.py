"""Session 21's attacker (bound21): the server-wide reading slots against colluding tenants, and what an operator
sees of them on /metrics. Real servers on port 0 with real grpc clients, and the gate itself. Each test failed
before its fix (stated per test)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time

import grpc
import pytest

from edge_server.calls import CallGate
from edge_server.config import MiB, ServerConfig
from edge_server.errors import DeadlineExceeded
from edge_server.testing import ServerThread
from protos.coinfer.v1 import coinfer_pb2 as pb
from protos.coinfer.v1 import coinfer_pb2_grpc as pbg

TENANTS = {name: f"{name}-secret-21x" for name in ("alice", "bob", "carol", "dave", "erin")}


def _md(name: str):
    return (("authorization", f"Bearer {TENANTS[name]}"),)


def _server(tmp_path, **config) -> ServerThread:
    path = tmp_path / "tokens.json"
    path.write_text(json.dumps({"tenants": {n: {"token": t} for n, t in TENANTS.items()}}))
    config = {"cache_bytes": 16 * MiB, "staging_bytes": 16 * MiB, "threads": 1, **config}
    cfg = ServerConfig(auth_tokens_file=str(path), **config)
    return ServerThread(config=cfg)


class _Silent:
    """Session calls that send no message (until :meth:`stop`), each on its own thread; ``codes`` / ``details``
    hold how each ended (None while it runs or when cancelled by the test)."""

    def __init__(self, channel: grpc.Channel, owners: list[str]) -> None:
        self._stop = threading.Event()
        self.calls = [pbg.EdgeServiceStub(channel).Session(self._nothing(), timeout=30, metadata=_md(o))
                      for o in owners]
        self.codes: list = [None] * len(owners)
        self.details: list = [""] * len(owners)
        self._threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(len(owners))]
        for t in self._threads:
            t.start()

    def _nothing(self):
        self._stop.wait(30)
        return
        yield

    def _run(self, i: int) -> None:
        try:
            next(self.calls[i], None)
        except grpc.RpcError as e:
            if not self._stop.is_set():
                self.codes[i], self.details[i] = e.code(), e.details()

    def stop(self) -> None:
        self._stop.set()
        for c in self.calls:
            c.cancel()
        for t in self._threads:
            t.join(10)


def _until(cond, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert cond()


def test_two_colluding_tenants_holding_all_reading_slots_give_one_to_a_third(tmp_path):
    """Session 20's tester (2): alice and bob hold 2 of 4 slots each with silent Session calls; carol's Hello waited
    ``first_message_s`` and was ended DEADLINE_EXCEEDED "no first message" (here: past its 3 s timeout). Now a key
    holding more than its share (4 slots / 3 keys -> 1) loses its oldest slot once it held it ``reading_grace_s``:
    carol is answered, one silent call is ended UNAVAILABLE saying why."""
    with _server(tmp_path, max_reading_bytes=32 * MiB, first_message_s=8.0, reading_grace_s=0.3) as srv, \
            grpc.insecure_channel(srv.address) as att, grpc.insecure_channel(srv.address) as honest:
        gate = srv.runtime.calls
        assert gate.server_reading == 4
        silent = _Silent(att, ["alice", "alice", "bob", "bob"])
        try:
            _until(lambda: gate.reading_held() == {"tenant:alice": 2, "tenant:bob": 2})
            t0 = time.monotonic()
            stub = pbg.EdgeServiceStub(honest)
            assert stub.Hello(pb.HelloRequest(client_version="c"), metadata=_md("carol"), timeout=6).server_version
            assert time.monotonic() - t0 < 4.0  # before: past first_message_s (8 s)
            _until(lambda: sum(c is not None for c in silent.codes) == 1)
            ended = [i for i, c in enumerate(silent.codes) if c is not None]
            assert silent.codes[ended[0]] == grpc.StatusCode.UNAVAILABLE
            assert "reading slot was given to another caller" in silent.details[ended[0]]
            assert "retry" in silent.details[ended[0]]
            assert gate.taken_back == 1
            # the others keep theirs: each key now holds no more than... its share once carol is gone (2)
            time.sleep(0.5)
            assert sum(c is not None for c in silent.codes) == 1
        finally:
            silent.stop()
        _until(lambda: gate.server_free == 4 and not gate.reading_held())


def test_a_call_that_waited_for_a_reading_slot_is_told_so(tmp_path):
    """One slot (``--max-reading-mb 8``): alice's silent call holds it (at her share: never taken back), bob's waits
    first and gets it at alice's deadline, with a deadline of its own from then; erin's Hello waits for a slot
    until its ``first_message_s`` and is ended UNAVAILABLE, "waited 2 s for one of the server's 1 reading slots ...
    retry". Before, the message said "no first message" (DEADLINE_EXCEEDED) whenever a waiter's deadline came (the
    race below); here, before, bob's call kept the slot only to its own start's deadline and erin was served (the
    deadline anew from the grant is what a call that waited needs to send: a 4 MiB message at 1 Mbit/s is 32 s)."""
    with _server(tmp_path, max_reading_bytes=8 * MiB, first_message_s=2.0, reading_grace_s=0.1) as srv, \
            grpc.insecure_channel(srv.address) as att, grpc.insecure_channel(srv.address) as honest:
        gate = srv.runtime.calls
        assert gate.server_reading == 1
        silent = _Silent(att, ["alice"])
        try:
            _until(lambda: gate.reading_held() == {"tenant:alice": 1})
            silent2 = _Silent(att, ["bob"])
            try:
                _until(lambda: gate.reading_queued() == {"tenant:bob": 1})
                t0 = time.monotonic()
                with pytest.raises(grpc.RpcError) as e:
                    pbg.EdgeServiceStub(honest).Hello(pb.HelloRequest(client_version="e"), metadata=_md("erin"),
                                                      timeout=10)
                assert 1.5 < time.monotonic() - t0 < 5
                assert e.value.code() == grpc.StatusCode.UNAVAILABLE, e.value.details()
                assert "waited 2 s for one of the server's 1 reading slots" in e.value.details()
                assert "held by 1 other caller(s)" in e.value.details() and "retry" in e.value.details()
                assert gate.slot_timeouts == 1 and gate.taken_back == 0
                assert gate.reading_held() == {"tenant:bob": 1}  # bob's call got alice's slot at her deadline
                _until(lambda: silent.codes[0] is not None)  # (its client thread may see the end a bit later)
                assert silent.codes[0] == grpc.StatusCode.DEADLINE_EXCEEDED
                assert "it held a reading slot for the last" in silent.details[0]
            finally:
                silent2.stop()
        finally:
            silent.stop()


def test_a_slow_sender_within_its_share_keeps_its_slot_while_others_wait():
    """An honest slow uplink (one first message taking long) is never ended for another caller while its key
    holds no more than its share; with one slot (``--max-reading-mb`` under 16) the holder keeps it and the other
    waits (and is told why at its deadline, above)."""

    async def run(slots: int):
        gate = CallGate(server_reading=slots, reading_grace_s=0.05, first_message_s=0)
        holders = [gate.enter(f"tenant:h{i}") for i in range(slots)]
        for c in holders:
            assert await gate.reading(c)
        waiter = gate.enter("tenant:new")
        w = asyncio.ensure_future(gate.reading(waiter))
        await asyncio.sleep(0.3)
        assert not w.done() and all(c.reason is None for c in holders) and gate.taken_back == 0
        gate.server_read_done(holders[0])  # its message arrived
        assert await asyncio.wait_for(w, 1.0)
        for c in (*holders, waiter):
            gate.leave(c)
        assert gate.server_free == slots

    asyncio.run(run(1))
    asyncio.run(run(4))


def test_a_free_slot_goes_to_the_key_holding_fewest():
    """A newcomer holding nothing goes before older waiting calls of a key that holds slots. (Session 20's per-key
    share semaphore gave the same order here, so this passed before; it guards the new grant order.)"""

    async def run():
        gate = CallGate(server_reading=4, reading_grace_s=-1)
        bob = [gate.enter("tenant:bob") for _ in range(3)]
        alice = [gate.enter("tenant:alice") for _ in range(2)]
        for c in (*bob[:2], *alice):
            assert await gate.reading(c)
        bob_waits = asyncio.ensure_future(gate.reading(bob[2]))
        await asyncio.sleep(0.01)
        carol = gate.enter("tenant:carol")
        carol_waits = asyncio.ensure_future(gate.reading(carol))
        await asyncio.sleep(0.01)
        gate.server_read_done(alice[0])
        await asyncio.wait_for(carol_waits, 1.0)
        assert not bob_waits.done()
        bob_waits.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await bob_waits
        for c in (*bob, *alice, carol):
            gate.leave(c)
        assert gate.server_free == 4 and not gate.reading_held() and not gate.reading_queued()

    asyncio.run(run())


def test_taking_back_waits_for_the_grace_and_ends_the_newest_over_share():
    """The gate alone: alice and bob hold 2 each, longer than ``reading_grace_s``, then carol waits: nothing is
    ended before ``reading_grace_s`` after carol began to wait; then exactly one call, the newest of those beyond
    their key's share (the one with the least of its message received), is ended UNAVAILABLE and carol gets its slot
    (review21b finding 4: the oldest was ended 0.01 s after a newcomer began to wait)."""

    async def run():
        gate = CallGate(server_reading=4, reading_grace_s=0.3, first_message_s=0)

        async def hold(key):
            call = gate.enter(key)
            try:
                await gate.reading(call)
                await asyncio.sleep(60)
            finally:
                gate.leave(call)

        tasks = [asyncio.ensure_future(hold(k)) for k in ("tenant:alice", "tenant:bob", "tenant:alice",
                                                             "tenant:bob")]
        await asyncio.sleep(0.05)
        assert gate.reading_held() == {"tenant:alice": 2, "tenant:bob": 2}
        await asyncio.sleep(0.4)  # every holder past its grace before anyone waits
        carol = gate.enter("tenant:carol")
        w = asyncio.ensure_future(gate.reading(carol))
        await asyncio.sleep(0.15)
        assert not w.done() and not any(t.done() for t in tasks)
        await asyncio.wait_for(w, 2.0)
        await asyncio.sleep(0.05)
        assert [t.done() for t in tasks] == [False, False, False, True]  # bob's second, the newest
        assert gate.taken_back == 1
        for t in tasks:
            t.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.gather(*tasks)
        gate.leave(carol)
        assert gate.server_free == 4 and not gate.reading_held()

    asyncio.run(run())


def test_a_call_whose_deadline_falls_with_the_holders_gets_the_slot():
    """Session 20's tester (2), the race: a waiter whose deadline falls in the same sweep as the slot's holder
    (they started within a millisecond) was ended DEADLINE_EXCEEDED "no first message" with the holder. Now the
    holder's slot goes on as it is ended and the waiter's deadline counts from the grant: it holds the slot."""

    async def run():
        gate = CallGate(server_reading=1, first_message_s=1.0)
        calls = {}

        async def silent(name):
            call = calls[name] = gate.enter(f"tenant:{name}")
            try:
                await gate.reading(call)
                await asyncio.sleep(60)
            finally:
                gate.leave(call)

        tasks = [asyncio.ensure_future(silent(n)) for n in ("alice", "bob")]
        await asyncio.sleep(1.4)
        assert tasks[0].done() and isinstance(calls["alice"].reason, DeadlineExceeded)
        assert not tasks[1].done() and calls["bob"].reason is None and calls["bob"].server_reading
        for _ in range(300):  # bob's own deadline, 1 s from its grant
            if tasks[1].done():
                break
            await asyncio.sleep(0.01)
        assert tasks[1].done() and "held a reading slot" in str(calls["bob"].reason)
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.gather(*tasks)
        assert gate.server_free == 1

    asyncio.run(run())


def _scrape(port: int) -> dict[str, float]:
    import urllib.request

    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    out = {}
    for line in text.splitlines():
        if line.startswith("coinfer_"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def test_metrics_show_reading_slots_calls_and_the_memory_budget(tmp_path):
    """Session 20's tester (3): /metrics showed no memory-budget reservations, reading slots or validation queue.
    After a known sequence (alice and bob hold 2 + 2 of 4 slots with silent Session calls, carol's Hello takes one
    back, a reservation held for a tenant and one for an address), the scrape's values are exact; after, the
    per-tenant series are gone and the counters stay. Before: none of these series existed."""
    with _server(tmp_path, max_reading_bytes=32 * MiB, first_message_s=20.0, reading_grace_s=0.2,
                 metrics_port=0) as srv, grpc.insecure_channel(srv.address) as att, \
            grpc.insecure_channel(srv.address) as honest:
        port = srv.server.metrics_server.server_port
        gate, mem = srv.runtime.calls, srv.runtime.memory
        m = _scrape(port)
        assert m["coinfer_reading_slots"] == 4 and m["coinfer_reading_slots_free"] == 4
        assert m["coinfer_memory_budget_bytes"] == mem.limit_bytes
        assert m["coinfer_memory_reserved_total_bytes"] == 0 and m["coinfer_reading_slots_taken_back_total"] == 0
        assert not [k for k in m if k.startswith(("coinfer_reading_slots_held{", "coinfer_memory_reserved_bytes{"))]
        assert (m["coinfer_validations_running"], m["coinfer_validations_paused"],
                m["coinfer_validations_waiting"]) == (0, 0, 0)
        silent = _Silent(att, ["alice", "alice", "bob", "bob"])
        try:
            _until(lambda: gate.reading_held() == {"tenant:alice": 2, "tenant:bob": 2})
            m = _scrape(port)
            assert m['coinfer_reading_slots_held{tenant="alice"}'] == 2
            assert m['coinfer_reading_slots_held{tenant="bob"}'] == 2
            assert m['coinfer_calls_open{tenant="alice"}'] == 2 and m['coinfer_calls_open{tenant="bob"}'] == 2
            assert m["coinfer_reading_slots_free"] == 0
            assert pbg.EdgeServiceStub(honest).Hello(pb.HelloRequest(client_version="c"), metadata=_md("carol"),
                                                     timeout=10).server_version
            _until(lambda: sum(c is not None for c in silent.codes) == 1)
            _until(lambda: gate.open_calls() == 3)
            m = _scrape(port)
            assert m["coinfer_reading_slots_taken_back_total"] == 1
            assert m['coinfer_rpc_errors_total{code="UNAVAILABLE",method="Session"}'] == 1
            assert sorted((m['coinfer_reading_slots_held{tenant="alice"}'],
                           m['coinfer_reading_slots_held{tenant="bob"}'])) == [1, 2]
            assert m["coinfer_reading_slots_free"] == 1
            with mem.reserve("carol", 3 * MiB, "a test's hold"), mem.reserve("peer:10.0.0.1", 1000, "x"), \
                    mem.reserve("peer:10.0.0.2", 24, "y"):
                m = _scrape(port)
                assert m['coinfer_memory_reserved_bytes{tenant="carol"}'] == 3 * MiB
                assert m['coinfer_memory_reserved_bytes{tenant="(address)"}'] == 1024
                # + the three silent calls' receive windows, held until their first message (review21b finding 1)
                assert gate.window_bytes > 0
                assert m["coinfer_memory_reserved_total_bytes"] == 3 * MiB + 1024 + 3 * gate.window_bytes
        finally:
            silent.stop()
        _until(lambda: gate.open_calls() == 0 and gate.server_free == 4)
        m = _scrape(port)
        assert m["coinfer_reading_slots_free"] == 4 and m["coinfer_memory_reserved_total_bytes"] == 0
        assert m["coinfer_reading_slots_taken_back_total"] == 1 and m["coinfer_reading_slot_timeouts_total"] == 0
        assert not [k for k in m if k.startswith(("coinfer_reading_slots_held{", "coinfer_memory_reserved_bytes{",
                                                  "coinfer_calls_open{"))]


def test_tenant_labels_are_bounded():
    """Callers without a token are summed under one label; past the cap the smallest values are summed."""
    from edge_server.metrics import ADDRESS_LABEL, OTHER_LABEL, by_tenant

    assert by_tenant({"tenant:a": 2, "peer:1.2.3.4": 1, "peer:5.6.7.8": 3, "b": 5}) == {"a": 2, ADDRESS_LABEL: 4,
                                                                                          "b": 5}
    many = {f"tenant:t{i:03d}": i for i in range(1, 201)}
    got = by_tenant(many, cap=50)
    assert len(got) == 50 and got["t200"] == 200 and "t151" not in got
    assert got[OTHER_LABEL] == sum(range(1, 152))


def test_reading_slots_are_sized_from_the_memory_budget_by_default():
    """Task 2 (session 21): ``--max-reading-mb`` was off by default and 64 tenants' requests received at once took
    the default ``--memory-mb 1024`` server over its budget (+791-876 MiB against 722). Unset, it is now one slot
    per 160 MiB of the budget for work in flight (2 to 8, none under 2); set, as given (0: off)."""
    from edge_server.sizing import reading_slots

    cfg = ServerConfig(memory_bytes=1024 * MiB, cache_bytes=16 * MiB, staging_bytes=16 * MiB)
    assert cfg.max_reading_bytes is None
    assert reading_slots(cfg, 722 * MiB) == 4
    assert reading_slots(cfg, 4096 * MiB) == 8
    assert reading_slots(cfg, 300 * MiB) == 0  # one slot would let any one silent call hold every read
    assert reading_slots(ServerConfig(cache_bytes=16 * MiB), 722 * MiB) == 0  # no --memory-mb: no budget to keep
    assert reading_slots(ServerConfig(memory_bytes=1024 * MiB, cache_bytes=16 * MiB, max_calls_per_caller=0),
                         722 * MiB) == 0  # the slots live in the call gate
    assert reading_slots(ServerConfig(memory_bytes=1024 * MiB, cache_bytes=16 * MiB, max_reading_bytes=0),
                         722 * MiB) == 0
    assert reading_slots(ServerConfig(memory_bytes=1024 * MiB, cache_bytes=16 * MiB,
                                      max_reading_bytes=16 * MiB), 722 * MiB) == 2


def test_a_server_under_a_memory_cap_reads_in_slots_with_a_read_window(tmp_path, monkeypatch):
    """A server under ``memory_bytes`` reads in server-wide slots by default, taken off its budget, with grpc's BDP
    probing off and each stream's receive window at ``read_window_bytes`` (``grpc.http2.lookahead_bytes``: with
    grpc's initial 64 KiB, a 46 MB upload at 400 Mbit/s, 40 ms RTT took 2.8-3.1x as long); without a cap, neither.
    Before: no slots by default, and with them the 64 KiB window."""
    import psutil

    import edge_server.server as server_mod
    from edge_server.calls import RECEIVE_COPIES

    seen: list[list] = []
    real = server_mod.grpc.aio.server

    def recording(*a, **kw):
        seen.append(list(kw.get("options") or []))
        return real(*a, **kw)

    monkeypatch.setattr(server_mod.grpc.aio, "server", recording)
    rss = psutil.Process().memory_info().rss
    with _server(tmp_path, memory_bytes=rss + 1024 * MiB) as srv:
        rt = srv.runtime
        assert rt.reading_slots >= 4 and rt.calls.server_reading == rt.reading_slots and rt.reads_bounded
        cfg = rt.config
        left = cfg.memory_bytes - cfg.cache_bytes - cfg.staging_bytes - rt.memory.limit_bytes
        assert left >= rt.reading_slots * cfg.max_message_bytes * RECEIVE_COPIES  # the slots are off the budget
        stub = pbg.EdgeServiceStub(grpc.insecure_channel(srv.address))
        assert stub.Hello(pb.HelloRequest(client_version="x" * (300 << 10)), metadata=_md("alice"),
                          timeout=10).server_version
    assert ("grpc.http2.bdp_probe", 0) in seen[-1] and ("grpc.http2.lookahead_bytes", 1 << 20) in seen[-1]
    with _server(tmp_path) as srv:
        assert srv.runtime.reading_slots == 0 and not srv.runtime.reads_bounded
    assert not [o for o in seen[-1] if o[0] in ("grpc.http2.bdp_probe", "grpc.http2.lookahead_bytes")]
