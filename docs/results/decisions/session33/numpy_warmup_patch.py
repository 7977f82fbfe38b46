# ruff: noqa  (scratch timer of session 33: STAGES_PATCH for ../session30/plan_path/stages.py; WARM=1 makes a dozen
# small numpy calls before request 2's decision and logs their CPU and the decision's to /tmp/s33/warm.log)
import time, json, os
import numpy as np
from ue_client import decider
orig = decider.Decider.decide_now
a = np.arange(50, dtype=float); idx = np.arange(0, 50, 5); g = np.arange(50) % 7
def decide_now(self, n):
    if n != 2:
        return orig(self, n)
    c0 = time.thread_time()
    if os.environ.get("WARM") == "1":
        b = np.bincount(g, weights=a[np.arange(50)], minlength=7); c = np.cumsum(b).tolist()
        d = np.maximum.reduceat(a / 3.0 + a * 2.0, idx) * (1 - 1e-12); e = a.copy(); e[a > 3] = 0.0
        f = np.fromiter(map(bool, range(10)), dtype=bool, count=10)
    c1 = time.thread_time()
    try:
        return orig(self, n)
    finally:
        c2 = time.thread_time()
        with open("/tmp/s33/warm.log", "a") as fh:
            fh.write(f"WARM={os.environ.get('WARM')} warmup={1e3*(c1-c0):.3f} decide={1e3*(c2-c1):.3f}\n")
decider.Decider.decide_now = decide_now
