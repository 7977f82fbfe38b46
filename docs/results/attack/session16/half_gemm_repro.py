"""float16 conv / mm on the CPU: counted as float32 by the op budget, run 90-160x slower (attack16).

    PYTHONPATH=$PWD python docs/results/attack/session16/half_gemm_repro.py 64 128 1024

Starts a real server (one thread), sends ProfileGraph slices of zeros factories + one conv2d / mm in float32 and
float16 from a raw gRPC client, and prints what came back and how long it took. Before the fix both float16 slices
ran (3.8 s for the mm); after, they are RESOURCE_EXHAUSTED naming the time budget.
"""

import json
import sys
import time

import grpc

from edge_server.config import MiB, ServerConfig
from edge_server.testing import ServerThread
from protos.coinfer.v1 import coinfer_pb2 as pb
from protos.coinfer.v1 import coinfer_pb2_grpc as pbg


def meta(s, d="float32"):
    return {"shape": list(s), "dtype": d}


def zeros(name, shape, dtype):
    return {"name": name, "target": "aten.zeros.default", "args": [list(shape)],
            "kwargs": {"dtype": {"dtype": dtype}, "device": {"device": None}, "pin_memory": False},
            "outputs": [meta(shape, dtype)]}


def op(name, target, args, outs):
    return {"name": name, "target": target, "args": args, "kwargs": {}, "outputs": outs}


def spec(ops, out):
    return json.dumps({"version": 1, "ops": ops, "inputs": {"i": meta([1])}, "outputs": [out],
                       "weights": {}}).encode()


def conv(dt, c, hw):
    return spec([zeros("x", [1, c, hw, hw], dt), zeros("w", [c, c, 3, 3], dt),
                 op("y", "aten.conv2d.default", [{"t": "x"}, {"t": "w"}, None, [1, 1], [1, 1]],
                    [meta([1, c, hw, hw], dt)])], "y")


def mm(dt, n):
    return spec([zeros("a", [n, n], dt), zeros("b", [n, n], dt),
                 op("y", "aten.mm.default", [{"t": "a"}, {"t": "b"}], [meta([n, n], dt)])], "y")


def main() -> None:
    c, hw, n = (int(a) for a in sys.argv[1:4])
    cases = {"conv_f32": conv("float32", c, hw), "conv_f16": conv("float16", c, hw),
             "mm_f32": mm("float32", n), "mm_f16": mm("float16", n)}
    with ServerThread(config=ServerConfig(cache_bytes=8 * MiB, staging_bytes=8 * MiB, threads=1)) as srv:
        lim = srv.runtime.op_limits
        print(f"device_flops {lim.device_flops / 1e9:.1f} GFLOP/s, budget {lim.max_flops / 1e9:.0f} GFLOP, "
              f"slow dtypes {getattr(lim, 'slow_gemm_rates', None)}")
        stub = pbg.EdgeServiceStub(grpc.insecure_channel(srv.address))
        for k, s in cases.items():
            t0 = time.monotonic()
            try:
                r = stub.ProfileGraph(pb.ProfileGraphRequest(slice_spec_json=s, iterations=1, warmup=0), timeout=600)
                print(k, len(s), "bytes: ran", [(o.name, round(o.mean_ms, 1)) for o in r.ops],
                      f"{time.monotonic() - t0:.1f} s")
            except grpc.RpcError as e:
                print(k, len(s), "bytes: refused", e.code(), e.details()[:160], f"{time.monotonic() - t0:.1f} s")


if __name__ == "__main__":
    main()
