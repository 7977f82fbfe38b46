"""PrecisionGate (edge_server/precision.py) with more than one holder thread: holders of one precision keep
entering while another precision waits (readers' preference), so a waiter can starve. Latent on `coinfer-edge
serve` (one compute worker: ServerConfig.workers = 1, no flag), live for any embedding with workers > 1.
Two 'attacker' threads each hold 'medium' for 5 ms, back to back, overlapping; a 'victim' thread asks for 'highest'
every 20 ms. Measures how long the victim waits to enter, with and without the attackers."""

import os
import statistics
import sys
import threading
import time

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "../../../..")))
from edge_server.precision import PrecisionGate


def run(attackers: int, seconds: float = 3.0):
    gate, stop, waits = PrecisionGate(), threading.Event(), []

    def attacker(offset):
        time.sleep(offset)
        while not stop.is_set():
            with gate.hold("medium"):
                t = time.perf_counter()
                while time.perf_counter() - t < 0.005:  # a 5 ms batch (busy, as an op is)
                    pass

    def victim():
        while not stop.is_set():
            t0 = time.perf_counter()
            with gate.hold("highest"):
                waits.append((time.perf_counter() - t0) * 1e3)
            time.sleep(0.02)

    ts = [threading.Thread(target=attacker, args=(i * 0.0025,)) for i in range(attackers)] + [
        threading.Thread(target=victim)
    ]
    for t in ts:
        t.start()
    time.sleep(seconds)
    stop.set()
    for t in ts:
        t.join(10)
    return waits


for n in (0, 1, 2, 3):
    w = run(n)
    print(
        f"{n} attacker holder thread(s): victim entered {len(w)} times in 3 s; wait median {statistics.median(w):.2f} ms, "  # noqa: E501
        f"max {max(w):.1f} ms"
        if w
        else f"{n} attacker thread(s): victim NEVER entered in 3 s",
        flush=True,
    )
