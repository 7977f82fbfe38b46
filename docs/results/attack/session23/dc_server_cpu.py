"""Server CPU per byte of the data channel, two checkouts side by side (session 23, dc23: the idle sweep).

    flock /work/wt/.bench.lock .venv/bin/python docs/results/attack/session23/dc_server_cpu.py BASE NEW [--rounds 5]

Per round and checkout (alternating, the first alternating too): a fresh ``coinfer-edge serve --threads 1
--cache-mb 512 --data-port 0`` process; one Session opened (this process), its data connection sent 48 fresh 4 MiB
weights (192 MiB, one 4 MiB frame each, as a loopback UE's blocks) with ``sendall``, until every weight was
acknowledged on the Session stream. Counted: the server process's user + system CPU (``/proc/PID/stat``) from just
before the first frame to the last acknowledgement, divided by the bytes. Medians per checkout."""

from __future__ import annotations

import argparse
import hashlib
import os
import socket
import statistics
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve()
sys.path.insert(0, str(HERE.parents[4] / "bench"))
import edge_process  # noqa: E402

N, SIZE = 48, 4 << 20


def _server_pid() -> int:
    me = str(os.getpid())
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                stat = (d / "stat").read_text()
                cmd = (d / "cmdline").read_bytes()
            except OSError:
                continue
            if stat.rsplit(")", 1)[1].split()[1] == me and b"edge_server.cli" in cmd:
                return int(d.name)
    raise RuntimeError("no server child")


def _cpu(pid: int) -> float:
    f = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")


def one(root: Path, blobs: list[tuple[bytes, str]]) -> float:
    from protos import datachannel as dc
    from ue_client import wire

    with edge_process.edge_server(root, "--threads", "1", "--cache-mb", "512", "--data-port", "0") as port:
        pid = _server_pid()
        ch = wire.channel(f"127.0.0.1:{port}")
        stop = threading.Event()

        def reqs():
            yield wire.open_session(f"b{os.getpid()}-{time.time()}", "m")
            stop.wait(300)

        call = wire.session_call(wire.stub(ch), reqs())
        events = iter(call)
        opened = wire.decode_event(next(events))
        s = socket.create_connection(("127.0.0.1", opened.limits.data_port))
        s.sendall(dc.encode_hello(opened.data_ticket, opened.session_id))
        assert s.recv(1) == dc.ACCEPTED
        time.sleep(0.5)
        c0 = _cpu(pid)
        for raw, sha in blobs:
            s.sendall(dc.encode_frame(sha, "uint8", (SIZE,), 0, SIZE, SIZE))
            s.sendall(raw)
        acked = 0
        for r in events:
            if r.WhichOneof("msg") == "weights_stored":
                acked += len(r.weights_stored.weights)
            elif r.WhichOneof("msg") == "weight_stored":
                acked += 1
            if acked >= N:
                break
        c1 = _cpu(pid)
        s.close()
        stop.set()
        call.cancel()
        ch.close()
    return (c1 - c0) * 1e9 / (N * SIZE)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("base", type=Path)
    ap.add_argument("new", type=Path)
    ap.add_argument("--rounds", type=int, default=5)
    a = ap.parse_args()
    blobs = []
    for _ in range(N):
        raw = os.urandom(SIZE)
        blobs.append((raw, hashlib.sha256(raw).hexdigest()))
    got: dict[str, list[float]] = {"base": [], "new": []}
    print(edge_process.uptime())
    for r in range(a.rounds):
        order = [("base", a.base), ("new", a.new)]
        if r % 2:
            order.reverse()
        for name, root in order:
            v = one(root.resolve(), blobs)
            got[name].append(v)
            print(f"round {r} {name}: {v:.3f} ns/B server CPU", flush=True)
    for name, vs in got.items():
        print(f"{name}: median {statistics.median(vs):.3f} ns/B ({', '.join(f'{v:.3f}' for v in vs)})")
    print(edge_process.uptime())


if __name__ == "__main__":
    main()
