import sys, time, os
from pathlib import Path
sys.path.insert(0, str(Path(os.environ["ROOT"]) / "bench")); sys.path.insert(0, "/tmp/uecpu")

import edge_process, torch, tick
torch.set_num_threads(1)
from ue_client.client import CoinferClient
root = Path(os.environ.get("ROOT", "/work/wt/uecpu"))
N = int(sys.argv[2]) if len(sys.argv) > 2 else 200
res = {}
with edge_process.edge_server(root) as port:
  for model in sys.argv[1].split(","):
    with CoinferClient(f"torchvision:{model}", server=f"127.0.0.1:{port}", policy="offload", tenant=f"p{os.getpid()}") as c:
        x = c.example_inputs[0].clone()
        c(x); c.engine.wait_uploads(120)
        for _ in range(10): c(x)
        tick.T.clear(); tick.ON[0] = True
        t0 = time.thread_time()
        for _ in range(N): c(x)
        tot = (time.thread_time()-t0)*1e3/N
        tick.ON[0] = False
        assert c.last_report.server_ops > 0 and not c.last_report.fallback
        res[model] = (tot, {k: v*1e3/N for k, v in tick.T.items()})
keys = sorted({k for _, d in res.values() for k in d})
print(f"{'step':34s}" + "".join(f"{m:>14s}" for m in res))
print(f"{'caller thread total':34s}" + "".join(f"{t:14.4f}" for t, _ in res.values()))
print(f"{'sum of steps':34s}" + "".join(f"{sum(d.values()):14.4f}" for _, d in res.values()))
for k in keys:
    print(f"{k:34s}" + "".join(f"{d.get(k,0):14.4f}" for _, d in res.values()))
