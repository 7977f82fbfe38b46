"""``coinfer-edge serve`` as a process: prints its address, answers health, drains on signals."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}


def spawn_server(*extra: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "edge_server.cli", "serve", "--port", "0", "--cache-mb", "64", *extra],
        cwd=ROOT,
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def server_address(proc: subprocess.Popen) -> str:
    """The address of the server's ``listening on HOST:PORT`` line (killed without one)."""
    line = proc.stdout.readline()
    if not line.startswith("listening on "):
        proc.kill()
        raise AssertionError(f"no address line: {line!r} {proc.stderr.read()}")
    return line.split()[-1]


def start_server(*extra: str) -> tuple[subprocess.Popen, str]:
    proc = spawn_server(*extra)
    return proc, server_address(proc)


@contextlib.contextmanager
def running_server(*extra: str):
    """``start_server`` as a context: yields (process, address); the process is terminated on leaving (killed
    after 30 s), even when the test fails."""
    proc, address = start_server(*extra)
    try:
        yield proc, address
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def healthcheck(address: str) -> int:
    return subprocess.run(
        [sys.executable, "-m", "edge_server.healthcheck", "--address", address, "--timeout", "5"],
        cwd=ROOT,
        env=ENV,
        capture_output=True,
        timeout=60,
    ).returncode


def edge_main(capsys, *args: str) -> tuple[int, str]:
    """``coinfer-edge serve --port 0 ARGS`` in-process (the console script's ``main``): (exit code, stderr).
    For the flags refused before the server starts; what needs the process (its address line, signals,
    children, the exit status the shell sees) is started as one below."""
    from edge_server.cli import main

    capsys.readouterr()
    rc = main(["serve", "--port", "0", *args])
    return rc, capsys.readouterr().err


def test_serve_health_and_signal_drain() -> None:
    """Address line, SERVING, drain and exit 0 on SIGTERM and on SIGINT, nobody serving after. The SIGTERM
    server runs with the default --threads, so its log also shows the default thread rule in the real
    process; the SIGINT one logs with --log-format json: every line one JSON object with ts, level,
    logger, msg, and runs --profile-workers 1: the forkserver template (torch and the validator imported,
    several CPU seconds) starts with the server, not on the first ProfileGraph (whose client waited ~9 s
    on this machine), and the server still drains and exits 0 with it. Both start at once (each spends
    seconds importing torch)."""
    from edge_server.cpus import compute_threads, usable_cores

    flags = {signal.SIGTERM: [], signal.SIGINT: ["--threads", "1", "--log-format", "json", "--profile-workers", "1"]}
    procs = {sig: spawn_server("--grace", "1", *extra) for sig, extra in flags.items()}
    try:
        for sig, proc in procs.items():
            address = server_address(proc)
            assert address.startswith("127.0.0.1:") and int(address.rsplit(":", 1)[1]) > 0
            assert healthcheck(address) == 0
            if sig == signal.SIGINT:
                assert forkserver_beside(proc), "no forkserver template process beside the server"
            proc.send_signal(sig)
            assert proc.wait(timeout=30) == 0, sig
            assert healthcheck(address) == 1  # nobody serving any more
            log = proc.stderr.read()
            want = compute_threads(usable_cores(), 1) if sig == signal.SIGTERM else 1
            assert f"{want} torch intra-op thread(s)" in log, log
            if sig == signal.SIGINT:
                records = [json.loads(ln) for ln in log.splitlines() if ln.strip()]
                assert records and all({"ts", "level", "logger", "msg"} <= r.keys() for r in records), log
                assert any("single tenant" in r["msg"] for r in records), log
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def test_bad_arguments_exit_2(capsys) -> None:
    # the exit status a shell sees, from the process
    r = subprocess.run(
        [sys.executable, "-m", "edge_server.cli", "serve", "--port", "0", "--device", "tpu"],
        cwd=ROOT,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert "coinfer-edge:" in r.stderr
    rc, err = edge_main(capsys, "--cache-mb", "0")
    assert rc == 2 and "coinfer-edge: --cache-mb must be > 0" in err, err
    rc, err = edge_main(capsys, "--tf32")  # on the default --device cpu: meaningless, refused
    assert rc == 2 and "coinfer-edge: --tf32 is for --device cuda" in err, err
    if not torch.cuda.is_available():  # the device named as given (review29: "cuda:1" was reported as "cuda")
        rc, err = edge_main(capsys, "--device", "cuda:1")
        assert rc == 2 and "device 'cuda:1' requested but CUDA is not available" in err, err


def test_default_thread_rule() -> None:
    """cores -> torch intra-op threads per compute worker: the compute leaves one core to I/O."""
    from edge_server.cpus import compute_threads

    one_worker = {1: 1, 2: 1, 3: 2, 4: 3, 8: 7, 16: 15, 64: 63}
    assert {c: compute_threads(c) for c in one_worker} == one_worker
    two_workers = {1: 1, 2: 1, 3: 1, 4: 1, 5: 2, 8: 3, 16: 7}
    assert {c: compute_threads(c, 2) for c in two_workers} == two_workers
    for c in range(2, 65):  # never more compute threads than cores - 1, whatever the workers
        for w in (1, 2, 3, 4):
            assert 1 <= w * compute_threads(c, w) <= c - 1 or compute_threads(c, w) == 1
    for bad in ((0, 1), (4, 0)):
        with pytest.raises(ValueError):
            compute_threads(*bad)


@pytest.mark.parametrize(
    ("cgroup_line", "files", "quota_cores"),
    [
        ("0::/ue1", {"ue1/cpu.max": "150000 100000\n"}, 2),  # v2: 1.5 cores -> 2
        ("0::/ue1", {"ue1/cpu.max": "50000 100000\n"}, 1),
        ("0::/ue1", {"ue1/cpu.max": "max 100000\n"}, None),
        (
            "4:cpu,cpuacct:/g",  # v1, joint controllers: 2.5 cores -> 3
            {"cpu,cpuacct/g/cpu.cfs_quota_us": "250000", "cpu,cpuacct/g/cpu.cfs_period_us": "100000"},
            3,
        ),
        ("1:cpu:/g", {"cpu/g/cpu.cfs_quota_us": "-1", "cpu/g/cpu.cfs_period_us": "100000"}, None),
        ("1:cpu:/g", {}, None),  # no quota files: no quota
    ],
)
def test_usable_cores_reads_the_cgroup_quota(tmp_path, cgroup_line, files, quota_cores) -> None:
    from edge_server.cpus import usable_cores

    proc = tmp_path / "proc" / "self"
    proc.mkdir(parents=True)
    (proc / "cgroup").write_text(cgroup_line + "\n")
    for rel, text in files.items():
        f = tmp_path / "cg" / rel
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text(text)
    affinity = len(os.sched_getaffinity(0))
    got = usable_cores(tmp_path / "proc", tmp_path / "cg")
    assert got == (affinity if quota_cores is None else min(affinity, quota_cores))


def test_serve_default_threads_follow_the_rule() -> None:
    from edge_server.cli import build_parser, config_from_args
    from edge_server.cpus import compute_threads, usable_cores

    want = compute_threads(usable_cores(), 1)
    assert config_from_args(build_parser().parse_args(["serve"])).threads == want
    assert config_from_args(build_parser().parse_args(["serve", "--threads", "3"])).threads == 3  # explicit wins
    # the started server logs the rule's count: test_serve_health_and_signal_drain (its SIGTERM server)


def test_profile_workers_beyond_the_bound_exit_2(capsys) -> None:
    """--profile-workers 100000 once started 100000 threads before listening (no message, no address)."""
    rc, err = edge_main(capsys, "--profile-workers", "100000")
    assert rc == 2 and "--profile-workers" in err, err


def forkserver_beside(proc: subprocess.Popen, timeout_s: float = 30.0) -> bool:
    """Whether a forkserver process (``--profile-workers``' warm template) runs under ``proc`` within
    ``timeout_s``. Its start at server start is checked by test_serve_health_and_signal_drain."""
    import time

    import psutil

    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        for c in psutil.Process(proc.pid).children(recursive=True):
            with contextlib.suppress(psutil.Error):
                if "forkserver" in " ".join(c.cmdline()):
                    return True
        time.sleep(0.2)
    return False


def test_non_finite_profile_budget_flags_exit_2(capsys) -> None:
    """--profile-cpu-s nan once started a server whose every ProfileGraph was refused (a NaN bucket never
    holds CPU time) and --profile-cpu-share inf one with no refill limit; both are a clear exit 2."""
    for args in (["--profile-cpu-s", "nan"], ["--profile-cpu-s", "inf"], ["--profile-cpu-share", "inf"]):
        rc, err = edge_main(capsys, *args)
        assert rc == 2 and "--profile-cpu" in err, (args, err)


def test_serve_with_a_health_port_prints_it_and_probes_get_serving_there(capsys) -> None:
    """``--health-port 0``: the port on stdout after the address (and the data channel's) line, SERVING there through
    ``edge_server.healthcheck``, the process drains and exits 0 on SIGTERM; a health port taken by the metrics
    endpoint's request is refused at start naming the metrics port (break27 F7, F8)."""
    proc = spawn_server("--grace", "1", "--health-port", "0")
    try:
        server_address(proc)
        lines = [proc.stdout.readline().strip() for _ in range(2)]
        health = [ln for ln in lines if ln.startswith("health on ")]
        assert health, lines
        assert healthcheck(health[0].split()[-1]) == 0
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    finally:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        proc.wait(timeout=30)
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    rc, err = edge_main(capsys, "--health-port", str(port), "--metrics-port", str(port))
    assert rc != 0 and "metrics port" in err, (rc, err)


def test_serve_makes_openmp_passive_unless_the_environment_says_otherwise() -> None:
    """Session 33: unset, OMP_WAIT_POLICY was libgomp's default for the server's torch, whose threads spin ~300k
    rounds at every barrier (mobilenet_v2's ProfileGraph with --threads 2 beside CPU hogs: 915 ms per iteration,
    more CPU than the anonymous profile budget; 63 ms PASSIVE, docs/results/cli/session33). The server now sets
    PASSIVE before torch loads, unless the environment sets a policy, and logs the one in effect. What libgomp
    itself took is read from its OMP_DISPLAY_ENV=VERBOSE dump (GOMP_SPINCOUNT 0: passive; 3e10: active); the
    profiling child (--profile-workers 1) inherits the variable. Both servers start at once."""
    import psutil

    base = {k: v for k, v in ENV.items() if k != "OMP_WAIT_POLICY"} | {"OMP_DISPLAY_ENV": "VERBOSE"}
    cases = {"unset": (base, "'0'", "OMP_WAIT_POLICY=PASSIVE (coinfer-edge's default"),
             "ACTIVE": (base | {"OMP_WAIT_POLICY": "ACTIVE"}, "'30000000000'",
                        "OMP_WAIT_POLICY=ACTIVE (set in the environment)")}
    procs = {
        name: subprocess.Popen(
            [sys.executable, "-m", "edge_server.cli", "serve", "--port", "0", "--cache-mb", "64", "--grace", "1",
             "--profile-workers", "1"],
            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for name, (env, _, _) in cases.items()
    }
    try:
        for name, proc in procs.items():
            server_address(proc)
            assert forkserver_beside(proc), "no profiling child beside the server"
            # the child's environment (it loads torch itself, maybe after this test ends)
            kids = [c for c in psutil.Process(proc.pid).children(recursive=True)
                    if "forkserver" in " ".join(c.cmdline())]
            assert kids and all(c.environ().get("OMP_WAIT_POLICY") == ("PASSIVE" if name == "unset" else name)
                                for c in kids), name
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=30) == 0, name
            err = proc.stderr.read()
            _, spin, logged = cases[name]
            spins = [ln.split("=", 1)[1].strip() for ln in err.splitlines() if "GOMP_SPINCOUNT" in ln]
            assert spins and set(spins) == {spin}, (name, spins, err[-2000:])
            assert logged in err, err[-2000:]
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
