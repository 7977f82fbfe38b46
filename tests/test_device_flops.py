"""The edge server's device speed at start (``edge_server.op_budget.measure_device_flops``), from which the per-op
time budget (``--op-time-ms``) is turned into FLOPs: it must not read a loaded machine as a slow one. Session 15's
attacker saw 3.6, 85 and 120 GFLOP/s from three starts of the same server (wall clock of a 2-thread product): a
start beside other work set a budget 20-30x too tight, and with the cost rules of real LSTMs that refuses ordinary
models."""

from __future__ import annotations

import subprocess
import sys

import torch

from edge_server.op_budget import measure_device_flops


def test_a_loaded_machine_is_not_read_as_a_slow_device() -> None:
    cpu = torch.device("cpu")
    threads = torch.get_num_threads()
    idle = max(measure_device_flops(cpu) for _ in range(3))
    busy = [subprocess.Popen([sys.executable, "-c", "import time\nt = time.time() + 60\nwhile time.time() < t: pass"])
            for _ in range(3)]  # more runnable processes than the 2 cores of CI
    try:
        loaded = [measure_device_flops(cpu) for _ in range(5)]
    finally:
        for p in busy:
            p.kill()
            p.wait()
    assert torch.get_num_threads() == threads  # set back after the single-thread measurement
    # before (wall clock, 2 threads): 1.0 GFLOP/s under 8 busy processes vs 160 idle; now within ~10 %
    assert min(loaded) > 0.3 * idle, (idle, loaded)
    assert idle > 1e9  # above the floor: a measurement, not the floor


def test_the_rate_counts_the_servers_threads() -> None:
    cpu = torch.device("cpu")
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = max(measure_device_flops(cpu) for _ in range(3))
        torch.set_num_threads(3)
        three = max(measure_device_flops(cpu) for _ in range(3))
        assert torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(threads)
    assert 2.0 * one < three < 4.5 * one, (one, three)  # one thread's CPU-time rate x 3
