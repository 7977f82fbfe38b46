"""The UE's end of the data channel: a session's weight bytes on their own TCP (or TLS) connection.

When the server advertises a data channel (``Limits.data_port``) and gives the session a ticket
(``SessionOpened.data_ticket``), a :class:`DataSender` connects to it, presents the ticket, and from
then on the session's weights leave the uplink queue through it instead of through gRPC messages: each
block is a small frame header (``protos.datachannel``) and then ``sock.sendall`` of a memoryview of the
weight's own memory (no copy into Python bytes, none into a protobuf message, none into grpcio's
slices). The server acknowledges each committed weight on the Session stream as before, so the upload
scheduler, goodput samples and progress see one kind of upload.

Priority: the uplink queue (``ue_client.session.UplinkQueue``) hands this sender one block at a time and
only while no cut tensor waits, so a tensor that becomes ready waits behind at most the block being
written (``UplinkItem.side_waited`` counts it). ``TCP_NOTSENT_LOWAT`` bounds what the kernel holds unsent
behind that block to about ``chunk_s`` of the estimated link (``UplinkQueue.side_unsent_bytes``; blocks and
this bound are ``session.SIDE_IDLE_CHUNK_S`` of it while no cut tensor can become ready: fewer wake-ups of a
throttled UE's sender, measured in the testbed by ``bench/bench_send_insitu.py``), so a
paused channel stops competing with the tensor's connection for the link soon; with no rate estimate
(loopback, a fast LAN) it is a whole block: a smaller bound cost the sender measurably more wake-ups
(resnet18 on loopback: 0.53 ns/B at 256 KiB, 0.46 at 1 MiB, 0.38 at 4 MiB, 5 runs each). The pacing of
the queue (the link estimate, the session's uplink share x the cell rate) covers these bytes too.

Fallback: if the connection cannot be made (no route, a firewall, a relay without the port, TLS or ticket
refused) the weights simply stay in-stream (logged once per address); if it breaks later, the weights it
had not finished, or finished without the server's acknowledgement, go back to the stream from their
first byte. A request never fails because of the data channel.

Threads: the sender thread (``coinfer-data-tx``) owns the socket (connect, TLS handshake, hello, every
write, closing it) and the list of weights it finished; it takes blocks from the queue under the queue's
lock. The session's receiver thread only updates ``SessionStream.held``, which ``is_held`` reads. The
caller's thread creates the sender and, on close, joins it.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import select
import socket
import ssl
import struct
import termios
import threading
from collections.abc import Callable
from dataclasses import dataclass

from protos import datachannel as dc
from ue_client.errors import InputError
from ue_client.inputs import parse_data_address
from ue_client.session import UplinkItem, UplinkQueue

log = logging.getLogger(__name__)

_LOWAT = getattr(socket, "TCP_NOTSENT_LOWAT", None)
SMALL_BLOCK = 64 << 10
"""On TLS, pieces up to this size are joined into one write (a copy of a few kB beats a record each)."""
_warned: set[str] = set()
unreachable: set[str] = set()
"""``HOST:PORT`` of data channels whose last connection attempt failed in this process (a firewall that drops
the port, a relay without it): a later session still tries in the background, but does not wait for it
(``ue_client.connection``); a success takes the address out. Written by sender threads (set operations
are atomic under the GIL)."""


@dataclass(frozen=True)
class DataTarget:
    """Where and how to reach a server's data channel.

    ``host``: the server's host (from the gRPC address); ``port``: None for the advertised
    ``Limits.data_port``, else this one (``address`` overrides both: a relay's "HOST:PORT", the testbed's);
    ``ssl_context``: TLS as the gRPC channel (None: plain text)."""

    host: str
    port: int | None = None
    ssl_context: ssl.SSLContext | None = None


def target_for(
    grpc_address: str,
    *,
    data_address: str | None = None,
    tls_ca: str | None = None,
    tls_cert: str | None = None,
    tls_key: str | None = None,
) -> DataTarget | None:
    """The data channel target of a server reached at ``grpc_address`` ("host:port", "[v6]:port"), with
    the gRPC channel's TLS files (TLS when ``tls_ca`` or a client certificate is given, as
    ``wire.channel``). None when the address has no plain host part (a "unix:" or "dns:///" target):
    then there is no data channel. Raises InputError for a bad ``data_address`` or unreadable PEM files."""
    port = None
    addr = grpc_address
    if data_address is not None:
        _, port = parse_data_address(data_address)
        addr = data_address
    host, sep, p = addr.rpartition(":")
    if not sep or "/" in addr or not p.isdigit():
        return None
    host = host.strip("[]")
    ctx = None
    if tls_ca is not None or tls_cert is not None:
        try:
            ctx = ssl.create_default_context(cafile=tls_ca)
            if tls_cert is not None:
                ctx.load_cert_chain(tls_cert, tls_key)
        except (OSError, ssl.SSLError) as e:
            raise InputError(f"data channel TLS files: {e}") from None
    return DataTarget(host, port, ctx)


class DataSender:
    """Connects to the data channel in the background and then sends the queue's weight blocks.

    ``is_held(sha256)``: whether the server acknowledged that weight (the session's receiver keeps it).
    :attr:`active` is True while weights go this way; :attr:`done` is set once the sender gave up or
    finished (after a fallback the weights are in-stream).
    """

    def __init__(
        self,
        queue: UplinkQueue,
        target: DataTarget,
        port: int,
        ticket: bytes,
        session_id: str,
        *,
        is_held: Callable[[str], bool],
        block_bytes: int,
        connect_timeout_s: float = 5.0,
    ):
        self.queue = queue
        self.target = target
        self.port = target.port or port
        self.ticket = ticket
        self.session_id = session_id
        self.is_held = is_held
        self.block_bytes = block_bytes
        self.connect_timeout_s = connect_timeout_s
        self.active = False
        self.error: str | None = None
        """Why the data channel is not (or no longer) used; None while fine."""
        self.connected = threading.Event()
        self.done = threading.Event()
        self.settled = threading.Event()
        """Set once the connection is up or given up."""
        self._sock: socket.socket | None = None
        """The connected socket while :attr:`active` (``unacked_bytes`` reads its counter)."""
        self._finished: list[UplinkItem] = []
        """Weights whose last block this sender wrote and whose commit the server has not confirmed."""
        self._thread = threading.Thread(target=self._run, name="coinfer-data-tx", daemon=True)
        self._thread.start()

    @property
    def where(self) -> str:
        return f"{self.target.host}:{self.port}"

    def join(self, timeout_s: float) -> None:
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout_s)

    def abandon(self, why: str) -> None:
        """Stop using this data channel (any thread): its socket is shut down, so the sender's write fails and the
        weights it had not delivered go in the session stream (``UplinkQueue.stop_side``), as when the connection
        is lost. For a channel that takes bytes and delivers none: a server answering health checks on gRPC while
        its data channel read nothing held each request of the session to its deadline, for good (session 25)."""
        sock = self._sock
        if sock is None or not self.active:
            return
        log.warning("data channel %s abandoned (%s): weights go in the session stream", self.where, why)
        with contextlib.suppress(OSError):
            socket.socket.shutdown(sock, socket.SHUT_RDWR)

    def unacked_bytes(self) -> int | None:
        """Bytes this channel's socket holds that the server's TCP has not acknowledged (written and
        unsent, sent and unacknowledged: Linux's ``SIOCOUTQ``, the same number as ``TIOCOUTQ``), for
        ``ue_client.backlog``; None while not :attr:`active` or where the counter cannot be read. Any
        thread (one ioctl; TLS records count with their framing)."""
        sock = self._sock
        if sock is None or not self.active:
            return None
        return socket_unacked_bytes(sock)

    # ---- the sender thread ---------------------------------------------------------------------
    def _run(self) -> None:
        try:
            sock = self._connect()
        except (OSError, ValueError, dc.FrameError) as e:  # ssl.SSLError and timeouts are OSErrors
            self.error = f"{type(e).__name__}: {e}"
            level = logging.DEBUG if self.where in _warned else logging.WARNING
            _warned.add(self.where)
            unreachable.add(self.where)
            log.log(level, "data channel %s unavailable (%s): weights go in the session stream", self.where, self.error)
            self.done.set()
            self.settled.set()
            return
        unreachable.discard(self.where)
        self.queue.start_side(self.block_bytes)
        log.info("weights go on the data channel %s%s", self.where, " (TLS)" if self.target.ssl_context else "")
        self._sock = sock
        self.active = True
        self.connected.set()
        self.settled.set()
        try:
            self._send(sock)
        except Exception as e:  # a bug must not strand the weights either: they go in-stream
            self.error = f"{type(e).__name__}: {e}"
            log.warning(
                "data channel %s lost (%s): the weights it had not delivered go in the session stream",
                self.where,
                self.error,
                exc_info=not isinstance(e, OSError),
            )
            self.active = False
            self.queue.stop_side([it for it in self._finished if not self.is_held(it.name)])
        finally:
            self.active = False
            self._sock = None
            with contextlib.suppress(OSError):
                socket.socket.shutdown(sock, socket.SHUT_WR)  # EOF between frames: a clean end
            sock.close()
            self.done.set()

    def _connect(self) -> socket.socket:
        raw = socket.create_connection((self.target.host, self.port), timeout=self.connect_timeout_s)
        try:
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock = raw
            if self.target.ssl_context is not None:
                sock = self.target.ssl_context.wrap_socket(raw, server_hostname=self.target.host)
            sock.sendall(dc.encode_hello(self.ticket, self.session_id))
            answer = sock.recv(1)
            if answer != dc.ACCEPTED:
                raise ConnectionRefusedError(f"the server refused the ticket (answer {answer!r})")
            sock.settimeout(None)
            return sock
        except BaseException:
            raw.close()
            raise

    def _send(self, sock: socket.socket) -> None:
        q = self.queue
        lowat = 0
        plain = not isinstance(sock, ssl.SSLSocket)
        while True:
            blk = q.next_side_block(0.5)
            if blk is None:
                if not q.side or q.closed:
                    return
                self._check_open(sock)
                continue
            want = q.side_unsent_bytes()
            if _LOWAT is not None and want != lowat:
                with contextlib.suppress(OSError):  # Linux has it; elsewhere the kernel's default
                    socket.socket.setsockopt(sock, socket.IPPROTO_TCP, _LOWAT, want)
                lowat = want
            bufs: list = []
            nbytes = 0
            for it, off, end in blk:
                bufs.append(dc.encode_frame(it.name, it.dtype, it.shape, off, end - off, it.total))
                if end > off:
                    bufs.append(it.data[off:end])
                nbytes += end - off
                if end == it.total:
                    self._finished.append(it)
            if plain:
                _sendmsg_all(sock, bufs)  # one gathering write from the weights' own memory
            else:  # TLS: no sendmsg; small pieces joined (a copy of a few kB beats a record each)
                for b in _coalesced(bufs):
                    sock.sendall(b)
            q.side_written(nbytes)

    def _check_open(self, sock: socket.socket) -> None:
        """While idle: the server sends nothing after its answer, so a readable socket means it closed
        the connection (an error on its side): raise ConnectionError. Also forgets acknowledged weights."""
        self._finished = [it for it in self._finished if not self.is_held(it.name)]
        if _readable(sock):
            sock.settimeout(1.0)
            try:
                data = sock.recv(1)
            finally:
                sock.settimeout(None)
            raise ConnectionError("the server closed the data channel" + (f" (sent {data!r})" if data else ""))


def socket_unacked_bytes(sock: socket.socket) -> int | None:
    """Bytes a connected TCP socket holds that its peer has not acknowledged (unsent and sent-unacknowledged:
    ``ioctl(SIOCOUTQ)``, Linux's ``TIOCOUTQ`` on a socket); None where the ioctl fails (another platform, a
    closed socket)."""
    try:
        raw = fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0\0\0\0")
    except (OSError, ValueError):
        return None
    return struct.unpack("i", raw)[0]


def _readable(sock: socket.socket) -> bool:
    """Whether ``sock`` has something to read now. ``poll``, not ``select``: a descriptor >= 1024
    (FD_SETSIZE; a busy process) makes ``select.select`` raise ValueError."""
    p = select.poll()
    p.register(sock, select.POLLIN)
    return bool(p.poll(0))


def _sendmsg_all(sock: socket.socket, bufs: list) -> None:
    """Write every buffer of ``bufs`` in order with gathering writes (``sendmsg``), resuming after a
    partial one: no buffer is copied in user space."""
    views = [memoryview(b).cast("B") for b in bufs]
    while views:
        n = sock.sendmsg(views[:1024])  # IOV_MAX
        while n:
            if n >= len(views[0]):
                n -= len(views[0])
                views.pop(0)
            else:
                views[0] = views[0][n:]
                n = 0


def _coalesced(bufs: list):
    """``bufs`` with runs of small pieces joined (at most :data:`SMALL_BLOCK` together), large ones as they are."""
    run: list = []
    size = 0
    for b in bufs:
        if len(b) > SMALL_BLOCK:
            if run:
                yield b"".join(run)
                run, size = [], 0
            yield b
            continue
        if size + len(b) > SMALL_BLOCK and run:
            yield b"".join(run)
            run, size = [], 0
        run.append(b)
        size += len(b)
    if run:
        yield b"".join(run)
