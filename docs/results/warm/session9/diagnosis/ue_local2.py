import sys, time, statistics, json
import torch
torch.set_num_threads(1)
from ue_client.client import prepare_model, CoinferClient
from modelgraph import run_ue_part
from ue_client.model import bind
m = prepare_model(sys.argv[1])
print("CAPTURED", flush=True); sys.stdin.readline()
g = m.graph
gen = torch.Generator().manual_seed(0)
rand = tuple(torch.randn(x.shape, generator=gen) for x in m.example_inputs)
def t(fn, n=12):
    out = []
    for _ in range(n):
        w, c = time.perf_counter(), time.process_time()
        fn()
        out.append(((time.perf_counter() - w) * 1e3, (time.process_time() - c) * 1e3))
    return {"wall": round(statistics.fmean(x[0] for x in out), 1), "cpu": round(statistics.fmean(x[1] for x in out), 2)}
res = {}
e_ex = bind(g, m.example_inputs); e_rd = bind(g, rand)
res["run_ue_part_example"] = t(lambda: run_ue_part(g, g.split(()), dict(e_ex)))
res["run_ue_part_randn"] = t(lambda: run_ue_part(g, g.split(()), dict(e_rd)))
c = CoinferClient(g, m.example_inputs, server="127.0.0.1:1", policy="local")
res["client_local_randn"] = t(lambda: c(*rand))
res["client_local_example"] = t(lambda: c(*m.example_inputs))
res["run_ue_part_example_again"] = t(lambda: run_ue_part(g, g.split(()), dict(e_ex)))
print("RESULT " + json.dumps(res), flush=True)
