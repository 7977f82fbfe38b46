# ruff: noqa  (a results script, kept as it ran)
"""Per-element time of allowlisted elementwise ops vs what edge_server.op_budget counts for them (1 thread)."""
import time, torch, json, sys
import torch.nn.functional as F
from edge_server.op_budget import measure_device_flops
torch.set_num_threads(1)
flops = measure_device_flops(torch.device("cpu"))
print(f"device_flops {flops/1e9:.1f} GFLOP/s", flush=True)
OPS = {
  "exp": (torch.exp, 2, 1), "log": (torch.log, 2, 1), "sqrt": (torch.sqrt, 2, 1), "rsqrt": (torch.rsqrt, 2, 1),
  "pow.Tensor_Tensor": (lambda x: torch.pow(x, x), 3, 1), "pow.Tensor_Scalar": (lambda x: torch.pow(x, 2.5), 2, 1),
  "tanh": (torch.tanh, 2, 1), "sigmoid": (torch.sigmoid, 2, 1), "reciprocal": (torch.reciprocal, 2, 1),
  "erf": (torch.erf, 2, 8), "gelu": (F.gelu, 2, 8), "silu": (F.silu, 2, 1), "mish": (F.mish, 2, 1),
  "softplus": (F.softplus, 2, 1), "elu": (F.elu, 2, 1), "div.Tensor": (lambda x: x / (x + 1), 3, 1),
  "cumsum": (lambda x: torch.cumsum(x, 0), 2, 1),
}
factor = {"float32": 1.0, "float64": 2.0, "complex64": 4.0, "complex128": 4.0}
n = 1 << 22
rows = []
for dn in ("float32", "float64", "complex64", "complex128"):
    dt = getattr(torch, dn)
    x = torch.full((n,), 0.3 + 0.2j if dt.is_complex else 0.3, dtype=dt)
    for name, (f, touched, per) in OPS.items():
        try:
            f(x[:16])
        except Exception:
            continue
        best = 1e9
        for _ in range(3):
            t = time.perf_counter(); f(x); best = min(best, time.perf_counter() - t)
        est = per * touched * n * factor[dn] / flops
        rows.append((dn, name, best / n * 1e9, best / est))
        print(f"{dn:10s} {name:18s} {best / n * 1e9:7.2f} ns/elem  actual/estimated {best / est:7.1f}", flush=True)
json.dump({"device_flops": flops, "n": n, "rows": rows}, open(sys.argv[1], "w"), indent=1)
