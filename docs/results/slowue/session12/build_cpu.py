"""CPU ms (process, full core) of constructing ``CoinferClient(resnet50, policy="local")`` N times in one process,
each closed before the next (as the testbed's worker does per stream), with ``gc_freeze`` on or off; the last
construction's time inside ``gc.get_freeze_count`` too. Usage: build_cpu.py on|off [N]; prints one JSON line."""

from __future__ import annotations

import gc
import json
import sys
import time

from ue_client.client import CoinferClient, prepare_model


def main() -> None:
    freeze, n = sys.argv[1] == "on", int(sys.argv[2]) if len(sys.argv) > 2 else 6
    m = prepare_model("torchvision:resnet50")
    real, walk = gc.get_freeze_count, [0.0]

    def counted():
        t = time.process_time()
        try:
            return real()
        finally:
            walk[0] += (time.process_time() - t) * 1e3

    gc.get_freeze_count = counted
    builds, walks = [], []
    for _ in range(n):
        walk[0] = 0.0
        t = time.process_time()
        c = CoinferClient(m.graph, m.example_inputs, server="127.0.0.1:1", policy="local", gc_freeze=freeze)
        builds.append(round((time.process_time() - t) * 1e3, 1))
        walks.append(round(walk[0], 1))
        c.close()
    print(json.dumps({"gc_freeze": freeze, "build_cpu_ms": builds, "get_freeze_count_cpu_ms": walks}))


if __name__ == "__main__":
    main()
