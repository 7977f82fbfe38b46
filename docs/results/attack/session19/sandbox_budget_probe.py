"""review19 F5 probe (after /tmp/rv19p/p10_sandbox_budget.py): tenant alice's ProfileGraph budget is 0.5 CPU s
(refilled at 0.05 per s); her spec's validation (tril_chain(8000)) needs more. In process (--profile-workers 0) and
in a profiling child (--profile-workers 1): 4 attempts, each retried after the "retry in N s" it was told; prints the
answers and the children killed mid-validation.

Run from the repository root: PYTHONPATH=$PWD python docs/results/attack/session19/sandbox_budget_probe.py"""
import json
import os
import re
import sys
import tempfile
import time

sys.path.insert(0, os.getcwd())
import grpc

from edge_server.config import MiB, ServerConfig
from edge_server.testing import ServerThread
from protos.coinfer.v1 import coinfer_pb2 as pb
from protos.coinfer.v1 import coinfer_pb2_grpc as pbg
from tests.test_attack18 import tril_chain

TOK = "tenant-secret-sandbox-1"
fd, path = tempfile.mkstemp(suffix=".json")
with os.fdopen(fd, "w") as f:
    json.dump({"tenants": {"alice": {"token": TOK, "quota": {"profile_cpu_s": 0.5, "profile_cpu_share": 0.05}}}}, f)
spec = tril_chain(8000)
try:
    for workers in (0, 1):
        cfg = ServerConfig(cache_bytes=16 * MiB, staging_bytes=16 * MiB, threads=1, auth_tokens_file=path,
                           profile_workers=workers)
        with ServerThread(config=cfg) as srv, grpc.insecure_channel(srv.address) as ch:
            stub = pbg.EdgeServiceStub(ch)
            for attempt in range(4):
                t0 = time.perf_counter()
                try:
                    stub.ProfileGraph(pb.ProfileGraphRequest(slice_spec_json=spec),
                                      metadata=(("authorization", f"Bearer {TOK}"),), timeout=120)
                    print(f"workers={workers} attempt {attempt}: OK")
                except grpc.RpcError as e:
                    d = e.details()
                    print(f"workers={workers} attempt {attempt}: {e.code().name} after "
                          f"{time.perf_counter() - t0:.1f} s: {d[:40]} ... {d[-60:]}", flush=True)
                    m = re.search(r"retry in ([\d.]+) s", d)
                    if m:
                        time.sleep(float(m.group(1)) + 0.05)
            if srv.runtime.sandbox is not None:
                print(f"workers={workers}: children killed mid-validation {srv.runtime.sandbox.budget_kills}")
finally:
    os.unlink(path)
