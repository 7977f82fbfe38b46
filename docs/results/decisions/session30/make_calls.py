# ruff: noqa: E402, SIM115  (measurement script of session 30)
"""Session 29b's six recorded real-client calls plus googlenet's request 2 and 3 made the same way. The real client
at 400 Mbit/s made no search for googlenet's later requests (it invested at request 1, then held the target: call 1,
then reuses), and at 400 Mbit/s googlenet's request 2 on a suspended client is all-server with no strategy weighed.
So googlenet's calls are made at 200 Mbit/s (downlink 20, RTT 5 ms as recorded), where its request 2 is a prefetch
plan like resnet18's call 4: first the search made while connecting (call 0's inputs at this link: it fills what a
client keeps), then "request 2", resnet18's call 4 with googlenet's graph, link and warm target (the connect
search's), the same UE scale, horizon and lost latency, nothing held, and "request 3", resnet18's call 5 likewise,
holding what the request-2 answer planned to send during it (its background order up to its prefetch bytes,
``prefetched_state``: the weight cut mid-way in flight). Writes calls.pkl here; the answers are this
checkout's (``replay.py`` checks every later run against them)."""

import copy
import pickle
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[3]
COST = ROOT / "docs/results/cold/session10/costgraphs"
from partitioner.costgraph import CostGraph, Link
from partitioner.state import ServerState
from ue_client import planning

calls = pickle.load(open(ROOT / "docs/results/decisions/session29b/calls.pkl", "rb"))
bases = {}
for c in calls:  # first the recorded calls, in order, as the replay runs them (what a call keeps serves the next)
    if c["model"] not in bases:
        bases[c["model"]] = CostGraph.from_json(COST / f"{c['model']}.json").scaled(ue=10.0)
    planning.choose(c["policy"], bases[c["model"]].scaled(ue=c["f"][0], server=c["f"][1]), c["link"], **c["kw"])
base = bases["googlenet"]
link = Link(200.0, downlink_mbps=20.0, rtt_ms=5.0)
out = list(calls)
target = None
for src, name in ((calls[0], "connect"), (calls[4], "request 2"), (calls[5], "request 3")):
    kw = copy.copy(src["kw"])
    if name == "connect":  # googlenet's connect search (call 0's inputs) at this link
        kw["state"] = ServerState()
    elif name == "request 2":
        kw["target"], kw["state"] = target, ServerState()
    else:
        r2 = out[-1]
        sizes = [(w, base.weights[w]) for w in r2["background"]]
        kw["target"] = target
        kw["state"] = planning.prefetched_state(ServerState(), sizes, r2["details"].get("prefetch_bytes", 0.0))
    costs = base.scaled(ue=src["f"][0], server=src["f"][1])
    r = planning.choose("auto", costs, link, **kw)
    if name == "connect":
        target = r.warm_target
    out.append(
        {
            "model": "googlenet",
            "f": src["f"],
            "policy": "auto",
            "link": link,
            "kw": kw,
            "cpu_ms": float("nan"),
            "server_ops": sorted(r.server_ops),
            "predicted_ms": r.predicted_ms,
            "reason": r.reason,
            "background": r.background,
            "details": dict(r.details),
            "made": name,
        }
    )
    print(len(out) - 1, name, r.reason[:120], len(kw["state"].held), dict(kw["state"].in_flight))
pickle.dump(out, open(HERE / "calls.pkl", "wb"))
