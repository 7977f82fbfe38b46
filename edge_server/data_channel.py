"""The data channel: a TCP listener beside the gRPC port that takes sessions' weight bytes (issue 12).

Why: on the Session stream every weight byte is copied into a protobuf message and again by grpcio into
its own slice on the UE; on this connection the UE sends them with ``sendall`` straight from the
tensor's memory, and the server reads them with ``recv_into`` straight into the staging buffer. The
byte format is ``protos.datachannel``. Everything else stays on the Session stream: slices, requests,
cut tensors, and the acknowledgement of each committed weight (``weights_stored``), so the UE's
bookkeeping and the server's accounting are those of in-stream uploads.

Trust boundary (DESIGN.md §10): a connection is admitted only with the one-time ticket the server gave
one authenticated session in ``SessionOpened.data_ticket`` (32 random bytes, ``secrets``) and that
session's id; the ticket is spent by its first presentation, whatever follows, and void once the
session ends, so a session has at most one data connection and the connection's weights belong to the
session's tenant (never to a name the connection gives). Every frame header gets the validation a
``WeightChunk`` gets (``tensor_codec.check_weight_span``, the same function); the staging bytes of a
weight are charged to the tenant's quota (``WeightStore.begin_upload``) before its first byte is read;
the hash is checked before commit, and commit is the session uploads' own path
(``UploadTracker`` -> ``Upload.commit`` -> ``Session.weight_stored``). A connection that ends or lies
mid-weight (EOF, timeout, wrong hash, a bad header, over quota) is closed, logged once at WARNING, and
its partial weights are dropped with their staging bytes (a connection refused before that, for its
ticket, hello or handshake: one INFO line); the session itself goes on (its UE then
sends the remaining weights in-stream). Bounds: :data:`MAX_CONNECTIONS` (or the server's) connections
at once, at most :data:`MAX_PENDING_PER_PEER` of them from one address before their ticket is checked
(over a full cap a new connection closes the oldest one still without a ticket: a UE's hello follows its
connect at once, a stranger's never comes), a hello within ``hello_timeout_s`` (TLS handshake
included; one deadline for all of it, not a timeout per read), frames of at most the server's
``max_chunk_bytes``, and, while a weight is half-received, ``idle_timeout_s`` without progress: at least
``progress_bytes`` of weights the tenant does not hold already (``uploads.ProgressClock``, the rule of every
weight stream; counted as they arrive, within a frame too). The rule is enforced by the acceptor thread's
sweep (every :data:`SWEEP_S`), not per read: a per-read timeout let a held 1-byte weight re-sent every 0.3 s,
or a byte trickled inside one frame's payload, keep a half-received weight's staging for ever (session 23).

Threads and what each owns:

- the acceptor thread (``coinfer-data-accept``) owns the listening socket: it accepts, enforces the
  connection cap, starts one handler thread per admitted connection, and every :data:`SWEEP_S` shuts down
  admitted connections idle past ``idle_timeout_s`` without progress (it reads their trackers, never writes);
- each handler thread (``coinfer-data-conn``) owns its connection's socket, its ``UploadTracker`` (the
  partial weights) and its scratch buffer; it touches the session only through thread-safe parts (the
  weight store, ``Session.data_bytes_received`` which only it writes, ``Session.last_seen``) and hands
  each commit to the event loop (``loop.call_soon_threadsafe``), where the session lives;
- the event loop (the gRPC server's) issues tickets (:meth:`DataChannel.issue`), applies commits, and
  on a session's end voids its ticket and shuts its connection down (:meth:`DataChannel.session_closed`);
- ``_lock`` guards the ticket table, the session -> connection map and the connection count, which
  those threads share.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import secrets
import select
import socket
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from edge_server.errors import EdgeError
from edge_server.tensor_codec import check_weight_span
from edge_server.uploads import ProgressClock, UploadTracker
from edge_server.weight_store import CommitResult, WeightStore
from protos import datachannel as dc

if TYPE_CHECKING:
    from edge_server.session import Session

logger = logging.getLogger(__name__)

MAX_CONNECTIONS = 64
"""Default cap on data connections at once (handshakes included), server-wide."""
MAX_PENDING_PER_PEER = 8
"""Default cap on one peer address's connections that have not yet presented a valid ticket (TLS
handshake and hello): a stranger reconnecting as fast as it likes holds at most this many of the
:data:`MAX_CONNECTIONS` slots, so UEs at other addresses still get theirs."""
SCRATCH_BYTES = 256 << 10
"""Per connection: where the bytes of a weight the tenant already holds are read and dropped."""
ACK_BATCH_BYTES = 2 << 20
ACK_BATCH_WEIGHTS = 32
ACK_BATCH_S = 0.02
"""Commits handed to the event loop together while the UE's bytes keep coming (at most this many bytes or
weights, and the oldest at most this many seconds; at once when no more bytes wait): one acknowledgement
message per batch instead of one per weight (mobilenet_v2's 60 weights cost the UE 60 messages'
receiving). The time bound: a UE paced to its share of a cell keeps its bytes coming, and without it a
weight's acknowledgement waited for 2 MiB more of the upload (1.9 s at 7.4 Mbit/s; the UE's goodput
sample of that weight read 2.0 instead of 7.4 Mbit/s)."""
SWEEP_S = 0.25
"""How often the acceptor thread looks for admitted connections idle without progress (the accept timeout)."""
PROGRESS_BYTES = 64 << 10
"""Default ``progress_bytes``: with the default ``idle_timeout_s`` of 60 s, a UE whose new weight bytes arrive at
8.7 kbit/s or more is never cut while a weight is half-received (``ServerConfig.data_progress_bytes``)."""
MAX_ACKS_WAITING = 4096
"""Acknowledgements a session may have queued and not yet sent before its data connection stops reading
(until they drain, or ``idle_timeout_s`` passes and the connection is closed): a UE that resends a tiny
weight it holds and never reads its Session stream grew one acknowledgement list without bound (400 000
frames of 209 bytes: 340 000 acknowledgements held, +64 MB)."""


@dataclass(slots=True)
class _Ticket:
    session: Session
    loop: asyncio.AbstractEventLoop


@dataclass(slots=True)
class _Watch:
    """An admitted connection as the sweep sees it: the socket to shut down and its progress clock."""

    conn: socket.socket
    clock: ProgressClock
    expired: bool = False
    """The sweep shut it down (idle without progress): its handler says so when the read fails."""


@dataclass(slots=True)
class DataChannelCounters:
    """Counters of a :class:`DataChannel` (written under its lock)."""

    accepted: int = 0
    refused: int = 0
    """Connections turned away: no or a spent ticket, the wrong session id, over the connection cap."""
    evicted: int = 0
    """Connections without a ticket yet closed to make room for a new one over a full cap."""
    failed: int = 0
    """Admitted connections that ended in an error (bad frame, wrong hash, over quota, timeout, EOF
    mid-weight, idle without progress)."""
    idle_closed: int = 0
    """Of ``failed``: shut down by the sweep, a weight half-received and fewer than ``progress_bytes`` of new
    weights for ``idle_timeout_s``."""
    weights_committed: int = 0
    bytes_received: int = 0


def server_ssl_context(cert_file: str, key_file: str, client_ca_file: str | None) -> ssl.SSLContext:
    """The data channel's TLS context: the gRPC server's certificate and key, and under mutual TLS the
    same client CA, client certificates required. Raises ValueError for an unreadable or bad file."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(cert_file, key_file)
        if client_ca_file:
            ctx.verify_mode = ssl.CERT_REQUIRED
            ctx.load_verify_locations(client_ca_file)
    except (OSError, ssl.SSLError) as e:
        raise ValueError(f"data channel TLS: {e}") from None
    return ctx


class DataChannel:
    """The listener and its connections (see the module docstring for the threads).

    ``host``/``port`` as for gRPC (port 0: any free port; :attr:`port` is the bound one). ``idle_timeout_s``
    (s) and ``progress_bytes`` (>= 1): a connection with a weight half-received is closed once it went
    ``idle_timeout_s`` without ``progress_bytes`` of weights its tenant does not hold already (``idle_timeout_s``
    may be changed while it runs, read at each sweep; ``progress_bytes`` applies to connections admitted after).
    Raises OSError if it cannot bind, ValueError for ``progress_bytes`` < 1.
    """

    def __init__(
        self,
        host: str,
        port: int,
        store: WeightStore,
        *,
        max_chunk_bytes: int,
        ssl_context: ssl.SSLContext | None = None,
        max_connections: int = MAX_CONNECTIONS,
        max_pending_per_peer: int = MAX_PENDING_PER_PEER,
        hello_timeout_s: float = 5.0,
        idle_timeout_s: float = 60.0,
        progress_bytes: int = PROGRESS_BYTES,
    ) -> None:
        if progress_bytes < 1:
            raise ValueError(f"data channel progress_bytes must be >= 1, not {progress_bytes}")
        self.store = store
        self.max_chunk_bytes = max_chunk_bytes
        self.ssl_context = ssl_context
        self.max_connections = max_connections
        self.max_pending_per_peer = max_pending_per_peer
        self.hello_timeout_s = hello_timeout_s
        self.idle_timeout_s = idle_timeout_s
        self.progress_bytes = progress_bytes
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._sock = socket.create_server((host, port), family=family, backlog=64)
        self._sock.settimeout(0.25)
        self.port: int = self._sock.getsockname()[1]
        self.counters = DataChannelCounters()
        self._lock = threading.Lock()
        self._tickets: dict[bytes, _Ticket] = {}
        """sha256(ticket) -> the session it admits (unspent tickets only)."""
        self._ticket_of: dict[str, bytes] = {}
        """session id -> sha256 of its unspent ticket."""
        self._conns: dict[str, socket.socket] = {}
        """session id -> its admitted connection."""
        self._open = 0
        self._pending: dict[str, int] = {}
        """peer address -> its connections not yet admitted (handshake, hello, ticket check)."""
        self._unticketed: dict[int, list[socket.socket]] = {}
        """Connections not yet admitted, oldest first: a serial -> a one-element list holding the socket
        to shut down to evict it (the TLS socket once its handler has wrapped it)."""
        self._serial = 0
        self._watched: dict[int, _Watch] = {}
        """serial -> an admitted connection's progress clock (swept by the acceptor thread)."""
        self._next_sweep = 0.0
        self._closed = threading.Event()
        self._last_cap_warning = 0.0
        self._thread = threading.Thread(target=self._accept_loop, name="coinfer-data-accept", daemon=True)
        self._thread.start()
        logger.info("data channel listening on %s:%d (%s)", host, self.port, "TLS" if ssl_context else "plain text")

    # -- the event loop's side ---------------------------------------------------------------------

    def issue(self, session: Session, loop: asyncio.AbstractEventLoop) -> bytes:
        """A fresh one-time ticket admitting one connection for ``session`` (its tenant's weights)."""
        ticket = secrets.token_bytes(dc.TICKET_BYTES)
        digest = hashlib.sha256(ticket).digest()
        with self._lock:
            old = self._ticket_of.pop(session.session_id, None)
            if old is not None:
                self._tickets.pop(old, None)
            self._tickets[digest] = _Ticket(session, loop)
            self._ticket_of[session.session_id] = digest
        return ticket

    def session_closed(self, session_id: str) -> None:
        """The session ended: its ticket is void and its connection is shut down (its handler thread then
        drops any partial weight and closes it)."""
        with self._lock:
            digest = self._ticket_of.pop(session_id, None)
            if digest is not None:
                self._tickets.pop(digest, None)
            conn = self._conns.pop(session_id, None)
        if conn is not None:
            _shutdown(conn)

    def close(self) -> None:
        """Stop accepting, void every ticket, shut every connection down. Idempotent."""
        if self._closed.is_set():
            return
        self._closed.set()
        # wakes the acceptor's accept() now (Linux: EINVAL), not at its 0.25 s timeout
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        self._thread.join(5.0)
        self._sock.close()
        with self._lock:
            self._tickets.clear()
            self._ticket_of.clear()
            conns, self._conns = list(self._conns.values()), {}
        for c in conns:
            _shutdown(c)

    @property
    def open_connections(self) -> int:
        return self._open

    # -- the acceptor thread -------------------------------------------------------------------------

    def _accept_loop(self) -> None:
        while not self._closed.is_set():
            now = time.monotonic()
            if now >= self._next_sweep:
                self._next_sweep = now + SWEEP_S
                self._sweep(now)
            try:
                conn, peer = self._sock.accept()
            except TimeoutError:
                continue
            except OSError as e:
                if not self._closed.is_set():
                    logger.warning("data channel: accept failed: %s", e)
                    time.sleep(0.1)
                continue
            addr = peer[0]
            holder = [conn]
            with self._lock:
                pending = self._pending.get(addr, 0)
                full = self._open >= self.max_connections
                crowded = pending >= self.max_pending_per_peer
                if full and not crowded and self._unticketed:
                    # the oldest connection still without a ticket makes room: a UE's hello follows its
                    # connect at once, so strangers at many addresses (loopback has 127.0.0.0/8), each
                    # under its per-address limit, can no longer hold the whole cap by reconnecting
                    evict = self._unticketed.pop(next(iter(self._unticketed)))[0]
                    # under the lock: its handler closes it only after taking it off the table (a shutdown
                    # after that close could hit a reused descriptor); its thread then ends, closes it and
                    # gives its slot back
                    _shutdown(evict)
                    self.counters.evicted += 1
                    full = False
                if full or crowded:
                    self.counters.refused += 1
                else:
                    self._open += 1
                    self._pending[addr] = pending + 1
                    self._serial += 1
                    serial = self._serial
                    self._unticketed[serial] = holder
            if full or crowded:
                now = time.monotonic()
                if now - self._last_cap_warning > 10.0:
                    self._last_cap_warning = now
                    if full:
                        logger.warning("data channel: %d connections open (the cap): refusing %s", self._open, addr)
                    else:
                        logger.warning(
                            "data channel: %d connections from %s without a ticket yet: refusing more", pending, addr
                        )
                conn.close()
                continue
            try:
                threading.Thread(
                    target=self._handle, args=(conn, peer, serial, holder), name="coinfer-data-conn", daemon=True
                ).start()
            except RuntimeError as e:  # no thread to be had: this connection is refused, the acceptor goes on
                logger.warning("data channel: refusing %s: %s", addr, e)
                self._admitted(addr, serial)
                with self._lock:
                    self._open -= 1
                    self.counters.refused += 1
                conn.close()

    def _sweep(self, now: float) -> None:
        """Shut down every admitted connection whose weights made no progress for ``idle_timeout_s`` (its
        handler's read then fails, it drops the partial weights and their staging bytes and says why)."""
        idle_s = self.idle_timeout_s
        if idle_s <= 0:
            return
        with self._lock:  # under it: a handler unregisters before it closes its socket
            for w in self._watched.values():
                if not w.expired and w.clock.idle_s(now) >= idle_s:
                    w.expired = True
                    _shutdown(w.conn)

    def _admitted(self, addr: str, serial: int) -> None:
        """Connection ``serial`` from ``addr`` is past its hello (admitted or refused): no longer pending."""
        with self._lock:
            self._unticketed.pop(serial, None)
            left = self._pending.get(addr, 0) - 1
            if left > 0:
                self._pending[addr] = left
            else:
                self._pending.pop(addr, None)

    # -- a connection's thread -----------------------------------------------------------------------

    def _handle(self, raw: socket.socket, peer: tuple, serial: int, holder: list[socket.socket]) -> None:
        conn: socket.socket = raw
        session_id = ""
        tracker: UploadTracker | None = None
        watch: _Watch | None = None
        pending = True
        try:
            # one deadline for the TLS handshake and the whole hello: a per-read timeout alone let a
            # stranger trickling a byte per second hold a capped slot for as long as it liked
            deadline = time.monotonic() + self.hello_timeout_s
            raw.settimeout(self.hello_timeout_s)
            if self.ssl_context is not None:
                # wrapping detaches ``raw``: the wrapped socket is what an eviction shuts down, so it is
                # swapped in under the lock, before the handshake (one deadline, CPython)
                with self._lock:
                    conn = self.ssl_context.wrap_socket(raw, server_side=True, do_handshake_on_connect=False)
                    holder[0] = conn
                conn.do_handshake()
            ticket, sid_len = dc.decode_hello(_recv_exact(conn, dc.HELLO.size, deadline))
            session_id = _recv_exact(conn, sid_len, deadline).decode("utf-8", "replace")
            entry = self._redeem(ticket, session_id, conn)
            pending = False
            self._admitted(peer[0], serial)
            if entry is None:
                with self._lock:
                    self.counters.refused += 1
                logger.info("data channel: refused %s: no such ticket for session %r", peer[0], session_id[:12])
                conn.sendall(dc.REFUSED)
                return
            conn.sendall(dc.ACCEPTED)
            with self._lock:
                self.counters.accepted += 1
            session = entry.session
            tracker = UploadTracker(self.store, session.tenant)
            watch = _Watch(conn, ProgressClock(tracker, self.progress_bytes, time.monotonic()))
            with self._lock:
                self._watched[serial] = watch
            self._serve(conn, session, entry.loop, tracker)
            if watch.expired:  # shut down between frames: its read saw an EOF, as if the UE had closed
                raise ConnectionError("shut down by the sweep")
        except (EdgeError, dc.FrameError, OSError, UnicodeError) as e:
            idle = watch is not None and watch.expired
            with self._lock:
                self.counters.failed += tracker is not None
                self.counters.refused += tracker is None
                self.counters.idle_closed += idle
            why: BaseException = e
            if idle:
                why = TimeoutError(
                    f"a weight half-received and fewer than {self.progress_bytes} bytes of weights not held already "
                    f"in {self.idle_timeout_s:g} s"
                )
            # a stranger's failed hello is one INFO line (WARNING for each let a flood of strangers write
            # ~180 lines/s at the operator); a connection that fails after its ticket, WARNING
            (logger.warning if tracker is not None else logger.info)(
                "data channel: connection from %s (session %s) closed: %s: %s",
                peer[0],
                session_id[:8] or "?",
                type(why).__name__,
                why,
            )
        except Exception:  # a bug of ours: this connection ends, the server goes on
            logger.exception("data channel: connection from %s (session %s) crashed", peer[0], session_id[:8])
        finally:
            if pending:
                self._admitted(peer[0], serial)
            if tracker is not None:
                tracker.abort_all()  # partial weights leave nothing behind
            with self._lock:
                self._watched.pop(serial, None)
            conn.close()  # before the slot is given back: the cap counts sockets still open
            with self._lock:
                self._open -= 1
                if self._conns.get(session_id) is conn:
                    del self._conns[session_id]

    def _redeem(self, ticket: bytes, session_id: str, conn: socket.socket) -> _Ticket | None:
        """Spend ``ticket`` (whatever the outcome, a presented ticket is gone); the entry if it admits
        ``session_id`` and that session is still open (the connection is then registered to it)."""
        digest = hashlib.sha256(ticket).digest()
        with self._lock:
            entry = self._tickets.pop(digest, None)
            if entry is None:
                return None
            self._ticket_of.pop(entry.session.session_id, None)
            if entry.session.session_id != session_id or entry.session.closed or self._closed.is_set():
                return None
            self._conns[session_id] = conn
            return entry

    def _serve(
        self, conn: socket.socket, session: Session, loop: asyncio.AbstractEventLoop, tracker: UploadTracker
    ) -> None:
        """Read frames until the UE closes the connection (or an error raises)."""
        head = bytearray(dc.FRAME.size)
        hv = memoryview(head)
        scratch = memoryview(bytearray(SCRATCH_BYTES))
        read_into: Callable[[memoryview], int] = conn.recv_into
        done: list[tuple[CommitResult, bool]] = []
        """Commits not yet handed to the event loop (one hand-over, one acknowledgement message, per batch)."""
        try:
            self._frames(conn, session, loop, tracker, hv, read_into, scratch, done)
        finally:
            if done:  # whatever ended the connection, what was committed is acknowledged
                with contextlib.suppress(RuntimeError):  # the loop is gone: the server stopped
                    loop.call_soon_threadsafe(_stored, session, done)

    def _frames(
        self,
        conn: socket.socket,
        session: Session,
        loop: asyncio.AbstractEventLoop,
        tracker: UploadTracker,
        hv: memoryview,
        read_into: Callable[[memoryview], int],
        scratch: memoryview,
        done: list[tuple[CommitResult, bool]],
    ) -> None:
        """The frame loop of :meth:`_serve`: ``hv`` receives each header, ``done`` collects commits."""
        head = hv.obj
        since = 0.0  # when the oldest commit in ``done`` was made
        # reads block: the connection may idle between weights as long as the session lives (its end shuts it), and
        # with a weight half-received the acceptor's sweep shuts it after ``idle_timeout_s`` without progress (until
        # session 23 a per-read timeout, set twice per frame, did that, and let a trickle through)
        conn.settimeout(None)
        while True:
            if done and (
                sum(r.nbytes for r, _ in done) >= ACK_BATCH_BYTES
                or len(done) >= ACK_BATCH_WEIGHTS
                or time.monotonic() - since >= ACK_BATCH_S
                or not _readable_now(conn)
            ):
                loop.call_soon_threadsafe(_stored, session, list(done))
                done.clear()
            if session.acks_waiting >= MAX_ACKS_WAITING:
                self._wait_for_acks(session)
            if not _recv_into_exact(conn, hv, eof_ok=True):
                if tracker.in_progress:  # the UE closed between frames (its session ends): like a stream's end
                    logger.info(
                        "data channel of session %s closed with %d weight(s) incomplete: dropped",
                        session.session_id[:8],
                        tracker.in_progress,
                    )
                return
            sha, dtype, shape, offset, size, total = dc.decode_frame(head)
            span = check_weight_span(sha, dtype, shape, offset, total, size, self.max_chunk_bytes)
            result = tracker.feed_from(span, offset, size, read_into, scratch)
            session.data_bytes_received += size
            session.last_seen = time.monotonic()
            with self._lock:
                self.counters.bytes_received += size
            if result is not None:
                with self._lock:
                    self.counters.weights_committed += 1
                # pinned for the session at once: LRU pressure must not evict it before the loop pins it
                pinned = True
                try:
                    self.store.pin(session.tenant, result.sha256, owner=session.session_id)
                except EdgeError:  # evicted already (a cache smaller than the work): the loop finds it gone
                    pinned = False
                if not done:
                    since = time.monotonic()
                done.append((result, pinned))

    def _wait_for_acks(self, session: Session) -> None:
        """Read no frame while ``session`` has :data:`MAX_ACKS_WAITING` or more acknowledgements unsent:
        wait until half of them went (or the session ended). Raises TimeoutError after ``idle_timeout_s``
        (the UE does not read its Session stream)."""
        deadline = time.monotonic() + self.idle_timeout_s
        while session.acks_waiting >= MAX_ACKS_WAITING // 2 and not session.closed:
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"{session.acks_waiting} acknowledgements unsent for {self.idle_timeout_s:.0f} s: "
                    "the UE does not read its Session stream"
                )
            time.sleep(0.01)


def _stored(session: Session, batch: list[tuple[CommitResult, bool]]) -> None:
    """On the event loop: weights of the session's data channel were committed (and pinned for it); their
    acknowledgements, emitted together, leave in one ``weights_stored`` message."""
    for result, pinned in batch:
        if not session.closed:
            session.weight_stored(result)
        elif pinned:  # the session closed meanwhile: its unpin_all ran before this pin counted
            session.store.unpin(result.sha256, session.session_id, tenant=session.tenant)


def _readable_now(conn: socket.socket) -> bool:
    """More of the UE's bytes are already here (the burst goes on): acknowledgements may wait for them."""
    if isinstance(conn, ssl.SSLSocket) and conn.pending():
        return True
    p = select.poll()  # not select.select: a descriptor >= 1024 (FD_SETSIZE) makes it raise ValueError
    p.register(conn, select.POLLIN)
    return bool(p.poll(0))


def _recv_exact(conn: socket.socket, n: int, deadline: float) -> bytes:
    """``n`` bytes, all received before ``deadline`` (``time.monotonic()``). Raises TimeoutError past
    it, ConnectionError on EOF."""
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"hello incomplete at its deadline ({got} of {n} bytes)")
        conn.settimeout(left)
        k = conn.recv_into(view[got:])
        if not k:
            raise ConnectionError(f"connection closed after {got} of {n} hello bytes")
        got += k
    return bytes(buf)


def _recv_into_exact(conn: socket.socket, view: memoryview, *, eof_ok: bool = False) -> bool:
    """Fill ``view``; False on EOF before its first byte when ``eof_ok``; ConnectionError on EOF otherwise."""
    got = 0
    while got < len(view):
        k = conn.recv_into(view[got:])
        if not k:
            if eof_ok and got == 0:
                return False
            raise ConnectionError(f"connection closed after {got} of {len(view)} header bytes")
        got += k
    return True


def _shutdown(conn: socket.socket) -> None:
    """Unblock the thread reading ``conn`` (the socket-level shutdown, also for a TLS socket: its own
    ``shutdown`` would drop the TLS state under the reading thread)."""
    with contextlib.suppress(OSError):
        socket.socket.shutdown(conn, socket.SHUT_RDWR)
