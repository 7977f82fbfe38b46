"""``coinfer-edge serve`` from a checkout, started as users start it, for the benchmarks that run two
checkouts side by side (``--baseline``), and the measuring child processes those benchmarks start in each
checkout: imported by the bench scripts from their own folder."""

from __future__ import annotations

import contextlib
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def process(root: Path, cmd: list[str], wanted: list[str], start_timeout_s: float = 120.0) -> Iterator[list[int]]:
    """Start ``cmd`` in ``root`` with ``PYTHONPATH`` on ``root``; yield the ports of its first stdout lines
    starting with each of ``wanted`` (``... HOST:PORT``, in ``wanted``'s order); SIGTERM (then SIGKILL after
    15 s) on exit.

    Raises RuntimeError if it exits or has not printed them all within ``start_timeout_s`` seconds."""
    env = dict(os.environ, PYTHONPATH=str(root))
    proc = subprocess.Popen(cmd, cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        lines: queue.Queue = queue.Queue()
        threading.Thread(target=lambda: [lines.put(x) for x in proc.stdout], daemon=True).start()
        ports: dict[str, int] = {}
        deadline = time.monotonic() + start_timeout_s
        while len(ports) < len(wanted):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{' '.join(cmd[1:4])} from {root} did not start")
            with contextlib.suppress(queue.Empty):
                for part in lines.get(timeout=0.5).splitlines():
                    for w in wanted:
                        if part.startswith(w) and w not in ports:
                            ports[w] = int(part.strip().rsplit(":", 1)[1])
        yield [ports[w] for w in wanted]
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@contextlib.contextmanager
def edge_server(root: Path, *flags: str, start_timeout_s: float = 120.0) -> Iterator[int]:
    """``coinfer-edge serve --host 127.0.0.1 --port 0 --grace 1 FLAGS...`` with ``PYTHONPATH`` on ``root``;
    yields its port once it prints ``listening on``; SIGTERM (then SIGKILL after 15 s) on exit.

    Raises RuntimeError if it exits or prints nothing within ``start_timeout_s`` seconds."""
    cmd = [sys.executable, "-m", "edge_server.cli", "serve", "--host", "127.0.0.1", "--port", "0", "--grace", "1",
           *flags]
    with process(root, cmd, ["listening on "], start_timeout_s) as (port,):
        yield port


def child_result(cmd: list[str], root: Path, what: str, timeout_s: float = 900.0) -> dict:
    """Run a bench script's measuring child ``cmd`` in checkout ``root`` (``PYTHONPATH`` on it) and return the
    JSON object of its ``RESULT {...}`` stdout line. Raises RuntimeError (naming ``what`` and the child's last
    stderr) if it fails or prints no result, subprocess.TimeoutExpired after ``timeout_s``."""
    import json

    p = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=timeout_s,
                       env=dict(os.environ, PYTHONPATH=str(root)))
    line = next((x for x in p.stdout.splitlines() if x.startswith("RESULT ")), None)
    if p.returncode != 0 or line is None:
        raise RuntimeError(f"{what} failed: {p.stderr[-3000:]}")
    return json.loads(line[len("RESULT "):])


def uptime() -> str:
    """``uptime``'s line (the machine's load, recorded beside the numbers); empty where it cannot run."""
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def ue_child(model_name: str, access_path: str, uplink_mbps: float, rtt_ms: float):
    """The measuring UE child's set-up, one torch thread: ``torchvision:MODEL_NAME`` prepared as a UE prepares it,
    the access file its parent wrote (JSON: ``tenants`` a list of fresh tenant names, ``tokens`` name -> bearer
    token, ``tls_ca`` the CA's PEM path), an iterator over those tenants (one per fresh client: a cold server) and
    the link every client plans with (uplink = downlink = ``uplink_mbps`` Mbit/s, ``rtt_ms`` ms).

    Returns ``(model, access, tenants, link)``: a ``ue_client.model.PreparedModel`` (its ``module`` is kept), the
    access dict, an iterator of str, a ``LinkOverride``."""
    import json

    import torch

    from ue_client.client import LinkOverride, prepare_model

    torch.set_num_threads(1)
    model = prepare_model(f"torchvision:{model_name}")
    assert model.module is not None, "a torchvision spec keeps its module"
    access = json.loads(Path(access_path).read_text())
    link = LinkOverride(uplink_mbps=uplink_mbps, downlink_mbps=uplink_mbps, rtt_ms=rtt_ms)
    return model, access, iter(access["tenants"]), link


def forward_cpu_s(fwd, *, warmup: int, repeats: int = 3) -> float:
    """The calling thread's CPU seconds (``time.thread_time``) of one ``fwd()`` under ``torch.no_grad``: the least
    of ``repeats`` runs after ``warmup`` untimed ones (what a forward costs alone, to compare with forwards run
    beside an upload)."""
    import torch

    with torch.no_grad():
        for _ in range(warmup):
            fwd()
        alone = []
        for _ in range(repeats):
            c = time.thread_time()
            fwd()
            alone.append(time.thread_time() - c)
    return min(alone)
