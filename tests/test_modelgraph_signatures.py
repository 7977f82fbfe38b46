"""Any batch size: one captured graph per input signature, cached; weights shared, slices per signature."""

from __future__ import annotations

import pytest
import torch

from modelgraph import InputSpecError, make_slice, zoo
from modelgraph.execute import run_graph
from modelgraph.signatures import SignatureCache


def test_batch_1_and_4_each_get_their_graph_and_the_model_result():
    m, (x1,) = zoo.chain()
    cache = SignatureCache(m, name="chain")
    g1 = cache.get((x1,))
    with pytest.raises(InputSpecError, match="shape"):
        run_graph(g1, (torch.randn(4, 3, 32, 32),))  # one graph is one signature
    x4 = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    g4 = cache.get((x4,))
    assert g4 is not g1 and cache.misses == 2 and cache.hits == 0
    assert cache.get((torch.zeros(4, 3, 32, 32),)) is g4 and cache.hits == 1
    with torch.no_grad():
        for g, x in ((g1, x1), (g4, x4)):
            torch.testing.assert_close(run_graph(g, (x,)), m(x), rtol=0, atol=0)
    # the server sees two graphs (own hashes: profiled and cached per signature) with the same weights
    assert g1.model_hash != g4.model_hash
    s1, s4 = (make_slice(g, g.split_at(2)) for g in (g1, g4))
    assert s1.graph_hash != s4.graph_hash
    assert {w.sha256 for w in s1.weights.values()} == {w.sha256 for w in s4.weights.values()}


def test_capacity_bounds_the_cache():
    m, (x,) = zoo.chain()
    cache = SignatureCache(m, capacity=1)
    cache.get((x,))
    cache.get((torch.randn(2, 3, 32, 32),))
    assert len(cache) == 1 and cache.misses == 2
    cache.get((x,))  # evicted: captured again
    assert cache.misses == 3 and len(cache.capture_s) == 3


def test_two_threads_capturing_one_module_both_succeed():
    """Two clients built from one module in one process (or one client capturing a new batch size while
    another is being built): each capture's check against the eager module runs the module's forward,
    and ``torch.export`` in the other thread swaps that module's parameters for fake tensors while it
    traces. Without the check under the trace lock, 7 of 12 such captures failed here (AssertionError
    ``fake_mode.in_kernel_invocation``, RuntimeError "Cannot access data pointer of Tensor (e.g.
    FakeTensor ...)", or torch.export's "Unexpected key _export_root...")."""
    import threading

    from modelgraph import capture

    m, (x,) = zoo.chain()
    start = threading.Barrier(2)
    errors: list[str] = []
    graphs: list = []

    def work(k: int) -> None:
        start.wait(timeout=30)
        for i in range(5):
            xb = torch.randn(1 + (i + k) % 3, *x.shape[1:])
            try:
                graphs.append((capture(m, (xb,), name="chain"), xb))
            except Exception as e:  # any failure of a capture is the fault this test is about
                errors.append(f"thread {k} capture {i}: {type(e).__name__}: {str(e)[:120]}")

    threads = [threading.Thread(target=work, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads)
    assert errors == []
    with torch.no_grad():  # after both threads: the user's own eager calls are not the client's to order
        for g, xb in graphs:
            torch.testing.assert_close(run_graph(g, (xb,)), m(xb), rtol=0, atol=0)
