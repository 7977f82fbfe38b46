"""Untrusted first-time profiling in child processes (ProfileGraph, ``--profile-workers N``): the
stranger's validation and profile run hold the child's GIL and memory, not the server's.

A ProfileGraph slice comes from any client and must be validated (pure-Python work, linear in its
size) and then run op by op on random data (Python dispatch between kernels). In the server process
both hold the GIL against every other tenant's request thread. Here each job runs in a child process that

* is forked from a warm template (``multiprocessing`` forkserver with torch and the validator
  preloaded, so a new child does not import torch and register the meta kernels again), and lives as
  long as the server (one per profile worker thread);
* runs at the CPU priority the operator chose (``--profile-nice``, default 0: one more thread beside the
  compute workers; a positive value yields the CPU to sessions under contention, but the child's op
  times are wall times, so they then stretch with the machine's load and overstate the server's cost);
* runs each slice under an address-space limit (``RLIMIT_AS``): its estimated needs plus the per-op
  workspace bound and ``SLACK_BYTES``, so a kernel workspace that the estimates miss ends in MemoryError
  in the child (RESOURCE_EXHAUSTED), never in the server; the server reserves the estimated needs in its
  own ``--memory-mb`` budget while the job runs (the template's and children's own interpreter and torch
  are outside the server process and its budget);
* stops at the next op boundary when the caller goes away (a shared event, watched during the run);
* is charged its CPU time (``psutil``) to the caller's ProfileGraph budget every ``CHARGE_PERIOD_S``
  while a job runs, and stopped once the budget is spent: a run at its next op boundary, a validation
  (which has none) or a run past ``STOP_GRACE_S`` by killing the child (replaced at the next job).

It is not the default: a child computes beside the server instead of yielding to other tenants at op
boundaries, which on a 2-core machine made a victim tenant slower (README, Attacks). Job data and
results cross the pipe as JSON (``Connection.send_bytes``): nothing a client sent is unpickled. Jobs
queue per tenant in a :class:`~edge_server.scheduler.ComputeScheduler` whose worker threads each own one
child, so one tenant's profiles cannot queue ahead of all others'.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import multiprocessing
import sys
import threading
from dataclasses import dataclass
from typing import Any

import psutil

from edge_server.errors import InvalidArgument, ResourceExhausted
from edge_server.op_budget import OpOverBudget
from edge_server.profile_budget import BudgetTooSmall, ProfileBudgetExceeded, TenantBucket
from edge_server.profiling import OpFailed, OpProfile, ProfileResult
from edge_server.slices import SliceRejected

logger = logging.getLogger(__name__)

__all__ = ["CancelToken", "ProfileJob", "ProfileSandbox", "SandboxCancelled", "SandboxUnavailable"]

MiB = 1 << 20
CHARGE_PERIOD_S = 0.02
"""How often the parent charges a running job's CPU time to the caller's budget and checks it."""
STOP_GRACE_S = 1.0
"""How long a run told to stop (its budget spent) may take to reach its next op boundary before its
child is killed."""
SLACK_BYTES = 256 * MiB
"""Address space a child may grow by beyond a slice's estimated needs (allocator arenas, kernels'
small buffers) before an allocation fails."""

_ERRORS: dict[str, type[Exception]] = {
    "SliceRejected": SliceRejected,
    "OpOverBudget": OpOverBudget,
    "OpFailed": OpFailed,
    "InvalidArgument": InvalidArgument,
    "ResourceExhausted": ResourceExhausted,
}


class CancelToken:
    """Cancels one job: before it starts, or in its child at the next op boundary (any thread)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._cancelled = False
        self._child: _Child | None = None

    def cancel(self) -> None:
        with self._lock:
            self._cancelled = True
            if self._child is not None:
                self._child.cancel.set()

    def is_set(self) -> bool:
        return self._cancelled

    def _attach(self, child: _Child | None) -> None:
        with self._lock:
            self._child = child
            if child is not None and self._cancelled:
                child.cancel.set()


class SandboxUnavailable(Exception):
    """No child process could be started here (e.g. a script without an ``if __name__ == "__main__":``
    guard, which the forkserver must re-import); the caller profiles in its own process instead."""


class SandboxCancelled(Exception):
    """The job was cancelled; the child stopped at an op boundary (``ops_after_cancel`` ops ran after)."""

    def __init__(self, ops_after_cancel: int) -> None:
        super().__init__("profile cancelled")
        self.ops_after_cancel = ops_after_cancel


@dataclass(frozen=True)
class ProfileJob:
    """One ProfileGraph as the child runs it (JSON-able).

    ``spec_json``: the client's slice (UTF-8 JSON text); ``iterations``/``warmup``: counts (already
    clamped); ``device``: torch device string; ``max_tensor_bytes``/``max_slice_bytes``: the server's
    slice limits (bytes); ``op_limits``: :class:`OpLimits` as a dict."""

    spec_json: str
    iterations: int
    warmup: int
    device: str
    max_tensor_bytes: int
    max_slice_bytes: int
    op_limits: dict[str, Any]


class ProfileSandbox:
    """Runs ProfileGraph jobs in memory-limited child processes, ``workers`` at a time.

    :meth:`run` blocks the calling thread (call it on one of :attr:`scheduler`'s workers, which the
    runtime does): the thread's child validates the slice, reports what it needs, runs it once the
    ``admit`` callback has reserved that memory, and returns the :class:`ProfileResult`. Errors are
    the in-process ones (SliceRejected, OpOverBudget, OpFailed: INVALID_ARGUMENT / RESOURCE_EXHAUSTED);
    a child that dies (e.g. killed for memory) is replaced and the job gets ResourceExhausted.
    """

    def __init__(self, workers: int = 1, *, torch_threads: int = 1, nice: int = 0) -> None:
        """``workers``: children (jobs at once); ``torch_threads``: intra-op threads of each child (the
        server's); ``nice``: CPU priority offset of the children (0-19)."""
        from edge_server.scheduler import ComputeScheduler

        if not 0 <= nice <= 19:
            raise ValueError("nice must be in 0..19")
        self.nice = int(nice)
        self.torch_threads = max(1, int(torch_threads))
        self.scheduler = ComputeScheduler(workers, name="coinfer-profile")
        """Fair queue of jobs per tenant; each of its worker threads owns one child (``_local``)."""
        self._local = threading.local()
        self._children: list[_Child] = []
        self._lock = threading.Lock()
        self._closed = False
        self.children_started = 0
        self.children_lost = 0
        self.runs_started = 0
        """Jobs whose slice validated and whose run the child began (after the memory was reserved)."""
        self.budget_kills = 0
        """Children killed because their job's CPU budget was spent while it could not stop at an op
        boundary (validating, or one op past ``STOP_GRACE_S``)."""
        _prestart()

    # -- parent side ---------------------------------------------------------------------------------

    def run(self, job: ProfileJob, admit, cancel: CancelToken, bucket: TenantBucket | None = None) -> ProfileResult:
        """Blocking: the profile of ``job`` in this thread's child.

        ``admit(graph_hash, need_bytes)`` is called once the slice validated; it returns a context
        manager holding that memory reservation (or raises, e.g. ResourceExhausted). ``cancel`` set:
        the child stops at the next op boundary (or before the run) and this raises
        :class:`SandboxCancelled`.

        ``bucket`` (the caller's ProfileGraph CPU budget): every ``CHARGE_PERIOD_S`` while the job runs
        the child's CPU time since the last charge (``psutil``: user + system of all its threads) is
        charged to it, and the rest when the job ends (failed or cancelled too). Once the bucket is spent
        (``TenantBucket.check`` raises ProfileBudgetExceeded) the job stops: a run at its next op
        boundary (the child's cancel event), and a child that does not answer within ``STOP_GRACE_S``
        (one op over it) or is still validating (validation has no op boundaries) is killed and replaced
        at the next job; this raises that ProfileBudgetExceeded (RESOURCE_EXHAUSTED)."""
        child = self._child()
        child.cancel.clear()
        cancel._attach(child)
        meter = _ChildCpu(child, bucket) if bucket is not None else None
        try:
            child.send({"job": dataclasses.asdict(job)})
            msg = self._reply(child, meter, stoppable=False)
            if "error" in msg:
                raise _error(msg)
            try:
                if cancel.is_set():
                    raise SandboxCancelled(0)
                hold = admit(msg["graph_hash"], int(msg["need"]))
            except BaseException:  # not run: the child waits for its go and must hear so before any next job
                child.send({"go": False})
                child.recv()
                raise
            with hold:
                limit = int(msg["need"]) + int(job.op_limits["max_workspace_bytes"]) + SLACK_BYTES
                child.send({"go": True, "limit_bytes": limit})
                with self._lock:
                    self.runs_started += 1
                msg = self._reply(child, meter, stoppable=True)
        except BaseException:
            if child.broken:
                self._drop(child)
            raise
        finally:
            cancel._attach(None)
            if meter is not None:
                meter.settle()
        if "cancelled" in msg:
            raise SandboxCancelled(int(msg["cancelled"]))
        if "error" in msg:
            raise _error(msg)
        r = msg["result"]
        return ProfileResult(
            r["graph_hash"],
            r["device"],
            [OpProfile(*o) for o in r["ops"]],
            r["total_mean_ms"],
            r["total_var_ms2"],
            r["iterations"],
        )

    async def profile(
        self, job: ProfileJob, holder: str, memory, on_cancel, bucket: TenantBucket | None = None
    ) -> ProfileResult:
        """The profile of ``job`` for tenant ``holder`` (its queue; its reservation in ``memory``, an
        ``edge_server.memory.MemoryBudget``), awaited on the event loop. When the caller is cancelled the
        running job stops at its next op boundary: ``on_cancel(None)`` at the cancel, then
        ``on_cancel(ops_after_cancel)`` once a started job has ended. ``bucket``, if given, is the
        caller's ProfileGraph CPU budget: admitted again when the job gets its child, before anything runs
        (the budget may have been spent while the job waited), then charged the child's CPU time while it
        runs and stopping it once spent (:meth:`run`). Raises what :meth:`run` and ``bucket.admit``
        raise."""
        key = f"profile:{holder}"
        self.scheduler.set_group(key, holder)
        cancel = CancelToken()

        def admit(_graph_hash: str, need: int):
            return memory.reserve(holder, need, "ProfileGraph")

        def job_in_child():
            if bucket is not None:
                bucket.admit()
            return self.run(job, admit, cancel, bucket)

        job_future = self.scheduler.submit(key, job_in_child)

        def ended(f) -> None:
            if not f.cancelled():  # (a job that never started has nothing to count)
                e = f.exception()
                on_cancel(e.ops_after_cancel if isinstance(e, SandboxCancelled) else 0)

        try:
            return (await asyncio.wrap_future(job_future)).value
        except asyncio.CancelledError:
            cancel.cancel()
            on_cancel(None)
            job_future.add_done_callback(ended)
            raise
        except SandboxCancelled:
            raise asyncio.CancelledError from None

    def _reply(self, child: _Child, meter: _ChildCpu | None, *, stoppable: bool) -> dict:
        """The child's next message; meanwhile, with a ``meter``, charge its CPU every
        ``CHARGE_PERIOD_S`` and stop the job once the bucket is spent (``stoppable``: a run, which stops
        at an op boundary when told; else, or if it does not answer within ``STOP_GRACE_S``, the child
        is marked broken, and the caller kills it). Raises ProfileBudgetExceeded when it stopped the job, or
        BudgetTooSmall (FAILED_PRECONDITION) when it stopped a validation that alone took more than the bucket's
        whole capacity (as in the server process: ``_ChildCpu.tick``)."""
        if meter is None:
            return child.recv()
        while not child.poll(CHARGE_PERIOD_S):
            try:
                meter.tick(validating=not stoppable)
            except (ProfileBudgetExceeded, BudgetTooSmall):
                if stoppable:
                    child.cancel.set()
                    if child.poll(STOP_GRACE_S):
                        child.recv()  # the job's end (stopped at an op boundary, or done just then): in step
                        raise
                child.broken = True  # validating, or one op past the grace: killed, replaced at the next job
                with self._lock:
                    self.budget_kills += 1
                meter.settle()  # (before the kill: its CPU up to now)
                raise
        return child.recv()

    def _child(self) -> _Child:
        child = getattr(self._local, "child", None)
        if child is not None and not child.broken:
            return child
        with self._lock:
            if self._closed:
                raise ResourceExhausted("the server is stopping")
            try:
                child = _Child.start(self.torch_threads, self.nice)
            except Exception as e:  # the start machinery's own errors (multiprocessing, OS)
                raise SandboxUnavailable(f"{type(e).__name__}: {e}") from e
            self._children.append(child)
            self.children_started += 1
        self._local.child = child
        try:  # its start-up (forked from the template, torch's thread pool) is charged to no job
            child.recv()  # {"ready": true}
        except ResourceExhausted:
            self._drop(child)
            raise
        return child

    def _drop(self, child: _Child) -> None:
        with self._lock:
            if child in self._children:
                self._children.remove(child)
            self.children_lost += 1
        child.kill()
        self._local.child = None

    def close(self) -> None:
        """Stop the queue and the children (idempotent)."""
        with self._lock:
            self._closed = True
            children, self._children = self._children, []
        self.scheduler.close(wait=False)
        for c in children:
            c.kill()


def _error(msg: dict) -> Exception:
    cls = _ERRORS.get(msg.get("error", ""))
    text = str(msg.get("message", ""))[:2000]
    if cls is None:
        return RuntimeError(f"profiling child failed: {msg.get('error')}: {text}")
    return cls(text)


class _ChildCpu:
    """Charges a child's CPU time (user + system, all threads) to a budget bucket as it is spent."""

    def __init__(self, child: _Child, bucket: TenantBucket) -> None:
        self._child = child
        self._bucket = bucket
        self._last = child.cpu_s()
        self._start = self._last
        """The child's CPU time when the job began (its start-up before it is no job's)."""

    def _charge(self) -> None:
        now = self._child.cpu_s()
        if now > self._last:
            self._bucket.charge(now - self._last)
            self._last = now

    def tick(self, validating: bool = False) -> None:
        """Charge what the child spent since the last charge; raise ProfileBudgetExceeded if spent.
        ``validating`` (the job has not reported its slice valid yet): the job's CPU since it began is the work in
        progress (``ProfileBudget.check``'s ``work_s``), so a validation that alone took more than the whole
        bucket is BudgetTooSmall (FAILED_PRECONDITION, no retry time) and one stopped by a bucket partly spent is
        told to retry when the bucket holds that much again, as a validation in the server process
        (``CpuMeter.check``). A run is checked as the server process checks its steps (nothing in progress)."""
        self._charge()
        self._bucket.check(self._last - self._start if validating else None)

    def settle(self) -> None:
        """Charge what the child spent since the last charge (idempotent; nothing once it is gone)."""
        self._charge()


class _Child:
    """One child process and the parent's end of its pipe (owned by one profile worker thread)."""

    def __init__(self, proc, conn, cancel) -> None:
        self.proc, self.conn, self.cancel = proc, conn, cancel
        self.broken = False
        self._ps: psutil.Process | None = None
        self._cpu = 0.0
        """The last CPU time read (what :meth:`cpu_s` answers once the child is gone)."""

    def cpu_s(self) -> float:
        """CPU seconds the child has used (user + system of all its threads); the last value read once it
        is gone."""
        try:
            if self._ps is None:
                self._ps = psutil.Process(self.proc.pid)
            t = self._ps.cpu_times()
            self._cpu = t.user + t.system
        except (psutil.Error, ValueError):
            pass
        return self._cpu

    def poll(self, timeout: float) -> bool:
        """True when a message (or the end of the pipe) can be read within ``timeout`` seconds."""
        try:
            return self.conn.poll(timeout)
        except (OSError, ValueError):
            return True  # recv() reports the loss

    @classmethod
    def start(cls, torch_threads: int, nice: int) -> _Child:
        ctx = _context()
        parent, child = ctx.Pipe()
        cancel = ctx.Event()
        proc = ctx.Process(
            target=_child_main, args=(child, cancel, torch_threads, nice), daemon=True, name="coinfer-profile"
        )
        with _main_not_reimported():
            proc.start()
        child.close()
        return cls(proc, parent, cancel)

    def send(self, msg: dict) -> None:
        try:
            self.conn.send_bytes(json.dumps(msg).encode())
        except (OSError, ValueError):
            self.broken = True
            raise self._lost() from None

    def recv(self) -> dict:
        """The child's next message (blocking)."""
        try:
            return json.loads(self.conn.recv_bytes())
        except (EOFError, OSError):
            self.broken = True
            raise self._lost() from None

    def _lost(self) -> ResourceExhausted:
        self.proc.join(1)
        code = self.proc.exitcode
        logger.warning("profiling child %s ended (exit code %s) during a job", self.proc.pid, code)
        how = f"was killed by signal {-code}" if code is not None and code < 0 else f"exited ({code})"
        return ResourceExhausted(f"the profiling process {how} while running this slice (out of memory?)")

    def kill(self) -> None:
        self.broken = True
        with contextlib.suppress(OSError):
            self.conn.close()
        if self.proc.is_alive():
            self.proc.kill()
        self.proc.join(5)


_CTX = None
_CTX_LOCK = threading.Lock()


def _context():
    """The forkserver context, its template process preloaded with torch and a warm validator."""
    global _CTX
    with _CTX_LOCK:
        if _CTX is None:
            ctx = multiprocessing.get_context("forkserver")
            ctx.set_forkserver_preload(["edge_server.sandbox_child"])
            _CTX = ctx
        return _CTX


@contextlib.contextmanager
def _main_not_reimported():
    """Start a child without it re-running the parent's ``__main__`` script. multiprocessing re-imports a
    script's main module in every forkserver/spawn child (for pickled functions defined there); the
    child runs only ``edge_server`` code, and re-running a user's unguarded script there would start
    whatever it starts (a second server, in a test here). A main module run with ``-m`` is imported by
    name, which guarded modules (``edge_server.cli``, pytest) tolerate, so only a script's path is hidden."""
    main = sys.modules.get("__main__")
    path = getattr(main, "__file__", None)
    if main is None or getattr(main, "__spec__", None) is not None or path is None:
        yield
        return
    with _CTX_LOCK:
        del main.__file__
        try:
            yield
        finally:
            main.__file__ = path


def _prestart() -> None:
    """Launch the forkserver template now: it imports torch and warms the validator in the background
    (several CPU seconds), so the first ProfileGraph's client does not wait for it (the first child
    fork then waits only for what is left of it). A failure here is logged; the first job then
    raises :class:`SandboxUnavailable` as before."""
    from multiprocessing import forkserver

    _context()
    try:
        with _main_not_reimported():
            forkserver.ensure_running()
    except Exception as e:  # the start machinery's own errors (multiprocessing, OS)
        logger.warning(
            "profiling template did not start early (%s: %s); it starts with the first job", type(e).__name__, e
        )


def _child_main(conn, cancel, torch_threads: int, nice: int) -> None:
    from edge_server.sandbox_child import serve

    serve(conn, cancel, torch_threads, nice)
