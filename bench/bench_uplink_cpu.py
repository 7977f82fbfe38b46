"""UE CPU per uploaded byte: the session stream against a plain socket (the floor) and the bulk call.

    .venv/bin/python bench/bench_uplink_cpu.py [--model torchvision:resnet18] [--repeats 5]
        [--baseline DIR] [--json PATH]

Every measurement runs in a fresh sender process (the UE) and counts only that process's CPU
(``resource.getrusage(RUSAGE_SELF)``: user + system time of all its threads, gRPC's included) from the
moment the bytes are handed over until the receiver confirmed them; connecting is not counted. The
receivers run in other processes: a plain socket sink for the floor, a real ``coinfer-edge`` server
for the rest. Modes, on the weights of the model's server part (the ops from ``--cut`` of the way
through the model on; resnet18: 46.1 MB in 23 weights):

- ``floor``: ``socket.sendall`` of each weight's bytes on one TCP connection, then a 8-byte answer.
- ``bulk``: one ``UploadWeights`` call (the weights in 1 MiB chunks), until its response.
- ``session``: the weights queued on a Session stream (``ue_client.session``), until every weight
  was acknowledged.
- ``interleaved``: as ``session``, while ``--requests`` requests begin during the upload, each with
  the split's cut tensors (at the priority the client gives them), until every weight was
  acknowledged and every request answered. Its per-byte figure divides by weights + tensors; the
  table also gives how long a ready cut tensor waited for its first chunk to be handed to gRPC.
- ``session_dc`` and ``interleaved_dc``: the same over the server's data channel (``coinfer-edge
  serve --data-port 0``, ``ue_client.data_channel``): the weights' bytes go raw on a side TCP
  connection, acknowledgements and cut tensors on the Session stream; the interleaved row also gives
  the most weight bytes the data channel wrote between a cut tensor becoming ready and its last chunk
  going to gRPC (the priority bound: one block). Connecting it is not counted, like gRPC's.

``--baseline DIR`` runs the bulk and session modes also with the code of another checkout (its
``ue_client`` in the sender and its ``coinfer-edge`` as the receiver), interleaved with this tree's
runs, so old and new are compared side by side in one run. Medians over ``--repeats`` runs are
reported; the JSON (``--json``) has ``floor_ns_per_byte``, ``bulk_ns_per_byte``,
``session_ns_per_byte``, ``interleaved_ns_per_byte``, ``session_dc_ns_per_byte``,
``interleaved_dc_ns_per_byte`` (medians, this tree), every sample, and the baseline's figures under
``baseline`` (the baseline runs no data-channel modes).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import edge_process  # bench/edge_process.py, beside this script

ROOT = Path(__file__).resolve().parents[1]
MODES = ("floor", "bulk", "session", "session_dc", "interleaved", "interleaved_dc")
DC_MODES = ("session_dc", "interleaved_dc")


def cpu_s() -> float:
    """User + system CPU seconds of this process so far (all threads)."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


# ---- payload (parent) -------------------------------------------------------------------------------
def write_payload(model: str, cut: float, out: Path) -> dict:
    """Capture ``model``, take the server part from op ``cut * len(ops)`` on, and write its weights
    (raw bytes, one file), their manifest, its slice spec and zero-filled cut tensors under ``out``."""
    sys.path.insert(0, str(ROOT))
    from modelgraph.slice import make_slice
    from modelgraph.tensors import tensor_bytes
    from ue_client.client import prepare_model

    g = prepare_model(model).graph
    k = max(1, min(len(g.ops) - 1, int(cut * len(g.ops))))
    split = g.split(op.name for op in g.ops[k:])
    spec = make_slice(g, split)
    weights, seen, off = [], set(), 0
    with open(out / "weights.bin", "wb") as f:
        for w in split.server_weights:
            sha = g.weight_sha256(w)
            if sha in seen:
                continue
            seen.add(sha)
            data = tensor_bytes(g.weight_values[w])
            meta = g.weights[w]
            f.write(data)
            weights.append({"sha256": sha, "dtype": meta.dtype, "shape": list(meta.shape), "offset": off,
                            "nbytes": data.nbytes})
            off += data.nbytes
    tensors = []
    for ref in split.cut_tensors:
        m = g.meta_of(ref)
        nbytes = m.nbytes
        tensors.append({"name": ref, "dtype": m.dtype, "shape": list(m.shape), "nbytes": nbytes})
    outputs = {ref: [m.dtype, list(m.shape), m.nbytes] for ref, m in ((r, g.meta_of(r)) for r in split.server_outputs)}
    man = {"model": model, "first_server_op": k, "ops": len(g.ops), "weights": weights, "tensors": tensors,
           "outputs": outputs, "weight_bytes": off, "slice_spec_json": spec.to_json()}
    (out / "manifest.json").write_text(json.dumps(man))
    return man


# ---- receivers (other processes) ----------------------------------------------------------------------
SINK = r"""
import socket, struct, sys
srv = socket.create_server(("127.0.0.1", 0))
print(srv.getsockname()[1], flush=True)
buf = bytearray(4 << 20)
while True:
    c, _ = srv.accept()
    with c:
        n = 0
        while True:
            k = c.recv_into(buf)
            if not k:
                break
            n += k
        c.sendall(struct.pack("<Q", n))
"""


@contextlib.contextmanager
def socket_sink():
    """A process that accepts connections, counts what each sends until EOF and answers the count."""
    proc = subprocess.Popen([sys.executable, "-c", SINK], stdout=subprocess.PIPE, text=True)
    try:
        yield int(proc.stdout.readline())
    finally:
        proc.kill()
        proc.wait()


def edge_server(root: Path, threads: int, cache_mb: int, data_channel: bool = False):
    """``coinfer-edge serve`` from the checkout ``root`` on a free loopback port (with a data channel on
    any free port when ``data_channel``); yields the port."""
    flags = ["--threads", str(threads), "--cache-mb", str(cache_mb)] + (["--data-port", "0"] if data_channel else [])
    return edge_process.edge_server(root, *flags, start_timeout_s=90)


# ---- senders (a fresh process per measurement) --------------------------------------------------------
def _load(payload: Path) -> tuple[dict, memoryview]:
    man = json.loads((payload / "manifest.json").read_text())
    blob = bytearray((payload / "weights.bin").read_bytes())
    return man, memoryview(blob)


def send_floor(man: dict, blob: memoryview, port: int) -> dict:
    s = socket.create_connection(("127.0.0.1", port))
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    c0, t0 = cpu_s(), time.perf_counter()
    for w in man["weights"]:
        s.sendall(blob[w["offset"]:w["offset"] + w["nbytes"]])
    s.shutdown(socket.SHUT_WR)
    got = int.from_bytes(s.recv(8), "little")
    c1, t1 = cpu_s(), time.perf_counter()
    s.close()
    if got != man["weight_bytes"]:
        raise RuntimeError(f"sink got {got} of {man['weight_bytes']} bytes")
    return {"cpu_s": c1 - c0, "wall_s": t1 - t0, "bytes": got}


def _weights(man: dict, blob: memoryview):
    for w in man["weights"]:
        yield w, blob[w["offset"]:w["offset"] + w["nbytes"]]


def send_bulk(man: dict, blob: memoryview, port: int, chunk: int) -> dict:
    from ue_client import wire

    ch = wire.channel(f"127.0.0.1:{port}")
    st = wire.stub(ch)
    tenant = f"bench-{os.getpid()}"
    wire.hello(st, tenant, 10.0)

    enc = getattr(wire, "encode_weight_chunk", None)  # pre-serialised chunks where the code has them

    def chunks():
        for w, data in _weights(man, blob):
            for off, end in wire.chunk_spans(w["nbytes"], chunk):
                args = (w["sha256"], w["dtype"], tuple(w["shape"]), off, w["nbytes"], data[off:end])
                yield enc(*args, field=wire.UPLOAD_CHUNK) if enc is not None else wire.weight_chunk(*args)

    c0, t0 = cpu_s(), time.perf_counter()
    acks = wire.upload_weights(st, tenant, "", chunks(), timeout_s=120.0)
    c1, t1 = cpu_s(), time.perf_counter()
    ch.close()
    if len(acks) != len(man["weights"]) or any(a.already_present for a in acks):
        raise RuntimeError(f"bulk upload: {len(acks)} acks for {len(man['weights'])} weights")
    return {"cpu_s": c1 - c0, "wall_s": t1 - t0, "bytes": man["weight_bytes"]}


def _session_items(man: dict, blob: memoryview):
    """(sha, dtype, shape, data) per weight, in need order."""
    return [(w["sha256"], w["dtype"], tuple(w["shape"]), data) for w, data in _weights(man, blob)]


def send_session(man: dict, blob: memoryview, port: int, requests: int, interval_s: float,
                 data_channel: bool = False) -> dict:
    from ue_client import session as S
    from ue_client import wire

    ch = wire.channel(f"127.0.0.1:{port}")
    st = wire.stub(ch)
    tenant = f"bench-{os.getpid()}"
    n_weights = len(man["weights"])
    acked = threading.Event()
    count = [0]

    def on_ack(ack, t):
        count[0] += 1
        if count[0] >= n_weights:
            acked.set()

    sess = S.SessionStream(st, tenant, "bench", on_weight_ack=on_ack)
    if data_channel:  # as ue_client.connection starts it
        from ue_client.data_channel import DataSender, target_for

        o = sess.opened
        if not o.limits.data_port or not o.data_ticket:
            raise RuntimeError("the server offers no data channel")
        sess.data_sender = DataSender(sess.queue, target_for(f"127.0.0.1:{port}"), o.limits.data_port,
                                      o.data_ticket, o.session_id, is_held=sess.held.__contains__,
                                      block_bytes=o.limits.max_chunk_bytes)
        if not sess.data_sender.connected.wait(10):
            raise RuntimeError(f"data channel did not connect: {sess.data_sender.error}")
    if requests:
        sess.define_slice("s", man["slice_spec_json"])
        deadline = time.monotonic() + 60
        while "s" not in sess.slice_acks:
            if sess.rejected or time.monotonic() > deadline:
                raise RuntimeError(f"slice not accepted: {sess.rejected}")
            time.sleep(0.01)
    tensors = [(t, bytearray(t["nbytes"])) for t in man["tensors"]]
    outputs = {name: (dtype, tuple(shape), n) for name, (dtype, shape, n) in man["outputs"].items()}
    items = _session_items(man, blob)
    pendings, tensor_items = [], []
    c0, t0 = cpu_s(), time.perf_counter()
    for i, (sha, dtype, shape, data) in enumerate(items):
        sess.queue.put(S.UplinkItem("weight", sha, dtype, shape, data, (S.FOREGROUND, 2 * i + 1, 0)))
    for rid in range(1, requests + 1):
        time.sleep(interval_s)
        pendings.append(sess.begin(rid, "s", [t["name"] for t, _ in tensors], outputs=outputs))
        for t, data in tensors:
            it = S.UplinkItem("tensor", t["name"], t["dtype"], tuple(t["shape"]), memoryview(data),
                              (S.FOREGROUND, -1, rid), request_id=rid)
            it.ready_t = time.perf_counter()
            tensor_items.append(it)
            sess.queue.put(it)
    if not acked.wait(120):
        raise RuntimeError(f"only {count[0]} of {n_weights} weights acknowledged")
    for p in pendings:
        if not p.done.wait(120) or p.error is not None:
            raise RuntimeError(f"request {p.request_id} failed: {p.error}")
    c1, t1 = cpu_s(), time.perf_counter()
    tensor_bytes = sum(it.total for it in tensor_items)
    waits = [(it.first_sent - it.ready_t) * 1e3 for it in tensor_items if it.first_sent is not None]
    side_waited = [it.side_waited for it in tensor_items if getattr(it, "side_waited", None) is not None]
    if data_channel and (not sess.data_sender.active or sess.queue.side_bytes < man["weight_bytes"]):
        raise RuntimeError(f"weights did not all go on the data channel ({sess.data_sender.error})")
    sess.close(5.0)
    ch.close()
    return {"cpu_s": c1 - c0, "wall_s": t1 - t0, "bytes": man["weight_bytes"] + tensor_bytes,
            "tensor_bytes": tensor_bytes, "tensor_wait_ms": waits, "tensor_side_waited_bytes": side_waited}


def sender_main(args) -> int:
    sys.path.insert(0, str(Path(args.root).resolve()))
    man, blob = _load(Path(args.payload))
    if args.sender == "floor":
        r = send_floor(man, blob, args.port)
    elif args.sender == "bulk":
        r = send_bulk(man, blob, args.port, args.chunk_bytes)
    elif args.sender in ("session", "session_dc"):
        r = send_session(man, blob, args.port, 0, 0.0, data_channel=args.sender == "session_dc")
    else:
        r = send_session(man, blob, args.port, args.requests, args.interval_s,
                         data_channel=args.sender == "interleaved_dc")
    print("RESULT " + json.dumps(r), flush=True)
    return 0


# ---- the run (parent) ----------------------------------------------------------------------------------
def run_sender(mode: str, root: Path, payload: Path, port: int, args, interval_s: float = 0.0) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--sender", mode, "--root", str(root),
           "--payload", str(payload), "--port", str(port), "--chunk-bytes", str(args.chunk_bytes),
           "--requests", str(args.requests), "--interval-s", f"{interval_s:.6f}"]
    r = edge_process.child_result(cmd, root, f"{mode} sender ({root})", timeout_s=300)
    r["ns_per_byte"] = r["cpu_s"] / r["bytes"] * 1e9
    return r



def _median(rows: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in rows)


def summarise(samples: dict[str, list[dict]]) -> dict[str, dict]:
    out = {}
    for mode, rows in samples.items():
        if not rows:
            continue
        s = {"ns_per_byte": _median(rows, "ns_per_byte"), "min_ns_per_byte": min(r["ns_per_byte"] for r in rows),
             "max_ns_per_byte": max(r["ns_per_byte"] for r in rows),
             "mb_per_s": statistics.median(r["bytes"] / r["wall_s"] / 1e6 for r in rows),
             "cpu_ms": _median(rows, "cpu_s") * 1e3, "bytes": rows[0]["bytes"], "runs": len(rows)}
        waits = [w for r in rows for w in r.get("tensor_wait_ms", [])]
        if waits:
            s["tensor_wait_ms_median"] = statistics.median(waits)
            s["tensor_wait_ms_max"] = max(waits)
        side = [w for r in rows for w in r.get("tensor_side_waited_bytes", [])]
        if side:
            s["tensor_side_waited_bytes_max"] = max(side)
        out[mode] = s
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="torchvision:resnet18")
    p.add_argument("--cut", type=float, default=0.25, help="fraction of the ops that stay on the UE (default 0.25)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--requests", type=int, default=4, help="requests interleaved with the upload (default 4)")
    p.add_argument("--chunk-bytes", type=int, default=1 << 20, help="chunk size of the bulk call (default 1 MiB)")
    p.add_argument("--server-threads", type=int, default=1)
    p.add_argument("--baseline", type=Path, default=None, help="another checkout to compare (bulk + session)")
    p.add_argument("--json", type=Path, default=None)
    # sender process (internal)
    p.add_argument("--sender", choices=MODES, help=argparse.SUPPRESS)
    p.add_argument("--root", default=str(ROOT), help=argparse.SUPPRESS)
    p.add_argument("--payload", help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, help=argparse.SUPPRESS)
    p.add_argument("--interval-s", type=float, default=0.0, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.sender:
        return sender_main(args)

    impls = {"this": ROOT}
    if args.baseline is not None:
        impls["baseline"] = args.baseline.resolve()
    with tempfile.TemporaryDirectory(prefix="coinfer-uplink-") as tmp:
        payload = Path(tmp)
        man = write_payload(args.model, args.cut, payload)
        print(f"{args.model}: server part from op {man['first_server_op']} of {man['ops']}: "
              f"{man['weight_bytes'] / 1e6:.1f} MB in {len(man['weights'])} weights; cut tensors "
              f"{sum(t['nbytes'] for t in man['tensors']) / 1e3:.0f} kB per request", flush=True)
        samples: dict[str, dict[str, list[dict]]] = {k: {m: [] for m in MODES} for k in impls}
        with contextlib.ExitStack() as stack:
            sink = stack.enter_context(socket_sink())
            ports = {k: stack.enter_context(edge_server(root, args.server_threads, 2048, data_channel=k == "this"))
                     for k, root in impls.items()}
            for rep in range(args.repeats):
                for mode in MODES:
                    for k, root in impls.items():
                        if mode in ("floor", *DC_MODES) and k != "this":
                            continue
                        interval = 0.0
                        if mode.startswith("interleaved"):  # requests spread over the upload's expected time
                            walls = [r["wall_s"] for r in samples[k][mode.replace("interleaved", "session")]]
                            interval = statistics.median(walls) / (args.requests + 1)
                        r = run_sender(mode, root, payload, sink if mode == "floor" else ports[k], args, interval)
                        samples[k][mode].append(r)
                        print(f"  run {rep + 1}/{args.repeats} {k:>8} {mode:<11} {r['ns_per_byte']:6.2f} ns/B "
                              f"({r['cpu_s'] * 1e3:6.1f} ms CPU, {r['bytes'] / r['wall_s'] / 1e6:7.1f} MB/s)",
                              flush=True)
    summary = {k: summarise(v) for k, v in samples.items()}
    floor = summary["this"]["floor"]["ns_per_byte"]
    print(f"\nUE CPU per uploaded byte, median of {args.repeats} runs (sender process only; {args.model})\n")
    print("| code | path | ns/B median [min, max] | x floor | MB/s | ready tensor waited ms (median / max) "
          "| weight bytes behind a ready tensor (max) |")
    print("|---|---|---|---|---|---|---|")
    for k, modes in summary.items():
        for mode, s in modes.items():
            wait = (f"{s['tensor_wait_ms_median']:.2f} / {s['tensor_wait_ms_max']:.2f}"
                    if "tensor_wait_ms_median" in s else "")
            side = f"{s['tensor_side_waited_bytes_max']}" if "tensor_side_waited_bytes_max" in s else ""
            print(f"| {k} | {mode} | {s['ns_per_byte']:.2f} [{s['min_ns_per_byte']:.2f}, {s['max_ns_per_byte']:.2f}]"
                  f" | {s['ns_per_byte'] / floor:.2f} | {s['mb_per_s']:.0f} | {wait} | {side} |")
    this = summary["this"]
    ok_floor = this["session"]["ns_per_byte"] <= 2 * floor
    ok_bulk = this["session"]["ns_per_byte"] <= this["bulk"]["ns_per_byte"]
    dc_floor = this["session_dc"]["ns_per_byte"] <= 2 * floor
    dc_bulk = this["session_dc"]["ns_per_byte"] <= this["bulk"]["ns_per_byte"]
    print(f"\nsession (in-stream) <= 2x floor: {ok_floor}; <= bulk: {ok_bulk}")
    print(f"session (data channel) <= 2x floor: {dc_floor}; <= bulk: {dc_bulk}")
    result = {
        "model": args.model, "repeats": args.repeats, "requests": args.requests,
        "weight_bytes": man["weight_bytes"], "weights": len(man["weights"]),
        "floor_ns_per_byte": floor, "bulk_ns_per_byte": this["bulk"]["ns_per_byte"],
        "session_ns_per_byte": this["session"]["ns_per_byte"],
        "interleaved_ns_per_byte": this["interleaved"]["ns_per_byte"],
        "session_over_floor": this["session"]["ns_per_byte"] / floor,
        "session_le_2x_floor": ok_floor, "session_le_bulk": ok_bulk,
        "session_dc_ns_per_byte": this["session_dc"]["ns_per_byte"],
        "interleaved_dc_ns_per_byte": this["interleaved_dc"]["ns_per_byte"],
        "session_dc_over_floor": this["session_dc"]["ns_per_byte"] / floor,
        "session_dc_le_2x_floor": dc_floor, "session_dc_le_bulk": dc_bulk,
        "uptime": edge_process.uptime(),
        "summary": summary, "samples": samples,
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count(), "platform": platform.platform()},
        "command": " ".join([Path(sys.argv[0]).name] + (argv if argv is not None else sys.argv[1:])),
    }
    if "baseline" in summary:
        b = summary["baseline"]
        result["baseline"] = {"root": str(impls["baseline"]), "bulk_ns_per_byte": b["bulk"]["ns_per_byte"],
                              "session_ns_per_byte": b["session"]["ns_per_byte"],
                              "interleaved_ns_per_byte": b["interleaved"]["ns_per_byte"]}
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
