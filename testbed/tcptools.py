"""Plain-TCP traffic tools to measure an emulated or shaped link: a server and timed client transfers.

Why: link tests and benchmarks need a transfer whose timing covers delivery at the far end (not just the
sender's socket buffer) and a checksum for integrity, without depending on the gRPC runtime. The server
runs in a thread (``TrafficServer``) or as a process (``python -m testbed.tcptools serve``), e.g. inside a
network namespace.

Protocol (client -> server: 1 op byte + 8-byte big-endian argument):
  ``U n``  client sends n bytes; server answers the sha256 (32 bytes) of what it received.
  ``D n``  server sends n random bytes, then their sha256.
  ``P n``  n ping-pongs of 64-byte messages (server echoes each).
  ``E 0``  echo everything until EOF.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import logging
import os
import signal
import socket
import struct
import sys
import threading
import time

log = logging.getLogger(__name__)

_HDR = struct.Struct("!cQ")
_CHUNK = 64 * 1024
_PING = 64


class TrafficError(RuntimeError):
    """A transfer failed: connection closed early or a checksum mismatch."""


@dataclasses.dataclass(frozen=True)
class TransferResult:
    """One timed transfer. ``mbps`` is goodput in 1e6 bit/s over the whole transfer."""

    direction: str
    nbytes: int
    seconds: float
    sha_ok: bool

    @property
    def mbps(self) -> float:
        return self.nbytes * 8 / self.seconds / 1e6 if self.seconds > 0 else float("inf")


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        part = sock.recv(min(n - len(buf), 1 << 20))
        if not part:
            raise TrafficError(f"connection closed after {len(buf)} of {n} bytes")
        buf += part
    return bytes(buf)


class TrafficServer:
    """Threaded traffic server on ``host:port`` (port 0: any free port, see ``.port``)."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self._lsock = socket.create_server((host, port))
        self.host = host
        self.port = self._lsock.getsockname()[1]
        self._conns: set[socket.socket] = set()
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()
        self._closed = False
        self._acceptor = threading.Thread(target=self._accept_loop, name="traffic-accept", daemon=True)
        self._acceptor.start()

    def _accept_loop(self) -> None:
        while True:
            try:
                conn, _ = self._lsock.accept()
            except OSError:
                return
            with self._lock:
                if self._closed:
                    conn.close()
                    return
                self._conns.add(conn)
                t = threading.Thread(target=self._serve, args=(conn,), name="traffic-conn", daemon=True)
                self._threads.append(t)
            t.start()

    def _serve(self, conn: socket.socket) -> None:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            op, n = _HDR.unpack(_recv_exact(conn, _HDR.size))
            if op == b"U":
                h = hashlib.sha256()
                left = n
                while left:
                    part = conn.recv(min(left, 1 << 20))
                    if not part:
                        raise TrafficError(f"upload closed with {left} bytes missing")
                    h.update(part)
                    left -= len(part)
                conn.sendall(h.digest())
            elif op == b"D":
                h = hashlib.sha256()
                left = n
                while left:
                    part = os.urandom(min(left, _CHUNK))
                    h.update(part)
                    conn.sendall(part)
                    left -= len(part)
                conn.sendall(h.digest())
            elif op == b"P":
                for _ in range(n):
                    conn.sendall(_recv_exact(conn, _PING))
            elif op == b"E":
                while part := conn.recv(1 << 20):
                    conn.sendall(part)
            else:
                raise TrafficError(f"unknown op {op!r}")
        except (OSError, TrafficError) as exc:
            log.debug("traffic connection ended: %r", exc)
        finally:
            with self._lock:
                self._conns.discard(conn)
            conn.close()

    def close(self) -> None:
        """Close the listening socket and every connection; join the threads."""
        with self._lock:
            self._closed = True
            conns = list(self._conns)
        with contextlib.suppress(OSError):
            self._lsock.shutdown(socket.SHUT_RDWR)
        self._lsock.close()
        for c in conns:
            with contextlib.suppress(OSError):
                c.shutdown(socket.SHUT_RDWR)
        self._acceptor.join(5)
        for t in self._threads:
            t.join(5)

    def __enter__(self) -> TrafficServer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _connect(host: str, port: int, timeout: float) -> socket.socket:
    sock = socket.create_connection((host, port), timeout=timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def upload(host: str, port: int, nbytes: int, timeout: float = 30.0) -> TransferResult:
    """Send ``nbytes`` of random data; time until the server confirms the checksum of all of it."""
    payload = os.urandom(nbytes)
    with _connect(host, port, timeout) as sock:
        t0 = time.perf_counter()
        sock.sendall(_HDR.pack(b"U", nbytes))
        sock.sendall(payload)
        digest = _recv_exact(sock, 32)
        dt = time.perf_counter() - t0
    return TransferResult("up", nbytes, dt, digest == hashlib.sha256(payload).digest())


def download(host: str, port: int, nbytes: int, timeout: float = 30.0) -> TransferResult:
    """Receive ``nbytes`` of random data; time from the request to the last byte."""
    h = hashlib.sha256()
    with _connect(host, port, timeout) as sock:
        t0 = time.perf_counter()
        sock.sendall(_HDR.pack(b"D", nbytes))
        left = nbytes
        while left:
            part = sock.recv(min(left, 1 << 20))
            if not part:
                raise TrafficError(f"download closed with {left} of {nbytes} bytes missing")
            h.update(part)
            left -= len(part)
        dt = time.perf_counter() - t0
        digest = _recv_exact(sock, 32)
    return TransferResult("down", nbytes, dt, digest == h.digest())


def ping(host: str, port: int, count: int = 10, timeout: float = 10.0) -> list[float]:
    """Round-trip times (s) of ``count`` 64-byte messages on one connection (first one included)."""
    msg = os.urandom(_PING)
    rtts = []
    with _connect(host, port, timeout) as sock:
        sock.sendall(_HDR.pack(b"P", count))
        for _ in range(count):
            t0 = time.perf_counter()
            sock.sendall(msg)
            if _recv_exact(sock, _PING) != msg:
                raise TrafficError("ping payload corrupted")
            rtts.append(time.perf_counter() - t0)
    return rtts


def main(argv: list[str] | None = None) -> int:
    """``serve HOST PORT`` prints ``listening on HOST:PORT``; ``upload|download|ping HOST PORT N``
    prints one JSON line."""
    import json

    p = argparse.ArgumentParser(prog="python -m testbed.tcptools")
    p.add_argument("cmd", choices=["serve", "upload", "download", "ping"])
    p.add_argument("host")
    p.add_argument("port", type=int)
    p.add_argument("n", type=int, nargs="?", default=1 << 20)
    args = p.parse_args(argv)
    if args.cmd == "serve":
        srv = TrafficServer(args.host, args.port)
        print(f"listening on {args.host}:{srv.port}", flush=True)
        stop = threading.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.set())
        try:
            while not stop.wait(0.5):
                pass
        finally:
            srv.close()
        return 0
    if args.cmd == "ping":
        rtts = ping(args.host, args.port, args.n)
        print(json.dumps({"rtt_ms": [r * 1000 for r in rtts]}), flush=True)
        return 0
    fn = upload if args.cmd == "upload" else download
    r = fn(args.host, args.port, args.n)
    print(json.dumps({**dataclasses.asdict(r), "mbps": r.mbps}), flush=True)
    return 0 if r.sha_ok else 1


if __name__ == "__main__":
    sys.exit(main())
