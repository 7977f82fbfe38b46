"""Session 16's cuts of the plan's CPU inside a request (issue 12: planning <= 5 % of a request on a 10 % UE) keep
the answers they replace: ``UploadScheduler.server_state`` built with set operations equals the per-weight
definition (shared weights, acknowledgements from the connect-time query and from the session, weights in
flight), and once every weight is held it is the same frozenset each time; ``DecisionCache._target_held`` from the
target's weights equals ``planning.target_held``; a real client's first request takes the decision planned while
connecting through ``DecisionCache.reuse`` (no ``decide``) and answers like the user's eager module."""

from __future__ import annotations

import random
from pathlib import Path
from types import SimpleNamespace

import torch

from modelgraph import capture
from partitioner.costgraph import CostGraph
from partitioner.state import ServerState
from ue_client import CoinferClient, new_tenant, planning
from ue_client.decisions import DecisionCache
from ue_client.uploads import UploadScheduler

DATA = Path(__file__).parent / "data" / "costgraphs"


def _tied_graph():
    """A captured model whose weights share bytes: layer 2's weight is layer 0's, and every bias is zero (one
    sha256 for several weight names)."""
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 8), torch.nn.Linear(8, 8))
    with torch.no_grad():
        m[3].weight.copy_(m[0].weight)
        for i in (0, 2, 3):
            m[i].bias.zero_()
    return capture(m.eval(), (torch.randn(2, 8),), name="tied")


def _by_definition(ups: UploadScheduler) -> ServerState:
    """``server_state`` as it was written before session 16: one ``_held`` per sha256."""
    held, in_flight = set(), {}
    for sha, names in ups.sha_names.items():
        if ups._held(sha):
            held.update(names)
        elif sha in ups.queued:
            for n in names:
                in_flight[n] = ups.queued[sha].remaining
    return ServerState(held=frozenset(held), in_flight=in_flight)


def test_server_state_from_set_operations_is_the_per_weight_definition():
    g = _tied_graph()
    sess = SimpleNamespace(held=set())
    ups = UploadScheduler(g, SimpleNamespace(session=sess))
    shas = sorted(ups.sha_names)
    assert len(shas) < len(g.weights)  # shared bytes: a sha256 names several weights
    rng = random.Random(5)
    for _ in range(300):
        ups.query_held = set(rng.sample(shas, rng.randint(0, len(shas)))) | {"0" * 64}  # (another model's)
        sess.held = set(rng.sample(shas, rng.randint(0, len(shas)))) | {"f" * 64}
        ups.queued = {s: SimpleNamespace(remaining=rng.randint(0, 99)) for s in rng.sample(shas, rng.randint(0, 2))}
        want, got = _by_definition(ups), ups.server_state()
        assert got.held == want.held and got.in_flight == want.in_flight
        conn_less = UploadScheduler(g, SimpleNamespace(session=None))
        conn_less.query_held = set(ups.query_held)
        assert conn_less.server_state().held == _by_definition(conn_less).held
    # every weight held: the same frozenset object whatever moved the key (identity comparisons downstream)
    ups.queued = {}
    ups.query_held, sess.held = set(shas[:1]), set(shas)
    a = ups.server_state()
    ups.query_held = set(shas)
    b = ups.server_state()
    assert a is not b and a.held is b.held and a.held == frozenset(g.weights)


def test_target_held_from_the_targets_weights_is_planning_target_held():
    g = CostGraph.from_json(DATA / "mobilenet_v2.json")
    ops = [op.name for op in g.ops]
    weights = sorted(g.weights)
    dc = DecisionCache("auto", fixed_server_ops=None, deadline_ms=None, plan_budget_s=0.3, horizon=None)
    rng = random.Random(2)
    agree = {True: 0, False: 0}
    for _ in range(300):
        k = rng.randint(0, len(ops))
        target = frozenset(ops[-k:]) if rng.random() < 0.7 else frozenset(rng.sample(ops, k))
        tw = planning.target_weights(g, target)
        held = set(rng.sample(weights, rng.randint(0, len(weights))))
        if rng.random() < 0.5:
            held |= tw  # (held in full half the time)
        st = ServerState(held=frozenset(held))
        want = planning.target_held(g, target, st)
        assert dc._target_held(g, target, st) == want
        agree[want] += 1
    assert min(agree.values()) > 20


def test_the_first_request_takes_the_decision_planned_ahead_through_reuse(server):
    """A real client (auto, decisions inline): the decision made while connecting is request 1's, taken by
    ``DecisionCache.reuse`` (``decide`` is not called for it), with its plan_why; the answer is the eager module's."""
    from ue_client import decisions as dmod

    calls = {"decide": 0}
    orig = dmod.DecisionCache.decide

    def counting(self, *a, **k):
        calls["decide"] += 1
        return orig(self, *a, **k)

    with CoinferClient("torchvision:resnet18", server=server.address, tenant=new_tenant(), policy="auto",
                       ue_slowdown=10.0, link=(400.0, 5.0), plan_background=False, transport_memory=False,
                       horizon=4) as c:
        c.engine.connect()  # plans request 1 ahead
        x = c.example_inputs[0].clone()
        dmod.DecisionCache.decide = counting
        try:
            y = c(x)
        finally:
            dmod.DecisionCache.decide = orig
        assert calls["decide"] == 0, c.last_report.plan_why
        assert c.last_report.plan_why == "planned ahead"
        torch.testing.assert_close(y, c.eager(x), rtol=1e-4, atol=1e-4)


class _ThrottledClock:
    """``ue_client.client``'s ``time`` for one request, with a CFS throttle of ``wait_s`` of wall triggered by its
    ``at``-th ``thread_time()`` read (as reading CLOCK_THREAD_CPUTIME_ID makes the kernel account an overspent
    quota at once and throttle there): every later ``perf_counter()`` is ``wait_s`` later."""

    def __init__(self, at: int, wait_s: float = 0.009):
        import time as real

        self._t, self.at, self.wait_s, self.reads, self.shift = real, at, wait_s, 0, 0.0

    def __getattr__(self, name):
        return getattr(self._t, name)

    def perf_counter(self) -> float:
        return self._t.perf_counter() + self.shift

    def thread_time(self) -> float:
        self.reads += 1
        if self.reads == self.at:
            self.shift += self.wait_s
        return self._t.thread_time()


def test_a_throttle_owed_before_the_plan_window_stays_out_of_it_and_one_owed_inside_stays_in(server, monkeypatch):
    """Session 20: the session-19 grid's reuses of 0.1-0.2 ms of CPU on a 10 % UE took 9-18 ms of ``plan_ms``: the
    window's first read of the thread's CPU clock made the kernel account a quota overspent by earlier work, and
    the throttle began inside the window. The window now reads the CPU clock before the wall clock at both ends
    (``client.window_clocks``): a throttle triggered by the opening read is outside ``plan_ms`` (and inside the
    call's ``call_ms``), one triggered by the closing read (a quota the decision overspent) is inside. Both for a
    request with the session open and for a suspended client's offline decision; the answers are the eager
    module's."""
    import ue_client.client as cmod

    cases = [("session", dict(ue_slowdown=10.0, link=(400.0, 5.0))), ("offline", dict(link=(2.0, 20.0)))]
    for kind, kw in cases:
        with CoinferClient("torchvision:resnet18", server=server.address, tenant=new_tenant(), policy="auto",
                           plan_background=False, transport_memory=False, horizon=8, **kw) as c:
            x = c.example_inputs[0].clone()
            for _ in range(3):
                c(x)
            c.engine.wait_uploads(60)
            c(x)
            for at, inside in ((1, False), (2, True)):
                clock = _ThrottledClock(at)
                monkeypatch.setattr(cmod, "time", clock)
                try:
                    y = c(x)
                finally:
                    monkeypatch.undo()
                r = c.last_report
                assert r.offline == (kind == "offline"), (kind, r.plan_why)
                assert clock.reads >= 2, (kind, clock.reads)
                assert (r.plan_ms >= 9.0) == inside, (kind, at, r.plan_ms, r.plan_why)
                assert r.call_ms >= 9.0, (kind, at, r.call_ms)
                torch.testing.assert_close(y, c.eager(x), rtol=1e-4, atol=1e-4)
