"""Profiles cached as JSON, keyed by what changes op latency: model structure, device, threads, torch."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path

from profiler.profile import GraphProfile

log = logging.getLogger(__name__)


def cache_dir() -> Path:
    base = os.environ.get("COINFER_CACHE_DIR")
    return Path(base) if base else Path.home() / ".cache" / "coinfer"


def profile_key(model_hash: str, device: str, threads: int, torch_version: str, runs: int) -> str:
    raw = json.dumps([model_hash, device, threads, torch_version, runs])
    return hashlib.sha256(raw.encode()).hexdigest()[:24]


def load(key: str) -> GraphProfile | None:
    path = cache_dir() / "profiles" / f"{key}.json"
    if not path.exists():
        return None
    try:
        return GraphProfile.from_json(path)
    except (OSError, ValueError, KeyError, TypeError) as e:
        log.warning("ignoring unreadable cached profile %s: %s", path, e)
        return None


def store(key: str, profile: GraphProfile) -> Path:
    """Write atomically (temp file + rename) so a crash never leaves a half-written profile."""
    d = cache_dir() / "profiles"
    d.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=d, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        f.write(profile.to_json())
    path = d / f"{key}.json"
    os.replace(tmp, path)
    return path
