"""Weights changed through ``.data`` after the client was built (break31 F1, session 30).

A write through ``param.data`` does not move the parameter's version counter, so ``WeightWatch`` saw none of
these and the server kept the bytes it was sent: before session 30, offloaded answers were 0.25-1.78 off the
user's ``model(x)`` with no error, while local ones equalled it. Now each is refused with an ``InputError``
naming the weight (``ue_client.weight_values.ValueCheck``): the sampled check sees a whole tensor, a row or a
column changed; ``weight_check="full"`` sees any byte.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from tests.checks import FAST_LINK, warm_client
from ue_client import CoinferClient, InputError, new_tenant
from ue_client.verify import max_abs_diff
from ue_client.weight_values import SAMPLE_MAX, ValueCheck


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2)).eval()


def _writes():
    """(name, the write): the idioms users write through ``.data`` (EMA and target networks, WGAN clipping,
    pruning, re-initialisation, batch-norm statistics set by hand)."""
    yield "mul", lambda m: m[0].weight.data.mul_(2)
    yield "ema_copy", lambda m: m[0].weight.data.copy_(0.9 * m[0].weight.data + 0.1 * torch.randn(8, 4))
    yield "clamp", lambda m: m[0].weight.data.clamp_(-0.01, 0.01)
    yield "running_mean_fill", lambda m: m[1].running_mean.data.fill_(3.0)
    yield "row_zeroed", lambda m: m[0].weight.data.__setitem__(5, 0.0)
    yield "column_zeroed", lambda m: m[3].weight.data[:, 6].zero_()
    yield "bias_element", lambda m: m[3].bias.data.__setitem__(1, 7.0)
    yield "numpy_view", lambda m: m[0].weight.detach().numpy().__setitem__((slice(None), 2), 0.0)


WRITES = dict(_writes())


@pytest.mark.parametrize("write", list(WRITES))
@pytest.mark.parametrize("policy", ["local", "offload"])
def test_a_write_through_data_is_refused_not_answered_from_stale_server_weights(server, policy: str,
                                                                                  write: str) -> None:
    module = _model()
    x = torch.randn(3, 4)
    with warm_client(server, module, x, policy) as (c, y):
        WRITES[write](module)
        with torch.inference_mode():
            assert max_abs_diff(y, module(x)) > 1e-3  # the user's answer moved: an unrefused call would be wrong
        with pytest.raises(InputError, match=r"was changed without a version bump \(through \.data"):
            c(x)


@pytest.mark.parametrize("policy", ["local", "offload"])
def test_one_element_changed_through_data_is_refused_with_the_full_check(server, policy: str) -> None:
    torch.manual_seed(1)
    module = nn.Sequential(nn.Linear(512, 256), nn.ReLU(), nn.Linear(256, 4)).eval()
    x = torch.randn(2, 512)
    sample = ValueCheck([("w", module[0].weight.detach())])
    index = next(i for i in range(1, 512) if not _sampled(sample, 0, i))  # an element the sample skips
    with CoinferClient(module, (x,), server=server.address, policy=policy, link=FAST_LINK, tenant=new_tenant(),
                       profile_runs=2, fallback=False, weight_check="full") as c:
        c(x)
        module[0].weight.data[0, index] += 1.0
        with pytest.raises(InputError, match=r"'0\.weight' was changed without a version bump"):
            c(x)


def _sampled(check: ValueCheck, row: int, col: int) -> bool:
    """Whether ``check``'s sample of its first tensor (2-D, contiguous) reads element [row, col]."""
    view = next(iter(check._views.values()))[0]
    cols = check._tensors[0].shape[1]
    return row * cols + col in {i * view.stride(0) for i in range(view.numel())}


@pytest.mark.parametrize("shape", [(300, 128), (64, 4096), (256, 256, 3, 3), (8192, 256), (30522, 768), (5, 7),
                                   (3, 1000003), (2048,)])
def test_the_sample_reads_every_row_and_every_column(shape: tuple[int, ...]) -> None:
    """break32 G2: one sample per row at a step of row length - 1 read a band of ``rows`` columns only (a conv's
    input channels 227-255 of 256: zeroing channel 10 answered 0.002 off eager through the server, no error) and 1
    row in 7 of a 30,522-row embedding (a textual-inversion row write: 0.25 off)."""
    check = ValueCheck([("w", torch.empty(shape))])
    view = next(iter(check._views.values()))[0]
    positions = torch.arange(view.numel()) * view.stride(0)
    rows = shape[0] if len(shape) > 1 else 1
    row = math.prod(shape) // rows
    if max(rows, row) > SAMPLE_MAX:  # past the cap: SAMPLE_MAX of them, spread
        assert view.numel() >= SAMPLE_MAX and len(set((positions % row).tolist())) >= min(row, SAMPLE_MAX) // 2
        return
    assert set((positions // row).tolist()) == set(range(rows))
    assert set((positions % row).tolist()) == set(range(row))


def test_a_write_through_data_after_share_memory_is_refused(server) -> None:
    """break32 G1: a storage that moved whole (``share_memory()``) re-based the value check before comparing, so a
    ``.data`` write made with (or before) the move became the baseline: 0.129 off eager, no error, both modes."""
    torch.manual_seed(2)
    module = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 3)).eval()
    x = torch.randn(1, 3, 12, 12)
    for check in ("sampled", "full"):
        with CoinferClient(module, (x,), server=server.address, policy="offload", link=FAST_LINK,
                           tenant=new_tenant(), profile_runs=2, fallback=False, weight_check=check) as c:
            c(x)
            module.share_memory()
            module[0].weight.data.mul_(2)
            with pytest.raises(InputError, match=r"'0\.weight' was changed without a version bump"):
                c(x)
            module[0].weight.data.div_(2)
            c(x)  # the moved storage with its values back: answered (the check reads the moved storage)
            module[2].bias.data.add_(1)  # a later write, after the move was taken
            with pytest.raises(InputError, match=r"'2\.bias' was changed without a version bump"):
                c(x)
            module[2].bias.data.sub_(1)


@pytest.mark.parametrize("layout", ["contiguous", "transposed", "channels_last", "sliced", "scalar", "nan"])
def test_value_check_sees_a_change_in_every_layout_and_not_an_unchanged_tensor(layout: str) -> None:
    base = torch.randn(16, 8, 5, 5)
    t = {"contiguous": base, "transposed": base[:, :, 0, 0].t(), "scalar": torch.tensor(3.0),
         "channels_last": base.contiguous(memory_format=torch.channels_last), "sliced": base[::2, 1:],
         "nan": torch.full((6, 6), float("nan"))}[layout]
    check = ValueCheck([("t", t)])
    assert check.unchanged() and check.changed() is None  # NaN compares equal to itself byte for byte
    t.data.mul_(-2.0) if layout != "nan" else t.data.fill_(1.0)
    assert not check.unchanged() and check.changed() == "t"


def test_the_first_changed_tensor_is_named_among_many_of_two_dtypes() -> None:
    tensors = [(f"t{i}", torch.randn(7, i + 1)) for i in range(20)] + [("steps", torch.tensor(5))]
    check = ValueCheck(tensors)
    tensors[13][1].data[3].zero_()
    assert check.changed() == "t13"
    tensors[13][1].data[3] = 1.0
    check = ValueCheck(tensors)
    tensors[-1][1].data += 1
    assert check.changed() == "steps"


def test_weight_check_is_validated() -> None:
    with pytest.raises(InputError, match="weight_check must be one of sampled, full"):
        CoinferClient(_model(), (torch.randn(3, 4),), weight_check="exact")


def _layouts():
    """(name, a float64 tensor whose values are their own logical flat index) in the layouts weights come in."""
    def indexed(shape):
        return torch.arange(math.prod(shape), dtype=torch.float64).reshape(shape)

    yield "contiguous", indexed((300, 200))
    yield "tf_kernel_t", indexed((5, 768)).t().contiguous().t()  # a [768, 5] kernel loaded with .t()
    yield "tf_hwio_permute", indexed((64, 3, 7, 7)).permute(2, 3, 1, 0).contiguous().permute(3, 2, 0, 1)
    yield "channels_last", indexed((256, 64, 3, 3)).contiguous(memory_format=torch.channels_last)
    yield "fused_slice", torch.cat([indexed((768, 768)), torch.zeros(768, 1536, dtype=torch.float64)], 1)[:, :768]
    gap = torch.zeros(200, 50, dtype=torch.float64)
    yield "fused_slice_t", torch.cat([indexed((300, 200)).t(), gap], 1)[:, :300].t()
    yield "expanded", indexed((1, 5000)).expand(40, 5000)
    yield "small", indexed((16, 16))


@pytest.mark.parametrize("name", [n for n, _ in _layouts()])
def test_the_sample_reads_every_index_of_every_dimension_in_any_layout(name: str) -> None:
    """break33 V1: rows were taken from ``shape[0]`` while a dense sample walked the storage, so a transposed or
    permuted weight (TF / JAX kernels loaded with ``.t()`` / ``.permute``) had its samples in one logical row (a class
    row doubled: 1.48 off eager, no error), and a slice of a fused weight read a few columns (0.081 off)."""
    t = dict(_layouts())[name]
    check = ValueCheck([("t", t)])
    joined, gapped, _ = check._reference
    values = (gapped[0] if gapped else joined[torch.float64]).view(torch.float64).long()
    assert (values >= 0).all()
    if name == "expanded":  # overlapping: the values are the one row's
        assert set(values.tolist()) == set(range(5000))
        return
    idx = torch.stack(torch.unravel_index(values, t.shape), 1)
    for d, size in enumerate(t.shape):
        assert set(idx[:, d].tolist()) == set(range(size)), (name, d)
    if name == "small":
        assert values.numel() == 256


@pytest.mark.parametrize("name,write", [
    ("tf_kernel_t", lambda t: t.data[3].mul_(2)),
    ("tf_hwio_permute", lambda t: t.data[5].zero_()),
    ("fused_slice", lambda t: t.data[:, 100].zero_()),
    ("small", lambda t: t.data[3, 5].add_(1)),
])
def test_a_write_through_data_in_another_layout_is_seen(name: str, write) -> None:
    t = dict(_layouts())[name].float() if name == "small" else dict(_layouts())[name]
    t = t + 1 if name == "tf_hwio_permute" else t  # no zero channel to begin with (layout kept: elementwise)
    check = ValueCheck([("t", t)])
    write(t)
    assert check.changed() == "t"
