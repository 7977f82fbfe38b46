"""Run a real edge server in a background thread (its own event loop), for tests and tools.

    with ServerThread(cache_mb=64) as srv:
        channel = grpc.insecure_channel(srv.address)
        ...

The server listens on 127.0.0.1 and a free port; leaving the block stops it (drain ``grace`` seconds).
"""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import Future
from typing import Any

from edge_server.server import EdgeServer, create_server


class ServerThread:
    def __init__(self, *, grace: float = 1.0, **create_kwargs: Any) -> None:
        self._kwargs = create_kwargs
        self._grace = grace
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name="coinfer-edge-test", daemon=True)
        self._ready: Future = Future()
        self.server: EdgeServer | None = None
        self.port = 0

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def runtime(self):
        assert self.server is not None
        return self.server.runtime

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self.server, self.port = self._loop.run_until_complete(create_server("127.0.0.1:0", **self._kwargs))
        except BaseException as e:
            self._ready.set_exception(e)
            return
        self._ready.set_result(self.port)
        self._loop.run_forever()
        self._loop.run_until_complete(self._loop.shutdown_asyncgens())
        self._loop.close()

    def call(self, coro, timeout: float = 30.0):
        """Run a coroutine on the server's loop and wait for its result."""
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def start(self) -> ServerThread:
        self._thread.start()
        self._ready.result(timeout=60)
        return self

    def stop(self) -> None:
        if self.server is not None and self._loop.is_running():
            try:
                self.call(self.server.stop(self._grace), timeout=self._grace + 30)
            finally:
                self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=30)

    def __enter__(self) -> ServerThread:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
