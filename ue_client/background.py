"""Planning the next request on a background thread, while the caller is away (issue 12).

On a UE with 10 % of a core a decision of 0.5-2.6 ms of CPU took 8-100 ms of wall inside a request, waiting
for a CFS quota that the request's own sending had spent (session 10/11, ``bench/bench_plan_ms.py``). Deciding
after each request before the call returns (``ClientOptions.plan_after``) took it off the request's clock but
not off the caller's. Here the decision for request n + 1 is made on a worker thread after request n returned;
request n + 1 first waits for that worker (its wait is part of its ``plan_ms``) and then takes the decision
only if every input it was made with is still exactly the same, else it decides itself from the state the
background decision started from (a *speculation*: the background thread decides on a copy of the
``DecisionCache``, and the copy replaces the cache only when the request takes its decision). So the decision
a request runs with is, by construction, the one it would have made itself without the thread (the
decision is a deterministic function of the cache and the inputs: the online tables of ``auto`` / ``mjoa`` /
the planners; only a search cut off by a time budget, ``plan_budget_s`` for the offline searches, can
differ between two runs of the same decision, with or without the thread).

:class:`BackgroundPlanner` is the worker: one daemon thread per engine, started at the first job, that
leaves after ``IDLE_EXIT_S`` without one (a client that is dropped without ``close`` leaves no thread behind;
the thread holds only a weak reference to the engine). What it owns and how it stops:

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

log = logging.getLogger(__name__)

IDLE_EXIT_S = 10.0
"""Seconds the worker waits for a job before its thread ends (a later job starts a new one)."""


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
