"""A BeginRequest from outside, through the protos, against a real server on a free port.

- ``input_names`` had no bound on its count: a 5 MB BeginRequest of 2.5M names held the event loop ~150 ms
  (copied twice, set and sorted) and a name repeated passed as one (``["x"] * N`` for a one-input slice
  ran). Now the names, if any, are each of the slice's inputs once; the count is checked first, before a
  name is read, and a request that differs fails alone, INVALID_ARGUMENT naming the counts.
"""

from __future__ import annotations

import grpc
import pytest
import torch

import modelgraph as mg
from edge_server import servicer as edge_servicer
from edge_server.errors import InvalidArgument
from edge_server.requests import check_input_names
from protos.coinfer.v1 import coinfer_pb2 as pb
from tests.test_server import (
    SMALL,
    Net,
    assert_clean,
    assert_healthy,
    open_msg,
    request_msgs,
    run_session,
    split_of,
    ue_part,
    weight_msgs,
)

INVALID = grpc.StatusCode.INVALID_ARGUMENT.value[0]


@pytest.fixture(scope="module")
def server_options():
    return {"config": SMALL, "threads": 1}  # 2 MiB messages


@pytest.fixture(scope="module")
def user():
    """The user's eager module, its input, the captured graph, a one-input slice and its cut tensors."""
    torch.manual_seed(0)
    net = Net().eval()
    x = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    graph = mg.capture(net, (x,), name="net")
    split, spec = split_of(graph, 3)
    assert len(spec.inputs) == 1
    return net, x, graph, spec, ue_part(graph, split, x)


def begin_with_names(rid: int, names, cut: dict[str, torch.Tensor]) -> list[pb.SessionRequest]:
    """``request_msgs`` with ``input_names`` set on its BeginRequest."""
    msgs = request_msgs(rid, cut)
    msgs[0].begin_request.input_names.extend(names)
    return msgs


def test_input_names_must_name_each_slice_input_once(server, channel, stub, user) -> None:
    """A flood of names (a repeat of the one input, fitting the 2 MiB message limit), too few, a stranger:
    each fails its own request, INVALID_ARGUMENT with the counts or the names; the request with the right
    name and the one with none are answered on the same stream, equal to the user's eager module."""
    net, x, graph, spec, cut = user
    (name,) = cut
    ref = net(x)
    n = (SMALL.max_message_bytes - 4096) // (len(name.encode()) + 2)  # just under the message limit
    flood = [name] * n
    msgs = [open_msg("names", spec), *weight_msgs(graph, spec),
            *begin_with_names(1, flood, cut), *begin_with_names(2, ["ghost"], cut),
            *begin_with_names(3, [name, name], cut), *begin_with_names(4, [name], cut),
            *begin_with_names(5, [], cut)]
    c = run_session(stub, msgs)
    assert sorted(c.failed) == [1, 2, 3], c.failed
    assert all(f.code == INVALID for f in c.failed.values()), c.failed
    assert f"{n} input names" in c.failed[1].message and "takes 1 input" in c.failed[1].message, c.failed[1]
    assert "not inputs ['ghost']" in c.failed[2].message and repr(name) in c.failed[2].message, c.failed[2]
    assert "2 input names" in c.failed[3].message, c.failed[3]
    for rid in (4, 5):
        torch.testing.assert_close(c.outputs[rid][spec.outputs[0]], ref)
    assert_clean(server)
    assert_healthy(channel)


def test_the_names_are_counted_before_any_is_read(user) -> None:
    """The decode keeps the message's names uncopied and the check compares the count first: no name of a
    flood is read (iterated) before it is refused."""
    _, _, _, spec, _ = user

    class Names(list):
        def __iter__(self):
            raise AssertionError("a name was read")

    class Slice:
        slice_id = "s"

    Slice.spec = spec
    with pytest.raises(InvalidArgument, match="1000 input names; slice 's' takes 1 input"):
        check_input_names(7, Names(["x"] * 1000), Slice)
    b = pb.BeginRequest(request_id=1, input_names=["x"] * 1000)
    got = edge_servicer.decode_session_request(pb.SessionRequest(begin_request=b), 1 << 20, 4)
    assert not isinstance(got.input_names, list) and len(got.input_names) == 1000


def test_a_begin_request_reusing_an_id_in_flight_is_refused_and_the_first_completes(server, channel, stub,
                                                                                      user) -> None:
    """A second BeginRequest with the id of a request in flight (here with its cut tensor inline, then the
    same tensor twice more as chunks): that BeginRequest is refused (one RequestFailed, INVALID_ARGUMENT) and
    the request in flight completes with its own answer, equal to the user's eager module; the next request
    runs. Before, the request in flight failed too and never got its answer."""
    from tests.test_inline_tensors import chunk_of

    net, x, graph, spec, cut = user
    (name, t), = cut.items()
    dup = pb.SessionRequest(begin_request=pb.BeginRequest(request_id=1, inputs=[chunk_of(name, torch.zeros_like(t))]))
    msgs = [open_msg("reuse", spec), *weight_msgs(graph, spec), *request_msgs(1, {})[:1], dup,
            *request_msgs(1, cut)[1:], *request_msgs(1, cut)[1:], *request_msgs(2, cut)]
    c = run_session(stub, msgs)
    assert list(c.failed) == [1], c.failed
    assert c.failed[1].code == INVALID and "in flight" in c.failed[1].message, c.failed[1]
    assert 1 in c.done and 2 in c.done, (c.done, c.failed)
    for rid in (1, 2):
        torch.testing.assert_close(c.outputs[rid][spec.outputs[0]], net(x))
    assert_clean(server)
    assert_healthy(channel)
