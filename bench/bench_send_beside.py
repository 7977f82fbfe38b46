"""What sending costs a throttled UE beside its computation, against what the connect-time probe says.

    .venv/bin/python bench/bench_send_beside.py [--model googlenet] [--cpus 0.1] [--uplink-mbps 400]
        [--repeats 2] [--json PATH]

An edge server with TLS, bearer tokens and a data channel (``coinfer-edge serve --data-port 0``) and two
userspace link emulators (``testbed.linkemu``, gRPC and data channel, ``--uplink-mbps``, RTT 2 ms) run in
their own processes; the UE is a child process in a CPU cgroup of ``--cpus`` cores over 10 ms CFS periods
(``testbed.cgroups.CpuCgroup``, as the testbed's UEs), one torch thread. Per repeat the child builds a fresh
client (a fresh tenant: a cold server) for each condition and measures the UE process's CPU per weight byte
sent, beyond the calling thread (``time.process_time`` - ``time.thread_time``):

- ``probe``: the connect-time probe's kept estimate (``SendCpuEstimator.cpu_s_per_byte``);
- ``probe_beside``: the probe's weights queued while the calling thread runs the model's forward;
- ``all_alone``: every weight of the model queued (paced as a prefetch is), the calling thread polling;
- ``all_beside``: the same while the calling thread runs the model's forward in a loop; also how much
  more CPU a forward took on the calling thread than alone (``compute_extra_ns_per_byte``: that excess per
  byte sent).

Prints a table and writes JSON (``--json``). Session 12, ``docs/results/sendcost/session12``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import edge_process  # bench/edge_process.py, beside this script

ROOT = Path(__file__).resolve().parents[1]


def child(args) -> None:
    """The UE: one repeat of every condition; prints ``RESULT {...}``."""
    import torch

    from modelgraph import tensor_bytes
    from ue_client.client import CoinferClient
    from ue_client.session import FOREGROUND, UplinkItem

    model, access, tenants, link = edge_process.ue_child(args.model, args.access, args.uplink_mbps, 2.0)
    g = model.graph
    x = model.example_inputs

    def client():
        t = next(tenants)
        return CoinferClient(g, x, server=f"127.0.0.1:{args.port}", policy="auto", tenant=t,
                             token=access["tokens"][t], tls_ca=access["tls_ca"],
                             data_address=f"127.0.0.1:{args.data_port}", link=link, gc_freeze=False)

    def fwd():  # the UE's local compute: the eager module
        return model.module(*x)

    fwd_alone_s = edge_process.forward_cpu_s(fwd, warmup=2)

    def send(names, beside: bool, unpaced: bool = False) -> dict:
        c = client()
        try:
            c.engine.connect()
            probe_kept = c.engine.probe.send_est.cpu_s_per_byte
            sess = c.engine.conn.session
            q = sess.queue
            seen, items = set(sess.held), []
            for k, w in enumerate(names):
                sha = g.weight_sha256(w)
                if sha in seen:
                    continue
                seen.add(sha)
                meta = g.weights[w]
                items.append(UplinkItem("weight", sha, meta.dtype, meta.shape, tensor_bytes(g.weight_values[w]),
                                        (FOREGROUND, 0, k)))
            shas = {it.name for it in items}
            total = sum(it.data.nbytes for it in items)
            q.unpaced = unpaced
            t, p0, th0 = time.perf_counter(), time.process_time(), time.thread_time()
            for it in items:
                q.put(it)
            n_fwd = 0
            end = time.monotonic() + 120.0
            with torch.no_grad():
                while not shas <= sess.held and sess.alive and time.monotonic() < end:
                    if beside:
                        fwd()
                        n_fwd += 1
                    else:
                        time.sleep(0.002)
            wall, proc, th = time.perf_counter() - t, time.process_time() - p0, time.thread_time() - th0
            q.delivered()
            return {"bytes": total, "weights": len(items), "wall_s": wall, "others_cpu_s": proc - th,
                    "ns_per_byte": (proc - th) * 1e9 / max(1, total), "forwards": n_fwd,
                    "compute_extra_ns_per_byte": (th - n_fwd * fwd_alone_s) * 1e9 / max(1, total) if beside else None,
                    "probe_kept_ns_per_byte": probe_kept * 1e9 if probe_kept else None,
                    "acked": len(shas & sess.held) == len(shas)}
        finally:
            c.close()

    # the weights nearest the output (~1 MiB): what the probe picked before session 12
    probe_names, total, seen = [], 0, set()
    for op in reversed(g.ops):
        for w in op.weight_inputs:
            sha, nb = g.weight_sha256(w), g.weights[w].nbytes
            if sha in seen or (total >= 64 << 10 and total + nb > 8 * (1 << 20)):
                continue
            seen.add(sha)
            probe_names.append(w)
            total += nb
        if total >= 1 << 20:
            break
    all_names = [w for op in g.ops for w in op.weight_inputs]
    out = {"forward_alone_cpu_ms": fwd_alone_s * 1e3}
    # the probe's weights are already on the server after connect: send them from a second model's bytes? No:
    # a fresh tenant holds nothing, and the probe put these on it, so ``probe_beside`` sends the next ~1 MiB.
    skip = set(probe_names)
    nxt, tot2 = [], 0
    for op in reversed(g.ops):
        for w in op.weight_inputs:
            if w in skip or w in nxt:
                continue
            nxt.append(w)
            tot2 += g.weights[w].nbytes
        if tot2 >= 1 << 20:
            break
    sizes = {w: g.weights[w].nbytes for w in all_names}
    conds = {
        "probe_beside": lambda: send(nxt, True),
        "all_alone": lambda: send(all_names, False),
        "all_beside": lambda: send(all_names, True),
        "all_unpaced": lambda: send(all_names, False, unpaced=True),
        "small_alone": lambda: send([w for w in all_names if sizes[w] < 64 << 10], False),
        "large_alone": lambda: send([w for w in all_names if sizes[w] >= 1 << 20], False),
    }
    for k in args.conditions.split(","):
        out[k] = conds[k]()
    print("RESULT " + json.dumps(out), flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="googlenet")
    ap.add_argument("--cpus", type=float, default=0.1)
    ap.add_argument("--uplink-mbps", type=float, default=400.0)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--conditions", default="probe_beside,all_alone,all_beside",
                    help="of probe_beside, all_alone, all_beside, all_unpaced, small_alone, large_alone")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--data-port", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--access", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        child(args)
        return 0
    from testbed.cgroups import CpuCgroup
    from testbed.credentials import make_credentials

    load = [edge_process.uptime()]
    tmp = Path(tempfile.mkdtemp(prefix="sendcost-"))
    tenants = [f"t{k}" for k in range(8 * args.repeats)]
    cred = make_credentials(tmp / "cred", tenants)
    access = tmp / "access.json"
    access.write_text(json.dumps({"tenants": tenants, "tokens": cred.tokens, "tls_ca": str(cred.ca_cert)}))
    serve = [sys.executable, "-m", "edge_server.cli", "serve", "--host", "127.0.0.1", "--port", "0", "--data-port",
             "0", "--grace", "1", "--threads", "1", *cred.server_args()]
    results = []
    with edge_process.process(ROOT, serve, ["listening on ", "data channel on "]) as (port, dport):
        emu = [sys.executable, "-m", "testbed.linkemu", "--uplink-mbps", str(args.uplink_mbps), "--rtt-ms", "2"]
        with edge_process.process(ROOT, [*emu, "--target", f"127.0.0.1:{port}"], ["listening on "]) as (p1,), \
                edge_process.process(ROOT, [*emu, "--target", f"127.0.0.1:{dport}"], ["listening on "]) as (p2,):
            for rep in range(args.repeats):
                cmd = [sys.executable, __file__, "--child", "--model", args.model, "--uplink-mbps",
                       str(args.uplink_mbps), "--conditions", args.conditions, "--port", str(p1), "--data-port",
                       str(p2), "--access", str(access)]
                sub = json.loads(access.read_text())
                sub["tenants"] = tenants[rep * 8:(rep + 1) * 8]
                access.write_text(json.dumps(sub))
                with CpuCgroup(f"sendcost-{uuid.uuid4().hex[:6]}", args.cpus) as cg:
                    p = cg.popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                 env=dict(os.environ, PYTHONPATH=str(ROOT)))
                    so, se = p.communicate(timeout=900)
                line = next((x for x in so.splitlines() if x.startswith("RESULT ")), None)
                if line is None:
                    print(se[-3000:])
                    return 1
                r = json.loads(line[7:])
                results.append(r)
                conds = args.conditions.split(",")
                pk = r[conds[0]]["probe_kept_ns_per_byte"]
                print(f"repeat {rep}: probe {pk:.2f} ns/B; " + "; ".join(
                    f"{k} {r[k]['bytes'] / 1e6:.1f} MB in {r[k]['weights']} weights {r[k]['ns_per_byte']:.2f} ns/B"
                    + (f" (+compute {r[k]['compute_extra_ns_per_byte']:.2f})" if r[k]["compute_extra_ns_per_byte"]
                       is not None else "") for k in conds), flush=True)
    load.append(edge_process.uptime())
    med = statistics.median
    print(f"\n{args.model}, {args.cpus:g} CPU, {args.uplink_mbps:g} Mbit/s, TLS + data channel, median of "
          f"{len(results)} (ns of UE CPU per byte, beyond the calling thread)")
    conds = args.conditions.split(",")
    print("| probe (kept) | " + " | ".join(conds) + " |")
    print("|---" * (len(conds) + 1) + "|")
    print(f"| {med(r[conds[0]]['probe_kept_ns_per_byte'] for r in results):.2f} | "
          + " | ".join(f"{med(r[k]['ns_per_byte'] for r in results):.2f}" for k in conds) + " |")
    print("load:", *load, sep="\n  ")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"model": args.model, "cpus": args.cpus, "uplink_mbps": args.uplink_mbps,
                                         "load": load, "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
