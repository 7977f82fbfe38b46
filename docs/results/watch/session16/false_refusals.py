"""No new false refusals: every user-zoo model that runs and torchvision families, captured as a client captures
them (``prepare_model``), then ``WeightWatch.check()``, the user's own eager call twice (``model(*x)``, as users do
beside the client), and ``check()`` again; prints ok / REFUSED per model and what the watch holds past the modules'
attributes (``_Reached``: slots, snapshots).

    PYTHONPATH=$PWD python docs/results/watch/session16/false_refusals.py [--tv resnet18,...] [--no-zoo]
"""
import argparse
import time

import torch

from tests import user_zoo as uz
from ue_client.errors import InputError
from ue_client.model import WeightWatch, prepare_model

TV = ("resnet18,mobilenet_v2,mobilenet_v3_small,densenet121,efficientnet_b0,regnet_y_400mf,shufflenet_v2_x0_5,"
      "squeezenet1_0,googlenet,mnasnet0_5,alexnet,convnext_tiny,swin_t,vit_b_16,maxvit_t")


def one(spec: str) -> str:
    t = time.perf_counter()
    try:
        pm = prepare_model(spec)
    except Exception as e:  # a capture refusal is no WeightWatch matter: reported as such
        return f"capture refused ({type(e).__name__}: {str(e)[:80]})"
    w = WeightWatch(pm.graph, pm.module)
    r = None if w._python is None else w._python.reached
    held = "-" if r is None else f"{len(r.slots)} slots, {len(r.snaps)} snapshots"
    try:
        w.check()
        with torch.inference_mode():
            for _ in range(2):
                pm.module(*pm.example_inputs, **pm.example_kwargs)
        w.check()
    except InputError as e:
        return f"REFUSED ({held}): {str(e)[:200]}"
    return f"ok ({held}; {time.perf_counter() - t:.1f} s)"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tv", default=TV)
    ap.add_argument("--no-zoo", action="store_true")
    a = ap.parse_args()
    specs = [] if a.no_zoo else [uz.spec(n) for n, k in uz.KINDS.items() if k == "runs"]
    specs += [f"torchvision:{n}" for n in a.tv.split(",") if n]
    for s in specs:
        print(f"{s:40s} {one(s)}", flush=True)


if __name__ == "__main__":
    main()
