"""Other allowlisted ops whose CPU kernels run matrix products: 'medium' vs 'highest' (1 thread) and the server's
op-budget estimate (edge_server.op_budget.estimate_op at the measured device rate)."""

import time

import torch
import torch.nn.functional as F

torch.set_num_threads(1)


def t(f):
    with torch.inference_mode():
        f()
        t0 = time.perf_counter()
        f()
        return (time.perf_counter() - t0) * 1e3


cases = {
    "lstm T=20000 B=1 H=8 in=8": lambda: (lambda m, x: lambda: m(x))(torch.nn.LSTM(8, 8), torch.randn(20000, 1, 8)),
    "gru T=20000 B=1 H=8": lambda: (lambda m, x: lambda: m(x))(torch.nn.GRU(8, 8), torch.randn(20000, 1, 8)),
    "sdpa 20000 heads L=4 d=8": lambda: (lambda q: lambda: F.scaled_dot_product_attention(q, q, q))(
        torch.randn(20000, 1, 4, 8)
    ),
    "linear x[200000,1,8] w[1,8]": lambda: (lambda x, w: lambda: F.linear(x, w))(
        torch.randn(200000, 1, 8), torch.randn(1, 8)
    ),
    "matmul broadcast [200000,1,8]@[8,1]": lambda: (lambda x, w: lambda: torch.matmul(x, w))(
        torch.randn(200000, 1, 8), torch.randn(8, 1)
    ),
    "baddbmm 200000x1x8x1": lambda: (lambda c, a, b: lambda: torch.baddbmm(c, a, b))(
        torch.randn(200000, 1, 1), torch.randn(200000, 1, 8), torch.randn(200000, 8, 1)
    ),
}
for name, mk in cases.items():
    f = mk()
    r = {}
    for p in ("highest", "medium"):
        torch.set_float32_matmul_precision(p)
        r[p] = t(f)
    torch.set_float32_matmul_precision("highest")
    print(
        f"{name:38s} highest {r['highest']:8.1f} ms  medium {r['medium']:8.1f} ms  {r['medium'] / r['highest']:5.1f}x",
        flush=True,
    )
