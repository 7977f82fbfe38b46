"""Capture and profile the benchmark models on this machine; write one CostGraph JSON per model.

    .venv/bin/python bench/make_costgraphs.py --out bench/costgraphs [--runs 5] [--speedup 10]

UE costs are measured here (CPU, per-op latency, ``runs`` timed runs each). Server costs are a labelled
what-if: server op time = UE op time / ``speedup`` (``meta["server_costs"]`` says so), unless a real server
profile is plugged in later with ``CostGraph.with_server_costs``. The JSONs feed
``bench/bench_partitioner.py --captured DIR``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

log = logging.getLogger("make_costgraphs")

MODELS = ("torchvision:resnet18", "torchvision:resnet50", "torchvision:mobilenet_v2", "torchvision:googlenet",
          "torchvision:densenet121", "modelgraph.zoo:vit_small", "torchvision:vit_b_16")


def make_one(spec: str, out: Path, runs: int, speedup: float, threads: int | None) -> dict:
    import modelgraph
    from profiler import cost_graph, profile_model

    t0 = time.perf_counter()
    lm = modelgraph.load_model(spec)
    g = modelgraph.capture(lm.module, lm.example_inputs, name=lm.name)
    t1 = time.perf_counter()
    prof = profile_model(g, lm.example_inputs, runs=runs, threads=threads)
    t2 = time.perf_counter()
    cg = cost_graph(g, prof).with_server_speedup(speedup)
    path = out / f"{lm.name}.json"
    cg.to_json(path)
    info = {"spec": spec, "model": cg.model, "ops": len(cg), "weights_mb": cg.total_weight_bytes / 1e6,
            "ue_total_ms": sum(op.ue_ms for op in cg.ops), "capture_s": t1 - t0, "profile_s": t2 - t1,
            "server_costs": cg.meta.get("server_costs"), "path": str(path)}
    log.info("%-28s %5d ops  %7.1f MB weights  UE %8.2f ms  (capture %.1f s, profile %.1f s) -> %s", spec,
             info["ops"], info["weights_mb"], info["ue_total_ms"], info["capture_s"], info["profile_s"], path)
    return info


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="bench/costgraphs", help="output directory for <model>.json")
    ap.add_argument("--models", nargs="*", default=list(MODELS), help="model specs (torchvision:NAME, pkg.mod:fn)")
    ap.add_argument("--runs", type=int, default=5, help="timed profiling runs per op")
    ap.add_argument("--speedup", type=float, default=10.0, help="what-if server speedup over the UE")
    ap.add_argument("--threads", type=int, default=None, help="torch threads while profiling (default: torch's)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    infos, failed = [], []
    for spec in args.models:
        try:
            infos.append(make_one(spec, out, args.runs, args.speedup, args.threads))
        except Exception as e:  # one model failing (e.g. torchvision missing) must not lose the others
            log.error("%s: %s", spec, e)
            log.debug("%s", traceback.format_exc())
            failed.append({"spec": spec, "error": f"{type(e).__name__}: {e}"})
    (out / "index.json").write_text(json.dumps({"graphs": infos, "failed": failed}, indent=1))
    return 1 if failed and not infos else 0


if __name__ == "__main__":
    raise SystemExit(main())
