"""review17 F5: what one tenant's DefineSlices make the server spend on validation.

    flock /work/wt/.bench.lock env PYTHONPATH=$PWD python docs/results/attack/session18/validation_probe.py K N \
        [SERVER_FLAG ...]

PROBE_ROOT=DIR runs another checkout's server (the version before the fix). A raw client (grpc, the project's
protos) with a tenant's token opens one Session and sends K DefineSlices one after another, each a slice of N
``tril`` ops with distinct diagonals (no two meta-kernel calls alike: validation's memo never hits). Prints each
answer (SliceDefined, or SliceRejected with its code and message), the wall time it took, and the server process's
CPU (psutil, user + system) over the whole run.
"""

from __future__ import annotations

import json
import os
import queue
import sys
import tempfile
import time

import grpc
import psutil

from edge_server.attacks import serve_subprocess
from protos.coinfer.v1 import coinfer_pb2 as pb
from protos.coinfer.v1 import coinfer_pb2_grpc as pbg
from tests.test_attack18 import tril_chain

TOKEN = "alice-secret-123"
_CODES = {c.value[0]: c.name for c in grpc.StatusCode}


def main(k: int, n: int, flags: list[str]) -> None:
    path = os.path.join(tempfile.mkdtemp(), "t.json")
    with open(path, "w") as f:
        f.write(json.dumps({"tenants": {"alice": {"token": TOKEN}}}))
    proc, addr = serve_subprocess("--auth-tokens", path, "--threads", "1", *flags,
                                  root=os.environ.get("PROBE_ROOT") or None)
    ps = psutil.Process(proc.pid)
    spec = tril_chain(n)
    try:
        with grpc.insecure_channel(addr, options=[("grpc.max_send_message_length", 64 << 20)]) as ch:
            q: queue.Queue = queue.Queue()
            call = pbg.EdgeServiceStub(ch).Session(iter(q.get, None), metadata=(("authorization", f"Bearer {TOKEN}"),),
                                                   timeout=600)
            q.put(pb.SessionRequest(open=pb.OpenSession(model_id="m")))
            assert next(call).HasField("opened")
            c0 = sum(ps.cpu_times()[:2])
            t00 = time.perf_counter()
            for i in range(k):
                t0 = time.perf_counter()
                q.put(pb.SessionRequest(define_slice=pb.DefineSlice(slice_id=f"s{i}", slice_spec_json=spec)))
                msg = next(call)
                while not (msg.HasField("slice_defined") or msg.HasField("slice_rejected")):
                    msg = next(call)
                r = msg.slice_rejected
                what = ("SliceDefined" if msg.HasField("slice_defined") else
                        f"SliceRejected {_CODES.get(r.code, r.code)}: {r.message[:110]}")
                print(f"  DefineSlice {i + 1}: {time.perf_counter() - t0:6.2f} s  {what}", flush=True)
            cpu = sum(ps.cpu_times()[:2]) - c0
            print(f"  {k} x {n} ops: {time.perf_counter() - t00:.1f} s wall, server CPU {cpu:.1f} s", flush=True)
            q.put(None)
            call.cancel()
    finally:
        proc.terminate()
        proc.wait(10)


if __name__ == "__main__":
    print(f"# {time.strftime('%H:%M', time.gmtime())} load {os.getloadavg()[0]:.2f} server "
          f"{os.environ.get('PROBE_ROOT') or 'this checkout'} flags {sys.argv[3:]}", flush=True)
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3:])
