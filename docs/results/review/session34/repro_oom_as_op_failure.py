"""Review repro (session 34, 2e991671): a server-side out-of-memory inside an op reaches a fallback=False
client as ``OpExecutionError`` ("an op failing on the request's data") with no back-off on the server.

``Program.run_op`` (what ``edge_server/requests.py`` run_batch calls) wraps every kernel exception,
``torch.OutOfMemoryError`` included, in ``OpExecutionError`` (``_op_error``): run_batch's
``except torch.OutOfMemoryError: raise`` never sees it, the ``except SliceError`` answers INVALID_ARGUMENT
before the RESOURCE_EXHAUSTED branch, and ``ue_client.request.op_failure`` classifies the answer as the input's
fault. The server's memory pressure is not the request's data.

Run: .venv/bin/python docs/results/review/session34/repro_oom_as_op_failure.py
"""

from __future__ import annotations

import torch

from modelgraph import SliceError
from modelgraph.errors import OpExecutionError
from modelgraph.execute import Program
from ue_client import CoinferClient
from ue_client.errors import RequestFailed
from ue_client.request import op_failure


class _M(torch.nn.Module):
    def forward(self, x):
        return (x * 2).relu()


def main() -> None:
    c = CoinferClient(_M().eval(), (torch.randn(3),))
    graph = c.graph
    prog = Program(tuple(graph.ops), frozenset(o.name for o in graph.ops), torch.device("cpu"), trusted=False)

    def oom(*a, **k):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    prog._fns[0] = oom
    env = {name: torch.randn(meta.shape) for name, meta in graph.inputs.items()}
    try:
        prog.run_op(0, env, {})  # as edge_server/requests.py run_batch calls it
    except SliceError as e:  # what requests.py catches first
        server_msg = f"{type(e).__name__}: {e}"  # edge_server/requests.py: RequestFailed(..., "INVALID_ARGUMENT", ...)
        print("server answers INVALID_ARGUMENT:", server_msg)
    except torch.OutOfMemoryError:
        print("ok: the OOM reaches requests.py's RESOURCE_EXHAUSTED branch")
        return
    err = RequestFailed(f"server: code INVALID_ARGUMENT: {server_msg}", "INVALID_ARGUMENT")  # session.py:949
    got = op_failure(err)
    print("client raises:", type(got).__name__, got)
    if isinstance(got, OpExecutionError):
        print("BUG: the server's OOM is raised as the request's data failing an op, and the server gets no back-off")
    c.close()


if __name__ == "__main__":
    main()
