"""``aten.max_pool2d`` through the channels-last CPU kernel (``modelgraph.execute.max_pool2d_channels_last``):
the same bits as the op itself, on every input the executor hands it, and the executor (UE and server) uses it."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from modelgraph import Program, capture, run_graph
from modelgraph.execute import max_pool2d_channels_last

op = torch.ops.aten.max_pool2d.default


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int32 if t.element_size() == 4 else torch.int64 if t.element_size() == 8
                               else torch.int16)


def _nasty(shape, dtype, seed) -> torch.Tensor:
    """Random values with NaN, +0, -0 and -inf sprinkled in (the max's edge cases)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g).to(dtype)
    m = torch.rand(shape, generator=g)
    x[m < 0.05] = float("nan")
    x[(m >= 0.05) & (m < 0.15)] = 0.0
    x[(m >= 0.15) & (m < 0.25)] = -0.0
    x[(m >= 0.25) & (m < 0.3)] = float("-inf")
    return x


CONFIGS = [  # kernel, stride, padding, dilation, ceil_mode
    ([3, 3], [2, 2], [0, 0], [1, 1], True),   # googlenet's
    ([3, 3], [2, 2], [1, 1], [1, 1], False),  # resnet's stem
    ([3, 3], [1, 1], [1, 1], [1, 1], True),   # googlenet's inception branch
    ([2, 2], [2, 2], [0, 0], [1, 1], False),
    ([3, 2], [2, 1], [1, 0], [2, 1], True),
    ([1, 1], [1, 1], [0, 0], [1, 1], False),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("cfg", CONFIGS)
def test_bitwise_equal_to_the_op(cfg, dtype) -> None:
    for seed, shape in enumerate([(1, 64, 28, 28), (2, 3, 13, 17), (1, 5, 7, 9), (3, 16, 8, 8)]):
        x = _nasty(shape, dtype, seed)
        want = op(x, *cfg)
        got = max_pool2d_channels_last(x, *cfg)
        assert got.shape == want.shape and got.dtype == want.dtype
        assert got.is_contiguous() and got.stride() == want.stride()  # the layout the NCHW kernel returns
        assert torch.equal(_bits(got), _bits(want)), (cfg, dtype, shape)


def test_other_inputs_run_the_op_as_it_is() -> None:
    x = _nasty((2, 8, 9, 9), torch.float32, 7)
    cfg = CONFIGS[0]
    cl = x.contiguous(memory_format=torch.channels_last)
    perm = x.permute(0, 1, 3, 2)  # neither layout
    three = x[0]  # 3-d (C, H, W)
    for t in (cl, perm, three, x.to(torch.bfloat16)):  # (bf16's channels-last kernel: NaN in other bits)
        want = op(t, *cfg)
        got = max_pool2d_channels_last(t, *cfg)
        assert got.stride() == want.stride() and torch.equal(_bits(got), _bits(want))
    # the input passed by keyword
    assert torch.equal(_bits(max_pool2d_channels_last(self=x, kernel_size=[3, 3], stride=[2, 2], ceil_mode=True)),
                       _bits(op(x, [3, 3], [2, 2], [0, 0], [1, 1], True)))
    # errors are the op's own
    with pytest.raises(RuntimeError):
        max_pool2d_channels_last(x, [3, 3], [2, 2], [5, 5], [1, 1], False)  # padding > half the kernel


class _Pools(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3)

    def forward(self, x):
        y = F.max_pool2d(F.relu(self.conv(x)), 3, 2, ceil_mode=True)
        return F.max_pool2d(y, 3, 1, 1) + 1


def test_the_executor_pools_through_it_and_equals_the_module() -> None:
    torch.manual_seed(0)
    m = _Pools().eval()
    x = torch.randn(2, 3, 31, 29)
    g = capture(m, (x,))
    prog = Program(g.ops, frozenset(g.outputs), trusted=True)
    pools = [i for i, o in enumerate(g.ops) if o.target == "aten.max_pool2d.default"]
    assert len(pools) == 2 and all(prog._fns[i] is max_pool2d_channels_last for i in pools)
    got = run_graph(g, (x,))
    with torch.inference_mode():
        want = m(x)
    assert torch.equal(got, want)


def test_the_server_budgets_the_two_copies() -> None:
    """The server's per-op scratch estimate counts the channels-last copy of the input and of the output."""
    from edge_server.op_budget import estimate_op
    from modelgraph import TensorMeta

    m = _Pools().eval()
    g = capture(m, (torch.randn(2, 3, 31, 29),))
    pool = next(o for o in g.ops if o.target == "aten.max_pool2d.default")
    x, out = TensorMeta((2, 8, 29, 27), "float32"), TensorMeta((2, 8, 14, 13), "float32")
    cost = estimate_op(pool, [x, [3, 3], [2, 2], [0, 0], [1, 1], True], {}, (out,), torch.device("cpu"))
    assert cost.workspace_bytes == (2 * 8 * 29 * 27 + 2 * 8 * 14 * 13) * 4


class _UserPools(torch.nn.Module):
    """A user's model of max pools: ceil_mode, padding, dilation, return_indices, a strided view's pool,
    outputs in a dict / tuple / list with a ``None`` leaf."""

    def __init__(self, dtype: torch.dtype) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3).to(dtype)

    def forward(self, x):
        y = self.conv(x)
        a, i = F.max_pool2d(y, 3, 2, padding=1, dilation=2, ceil_mode=True, return_indices=True)
        b = F.max_pool2d(y[:, :, ::2], (2, 3), (1, 2), padding=(1, 1), ceil_mode=True)
        return {"a": a, "i": i, "rest": (b, [F.max_pool2d(y.transpose(2, 3), 2), None])}


class _Pool3d(torch.nn.Module):  # a 3-d (C, H, W) input
    def forward(self, x):
        p, i = F.max_pool2d(x * 2, 3, 2, padding=1, ceil_mode=True, return_indices=True)
        return p, i, F.max_pool2d(x, 2, dilation=2)


def _same(a, b) -> None:
    from torch.utils._pytree import tree_flatten

    fa, sa = tree_flatten(a)
    fb, sb = tree_flatten(b)
    assert sa == sb, (sa, sb)
    for x, y in zip(fa, fb, strict=True):
        if x is None or y is None:
            assert x is None and y is None, (x, y)
            continue
        assert x.dtype == y.dtype and x.shape == y.shape, (x.dtype, x.shape, y.dtype, y.shape)
        assert torch.equal(_bits(x), _bits(y)), (x, y)


def test_a_users_max_pools_offloaded_and_split_equal_its_eager_model_bit_for_bit() -> None:
    """Through ``CoinferClient`` against a real server, every op offloaded and a fixed split, cold and warm:
    float32/float64, contiguous, channels_last, non-contiguous and 3-d inputs with NaN/+-0/-inf; each output
    has the eager model's structure and bits (session 10's break11 check of the channels-last pooling)."""
    from edge_server.testing import ServerThread
    from ue_client import CoinferClient, new_tenant

    cases = []
    for dtype in (torch.float32, torch.float64):
        x = _nasty((2, 3, 17, 19), dtype, 1)
        cases += [(_UserPools(dtype), x), (_UserPools(dtype), x.to(memory_format=torch.channels_last)),
                  (_UserPools(dtype), _nasty((2, 3, 19, 17), dtype, 2).transpose(2, 3)),
                  (_Pool3d(), _nasty((4, 9, 9), dtype, 3))]
    with ServerThread(threads=1, cache_mb=64) as srv:
        for net, x in cases:
            for fixed in (None, 1):
                with CoinferClient(net.eval(), (x,), server=srv.address, policy="offload", server_ops=fixed,
                                   link={"uplink_mbps": 400.0, "rtt_ms": 2.0}, tenant=new_tenant(),
                                   fallback=False) as c:
                    for k in range(2):
                        xk = x if k == 0 else _nasty(x.shape, x.dtype, 10 + k).as_strided(x.shape, x.stride())
                        y = c(xk)
                        assert not c.last_report.fallback and c.last_report.server_ops > 0, c.last_report
                        _same(y, net(xk))
