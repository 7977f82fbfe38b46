"""Review repro (session 34, 17d06d35): ``_sdpa_flash_ready`` calls a scaled_dot_product_attention with
broadcast batch or head dims (q [1, 8, L, E] against k, v [8, 8, S, E], or q heads 1) flash-ready, but torch's
CPU dispatcher (``check_batch_size_and_num_heads_dense``) sends it to the math path (``_fused_sdp_choice`` 0):
the op budget prices it at the flash kernel's cost and it runs ~2.2-2.4x that price (one thread).

Run: .venv/bin/python docs/results/review/session34/repro_sdpa_flash_broadcast.py
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from edge_server.op_budget import OpLimits, _sdpa, _sdpa_flash_ready, measure_device_flops, priced_seconds
from modelgraph.tensors import TensorMeta

TARGET = "aten.scaled_dot_product_attention.default"


def _meta(t: torch.Tensor) -> TensorMeta:
    return TensorMeta(tuple(t.shape), "float32", tuple(t.stride()))


def case(qs: tuple, ks: tuple, limits: OpLimits) -> tuple[bool, int, float, float]:
    q, k, v = torch.randn(*qs), torch.randn(*ks), torch.randn(*ks)
    backend = int(torch._fused_sdp_choice(q, k, v))  # 1: flash, 0: math
    out = F.scaled_dot_product_attention(q, k, v)
    best = float("inf")
    for _ in range(3):
        t = time.perf_counter()
        F.scaled_dot_product_attention(q, k, v)
        best = min(best, time.perf_counter() - t)
    metas = [_meta(q), _meta(k), _meta(v)]
    ready = _sdpa_flash_ready(*metas, tuple(m.stride for m in metas), 0.0)
    price = priced_seconds(TARGET, "float32", _sdpa(metas, {}, _meta(out), flash=ready), limits)
    return ready, backend, best, price


def main() -> None:
    torch.set_num_threads(1)
    limits = OpLimits(device_flops=measure_device_flops(torch.device("cpu")), threads=1)
    bad = 0
    for label, qs, ks in (
        ("same batch (control)", (8, 8, 512, 64), (8, 8, 512, 64)),
        ("q batch 1, k/v batch 8", (1, 8, 512, 64), (8, 8, 512, 64)),
        ("q heads 1, k/v heads 8", (8, 1, 512, 64), (8, 8, 512, 64)),
    ):
        ready, backend, ran, price = case(qs, ks, limits)
        print(
            f"{label}: flash_ready={ready} torch backend={backend} ran {ran * 1e3:.1f} ms, priced {price * 1e3:.1f} ms"
            f" ({ran / price:.2f}x)"
        )
        if ready and backend != 1:
            bad += 1
    print("BUG: flash-priced but run on the math path" if bad else "ok")


if __name__ == "__main__":
    main()
