"""Planning the next request on a background thread (``ue_client.background``): the worker's life (wait, stop,
idle exit, fork), a decision made ahead is taken only when it is the one the request would have made itself
(property test over states and inputs against a cache that never speculates), and a real client on a real
server whose taken decisions equal the ones it would have made in the request and whose answers equal the
user's eager module, with the thread on and off."""

from __future__ import annotations

import copy
import os
import random
import threading
import time
from pathlib import Path

import pytest
import torch

from partitioner.costgraph import CostGraph, Link
from partitioner.state import ServerState, Shares
from partitioner.uecpu import UeCpu
from ue_client import CoinferClient, background, new_tenant
from ue_client import client as client_mod
from ue_client.background import BackgroundPlanner, Lookahead, fingerprint, speculate, take
from ue_client.cli_run import load_inputs, max_abs_diff
from ue_client.decisions import DecisionCache

DATA = Path(__file__).parent / "data" / "costgraphs"


# ---- the worker ---------------------------------------------------------------------------------------------
def test_wait_returns_after_the_job_and_stop_ends_the_thread():
    started, release, done = threading.Event(), threading.Event(), []

    def job(n: int) -> None:
        started.set()
        release.wait(10)
        done.append(n)

    bp = BackgroundPlanner(job)
    assert bp.wait() == 0.0 and bp.thread is None  # nothing queued: no wait, no thread
    bp.submit(3)
    assert started.wait(10)
    assert bp.pending
    threading.Timer(0.05, release.set).start()
    waited = bp.wait()
    assert done == [3] and not bp.pending and waited > 0.0
    t = bp.thread
    assert t is not None and t.is_alive()
    bp.stop()
    assert not t.is_alive() and bp.thread is None
    bp.submit(4)  # a later job starts a new thread
    bp.wait()
    assert done == [3, 4]
    bp.stop()


def test_stop_drops_a_queued_job_and_waits_for_the_running_one():
    started, gate, ran = threading.Event(), threading.Event(), []

    def job(n: int) -> None:
        started.set()
        gate.wait(10)
        ran.append(n)

    bp = BackgroundPlanner(job)
    bp.submit(1)
    assert started.wait(10)  # job 1 runs
    bp.submit(2)  # queued behind it
    threading.Timer(0.05, gate.set).start()
    bp.stop()
    assert ran == [1]  # the running job finished; the queued one was dropped
    assert bp.thread is None and not bp.pending


def test_the_worker_leaves_when_idle_and_holds_its_engine_weakly(monkeypatch):
    import ue_client.background as bg

    monkeypatch.setattr(bg, "IDLE_EXIT_S", 0.05)

    class Owner:
        def __init__(self):
            self.jobs: list[int] = []

        def plan(self, n: int) -> None:
            self.jobs.append(n)

    o = Owner()
    bp = BackgroundPlanner(o.plan)
    bp.submit(1)
    bp.wait()
    t = bp.thread
    assert o.jobs == [1] and t is not None
    t.join(5)
    assert not t.is_alive() and bp.thread is None  # idle: gone
    bp.submit(2)
    bp.wait()
    assert o.jobs == [1, 2]
    del o  # the thread does not keep its owner alive: a job for a dropped engine does nothing
    bp.submit(3)
    bp.wait()
    bp.stop()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_forked_child_has_no_worker_and_a_free_engine_lock():
    """A child forked while a background decision holds the engine's lock gets a new lock, no worker, no
    speculation (``client._after_fork_in_child``), so its next request cannot hang on the parent's worker."""

    class FakeEngine:
        pass

    eng = FakeEngine()
    eng._lock = threading.Lock()
    holding, release = threading.Event(), threading.Event()

    def job(n: int) -> None:
        with eng._lock:
            holding.set()
            release.wait(10)

    eng.ahead = Lookahead(eng)
    eng.ahead.worker = BackgroundPlanner(job)
    eng.ahead.spec = object()
    client_mod._ENGINES.add(eng)
    try:
        eng.ahead.submit(1)
        assert holding.wait(10)
        pid = os.fork()
        if pid == 0:  # the child
            ok = eng._lock.acquire(timeout=2) and eng.ahead.wait() == 0.0 and eng.ahead.spec is None \
                and eng.ahead.worker.thread is None
            os._exit(0 if ok else 1)
        _, status = os.waitpid(pid, 0)
        release.set()
        eng.ahead.wait()
        assert os.waitstatus_to_exitcode(status) == 0
    finally:
        release.set()
        eng.ahead.stop()
        client_mod._ENGINES.discard(eng)


# ---- the decision made ahead equals the request's own ------------------------------------------------------
def _kind(c) -> tuple:
    return (c.policy, c.server_ops, c.warm_target, c.background, c.prefetch, c.invest, round(c.predicted_ms, 9),
            c.reason)


def _inputs(g: CostGraph, rng: random.Random, link: Link, scale: dict, ue_cpu: UeCpu | None) -> dict:
    return dict(costs=g.scaled(ue=scale["ue"], server=scale["server"]), base=g, link=link, ue_cpu=ue_cpu,
                scale=dict(scale), measured_cv=None, ue_cv=None)


@pytest.mark.parametrize("policy,name", [("auto", "resnet18"), ("auto", "mobilenet_v2"), ("mjoa", "mobilenet_v2"),
                                         ("dads", "resnet18"), ("neurosurgeon", "mobilenet_v2")])
def test_a_decision_made_ahead_is_the_one_the_request_would_make(policy, name):
    """Two caches walk the same random stream of requests (held sets growing along the plans' uploads, links
    and cost scales that sometimes move between the end of a request and the next one, sometimes by a little,
    sometimes past the drift thresholds). One decides every request itself; the other also decides each next
    request ahead on a copy (``speculate``) with the inputs after the previous request, and the request takes
    that (``take``) or decides itself. Every request's decision is the same in both (policy, split, target,
    uploads, prediction, reason), and the caches stay in step."""
    g = CostGraph.from_json(DATA / f"{name}.json").scaled(ue=10.0)
    weights = sorted(g.weights)
    taken = stale = 0
    for seed in range(6):
        rng = random.Random(seed)
        horizon = rng.choice([None, 8, 20])
        plain, ahead = (DecisionCache(policy, fixed_server_ops=None, deadline_ms=None, plan_budget_s=0.3,
                                      horizon=horizon) for _ in range(2))
        link = Link(rng.choice([5.0, 20.0, 100.0, 400.0]), rtt_ms=rng.choice([2.0, 20.0]))
        scale = {"ue": 1.0, "server": 1.0, "ue_overhead_ms": 0.0, "transport_ms": 0.0, "transport_sd_ms": 0.0}
        ue_cpu = rng.choice([None, UeCpu(send_ms_per_byte=1e-6, shared=True)])
        held: frozenset[str] = frozenset()
        share = Shares()
        for n in range(1, 13):
            # the inputs when the previous request ended: the background decision's
            st_bg = ServerState(held=held)
            kw_bg = _inputs(g, rng, link, scale, ue_cpu)
            fp_bg = fingerprint("session", n, st_bg, share, link=link, ue_cpu=ue_cpu, scale=scale, measured_cv=None,
                                ue_cv=None, exclude=ahead.exclude, allow=ahead.allow, lost_ms=ahead.lost_ms, base=g)
            sp = speculate(ahead, st_bg, share, n, kw_bg, fp_bg)
            # what may move before the request arrives: acknowledgements, the link, a scale
            move = rng.random()
            if move < 0.2 and len(held) < len(weights):
                held = held | frozenset(rng.sample(weights, k=min(3, len(weights) - len(held))))
            elif move < 0.3:
                link = Link(link.uplink_mbps * rng.choice([0.9, 1.1, 0.5, 2.0]), rtt_ms=link.rtt_ms)
            elif move < 0.4:
                scale = {**scale, "transport_ms": scale["transport_ms"] + rng.choice([-30.0, -5.0, 5.0, 30.0])}
            st = ServerState(held=held)
            kw = _inputs(g, rng, link, scale, ue_cpu)
            fp = fingerprint("session", n, st, share, link=link, ue_cpu=ue_cpu, scale=scale, measured_cv=None,
                             ue_cv=None, exclude=ahead.exclude, allow=ahead.allow, lost_ms=ahead.lost_ms, base=g)
            want = plain.decide(st, share, n=n, **kw)
            got, note = take(sp, ahead, n, fp)
            if got is None:
                stale += 1
                assert note.startswith("stale: ") and (move < 0.4), note
                got = ahead.decide(st, share, n=n, **kw)
            else:
                taken += 1
                assert note == "taken" and fp == fp_bg
            assert _kind(got) == _kind(want), (seed, n, note)
            assert plain.last[0] == ahead.last[0] and plain.why == ahead.why and plain._target == ahead._target
            # the request ran its plan: what it needed is held now (a cold split uploads its weights)
            held = held | frozenset(w for op in g.ops if op.name in got.server_ops for w in op.weights)
            plain.account(got, got.predicted_ms)
            ahead.account(got, got.predicted_ms)
            if rng.random() < 0.3:  # a warm request's calibration moved the UE scale (inside the request)
                scale = {**scale, "ue": scale["ue"] * rng.choice([0.8, 1.05, 1.5])}
    assert taken > 20 and stale > 5, (taken, stale)


def test_take_refuses_a_decision_made_for_another_request_or_a_changed_cache():
    g = CostGraph.from_json(DATA / "resnet18.json").scaled(ue=10.0)
    dc = DecisionCache("dads", fixed_server_ops=None, deadline_ms=None, plan_budget_s=0.3, horizon=8)
    link = Link(100.0, rtt_ms=2.0)
    kw = dict(costs=g, base=g, link=link, ue_cpu=None, scale={"ue": 1.0, "server": 1.0}, measured_cv=None,
              ue_cv=None)
    fp = fingerprint("session", 2, ServerState(), Shares(), link=link, ue_cpu=None, scale=kw["scale"],
                     measured_cv=None, ue_cv=None, exclude=dc.exclude, allow=dc.allow, lost_ms=0.0, base=g)
    before = copy.copy(dc.__dict__)
    sp = speculate(dc, ServerState(), Shares(), 2, kw, fp)
    assert dc.__dict__ == before  # the speculation decided on a copy
    assert take(sp, dc, 3, fp) == (None, "stale: request")
    dc.lost_ms = 5.0  # something changed the cache since (rent-or-buy)
    assert take(sp, dc, 2, fp) == (None, "stale: decisions")
    dc.lost_ms = 0.0
    got, note = take(sp, dc, 2, fp)
    assert note == "taken" and got.details["plan_why"].startswith("planned in the background")
    assert dc.last[1] is sp.choice


# ---- a real client --------------------------------------------------------------------------------------------
def test_a_real_client_takes_decisions_it_would_have_made_and_answers_like_the_eager_model(server, monkeypatch):
    """resnet18 on a real server, policy auto, a 10x-slowed UE, a pause between requests (the caller away):
    with the thread on, the requests after the first take the background decision (``plan_bg`` 'taken',
    no wait) or name what moved; every taken decision equals the one the request's own ``decide`` makes from
    the cache the background started from with the request's inputs (checked inside the engine); with the
    thread off no request has one. Every answer equals the user's eager module (and the captured graph)."""
    checked: list[bool] = []
    orig_take = background.take

    def checking_take(sp, cache, n, fp):
        own = copy.copy(cache)  # the cache as the background decision found it (``take`` checks it is)
        got, note = orig_take(sp, cache, n, fp)
        if got is not None:
            st, share, kw = _last_inputs[-1]
            mine = own.decide(st, share, n=n, **kw)
            checked.append(_kind(mine) == _kind(got))
        return got, note

    _last_inputs: list = []
    orig_fp = Lookahead.fingerprint

    def recording_fp(self, mode, n, state, share, kw):
        _last_inputs.append((state, share, kw))
        return orig_fp(self, mode, n, state, share, kw)

    orig_exact = Lookahead.take_exact
    exact: list[bool] = []

    def checking_exact(self, n):  # the key path: its decision is the request's own, inputs read now
        eng = self._engine()
        mode = "offline" if eng.conn.suspended is not None else "session"
        if mode == "session":
            st, share = eng.server_state(), eng._shares()
        else:
            s = eng.conn.suspended
            st, share = s.state, Shares(compute=s.share, uplink=s.uplink)
        kw = eng._decide_inputs()
        own = copy.copy(eng.decisions)
        got = orig_exact(self, n)
        if got is not None:
            exact.append(_kind(own.decide(st, share, n=n, **kw)) == _kind(got))
        return got

    monkeypatch.setattr(background, "take", checking_take)
    monkeypatch.setattr(Lookahead, "fingerprint", recording_fp)
    monkeypatch.setattr(Lookahead, "take_exact", checking_exact)
    runs = {}
    for on in (True, False):
        with CoinferClient("torchvision:resnet18", server=server.address, policy="auto",
                           link={"uplink_mbps": 400.0, "rtt_ms": 2.0}, tenant=new_tenant(), ue_slowdown=10.0,
                           probe=False, horizon=8, plan_background=on) as c:
            reps = []
            for i in range(6):
                x = load_inputs("random", c.example_inputs, seed=i)
                y = c(*x)
                assert max_abs_diff(y, c.reference(*x)) == 0.0
                assert max_abs_diff(y, c.eager(*x)) <= 1e-4  # the user's own module
                reps.append(c.last_report)
                time.sleep(0.3)  # the caller is away: the worker decides meanwhile
            eng = c.engine
        if on:  # the worker ends with the client
            assert eng.ahead.worker.thread is None
        runs[on] = reps

        assert not any(r.fallback for r in reps), reps
    on, off = runs[True], runs[False]
    assert all(r.plan_bg == "" and r.plan_bg_ms == 0.0 and r.plan_wait_ms == 0.0 for r in off), off
    # the first request's decision was made while connecting; the second's inside it (the caller's pause is
    # known once it comes back: ``Lookahead.due``); from the third on, on the worker
    assert on[0].plan_bg == "" and on[1].plan_bg == ""
    bgs = [r.plan_bg for r in on[2:]]
    assert all(b == "taken" or b.startswith("stale: ") or b == "unused" for b in bgs), bgs
    assert "taken" in bgs, bgs
    assert all(r.plan_bg_ms > 0 for r in on[2:] if r.plan_bg), [r.plan_bg_ms for r in on]
    assert checked + exact and all(checked) and all(exact), (checked, exact)
    for r in on[1:]:
        if r.plan_bg == "taken":
            assert r.plan_why.startswith("planned in the background"), r.plan_why


def test_a_closed_loop_decides_inside_the_requests(server):
    """A caller that comes back at once (no pause between requests) gets no background decision: the worker's
    would be waited for and cost more than the request's own (``Lookahead.due``)."""
    with CoinferClient("torchvision:resnet18", server=server.address, policy="dads",
                       link={"uplink_mbps": 400.0, "rtt_ms": 2.0}, tenant=new_tenant(), ue_slowdown=10.0,
                       probe=False, horizon=5) as c:
        xs = [load_inputs("random", c.example_inputs, seed=i) for i in range(4)]
        ys = [c(*x) for x in xs]  # back to back
        assert all(max_abs_diff(y, c.reference(*x)) == 0.0 for x, y in zip(xs, ys, strict=True))
        assert all(r.plan_bg == "" and r.plan_wait_ms == 0.0 for r in c.reports), [r.plan_bg for r in c.reports]
        assert c.engine.ahead.worker.jobs == 0


# ---- the exact key of the background decision (``RemoteEngine.marks``, ``Lookahead.take_exact``) ------------
def _mutations(eng):
    """Each input source of a decision, changed the way its own thread or method changes it: (name, change)."""

    sess = eng.conn.session
    return [
        ("rtt sample", lambda: eng.probe.estimator.observe_rtt(7.0)),
        ("uplink sample", lambda: eng.probe.estimator.observe_upload(1 << 20, 0.05)),
        ("send cost sample", lambda: eng.probe.send_est.observe(1 << 20, 0.01)),
        ("transport residual", lambda: eng.cost_model.calibrate_transport(50.0, 10.0)),
        ("UE calibration", lambda: eng.cost_model.calibrate("ue", 500.0, 100.0)),
        ("server calibration", lambda: eng.cost_model.calibrate_server(50.0, 10.0, 1.0)),
        ("scale written", lambda: eng.cost_model.scale.__setitem__("ue", eng.cost_model.scale["ue"] * 1.5)),
        ("compute share", lambda: setattr(sess, "share", sess.share / 2)),
        ("uplink share", lambda: setattr(sess, "uplink_share", 0.5 if sess.uplink_share != 0.5 else 0.25)),
        ("request share", lambda: setattr(sess, "request_uplink_share", 0.3)),
        ("weight acknowledged", lambda: sess.held.add("f" * 64)),
        ("acknowledgement posted", lambda: eng.uploads._events.append((eng.conn.generation, None, 0.0))),
        ("slice answer", lambda: sess.slice_answers.append((frozenset({"x"}), None))),
        ("refusal", lambda: eng.path.refusals.refused(eng.conn.address, frozenset({"x"}), "sha", "INVALID_ARGUMENT",
                                                      "no")),
        ("link override", lambda: setattr(eng.probe, "override", None)),
        ("torch threads", lambda: torch.set_num_threads(torch.get_num_threads() + 1)),
    ]


def test_the_exact_key_moves_with_every_input_and_equal_keys_mean_equal_decisions(server):
    """``RemoteEngine.marks`` (the background decision's key, a tuple of counters and values): after a real
    client's background job, the key equals the job's while nothing moved, and then the job's decision is the one
    the request makes itself (a copy of the cache deciding on freshly read inputs, whose fingerprint equals the
    job's); every input source changed alone (each as its own thread or method changes it) moves the key; and over
    random subsets of those changes the key stays only when none was made. A request whose key moved reads its
    inputs (the fingerprint path); one whose key holds takes the decision without reading them."""
    rng = random.Random(0)
    threads = torch.get_num_threads()
    with CoinferClient("torchvision:resnet18", server=server.address, policy="dads",
                       link={"uplink_mbps": 400.0, "rtt_ms": 2.0}, tenant=new_tenant(), ue_slowdown=10.0,
                       probe=False, horizon=40) as c:
        eng = c.engine
        x = load_inputs("random", c.example_inputs, seed=0)
        tested = 0
        try:
            for trial in range(12):
                c(*x)
                assert c.engine.wait_uploads(60)
                time.sleep(0.05)  # the caller is away: the next decision goes to the worker
                c(*x)
                assert c.last_report.server_ops > 0 and not c.last_report.fallback
                eng.ahead.wait()
                with eng._lock:
                    sp, mk = eng.ahead.spec, eng.ahead._marks
                    if sp is None or mk is None:  # (a job that found weights in flight keeps no key)
                        continue
                    tested += 1
                    assert eng.marks(sp.n) == mk
                    # nothing moved: the job's decision is the request's own
                    st, share = eng.server_state(), eng._shares()
                    kw = eng._decide_inputs()
                    assert eng.ahead.fingerprint("session", sp.n, st, share, kw) == sp.fp
                    own = copy.copy(eng.decisions).decide(st, share, n=sp.n, **kw)
                    assert _kind(own) == _kind(sp.choice)
                    muts = _mutations(eng)
                    # the changes are applied to copies where they would stick: restore what we touch
                    override = eng.probe.override
                    saved = (dict(eng.cost_model.scale), eng.conn.session.share, eng.conn.session.uplink_share,
                             eng.conn.session.request_uplink_share, set(eng.conn.session.held))
                    picked = [m for m in muts if rng.random() < 0.3] if trial % 2 else [muts[trial % len(muts)]]
                    for _, change in picked:
                        change()
                    moved = eng.marks(sp.n) != mk
                    # an RTT sample under the client's RTT override moves no input (the planning link stays)
                    assert moved == any(nm != "rtt sample" for nm, _ in picked), [nm for nm, _ in picked]
                    assert eng.ahead.take_exact(sp.n) is None or not moved
                    # undo what would confuse the next requests (the counters stay moved)
                    s = eng.conn.session
                    eng.cost_model.scale.update(saved[0])
                    s.share, s.uplink_share, s.request_uplink_share = saved[1:4]
                    s.held.clear()
                    s.held.update(saved[4])
                    eng.uploads._events.clear()
                    s.slice_answers.clear()
                    eng.path.refusals._refused.clear()
                    eng.path.refusals._busy.clear()
                    eng.probe.override = override
                    eng.ahead.drop()
                    torch.set_num_threads(threads)
            assert tested >= 6, tested
            # each source alone moves the key
            eng.ahead.wait()
            with eng._lock:
                eng.server_state()
                def fp():
                    st, share = eng.server_state(), eng._shares()
                    return eng.ahead.fingerprint("session", eng._n, st, share, eng._decide_inputs())

                for name, change in _mutations(eng):
                    before, fp0 = eng.marks(eng._n + 1), fp()
                    assert before is not None
                    change()
                    after, fp1 = eng.marks(eng._n + 1), fp()
                    assert after != before or (name == "rtt sample" and fp1 == fp0), name
                    if fp1 != fp0:  # an input of the decision moved: so did the key
                        assert after != before, name
                    s = eng.conn.session
                    s.held.discard("f" * 64)
                    eng.uploads._events.clear()
                    s.slice_answers.clear()
                    eng.path.refusals._refused.clear()
                    eng.path.refusals._busy.clear()
                    eng.server_state()
        finally:
            torch.set_num_threads(threads)
