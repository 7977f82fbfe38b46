"""The ARA planner child's side (``edge_server.plan_process``): ``python -m edge_server.plan_child``.

It reads plan jobs from stdin and writes replies to stdout, each a 4-byte little-endian length and a
UTF-8 JSON document (no pickle: the jobs are data the server built, the cost graphs the ones its strict
decoder parsed and bounded). A job names every UE's problem (``partitioner.allocation.UeProblem`` as
plain fields), with each cost graph sent once and then named by the id the parent gave it; the reply is
the :class:`partitioner.allocation.Allocation` that :func:`partitioner.allocation.ara` returned for them,
as plain data. Imports only ``partitioner`` (no torch, no grpc).

The child lowers its own CPU priority (``--nice``; ``--idle``: the ``SCHED_IDLE`` policy) before its
first job, and ends when stdin closes or when its parent process is gone (checked twice a second), so it
never outlives the server.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import struct
import sys
import threading
import time

_HEADER = struct.Struct("<I")
PROGRESS_S = 0.05
"""Seconds between the child's progress reports during a plan (``{"progress": job id, "work_s": each UE's
subproblem CPU seconds so far, the one running counted up to now}``): a plan stopped at its CPU budget is
charged by them (``edge_server.allocation.AraShareAllocator._charge``), not all to whoever caused it."""


def read_message(f) -> dict | None:
    """One length-prefixed JSON message from the binary stream ``f``; None at its end."""
    head = f.read(_HEADER.size)
    if len(head) < _HEADER.size:
        return None
    (n,) = _HEADER.unpack(head)
    body = f.read(n)
    if len(body) < n:
        return None
    return json.loads(body)


def encode_message(msg: dict) -> bytes:
    """``msg`` as a length-prefixed JSON message (``json.dumps`` writes floats exactly: ``repr``)."""
    body = json.dumps(msg, default=str).encode()
    return _HEADER.pack(len(body)) + body


def _jsonable(x):
    """Plan details as JSON-safe values (numbers, strings, lists, dicts; else their str)."""
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, list | tuple | set | frozenset):
        return [_jsonable(v) for v in (sorted(x, key=str) if isinstance(x, set | frozenset) else x)]
    if x is None or isinstance(x, bool | int | float | str):
        return x
    return str(x)


def plan_job(job: dict, graphs: dict, cache=None) -> dict:
    """Run ARA for one job (``graphs``: the graph cache, id -> CostGraph, updated with the job's new
    graphs and pruned to those it names; ``cache``: the ``partitioner.allocation.SubproblemCache`` kept
    across jobs, None for a fresh one; the job's ``frozen``: UEs not re-solved). Returns the reply
    (``shares``, ``plans``, ``objective_ms``, ``history``, ``uplink_rule``, ``predicted_ms``, ``work_s``:
    each UE's subproblem CPU seconds, ``stale``: the UEs whose last plan was reused, ``cpu_s``: this job's
    process CPU seconds)."""
    from partitioner import CostGraph, Link
    from partitioner.allocation import UeProblem, ara
    from partitioner.state import ServerState

    cpu0 = time.process_time()
    for gid, d in job.get("graphs", {}).items():
        graphs[gid] = CostGraph.from_dict(d)
    problems = []
    for p in job["problems"]:
        up, down, rtt = p["link"]
        state = p.get("state")
        problems.append(UeProblem(p["ue"], graphs[p["graph"]], Link(up, down, rtt), p["weight"],
                                  None if state is None else ServerState.from_dict(state), p["send_mbps"]))
    named = {p["graph"] for p in job["problems"]}
    for gid in [g for g in graphs if g not in named]:
        del graphs[gid]
    a = ara(problems, policy=job["policy"], max_rounds=job["max_rounds"], policy_options=job.get("policy_options"),
            cache=cache, frozen=frozenset(job.get("frozen") or ()))
    return {
        "shares": {u: None if s is None else [s.compute, s.uplink] for u, s in a.shares.items()},
        "plans": {u: _jsonable(p.to_dict()) for u, p in a.plans.items()},
        "objective_ms": a.objective_ms,
        "history": list(a.history),
        "uplink_rule": a.uplink_rule,
        "predicted_ms": a.predicted_ms,
        "work_s": a.work_s,
        "stale": sorted(a.stale),
        "cpu_s": time.process_time() - cpu0,
    }


class _Reporter:
    """Writes the replies, and every ``PROGRESS_S`` during a job a progress report, to ``out`` (one lock:
    a report never interleaves with a reply, and none is written for a job once its reply is)."""

    def __init__(self, out, cache) -> None:
        self.out, self.cache = out, cache
        self.lock = threading.Lock()
        self.job = None
        self.clock = None
        with contextlib.suppress(AttributeError, OSError):  # the planning thread's CPU clock, read from here
            self.clock = time.pthread_getcpuclockid(threading.get_ident())
        threading.Thread(target=self._loop, daemon=True).start()

    def start(self, job_id) -> None:
        with self.lock:
            self.job = job_id

    def reply(self, reply: dict) -> None:
        with self.lock:
            self.job = None
            self.out.write(encode_message(reply))
            self.out.flush()

    def work_now(self) -> dict:
        """Each UE's subproblem CPU seconds in the running job so far (the subproblem running counted up to
        now when the planning thread's CPU clock can be read)."""
        work = dict(self.cache.work_s)
        cur = self.cache.current
        if cur is not None and self.clock is not None:
            with contextlib.suppress(OSError):
                work[cur[0]] = work.get(cur[0], 0.0) + max(0.0, time.clock_gettime(self.clock) - cur[1])
        return work

    def _loop(self) -> None:
        while True:
            time.sleep(PROGRESS_S)
            with self.lock:
                if self.job is None:
                    continue
                with contextlib.suppress(Exception):  # (a dict resized under us: the next report)
                    self.out.write(encode_message({"progress": self.job, "work_s": self.work_now()}))
                    self.out.flush()


def _watch_parent(parent: int) -> None:
    """End the process once its parent is gone (a server killed with SIGKILL closes no pipe of ours
    until the kernel reaps it; a re-parented child must not plan on)."""
    while True:
        time.sleep(0.5)
        if os.getppid() != parent:
            os._exit(0)


def lower_priority(nice: int, idle: bool) -> None:
    """This process's CPU priority: ``nice`` added to its niceness, and with ``idle`` the ``SCHED_IDLE``
    policy (it runs only when no other runnable thread of the CPU wants it). Failures are ignored (the
    job still runs)."""
    if nice:
        with contextlib.suppress(OSError):
            os.nice(nice)
    if idle and hasattr(os, "SCHED_IDLE"):
        with contextlib.suppress(OSError):
            os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nice", type=int, default=0)
    ap.add_argument("--idle", action="store_true")
    a = ap.parse_args(argv)
    lower_priority(a.nice, a.idle)
    threading.Thread(target=_watch_parent, args=(os.getppid(),), daemon=True).start()
    inp = sys.stdin.buffer
    out = os.fdopen(os.dup(1), "wb")  # the replies' channel; stray prints go to stderr, not into it
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    import partitioner.allocation  # (loaded before "ready": its import is no job's CPU)

    out.write(encode_message({"ready": True}))
    out.flush()
    graphs: dict = {}
    cache = partitioner.allocation.SubproblemCache()  # each UE's solves, kept across jobs
    reporter = _Reporter(out, cache)
    while True:
        job = read_message(inp)
        if job is None:
            return 0
        cache.work_s = {}
        reporter.start(job.get("id"))
        try:
            reply = plan_job(job, graphs, cache)
        except Exception as e:  # a planner error is the job's answer, the child keeps serving
            reply = {"error": f"{type(e).__name__}: {e}"[:2000], "work_s": reporter.work_now()}
        reply["id"] = job.get("id")
        reporter.reply(reply)


if __name__ == "__main__":
    sys.exit(main())
