"""The server's work on a BeginRequest carrying millions of ``input_names`` (session 11's bound).

Times, median of ``--repeats``, for one 7.5 MB ``SessionRequest`` of 2.5M one-character names: its protobuf
parse (``parse``, grpc's deserializer does this) and what the server does with the names after it
(``handle``). ``after``: ``decode_session_request`` and ``requests.check_input_names`` against a one-input
slice (refused on the count, no name read). ``before``: the decode, then what the older ``Session.receive``
and ``RequestRunner.begin`` did with the names, re-enacted here (a list copy and a set compare: equal sets,
so the request was accepted; ``begin`` cannot be called alone); the older decode also copied the names into
a list, which this counts only when that code is first on ``PYTHONPATH``.

``flock /work/wt/.bench.lock python bench/bench_begin_names.py after|before [--repeats 5]``.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time

from edge_server import servicer
from protos.coinfer.v1 import coinfer_pb2 as pb


class _Spec:
    inputs = {"x": None}


class _Slice:
    slice_id = "s"
    spec = _Spec


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("mode", choices=("before", "after"))
    ap.add_argument("--names", type=int, default=2_500_000)
    ap.add_argument("--repeats", type=int, default=5)
    a = ap.parse_args(argv)
    raw = pb.SessionRequest(begin_request=pb.BeginRequest(request_id=1, slice_id="s",
                                                          input_names=["x"] * a.names)).SerializeToString()
    parse, handle = [], []
    for _ in range(a.repeats):
        t0 = time.perf_counter()
        msg = pb.SessionRequest.FromString(raw)
        t1 = time.perf_counter()
        ev = servicer.decode_session_request(msg, 1 << 20, 256)
        if a.mode == "before":
            names = list(ev.input_names)
            assert set(names) == {"x"}
        else:
            from edge_server.errors import InvalidArgument
            from edge_server.requests import check_input_names

            with contextlib.suppress(InvalidArgument):
                check_input_names(1, ev.input_names, _Slice)
        t2 = time.perf_counter()
        parse.append((t1 - t0) * 1e3)
        handle.append((t2 - t1) * 1e3)
    out = {"mode": a.mode, "message_bytes": len(raw), "parse_ms": statistics.median(parse),
           "handle_ms": statistics.median(handle)}
    print(out)
    return out


if __name__ == "__main__":
    main()
