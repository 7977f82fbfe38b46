"""Sender CPU per byte: plain sendall vs TLS sendall vs TLS through a memory BIO (receiver in another process)."""
import os, socket, ssl, sys, time, resource, multiprocessing as mp
D = "/work/gap-runs/tls/creds"
N = int(os.environ.get("N", 26 << 20))
BLK = int(os.environ.get("BLK", 1 << 20))
LOWAT = int(os.environ.get("LOWAT", 0))

def srv_ctx():
    c = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    c.load_cert_chain(f"{D}/server.pem", f"{D}/server.key")
    return c

def receiver(port_q, mode):
    ls = socket.socket(); ls.bind(("127.0.0.1", 0)); ls.listen(1)
    port_q.put(ls.getsockname()[1])
    s, _ = ls.accept()
    if mode != "plain":
        s = srv_ctx().wrap_socket(s, server_side=True)
    buf = bytearray(1 << 20); got = 0
    while True:
        try:
            n = s.recv_into(buf)
        except (ssl.SSLEOFError, ConnectionResetError):
            break
        if not n: break
        got += n
    port_q.put(got)

def mbio_handshake(raw, ctx):
    inc, out = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(inc, out, server_hostname="127.0.0.1")
    while True:
        try:
            obj.do_handshake(); break
        except ssl.SSLWantReadError:
            raw.sendall(out.read())
            d = raw.recv(65536)
            if not d: raise ConnectionError
            inc.write(d)
    raw.sendall(out.read())
    return obj, out

def run(mode):
    q = mp.Queue(); p = mp.Process(target=receiver, args=(q, mode)); p.start()
    port = q.get()
    data = memoryview(bytearray(os.urandom(1 << 20)) * (N >> 20))
    s = socket.create_connection(("127.0.0.1", port)); s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if LOWAT:
        s.setsockopt(socket.IPPROTO_TCP, 25, LOWAT)
    ctx = ssl.create_default_context(cafile=f"{D}/ca.pem")
    obj = None
    if mode == "tls":
        s = ctx.wrap_socket(s, server_hostname="127.0.0.1")
    elif mode == "mbio":
        obj, out = mbio_handshake(s, ctx)
    r0 = resource.getrusage(resource.RUSAGE_SELF); t0 = time.thread_time(); w0 = time.perf_counter()
    for off in range(0, N, BLK):
        if obj is not None:
            obj.write(data[off:off + BLK])
            s.sendall(out.read())
        else:
            s.sendall(data[off:off + BLK])
    t1 = time.thread_time(); w1 = time.perf_counter(); r1 = resource.getrusage(resource.RUSAGE_SELF)
    if mode == "tls":
        pass
    socket.socket.shutdown(s, socket.SHUT_WR)
    got = q.get(); p.join()
    assert got == N, (mode, got)
    pr = (r1.ru_utime + r1.ru_stime - r0.ru_utime - r0.ru_stime)
    return dict(mode=mode, thread_ns_B=round((t1 - t0) * 1e9 / N, 3), proc_ns_B=round(pr * 1e9 / N, 3), wall_ms=round((w1 - w0) * 1e3, 1))

if __name__ == "__main__":
    for rep in range(int(os.environ.get("REPS", 3))):
        for m in sys.argv[1:] or ["plain", "tls", "mbio"]:
            print(run(m), flush=True)
