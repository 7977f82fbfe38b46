"""What this UE learned about one edge server's request path, kept on disk across its processes.

A split request costs the UE more than the link model and the profiled op times say: its own CPU around the call
(the checks, the bookkeeping, gRPC's and the receiver's threads: 4.8-7.3 ms of CPU per warm all-server request in
session 31's full grid, 48-73 ms of a 10 % UE's wall) and the server's work around its ops. The cost model learns
it from split requests (``CostModel``: the transport residual, the server's cost scale, the calls' times before and
after their runs) and ``calibration.TRANSPORT_MEMORY`` keeps it for the next clients of the same process; a new
process started from none, so its first decision, made while connecting, predicted remote requests without it
(session 32, ``docs/results/margin/session32/connect_bias.md``: the investing streams of session 31's grid took
1.09-1.54x, median 1.17, the totals predicted while connecting, where the local streams took 0.95-1.08x theirs).

This module keeps a client's windows (``CostModel.snapshot``) in ``cache_dir() / "transport"`` (or
``$COINFER_TRANSPORT_DIR``), one JSON file per key: the server process (Hello's ``instance_id``, random at each
start: a restarted server is learned anew, and no two servers share an entry), the model's hash, the planning link
as given (None: measured), the UE's emulated slowdown and its CPU share at connect (rounded to 0.001). A client that
starts with nothing for its key in its process seeds from it (``CostModel.seed``) and writes its own when it closes.
Only finite numbers in the bounds ``CostModel`` keeps are read back (anything else: the file is ignored, logged);
files are written whole (temp file + rename), and an entry older than ``MAX_AGE_S`` is not used.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import tempfile
import time
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

VERSION = 1
"""The file format's version; a file of another is ignored."""

MAX_AGE_S = 7 * 24 * 3600.0
"""An entry older than this (s) is not used: the network and the server's load it reflects may have changed."""

MIN_SERVER_SCALE = 2.5e-4
"""The least server cost scale read back: ``CostModel.calibrate_server`` never goes below 0.25 x a compute share of at
least 1e-3 (break40 F2: a file's 1e-300 predicted the server's part at 0 ms)."""

MAX_ABS_MS = 1000.0
"""Bound on every time read back (ms): ``CostModel.calibrate_transport`` clamps residuals to it."""


def transport_dir() -> Path:
    """Where the entries live: ``$COINFER_TRANSPORT_DIR``, else ``profiler.cache.cache_dir() / "transport"``."""
    base = os.environ.get("COINFER_TRANSPORT_DIR")
    if base:
        return Path(base)
    from profiler.cache import cache_dir

    return cache_dir() / "transport"


def cache_key(instance_id: str, model_hash: str, link: Any, slowdown: float, share: float) -> str | None:
    """The entry's name for these inputs (hex), or None when the server gave no ``instance_id`` (an older server:
    nothing is kept). ``link``: the planning link as given (an object with ``uplink_mbps``, ``downlink_mbps``,
    ``rtt_ms``, or None: measured); ``slowdown``: the UE's emulated slowdown; ``share``: its share of a core."""
    if not instance_id:
        return None
    given = None if link is None else [getattr(link, k, None) for k in ("uplink_mbps", "downlink_mbps", "rtt_ms")]
    raw = json.dumps([VERSION, instance_id, model_hash, given, float(slowdown), round(float(share), 3)])
    return hashlib.sha256(raw.encode()).hexdigest()[:32]


def load(key: str) -> dict[str, Any] | None:
    """The snapshot kept under ``key`` (``CostModel.snapshot``'s form, validated), or None: none, too old, or not
    readable (logged at WARNING, the file left alone)."""
    path = transport_dir() / f"{key}.json"
    try:
        doc = json.loads(path.read_text())
        snap = _valid(doc)
    except FileNotFoundError:
        return None
    except (OSError, ValueError, TypeError, KeyError, OverflowError, RecursionError) as e:
        # (UnicodeDecodeError is a ValueError; nesting past the parser's depth, RecursionError; a 400-digit
        # number, OverflowError: break40 F1 had the last three raise out of the client's connect)
        log.warning("ignoring malformed or unreadable transport cache %s: %s", path, type(e).__name__)
        return None
    if time.time() - doc["saved"] > MAX_AGE_S:
        return None
    return snap


def store(key: str, snapshot: dict[str, Any]) -> Path | None:
    """Write ``snapshot`` (``CostModel.snapshot``) under ``key``, whole (temp file + rename); the path, or None
    when it could not be written (logged at WARNING: a read-only home loses the memory, not the request)."""
    d = transport_dir()
    tmp = None
    try:
        d.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=d, suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump({"version": VERSION, "saved": time.time(), **snapshot}, f, allow_nan=False)
        path = d / f"{key}.json"
        os.replace(tmp, path)
        return path
    except (OSError, ValueError, TypeError) as e:
        log.warning("could not keep the transport cache in %s: %s", d, e)
        if tmp is not None:  # (break40 F3: a failed replace left its temp file)
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        return None


def _times(xs: Any, window: int) -> list[float]:
    """A list of at most ``window`` finite times within +-``MAX_ABS_MS`` (ms); ValueError otherwise."""
    if not isinstance(xs, list) or len(xs) > window:
        raise ValueError(f"expected a list of at most {window} times")
    out = []
    for x in xs:
        if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x) or abs(x) > MAX_ABS_MS:
            raise ValueError(f"not a time in ms within +-{MAX_ABS_MS:.0f}: {x!r}")
        out.append(float(x))
    return out


def _valid(doc: Any) -> dict[str, Any]:
    """``doc`` as a snapshot: its version, save time, residuals (ms), server scale and per-kind call times
    checked; ValueError / TypeError / KeyError on anything else."""
    from ue_client.calibration import AFTER_KINDS, CALL_MODES, SPREAD_WINDOW

    version = doc.get("version") if isinstance(doc, dict) else None
    if type(version) is not int or version != VERSION:
        raise ValueError("not a transport cache of this version")
    saved = doc["saved"]
    if (isinstance(saved, bool) or not isinstance(saved, (int, float)) or not math.isfinite(saved)
            or saved > time.time() + 60.0):  # (break40 F2: one saved in the future never expired)
        raise ValueError("bad save time")
    scale = doc["server_scale"]
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float))
                              or not (math.isfinite(scale) and MIN_SERVER_SCALE <= scale <= 4.0)):
        raise ValueError(f"bad server scale {scale!r}")
    calls = {}
    for field, kinds in (("after", AFTER_KINDS), ("before", CALL_MODES)):
        got = doc[field]
        if not isinstance(got, dict) or not set(got) <= set(kinds):
            raise ValueError(f"bad {field!r} times")
        calls[field] = {k: _times(v, SPREAD_WINDOW) for k, v in got.items()}
        if any(x < 0 for xs in calls[field].values() for x in xs):
            raise ValueError(f"a negative call time in {field!r}")
    return {"residuals": _times(doc["residuals"], SPREAD_WINDOW),
            "server_scale": None if scale is None else float(scale), **calls}
