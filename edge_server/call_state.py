"""One call of the EdgeService in the call gate, and the state the gate's parts keep on it (``edge_server.calls``:
admission, the first message's deadline, the key's reading slots; ``edge_server.reading_slots``: the server's;
``edge_server.call_memory``: what it holds of the memory budget).

Its own module (session 24) so that the parts the gate uses can name it without importing the gate (no import
circle); ``edge_server.calls`` exports it too.
"""

from __future__ import annotations

import asyncio

from edge_server.errors import EdgeError

__all__ = ["Call"]


class Call:
    """One call in the gate: its caller ``key``, the ``tenant`` and sha256 ``digest`` of its bearer token ("" if
    none), the handler's ``task``, and ``reason`` (the domain error it was ended with, None while it runs)."""

    __slots__ = ("digest", "held", "held_bytes", "key", "method", "next_read", "opened", "paced_since", "queued",
                 "read_since", "reading", "reason", "revocable", "server_reading", "since", "slot_taken", "task",
                 "tenant", "wait_since", "waiting", "window")

    def __init__(self, key: str, tenant: str, digest: str, method: str, task: asyncio.Task | None) -> None:
        self.key, self.tenant, self.digest, self.method, self.task = key, tenant, digest, method, task
        self.reason: EdgeError | None = None
        self.waiting = True
        """No first message yet."""
        self.opened = 0.0
        """The event loop's time it entered the gate (``edge_server.idle_windows``: how long it has held its window)."""
        self.paced_since = 0.0
        """The event loop's time it began to wait for its host's pacing turn (``edge_server.health_admission``: a host
        past its burst of health calls), 0.0 when it does not wait there (``edge_server.idle_windows.idle_since``)."""
        self.since = 0.0
        """The event loop's time at its start (its first message's deadline is ``first_message_s`` later)."""
        self.revocable = True
        """False once an opened Session's own path answers for it (``EdgeRuntime.reload_tokens``)."""
        self.reading = False
        """It holds one of its key's reading slots (:meth:`CallGate.reading`)."""
        self.server_reading = False
        """It holds one of the server-wide reading slots (:meth:`ReadingSlots.take
        <edge_server.reading_slots.ReadingSlots.take>`)."""
        self.queued = ""
        """While it waits in :meth:`CallGate.reading`: "key" (for one of its key's slots) or "server" (for one of the
        server's); "" otherwise."""
        self.read_since = 0.0
        """The event loop's time it took its server-wide slot (in a gate without them: when it began to read)."""
        self.wait_since = 0.0
        """The event loop's time it began to wait for a server-wide slot (``ReadingSlots.take``)."""
        self.slot_taken = False
        """Ended to give its server-wide slot to another caller (``ReadingSlots._take_back``), slot not back yet."""
        self.held = None
        """The memory budget's reservation of its decoded request (``CallMemory.hold_request``), None if none."""
        self.held_bytes = 0
        """The decoded request's size on the wire (bytes), while ``held``."""
        self.window = None
        """The memory budget's reservation of its receive window for the call's life (what its client may have sent
        unread into grpc's buffers whenever its handler is not reading; ``CallMemory.window_bytes``), None if
        none."""
        self.next_read = None
        """A stream's: the memory budget's reservation of the message a read past its first may have grpc receive in
        part (``CallMemory.hold_next_reads``), from its second read to its end; None if none."""

    def end(self, reason: EdgeError) -> None:
        """End the call with ``reason``'s status: cancel its handler's task (once; a finished call is left)."""
        if self.reason is None and self.task is not None and not self.task.done():
            self.reason = reason
            self.task.cancel()
