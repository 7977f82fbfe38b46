import sys, time, statistics, resource
import torch
torch.set_num_threads(1)
from ue_client.client import prepare_model
from modelgraph import run_ue_part
from ue_client.model import bind
from ue_client.heap import retain_freed_buffers
m = prepare_model(sys.argv[1])
g = m.graph
env = bind(g, m.example_inputs)
def t(n=15):
    out = []; f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(n):
        w, c = time.perf_counter(), time.process_time()
        run_ue_part(g, g.split(()), dict(env))
        out.append(((time.perf_counter() - w) * 1e3, (time.process_time() - c) * 1e3))
    f1 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    return f"wall {statistics.median(x[0] for x in out):.2f} cpu {statistics.median(x[1] for x in out):.2f} ms, minor faults/run {(f1 - f0) / n:.0f}"
t(3)
print("default malloc:", t())
print("retain:", retain_freed_buffers())
t(2)
print("tuned malloc:  ", t())
