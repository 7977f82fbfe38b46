# ruff: noqa  (a results script, kept as it ran)
"""One op of a raw slice at the per-tensor cap through a real edge server's ProfileGraph: time held vs budget."""
import sys, time, grpc, json
from tests.test_attack15 import _meta, _zeros, _op, _spec
from edge_server.testing import ServerThread
from protos.coinfer.v1 import coinfer_pb2 as pb
from protos.coinfer.v1 import coinfer_pb2_grpc as pbg
dt, target, log2n = sys.argv[1], sys.argv[2], int(sys.argv[3])
N = 1 << log2n
ops = [_zeros("z", [N], dt), _op("a", "aten.add.Scalar", [{"t": "z"}, 0.3], [_meta([N], dt)])]
args = [{"t": "a"}, {"t": "a"}] if target in ("aten.pow.Tensor_Tensor",) else [{"t": "a"}]
ops.append(_op("r", target, args, [_meta([N], dt)]))
spec = _spec(ops, {"x": _meta([1])}, "r")
with ServerThread(threads=1) as srv:
    lim = srv.runtime.op_limits
    print("limits", lim, flush=True)
    stub = pbg.EdgeServiceStub(grpc.insecure_channel(srv.address))
    t = time.time()
    try:
        r = stub.ProfileGraph(pb.ProfileGraphRequest(slice_spec_json=spec, iterations=1, warmup=0), timeout=300)
        print(f"ran: ProfileGraph held {time.time() - t:.2f} s wall; per-op budget {lim.max_op_ms:.0f} ms", str(r).replace("\n", " ")[:400])
    except grpc.RpcError as e:
        print("refused", e.code(), e.details()[:300], f"{time.time() - t:.2f} s")
