"""BeginRequest.matmul_precision values other than the three, sent on a real session (in-process ServerThread on
loopback, our client with its BeginRequest bytes rewritten): the status each gets, whether the session and the
server keep serving, and whether a bad value leaves the process's precision changed."""

import logging
import os
import sys
import time

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "../../../..")))
import torch
from torch import nn

from edge_server.config import ServerConfig
from edge_server.testing import ServerThread
from tests.checks import FAST_LINK
from ue_client import CoinferClient, new_tenant, wire

records = []


class H(logging.Handler):
    def emit(self, r):
        records.append((r.levelname, r.getMessage()[:300], bool(r.exc_info)))


logging.getLogger().addHandler(H())
logging.getLogger().setLevel(logging.INFO)

orig = wire.begin_request
INJECT = {"v": None}


def patched(request_id, slice_id, input_names, inputs=(), op_timings=False, matmul_precision="highest"):
    b = orig(request_id, slice_id, input_names, inputs, op_timings, "medium")  # field present, then swap its bytes
    if INJECT["v"] is None:
        return orig(request_id, slice_id, input_names, inputs, op_timings, matmul_precision)
    raw = INJECT["v"]
    field = wire._BEGIN_PRECISION_TAG + wire._varint(6) + b"medium"
    new = wire._BEGIN_PRECISION_TAG + wire._varint(len(raw)) + raw
    assert b.endswith(field)
    body = b[: -len(field)] + new
    # re-frame: outer tag + varint(len) + inner
    inner_start = 1 + len(wire._varint(len(b) - 1 - len(wire._varint(len(b)))))  # tag + len
    inner = body[inner_start:]
    return bytes(((wire.SESSION_BEGIN << 3) | 2,)) + wire._varint(len(inner)) + inner


wire.begin_request = patched

BAD = {
    "low": b"low",
    "HIGHEST": b"HIGHEST",
    "medium\\x00": b"medium\x00",
    "m\\u00e9dium (utf-8)": "médium".encode(),
    "RTL/zero-width unicode": "\u202ehigh\u200b".encode(),
    "invalid utf-8 \\xff\\xfe": b"\xff\xfe",
    "lone surrogate bytes": b"\xed\xa0\x80",
    "1 MiB string": b"m" * (1 << 20),
    "7.9 MiB string": b"h" * (8 * 2**20 - 4096),
}
torch.manual_seed(0)
m, x = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 4)).eval(), torch.randn(2, 64)


def client(srv):
    return CoinferClient(
        m,
        (x,),
        server=srv.address,
        policy="offload",
        link=FAST_LINK,
        tenant=new_tenant(),
        profile_runs=2,
        fallback=False,
        probe=False,
    )


with ServerThread(config=ServerConfig(threads=1)) as srv:
    for label, raw in BAD.items():
        with client(srv) as c:
            c(x)
            INJECT["v"] = raw
            n0 = len(records)
            t0 = time.perf_counter()
            try:
                c(x)
                got = "ANSWERED (no error)"
            except Exception as e:
                got = f"{type(e).__name__}: {str(e)[:260]}"
            dt = (time.perf_counter() - t0) * 1e3
            INJECT["v"] = None
        with client(srv) as c2:  # the server still serves a fresh session
            try:
                c2(x)
                after = "a fresh client's call ok"
            except Exception as e:
                after = f"fresh client's call FAILED {type(e).__name__}: {str(e)[:160]}"
        logs = [r for r in records[n0:] if r[0] in ("WARNING", "ERROR", "CRITICAL") or r[2] or "INTERNAL" in r[1]]
        print(
            f"[{label}] {dt:.0f} ms -> {got}\n    {after}; process precision {torch.get_float32_matmul_precision()}; "
            f"server warnings/errors: {logs[:3]}",
            flush=True,
        )
