"""One bmm op of many tiny (expanded, stride-0) matrices: wall time at 'highest' vs 'medium' against what the
server's op budget estimates (FLOPs / measured device rate), at the same output bytes."""

import time

import torch

from edge_server.op_budget import measure_device_flops

torch.set_num_threads(1)
rate = measure_device_flops(torch.device("cpu"))
print(f"device_flops {rate / 1e9:.1f} GFLOP/s")
for m, k, n in ((2, 2, 2), (1, 1, 1), (1, 8, 1), (4, 4, 4), (1, 64, 1), (8, 8, 8)):
    B = 2_000_000 // max(m * n // 4, 1)
    a = torch.randn(1, m, k).expand(B, m, k)
    b = torch.randn(1, k, n).expand(B, k, n)
    r = {}
    for p in ("highest", "medium"):
        torch.set_float32_matmul_precision(p)
        with torch.inference_mode():
            torch.bmm(a[:1000], b[:1000])
            t0 = time.perf_counter()
            torch.bmm(a, b)
            r[p] = (time.perf_counter() - t0) * 1e3
    torch.set_float32_matmul_precision("highest")
    est = 2.0 * B * m * k * n / rate * 1e3
    out_mb = B * m * n * 4 / 2**20
    print(
        f"bmm B={B} {m}x{k}x{n}: out {out_mb:.0f} MiB, budget estimate {est:.2f} ms, highest {r['highest']:.0f} ms, "
        f"medium {r['medium']:.0f} ms ({r['medium'] / r['highest']:.1f}x; {r['medium'] / est:.0f}x the estimate)",
        flush=True,
    )
