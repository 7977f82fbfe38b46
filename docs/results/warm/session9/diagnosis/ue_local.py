"""Under a CPU quota (set by the parent after the capture): the UE profile, connect's 3-run UE scale and
20 local runs now, to see whether the local prediction (profile x scale) matches local runs."""
import sys, time, statistics, json, os
import torch
torch.set_num_threads(1)
from ue_client.client import prepare_model
from modelgraph import run_ue_part
from ue_client.model import bind
from profiler import profile_model
m = prepare_model(sys.argv[1])
print("CAPTURED", flush=True); sys.stdin.readline()
g = m.graph
t = time.perf_counter()
prof = profile_model(g, m.example_inputs, threads=1, runs=20, warmup=2, use_cache=False)
prof_s = time.perf_counter() - t
env0 = bind(g, m.example_inputs)
def run():
    t = time.perf_counter(); c = time.process_time()
    run_ue_part(g, g.split(()), dict(env0))
    return (time.perf_counter() - t) * 1e3, (time.process_time() - c) * 1e3
three = [run() for _ in range(3)]
scale = sorted(x[0] for x in three)[1] / prof.sum_mean_ms
later = [run() for _ in range(20)]
out = {"model": sys.argv[1], "profile_s": prof_s, "sum_mean_ms": prof.sum_mean_ms, "whole_model_ms": prof.whole_model_ms,
       "whole_samples": list(prof.whole_model_samples_ms), "calibration": prof.calibration,
       "three_ms": [x[0] for x in three], "scale": scale, "predicted_local_ms": prof.sum_mean_ms * scale,
       "later_ms": [x[0] for x in later], "later_cpu_ms": [x[1] for x in later],
       "later_mean": statistics.fmean(x[0] for x in later), "later_median": statistics.median(x[0] for x in later)}
print("RESULT " + json.dumps(out), flush=True)
