"""A 2-layer 512-unit LSTM over 200 steps on one thread at batches 1-128 against the RNN cost rule as it stood at
6ebeb1d (8x the products' FLOPs at any batch, 4e6 per step and cell): lstm_batch.txt."""

import time

import torch

from edge_server.op_budget import measure_device_flops

FACTOR_AT_6EBEB1D, STEP_FLOPS = 8.0, 4e6
torch.set_num_threads(1)
rate1 = measure_device_flops(torch.device("cpu"))
for B in (1, 4, 32, 128):
    m = torch.nn.LSTM(512, 512, num_layers=2).eval()
    x = torch.randn(200, B, 512)
    with torch.inference_mode():
        m(x)
        best = 1e9
        for _ in range(3):
            t0 = time.perf_counter()
            m(x)
            best = min(best, time.perf_counter() - t0)
    weights = sum(p.numel() for p in m.parameters())
    est = FACTOR_AT_6EBEB1D * 2 * 200 * B * weights + STEP_FLOPS * 200 * 2
    print(f"B={B}: measured {best*1e3:.0f} ms (1 thread); estimate {est/rate1*1e3:.0f} ms at the 1-thread rate "
          f"{rate1/1e9:.0f} GFLOP/s, x2 threads {est/rate1/2*1e3:.0f} ms; budget 2000 ms")
