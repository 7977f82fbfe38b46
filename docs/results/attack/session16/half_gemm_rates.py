"""One thread's float32 / float16 / bfloat16 rates of torch.mm and conv2d by size (attack16; CPU time, best of 1
after a warm-up run). The float16 rows are the slow path the op budget now times at its measured rate.

    flock /work/wt/.bench.lock python docs/results/attack/session16/half_gemm_rates.py
"""

import time

import torch
import torch.nn.functional as F


def best(f, reps=1):
    f()
    b = 1e9
    for _ in range(reps):
        t0 = time.thread_time()
        f()
        b = min(b, time.thread_time() - t0)
    return b


def main() -> None:
    torch.set_num_threads(1)
    dts = [torch.float32, torch.float16, torch.bfloat16]
    for n in [64, 128, 256, 512, 1024]:
        r = {}
        for dt in dts:
            a, b = torch.rand(n, n).to(dt), torch.rand(n, n).to(dt)
            r[str(dt)[6:]] = round(2 * n**3 / best(lambda a=a, b=b: torch.mm(a, b)) / 1e9, 2)
        print("mm GFLOP/s", n, r)
    for c, hw in [(16, 32), (32, 64), (64, 64), (64, 128)]:
        r = {}
        for dt in dts:
            x, w = torch.rand(1, c, hw, hw).to(dt), torch.rand(c, c, 3, 3).to(dt)
            r[str(dt)[6:]] = round(2 * c * c * 9 * hw * hw / best(lambda x=x, w=w: F.conv2d(x, w, padding=1)) / 1e9, 2)
        print("conv GFLOP/s", c, hw, r)
    for n in [1024, 2048]:  # the slow path's fall with size (one run each: 2048 takes ~1 min)
        a, b = torch.rand(n, n).half(), torch.rand(n, n).half()
        t0 = time.perf_counter()
        torch.mm(a, b)
        print(f"mm float16 n={n}: {2 * n**3 / (time.perf_counter() - t0) / 1e9:.2f} GFLOP/s")


if __name__ == "__main__":
    main()
