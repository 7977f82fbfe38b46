"""bound20 probe: what strangers' big requests make an edge server hold, measured on the server process alone.

The server runs in a child process (this script with ``serve``; PROBE_ROOT=DIR runs another checkout's code, e.g. the
version before the fix), ``--memory-mb 1024`` by default, tenants with a 0.8 CPU s ProfileGraph budget each (as
review19's p8 / session 19's validation_memory_probe.py). Scenarios (bounded: a fixed count of calls, 300 s timeouts):

- ``tenants N``: N tenants each send one ProfileGraph of a 6.45 MiB spec (``tril_chain(45000)``) at once;
- ``one M``: one tenant sends M such ProfileGraphs at once;
- ``seq K``: one tenant sends K Sessions one after another whose OpenSession carries a 4 MiB slice spec (refused once
  read, INVALID_ARGUMENT): what the server keeps after they ended (session 19: +93 MiB).

During ``tenants`` / ``one``, 0.5 s in, an honest tenant (its own token) sends a Hello and a small ProfileGraph
(``tril_chain(50)``), timed. Prints one line per run: the server's peak RSS growth over its RSS before (psutil,
sampled every 10 ms), its RSS growth 2 s after the last answer, the memory budget's limit / peak / reserved after,
the most validations in progress at once, calls refused at intake (bound20's hold), trims, the answers' codes and the
honest tenant's results. ``--json PATH`` appends the line as JSON.

    PYTHONPATH=$PWD python docs/results/attack/session20/intake_probe.py tenants 16 [--flags "--max-reading-calls 2"]
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import shlex
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve()
REPO = HERE.parents[4]


def serve(argv: list[str]) -> None:
    """The child: a server on loopback; answers 'stats' lines on stdin with one JSON line."""
    root = os.environ.get("PROBE_ROOT") or str(REPO)
    sys.path.insert(0, root)
    sys.path.insert(1, str(REPO))  # tests.test_attack18 (tril_chain) is only the parent's, but keep it importable
    import edge_server.profile_service
    from edge_server.cli import build_parser, config_from_args
    from edge_server.testing import ServerThread

    compile_slice, lock, now, most = edge_server.profile_service.compile_slice, threading.Lock(), [0], [0]

    def counted(*a, **kw):
        with lock:
            now[0] += 1
            most[0] = max(most[0], now[0])
        try:
            return compile_slice(*a, **kw)
        finally:
            with lock:
                now[0] -= 1

    edge_server.profile_service.compile_slice = counted
    args = build_parser().parse_args(["serve", *argv])
    cfg = config_from_args(args)
    with ServerThread(config=cfg) as srv:
        print(srv.address, flush=True)
        for line in sys.stdin:
            if line.strip() != "stats":
                break
            st = srv.runtime.memory.stats()
            gate = srv.runtime.calls
            trimmer = getattr(srv.runtime.bounds, "trimmer", None)
            print(json.dumps({"limit_mib": st.limit_bytes / 2**20, "peak_mib": st.peak_bytes / 2**20,
                              "reserved_mib": st.reserved_bytes / 2**20, "validations_max": most[0],
                              "hold_refused": getattr(gate, "hold_refused", None),
                              "trims": getattr(trimmer, "trims", None)}), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("scenario", choices=["tenants", "one", "seq"])
    ap.add_argument("n", type=int)
    ap.add_argument("--memory-mb", type=int, default=1024)
    ap.add_argument("--flags", default="", help="more coinfer-edge serve flags")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    sys.path.insert(0, str(REPO))
    import grpc
    import psutil

    from protos.coinfer.v1 import coinfer_pb2 as pb
    from protos.coinfer.v1 import coinfer_pb2_grpc as pbg
    from tests.test_attack18 import tril_chain

    n_tenants = a.n if a.scenario == "tenants" else 1
    tok = [f"tenant-secret-{i:04d}-xyz" for i in range(n_tenants)]
    honest = "honest-secret-0000-xyz"
    fd, path = tempfile.mkstemp(suffix=".json")
    with os.fdopen(fd, "w") as f:
        tenants = {f"t{i}": {"token": t, "quota": {"profile_cpu_s": 0.8, "profile_cpu_share": 0.001}}
                   for i, t in enumerate(tok)}
        tenants["honest"] = {"token": honest}
        json.dump({"tenants": tenants}, f)
    flags = ["--auth-tokens", path, "--threads", "1", "--memory-mb", str(a.memory_mb), "--cache-mb", "16",
             "--staging-mb", "16", *shlex.split(a.flags)]
    child = subprocess.Popen([sys.executable, str(HERE), "serve", *flags], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True, env=dict(os.environ))
    try:
        addr = child.stdout.readline().strip()
        if not addr:
            raise SystemExit("the server did not start")
        ps = psutil.Process(child.pid)

        def stats() -> dict:
            child.stdin.write("stats\n")
            child.stdin.flush()
            return json.loads(child.stdout.readline())

        md = lambda t: (("authorization", f"Bearer {t}"),)
        opts = [("grpc.max_send_message_length", 64 << 20), ("grpc.max_receive_message_length", 64 << 20)]
        with grpc.insecure_channel(addr, options=opts) as ch:
            stub = pbg.EdgeServiceStub(ch)
            stub.Hello(pb.HelloRequest(), metadata=md(honest), timeout=30)  # warm: the first call's costs
            time.sleep(1.0)
            rss0 = ps.memory_info().rss
            peak, stop = [rss0], threading.Event()

            def sample():
                while not stop.is_set():
                    peak[0] = max(peak[0], ps.memory_info().rss)
                    time.sleep(0.01)

            th = threading.Thread(target=sample, daemon=True)
            th.start()
            codes: collections.Counter = collections.Counter()
            honest_out: dict = {}
            t0 = time.monotonic()
            if a.scenario == "seq":
                body = pb.SessionRequest(open=pb.OpenSession(model_id="m", slice_id="s",
                                                             slice_spec_json=b"x" * (4 << 20)))
                for _ in range(a.n):
                    try:
                        for _r in stub.Session(iter([body]), metadata=md(tok[0]), timeout=60):
                            pass
                        codes["OK"] += 1
                    except grpc.RpcError as e:
                        codes[e.code().name] += 1
            else:
                spec = tril_chain(45000)
                who = [tok[i % n_tenants] for i in range(a.n)]
                futs = [stub.ProfileGraph.future(pb.ProfileGraphRequest(slice_spec_json=spec), metadata=md(t),
                                                 timeout=300) for t in who]
                del spec
                time.sleep(0.5)
                for name, fn in (("hello", lambda: stub.Hello(pb.HelloRequest(), metadata=md(honest), timeout=120)),
                                 ("profile", lambda: stub.ProfileGraph(
                                     pb.ProfileGraphRequest(slice_spec_json=tril_chain(50)), metadata=md(honest),
                                     timeout=120))):
                    t1 = time.monotonic()
                    try:
                        fn()
                        honest_out[name] = f"OK {time.monotonic() - t1:.2f} s"
                    except grpc.RpcError as e:
                        honest_out[name] = f"{e.code().name} {time.monotonic() - t1:.2f} s"
                msgs: collections.Counter = collections.Counter()
                for f in futs:
                    try:
                        f.result()
                        codes["OK"] += 1
                    except grpc.RpcError as e:
                        codes[e.code().name] += 1
                        msgs[(e.code().name, (e.details() or "")[:90])] += 1
                del futs
            wall = time.monotonic() - t0
            time.sleep(2.0)
            stop.set()
            th.join()
            after = ps.memory_info().rss
            st = stats()
        out = {"scenario": a.scenario, "n": a.n, "root": os.environ.get("PROBE_ROOT") or "this checkout",
               "flags": a.flags, "memory_mb": a.memory_mb, "wall_s": round(wall, 2),
               "peak_rss_growth_mib": round((peak[0] - rss0) / 2**20),
               "rss_growth_after_mib": round((after - rss0) / 2**20),
               **st, "codes": dict(codes), "honest": honest_out}
        print(json.dumps(out), flush=True)
        if a.scenario != "seq":
            for (code, d), k in sorted(msgs.items()):
                print(f"  {k} x {code}: {d}", flush=True)
        if a.json:
            with open(a.json, "a") as f:
                f.write(json.dumps(out) + "\n")
    finally:
        with contextlib.suppress(OSError):
            child.stdin.close()
        try:
            child.wait(30)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()
        os.unlink(path)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "serve":
        serve(sys.argv[2:])
    else:
        main()
