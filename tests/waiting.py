"""Polling for a condition another thread or process brings about (servers, sessions), bounded in time."""

from __future__ import annotations

import time


def wait_until(pred, timeout: float = 20.0, what: str = "condition") -> None:
    """Return once ``pred()`` is true; AssertionError naming ``what`` after ``timeout`` seconds."""
    end = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)
