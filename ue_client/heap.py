"""Keep freed uplink buffers in the process heap instead of returning them to the kernel (glibc only).

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
