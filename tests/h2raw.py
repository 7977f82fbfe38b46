"""A raw HTTP/2 client for gRPC calls whose bytes a test controls: a message sent in part, then left unfinished.

grpc's own client sends a message whole as flow control lets it; a stranger need not. This one speaks just enough
HTTP/2 (RFC 9113) to open gRPC calls and send DATA within the server's flow-control windows: the connection preface,
SETTINGS (and their ACK), PING ACKs, WINDOW_UPDATE accounting, HEADERS with HPACK literals (RFC 7541 section 6.2.2,
no Huffman, no indexing), DATA, RST_STREAM. It decodes no response headers (the server's HPACK): a test reads the
server's own accounting, or ends a call and sees it gone. What the server lets a call send before it reads is what
it holds in its buffers: :meth:`H2Conn.fill` sends until the server's windows stop growing.

Used by ``tests/test_attack22.py`` and ``docs/results/attack/session22/``.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
import time

DATA, HEADERS, RST_STREAM, SETTINGS, PING, GOAWAY, WINDOW_UPDATE = 0, 1, 3, 4, 6, 7, 8
END_STREAM, ACK, END_HEADERS = 0x1, 0x1, 0x4
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
SERVICE = "/coinfer.v1.EdgeService/"


def _int(value: int, prefix: int) -> bytes:
    """HPACK integer (RFC 7541 5.1) with a ``prefix``-bit prefix, first byte's flag bits 0."""
    top = (1 << prefix) - 1
    if value < top:
        return bytes([value])
    out = [top]
    value -= top
    while value >= 128:
        out.append((value & 127) | 128)
        value >>= 7
    out.append(value)
    return bytes(out)


def _literal(name: str, value: str) -> bytes:
    """A header field as a literal without indexing, new name (RFC 7541 6.2.2), no Huffman."""
    n, v = name.encode(), value.encode()
    return b"\x00" + _int(len(n), 7) + n + _int(len(v), 7) + v


def grpc_message(payload: bytes, declared: int | None = None) -> bytes:
    """gRPC's length-prefixed message (uncompressed): ``declared`` overrides the length (a message sent in part)."""
    return struct.pack(">BI", 0, len(payload) if declared is None else declared) + payload


class H2Conn:
    """One HTTP/2 connection to ``host:port`` (cleartext) with a reader thread; :meth:`close` ends it."""

    def __init__(self, host: str, port: int, timeout: float = 10.0, source: str | None = None) -> None:
        self.sock = socket.create_connection((host, port), timeout=timeout,
                                             source_address=(source, 0) if source else None)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock.settimeout(None)
        self._lock = threading.Condition()
        self._send_lock = threading.Lock()
        self.conn_window = 65535
        self.initial_window = 65535
        self.max_frame = 16384
        self.windows: dict[int, int] = {}
        """Stream -> bytes of DATA the server's window lets this client send now."""
        self.ended: set[int] = set()
        """Streams the server ended (END_STREAM or RST_STREAM)."""
        self.closed = False
        self.goaway = False
        self._next = 1
        self._send(PREFACE + self._frame(SETTINGS, 0, 0, b""))
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    @staticmethod
    def _frame(kind: int, flags: int, stream: int, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload))[1:] + bytes([kind, flags]) + struct.pack(">I", stream) + payload

    def _send(self, data: bytes) -> None:
        with self._send_lock:
            self.sock.sendall(data)

    def _recv(self, n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            part = self.sock.recv(n - len(buf))
            if not part:
                raise ConnectionError("closed")
            buf += part
        return buf

    def _read(self) -> None:
        try:
            while True:
                head = self._recv(9)
                length = int.from_bytes(head[:3], "big")
                kind, flags = head[3], head[4]
                stream = int.from_bytes(head[5:9], "big") & 0x7FFFFFFF
                payload = self._recv(length) if length else b""
                with self._lock:
                    if kind == SETTINGS and not flags & ACK:
                        for i in range(0, len(payload), 6):
                            ident, value = struct.unpack(">HI", payload[i:i + 6])
                            if ident == 4:  # SETTINGS_INITIAL_WINDOW_SIZE: applies to open streams too
                                for s in self.windows:
                                    self.windows[s] += value - self.initial_window
                                self.initial_window = value
                            elif ident == 5:
                                self.max_frame = value
                        self._send(self._frame(SETTINGS, ACK, 0, b""))
                    elif kind == PING and not flags & ACK:
                        self._send(self._frame(PING, ACK, 0, payload))
                    elif kind == WINDOW_UPDATE:
                        inc = int.from_bytes(payload[:4], "big") & 0x7FFFFFFF
                        if stream == 0:
                            self.conn_window += inc
                        elif stream in self.windows:
                            self.windows[stream] += inc
                    elif kind == DATA and length:  # answers: give their window back at once (we read them all)
                        self._send(self._frame(WINDOW_UPDATE, 0, 0, struct.pack(">I", length))
                                   + (self._frame(WINDOW_UPDATE, 0, stream, struct.pack(">I", length))
                                      if not flags & END_STREAM else b""))
                    elif kind == RST_STREAM or (kind in (HEADERS, DATA) and flags & END_STREAM):
                        self.ended.add(stream)
                    elif kind == GOAWAY:
                        self.goaway = True
                    self._lock.notify_all()
        except (ConnectionError, OSError):
            pass
        with self._lock:
            self.closed = True
            self._lock.notify_all()

    def open(self, method: str, metadata: tuple = (), authority: str = "localhost", service: str = SERVICE) -> int:
        """Start a call of ``service``'s ``method`` (the EdgeService's by default; HEADERS, no message yet);
        returns its stream id."""
        with self._lock:
            sid = self._next
            self._next += 2
            self.windows[sid] = self.initial_window
        block = b"".join(_literal(k, v) for k, v in (
            (":method", "POST"), (":scheme", "http"), (":path", service + method), (":authority", authority),
            ("content-type", "application/grpc"), ("te", "trailers"), *metadata))
        self._send(self._frame(HEADERS, END_HEADERS, sid, block))
        return sid

    def send(self, sid: int, data: bytes, end: bool = False, timeout: float = 10.0) -> int:
        """Send ``data`` on stream ``sid`` as flow control allows, waiting up to ``timeout`` s in all for the
        windows; returns the bytes sent (fewer than ``len(data)`` if the windows stayed shut)."""
        sent, deadline = 0, time.monotonic() + timeout
        while sent < len(data):
            with self._lock:
                while (min(self.conn_window, self.windows[sid]) <= 0 and not self.closed
                       and sid not in self.ended and time.monotonic() < deadline):
                    self._lock.wait(max(0.0, deadline - time.monotonic()))
                room = min(self.conn_window, self.windows[sid], self.max_frame, len(data) - sent)
                if room <= 0:
                    return sent
                self.conn_window -= room
                self.windows[sid] -= room
            last = end and sent + room == len(data)
            self._send(self._frame(DATA, END_STREAM if last else 0, sid, data[sent:sent + room]))
            sent += room
        if end and not data:
            self._send(self._frame(DATA, END_STREAM, sid, b""))
        return sent

    def fill(self, sid: int, data: bytes, settle_s: float = 0.5, timeout: float = 20.0) -> int:
        """Send ``data`` until the server's windows stay shut for ``settle_s`` (or all is sent, or ``timeout``);
        returns the bytes the server took in."""
        sent, deadline = 0, time.monotonic() + timeout
        while sent < len(data) and time.monotonic() < deadline:
            n = self.send(sid, data[sent:], timeout=min(settle_s, max(0.0, deadline - time.monotonic())))
            if n == 0:
                break
            sent += n
        return sent

    def reset(self, sid: int) -> None:
        """End stream ``sid`` (RST_STREAM CANCEL)."""
        self._send(self._frame(RST_STREAM, 0, sid, struct.pack(">I", 8)))

    def close(self) -> None:
        with self._lock:
            self.closed = True
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        self._reader.join(5)
