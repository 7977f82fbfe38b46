"""Malformed messages for every EdgeService RPC, and a driver that sends them (tests and benchmarks).

``run_fuzz(address, n, seed)`` sends about ``n`` malformed messages to a server and counts the status
codes it answered: random bytes, truncated and bit-flipped valid messages, deeply nested and
inconsistent slice JSON (bad dtypes, shapes, strides, refs), weight and tensor chunks with bad
offsets, sizes, dtypes and shapes. A correct server answers each with a client-error status (or OK
where the mutation happens to be valid) and never INTERNAL or UNKNOWN. Deterministic for a seed;
bounded in count and time (every call has a deadline).
"""

from __future__ import annotations

import collections
import hashlib
import json
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import grpc

from protos.coinfer.v1 import coinfer_pb2 as pb

__all__ = ["FuzzReport", "run_fuzz"]

_IDENT: Callable[[bytes], bytes] = lambda b: b  # raw bytes on the wire
_DTYPES = ["float32", "float64", "int64", "bool", "complex64", "float16", "bfloat16", "uint8", "", "float99", "int4"]


@dataclass
class FuzzReport:
    messages: int = 0
    calls: int = 0
    codes: collections.Counter = field(default_factory=collections.Counter)
    """grpc status name -> calls answered with it."""
    bad: list[str] = field(default_factory=list)
    """Up to 20 examples of INTERNAL/UNKNOWN answers: RPC, kind, details."""

    @property
    def internal(self) -> int:
        return self.codes["INTERNAL"] + self.codes["UNKNOWN"]


def _meta(shape, dtype="float32"):
    return {"dtype": dtype, "shape": list(shape)}


def valid_spec(rng: random.Random) -> dict:
    """A small valid weightful slice (linear + relu), as a dict."""
    n = rng.choice([1, 2, 4])
    return {
        "version": 1,
        "ops": [
            {
                "name": "fc",
                "target": "aten.linear.default",
                "args": [{"t": "x"}, {"w": "w"}, {"w": "b"}],
                "kwargs": {},
                "outputs": [_meta([n, 4])],
            },
            {
                "name": "r",
                "target": "aten.relu.default",
                "args": [{"t": "fc"}],
                "kwargs": {},
                "outputs": [_meta([n, 4])],
            },
        ],
        "inputs": {"x": _meta([n, 8])},
        "outputs": ["r"],
        "weights": {"w": {**_meta([4, 8]), "sha256": "a" * 64}, "b": {**_meta([4]), "sha256": "b" * 64}},
    }


def _bad_number(rng: random.Random):
    return rng.choice([-1, 0, 1, 2**31, 2**40, 2**63 - 1, -(2**63), 1.5, "3", None, True, [], {}])


def bad_spec_json(rng: random.Random) -> bytes:
    """Slice JSON with one structural or semantic fault (or plain garbage)."""
    kind = rng.randrange(14)
    if kind == 0:
        return rng.choice([b"[", b"{"]) * rng.choice([1000, 50_000, 200_000])
    if kind == 1:
        return bytes(rng.getrandbits(8) for _ in range(rng.randrange(1, 300)))
    d = valid_spec(rng)
    op = rng.choice(d["ops"])
    if kind == 2:
        op["outputs"][0]["dtype"] = rng.choice(_DTYPES)
    elif kind == 3:
        op["outputs"][0]["shape"] = [_bad_number(rng) for _ in range(rng.randrange(0, 10))]
    elif kind == 4:
        op["outputs"][0]["stride"] = [_bad_number(rng) for _ in range(2)]
    elif kind == 5:
        op["args"][0] = rng.choice([{"t": "nope"}, {"w": "nope"}, {"x": 1}, [[[[[[[[[[1]]]]]]]]]], {"t": 5}])
    elif kind == 6:
        op["target"] = rng.choice(["aten.from_file.default", "os.system", "", "aten.relu", "aten.relu_.default"])
    elif kind == 7:
        d["inputs"]["x"]["shape"] = [rng.choice([0, 1, 7, 10**6, 2**40]) for _ in range(2)]
    elif kind == 8:
        d["inputs"]["x"]["dtype"] = rng.choice(_DTYPES)
    elif kind == 9:
        d["ops"][1]["args"][0] = {"t": "r"}  # a cycle
    elif kind == 10:
        d["version"] = _bad_number(rng)
    elif kind == 11:
        d[rng.choice(["ops", "inputs", "outputs", "weights"])] = _bad_number(rng)
    elif kind == 12:
        d["weights"]["w"]["shape"] = [rng.choice([-3, 0, 5, 2**33])]
    else:
        d["ops"].append(dict(op, name=op["name"]))  # duplicate name
    text = json.dumps(d).encode()
    if rng.random() < 0.2:
        text = text[: rng.randrange(len(text))]
    return text


def _mutate(rng: random.Random, data: bytes) -> bytes:
    if not data:
        return bytes(rng.getrandbits(8) for _ in range(rng.randrange(1, 16)))
    b = bytearray(data)
    k = rng.randrange(4)
    if k == 0:
        return bytes(b[: rng.randrange(len(b))])
    if k == 1:
        for _ in range(rng.randrange(1, 8)):
            b[rng.randrange(len(b))] = rng.getrandbits(8)
        return bytes(b)
    if k == 2:
        i = rng.randrange(len(b))
        return bytes(b[:i] + bytes(rng.getrandbits(8) for _ in range(rng.randrange(1, 32))) + b[i:])
    return bytes(rng.getrandbits(8) for _ in range(rng.randrange(0, 200)))


def _weight_chunk(rng: random.Random) -> pb.WeightChunk:
    data = bytes(rng.getrandbits(8) for _ in range(rng.choice([0, 4, 16, 64])))
    shape = rng.choice([[len(data) // 4], [4, -1], [2**40], [], [0], [1] * 40])
    total = rng.choice([len(data), len(data) + 4, 0, 2**62, 2**64 - 1])
    sha = rng.choice([hashlib.sha256(data).hexdigest(), "0" * 64, "xyz", "", "A" * 64])
    return pb.WeightChunk(
        sha256=sha,
        dtype=rng.choice(_DTYPES),
        shape=shape,
        offset=rng.choice([0, 0, 4, 2**63, 2**64 - 1]),
        total_bytes=total,
        data=data,
    )


def _tensor_chunk(rng: random.Random) -> pb.TensorChunk:
    data = bytes(rng.getrandbits(8) for _ in range(rng.choice([0, 4, 32, 128])))
    return pb.TensorChunk(
        request_id=rng.choice([0, 1, 2, 2**64 - 1]),
        meta=pb.TensorMeta(
            name=rng.choice(["x", "", "nope", "x" * 1000]),
            dtype=rng.choice(_DTYPES),
            shape=rng.choice([[1, 8], [2, 8], [-1], [2**40, 2**40], []]),
        ),
        offset=rng.choice([0, 0, 4, 2**64 - 1]),
        total_bytes=rng.choice([len(data), 32, 0, 2**64 - 1]),
        data=data,
    )


def _unary_messages(rng: random.Random) -> tuple[str, bytes]:
    rpc = rng.choice(["Hello", "ProfileGraph", "QueryWeights", "Stats"])
    if rpc == "Hello":
        valid = pb.HelloRequest(client_version="x", tenant=rng.choice(["t", "", "\x00", "t" * 300])).SerializeToString()
    elif rpc == "ProfileGraph":
        body = bad_spec_json(rng) if rng.random() < 0.7 else json.dumps(valid_spec(rng)).encode()
        valid = pb.ProfileGraphRequest(
            slice_spec_json=body, iterations=rng.choice([0, 1, 2**32 - 1]), warmup=rng.choice([0, 1, 2**32 - 1])
        ).SerializeToString()
        if rng.random() < 0.7:
            return rpc, valid  # structurally valid proto, bad JSON inside
    elif rpc == "QueryWeights":
        valid = pb.QueryWeightsRequest(
            tenant=rng.choice(["t", ""]), sha256=rng.choice([["a" * 64], ["x"], [""], ["A" * 64]])
        ).SerializeToString()
    else:
        valid = pb.StatsRequest(
            session_id=rng.choice(["", "nope", "\x01"]), tenant=rng.choice(["", "t"])
        ).SerializeToString()
    return rpc, (_mutate(rng, valid) if rng.random() < 0.8 else valid)


def _upload_stream(rng: random.Random) -> list[bytes]:
    msgs = [
        pb.UploadWeightsRequest(
            header=pb.UploadHeader(tenant=rng.choice(["t", "", "t" * 300]), session_id=rng.choice(["", "nope"]))
        ).SerializeToString()
    ]
    for _ in range(rng.randrange(1, 5)):
        m = pb.UploadWeightsRequest(chunk=_weight_chunk(rng)).SerializeToString()
        msgs.append(_mutate(rng, m) if rng.random() < 0.4 else m)
    if rng.random() < 0.2:
        msgs[0] = _mutate(rng, msgs[0])
    return msgs


def _session_stream(rng: random.Random) -> list[bytes]:
    spec = json.dumps(valid_spec(rng)).encode() if rng.random() < 0.5 else bad_spec_json(rng)
    first = pb.SessionRequest(open=pb.OpenSession(tenant="fuzz", model_id="m", slice_spec_json=spec))
    if rng.random() < 0.3:
        first.open.profile.CopyFrom(
            pb.UeProfile(cost_graph_json=bad_spec_json(rng), uplink_mbps=rng.choice([0.0, 1.0, -1.0, float("nan")]))
        )
    msgs = [first.SerializeToString()]
    for _ in range(rng.randrange(1, 6)):
        k = rng.randrange(6)
        if k == 0:
            m = pb.SessionRequest(tensor=_tensor_chunk(rng))
        elif k == 1:
            m = pb.SessionRequest(weight=_weight_chunk(rng))
        elif k == 2:
            m = pb.SessionRequest(
                begin_request=pb.BeginRequest(
                    request_id=rng.choice([0, 1, 2**64 - 1]),
                    slice_id=rng.choice(["", "nope"]),
                    input_names=rng.choice([["x"], [], ["x", "x"], ["nope"]]),
                )
            )
        elif k == 3:
            m = pb.SessionRequest(
                define_slice=pb.DefineSlice(slice_id=rng.choice(["s", "", "\x00"]), slice_spec_json=bad_spec_json(rng))
            )
        elif k == 4:
            m = pb.SessionRequest(cancel_request=pb.CancelRequest(request_id=rng.choice([0, 1, 7])))
        else:
            m = pb.SessionRequest(open=pb.OpenSession(tenant="again"))
        raw = m.SerializeToString()
        msgs.append(_mutate(rng, raw) if rng.random() < 0.3 else raw)
    if rng.random() < 0.15:
        msgs[0] = _mutate(rng, msgs[0])
    return msgs


def _code(e: grpc.RpcError) -> str:
    return e.code().name if isinstance(e, grpc.Call) else "UNKNOWN"


def run_fuzz(
    address: str, n: int, seed: int = 0, *, timeout: float = 30.0, on_call: Callable[[], None] | None = None
) -> FuzzReport:
    """Send about ``n`` malformed messages to the server at ``address``; returns the status counts."""
    rng = random.Random(seed)
    report = FuzzReport()
    with grpc.insecure_channel(address) as ch:
        unary = {
            name: ch.unary_unary(
                f"/coinfer.v1.EdgeService/{name}", request_serializer=_IDENT, response_deserializer=_IDENT
            )
            for name in ("Hello", "ProfileGraph", "QueryWeights", "Stats")
        }
        upload = ch.stream_unary(
            "/coinfer.v1.EdgeService/UploadWeights", request_serializer=_IDENT, response_deserializer=_IDENT
        )
        session = ch.stream_stream(
            "/coinfer.v1.EdgeService/Session", request_serializer=_IDENT, response_deserializer=_IDENT
        )
        while report.messages < n:
            k = rng.random()
            try:
                if k < 0.6:
                    rpc, msg = _unary_messages(rng)
                    report.messages += 1
                    kind = rpc
                    unary[rpc](msg, timeout=timeout)
                elif k < 0.8:
                    msgs = _upload_stream(rng)
                    report.messages += len(msgs)
                    kind = "UploadWeights"
                    upload(iter(msgs), timeout=timeout)
                else:
                    msgs = _session_stream(rng)
                    report.messages += len(msgs)
                    kind = "Session"
                    for _ in session(_then_close(msgs), timeout=timeout):
                        pass
                code = "OK"
            except grpc.RpcError as e:
                code = _code(e)
                if code in ("INTERNAL", "UNKNOWN") and len(report.bad) < 20:
                    report.bad.append(f"{kind}: {code}: {e.details() if isinstance(e, grpc.Call) else e}"[:300])
            report.calls += 1
            report.codes[code] += 1
            if on_call is not None:
                on_call()
    return report


def _then_close(msgs: list[bytes]) -> Iterator[bytes]:
    yield from msgs
    yield pb.SessionRequest(close=pb.CloseSession()).SerializeToString()
