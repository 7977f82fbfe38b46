"""Sender CPU per byte of a plain socket, a TLS socket and TLS through a memory BIO (loopback).

The floor the data channel's TLS sender is compared with: N bytes (default 26 MiB, googlenet's server part)
sent in 1 MiB ``sendall`` calls from one buffer, the receiver (which decrypts) in another process;
``thread_ns_B``: the sending thread's CPU (``time.thread_time``), ``proc_ns_B``: the sender process's
(``getrusage``). Modes: ``plain``, ``tls`` (``SSLContext.wrap_socket``, TLS 1.3 as the testbed's),
``mbio`` (records encrypted into a ``MemoryBIO``, then one plain ``sendall`` per block). ``LOWAT=BYTES``
sets ``TCP_NOTSENT_LOWAT`` as the data channel does. Run (session 11, under the bench lock):
``python tls_floor.py`` and ``LOWAT=1048576 REPS=3 python tls_floor.py`` with ``CREDS`` a directory of
``testbed.credentials.make_credentials`` (ca.pem, server.pem, server.key).
"""

from __future__ import annotations

import multiprocessing as mp
import os
import resource
import socket
import ssl
import sys
import time

D = os.environ.get("CREDS", "/work/gap-runs/tls/creds")
N = int(os.environ.get("N", 26 << 20))
BLK = int(os.environ.get("BLK", 1 << 20))
LOWAT = int(os.environ.get("LOWAT", 0))


def srv_ctx() -> ssl.SSLContext:
    c = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    c.load_cert_chain(f"{D}/server.pem", f"{D}/server.key")
    return c


def receiver(port_q, mode: str) -> None:
    ls = socket.socket()
    ls.bind(("127.0.0.1", 0))
    ls.listen(1)
    port_q.put(ls.getsockname()[1])
    s, _ = ls.accept()
    if mode != "plain":
        s = srv_ctx().wrap_socket(s, server_side=True)
    buf = bytearray(1 << 20)
    got = 0
    while True:
        try:
            n = s.recv_into(buf)
        except (ssl.SSLEOFError, ConnectionResetError):
            break
        if not n:
            break
        got += n
    port_q.put(got)


def mbio_handshake(raw: socket.socket, ctx: ssl.SSLContext):
    inc, out = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(inc, out, server_hostname="127.0.0.1")
    while True:
        try:
            obj.do_handshake()
            break
        except ssl.SSLWantReadError:
            raw.sendall(out.read())
            d = raw.recv(65536)
            if not d:
                raise ConnectionError("closed during the handshake") from None
            inc.write(d)
    raw.sendall(out.read())
    return obj, out


def run(mode: str) -> dict:
    q = mp.Queue()
    p = mp.Process(target=receiver, args=(q, mode))
    p.start()
    port = q.get()
    data = memoryview(bytearray(os.urandom(1 << 20)) * (N >> 20))
    s = socket.create_connection(("127.0.0.1", port))
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if LOWAT:
        s.setsockopt(socket.IPPROTO_TCP, 25, LOWAT)  # TCP_NOTSENT_LOWAT
    ctx = ssl.create_default_context(cafile=f"{D}/ca.pem")
    obj = out = None
    if mode == "tls":
        s = ctx.wrap_socket(s, server_hostname="127.0.0.1")
    elif mode == "mbio":
        obj, out = mbio_handshake(s, ctx)
    r0 = resource.getrusage(resource.RUSAGE_SELF)
    t0, w0 = time.thread_time(), time.perf_counter()
    for off in range(0, N, BLK):
        if obj is not None:
            obj.write(data[off:off + BLK])
            s.sendall(out.read())
        else:
            s.sendall(data[off:off + BLK])
    t1, w1 = time.thread_time(), time.perf_counter()
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    socket.socket.shutdown(s, socket.SHUT_WR)
    got = q.get()
    p.join()
    assert got == N, (mode, got)
    pr = r1.ru_utime + r1.ru_stime - r0.ru_utime - r0.ru_stime
    return {"mode": mode, "thread_ns_B": round((t1 - t0) * 1e9 / N, 3), "proc_ns_B": round(pr * 1e9 / N, 3),
            "wall_ms": round((w1 - w0) * 1e3, 1)}


if __name__ == "__main__":
    for _ in range(int(os.environ.get("REPS", 3))):
        for m in sys.argv[1:] or ["plain", "tls", "mbio"]:
            print(run(m), flush=True)
