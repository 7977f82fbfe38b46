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

import collections
from typing import NamedTuple

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


# ---- session 15 (userzoo): transformers, timm-style blocks, half types, strided outputs ------------------
class _Encoder(nn.Module):
    """``nn.TransformerEncoder`` (2 post-norm layers, GELU) over embedded tokens: in eval under ``no_grad``
    PyTorch runs its native fast path (``_transformer_encoder_layer_fwd``), the capture the math path."""

    def __init__(self, nested: bool = True) -> None:
        super().__init__()
        self.emb = nn.Embedding(VOCAB, 16)
        layer = nn.TransformerEncoderLayer(16, 4, 32, dropout=0.1, activation="gelu", batch_first=True)
        self.enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=nested)
        self.head = nn.Linear(16, 3)

    def forward(self, ids: torch.Tensor, pad: torch.Tensor | None = None) -> torch.Tensor:
        return self.head(self.enc(self.emb(ids), src_key_padding_mask=pad))


def tf_encoder():
    """``nn.TransformerEncoder`` in eval, no padding mask (the fast path and the math path agree within 1e-6)."""
    torch.manual_seed(SEED)
    return _Encoder().eval(), (tokens(batch=2, length=6),)


def _pad_mask(lengths=(6, 4), length: int = 6) -> torch.Tensor:
    return torch.arange(length)[None, :] >= torch.tensor(lengths)[:, None]


def tf_encoder_padded():
    """The same encoder called with a ``src_key_padding_mask`` (built with its default
    ``enable_nested_tensor=True``): in eval under ``no_grad`` PyTorch runs it on nested tensors and returns 0
    at padded positions, while the traced graph (and the same call with grad enabled) computes them. Must be
    refused in one line naming the encoder and the fix, also when the example's mask pads nothing (before:
    captured, and every path answered 1.8 off ``model(x, mask)`` once a request's mask padded)."""
    torch.manual_seed(SEED)
    return _Encoder().eval(), (tokens(batch=2, length=6), torch.zeros(2, 6, dtype=torch.bool))


def tf_encoder_padded_flat():
    """The padded encoder built with ``enable_nested_tensor=False``: eager then computes every position (the
    fast path per layer), equal to the traced graph; runs."""
    torch.manual_seed(SEED)
    return _Encoder(nested=False).eval(), (tokens(batch=2, length=6), _pad_mask())


class MhaMasks(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.mha = nn.MultiheadAttention(16, 4, batch_first=True)
        self.ln = nn.LayerNorm(16)

    def forward(self, x: torch.Tensor, pad: torch.Tensor):
        causal = torch.triu(torch.full((x.shape[1], x.shape[1]), float("-inf")), 1)
        out, w = self.mha(x, x, x, key_padding_mask=pad, attn_mask=causal, need_weights=True)
        return self.ln(out + x), w


def mha_masks():
    """``nn.MultiheadAttention`` with a float causal ``attn_mask`` and a bool ``key_padding_mask``, returning
    the averaged attention weights too."""
    torch.manual_seed(SEED)
    return MhaMasks().eval(), (torch.randn(2, 6, 16, generator=_gen(8)), _pad_mask())


class GptOut(NamedTuple):
    logits: torch.Tensor
    hidden: torch.Tensor
    past: tuple[torch.Tensor, ...] | None


class TinyGpt(nn.Module):
    """A GPT-2-style decoder written as HF users write one: token + positional embeddings (positions a
    non-persistent buffer), pre-LN blocks with causal ``scaled_dot_product_attention``, GELU(tanh), a tied
    LM head, ``forward(input_ids, attention_mask=None, **kwargs)`` returning a NamedTuple."""

    def __init__(self, n_layers: int = 2, d: int = 16, heads: int = 4, ctx: int = 16) -> None:
        super().__init__()
        self.heads = heads
        self.wte = nn.Embedding(VOCAB, d)
        self.wpe = nn.Embedding(ctx, d)
        self.register_buffer("position_ids", torch.arange(ctx)[None], persistent=False)
        self.blocks = nn.ModuleList(
            nn.ModuleDict({"ln1": nn.LayerNorm(d), "qkv": nn.Linear(d, 3 * d), "proj": nn.Linear(d, d),
                           "ln2": nn.LayerNorm(d), "fc": nn.Linear(d, 4 * d), "out": nn.Linear(4 * d, d)})
            for _ in range(n_layers))
        self.ln_f = nn.LayerNorm(d)
        self.lm_head = nn.Linear(d, VOCAB, bias=False)
        self.lm_head.weight = self.wte.weight  # tied

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs) -> GptOut:
        b, t = input_ids.shape
        h = self.wte(input_ids) + self.wpe(self.position_ids[:, :t])
        bias = None
        if attention_mask is not None:  # HF's additive mask: 0 where attended, a large negative where padded
            bias = (1.0 - attention_mask[:, None, None, :].to(h.dtype)) * torch.finfo(h.dtype).min
        for blk in self.blocks:
            q, k, v = blk["qkv"](blk["ln1"](h)).view(b, t, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
            if bias is None:
                a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            else:
                causal = torch.ones(t, t, dtype=torch.bool).tril()
                a = F.scaled_dot_product_attention(q, k, v,
                                                   attn_mask=bias.masked_fill(~causal, torch.finfo(h.dtype).min))
            h = h + blk["proj"](a.transpose(1, 2).reshape(b, t, -1))
            h = h + blk["out"](F.gelu(blk["fc"](blk["ln2"](h)), approximate="tanh"))
        h = self.ln_f(h)
        return GptOut(self.lm_head(h), h, None if not kwargs.get("use_cache") else (h[:, -1:],))


def gpt_causal():
    """``TinyGpt`` on 7 tokens without a mask (``is_causal=True``)."""
    torch.manual_seed(SEED)
    return TinyGpt().eval(), (tokens(batch=2, length=7),)


def gpt_masked():
    """``TinyGpt`` with an ``attention_mask`` keyword (the second sequence padded after 5 tokens)."""
    torch.manual_seed(SEED)
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, 5:] = 0
    return TinyGpt().eval(), (tokens(batch=2, length=7), mask)


class _DropPath(nn.Module):
    """timm's stochastic depth: identity in eval, a per-sample random keep mask in training."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(1 - self.p)
        return x * keep / (1 - self.p)


class TimmBlock(nn.Module):
    """A timm-style block: DropPath and Dropout (identity in eval), a ``torch.jit.is_scripting()`` branch,
    ``torch.no_grad()`` and ``torch.inference_mode()`` regions inside forward, a LayerScale parameter."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(16)
        self.mlp = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Dropout(0.2), nn.Linear(32, 16))
        self.gamma = nn.Parameter(torch.full((16,), 0.5))
        self.drop_path = _DropPath(0.1)
        self.head = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        if torch.jit.is_scripting():
            return {"logits": self.head(x.mean(1))}
        x = x + self.drop_path(self.gamma * self.mlp(self.norm(x)))
        with torch.no_grad():
            pooled = x.mean(1)
        with torch.inference_mode():
            probs = self.head(pooled).softmax(-1)
        return {"logits": self.head(pooled), "probs": probs}


def timm_block():
    """``TimmBlock`` over (2, 6, 16) tokens."""
    torch.manual_seed(SEED)
    return TimmBlock().eval(), (torch.randn(2, 6, 16, generator=_gen(9)),)


class HalfMlp(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(16, 32), nn.GELU(approximate="tanh"), nn.LayerNorm(32), nn.Linear(32, 8))

    def forward(self, x: torch.Tensor):
        y = self.body(x)
        return y, y.argmax(-1), y.softmax(-1).max(-1)


def bf16_mlp():
    """A bfloat16 model (weights and inputs), returning int64 argmax indices and a max's (values, indices)."""
    torch.manual_seed(SEED)
    return HalfMlp().to(torch.bfloat16).eval(), (torch.randn(3, 16, generator=_gen(10)).to(torch.bfloat16),)


def fp16_mlp():
    """The same model in float16."""
    torch.manual_seed(SEED)
    return HalfMlp().half().eval(), (torch.randn(3, 16, generator=_gen(10)).half(),)


class MixedHead(nn.Module):
    """A float32 conv trunk with a float16 head: the cut between them carries float16 or float32."""

    def __init__(self) -> None:
        super().__init__()
        self.trunk = _Trunk(out=16)
        self.head = nn.Linear(16, 4).half()

    def forward(self, x: torch.Tensor):
        h = self.trunk(x).relu()
        y = self.head(h.half())
        return y.float().log_softmax(-1), y


def mixed_head():
    """float32 trunk, float16 head, float32 and float16 outputs."""
    torch.manual_seed(SEED)
    return MixedHead().eval(), (_image(),)


class Spectral(nn.Module):
    """A complex intermediate (``torch.fft.rfft``, off the server's allowlist: pinned on the UE) between
    float ops, and a complex output."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(16, 16)
        self.out = nn.Linear(9, 4)

    def forward(self, x: torch.Tensor):
        z = torch.fft.rfft(self.fc(x), dim=-1)
        return self.out(z.abs()), z


def complex_fft():
    """``Spectral`` on (2, 16) rows."""
    torch.manual_seed(SEED)
    return Spectral().eval(), (torch.randn(2, 16, generator=_gen(11)),)


class StridedOut(nn.Module):
    """Outputs whose strides a user can see: a transpose, an expand, a step slice, channels_last."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x: torch.Tensor):
        y = self.conv(x)
        z = y.flatten(2)
        return z.transpose(1, 2), z[:, :1].expand(-1, 3, -1), y[:, :, ::2], y.relu().contiguous(
            memory_format=torch.channels_last)


def strided_out():
    """``StridedOut`` on a (2, 3, 8, 8) image."""
    torch.manual_seed(SEED)
    return StridedOut().eval(), (_image(batch=2, size=8),)


class Noisy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x) + 1e-6 * torch.randn_like(x)  # tiny: within the capture check's tolerance


def random_in_forward():
    """``torch.randn_like`` in forward (noise small enough to pass the capture's comparison with eager): no
    path can give eager's draw, nor one path another's; must be refused naming the random op."""
    torch.manual_seed(SEED)
    return Noisy().eval(), (torch.randn(2, 8, generator=_gen(12)),)


class MaxNormEmbedding(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(VOCAB, 8, max_norm=1.0)
        self.fc = nn.Linear(8, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.fc(self.emb(ids).mean(1))


def embedding_max_norm():
    """``nn.Embedding(max_norm=1.0)`` renormalises the rows it reads in place on every forward (a parameter
    mutation): refused in one line naming the parameter and the fix (before: "has a PARAMETER_MUTATION output")."""
    torch.manual_seed(SEED)
    return MaxNormEmbedding().eval(), (tokens(),)


KINDS.update({
    "tf_encoder": "runs",
    "tf_encoder_padded": "refused",
    "tf_encoder_padded_flat": "runs",
    "mha_masks": "runs",
    "gpt_causal": "runs",
    "gpt_masked": "runs",
    "timm_block": "runs",
    "bf16_mlp": "runs",
    "fp16_mlp": "runs",
    "mixed_head": "runs",
    "complex_fft": "runs",
    "strided_out": "runs",
    "random_in_forward": "refused",
    "embedding_max_norm": "refused",
})
REFUSAL_HINTS.update({
    "tf_encoder_padded": "enable_nested_tensor=False",
    "random_in_forward": "random",
    "embedding_max_norm": "changes its parameter 'emb.weight'",
})
SESSION15 = ("tf_encoder", "tf_encoder_padded", "tf_encoder_padded_flat", "mha_masks", "gpt_causal", "gpt_masked",
             "timm_block", "bf16_mlp", "fp16_mlp", "mixed_head", "complex_fft", "strided_out", "random_in_forward",
             "embedding_max_norm")
"""The models session 15 added (``tests/test_user_zoo_splits.py`` runs them over many partitions)."""


# ---- session 16 (newuser16): TorchScript modules --------------------------------------------------------------
class _Small(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(16, 8)

    def forward(self, x):
        return torch.relu(self.fc(x))


class ScriptedPart(nn.Module):
    """A Python model with one block given to ``torch.jit.script`` (users script a block for speed)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Linear(16, 16)
        self.block = torch.jit.script(_Small())

    def forward(self, x):
        return self.block(self.stem(x))


def torchscript():
    """A model given to ``torch.jit.script``: refused naming it (before: a TypeError about 'OrderedModuleDict')."""
    torch.manual_seed(SEED)
    return torch.jit.script(_Small().eval()), (torch.randn(2, 16, generator=_gen(16)),)


def traced_module():
    """A model given to ``torch.jit.trace``: refused the same way."""
    torch.manual_seed(SEED)
    x = torch.randn(2, 16, generator=_gen(16))
    return torch.jit.trace(_Small().eval(), (x,)), (x,)


def scripted_submodule():
    """A Python model holding a scripted block: refused naming the block (``.block``)."""
    torch.manual_seed(SEED)
    return ScriptedPart().eval(), (torch.randn(2, 16, generator=_gen(16)),)


KINDS.update({"torchscript": "refused", "traced_module": "refused", "scripted_submodule": "refused"})
REFUSAL_HINTS.update({
    "torchscript": "is a TorchScript module (RecursiveScriptModule",
    "traced_module": "is a TorchScript module (TopLevelTracedModule",
    "scripted_submodule": ".block is a TorchScript module (RecursiveScriptModule",
})


# ---- session 16 (newuser16): a ModelOutput-like class registered as a pytree without key paths ------------------
class Outputs(collections.OrderedDict):
    """What users write after transformers' ``ModelOutput``: a dict with attribute access, registered with
    ``torch.utils._pytree.register_pytree_node(cls, flatten, unflatten)`` (no ``flatten_with_keys_fn``)."""

    def __getattr__(self, k):
        try:
            return self[k]
        except KeyError as e:
            raise AttributeError(k) from e


torch.utils._pytree.register_pytree_node(
    Outputs, lambda d: (list(d.values()), list(d.keys())), lambda values, keys: Outputs(zip(keys, values)))


class RegisteredIO(nn.Module):
    """Takes a dict batch and returns an ``Outputs``; capture ended in torch's "Did not find a flatten_with_keys_fn"
    ValueError from naming the output's leaves (after torch.export had captured it). As an *input* such a class
    is refused by torch.export itself, naming the fix (``flatten_with_keys_fn``)."""

    def __init__(self):
        super().__init__()
        self.enc = nn.Linear(16, 16)
        self.head = nn.Linear(16, 4)

    def forward(self, batch):
        h = torch.tanh(self.enc(batch["x"])) * batch["scale"]
        return Outputs(logits=self.head(h), hidden=h)


def registered_io():
    torch.manual_seed(SEED)
    batch = {"x": torch.randn(3, 16, generator=_gen(17)), "scale": torch.rand(3, 1, generator=_gen(18))}
    return RegisteredIO().eval(), (batch,)


KINDS.update({"registered_io": "runs"})
SESSION16 = ("registered_io",)
"""The models session 16 added that run (``tests/test_user_zoo_splits.py`` runs them over many partitions)."""
