"""review19 F4 probe (after /tmp/rv19p/p8_paused_memory.py): N tenants each send one ProfileGraph of a 6.45 MiB spec
(tril_chain(45000), whose validation is stopped by the tenant's 0.8 CPU s ProfileGraph budget) at once, to a server
with --memory-mb 1024. Prints the server process's peak RSS growth, the most validations in progress at once (the
server's compile_slice calls running, counted), the memory budget's limit and peak, and the answers' codes.

Run from the repository root: PYTHONPATH=$PWD python docs/results/attack/session19/validation_memory_probe.py [N]"""
import collections
import json
import os
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.getcwd())
import grpc

import edge_server.profile_service
from edge_server.config import MiB, ServerConfig
from edge_server.testing import ServerThread
from protos.coinfer.v1 import coinfer_pb2 as pb
from protos.coinfer.v1 import coinfer_pb2_grpc as pbg
from tests.test_attack18 import tril_chain

N = int(sys.argv[1]) if len(sys.argv) > 1 else 16
tok = [f"tenant-secret-{i:04d}-xyz" for i in range(N)]
fd, path = tempfile.mkstemp(suffix=".json")
with os.fdopen(fd, "w") as f:
    json.dump({"tenants": {f"t{i}": {"token": t, "quota": {"profile_cpu_s": 0.8, "profile_cpu_share": 0.001}}
                           for i, t in enumerate(tok)}}, f)


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


compile_slice, lock, now, most = edge_server.profile_service.compile_slice, threading.Lock(), [0], [0]


def counted(*a, **kw):
    with lock:
        now[0] += 1
        most[0] = max(most[0], now[0])
    try:
        return compile_slice(*a, **kw)
    finally:
        with lock:
            now[0] -= 1


edge_server.profile_service.compile_slice = counted
spec = tril_chain(45000)
cfg = ServerConfig(cache_bytes=16 * MiB, staging_bytes=16 * MiB, threads=1, auth_tokens_file=path,
                   memory_bytes=1024 * MiB)
peak, stop = [0.0], threading.Event()
try:
    with ServerThread(config=cfg) as srv:
        time.sleep(0.5)
        r0 = rss_mib()

        def sample():
            while not stop.is_set():
                peak[0] = max(peak[0], rss_mib() - r0)
                time.sleep(0.02)

        th = threading.Thread(target=sample)
        th.start()
        t0 = time.monotonic()
        with grpc.insecure_channel(srv.address, options=[("grpc.max_send_message_length", 64 * MiB)]) as ch:
            stub = pbg.EdgeServiceStub(ch)
            futs = [stub.ProfileGraph.future(pb.ProfileGraphRequest(slice_spec_json=spec),
                                             metadata=(("authorization", f"Bearer {tok[i]}"),), timeout=300)
                    for i in range(N)]
            codes = collections.Counter()
            for f in futs:
                try:
                    f.result()
                    codes["OK"] += 1
                except grpc.RpcError as e:
                    codes[e.code().name] += 1
        stop.set()
        th.join()
        st = srv.runtime.memory.stats()
        print(f"N={N} tenants  spec {len(spec) / MiB:.2f} MiB  wall {time.monotonic() - t0:.1f} s  "
              f"peak RSS +{peak[0]:.0f} MiB  validations in progress at once (max) {most[0]}  "
              f"memory budget limit {st.limit_bytes / MiB:.0f} MiB peak {st.peak_bytes / MiB:.0f} MiB  "
              f"slot yields {srv.runtime.bounds.compile_slots.yields}  codes {dict(codes)}", flush=True)
finally:
    os.unlink(path)
