"""The UE client keeps its long-lived objects out of Python's cyclic garbage collections (``gc.freeze``,
``ue_client.heap.freeze_gc``): frozen at construction and after the first profile, released when the last
client that froze them closes, left alone where someone else froze objects first. Real edge server on a
free port, the user's own eager module as the reference."""

from __future__ import annotations

import gc

import pytest
import torch

from ue_client import CoinferClient, new_tenant
from ue_client.cli_run import load_inputs, max_abs_diff
from ue_client.heap import freeze_gc, release_gc


def _frozen(obj) -> bool:
    """``obj`` is tracked by the collector but in none of its generations: in the permanent one."""
    assert gc.is_tracked(obj)
    return not any(o is obj for o in gc.get_objects())


@pytest.fixture(autouse=True)
def _fresh_collector(monkeypatch):
    """Each test starts with nothing frozen and no client counted (a client an earlier test left open in
    this process keeps its objects frozen: they are frozen again after the test)."""
    from ue_client import heap

    was = gc.get_freeze_count() > 0
    gc.unfreeze()
    monkeypatch.setattr(heap, "_gc_clients", 0)
    monkeypatch.setattr(heap, "_gc_owned", False)
    monkeypatch.setattr(heap, "_idle_closes", 0)
    monkeypatch.setattr(heap, "UNFREEZE_AFTER", 1)  # released at the last close (the amortised default: below)
    yield
    gc.unfreeze()
    if was:
        gc.freeze()


def test_a_client_freezes_the_model_and_releases_it_at_close():
    from modelgraph import zoo

    with CoinferClient(zoo.spec("diamond"), policy="local") as c:
        assert gc.get_freeze_count() > 1000 and _frozen(c.graph) and _frozen(c.graph.ops)
        assert _frozen(c.model.module)
        x = load_inputs("random", c.example_inputs, seed=3)
        assert max_abs_diff(c(*x), c.eager(*x)) == 0.0
        garbage = [[]]
        garbage[0].append(garbage)  # a cycle made after the freeze is still collected
        del garbage
        assert gc.collect() >= 1
    assert gc.get_freeze_count() == 0


def test_objects_stay_frozen_while_any_client_is_open():
    from modelgraph import zoo

    a = CoinferClient(zoo.spec("chain"), policy="local")
    b = CoinferClient(zoo.spec("diamond"), policy="local")
    assert _frozen(a.graph) and _frozen(b.graph)
    a.close()
    a.close()  # a second close releases nothing more
    assert gc.get_freeze_count() > 0 and _frozen(b.graph)
    b.close()
    assert gc.get_freeze_count() == 0


def test_gc_freeze_off_leaves_the_collector_alone():
    from modelgraph import zoo

    with CoinferClient(zoo.spec("diamond"), policy="local", gc_freeze=False) as c:
        assert gc.get_freeze_count() == 0
        x = load_inputs("random", c.example_inputs, seed=1)
        assert max_abs_diff(c(*x), c.eager(*x)) == 0.0
    assert gc.get_freeze_count() == 0
    with pytest.raises(ValueError, match="gc_freeze"):
        CoinferClient(zoo.spec("diamond"), policy="local", gc_freeze="yes")


def test_objects_frozen_by_someone_else_are_left_frozen():
    mine = [torch.zeros(1)]
    gc.freeze()  # e.g. a pre-fork server's
    module = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU()).eval()
    with CoinferClient(module, (torch.randn(2, 4),), policy="local") as c:  # captured after the freeze
        assert not _frozen(c.graph)  # (the count moves: frozen objects freed by reference counting leave it)
    assert gc.get_freeze_count() > 0 and _frozen(mine)
    assert freeze_gc() == 0  # neither frozen nor unfrozen by the helper
    release_gc()
    assert gc.get_freeze_count() > 0 and _frozen(mine)


def test_a_remote_client_freezes_what_its_profile_built(server):
    from modelgraph import zoo

    with CoinferClient(zoo.spec("diamond"), server=server.address, policy="auto",
                       link={"uplink_mbps": 100.0, "rtt_ms": 5.0}, tenant=new_tenant()) as c:
        x = load_inputs("random", c.example_inputs, seed=2)
        assert max_abs_diff(c(*x), c.eager(*x)) == 0.0
        costs = c.engine.cost_model.base
        assert costs is not None and _frozen(costs) and not c.engine.freeze_after_profile
        for i in range(3):
            x = load_inputs("random", c.example_inputs, seed=10 + i)
            assert max_abs_diff(c(*x), c.eager(*x)) == 0.0
    assert gc.get_freeze_count() == 0


def test_the_heap_stays_frozen_between_client_lifetimes(monkeypatch):
    """With the default ``UNFREEZE_AFTER`` a closed client's objects stay frozen, so the next client's
    construction does not collect the whole heap again; after that many closes with no client open they go
    back to the collector. Every answer equals the user's eager module."""
    from modelgraph import zoo
    from ue_client import heap

    monkeypatch.setattr(heap, "UNFREEZE_AFTER", 3)
    with CoinferClient(zoo.spec("diamond"), policy="local") as first:
        x = load_inputs("random", first.example_inputs, seed=4)
        assert max_abs_diff(first(*x), first.eager(*x)) == 0.0
        kept = first.graph
    assert gc.get_freeze_count() > 1000 and _frozen(kept)  # 1 close of 3
    with CoinferClient(zoo.spec("diamond"), policy="local") as second:
        assert _frozen(kept) and _frozen(second.graph)
        x = load_inputs("random", second.example_inputs, seed=5)
        assert max_abs_diff(second(*x), second.eager(*x)) == 0.0
    assert gc.get_freeze_count() > 0  # 2 closes of 3
    with CoinferClient(zoo.spec("chain"), policy="local"):
        pass
    assert gc.get_freeze_count() == 0  # the third close with none open: released


def test_constructions_after_the_first_do_not_walk_the_frozen_heap(monkeypatch):
    """``gc.get_freeze_count()`` walks the whole permanent generation (session 12: 49 ms of CPU for resnet50's
    frozen process at a full core, at every client construction and after every first profile in session 11).
    Once this helper owns the freeze, neither a later client's construction nor ``refreeze_gc`` asks it; the
    later client's objects are still frozen and its answers equal the user's eager module."""
    from modelgraph import zoo
    from ue_client import heap

    monkeypatch.setattr(heap, "UNFREEZE_AFTER", 3)
    with CoinferClient(zoo.spec("diamond"), policy="local") as first:
        assert gc.get_freeze_count() > 1000 and _frozen(first.graph)
    walks = []
    real = gc.get_freeze_count
    monkeypatch.setattr(gc, "get_freeze_count", lambda: walks.append(1) or real())
    with CoinferClient(zoo.spec("chain"), policy="local") as second:
        assert heap.refreeze_gc() is True
        x = load_inputs("random", second.example_inputs, seed=6)
        assert max_abs_diff(second(*x), second.eager(*x)) == 0.0
    assert walks == []
    monkeypatch.setattr(gc, "get_freeze_count", real)
    assert _frozen(second.graph)


def test_a_closed_remote_client_is_freed_by_reference_counting(server):
    """A client closed while another stays open keeps its objects frozen (``release_gc`` only releases the
    freeze when none is open), so whatever of it is cyclic garbage is never collected: session 12 counted
    ~400 objects per construction. Measured here (session 13, one client open, 25 constructions of a remote
    ``chain`` client, dads): 252 objects of cyclic garbage per construction, among them the RemoteEngine and
    everything it holds (two cycles: engine -> send_rate -> closure -> engine, and session stream -> uplink
    queue -> closure -> stream; the gRPC call's traceback -> the receiver's frame -> stream). With the
    collector off, the engine and its session must go when the last reference does."""
    import time
    import weakref

    from modelgraph import zoo

    kw = dict(server=server.address, policy="dads", link={"uplink_mbps": 400.0, "rtt_ms": 2.0}, probe=False)
    with CoinferClient(zoo.spec("diamond"), tenant=new_tenant(), **kw) as keep:
        x = load_inputs("random", keep.example_inputs, seed=7)
        assert max_abs_diff(keep(*x), keep.eager(*x)) == 0.0
        c = CoinferClient(zoo.spec("chain"), tenant=new_tenant(), **{**kw, "policy": "offload"})  # a session open
        x = load_inputs("random", c.example_inputs, seed=8)
        assert max_abs_diff(c(*x), c.eager(*x)) == 0.0
        engine, stream = weakref.ref(c.engine), weakref.ref(c.engine.conn.session)
        assert stream() is not None
        gc.disable()
        try:
            c.close()
            rx = stream()._rx
            rx.join(30)  # the session's receiver thread ends (it holds the stream while it runs)
            assert not rx.is_alive()
            del c, rx
            deadline = time.monotonic() + 30  # the gRPC call's own threads let go of it
            while (engine() is not None or stream() is not None) and time.monotonic() < deadline:
                time.sleep(0.05)
            assert engine() is None, "the closed engine is cyclic garbage (kept frozen while another client is open)"
            assert stream() is None, "the closed session stream is cyclic garbage"
        finally:
            gc.enable()
