"""Planning the next request on a background thread, while the caller is away (issue 12).

On a UE with 10 % of a core a decision of 0.5-2.6 ms of CPU took 8-100 ms of wall inside a request, waiting for
a CFS quota that the request's own sending had spent (session 10/11, ``bench/bench_plan_ms.py``). Deciding after
each request before the call returns (session 11's ``plan_after``, dropped in session 13: this replaced it) took
it off the request's clock but not off the caller's. Here the decision for request n + 1 is made on a worker
thread after request n returned; request n + 1 first waits for that worker (its wait is part of its ``plan_ms``)
and then takes the decision only if every input it was made with is still exactly the same, else it decides
itself from the state the background decision started from (a *speculation*: the background thread decides on a
copy of the ``DecisionCache``, and the copy replaces the cache only when the request takes its decision). So the
decision a request runs with is, by construction, the one it would have made itself without the thread (the
decision is a deterministic function of the cache and the inputs: the online tables of ``auto`` / ``mjoa`` / the
planners; only a search cut off by a time budget, ``plan_budget_s`` for the offline searches, can differ between
two runs of the same decision, with or without the thread).

:class:`BackgroundPlanner` is the worker: one daemon thread per engine, started at the first job, that
leaves after ``IDLE_EXIT_S`` without one (a client that is dropped without ``close`` leaves no thread behind;
the thread holds only a weak reference to the engine). :class:`Lookahead` is the engine's side: when a decision
is made on the worker (``due``), the worker's job (``job``), and the request's taking it (``take``). What the
worker owns and how it stops:

- a job runs the engine's callable, which takes the engine's lock for the whole decision: while it runs,
  every part's state belongs to it as it belongs to a request's thread (``RemoteEngine``'s docstring); it
  applies posted acknowledgements and slice answers (which the next request would apply the same way), may
  build the calibrated cost graph and the planner's tables (caches, the same whoever builds them first) and
  writes one slot, the engine's speculation; the ``DecisionCache`` itself changes only in the request that
  takes the speculation;
- ``wait`` (the next request, before it takes the engine's lock) returns once no job is queued or running;
- ``stop`` (the engine's ``close``) drops a queued job, waits for a running one and ends the thread; a later
  job starts a new one;
- a suspended session (plans stay local) is no different: the job decides with what the offline plan will
  use (the state and shares the session held) and touches no connection;
- ``fork``: the thread does not exist in a child; ``reset_in_child`` (``os.register_at_fork``, through the
  engine, which also replaces its lock, held in the child forever if the worker held it at the fork) forgets
  it, its job and its speculation, and the child's next request decides itself.
"""

from __future__ import annotations

import copy
import logging
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from partitioner.state import ServerState, Shares

if TYPE_CHECKING:  # (not ``ue_client.client``: it imports this module; the engine is its ``RemoteEngine``)
    from ue_client.planning import PlanChoice
    from ue_client.report import RequestReport

log = logging.getLogger(__name__)

IDLE_EXIT_S = 10.0
"""Seconds the worker waits for a job before its thread ends (a later job starts a new one)."""

BACKGROUND_MIN_GAP_MS = 20.0
"""The least time (ms) the caller must have been away between two requests for the next decision to be made on
the background worker (:meth:`Lookahead.due`)."""


class BackgroundPlanner:
    """One worker thread that runs ``fn(n)`` for the latest submitted ``n`` (a request number), one job at a
    time. ``fn`` is held weakly (a bound method of the engine: the thread keeps no engine alive); ``name``
    names the thread."""

    def __init__(self, fn: Callable[[int], None], name: str = "coinfer-plan-bg"):
        self._fn = weakref.WeakMethod(fn) if hasattr(fn, "__self__") else (lambda f=fn: f)
        self._name = name
        self._cv = threading.Condition()
        self._job: int | None = None
        self._busy = False
        self._thread: threading.Thread | None = None
        self.jobs = 0
        """Jobs run so far (tests, benchmarks)."""

    def submit(self, n: int) -> None:
        """Queue a decision for request ``n`` (replaces a queued one that has not started)."""
        with self._cv:
            self._job = n
            t = self._thread
            if t is None or not t.is_alive():
                self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
                self._thread.start()
            else:
                self._cv.notify_all()

    def wait(self) -> float:
        """Block until no job is queued or running; the ms waited (0.0 when none was)."""
        with self._cv:
            if self._job is None and not self._busy:
                return 0.0
            t0 = time.perf_counter()
            while (self._job is not None or self._busy) and self._thread is not None and self._thread.is_alive():
                self._cv.wait(0.5)
            return (time.perf_counter() - t0) * 1e3

    @property
    def pending(self) -> bool:
        """A job is queued or running."""
        with self._cv:
            return self._job is not None or self._busy

    @property
    def thread(self) -> threading.Thread | None:
        """The worker thread (None before the first job, or after ``stop``)."""
        return self._thread

    def stop(self) -> None:
        """Drop a queued job, wait for a running one, end the thread (from any thread but the worker)."""
        with self._cv:
            self._job = None
            t, self._thread = self._thread, None
            self._cv.notify_all()
        if t is not None and t is not threading.current_thread():
            t.join()

    def reset_in_child(self) -> None:
        """After ``fork``, in the child: no thread, no job (the parent's worker does not exist here)."""
        self._cv = threading.Condition()
        self._job, self._busy, self._thread = None, False, None

    def _run(self) -> None:
        me = threading.current_thread()
        while True:
            with self._cv:
                end = time.monotonic() + IDLE_EXIT_S
                while self._job is None and self._thread is me:
                    left = end - time.monotonic()
                    if left <= 0:
                        break
                    self._cv.wait(left)
                if self._job is None or self._thread is not me:  # idle too long, or stopped
                    if self._thread is me:
                        self._thread = None
                    self._cv.notify_all()
                    return
                n, self._job, self._busy = self._job, None, True
            try:
                fn = self._fn()
                if fn is not None:
                    fn(n)
                    self.jobs += 1
            except Exception:  # the request decides itself
                log.debug("background decision for request %d failed", n, exc_info=True)
            finally:
                with self._cv:
                    self._busy = False
                    self._cv.notify_all()
            if fn is None:  # the engine is gone
                with self._cv:
                    if self._thread is me:
                        self._thread = None
                return


def same_cache(before: dict, now: dict) -> bool:
    """The ``DecisionCache`` attributes ``now`` are those of the snapshot ``before`` (each the same object, or
    an equal number, string or set): nothing changed the cache since the background decision started."""
    if before.keys() != now.keys():
        return False
    for k, a in before.items():
        b = now[k]
        if a is b:
            continue
        if type(a) is not type(b) or not isinstance(a, int | float | str | frozenset) or a != b:
            return False
    return True


FINGERPRINT_FIELDS = ("mode", "request", "held", "in flight", "share", "link", "send cost", "scale",
                      "uplink cv", "ue cv", "refusals", "refusals", "rent-or-buy", "cost graph")
"""Names of :func:`fingerprint`'s entries (what a stale background decision names as moved)."""


def fingerprint(mode: str, n: int, state, share, *, link, ue_cpu, scale: dict, measured_cv, ue_cv, exclude,
                allow, lost_ms: float, base) -> tuple:
    """Every input of a decision for request ``n`` (``DecisionCache.decide``'s arguments and the cache's
    refusal sets and rent-or-buy total), exactly: a background decision is taken only when the request's
    fingerprint equals the one it was made with. ``mode``: 'session' or 'offline' (a suspended client);
    ``base``: the profiled cost graph (by identity)."""
    return (mode, n, state.held, tuple(sorted(state.in_flight.items())), share, link, ue_cpu,
            tuple(sorted(scale.items())), measured_cv, ue_cv, exclude, allow, lost_ms, id(base))


def moved(a: tuple, b: tuple) -> str:
    """What differs between two fingerprints, by name ('' when nothing)."""
    return ",".join(dict.fromkeys(nm for nm, x, y in zip(FINGERPRINT_FIELDS, a, b, strict=True) if x != y))


@dataclass(frozen=True)
class Speculation:
    """A decision made ahead for request ``n`` (:func:`speculate`), waiting for that request (:func:`take`)."""

    n: int
    fp: tuple
    """The :func:`fingerprint` of its inputs."""
    before: dict
    """The ``DecisionCache``'s attributes when it started."""
    after: dict
    """The copy's attributes after its decision (the cache's, once a request takes it)."""
    choice: object
    """The ``planning.PlanChoice``."""
    wall_ms: float
    cpu_ms: float


def speculate(cache, state, share, n: int, kw: dict, fp: tuple) -> Speculation:
    """Decide request ``n`` on a shallow copy of the ``DecisionCache`` ``cache`` (``decide`` rebinds the
    cache's attributes and mutates none of their objects, so the copy's decision leaves ``cache`` as it was)
    with ``state``, ``share`` and ``decide``'s keyword arguments ``kw``; ``fp`` their :func:`fingerprint`."""
    t0, c0 = time.perf_counter(), time.thread_time()
    before = dict(cache.__dict__)
    spec = copy.copy(cache)
    choice = spec.decide(state, share, n=n, **kw)
    return Speculation(n, fp, before, dict(spec.__dict__), choice, (time.perf_counter() - t0) * 1e3,
                       (time.thread_time() - c0) * 1e3)


def take(sp: Speculation, cache, n: int, fp: tuple):
    """(choice, note) for request ``n`` whose inputs have the fingerprint ``fp``: the speculation's decision
    and 'taken' when it was made for ``n`` with exactly these inputs and ``cache`` is as it was then (the
    cache then becomes the copy's); else (None, 'stale: WHAT moved'), and ``cache`` is unchanged (the
    request decides itself, as it would have without the speculation)."""
    if sp.n != n:
        return None, "stale: request"
    t0, c0 = time.perf_counter(), time.thread_time()
    if fp != sp.fp:
        return None, f"stale: {moved(sp.fp, fp)}"
    if not same_cache(sp.before, cache.__dict__):
        return None, "stale: decisions"
    cache.__dict__.update(sp.after)
    c = sp.choice
    how = c.details.get("plan_why", "")
    return replace(c, decision_ms=(time.perf_counter() - t0) * 1e3,
                   details={**c.details, "plan_cpu_ms": (time.thread_time() - c0) * 1e3,
                            "plan_why": f"planned in the background ({how})" if how else
                            "planned in the background"}), "taken"


class Lookahead:
    """The next request's decision, made on a :class:`BackgroundPlanner` worker while the caller is away: one
    per ``RemoteEngine`` (held weakly: the worker keeps no engine alive). The engine calls, in order, per
    request: ``arrived`` (the caller is back: how long it was away), ``wait`` (before the engine's lock: a
    running job ends first; ms waited), ``begin`` (under the lock), ``take`` (inside the request's decision:
    the speculation when its inputs are exactly the request's), ``report`` (the request's report gets the
    wait, ``plan_bg``, ``plan_bg_ms``, ``plan_bg_cpu_ms``), ``due`` (whether the next decision goes to the
    worker) and, after the lock, ``submit`` and ``returned``. ``stop`` and ``reset_in_child`` as the worker's.
    """

    def __init__(self, engine):
        self._engine = weakref.ref(engine)
        self.worker = BackgroundPlanner(self.job)
        self.spec: Speculation | None = None
        """The background decision waiting for its request (None: none)."""
        self._returned: float | None = None
        """``time.perf_counter()`` when the last request returned to the caller (None: none yet)."""
        self.gap_ms: float | None = None
        """How long the caller was away before the last request, ms (None: before the second request)."""
        self._last_ms = 0.0
        """Wall ms of the last background decision (``due``)."""
        self._note: tuple[str, float, float] = ("", 0.0, 0.0)
        """(what became of the background decision for the request in progress: '', 'taken' or 'stale: WHAT';
        its wall ms, its CPU ms), for the request's report."""
        self._marks: tuple | None = None
        """The engine's ``marks`` when the job read its inputs (None: no exact cheap key then)."""
        self._taken: PlanChoice | None = None
        """The speculation's choice as a request takes it (``take_exact``)."""

    # ---- the request's side ------------------------------------------------------------------------------
    def arrived(self) -> None:
        """The caller called again: how long it was away since the previous request returned (``gap_ms``)."""
        if self._returned is not None:
            self.gap_ms = (time.perf_counter() - self._returned) * 1e3

    def wait(self) -> float:
        """Wait for a running background decision (before the engine's lock); the ms waited."""
        return self.worker.wait()

    def begin(self) -> None:
        """A request starts (under the engine's lock): nothing taken yet."""
        self._note = ("", 0.0, 0.0)

    def take(self, n: int, state: ServerState, share: Shares, kw: dict) -> PlanChoice | None:
        """The background decision for request ``n`` when every input it was made with is still the same and
        nothing changed the ``DecisionCache`` since (then it is this request's own decision, made earlier);
        None otherwise (the request decides itself; the report says what moved)."""
        sp, self.spec = self.spec, None
        eng = self._engine()
        if sp is None or eng is None:
            return None
        mode = "offline" if eng.conn.suspended is not None else "session"
        choice, note = take(sp, eng.decisions, n, self.fingerprint(mode, n, state, share, kw))
        self._note = (note, sp.wall_ms, sp.cpu_ms)
        return choice

    def take_exact(self, n: int) -> PlanChoice | None:
        """The background decision for request ``n`` when the engine's ``marks`` are those it was made with (a
        tuple comparison of microseconds instead of reading every input and comparing their fingerprints: the
        marks move whenever an input does, so equal marks mean exactly the inputs ``take`` would compare), and
        the ``DecisionCache`` becomes the copy's; None otherwise (the request reads its inputs; ``take``)."""
        sp, mk = self.spec, self._marks
        if sp is None or mk is None or sp.n != n:
            return None
        eng = self._engine()
        if eng is None or eng.marks(n) != mk:
            return None
        self.spec = None
        eng.decisions.__dict__.update(sp.after)
        self._note = ("taken", sp.wall_ms, sp.cpu_ms)
        return self._taken

    def report(self, rep: RequestReport, n: int, wait_ms: float) -> None:
        """Fill the request's report: the wait (in its ``plan_ms``: on the request's clock) and what became of
        the background decision; one made for a request that did not decide is dropped as 'unused'."""
        rep.plan_wait_ms = wait_ms
        rep.plan_ms += wait_ms
        rep.plan_bg, rep.plan_bg_ms, rep.plan_bg_cpu_ms = self._note
        if rep.plan_bg:
            self._last_ms = rep.plan_bg_ms
        if self.spec is not None and self.spec.n <= n:
            rep.plan_bg = rep.plan_bg or "unused"
            rep.plan_bg_ms, rep.plan_bg_cpu_ms = self.spec.wall_ms, self.spec.cpu_ms
            self.spec = None

    def due(self) -> bool:
        """Whether the next request's decision is made on the worker: ``plan_background``, a decision to make (a
        planning policy with a profile, a session open or suspended, requests left), and a caller that was away,
        before this request, at least ``BACKGROUND_MIN_GAP_MS`` and twice the last background decision's wall
        time. A caller that comes back at once (a closed loop) would wait for the worker, whose decision then
        costs more than one inside the request (on a 10 % UE, session 12: the worker's decision after a cold
        request took 43.7 ms of wall for 2.1 ms of CPU, the request's own 9.7, and googlenet's closed loop had 5
        of 8 requests over 5 % with the worker against 1 without): it decides inline."""
        eng = self._engine()
        if eng is None:
            return False
        o = eng.options
        if not o.plan_background or eng.policy == "local" or eng.cost_model.base is None or (
                o.horizon is not None and eng._n >= o.horizon):
            return False
        if self.gap_ms is None or self.gap_ms < max(BACKGROUND_MIN_GAP_MS, 2.0 * self._last_ms):
            return False
        conn = eng.conn
        return conn.suspended is not None or (conn.alive and conn.session is not None)

    def submit(self, n: int) -> None:
        """Queue request ``n``'s decision on the worker (after the engine's lock was released)."""
        self.worker.submit(n)

    def returned(self) -> None:
        """The request returns to the caller now."""
        self._returned = time.perf_counter()

    def stop(self) -> None:
        """End the worker (a running decision first): the engine's ``close``, before it takes its lock."""
        self.worker.stop()

    def drop(self) -> None:
        """Forget the speculation (under the engine's lock)."""
        self.spec = None

    def reset_in_child(self) -> None:
        """After ``fork``, in the child: no worker, no job, no speculation (its next request decides itself)."""
        self.worker.reset_in_child()
        self.spec = None
        self._marks = None

    # ---- the worker's side -------------------------------------------------------------------------------
    def job(self, n: int) -> None:
        """The worker's job: decide request ``n`` on a copy of the ``DecisionCache``, with the inputs it would
        find if it started now, and keep it as the speculation that request ``n`` takes when its own inputs are
        exactly these. Under the engine's lock; a request that started meanwhile (or a closed engine) makes it a
        no-op."""
        eng = self._engine()
        if eng is None:
            return
        with eng._lock:
            if eng._n != n - 1:
                return
            t0, c0 = time.perf_counter(), time.thread_time()
            conn = eng.conn
            s = conn.suspended
            if s is not None:  # suspended: what the offline plan will plan with
                marks = eng.marks(n)
                mode, state, share = "offline", s.state, Shares(compute=s.share, uplink=s.uplink)
            elif conn.alive and conn.session is not None:
                eng.uploads.drain()  # the acknowledgements that arrived: what the server holds now
                eng.path.sync_refusals()
                eng.decisions.exclude, eng.decisions.allow = eng.path.exclusion()
                eng.server_state()  # (its kept state, which ``marks`` keys on, is now's)
                marks = eng.marks(n)  # before the inputs are read: what moves after it moves the marks
                mode, state, share = "session", eng.server_state(), eng._shares()
            else:
                return
            kw = eng._decide_inputs()
            sp = speculate(eng.decisions, state, share, n, kw, self.fingerprint(mode, n, state, share, kw))
            c = sp.choice
            how = c.details.get("plan_why", "")
            self._taken = replace(c, details={**c.details, "plan_why": f"planned in the background ({how})" if how
                                              else "planned in the background"})
            self._marks = marks
            # the whole job's cost (the acknowledgements applied, the state and the inputs read, the decision)
            self.spec = replace(sp, wall_ms=(time.perf_counter() - t0) * 1e3, cpu_ms=(time.thread_time() - c0) * 1e3)

    def fingerprint(self, mode: str, n: int, state: ServerState, share: Shares, kw: dict) -> tuple:
        """:func:`fingerprint` of request ``n``'s decision inputs (``kw``: ``decide``'s keyword arguments)."""
        d = self._engine().decisions
        mcv, ucv = kw["measured_cv"], kw["ue_cv"]
        return fingerprint(mode, n, state, share, link=kw["link"], ue_cpu=kw["ue_cpu"], scale=kw["scale"],
                           measured_cv=mcv() if callable(mcv) else mcv, ue_cv=ucv() if callable(ucv) else ucv,
                           exclude=d.exclude, allow=d.allow, lost_ms=d.lost_ms, base=kw["base"])
