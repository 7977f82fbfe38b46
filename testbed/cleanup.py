"""Process-wide registry of cleanup actions for what the testbed creates (namespaces, cgroups, processes).

Why: root-mode resources outlive the process that made them. Every creator registers its undo action
*before* creating the resource; the registry runs them (last in, first out, each once) when the owner
closes normally, at interpreter exit, and on SIGTERM/SIGINT/SIGHUP, after which the previous handler runs
(so the process still dies, or raises KeyboardInterrupt, as it would have).
"""

from __future__ import annotations

import atexit
import itertools
import logging
import os
import signal
import threading
from collections.abc import Callable

log = logging.getLogger(__name__)

_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


class CleanupRegistry:
    """LIFO of ``(description, action)``; ``run_all`` runs each action once and logs failures."""

    def __init__(self) -> None:
        self._actions: dict[int, tuple[str, Callable[[], object]]] = {}
        self._ids = itertools.count()
        self._lock = threading.RLock()
        self._installed = False
        self._previous: dict[int, object] = {}

    def push(self, description: str, action: Callable[[], object]) -> int:
        """Register ``action``; returns a token for ``pop``/``run``."""
        with self._lock:
            self._install()
            token = next(self._ids)
            self._actions[token] = (description, action)
            return token

    def run(self, token: int) -> None:
        """Run one registered action now (if still registered) and forget it."""
        with self._lock:
            item = self._actions.pop(token, None)
        if item is not None:
            self._call(*item)

    def discard(self, token: int) -> None:
        with self._lock:
            self._actions.pop(token, None)

    def pending(self) -> list[str]:
        with self._lock:
            return [d for d, _ in self._actions.values()]

    def run_all(self) -> None:
        """Run every pending action, newest first."""
        while True:
            with self._lock:
                if not self._actions:
                    return
                token = max(self._actions)
                item = self._actions.pop(token)
            self._call(*item)

    @staticmethod
    def _call(description: str, action: Callable[[], object]) -> None:
        try:
            action()
        except Exception:  # cleanup must go on with the rest
            log.exception("cleanup of %s failed", description)

    def _install(self) -> None:
        if self._installed:
            return
        self._installed = True
        atexit.register(self.run_all)
        if threading.current_thread() is not threading.main_thread():
            log.debug("not in the main thread: cleanup on signals not installed (atexit only)")
            return
        for sig in _SIGNALS:
            try:
                self._previous[sig] = signal.getsignal(sig)
                signal.signal(sig, self._on_signal)
            except (ValueError, OSError) as exc:  # e.g. embedded interpreter
                log.debug("cannot handle %s: %s", sig, exc)

    def _on_signal(self, signum: int, frame) -> None:
        log.warning("signal %d: cleaning up %d testbed resources", signum, len(self._actions))
        self.run_all()
        previous = self._previous.get(signum, signal.SIG_DFL)
        if callable(previous):
            previous(signum, frame)
        elif previous == signal.SIG_IGN:
            return
        else:  # SIG_DFL (or None): die of the signal, as without us
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)


REGISTRY = CleanupRegistry()
