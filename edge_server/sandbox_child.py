"""The profiling child's side (``edge_server.sandbox``): imported once by the forkserver template
(torch, the validator and its meta kernels warm), then forked per child.

Each job: validate the client's slice exactly as the server would (``compile_slice`` on the part the
allowlist lets run), report the graph hash and the bytes it needs, wait for the parent's go, run the
profile under ``RLIMIT_AS`` = current address space + the granted bytes, checking the cancel event at
every op boundary, and answer with plain numbers. Messages are JSON both ways.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import resource
import threading

import torch

from edge_server.slices import warm_up_validation

warm_up_validation()  # at import: the template pays it once, every forked child inherits it


def serve(conn, cancel, torch_threads: int, nice: int) -> None:
    """Child main loop: says it is ready, then runs one job at a time until the parent closes the pipe."""
    if nice:
        with contextlib.suppress(OSError):
            os.nice(nice)
    torch.set_num_threads(torch_threads)
    _keep_heap()
    torch.ones(1 << 16).sum()  # start the intra-op pool before any memory limit applies
    try:  # ready: the parent meters each job's CPU from here on (this start-up is nobody's job)
        conn.send_bytes(json.dumps({"ready": True}).encode())
    except (EOFError, OSError):
        return
    while True:
        try:
            msg = json.loads(conn.recv_bytes())
        except (EOFError, OSError):
            return
        try:
            reply = _job(conn, cancel, msg["job"])
        except BaseException as e:
            reply = _error_reply(e)
        try:
            conn.send_bytes(json.dumps(reply).encode())
        except (EOFError, OSError):
            return


def _error_reply(e: BaseException) -> dict:
    """An exception as data for the parent (``sandbox._ERRORS`` names the classes it re-raises)."""
    from edge_server.errors import EdgeError
    from edge_server.op_budget import OpOverBudget
    from edge_server.profiling import OpFailed
    from edge_server.slices import SliceRejected

    if isinstance(e, MemoryError) or (isinstance(e, RuntimeError) and "alloc" in str(e).lower()):
        return {"error": "ResourceExhausted", "message": str(e)}
    for cls in (SliceRejected, OpOverBudget, OpFailed):
        if isinstance(e, cls):
            return {"error": cls.__name__, "message": str(e)}
    if isinstance(e, EdgeError):
        kind = "ResourceExhausted" if e.code == "RESOURCE_EXHAUSTED" else "InvalidArgument"
        return {"error": kind, "message": str(e)}
    return {"error": "error", "message": f"{type(e).__name__}: {e}"}


def _job(conn, cancel, job: dict) -> dict:
    from edge_server.op_budget import OpLimits
    from edge_server.profiling import ProfileCancelled, ProfileRun, profilable_part
    from edge_server.slices import compile_slice

    part, _unknown = profilable_part(job["spec_json"])
    cs = compile_slice(
        part,
        device=job["device"],
        max_tensor_bytes=job["max_tensor_bytes"],
        max_slice_bytes=job["max_slice_bytes"],
        require_hashes=False,
        op_limits=OpLimits(**job["op_limits"]),
    )
    cost = cs.cost
    need = cost.peak_bytes + cost.weight_bytes + sum(m.nbytes for m in cs.spec.inputs.values())
    conn.send_bytes(json.dumps({"graph_hash": cs.graph_hash, "need": need}).encode())
    go = json.loads(conn.recv_bytes())
    if not go.get("go"):
        return {"skipped": True}
    run = ProfileRun(cs, job["iterations"], job["warmup"])
    finished = threading.Event()

    def watch() -> None:  # the parent's cancel reaches the run as in the server: the op in flight counts
        while not finished.is_set():
            if cancel.wait(0.01):
                run.cancel()
                return

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()  # (its stack is mapped before the limit applies)
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    limit = _address_space() + int(go["limit_bytes"])
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    try:
        while not run.done:
            run.step(math.inf)  # stops at the next op boundary once cancelled (ProfileCancelled)
        r = run.result()
    except ProfileCancelled:
        return {"cancelled": run.ops_after_cancel}
    finally:
        finished.set()
        watcher.join()
        run.close()
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
    return {
        "result": {
            "graph_hash": r.graph_hash,
            "device": r.device,
            "ops": [[o.name, o.mean_ms, o.var_ms2] for o in r.ops],
            "total_mean_ms": r.total_mean_ms,
            "total_var_ms2": r.total_var_ms2,
            "iterations": r.iterations,
        }
    }


def _keep_heap() -> None:
    """Serve tensors from a heap that is kept, as in the long-running server: with glibc's defaults a
    fresh process mmaps and unmaps each large tensor, and in a VM every fresh page faults (a 1 MiB relu
    took ~6 ms instead of ~0.1 ms), which would make the child's op times wrong."""
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    m_trim_threshold, m_mmap_threshold = -1, -3
    libc.mallopt(m_mmap_threshold, 32 << 20)  # glibc's upper bound for the dynamic threshold
    libc.mallopt(m_trim_threshold, 1 << 30)


def _address_space() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
