"""Models written the way users write them (not the way our own zoo is): one per kind of trouble.

Each factory is a model spec ``tests.user_zoo:NAME`` (the repo root on ``PYTHONPATH``) and returns
``(model, example_inputs)`` with a seeded init, so two calls build bit-identical models. ``KINDS``
says what each one exercises and what coinfer must do with it: run it (``"runs"``: every path
returns what ``model(*inputs)`` returns, with the same Python structure) or refuse it with one line
(``"refused"``: the line names the cause).

Input tensors are small (batch 1, 3 x 16 x 16 images, 8-token sequences) so that every model runs
through a real server with several policies in a few seconds.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

SEED = 0


def _gen(seed: int = 1) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _image(batch: int = 1, size: int = 16, seed: int = 1, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=_gen(seed), dtype=dtype)


class _Trunk(nn.Module):
    """conv -> relu -> pool -> flatten -> linear: the body most user models share."""

    def __init__(self, out: int = 10, size: int = 16) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Linear(8 * (size // 2) ** 2, out)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(F.max_pool2d(F.relu(self.conv(x)), 2), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))


# ---- aliased example inputs: the same tensor twice ----------------------------------------------------
class TwoBranch(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fa = nn.Linear(16, 8)
        self.fb = nn.Linear(16, 8)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return self.fa(a) + self.fb(b)


def aliased():
    """``(x, x)``: one tensor as both example inputs. Captured wrong, every split request would
    compute ``fa(b) + fb(b)``-like values for distinct run-time inputs."""
    torch.manual_seed(SEED)
    x = torch.randn(1, 16, generator=_gen())
    return TwoBranch().eval(), (x, x)


def aliased_views():
    """Two overlapping views of one buffer as the example inputs."""
    torch.manual_seed(SEED)
    buf = torch.randn(1, 24, generator=_gen())
    return TwoBranch().eval(), (buf[:, :16], buf[:, 8:])


# ---- output structures ------------------------------------------------------------------------------
class DictOut(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.trunk = _Trunk()

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        feat = self.trunk.features(x)
        return {"logits": self.trunk.fc(feat), "feat": feat}


def dict_out():
    """``{"logits": ..., "feat": ...}`` like torchvision's segmentation models."""
    torch.manual_seed(SEED)
    return DictOut().eval(), (_image(),)


class NestedOut(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.trunk = _Trunk()
        self.aux = nn.Linear(10, 4)

    def forward(self, x: torch.Tensor):
        feat = self.trunk.features(x)
        logits = self.trunk.fc(feat)
        aux = self.aux(logits)
        return {"heads": [logits, (aux, aux.sigmoid())], "extra": {"feat": feat, "scale": 2.0}}


def nested_out():
    """Nested dict / list / tuple output with a non-tensor constant leaf (``scale``) and one tensor
    returned twice (``aux`` inside the tuple next to its own sigmoid)."""
    torch.manual_seed(SEED)
    return NestedOut().eval(), (_image(),)


class NoneLeaf(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.trunk = _Trunk()

    def forward(self, x: torch.Tensor):
        return self.trunk(x), None


def none_leaf():
    """``return self.fc(x), None`` (an optional head that is switched off)."""
    torch.manual_seed(SEED)
    return NoneLeaf().eval(), (_image(),)


# ---- input layouts --------------------------------------------------------------------------------------
class FlattenHead(nn.Module):
    """Flattens its NCHW input straight into a linear layer (``x.flatten(1)``: a view in the graph)."""

    def __init__(self, size: int = 16) -> None:
        super().__init__()
        self.fc = nn.Linear(3 * size * size, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.flatten(1) * 0.5)


def hwc_image(batch: int = 1, size: int = 16, seed: int = 2) -> torch.Tensor:
    """An HWC image batch permuted to NCHW: the values of an NCHW tensor, strides (HWC) of a decoder's."""
    return torch.randn(batch, size, size, 3, generator=_gen(seed)).permute(0, 3, 1, 2)


def noncontig():
    """Captured with a contiguous NCHW input; users feed ``hwc.permute(0, 3, 1, 2)`` (non-contiguous)."""
    torch.manual_seed(SEED)
    return FlattenHead().eval(), (_image(),)


def noncontig_example():
    """The same model with the permuted (non-contiguous) tensor as the example input itself."""
    torch.manual_seed(SEED)
    return FlattenHead().eval(), (hwc_image(),)


class ConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.Conv2d(8, 8, 3, padding=1, groups=2),
            nn.ReLU(),
        )
        self.fc = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.body(x).mean((2, 3)))


def channels_last():
    """A conv net whose example input is in ``torch.channels_last`` memory format."""
    torch.manual_seed(SEED)
    return ConvNet().eval(), (_image().to(memory_format=torch.channels_last),)


# ---- inputs of other kinds --------------------------------------------------------------------------------
VOCAB = 50


class TokenClassifier(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(VOCAB, 16)
        self.fc = nn.Linear(16, 4)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.fc(self.emb(tokens).mean(1))


def tokens(batch: int = 1, length: int = 8, seed: int = 3) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=_gen(seed))


def int_input():
    """int64 token ids into an embedding (a float file for this input must be refused, not cast)."""
    torch.manual_seed(SEED)
    return TokenClassifier().eval(), (tokens(),)


class ImageAndTable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.trunk = _Trunk(out=8)
        self.tab = nn.Linear(5, 8)
        self.emb = nn.Embedding(VOCAB, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, image: torch.Tensor, table: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        return self.head(F.relu(self.trunk(image) + self.tab(table) + self.emb(ids).sum(1)))


def several_inputs():
    """Three inputs of different kinds: an image, a float table row, int ids."""
    torch.manual_seed(SEED)
    return ImageAndTable().eval(), (_image(), torch.randn(1, 5, generator=_gen(4)), tokens(length=4))


class NestedInput(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.trunk = _Trunk(out=8)
        self.tab = nn.Linear(5, 8)
        self.emb = nn.Embedding(VOCAB, 8)

    def forward(self, batch: dict, scale: float = 1.0) -> torch.Tensor:
        table, rest = batch["extra"]
        return (self.trunk(batch["image"]) + self.tab(table) + self.emb(rest["ids"]).mean(1)) * scale


def nested_input():
    """One dict argument holding a list that holds a dict (``{"image", "extra": [table, {"ids"}]}``), and a
    float constant argument."""
    torch.manual_seed(SEED)
    batch = {"image": _image(), "extra": [torch.randn(1, 5, generator=_gen(4)), {"ids": tokens(length=4)}]}
    return NestedInput().eval(), (batch, 0.5)


# ---- ops users hit ----------------------------------------------------------------------------------------
class Top5(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.trunk = _Trunk(out=20)

    def forward(self, x: torch.Tensor):
        return self.trunk(x).softmax(-1).topk(5)


def topk_tail():
    """A classifier that returns its top-5 (values, indices) (``topk`` as the last op)."""
    torch.manual_seed(SEED)
    return Top5().eval(), (_image(),)


class SliceWrite(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.trunk = _Trunk()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.trunk(x)
        y[:, :2] = y[:, :2] * 2.0 + 1.0
        return y


def slice_write():
    """``y[:, :2] = ...`` on an intermediate (functionalised to a slice_scatter)."""
    torch.manual_seed(SEED)
    return SliceWrite().eval(), (_image(),)


OFF_ALLOWLIST = "aten.cumprod.default"
"""An op the server's allowlist does not hold (harmless, but not vetted): ``pinned_mid`` uses it."""


class PinnedMid(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.trunk = _Trunk(out=8)
        self.a = nn.Linear(8, 3)
        self.b = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor):
        h = torch.relu(self.trunk(x))
        return {"a": self.a(torch.cumprod(h, dim=1)).softmax(-1), "b": self.b(h)}


def pinned_mid():
    """An op off the server's allowlist (``cumprod``) in the middle: it and its descendants (head ``a``)
    stay on the UE; the trunk before it and head ``b`` can still go to the server."""
    torch.manual_seed(SEED)
    return PinnedMid().eval(), (_image(),)


class NonZero(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x > 0).nonzero()


def data_dependent_shape():
    """``x.nonzero()``: the output's size depends on the values. Must be refused in one line."""
    return NonZero().eval(), (torch.randn(4, 4, generator=_gen()),)


class Branchy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.fc(x)
        if y.sum() > 0:
            return y.relu()
        return -y


def data_dependent_branch():
    """``if y.sum() > 0:`` (Python control flow on a tensor's value). Must be refused in one line
    that points at ``torch.where`` (not at ``torch.cond``, which is refused too: ``cond_branch``)."""
    torch.manual_seed(SEED)
    return Branchy().eval(), (torch.randn(1, 8, generator=_gen()),)


class CondBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cond(x.sum() > 0, lambda t: self.fc(t).relu(), lambda t: -t, (x,))


class CondNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Linear(8, 8)
        self.head = CondBlock()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.stem(x))


def cond_branch():
    """The branch written with ``torch.cond`` in a submodule (``head``). Must be refused in one line that
    names ``torch.cond`` and the submodule (before: ``unsupported node get_attr true_graph_0``)."""
    torch.manual_seed(SEED)
    return CondNet().eval(), (torch.randn(1, 8, generator=_gen()),)


# ---- batch, dtype, recurrent ------------------------------------------------------------------------------
def batch1():
    """Captured at batch 1; requests also come at batch 4."""
    torch.manual_seed(SEED)
    return ConvNet().eval(), (_image(batch=1),)


def float64():
    """A double-precision model with float64 inputs (a float32 input must be refused, not cast)."""
    torch.manual_seed(SEED)
    return _Trunk().double().eval(), (_image(dtype=torch.float64),)


class LSTMTagger(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(6, 12, num_layers=1, batch_first=True)
        self.fc = nn.Linear(12, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, (h, _c) = self.lstm(x)
        return self.fc(out[:, -1]) + self.fc(h[-1])


def lstm():
    """A one-layer LSTM over an 8-step sequence, classifying from its last output and hidden state."""
    torch.manual_seed(SEED)
    return LSTMTagger().eval(), (torch.randn(1, 8, 6, generator=_gen()),)



# ---- session 11 (attack11): more of what users write ----------------------------------------------------
class _BnBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(8, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn(self.conv(x))
        y.relu_()  # in-place on an intermediate
        y += x
        return y


class ReusedBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.block = _BnBlock()
        self.fc = nn.Linear(8, 10)
        with torch.no_grad():  # batch-norm statistics that are not the identity
            self.block.bn.running_mean.uniform_(-0.5, 0.5, generator=_gen(4))
            self.block.bn.running_var.uniform_(0.5, 2.0, generator=_gen(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.block(self.block(self.stem(x)))  # one module, its weights, called twice
        h.mul_(0.5)
        return self.fc(h.mean((2, 3)))


def reused_block():
    """One block (conv, batch-norm in eval, in-place relu and residual add) applied twice, then an in-place
    scale: the weights are shared by two call sites and the in-place ops act on intermediates only."""
    torch.manual_seed(SEED)
    return ReusedBlock().eval(), (_image(size=8),)


class AliasOut(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(16, 16)

    def forward(self, x: torch.Tensor):
        y = self.fc(x)
        return x, y, y.view(4, 4), y  # the input itself, one output twice, a view of it


def alias_out():
    """Outputs that alias: the model's own input returned, one tensor returned twice and as a view."""
    torch.manual_seed(SEED)
    return AliasOut().eval(), (torch.randn(1, 16, generator=_gen()),)


class BoolHalf(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(16, 8)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, h: torch.Tensor):
        y = self.fc(x)
        y = torch.where(mask, y, -y)
        return y, h * 2 + 1, y > 0, mask.logical_not()


def bool_half():
    """A bool mask and a float16 tensor as inputs, bool and float16 outputs beside float32 ones."""
    torch.manual_seed(SEED)
    g = _gen(6)
    return BoolHalf().eval(), (torch.randn(2, 16, generator=g), torch.rand(2, 8, generator=g) > 0.5,
                               torch.randn(3, generator=g).half())


class ScalarZero(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(16, 8)

    def forward(self, x: torch.Tensor, t: torch.Tensor, empty: torch.Tensor):
        y = self.fc(x) * t
        return torch.cat([y, empty], 0), t * 2, empty + 1, y.sum()


def scalar_zero():
    """A 0-d tensor and a zero-size (0 x 8) tensor as inputs; 0-d and zero-size outputs."""
    torch.manual_seed(SEED)
    return ScalarZero().eval(), (torch.randn(2, 16, generator=_gen(7)), torch.tensor(1.5), torch.zeros(0, 8))


# ---- the table the tests walk ----------------------------------------------------------------------------
KINDS: dict[str, str] = {
    "aliased": "runs",
    "aliased_views": "runs",
    "dict_out": "runs",
    "nested_out": "runs",
    "none_leaf": "runs",
    "noncontig": "runs",
    "noncontig_example": "runs",
    "channels_last": "runs",
    "int_input": "runs",
    "several_inputs": "runs",
    "nested_input": "runs",
    "topk_tail": "runs",
    "pinned_mid": "runs",
    "slice_write": "runs",
    "data_dependent_shape": "refused",
    "data_dependent_branch": "refused",
    "cond_branch": "refused",
    "batch1": "runs",
    "float64": "runs",
    "lstm": "runs",
    "reused_block": "runs",
    "alias_out": "runs",
    "bool_half": "runs",
    "scalar_zero": "runs",
}
"""Factory name -> "runs" (every path equals the eager model) or "refused" (one-line refusal, exit 2)."""

REFUSAL_HINTS: dict[str, str] = {
    "data_dependent_shape": "data-dependent",
    "data_dependent_branch": "torch.where",
    "cond_branch": ".head (CondBlock) uses torch.cond",
}
"""Text the one-line refusal of each refused model must contain."""


def spec(name: str) -> str:
    """The model spec of a factory here, e.g. ``tests.user_zoo:dict_out``."""
    if name not in KINDS:
        raise KeyError(f"no user-zoo model {name!r}")
    return f"tests.user_zoo:{name}"
