# ruff: noqa  (a results script, kept as it ran)
"""Per-element cost of ops the op budget under-estimated, in matmul-equivalent FLOPs (this machine, 1 thread)."""
import math, time, torch
torch.set_num_threads(1)
def t(f, r=2):
    best = 1e9
    for _ in range(r):
        t0 = time.perf_counter(); f(); best = min(best, time.perf_counter() - t0)
    return best
a = torch.rand(256, 256); b = torch.rand(256, 256)
mm = max(2 * 256**3 / t(lambda: torch.mm(a, b), 5) for _ in range(3))
print("mm GFLOP/s %.1f" % (mm / 1e9))
def rep(name, secs, units):
    print("%-44s %7.3f s  %.3g units  factor %.1f" % (name, secs, units, mm * secs / units))
for N, D in ((1024, 65536), (65536, 4096), (262144, 1024)):
    w = torch.zeros(1, D); idx = torch.zeros(N, dtype=torch.long); v = torch.rand(D)
    rep(f"index_put acc same row N={N} D={D}", t(lambda: torch.ops.aten.index_put.default(w, [idx], v, True), 1), N * D)
    rep(f"index_put noacc same row N={N} D={D}", t(lambda: torch.ops.aten.index_put.default(w, [idx], v, False), 1), N * D)
    w2 = torch.zeros(N, D); idx2 = torch.randperm(N)
    rep(f"index_put acc distinct rows N={N} D={D}", t(lambda: torch.ops.aten.index_put.default(w2, [idx2], v, True), 1), N * D)
    del w2
w = torch.zeros(4096, 64); idx = torch.randint(0, 4096, (1 << 22,)); v = torch.rand(1 << 22, 64)
rep("index_put acc random rows N=4M D=64", t(lambda: torch.ops.aten.index_put.default(w, [idx], v, True), 1), (1 << 22) * 64)
del v
w = torch.rand(1, 1 << 16); idx = torch.zeros(1 << 16, dtype=torch.long); off = torch.zeros(1, dtype=torch.long)
rep("embedding_bag N=64K D=64K", t(lambda: torch.ops.aten.embedding_bag.default(w, idx, off), 1), (1 << 32))
w = torch.rand(1 << 16, 64); idx = torch.randint(0, 1 << 16, (1 << 22,)); off = torch.arange(0, 1 << 22, 4)
rep("embedding_bag random N=4M D=64", t(lambda: torch.ops.aten.embedding_bag.default(w, idx, off), 1), (1 << 22) * 64)
for n in (1 << 20, 1 << 24):
    x = torch.rand(n)
    rep(f"sort n={n} (n log2 n)", t(lambda: torch.sort(x), 1), n * math.log2(n))
    rep(f"sort stable n={n} (n log2 n)", t(lambda: torch.sort(x, stable=True), 1), n * math.log2(n))
    xi = (torch.arange(n) * 2654435761).to(torch.int32)
    rep(f"sort int32 n={n}", t(lambda: torch.sort(xi), 1), n * math.log2(n))
    for k in (5, n // 16, n // 2):
        rep(f"topk k={k} of n={n} (n log2 (k+1))", t(lambda: torch.topk(x, k), 1), n * math.log2(k + 1))
x = torch.rand(64, 1 << 14)
rep("sort rows 64 x 16K (n log2 16K)", t(lambda: torch.sort(x, dim=1), 1), x.numel() * 14)
x2 = torch.rand(1, 4, 1024, 1024)
for mode, m in (("nearest", 1), ("bilinear", 0), ("bicubic", 2)):
    g = torch.rand(1, 1024, 1024, 2) * 2 - 1
    rep(f"grid_sampler {mode} out 4M", t(lambda: torch.ops.aten.grid_sampler_2d.default(x2, g, m, 0, False), 1), 4 * (1 << 20))
    rep(f"grid_sampler (generic) {mode} out 4M", t(lambda: torch.ops.aten.grid_sampler.default(x2, g, m, 0, False), 1), 4 * (1 << 20))
for mode in ("nearest", "bilinear", "bicubic"):
    kw = {} if mode == "nearest" else {"align_corners": False}
    rep(f"upsample {mode} x2 out 16M", t(lambda: torch.nn.functional.interpolate(x2, scale_factor=2, mode=mode, **kw), 1), 16 * (1 << 20))
for cls, g in ((torch.nn.LSTM, 4), (torch.nn.GRU, 3), (torch.nn.RNN, 1)):
    for (T, B, I, H) in ((200, 4, 512, 512), (1000, 1, 64, 64), (50, 64, 256, 1024)):
        l = cls(I, H); xx = torch.rand(T, B, I)
        with torch.inference_mode():
            s = t(lambda: l(xx), 1)
        rep(f"{cls.__name__} T={T} B={B} I={I} H={H} (2 steps params)", s, 2 * T * B * g * H * (I + H))
