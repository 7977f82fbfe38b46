"""Per-matrix time of bmm (B x 1 x K) @ (B x K x 1) on broadcast operands at 'medium' vs 'highest' (1 thread), and
the largest B the server's per-tensor limit (1 GiB declared: B*K*4) allows -> one op's time at that B."""

import time

import torch

torch.set_num_threads(1)
for K in (1, 4, 16, 64, 256, 1024, 4096):
    B = 200_000
    a = torch.randn(1, 1, K).expand(B, 1, K)
    b = torch.randn(1, K, 1).expand(B, K, 1)
    r = {}
    for p in ("highest", "medium"):
        torch.set_float32_matmul_precision(p)
        with torch.inference_mode():
            torch.bmm(a[:100], b[:100])
            t0 = time.perf_counter()
            torch.bmm(a, b)
            r[p] = (time.perf_counter() - t0) / B * 1e9
    torch.set_float32_matmul_precision("highest")
    bmax = min((1 << 30) // (4 * K), (1 << 30) // 4)
    print(
        f"K={K:5d}: highest {r['highest']:7.0f} ns/matrix, medium {r['medium']:7.0f} ns/matrix; B<= {bmax:>11,d} by the "  # noqa: E501
        f"tensor limit -> one op {bmax * r['medium'] / 1e9:6.1f} s medium, {bmax * r['highest'] / 1e9:5.2f} s highest",
        flush=True,
    )
