"""CPU of a prefetching or cold request's steps on the calling thread outside the model's compute.

The split, the slice (``make_slice``, its JSON, the JSON's sha256), the weights' sha256 and byte views
(``tensor_bytes``, one per weight queued): the least ``time.thread_time`` of 5 calls each, in ms, at full
speed on one thread (session 11, under the bench lock:
``python micro_prefetch.py googlenet mobilenet_v2 > micro_prefetch.txt``, from the repository root).
"""

from __future__ import annotations

import hashlib
import sys
import time

import torch

from modelgraph import tensor_bytes
from modelgraph.slice import make_slice
from ue_client.model import prepare_model


def best_ms(fn, n: int = 5) -> float:
    best = 1e9
    for _ in range(n):
        c = time.thread_time()
        fn()
        best = min(best, time.thread_time() - c)
    return round(best * 1e3, 3)


def main(models: list[str]) -> None:
    torch.set_num_threads(1)
    for name in models:
        g = prepare_model(f"torchvision:{name}").graph
        allops = frozenset(op.name for op in g.ops)
        print(name, "ops", len(g.ops), "weights", len(g.weights))
        print(" split(all)", best_ms(lambda g=g, a=allops: g.split(a)))
        print(" split(())", best_ms(lambda g=g: g.split(())))
        sp = g.split(allops)
        print(" make_slice", best_ms(lambda g=g, sp=sp: make_slice(g, sp)))
        spec = make_slice(g, sp).to_json()
        print(" to_json", best_ms(lambda g=g, sp=sp: make_slice(g, sp).to_json()), "len", len(spec))
        print(" sha(spec)", best_ms(lambda s=spec: hashlib.sha256(s.encode()).hexdigest()))
        print(" weight_sha256 all", best_ms(lambda g=g: [g.weight_sha256(w) for w in g.weights]))
        print(" tensor_bytes all", best_ms(lambda g=g: [tensor_bytes(g.weight_values[w]) for w in g.weights]))


if __name__ == "__main__":
    main(sys.argv[1:])
