"""An application thread drawing from NumPy's / random's global generator now and then (every 100 ms) while the
user captures a deterministic model: DrawWatch.restore puts back the start state and the thread's later draws
repeat values it already drew."""

import random
import threading
import time

import numpy as np
import torch
from torch import nn

from modelgraph.capture import capture

seen_np, seen_py, stop = [], [], False


def app():
    while not stop:
        seen_np.append(float(np.random.random()))
        seen_py.append(random.random())
        time.sleep(0.1)


np.random.seed(0)
random.seed(0)
t = threading.Thread(target=app, daemon=True)
t.start()
m = nn.Sequential(*[nn.Conv2d(8, 8, 3, padding=1) for _ in range(4)]).eval()
x = torch.randn(1, 8, 32, 32)
time.sleep(0.25)
for i in range(3):
    t0 = time.perf_counter()
    capture(m, (x,))
    print(f"capture {i}: {time.perf_counter() - t0:.2f} s")
time.sleep(0.5)
stop = True
t.join()
for name, s in (("np.random", seen_np), ("random", seen_py)):
    dup = len(s) - len(set(s))
    print(f"{name}: {len(s)} draws by the app thread, {dup} repeated values")
