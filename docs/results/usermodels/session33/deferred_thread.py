"""A .data write from another thread while warm split calls run: every answer must equal eager's before the write
or after it, or be refused; a call that starts after the write must not return the 'before' answer."""

import threading
import time

import torch
from common import client
from torch import nn

torch.manual_seed(0)
m = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 8)).eval()
x = torch.randn(8, 64)
with client(m, (x,), k=2) as c, torch.no_grad():
    for _ in range(3):
        c(x)
    before = m(x)
    results = []
    stop = threading.Event()

    def caller():
        while not stop.is_set():
            t0 = time.perf_counter()
            try:
                v = c(x)
                results.append((t0, time.perf_counter(), "ok", v, c.last_report.server_ops))
            except Exception as e:
                results.append((t0, time.perf_counter(), type(e).__name__, None, None))

    th = threading.Thread(target=caller)
    th.start()
    time.sleep(0.3)
    tw = time.perf_counter()
    m[2].weight.data.mul_(1.5)
    time.sleep(0.3)
    stop.set()
    th.join()
    after = m(x)
    bad = 0
    for t0, _t1, kind, v, _srv in results:
        if kind != "ok":
            tag = kind
        else:
            db, da = (v - before).abs().max().item(), (v - after).abs().max().item()
            tag = "before" if db < 1e-5 else "after" if da < 1e-5 else f"NEITHER({db:.3g},{da:.3g})"
        if t0 > tw and tag == "before":
            bad += 1
            print(f"WRONG: call started {1e3 * (t0 - tw):.1f} ms after the write answered the old weights' output")
    print(
        len(results),
        "calls;",
        sum(t0 < tw for t0, *_ in results),
        "started before the write;",
        "tags after:",
        sorted({(r[2] if r[2] != "ok" else "ok") for r in results if r[0] > tw}),
        "bad",
        bad,
    )
    print(
        "calls straddling the write:",
        [
            (
                round(1e3 * (t0 - tw), 1),
                round(1e3 * (t1 - tw), 1),
                k,
                None if v is None else ("before" if (v - before).abs().max() < 1e-5 else "after/other"),
            )
            for t0, t1, k, v, s in results
            if t0 <= tw <= t1
        ],
    )
