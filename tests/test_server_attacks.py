"""Issue 11's resource attacks against a real ``coinfer-edge serve --memory-mb 1024`` subprocess.

While each attack runs (bounded: about a second of attack, then a victim of a few requests): the
server's RSS stays under ``--memory-mb``, the victim tenant's answers are exact, and the server still
answers health SERVING afterwards. Latency ratios are measured by ``bench/bench_attacks.py`` (timed
numbers are not asserted in the default run).
"""

from __future__ import annotations

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from edge_server.attacks import ATTACKS, RssSampler, Victim, run_attack, serve_subprocess

MEMORY_MB = 1024
MiB = 1 << 20


@pytest.fixture(scope="module")
def edge():
    proc, address = serve_subprocess("--threads", "1", "--memory-mb", str(MEMORY_MB), "--cache-mb", "64")
    try:
        Victim(address).run(1)  # warm: the victim's weights are on the server
        yield proc, address
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except Exception:
            proc.kill()
            proc.wait()


def serving(address: str) -> bool:
    with grpc.insecure_channel(address) as ch:
        r = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=10)
        return r.status == health_pb2.HealthCheckResponse.SERVING


@pytest.mark.parametrize("name", [a for a in ATTACKS if a not in ("fuzz", "cpu_control")])
def test_attack_keeps_memory_under_cap_and_victim_correct(edge, name) -> None:
    proc, address = edge
    victim = Victim(address)
    with RssSampler(proc.pid) as rss:
        latencies, report = run_attack(name, address, during=lambda: victim.run(3))  # asserts exact answers
    assert len(latencies) == 3
    assert rss.peak < MEMORY_MB * MiB, f"{name}: peak RSS {rss.peak / MiB:.0f} MiB"
    assert proc.poll() is None and serving(address)
    if name == "conv64":  # refused up front, every time
        assert report.codes and set(report.codes) == {"RESOURCE_EXHAUSTED"}, report.codes
    if name == "waiting":  # requests that would hold intermediates beyond the budget are refused
        assert report.codes.get("request:8", 0) > 0, report.codes
    if name == "abandon":
        assert report.calls > 0 and "INTERNAL" not in report.codes and "UNKNOWN" not in report.codes


def test_pin_process_moves_every_thread() -> None:
    """The bench's pinning: all threads of a process (not only its main thread) go to the CPU set."""
    import os
    import subprocess
    import sys

    from edge_server.attacks import pin_process

    cpus = os.sched_getaffinity(0)
    one = {min(cpus)}
    code = "import threading, time; [threading.Thread(target=time.sleep, args=(30,)).start() for _ in range(3)]; "
    code += "print('up', flush=True); time.sleep(30)"
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "up"
        tids = [int(t) for t in os.listdir(f"/proc/{p.pid}/task")]
        assert len(tids) == 4
        pin_process(p.pid, one)
        assert all(os.sched_getaffinity(t) == one for t in tids)
        pin_process(p.pid, None)  # back to every CPU
        assert all(os.sched_getaffinity(t) == set(range(os.cpu_count())) for t in tids)
    finally:
        p.kill()
        p.wait()
