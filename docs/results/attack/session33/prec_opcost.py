"""Per-op cost of float32 matmul-family ops at 'highest' vs 'medium' on this CPU (AMX/AVX512-BF16).
If 'medium' is much slower for some shape, the server's op-time budget (FLOPs at the 'highest' rate
measured at start) under-counts a client that picks 'medium'."""

import time

import torch

torch.set_num_threads(1)


def t(f, n=5):
    f()
    best = 1e9
    for _ in range(n):
        t0 = time.perf_counter()
        f()
        best = min(best, time.perf_counter() - t0)
    return best * 1e3


cases = {
    "mm 512x512x512": (lambda: (torch.randn(512, 512), torch.randn(512, 512)), lambda a, b: a @ b),
    "mm 1x4096 @ 4096x4096": (lambda: (torch.randn(1, 4096), torch.randn(4096, 4096)), lambda a, b: a @ b),
    "mm 4096x1 @ 1x4096": (lambda: (torch.randn(4096, 1), torch.randn(1, 4096)), lambda a, b: a @ b),
    "mm 8x8192 @ 8192x8 ": (lambda: (torch.randn(8, 8192), torch.randn(8192, 8)), lambda a, b: a @ b),
    "mm 2x2 x200k bmm": (lambda: (torch.randn(200000, 2, 2), torch.randn(200000, 2, 2)), lambda a, b: torch.bmm(a, b)),
    "bmm 20000x3x5 @5x7": (lambda: (torch.randn(20000, 3, 5), torch.randn(20000, 5, 7)), lambda a, b: torch.bmm(a, b)),
    "bmm 64x64x64 x256": (lambda: (torch.randn(256, 64, 64), torch.randn(256, 64, 64)), lambda a, b: torch.bmm(a, b)),
    "mm transposed 1024": (lambda: (torch.randn(1024, 1024).t(), torch.randn(1024, 1024).t()), lambda a, b: a @ b),
    "mm strided 1024": (lambda: (torch.randn(1024, 2048)[:, ::2], torch.randn(2048, 1024)[::2]), lambda a, b: a @ b),
    "mv 4096": (lambda: (torch.randn(4096, 4096), torch.randn(4096)), lambda a, b: torch.mv(a, b)),
    "conv 64ch 56x56 3x3": (
        lambda: (torch.randn(1, 64, 56, 56), torch.randn(64, 64, 3, 3)),
        lambda a, b: torch.nn.functional.conv2d(a, b, padding=1),
    ),
    "mm 1x1x1 (tiny)": (lambda: (torch.randn(1, 1), torch.randn(1, 1)), lambda a, b: a @ b),
    "bmm tiny x 1 (tiny)": (lambda: (torch.randn(1, 4, 4), torch.randn(1, 4, 4)), lambda a, b: torch.bmm(a, b)),
    "mm 3x100000 @100000x3": (lambda: (torch.randn(3, 100000), torch.randn(100000, 3)), lambda a, b: a @ b),
}
print(f"{'case':28s} {'highest ms':>11s} {'medium ms':>10s} {'ratio':>6s}")
for name, (mk, f) in cases.items():
    a, b = mk()
    r = {}
    for p in ("highest", "medium"):
        torch.set_float32_matmul_precision(p)
        r[p] = t(lambda: f(a, b))  # noqa: B023
    torch.set_float32_matmul_precision("highest")
    print(f"{name:28s} {r['highest']:11.3f} {r['medium']:10.3f} {r['medium'] / r['highest']:6.2f}", flush=True)
