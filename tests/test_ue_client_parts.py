"""The device engine's parts on their own: the options value (one type per option, validated), the
bounded capture cache, and the receiver thread's weight ack racing the caller's detach."""

from __future__ import annotations

import threading
from dataclasses import FrozenInstanceError

import pytest
import torch

from edge_server.testing import ServerThread
from modelgraph import zoo
from partitioner import Link
from partitioner.uecpu import UeCpu
from ue_client import ClientOptions, CoinferClient, InputError, LinkOverride, new_tenant, wire
from ue_client import model as ue_model
from ue_client.cli_run import max_abs_diff
from ue_client.options import DEFAULTS

FAST = {"uplink_mbps": 400.0, "rtt_ms": 2.0}


def test_options_are_frozen_and_validated():
    o = ClientOptions()
    with pytest.raises(FrozenInstanceError):
        o.policy = "local"
    bad = [dict(policy="fastest"), dict(deadline_ms=0), dict(deadline_factor=-1.0), dict(threads=0),
           dict(horizon=0), dict(chunk_bytes=1), dict(backoff_s=(2.0, 1.0)), dict(ue_slowdown=0.5),
           dict(send_cpu=1e-9), dict(server_ops=5), dict(link={"uplink_mbps": 1.0}), dict(tenant=""),
           dict(refresh_s=-1.0)]
    for kw in bad:
        with pytest.raises(InputError):
            ClientOptions(**kw)
    assert ClientOptions(send_cpu=UeCpu(1e-6)).send_cpu == UeCpu(1e-6)


def test_build_converts_the_loose_forms_once():
    g = ue_model.prepare_model(zoo.spec("chain")).graph
    want = LinkOverride(uplink_mbps=10.0, rtt_ms=5.0)
    for link in ({"uplink_mbps": 10.0, "rtt_ms": 5.0}, (10.0, 5.0), want):
        assert ClientOptions.build(g, link=link).link == want
    assert ClientOptions.build(g, link=Link(10.0, 20.0, 5.0)).link == LinkOverride(10.0, 20.0, 5.0)
    k = len(g.ops) // 2
    by_pos = ClientOptions.build(g, server_ops=k).server_ops
    assert by_pos == frozenset(op.name for op in g.ops[k:])
    assert ClientOptions.build(g, server_ops=[op.name for op in g.ops[k:]]).server_ops == by_pos
    with pytest.raises(InputError, match="unknown ops"):  # a PartitionError from the graph, as the user's error
        ClientOptions.build(g, server_ops=["no-such-op"])
    with pytest.raises(InputError, match="not closed under successors"):
        ClientOptions.build(g, server_ops=[g.ops[0].name])
    with pytest.raises(InputError, match="unknown client option"):
        ClientOptions.build(g, deadline=3)
    with pytest.raises(InputError, match="unknown link keys"):
        ClientOptions.build(g, link={"uplink": 3})
    base = ClientOptions(tenant="t1", horizon=3)
    assert ClientOptions.build(g, base, policy="local") == ClientOptions(tenant="t1", horizon=3, policy="local")
    # the client reads the same defaults as the CLI
    c = CoinferClient(zoo.spec("chain"))
    assert c.options == DEFAULTS and c.policy == DEFAULTS.policy


def test_capture_cache_is_bounded(monkeypatch):
    monkeypatch.setattr(ue_model, "CAPTURE_CACHE_SIZE", 2)
    monkeypatch.setattr(ue_model, "_CAPTURED", type(ue_model._CAPTURED)())
    shapes = [(1, 3, 32, 32), (2, 3, 32, 32), (3, 3, 32, 32)]
    first = ue_model.prepare_model(zoo.spec("chain"), (torch.randn(shapes[0]),))
    assert ue_model.prepare_model(zoo.spec("chain"), (torch.randn(shapes[0]),)) is first  # a hit
    for s in shapes[1:]:
        ue_model.prepare_model(zoo.spec("chain"), (torch.randn(s),))
    assert len(ue_model._CAPTURED) == 2
    assert ue_model.prepare_model(zoo.spec("chain"), (torch.randn(shapes[0]),)) is not first  # evicted (LRU)


def test_weight_ack_racing_detach():
    """The receiver thread delivers a weight ack while the caller's thread detaches the session (here:
    ``close``). The old engine checked its session reference, then dereferenced it again; a detach in
    between raised AttributeError on the receiver thread (reproduced with this interleaving). The hook
    lands the detach at that point: on any read of the connection's session reference from the
    receiver thread, the caller detaches before the read returns."""
    with ServerThread(threads=1) as srv, CoinferClient(zoo.spec("chain"), server=srv.address, policy="offload",
                                                      link=FAST, tenant=new_tenant(), probe=False) as c:
        eng = c.engine
        eng.connect()
        holder = eng.conn                         # the object holding the session reference
        on_ack = holder.session._on_weight_ack    # what the session's receiver thread calls
        want_detach, detached = threading.Event(), threading.Event()
        rx: dict = {}

        class Hooked(type(holder)):
            @property
            def session(self):
                v = self.__dict__["session"]
                if threading.current_thread() is rx.get("t") and not want_detach.is_set():
                    want_detach.set()             # the receiver thread is at the race point: detach now
                    detached.wait(10)
                return v

            @session.setter
            def session(self, v):
                self.__dict__["session"] = v

        holder.__class__ = Hooked
        errors: list[BaseException] = []
        ack = wire.WeightAck("0" * 64, 1, False)

        def deliver():
            try:
                on_ack(ack, 0.0)
            except Exception as e:  # reported by the assert below
                errors.append(e)

        rx["t"] = t = threading.Thread(target=deliver)
        t.start()
        if want_detach.wait(0.5):
            eng.close()
        detached.set()
        t.join(10)
        assert not errors, errors
        eng.close()                               # the detach happens in any case
        assert holder.session is None
        # the ack reached the caller's side, and a late ack of a detached session changes no estimate
        assert eng.weight_acks == [ack]
        assert eng.uploads.take_busy_mark() is None
        # the client still works: the next request opens a new session and offloads
        x = c.example_inputs
        assert max_abs_diff(c(*x), c.reference(*x)) == 0.0
        assert not c.last_report.fallback and c.last_report.server_ops > 0
