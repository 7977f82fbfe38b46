"""The UE process's memory management: keep freed uplink buffers in the process heap instead of returning
them to the kernel (glibc only), and keep the long-lived objects out of Python's garbage collections
(``freeze_gc``, below).

Every chunk on the uplink allocates buffers of its size (the serialised message, and gRPC's own copy
of it) and frees them a moment later. With glibc's defaults a freed buffer of a chunk's size goes back
to the kernel (an ``mmap``ed block, or a heap top above the trim threshold), and the next chunk's
buffer faults every page in again, each one zeroed by the kernel: measured ~4,300-12,000 page faults
per 46 MB uploaded (1 MiB and 4 MiB chunks), a third of the UE's CPU per byte sent
(``bench/bench_uplink_cpu.py``). Raising glibc's ``M_MMAP_THRESHOLD`` above the largest message and
its ``M_TRIM_THRESHOLD`` to a few messages keeps those buffers for reuse; the process keeps at most
``TRIM_THRESHOLD`` bytes of free heap per arena that it would otherwise have handed back.

Skipped where the C library is not glibc, and where the user tuned malloc through the environment
(``GLIBC_TUNABLES`` or ``MALLOC_*_``), which wins.
"""

from __future__ import annotations

import ctypes
import logging
import os
import threading

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 16 << 20
"""Blocks up to this size come from the heap (the largest message is 8 MiB; glibc's ceiling is 32 MiB)."""
TRIM_THRESHOLD = 32 << 20
"""Free heap top an arena keeps before it gives memory back to the kernel."""

_lock = threading.Lock()
_done: bool | None = None


def _user_tuned() -> bool:
    env = os.environ
    return "malloc." in env.get("GLIBC_TUNABLES", "") or any(
        k in env for k in ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TOP_PAD_"))


def retain_freed_buffers() -> bool:
    """Apply the two thresholds once per process; True if they are in force (now or from before).

    Never raises: on another C library, or if ``mallopt`` refuses, it logs at DEBUG and returns False.
    """
    global _done
    with _lock:
        if _done is not None:
            return _done
        _done = False
        if _user_tuned():
            log.debug("malloc tuned through the environment; leaving it")
            return False
        try:
            libc = ctypes.CDLL(None)
            version = libc.gnu_get_libc_version
            version.restype = ctypes.c_char_p
            glibc = version().decode()
            ok = libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1 and \
                libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
        except (OSError, AttributeError) as e:
            log.debug("not glibc (%s): malloc thresholds left as they are", e)
            return False
        if not ok:
            log.debug("glibc %s refused the malloc thresholds", glibc)
            return False
        log.debug("glibc %s: heap keeps freed blocks up to %d MiB (trim above %d MiB)", glibc,
                  MMAP_THRESHOLD >> 20, TRIM_THRESHOLD >> 20)
        _done = True
        return True


# ---- Python's cyclic garbage collector ----------------------------------------------------------------
# After ``import torch`` and a model's capture a UE process tracks ~400,000 objects (googlenet: 403,000),
# nearly all of them alive for the whole process (torch's modules, the captured graph, the weights' tensors).
# A full collection walks them all: 176-191 ms of CPU at a full core here, i.e. ~0.7 s of latency on a UE with
# a quarter of a core, whenever one lands in a request (CPython runs one once the objects that survived
# younger collections exceed a quarter of those a full collection last found alive). ``gc.freeze`` (the
# standard library's way, Python >= 3.7) moves every tracked object to a permanent generation that
# collections skip: a full collection after it took 0.006 ms. Frozen objects are never collected, so the
# garbage is collected first, and the objects are released again (``gc.unfreeze``) once clients have closed
# ``UNFREEZE_AFTER`` times with none open; a process whose objects were frozen by someone else (a pre-fork
# server) is left alone.
# While any client stays open nothing is released, so what a closed client leaves as cyclic garbage stays
# frozen for as long: the client's objects must go by reference counting. Session 13 (one client open, 50
# constructions of a remote ``chain`` client closed one by one, edge server in another process) found 252
# objects of cyclic garbage per construction, the whole RemoteEngine with its model and session among them
# (an engine -> send-rate closure -> engine cycle, the session stream's queue closure and the gRPC call's
# traceback -> the receiver's frame -> stream): broken, 52 per construction are left, the cost graphs'
# ``partitioner.prep`` caches (a ``CostGraph`` and its ``Prepared`` refer to each other; ~2 graphs a client,
# ops x 2 ``OpCost``s), collected once the last client has closed ``UNFREEZE_AFTER`` times.
_gc_clients = 0
_gc_owned = False
_idle_closes = 0

UNFREEZE_AFTER = 8
"""Closes of a process's last open client before the frozen objects go back to the collector. Unfreezing at
every such close made the next client's construction collect the whole heap again: a second resnet50 client
in one process cost 273-333 ms of CPU at a full core (0-1 ms without the freeze), and the testbed builds a
client per policy stream. Kept frozen in between, only what each client made is collected; what became
cyclic garbage meanwhile (~500 objects a client, session 11) waits at most this many closes."""


def freeze_gc() -> bool:
    """Collect the garbage, then freeze every object the collector tracks (``gc.freeze``), and count one more
    client that wants them frozen (``release_gc`` when it closes). Returns True if it froze them, False if it
    left them alone (they were frozen by someone else before the first call). Thread-safe; the collection
    costs a full one's CPU once (~180 ms for googlenet's process; later calls only walk what was made since).

    It never asks ``gc.get_freeze_count()`` once it owns the freeze: that call walks the whole permanent
    generation (49 ms of CPU for resnet50's ~386,000 frozen objects at a full core, 0.1 ms for the collection
    it followed), and session 11 paid it at every client construction (~0.5 s of wall on a 10 % UE)."""
    import gc

    global _gc_clients, _gc_owned
    with _lock:
        if _gc_clients == 0 and not _gc_owned:
            if gc.get_freeze_count():  # nothing frozen by us: the walk is someone else's frozen objects, once
                log.debug("objects frozen before: the collector left as it is")
                _gc_owned = False
                _gc_clients += 1
                return False
            _gc_owned = True
        _gc_clients += 1
        if not _gc_owned:
            return False
        gc.collect()
        gc.freeze()
        return True


def refreeze_gc() -> bool:
    """Collect and freeze again what was made since (the objects a client built after ``freeze_gc``: its
    profile, cost graphs, planner tables), if objects are frozen here for a client that is still open.
    Returns True if it froze them (False: nothing done). Costs a collection of the unfrozen objects only."""
    import gc

    with _lock:
        if _gc_clients == 0 or not _gc_owned:
            return False
        gc.collect()
        gc.freeze()
        return True


def release_gc() -> None:
    """One client that called ``freeze_gc`` closed; when none is open and this has happened ``UNFREEZE_AFTER``
    times, the frozen objects go back to the collector (``gc.unfreeze``: the next full collection frees what
    became garbage since)."""
    import gc

    global _gc_clients, _gc_owned, _idle_closes
    with _lock:
        if _gc_clients == 0:
            return
        _gc_clients -= 1
        if _gc_clients == 0 and _gc_owned:
            _idle_closes += 1
            if _idle_closes >= UNFREEZE_AFTER:
                gc.unfreeze()
                _gc_owned = False
                _idle_closes = 0
