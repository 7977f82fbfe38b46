"""The server the attack16 repro scripts start: ``coinfer-edge serve --auth-tokens F --memory-mb 1024 --threads 1``
(a subprocess on loopback, port 0) with one tenant, alice, and her token; imported by the scripts beside it."""

import contextlib
import json
import os
import tempfile
import time
from collections.abc import Iterator

import psutil

from edge_server.attacks import serve_subprocess

ALICE_TOKEN = "alice-secret-123"
ALICE = [("authorization", f"Bearer {ALICE_TOKEN}")]
"""gRPC call metadata with alice's bearer token."""


@contextlib.contextmanager
def alice_server() -> Iterator[tuple[str, psutil.Process]]:
    """Start the server, wait 1 s (its start-up allocations settle before a caller reads its RSS) and yield
    ``(address, psutil.Process of the server)``; terminated on exit. Raises RuntimeError if it does not start."""
    path = os.path.join(tempfile.mkdtemp(), "t.json")
    with open(path, "w") as f:
        f.write(json.dumps({"tenants": {"alice": {"token": ALICE_TOKEN}}}))
    proc, addr = serve_subprocess("--auth-tokens", path, "--memory-mb", "1024", "--threads", "1")
    try:
        time.sleep(1)
        yield addr, psutil.Process(proc.pid)
    finally:
        proc.terminate()
        proc.wait()
