"""coinfer-ue's default torch thread count follows the process's CPU quota and the machine's load
(``ue_client.cli.default_threads``).

In a CPU cgroup below the machine's cores torch's default (one thread per core) spins on the quota: eager
resnet18 in a 10 % group cost 452 ms of CPU per request with 2 threads against 54 ms with 1
(``bench/bench_ue_cpu.py``, docs/results/ue_cpu/session13). Beside a busy loop on 2 cores its UE profile of
resnet18 took 570 ms per inference with torch's 2 threads, 80 with 1 (session 33, docs/results/cli/session33)."""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from testbed.cgroups import CpuCgroup, detect_cgroups
from ue_client.cli import build_parser, default_threads

ROOT = Path(__file__).resolve().parents[1]

PROBE = r"""
import json, sys, torch
from ue_client.cli import build_parser, default_threads
args = build_parser().parse_args(["profile", "--model", "torchvision:resnet18", *sys.argv[1:]])
default_threads(args)
print(json.dumps({"threads": args.threads, "torch_default": torch.get_num_threads()}))
"""


def _args(*extra: str):
    return build_parser().parse_args(["profile", "--model", "torchvision:resnet18", *extra])


def test_fewer_usable_cores_than_torch_threads_sets_them(monkeypatch):
    di = importlib.import_module("profiler.device_info")  # the package exports a function of the same name
    monkeypatch.setattr("ue_client.cli.idle_cores", lambda *a: 8.0)  # an idle machine

    monkeypatch.setattr(torch, "get_num_threads", lambda: 8)
    monkeypatch.setattr(di, "usable_cores", lambda: 1)
    args = _args()
    default_threads(args)
    assert args.threads == 1
    monkeypatch.setattr(di, "usable_cores", lambda: 8)
    args = _args()
    default_threads(args)
    assert args.threads is None  # torch's own default already fits
    monkeypatch.setattr(di, "usable_cores", lambda: 1)
    args = _args("--threads", "3")
    default_threads(args)
    assert args.threads == 3  # an explicit --threads wins


def test_a_subcommand_without_threads_is_left_alone():
    import argparse

    args = argparse.Namespace(command="other")
    default_threads(args)
    assert not hasattr(args, "threads")


def test_default_threads_in_a_real_cpu_quota():
    support = detect_cgroups()
    if not support.usable:
        pytest.skip(f"no writable cgroup CPU controller: {support.reason}")
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("needs 2 cores: with one, torch's default is one thread already")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    with CpuCgroup(f"cfr-{os.getpid()}-uethreads", 0.5, support=support) as cg:
        cg.set_cpus(None)  # the interpreter and torch import unthrottled; the quota is what the probe reads
        cg.set_cpus(0.5)
        runs = []
        for extra in ([], ["--threads", "2"]):
            p = cg.popen([sys.executable, "-c", PROBE, *extra], stdout=subprocess.PIPE, text=True, env=env, cwd=ROOT)
            out, _ = p.communicate(timeout=120)
            assert p.returncode == 0
            runs.append(json.loads(out))
    assert runs[0]["torch_default"] >= 2  # torch counts the machine's cores, not the quota
    assert runs[0]["threads"] == 1  # half a core: one thread
    assert runs[1]["threads"] == 2


@pytest.mark.parametrize(("idle", "want"), [(0.0, 1), (0.4, 1), (1.3, 1), (1.6, 2), (2.6, 3), (3.9, None), (4.0, None)])
def test_cores_others_keep_busy_are_not_counted(monkeypatch, idle, want):
    """4 usable cores, torch's default 4: the idle cores, rounded, at least 1; None where torch's default fits."""
    di = importlib.import_module("profiler.device_info")
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 4)
    monkeypatch.setattr(di, "usable_cores", lambda: 4)
    monkeypatch.setattr("ue_client.cli.idle_cores", lambda *a: idle)
    args = _args()
    default_threads(args)
    assert args.threads == want
    monkeypatch.setattr(di, "usable_cores", lambda: 2)  # the quota still caps
    args = _args()
    default_threads(args)
    assert args.threads == min(2, want or 4)


def test_passive_openmp_threads_take_the_usable_cores_whatever_the_load(monkeypatch):
    """With OMP_WAIT_POLICY=PASSIVE (threads sleep at a barrier) the load is not counted: resnet18 beside a busy
    loop on 2 cores took 66 ms with 2 passive threads, 94 with 1 (docs/results/cli/session33)."""
    di = importlib.import_module("profiler.device_info")
    monkeypatch.setattr(torch, "get_num_threads", lambda: 4)
    monkeypatch.setattr(di, "usable_cores", lambda: 4)
    monkeypatch.setattr("ue_client.cli.idle_cores", lambda *a: 0.0)
    monkeypatch.setenv("OMP_WAIT_POLICY", "passive")
    args = _args()
    default_threads(args)
    assert args.threads is None
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    default_threads(args)
    assert args.threads == 1


HOG = ("import os, time\nos.sched_setaffinity(0, {{{cpu}}})\nt = time.monotonic() + 30\n"
       "while time.monotonic() < t: pass\n")


def test_one_thread_when_every_core_is_busy(monkeypatch):
    """A busy loop on each core this process may use (each ends by itself after 30 s, killed here first): the
    default is 1 thread, not torch's one per core (session 33: resnet18's profile 570 ms with 2, 80 with 1)."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2 or torch.get_num_threads() < 2:
        pytest.skip("needs 2 cores and torch's default of 2 threads or more")
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    hogs = []
    try:
        hogs = [subprocess.Popen([sys.executable, "-c", HOG.format(cpu=c)]) for c in cpus]
        time.sleep(0.5)  # started and spinning
        args = _args()
        default_threads(args)
        assert args.threads == 1
    finally:
        for h in hogs:
            h.kill()
            h.wait()
