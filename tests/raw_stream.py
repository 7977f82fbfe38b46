"""A raw client stream of the edge server's protos, as an attacker (or any client that is not ours) drives one: fed
from a queue, so the client can stop sending without ending the call, and its answers (or the final error) collected
by a thread. Shared by the tests that speak the protos directly (test_server_holes, test_break37_uploads,
test_break39)."""

from __future__ import annotations

import queue
import threading

import grpc

from protos.coinfer.v1 import coinfer_pb2 as pb


class RawStream:
    """``call`` (a stub's stream-stream or stream-unary method) with ``first`` as its first message; ``send`` more,
    ``half_close`` (stop sending, the call stays open for the server's answers), ``close`` / ``end`` (half-close
    and wait up to ``timeout`` s for the call to end). ``answers``: what the server sent; ``error``: the call's
    final ``grpc.RpcError`` (None while open or after a clean end); ``done``: set when the call ended."""

    def __init__(self, call, first, timeout: float = 30.0) -> None:
        self._q: queue.Queue = queue.Queue()
        self._q.put(first)
        self._timeout = timeout
        self.answers: list = []
        self.error: grpc.RpcError | None = None
        self.done = threading.Event()

        def requests():
            while (m := self._q.get()) is not None:
                yield m

        def read() -> None:
            try:
                r = call(requests(), timeout=timeout)
                self.answers.extend([r] if isinstance(r, pb.UploadWeightsResponse) else r)
            except grpc.RpcError as e:
                self.error = e
            finally:
                self.done.set()

        self._thread = threading.Thread(target=read, daemon=True)
        self._thread.start()

    def send(self, m) -> None:
        self._q.put(m)

    def half_close(self) -> None:
        """Stop sending (the call stays open for the server's answers)."""
        self._q.put(None)

    def close(self) -> None:
        """Half-close, then wait for the call to end (at most the stream's timeout)."""
        self.half_close()
        self._thread.join(self._timeout)

    end = close
