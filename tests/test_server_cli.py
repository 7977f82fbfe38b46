"""``coinfer-edge serve`` as a process: prints its address, answers health, drains on signals."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}


def start_server(*extra: str) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "edge_server.cli", "serve", "--port", "0", "--cache-mb", "64", *extra],
        cwd=ROOT,
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    line = proc.stdout.readline()
    if not line.startswith("listening on "):
        proc.kill()
        raise AssertionError(f"no address line: {line!r} {proc.stderr.read()}")
    return proc, line.split()[-1]


def healthcheck(address: str) -> int:
    return subprocess.run(
        [sys.executable, "-m", "edge_server.healthcheck", "--address", address, "--timeout", "5"],
        cwd=ROOT,
        env=ENV,
        capture_output=True,
        timeout=60,
    ).returncode


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_serve_health_and_signal_drain(sig) -> None:
    proc, address = start_server("--threads", "1", "--grace", "1")
    try:
        assert address.startswith("127.0.0.1:") and int(address.rsplit(":", 1)[1]) > 0
        assert healthcheck(address) == 0
        proc.send_signal(sig)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert healthcheck(address) == 1  # nobody serving any more


def test_bad_arguments_exit_2() -> None:
    for args in (["--device", "tpu"], ["--cache-mb", "0"]):
        r = subprocess.run(
            [sys.executable, "-m", "edge_server.cli", "serve", "--port", "0", *args],
            cwd=ROOT,
            env=ENV,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert r.returncode == 2, (args, r.stdout, r.stderr)
        assert "coinfer-edge:" in r.stderr
