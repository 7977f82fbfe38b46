"""The session uplink: pre-serialised chunks, priority on the recorded send order, freed-buffer reuse."""

from __future__ import annotations

import subprocess
import sys
import threading

import pytest

from protos.coinfer.v1 import coinfer_pb2 as pb
from ue_client import wire
from ue_client.session import BACKGROUND, FOREGROUND, UplinkItem, UplinkQueue

KiB = 1 << 10


@pytest.mark.parametrize("offset,n", [(0, 0), (0, 1), (0, 300), (1 << 20, 200_000), (5, 127), (0, 128)])
def test_encoded_weight_chunk_is_the_protobuf_message(offset, n):
    data = bytes(range(256)) * (n // 256 + 1)
    data = memoryview(data[:n])
    shape = (3, 0, 1 << 33)
    args = ("ab" * 32, "float32", shape, offset, offset + n + 7, data)
    ref = pb.SessionRequest(weight=wire.weight_chunk(*args)).SerializeToString()
    assert wire.encode_weight_chunk(*args) == ref
    ref_up = pb.UploadWeightsRequest(chunk=wire.weight_chunk(*args)).SerializeToString()
    assert wire.encode_weight_chunk(*args, field=wire.UPLOAD_CHUNK) == ref_up
    assert pb.SessionRequest.FromString(wire.encode_weight_chunk(*args)).weight.data == bytes(data)


@pytest.mark.parametrize("n", [0, 1, 5000, 300_000])
def test_encoded_tensor_chunk_is_the_protobuf_message(n):
    data = memoryview(bytearray(b"\x07" * n))
    args = (2**40 + 3, "layer1.0.relu", "bfloat16", (1, 64, 56, 56), 0 if n == 0 else 17, n + 17, data)
    assert wire.encode_tensor_chunk(*args) == wire.tensor_chunk(*args).SerializeToString()


def _sent(msgs) -> list[tuple[str, str, int, int]]:
    """(kind, name, offset, length) of each data message the uplink handed to gRPC."""
    out = []
    for raw in msgs:
        m = pb.SessionRequest.FromString(raw)
        kind = m.WhichOneof("msg")
        if kind == "weight":
            out.append(("weight", m.weight.sha256, m.weight.offset, len(m.weight.data)))
        elif kind == "tensor":
            out.append(("tensor", m.tensor.meta.name, m.tensor.offset, len(m.tensor.data)))
        else:
            out.append((kind, "", 0, 0))
    return out


def _weight(name: str, nbytes: int, pos: int, bg: bool = False) -> UplinkItem:
    return UplinkItem("weight", name, "uint8", (nbytes,), memoryview(bytearray(nbytes)),
                      (BACKGROUND if bg else FOREGROUND, pos, 0))


def test_ready_tensor_jumps_ahead_of_weights_within_one_chunk():
    """A cut tensor put while a weight is half sent goes out next (the weight resumes after it); weights
    go in need order, background after foreground; control messages first."""
    chunk = 256 * KiB
    q = UplinkQueue(chunk_bytes=chunk)
    q.put(_weight("bg", 300 * KiB, 0, bg=True))
    q.put(_weight("w2", 2 * chunk, 5))
    q.put(_weight("w1", 3 * chunk, 1))
    q.put_control(wire.begin_request(1, "s", ["x"]))
    it = q.messages()
    first = [next(it) for _ in range(2)]  # BeginRequest, then w1's first chunk
    t = UplinkItem("tensor", "x", "float32", (100_000,), memoryview(bytearray(400_000)), (FOREGROUND, -1, 1),
                   request_id=1)
    q.put(t)
    rest = []
    for _ in range(20):
        if not q.pending():
            break
        rest.append(next(it))
    order = _sent(first + rest)
    assert order[0][0] == "begin_request"
    assert order[1] == ("weight", "w1", 0, chunk)
    # the tensor (400 kB = two chunks) goes before the rest of w1
    assert order[2] == ("tensor", "x", 0, chunk)
    assert order[3] == ("tensor", "x", chunk, 400_000 - chunk)
    assert order[4:7] == [("weight", "w1", chunk, chunk), ("weight", "w1", 2 * chunk, chunk),
                          ("weight", "w2", 0, chunk)]
    assert order[7] == ("weight", "w2", chunk, chunk)
    assert [o[1] for o in order[8:]] == ["bg", "bg"]
    assert q.sent.tensor_bytes == 400_000 and q.sent.weight_bytes == 3 * chunk + 2 * chunk + 300 * KiB
    assert t.first_sent is not None


def test_uplink_waits_for_work_and_stops_on_close():
    q = UplinkQueue(chunk_bytes=256 * KiB)
    got: list[bytes] = []
    th = threading.Thread(target=lambda: got.extend(q.messages()))
    th.start()
    q.put(_weight("w", 1000, 0))
    q.put_control(wire.close_session())
    while q.pending():
        threading.Event().wait(0.01)
    q.close()
    th.join(10)
    assert not th.is_alive()
    kinds = [k for k, *_ in _sent(got)]
    assert sorted(kinds) == ["close", "weight"]


FAULTS = r"""
import importlib.util, resource
if {tune}:  # ue_client/heap.py alone (the package would import torch)
    spec = importlib.util.spec_from_file_location("heap", {path!r})
    heap = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(heap)
    assert heap.retain_freed_buffers()
src = bytearray(4 << 20)
def once():
    b = b"".join((b"x", src))  # a fresh 4 MiB buffer, freed at once: what each uplink chunk does
    del b
once()
f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(30):
    once()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
"""


def _faults(tune: bool) -> int:
    import os

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "ue_client", "heap.py")
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"}
    r = subprocess.run([sys.executable, "-c", FAULTS.format(path=path, tune=tune)], capture_output=True, text=True,
                       timeout=120, env=env)
    assert r.returncode == 0, r.stderr
    return int(r.stdout.strip())


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc tuning")
def test_freed_chunk_buffers_are_reused_not_faulted_in_again():
    from ue_client import heap

    if not heap.retain_freed_buffers() and not heap._user_tuned():
        pytest.skip("not glibc")
    untuned, tuned = _faults(False), _faults(True)
    # 30 x 4 MiB: ~30,000 page faults when each buffer goes back to the kernel, a handful when reused
    assert tuned < 300 < untuned, (tuned, untuned)


def test_encoded_weight_chunks_is_the_protobuf_message():
    chunks = [("ab" * 32, "float32", (3, 5), 0, 60, memoryview(bytes(range(60)))),
              ("cd" * 32, "uint8", (0,), 0, 0, memoryview(b"")),
              ("ef" * 32, "bfloat16", (1 << 33,), 1 << 20, 1 << 34, memoryview(bytearray(b"\x05" * 300_000)))]
    ref = pb.SessionRequest(weights=pb.WeightChunks(chunks=[wire.weight_chunk(*c) for c in chunks]))
    assert wire.encode_weight_chunks(chunks) == ref.SerializeToString()


def _packed(msgs) -> list[list[tuple[str, int, int]]]:
    """Per data message: (weight or tensor name, offset, length) of each chunk it carries."""
    out = []
    for raw in msgs:
        m = pb.SessionRequest.FromString(raw)
        kind = m.WhichOneof("msg")
        if kind == "weights":
            out.append([(c.sha256, c.offset, len(c.data)) for c in m.weights.chunks])
        elif kind == "weight":
            out.append([(m.weight.sha256, m.weight.offset, len(m.weight.data))])
        elif kind == "tensor":
            out.append([(m.tensor.meta.name, m.tensor.offset, len(m.tensor.data))])
    return out


def _drain(q: UplinkQueue) -> list[bytes]:
    it, out = q.messages(), []
    while q.pending():
        out.append(next(it))
    return out


def test_small_weights_are_packed_in_need_order_up_to_the_message_size():
    """With a server that takes packed messages, consecutive weights share a message (in priority order)
    until it holds ``message_bytes`` of data or ``max_pack`` chunks; a weight that does not fit is split
    and goes on in the next message."""
    q = UplinkQueue(chunk_bytes=256 * KiB)
    q.configure(1024 * KiB, 3)
    for name, n, pos in [("a", 100 * KiB, 1), ("b", 100 * KiB, 3), ("c", 2000 * KiB, 5), ("d", 10 * KiB, 7),
                         ("e", 10 * KiB, 9), ("f", 10 * KiB, 11), ("g", 10 * KiB, 13)]:
        q.put(_weight(name, n, pos))
    msgs = _packed(_drain(q))
    assert msgs == [
        [("a", 0, 100 * KiB), ("b", 0, 100 * KiB), ("c", 0, 824 * KiB)],
        [("c", 824 * KiB, 1024 * KiB)],
        [("c", 1848 * KiB, 152 * KiB), ("d", 0, 10 * KiB), ("e", 0, 10 * KiB)],  # max_pack = 3
        [("f", 0, 10 * KiB), ("g", 0, 10 * KiB)],
    ]
    assert q.sent.weight_messages == 4 and q.sent.weight_bytes == 2240 * KiB
    assert set(q.sent.weight_last_chunk) == set("abcdefg")


def test_chunks_stay_small_while_a_cut_tensor_can_become_ready():
    """While a request is in flight a weight message carries at most ``chunk_bytes`` (a ready cut tensor
    waits for at most one such message); a lone upload uses the server's chunk limit."""
    q = UplinkQueue(chunk_bytes=256 * KiB)
    q.configure(1024 * KiB, 8)
    expected = [False]
    q.tensors_expected = lambda: expected[0]
    q.put(_weight("w", 3000 * KiB, 1))
    it = q.messages()
    assert _packed([next(it)]) == [[("w", 0, 1024 * KiB)]]
    expected[0] = True
    assert _packed([next(it)]) == [[("w", 1024 * KiB, 256 * KiB)]]
    t = UplinkItem("tensor", "x", "float32", (1000,), memoryview(bytearray(4000)), (FOREGROUND, -1, 1), request_id=1)
    q.put(t)
    assert _packed([next(it)]) == [[("x", 0, 4000)]]  # the tensor goes before the rest of the weight
    assert _packed([next(it)]) == [[("w", 1280 * KiB, 256 * KiB)]]
    expected[0] = False
    assert _packed([next(it)]) == [[("w", 1536 * KiB, 1024 * KiB)]]


def test_data_channel_blocks_are_long_only_while_no_cut_tensor_can_become_ready():
    """On the data channel at a known rate (100 Mbit/s here), a block and the socket's unsent bound are
    ``SIDE_IDLE_CHUNK_S`` of the rate (within the 1 MiB cap) while no request is in flight, ``chunk_s`` of it
    (312.5 kB) while one is: a ready cut tensor still waits behind at most ``chunk_s`` of weights; share-paced,
    the share's grain as before."""
    from ue_client.session import SIDE_IDLE_CHUNK_S

    rate = 12.5e6
    q = UplinkQueue(chunk_bytes=1024 * KiB, rate_bps=lambda: rate, ahead_s=1e9)
    expected = [False]
    q.tensors_expected = lambda: expected[0]
    q.start_side(1024 * KiB)
    q.put(_weight("w", 4000 * KiB, 1))

    def block() -> int:
        spans = q.next_side_block(1.0)
        q.side_written(sum(e - s for _, s, e in spans))
        return sum(e - s for _, s, e in spans)

    idle = min(1024 * KiB, int(rate * SIDE_IDLE_CHUNK_S))
    assert idle > int(rate * q.chunk_s)
    assert block() == idle and q.side_unsent_bytes() == idle
    expected[0] = True
    assert block() == int(rate * q.chunk_s) and q.side_unsent_bytes() == int(rate * q.chunk_s)
    expected[0] = False
    assert block() == idle
    q.set_share_rate(rate)  # share-paced: the share's grain (``chunk_s``) whatever is in flight
    assert block() == int(rate * q.chunk_s) and q.side_unsent_bytes() == int(rate * q.chunk_s)
    q.close()


def test_an_older_server_gets_one_chunk_per_message():
    """Without ``configure`` (or with max_pack 0/1: a server that does not advertise packing) every message
    is a plain ``SessionRequest.weight``."""
    for configure in (None, (4096 * KiB, 0)):
        q = UplinkQueue(chunk_bytes=256 * KiB)
        if configure:
            q.configure(*configure)
        for i in range(4):
            q.put(_weight(f"w{i}", 10 * KiB, i))
        msgs = _drain(q)
        assert [pb.SessionRequest.FromString(m).WhichOneof("msg") for m in msgs] == ["weight"] * 4
