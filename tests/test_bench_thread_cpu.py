"""The bench worker's per-thread CPU and garbage-collection records (COINFER_BENCH_THREAD_CPU=1)."""

import gc
import os
import threading
import time

from testbed.bench import worker
from tests.waiting import wait_until


def _spin(s: float) -> None:
    t = time.thread_time()
    while time.thread_time() - t < s:
        pass


def test_thread_ms_charges_the_thread_that_ran():
    spun, release = threading.Event(), threading.Event()
    th = threading.Thread(target=lambda: (_spin(0.03), spun.set(), release.wait(5)), name="spinner")
    a = worker.thread_cpu_ns()
    th.start()
    _spin(0.02)
    assert spun.wait(5)
    ms = worker._thread_ms(a, worker.thread_cpu_ns())  # the spinner is still alive (ended threads are not seen)
    release.set()
    th.join()
    assert ms["main"] >= 15, ms  # this (main) thread spun 20 ms of CPU
    assert ms["spinner"] >= 25, ms  # the other thread 30 ms, under its own name


def test_gc_clock_counts_collections_by_generation(monkeypatch):
    monkeypatch.setattr(worker, "_THREAD_CPU", True)
    clock = worker._GcClock()
    try:
        a = clock.snap()
        gc.collect(2)
        d = clock.diff(a, clock.snap())
    finally:
        gc.callbacks.remove(clock._cb)
    assert d["n"][2] == 1 and d["ms"][2] >= 0.0, d


def test_thread_ms_names_a_thread_that_ended():
    go = threading.Event()
    th = threading.Thread(target=lambda: (go.wait(5), _spin(0.005)), name="short-lived")
    th.start()
    a = worker.thread_cpu_ns()
    go.set()
    th.join()
    # join returns when Python is done with the thread; the kernel's task may linger a moment after it (CI saw
    # it still in /proc/self/task under load): the snapshot is taken once it is gone
    wait_until(lambda: not os.path.exists(f"/proc/self/task/{th.native_id}"), 10.0, "the thread's task to end")
    assert worker._thread_ms(a, worker.thread_cpu_ns()).get("ended:short-lived") == -1.0
