"""ARA's search in a child process: the planner CPU of every join, profile update and claim correction is
spent outside the server process (its GIL) and at a lower CPU priority than the serving threads.

:class:`ChildPlanner` is the ``planner`` of ``partitioner.allocation.Allocator`` on the server: called
with the UEs' problems, it sends them to its child (``python -m edge_server.plan_child``) as plain JSON
data (cost graphs already parsed by the server's strict decoder and bounded,
``partitioner.allocation.bounded_graph``; each graph sent once and then named by an id), waits for the
reply within its deadlines (below), checks it (one share pair in [0, 1] or none per UE named, numbers
finite) and returns the :class:`partitioner.allocation.Allocation`. The child runs the same
``partitioner.allocation.ara`` as the server would on the same inputs (tests/test_plan_process.py compares
them); nothing is unpickled on either side.

A child that dies, answers with an error or nonsense, or runs past a deadline is killed (then replaced
at the next plan) and the call raises :class:`PlannerFailed`: the allocator keeps the shares it published
last (``AraShareAllocator``).

The deadlines of one plan (and, apart, of the child's start), checked every ``CHECK_S`` while waiting
(session 14; before, a bare 30 s of wall time: at load 12 the niced child starved and an honest 30-op plan
was killed for the load):

- **CPU**: the child's user + system CPU time for this plan (psutil) over ``cpu_budget_s`` -> killed,
  failed. A runaway plan (a loop) ends here however loaded or idle the machine is.
- **Stall**: ``deadline_s`` counts only the wall time in which the child made no progress: neither its CPU
  time advanced nor was it seen runnable (state ``R``: on a CPU, or waiting in the run queue, throttled by
  a cgroup quota included). A child that sleeps or blocks (hung, waiting on something that never comes)
  is killed ``deadline_s`` after it stopped; a starved one (runnable, waiting for the CPU because of the
  load or its niceness) is not: its clock restarts at each check that sees it runnable.
- **Cap**: ``max_wall_s`` wall seconds in all, whatever the child does (so one starved plan cannot hold
  the plan queue forever; default 10 x ``deadline_s``).

The child's CPU time is read with ``psutil`` around each plan (also a plan that failed), summed in
:attr:`ChildPlanner.cpu_s`; the child also reports each UE's own subproblem CPU (``Allocation.work_s``;
its ``partitioner.allocation.SubproblemCache`` memoizes each UE's solves across plans). The allocator
charges each UE's part to that UE's owner and the rest to whoever caused the re-plan
(``AraShareAllocator._charge``). How the child is
kept from the serving threads' CPU: ``nice`` (default ``PLAN_NICE``) and,
with ``idle``, Linux's ``SCHED_IDLE`` policy; both need no cgroup (README, Security model).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import select
import subprocess
import sys
import threading
import time
import weakref

import psutil

from edge_server.plan_child import encode_message
from partitioner.allocation import Allocation, UeProblem
from partitioner.plan import Plan
from partitioner.state import Shares

logger = logging.getLogger(__name__)

__all__ = ["PLAN_CPU_BUDGET_S", "PLAN_DEADLINE_S", "PLAN_NICE", "ChildPlanner", "PlannerFailed"]

PLAN_DEADLINE_S = 30.0
"""Wall seconds a plan's child may go without progress (neither CPU time advancing nor runnable: see the
module's docstring) before it is killed and the current allocation stays in force."""
PLAN_CPU_BUDGET_S = 10.0
"""CPU seconds (user + system) one plan (and, apart, the child's start) may use in the child. ARA's plans
are bounded by size (``PLAN_SIZE``, ``TOTAL_PLAN_SIZE``): the largest measured, eight captured models
joining, took 1.25 CPU s (session 12); the child's start ~0.5 CPU s."""
PLAN_MAX_WALL_FACTOR = 10.0
"""``max_wall_s`` defaults to this times ``deadline_s`` (300 s with the defaults)."""
CHECK_S = 0.25
"""Seconds between two checks of the child's CPU time and state while a plan waits for it."""
PLAN_NICE = 10
"""Niceness added to the planner child: under contention it gets ~1/10 of the CPU time of one serving
thread at niceness 0 (the kernel's weights: 110 vs 1024), and all of an idle core."""


_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
"""The directory holding this ``edge_server`` package (first on the child's PYTHONPATH)."""


class PlannerFailed(Exception):
    """The child could not plan (it died, failed, answered out of contract, or ran past a deadline).

    ``over_limit``: True when the child was stopped for a plan's CPU budget or wall cap (the problems were
    too big to plan), False for other failures. ``work_s``: each UE's own subproblem CPU seconds in the
    failed plan as far as the child reported it (its progress reports, ``PROGRESS_S`` apart, or its
    error reply); empty when unknown."""

    def __init__(self, message: str, *, over_limit: bool = False) -> None:
        super().__init__(message)
        self.over_limit = over_limit
        self.work_s: dict[str, float] = {}


def _cpu_s(ps: psutil.Process | None) -> float:
    """User + system CPU seconds of ``ps`` (0.0 when None or gone)."""
    try:
        t = ps.cpu_times() if ps is not None else None
    except psutil.Error:
        return 0.0
    return 0.0 if t is None else t.user + t.system


class _Watch:
    """The deadlines of one exchange with the child (module docstring): CPU budget, stall, wall cap.

    ``check()`` raises PlannerFailed when one is passed; ``wait_s()`` is how long the caller may block on
    the pipe before the next check."""

    def __init__(self, ps: psutil.Process | None, *, cpu_budget_s: float, stall_s: float, max_wall_s: float,
                 what: str) -> None:
        self._ps = ps
        self.cpu_budget_s, self.stall_s, self.max_wall_s, self.what = cpu_budget_s, stall_s, max_wall_s, what
        self.t0 = self.last_alive = self._checked = time.monotonic()
        self.cpu0 = self.last_cpu = self._cpu()

    def _cpu(self) -> float:
        return _cpu_s(self._ps)

    def _runnable(self) -> bool:
        try:
            return self._ps is not None and self._ps.status() == psutil.STATUS_RUNNING
        except psutil.Error:
            return False

    def tick(self) -> None:
        """``check()`` when ``CHECK_S`` passed since the last one (after the pipe moved: a child that
        trickles bytes is checked too)."""
        if time.monotonic() - self._checked >= CHECK_S:
            self.check()

    def check(self) -> None:
        now = self._checked = time.monotonic()
        cpu = self._cpu()
        used = cpu - self.cpu0
        if used > self.cpu_budget_s:
            raise PlannerFailed(f"{self.what} used {used:.2f} CPU s, over its budget of {self.cpu_budget_s:g} s: "
                                "the planner child was stopped", over_limit=True)
        if cpu > self.last_cpu or self._runnable():
            self.last_cpu, self.last_alive = cpu, now
        elif now - self.last_alive > self.stall_s:
            raise PlannerFailed(f"{self.what}: the planner child made no progress for {self.stall_s:g} s (neither "
                                "ran nor waited for a CPU) and was stopped")
        if now - self.t0 > self.max_wall_s:
            raise PlannerFailed(f"{self.what}: no answer within {self.max_wall_s:g} s of wall time (used "
                                f"{used:.2f} CPU s): the planner child was stopped", over_limit=True)

    def wait_s(self) -> float:
        return CHECK_S


def _kill(proc: subprocess.Popen) -> None:
    with contextlib.suppress(OSError):
        proc.kill()
    with contextlib.suppress(Exception):
        proc.wait(5)
    for f in (proc.stdin, proc.stdout):
        with contextlib.suppress(Exception):
            f.close()


class ChildPlanner:
    """Runs ``partitioner.allocation.ara`` in one long-lived child process, one plan at a time.

    Call it like ``ara``: ``planner(problems, policy=, max_rounds=, policy_options=)`` -> ``Allocation``
    (the plans' ``details`` come back as JSON values). Raises :class:`PlannerFailed` when no valid answer
    came within the deadlines (the module's docstring: ``cpu_budget_s`` CPU seconds, ``deadline_s`` wall
    seconds without progress, ``max_wall_s`` in all; the child is then killed, the next call starts another).
    Thread-safe (calls are serialised). :meth:`close` kills the child and refuses later calls.
    """

    def __init__(self, *, deadline_s: float = PLAN_DEADLINE_S, nice: int = PLAN_NICE, idle: bool = False,
                 command: list[str] | None = None, cpu_budget_s: float = PLAN_CPU_BUDGET_S,
                 max_wall_s: float | None = None) -> None:
        """``deadline_s``: wall seconds without progress per plan (> 0); ``cpu_budget_s``: the child's CPU
        seconds per plan (> 0); ``max_wall_s``: wall seconds per plan in all (default
        ``PLAN_MAX_WALL_FACTOR`` x ``deadline_s``; >= ``deadline_s``); ``nice``: 0-19 added to the child's
        niceness; ``idle``: also ``SCHED_IDLE``; ``command``: the child's argv (tests: a child that fails;
        default ``python -m edge_server.plan_child``). Raises ValueError for a bad deadline, budget or nice."""
        if not deadline_s > 0 or not math.isfinite(deadline_s):
            raise ValueError("deadline_s must be a finite number > 0")
        if not cpu_budget_s > 0 or not math.isfinite(cpu_budget_s):
            raise ValueError("cpu_budget_s must be a finite number > 0")
        if max_wall_s is None:
            max_wall_s = PLAN_MAX_WALL_FACTOR * deadline_s
        if not max_wall_s >= deadline_s or not math.isfinite(max_wall_s):
            raise ValueError("max_wall_s must be finite and >= deadline_s")
        if not 0 <= nice <= 19:
            raise ValueError("nice must be in 0..19")
        self.deadline_s = float(deadline_s)
        self.cpu_budget_s = float(cpu_budget_s)
        self.max_wall_s = float(max_wall_s)
        self.nice, self.idle = int(nice), bool(idle)
        self._command = command
        self._lock = threading.Lock()
        self._proc: subprocess.Popen | None = None
        self._ps: psutil.Process | None = None
        self._finalizer = None
        self._sent: dict[int, tuple[str, object]] = {}
        """id(graph) -> (the child's id for it, the graph: kept so that its id() is not reused)."""
        self._next_gid = 0
        self._next_job = 0
        self._closed = False
        self.cpu_s = 0.0
        """CPU seconds (user + system) the children spent in plans since start (failed ones too)."""
        self.children_started = 0
        self.failures = 0
        """Plans that raised PlannerFailed."""
        self._progress: object = {}
        """The running plan's last progress report (``work_s``, as the child sent it)."""

    @property
    def closed(self) -> bool:
        """True once :meth:`close` was called."""
        return self._closed

    @property
    def pid(self) -> int | None:
        """The live child's process id (None when none is running)."""
        p = self._proc
        return p.pid if p is not None and p.poll() is None else None

    def __call__(self, problems: list[UeProblem], *, policy: str = "mjoa", max_rounds: int = 10,
                 policy_options: dict | None = None, frozen: frozenset[str] = frozenset()) -> Allocation:
        with self._lock:
            if self._closed:
                raise PlannerFailed("the planner is closed (the server is stopping)")
            self._ensure_child()  # (a start has deadlines of its own)
            cpu0 = self._child_cpu()
            try:
                job = self._job(problems, policy, max_rounds, policy_options)
                if frozen:
                    job["frozen"] = sorted(frozen)
                reply = self._exchange(job, self._watch("a plan"))
                return self._allocation(reply, problems)
            except PlannerFailed as e:
                e.work_s = self._checked_work(self._progress, problems)
                self.failures += 1
                self.cpu_s += max(0.0, self._child_cpu() - cpu0)
                self._stop_child()
                raise
            finally:
                if self._proc is not None:
                    self.cpu_s += max(0.0, self._child_cpu() - cpu0)

    def prestart(self) -> None:
        """Start the child now (its interpreter and ``partitioner`` import: ~0.5 CPU s, charged to no plan)
        so that the first plan does not wait for it; a failure is logged (the first plan tries again)."""
        with self._lock:
            if self._closed:
                return
            try:
                self._ensure_child()
            except PlannerFailed as e:
                logger.warning("ARA planner child did not start early (%s); the first plan starts one", e)

    def close(self) -> None:
        """Kill the child (idempotent); later calls raise PlannerFailed. A plan running meanwhile ends at
        once (its child is gone: PlannerFailed), so the server's stop does not wait for it."""
        self._closed = True
        proc = self._proc
        if proc is not None:
            with contextlib.suppress(OSError):
                proc.kill()
        with self._lock:
            self._stop_child()

    # -- the child ----------------------------------------------------------------------------------

    def _watch(self, what: str) -> _Watch:
        return _Watch(self._ps, cpu_budget_s=self.cpu_budget_s, stall_s=self.deadline_s, max_wall_s=self.max_wall_s,
                      what=what)

    def _ensure_child(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            return
        self._stop_child()
        argv = self._command or [sys.executable, "-m", "edge_server.plan_child", "--nice", str(self.nice)]
        if self._command is None and self.idle:
            argv.append("--idle")
        env = dict(os.environ)  # the child imports the same edge_server / partitioner as this process
        env["PYTHONPATH"] = os.pathsep.join(p for p in (_ROOT, env.get("PYTHONPATH", "")) if p)
        try:
            proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, close_fds=True, env=env)
        except OSError as e:
            raise PlannerFailed(f"could not start the planner child: {e}") from e
        self._proc = proc
        self._finalizer = weakref.finalize(self, _kill, proc)  # an allocator dropped unclosed ends its child
        self.children_started += 1
        try:
            self._ps = psutil.Process(proc.pid)
        except psutil.Error:
            self._ps = None
        try:
            ready = self._read(self._watch("the planner child's start"))
        except PlannerFailed:
            self.failures += 1
            self._stop_child()
            raise
        if ready.get("ready") is not True:
            self.failures += 1
            self._stop_child()
            raise PlannerFailed("the planner child did not start")
        logger.info("ARA planner child %d started (nice +%d%s)", proc.pid, self.nice,
                    ", SCHED_IDLE" if self.idle else "")

    def _stop_child(self) -> None:
        proc, self._proc, self._ps = self._proc, None, None
        self._sent.clear()
        if self._finalizer is not None:
            self._finalizer.detach()
            self._finalizer = None
        if proc is not None:
            _kill(proc)

    def _child_cpu(self) -> float:
        return _cpu_s(self._ps)

    def _job(self, problems: list[UeProblem], policy: str, max_rounds: int, policy_options: dict | None) -> dict:
        """The job as plain data; graphs the child does not hold yet go with it."""
        new, live, out = {}, {}, []
        for pb in problems:
            key = id(pb.graph)
            got = self._sent.get(key)
            if got is None or got[1] is not pb.graph:
                self._next_gid += 1
                got = (str(self._next_gid), pb.graph)
                new[got[0]] = pb.graph.to_dict()
            live[key] = got
            link = pb.link
            out.append({"ue": pb.ue_id, "graph": got[0], "link": [link.uplink_mbps, link.downlink_mbps, link.rtt_ms],
                        "weight": pb.weight, "state": None if pb.state is None else pb.state.to_dict(),
                        "send_mbps": pb.send_mbps})
        self._sent = live  # the child prunes its cache to the graphs this job names, likewise
        self._next_job += 1
        return {"id": self._next_job, "policy": policy, "max_rounds": max_rounds,
                "policy_options": policy_options, "graphs": new, "problems": out}

    @staticmethod
    def _checked_work(work, problems: list[UeProblem]) -> dict[str, float]:
        """``work`` (a progress report's or error reply's ``work_s``) kept for the UEs planned, finite CPU
        times >= 0 only (the child is ours, but what it says is checked like its replies)."""
        ues = {pb.ue_id for pb in problems}
        out: dict[str, float] = {}
        if isinstance(work, dict):
            for u, v in work.items():
                if u in ues and isinstance(v, int | float) and 0 <= v < math.inf:
                    out[u] = float(v)
        return out

    def _exchange(self, job: dict, watch: _Watch) -> dict:
        self._progress = {}
        try:
            data = encode_message(job)
        except (TypeError, ValueError) as e:
            raise PlannerFailed(f"plan job not encodable: {e}") from e
        try:
            self._write(data, watch)
        except OSError as e:
            raise PlannerFailed(f"the planner child is gone ({e})") from e
        while True:  # the child's progress reports (each UE's work so far), then its reply
            reply = self._read(watch)
            if "progress" not in reply:
                break
            if reply["progress"] == job["id"]:
                self._progress = reply.get("work_s")
        if reply.get("id") != job["id"]:
            raise PlannerFailed("the planner child answered another job")
        if "error" in reply:
            self._progress = reply.get("work_s", self._progress)
            raise PlannerFailed(f"the planner child failed: {str(reply['error'])[:500]}")
        return reply

    def _write(self, data: bytes, watch: _Watch) -> None:
        fd = self._proc.stdin.fileno()
        view = memoryview(data)
        while view:
            if not select.select([], [fd], [], watch.wait_s())[1]:
                watch.check()  # raises past a deadline
                continue
            n = os.write(fd, view[: 1 << 16])
            watch.tick()
            view = view[n:]

    def _read(self, watch: _Watch) -> dict:
        """The child's next message, read within ``watch``'s deadlines (PlannerFailed past one)."""
        import json
        import struct

        fd = self._proc.stdout.fileno()
        buf = bytearray()
        need = 4
        while len(buf) < need:
            if not select.select([fd], [], [], watch.wait_s())[0]:
                watch.check()  # raises past a deadline
                continue
            chunk = os.read(fd, min(need - len(buf), 1 << 20))
            if not chunk:
                code = self._proc.poll()
                if code is None:
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        code = self._proc.wait(1)
                raise PlannerFailed(f"the planner child ended (exit code {code})")
            buf += chunk
            watch.tick()
            if need == 4 and len(buf) >= 4:
                need = 4 + struct.unpack("<I", bytes(buf[:4]))[0]
        try:
            msg = json.loads(bytes(buf[4:need]))
        except ValueError as e:
            raise PlannerFailed(f"the planner child answered no JSON: {e}") from e
        if not isinstance(msg, dict):
            raise PlannerFailed("the planner child answered no object")
        return msg

    @staticmethod
    def _allocation(reply: dict, problems: list[UeProblem]) -> Allocation:
        """The reply as an Allocation, checked against the job: one entry per UE asked about, shares
        None or two numbers in [0, 1], finite objective. Raises PlannerFailed otherwise."""
        ues = [pb.ue_id for pb in problems]
        try:
            raw = reply["shares"]
            if not isinstance(raw, dict) or sorted(raw) != sorted(ues):
                raise ValueError("shares do not name the UEs planned")
            shares: dict[str, Shares | None] = {}
            for u in ues:
                s = raw[u]
                if s is None:
                    shares[u] = None
                    continue
                c, b = (float(x) for x in s)
                if not (0 <= c <= 1 and 0 <= b <= 1):
                    raise ValueError(f"share out of range for {u[:8]}: {s}")
                shares[u] = Shares(compute=c, uplink=b)
            plans = {}
            for u, d in reply["plans"].items():
                if u not in raw:
                    raise ValueError("a plan for a UE not planned")
                d = dict(d)
                d["upload_order"] = tuple(d.get("upload_order") or ())
                plans[u] = Plan(**d)
            objective = float(reply["objective_ms"])
            history = tuple(float(x) for x in reply["history"])
            predicted = {str(u): float(v) for u, v in reply["predicted_ms"].items()}
            rule = str(reply["uplink_rule"])
            work = {str(u): float(v) for u, v in (reply.get("work_s") or {}).items()}
            if any(u not in raw or not 0 <= v < math.inf for u, v in work.items()):
                raise ValueError("work_s names a UE not planned or is not a finite CPU time >= 0")
            stale = frozenset(str(u) for u in reply.get("stale") or ())
            if not stale <= set(ues):
                raise ValueError("stale names a UE not planned")
        except (KeyError, TypeError, ValueError) as e:
            raise PlannerFailed(f"the planner child answered out of contract: {e}") from e
        if math.isnan(objective):
            raise PlannerFailed("the planner child answered a NaN objective")
        return Allocation(shares, plans, objective, history, rule, predicted, work, stale)
