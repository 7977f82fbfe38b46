"""The device engine's parts on their own: the options value (one type per option, validated), the
bounded capture cache, and the receiver thread's weight ack racing the caller's detach."""

from __future__ import annotations

import math
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
    bad = [dict(policy="fastest"), dict(timeout_ms=0), dict(deadline_ms=0), dict(deadline_slack_ms=-1.0),
           dict(threads=0), dict(policy="robust"), dict(eps=0.0), dict(eps=1.0), dict(uplink_cv=-0.1),
           dict(frequency="cpufreq"), dict(horizon=0), dict(chunk_bytes=1), dict(backoff_s=(2.0, 1.0)),
           dict(ue_slowdown=0.5),
           dict(send_cpu=1e-9), dict(server_ops=5), dict(link={"uplink_mbps": 1.0}), dict(tenant=""),
           dict(refresh_s=-1.0), dict(uplink_cv=math.inf), dict(cell_uplink_mbps=math.inf)]
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


# ---- how long a split request waits (ue_client.deadline) --------------------------------------------------
def _replay(rule, samples, finish_at=None, alive=None, start=0.0):
    """Run ``deadline.wait`` on recorded (time s, progress counters) samples with a virtual clock:
    the counters at a time are those of the latest sample at or before it; the wait is entered at ``start``
    (the request's time before it: its UE part). Returns (finished, time)."""
    from ue_client import deadline

    t = [start]

    def done(timeout_s: float) -> bool:
        if finish_at is not None and t[0] + timeout_s >= finish_at:
            t[0] = finish_at
            return True
        t[0] += timeout_s
        return False

    def progress():
        return [c for ts, c in samples if ts <= t[0]][-1]

    def reading(timeout_s: float) -> bool:  # a health check answered after alive[0] s, or never
        if not alive:
            t[0] += timeout_s
            return False
        t[0] += alive.pop(0)
        return True

    ok = deadline.wait(rule, done, progress, lambda: t[0], None if alive is None else reading)
    return ok, t[0]


def test_patience_waits_while_the_request_progresses():
    from ue_client.deadline import Patience

    rule = Patience(expected_s=0.1, stall_s=0.5)
    # a cold upload 20x slower than predicted: a needed weight's bytes go out steadily for 2 s
    moving = [(k * 0.05, (2_000_000 - k * 50_000, 0, 0, 0)) for k in range(41)]
    assert _replay(rule, moving, finish_at=2.2) == (True, 2.2)
    # the same upload stalls at 1 s: given up one to two stall windows later, not at 2.2 s
    stalled = [s for s in moving if s[0] <= 1.0]
    ok, t = _replay(rule, stalled, finish_at=2.2)
    assert not ok and 1.0 + rule.stall_s <= t <= 1.0 + 2 * rule.stall_s + 1e-9, t
    # nothing ever moves: given up one stall window after the start (it is past the expected time then)
    assert _replay(rule, [(0.0, (5, 0, 0, 0))]) == (False, pytest.approx(0.5))
    late = Patience(expected_s=1.0, stall_s=0.2)  # ... and never before the expected time
    assert _replay(late, [(0.0, (5, 0, 0, 0))]) == (False, pytest.approx(1.0))
    # counters frozen (the last byte left, no ack yet) but the server still reads: two answered health
    # checks (0.1 s each) keep the request waiting until it finishes at 1.4 s; unanswered, it is given up
    frozen = [(0.0, (0, 0, 0, 0))]
    assert _replay(rule, frozen, finish_at=1.4, alive=[0.1, 0.1]) == (True, 1.4)
    assert _replay(rule, frozen, finish_at=1.4, alive=[]) == (False, pytest.approx(1.0))
    # an explicit deadline is hard, progress or not
    hard = Patience(expected_s=0.3, stall_s=0.0, hard_s=0.3)
    assert _replay(hard, moving, finish_at=2.2) == (False, pytest.approx(0.3))
    assert rule.give_up(0.09, 0.0) is False and rule.give_up(0.61, 0.1) is True


def test_patience_counts_the_silence_from_the_wait_not_from_the_request_start():
    """A UE part that ran past the expected time (a loaded UE: session 22's CI) is not a silent server: the wait
    entered at 3 s gives the server a whole stall window from there (it was given up at once, 3 s of 'silence'
    counted from the request's start), and still gives up one window later when nothing comes."""
    from ue_client.deadline import Patience

    rule = Patience(expected_s=1.0, stall_s=0.5)
    quiet = [(0.0, (0, 0, 100, 0))]
    assert _replay(rule, quiet, finish_at=3.4, start=3.0) == (True, 3.4)
    assert _replay(rule, quiet, start=3.0) == (False, pytest.approx(3.5))


def test_patience_from_the_prediction_spread():
    from ue_client import deadline

    g = ue_model.prepare_model(zoo.spec("chain")).graph
    from partitioner.costgraph import chain as cchain

    costs = cchain([(10.0, 2.0, 1000, 1000)] * len(g.ops), input_bytes=1000)
    names = [o.name for o in costs.ops]
    split = type("S", (), {"ue_order": names[:2], "server_order": names[2:]})()
    sigma = deadline.prediction_sigma_ms(costs, split, 100.0)
    assert sigma >= deadline.REL_SPREAD * 100.0
    r = deadline.patience(costs, split, 100.0, share=0.5, min_stall_ms=50.0, deadline_ms=None)
    assert r.expected_s == pytest.approx((100.0 + deadline.Z * sigma) / 1e3)
    server_ms = sum(o.server_ms for o in costs.ops[2:]) / 0.5
    assert r.stall_s == pytest.approx(max(0.05, (deadline.COMPUTE_STALL_FACTOR * server_ms + deadline.Z * sigma) / 1e3))
    assert deadline.patience(costs, split, 100.0, share=1.0, min_stall_ms=50.0, deadline_ms=300.0).hard_s == 0.3


def test_late_but_progressing_request_does_not_fall_back():
    """A cold split whose link estimate is 250x too optimistic (override 1000 Mbps, real 4 Mbps): the
    needed weights take ~4 s to upload against a prediction of tens of ms. The old bare rule
    (max(4 x predicted, predicted + 1 s)) gave up and computed locally; now the request waits while its
    bytes keep going out and completes on the server."""
    from testbed.linkemu import emulated_link

    g = ue_model.prepare_model("torchvision:resnet18").graph
    k = next(i for i, op in enumerate(g.ops) if op.layer.startswith("fc"))
    with ServerThread(threads=1) as srv, emulated_link("127.0.0.1", srv.port, uplink_mbps=4, rtt_ms=10) as relay, \
            CoinferClient("torchvision:resnet18", server=f"127.0.0.1:{relay}", tenant=new_tenant(), probe=False,
                          link={"uplink_mbps": 1000.0, "rtt_ms": 1.0}, server_ops=k, data_channel=False) as c:
        x = c.example_inputs
        y = c(*x)
        rep = c.last_report
        assert max_abs_diff(y, c.reference(*x)) == 0.0
        assert not rep.fallback, rep.fallback_reason
        assert rep.server_ops == len(g.ops) - k
        # the scenario: at 4 Mbps the needed bytes alone outlast the old rule's wait (on a machine so loaded
        # that the UE's own part is predicted at seconds, the old rule would have waited long enough too)
        if rep.needed_upload_bytes * 8 / 4e6 <= max(4 * rep.predicted_ms, rep.predicted_ms + 1000.0) / 1e3:
            pytest.skip(f"predicted {rep.predicted_ms:.0f} ms under this load: the old rule would not give up")



def test_transport_residual_keeps_an_uncalibrated_prefix_time():
    """The UE's time on a split request counts toward the transport residual unless the UE's cost scale
    learns it: with 0 UE ops (quick bench, 10 % UE: 10-30 ms of begin message and hand-offs) no other
    term would predict it, and warm requests were predicted 16 % short."""
    from types import SimpleNamespace

    from ue_client import planning
    from ue_client.request import transport_residual

    choice = planning.PlanChoice("mjoa", frozenset({"a"}), predicted_ms=100.0, warm_ms=100.0, serial_ms=100.0,
                                 details={"transport_ms": 5.0})
    t = SimpleNamespace(compute_ms=30.0, queue_ms=2.0)
    # a real prefix (profiled 40 ms): its measured and predicted UE times leave both sides
    assert transport_residual(150.0, choice, 50.0, 40.0, 40.0, 35.0, t) == pytest.approx((68.0, 20.0))
    # no prefix (profiled 0): the 19 ms the UE spent stays in the measured side, the plan's 0 in the predicted
    assert transport_residual(150.0, choice, 19.0, 0.0, 0.0, 35.0, t) == pytest.approx((118.0, 60.0))


def test_transport_residual_skips_uploads_and_new_slices():
    """The transport residual learns from warm requests on a slice the server has validated: a request
    that uploaded weights (its error is the upload's; a cold request's residual rode on the warm
    predictions after it) or defined its slice (the server's validation is outside its timings) teaches
    none. Every answered split request reports its prediction's parts."""
    tenant = new_tenant()
    with ServerThread(threads=1) as srv:
        with CoinferClient(zoo.spec("chain"), server=srv.address, policy="offload", link=FAST, tenant=tenant,
                           probe=False) as cold:
            x = torch.randn(*cold.model.example_inputs[0].shape)
            cold(x)
            assert cold.last_report.uploaded_weight_bytes > 0 and cold.last_report.server_ops > 0
            assert cold.engine.cost_model.transport_residuals == []
        # the same tenant: the weights are held, the new session's first request only defines its slice
        with CoinferClient(zoo.spec("chain"), server=srv.address, policy="offload", link=FAST, tenant=tenant,
                           probe=False) as c:
            c(x)
            cm = c.engine.cost_model
            rep = c.last_report
            assert rep.uploaded_weight_bytes == 0 and rep.server_ops > 0
            assert cm.transport_residuals == []
            assert 0.0 <= rep.predicted_parts["validation_ms"] < rep.measured_ms
            c(x)
            rep = c.last_report
            assert len(cm.transport_residuals) == 1 and "validation_ms" not in rep.predicted_parts
            assert set(rep.predicted_parts) == {"ue_ms", "server_ms", "transport_ms", "setup_ms"}
            assert rep.predicted_parts["setup_ms"] >= 0.0


def test_given_costs_are_planned_as_given_whatever_the_ue_slowdown():
    """``ClientOptions.costs`` describes the device as it runs, ``ue_slowdown`` included (what
    ``engine.costs`` of a client with that slowdown reports, e.g. the testbed's first stream's graph handed
    to the next streams): ``ue_slowdown`` slows the runs and a profile taken here (``measure_costs``), never
    a given graph. Before, the docstring said the given graph was "without slowdown", which would have
    scaled it a second time."""
    with ServerThread() as srv:
        kw = dict(server=srv.address, policy="dads", link=FAST, probe=False, send_cpu=UeCpu(1e-6))
        with CoinferClient(zoo.spec("chain"), tenant=new_tenant(), **kw) as c0:
            c0(*c0.example_inputs)
            g = c0.engine.cost_model.base
        assert g is not None and sum(op.ue_ms for op in g.ops) > 0
        predicted = {}
        for slowdown in (1.0, 4.0):
            with CoinferClient(zoo.spec("chain"), tenant=new_tenant(), costs=g, ue_slowdown=slowdown, **kw) as c:
                assert c.engine.costs.to_dict() == g.to_dict()
                c(*c.example_inputs)
                predicted[slowdown] = c.last_report.predicted_ms
        assert predicted[4.0] == pytest.approx(predicted[1.0]) and predicted[1.0] > 0
