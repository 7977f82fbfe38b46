"""What each call of the call gate holds of the server's memory budget beside its handler's own work (split out
of ``edge_server.calls.CallGate`` in session 24, no behaviour change).

grpc takes bytes in for a call before and beside what its method reserves: the receive window its client may fill
whenever the handler is not reading (session 22), the decoded request the call holds while its method runs
(session 20), and the message a stream's read past its first may have grpc receive in part (session 22). Each is
held in the budget for the call's tenant (else its caller key, ``edge_server.tarpit.caller_key``), so a caller's
calls are bounded by its share of the budget. :class:`CallMemory` keeps the reservations on the
:class:`~edge_server.call_state.Call` objects it is given (``window``, ``held``, ``held_bytes``, ``next_read``).
Used only on the server's event loop (no locks).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from edge_server.errors import ResourceExhausted

if TYPE_CHECKING:
    from edge_server.call_state import Call
    from edge_server.memory import MemoryBudget, Reservation, Trimmer

__all__ = ["HOLD_MIN_BYTES", "REQUEST_HOLD_FACTOR", "CallMemory"]

REQUEST_HOLD_FACTOR = 1
"""Bytes of the memory budget a decoded request holds per byte of its message on the wire, while its call holds it
(:meth:`CallMemory.hold_request`): upb's message aliases the received bytes (+0 at parse), so the request holds its
wire size; a field the method reads out (a ProfileGraph's spec, an OpenSession's slice) is a copy the method counts
itself (``EdgeRuntime.profile``, ``Session.define_slice``)."""

HOLD_MIN_BYTES = 64 << 10
"""Requests under this size are not held in the memory budget (the HTTP/2 receive window an unread call may fill
anyway): a Hello, a small slice, an UploadHeader pass with no lock taken."""


class CallMemory:
    """What a call holds of the memory budget: its receive window while it is open (:meth:`window`), its decoded
    request while its handler holds it (:meth:`hold_request`), and a stream's next read from its second read to its
    end (:meth:`hold_next_reads`); :meth:`leave` gives back what is left.

    ``memory``: the budget (None: nothing is counted); ``trimmer``: told of each big held request dropped and of each
    stream's next read given back (``edge_server.memory.Trimmer``; None: no trims); ``hold_min_bytes``: the smallest
    request counted."""

    def __init__(self, memory: MemoryBudget | None = None, trimmer: Trimmer | None = None,
                 hold_min_bytes: int = HOLD_MIN_BYTES) -> None:
        self.memory = memory
        """The server's memory budget for work in flight: a decoded request is held in it while its call uses it
        (:meth:`hold_request`); None: not counted."""
        self.trimmer = trimmer
        """Told of each big held request dropped (``edge_server.memory.Trimmer``); None: no trims."""
        self.hold_min_bytes = hold_min_bytes
        """Requests smaller than this are not counted (what an unread call's receive window holds anyway)."""
        self.hold_refused = 0
        """Calls refused because their decoded request did not fit the memory budget, since start."""
        self.window_bytes = 0
        """Bytes of the memory budget a call holds from its start to its end (its receive window beyond grpc's
        default 64 KiB: what its client may have sent unread whenever its handler is not reading;
        ``ServerConfig.read_window_bytes``); 0: none. Until session 22 given back at the first message."""
        self.next_read_bytes = 0
        """Bytes of the memory budget a stream holds from its second read to its end (:meth:`hold_next_reads`: the
        message limit, what one of its reads past the first may have grpc receive in part); 0: none."""

    def window(self, holder: str, method: str) -> Reservation | None:
        """Reserve a new call's receive window (``window_bytes``) for ``holder`` until :meth:`leave`; None when
        none is counted. Raises ResourceExhausted (nothing reserved) when it does not fit."""
        if self.memory is None or self.window_bytes <= 0:
            return None
        return self.memory.reserve(holder, self.window_bytes, f"{method or 'a call'}'s receive window "
                                   "(--read-window-kb), held while the call is open")

    def hold_request(self, call: Call, nbytes: int) -> None:
        """Count ``call``'s decoded request (``nbytes`` on the wire: a unary call's one message, a stream's first) in
        the memory budget, for the call's tenant (else its caller key), until :meth:`drop_request` (the wire handler
        calls it once the handler no longer holds the request: a unary call's end, a stream's second read) or
        :meth:`leave`. Raises ResourceExhausted (nothing held: the caller drops the request at once) when it does not
        fit the budget or the holder's share of it (``MemoryBudget.reserve``).

        Why (session 20, bound20): the budget saw a request only from when the method reserved what it makes of it
        (a ProfileGraph's spec bytes, a session's slice charge), not the received message the call holds beside it
        (``REQUEST_HOLD_FACTOR`` bytes per wire byte: upb's message keeps the received bytes), so 16 tenants' 6.45 MiB
        ProfileGraphs waiting for the validation slot held ~100 MiB outside the budget and the server's RSS rose over
        it (review19 F4: +740-841 MiB against a 709 MiB budget). Requests under ``hold_min_bytes`` are not counted."""
        if self.memory is None or nbytes < self.hold_min_bytes or call.held is not None:
            return
        what = f"{call.method or 'the call'}'s request ({nbytes / 2**20:.1f} MiB received, held while it is processed)"
        try:
            call.held = self.memory.reserve(call.tenant or call.key, REQUEST_HOLD_FACTOR * nbytes, what)
        except ResourceExhausted:
            self.hold_refused += 1
            raise
        call.held_bytes = nbytes

    def hold_next_reads(self, call: Call) -> None:
        """Reserve ``next_read_bytes`` of the memory budget for ``call``'s tenant (else its caller key) until
        :meth:`leave`: the wire handler calls it when a stream's handler asks for its second message (a Session's
        reader, an UploadWeights' chunks), before grpc is asked to read it. Idempotent. Raises ResourceExhausted
        (nothing reserved; the stream's handler answers it) when it does not fit the budget or the holder's share.

        Why (session 22): a pending read lets grpc take in the whole message its 5-byte prefix declares, up to the
        message limit, before anything reaches Python (HTTP/2 flow control opens the stream's window to the
        message's size: grpc's chttp2 ``StreamFlowControl`` min-progress size), and a message sent all but its
        last byte stays there. The reading slots bound a call's first message only: 16 UploadWeights calls of one
        token, each an UploadHeader then 8 MiB - 64 bytes of a chunk message less one byte, had the server take in
        128 MiB (RSS +144 MiB) with nothing reserved, and a tenant may have ``max_calls`` (256) such calls open: 2
        GiB (``tests/test_attack22.py``, ``docs/results/attack/session22/``). The budget now holds a message limit
        per stream past its first message, so a tenant's such streams are bounded by its share of the budget. A
        unary call never reads a second message: its window (:attr:`window_bytes`) is all its client can add."""
        if self.memory is None or self.next_read_bytes <= 0 or call.next_read is not None:
            return
        call.next_read = self.memory.reserve(
            call.tenant or call.key, self.next_read_bytes,
            f"{call.method or 'a stream'}'s next message ({self.next_read_bytes / 2**20:.0f} MiB: the message "
            "limit, which a read past the stream's first message lets the client send before it is whole; held "
            "while the stream is open)")

    def drop_request(self, call: Call) -> None:
        """The handler no longer holds ``call``'s decoded request: give its reservation back (idempotent)."""
        held, call.held = call.held, None
        if held is not None:
            held.release()
            if self.trimmer is not None:
                self.trimmer.note(call.held_bytes)
            call.held_bytes = 0

    def leave(self, call: Call) -> None:
        """``call`` ended: its receive window and next-read reservations given back, and its decoded request
        (idempotent). A stream past its first message tells the trimmer its next read's bytes (what grpc may have
        held of a message sent in part; a reset stream's handler may see its requests end and return as if they had,
        so every such end is noted): glibc kept them after the streams closed, +177 MiB after 24 such streams, -2
        after one ``malloc_trim`` (session 22). Sessions and UploadWeights calls end seldom (weights go on the data
        channel by default); the trimmer trims at most every 0.2 s."""
        if call.next_read is not None and self.trimmer is not None:
            self.trimmer.note(self.next_read_bytes)
        for held in (call.window, call.next_read):
            if held is not None:
                held.release()
        call.window = call.next_read = None
        self.drop_request(call)
