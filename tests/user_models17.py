"""Session 17 (newuser17): models written as users write them, one per habit the earlier zoos did not have.

Each factory returns ``(module, args, kwargs)`` with a seeded init (two calls build bit-identical models) and
small inputs, so that a real server runs every one over several fixed partitions in about a second.
``tests/test_user_models17.py`` runs them cold and warm and compares every answer with the user's own eager
``module(*args, **kwargs)``: structure, output classes, dtypes, shapes, strides and values.
"""

from __future__ import annotations

import collections
import dataclasses
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrizations


def _g(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---- HF-style outputs: a dataclass registered as a pytree, OrderedDict, namedtuple -------------------------
@dataclasses.dataclass
class EncoderOutput:
    """A plain dataclass output, registered the documented way (``torch.export.register_dataclass``)."""

    last_hidden_state: torch.Tensor
    pooler_output: torch.Tensor
    attentions: torch.Tensor | None = None


torch.export.register_dataclass(EncoderOutput, serialized_type_name="tests.user_models17.EncoderOutput")


class HFEncoder(nn.Module):
    """``forward(input_ids, attention_mask=None, token_type_ids=None, output_attentions=False)`` as in
    transformers: embeddings (word + position from ``torch.arange`` + token type from ``zeros_like``), an
    additive mask built with ``torch.full(..., dtype=, device=)`` and ``torch.finfo(dtype).min``, one
    ``nn.MultiheadAttention`` layer, a tanh pooler; returns the dataclass."""

    def __init__(self, vocab: int = 50, dim: int = 16, max_len: int = 32) -> None:
        super().__init__()
        self.word = nn.Embedding(vocab, dim)
        self.pos = nn.Embedding(max_len, dim)
        self.tok = nn.Embedding(2, dim)
        self.ln = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, 2, batch_first=True)
        self.ff = nn.Sequential(nn.Linear(dim, 32), nn.GELU(), nn.Linear(32, dim))
        self.pool = nn.Linear(dim, dim)

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, output_attentions=False):
        b, n = input_ids.shape
        pos = torch.arange(n, device=input_ids.device).unsqueeze(0).expand(b, n)
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        h = self.ln(self.word(input_ids) + self.pos(pos) + self.tok(token_type_ids))
        if attention_mask is None:
            attention_mask = torch.ones(b, n, dtype=torch.long, device=input_ids.device)
        neg = torch.full((b, n), torch.finfo(h.dtype).min, dtype=h.dtype, device=h.device)
        add = torch.where(attention_mask.bool(), torch.zeros_like(neg), neg)
        a, w = self.attn(h, h, h, attn_mask=None, key_padding_mask=add, need_weights=output_attentions)
        h = h + a
        h = h + self.ff(h)
        return EncoderOutput(h, torch.tanh(self.pool(h[:, 0])), w if output_attentions else None)


def hf_dataclass():
    torch.manual_seed(1)
    ids = torch.randint(0, 50, (2, 6), generator=_g(1))
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]])
    return HFEncoder().eval(), (ids,), {"attention_mask": mask, "output_attentions": True}


class Heads(nn.Module):
    """Returns an ``OrderedDict`` whose keys are not sorted (order matters to users who unpack it)."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(12, 24), nn.ReLU())
        self.cls = nn.Linear(24, 3)
        self.box = nn.Linear(24, 4)

    def forward(self, x):
        h = self.body(x)
        return collections.OrderedDict([("zeta", self.box(h)), ("alpha", self.cls(h).softmax(-1)), ("n", 3)])


def ordered_dict_out():
    torch.manual_seed(2)
    return Heads().eval(), (torch.randn(5, 12, generator=_g(2)),), {}


class Pred(NamedTuple):
    logits: torch.Tensor
    labels: torch.Tensor
    confident: torch.Tensor


class Classifier(nn.Module):
    """A namedtuple of float, int64 (argmax) and bool outputs; a scalar (0-d) loss-like mean besides."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))

    def forward(self, x):
        logits = self.net(x)
        p = logits.softmax(-1)
        return Pred(logits, p.argmax(-1), p.max(-1).values > 0.4), p.max(-1).values.mean()


def namedtuple_out():
    torch.manual_seed(3)
    return Classifier().eval(), (torch.randn(6, 8, generator=_g(3)),), {}


# ---- dict inputs, kwargs, optional None -------------------------------------------------------------------
class DictBatch(nn.Module):
    """``forward(batch, *, extra=None, scale=1.0)``: a dict of an image and int64 labels-like ids, an optional
    tensor passed or left None."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.emb = nn.Embedding(10, 4)
        self.out = nn.Linear(4, 2)

    def forward(self, batch, *, extra=None, scale=1.0):
        f = self.conv(batch["image"]).mean((2, 3)) + self.emb(batch["ids"]).sum(1)
        if extra is not None:
            f = f + extra
        return {"y": self.out(f) * scale, "ids": batch["ids"]}


def dict_kwargs():
    torch.manual_seed(4)
    batch = {"image": torch.randn(2, 3, 8, 8, generator=_g(4)), "ids": torch.randint(0, 10, (2, 3), generator=_g(5))}
    return DictBatch().eval(), (batch,), {"extra": torch.randn(2, 4, generator=_g(6))}


def dict_kwargs_none():
    m, (batch,), _ = dict_kwargs()
    return m, (batch,), {"extra": None, "scale": 2.0}


# ---- in-place ops on views, no_grad inside forward ---------------------------------------------------------
class InPlaceViews(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(8, 8)
        self.b = nn.Linear(8, 8)

    def forward(self, x):
        h = self.a(x)
        h[:, :3].mul_(2.0)  # in-place on a slice view of an intermediate
        v = h.view(-1, 2, 4)
        v[:, 0].add_(1.0)
        with torch.no_grad():
            g = self.b(h).relu_()
        g.transpose(0, 1)[0].zero_()  # in-place through a transposed view
        return g, h


def inplace_views():
    torch.manual_seed(5)
    return InPlaceViews().eval(), (torch.randn(4, 8, generator=_g(7)),), {}


# ---- BatchNorm left in train mode (the capture switches it to eval), hooks ---------------------------------
class HookedNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.head = nn.Linear(6, 3)
        self.conv.register_forward_pre_hook(lambda mod, args: (args[0] * 0.5,))
        self.bn.register_forward_hook(lambda mod, args, out: out.clamp(min=-1.0))

    def forward(self, x):
        return self.head(F.relu(self.bn(self.conv(x))).mean((2, 3)))


def hook_records_on_module():
    """A forward hook that appends each output's shape to a list on the module: the client cannot make the
    user's list grow as ``model(x)`` does, so the capture refuses it naming the attribute."""
    m, a, k = hooks_bn_train()
    m.feats = []
    m.head.register_forward_hook(lambda mod, args, out: m.feats.append(out.shape) or None)
    return m, a, k


def hooks_bn_train():
    torch.manual_seed(6)
    m = HookedNet()  # left in training mode on purpose: the capture switches it to eval
    with torch.no_grad():
        m.bn.running_mean.uniform_(-0.5, 0.5, generator=_g(8))
        m.bn.running_var.uniform_(0.5, 2.0, generator=_g(9))
    return m, (torch.randn(2, 3, 8, 8, generator=_g(10)),), {}


# ---- dtypes in and out, scalar outputs ---------------------------------------------------------------------
class Dtypes(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4).half()

    def forward(self, x16, idx, keep):
        y = self.fc(x16)
        y = torch.where(keep.unsqueeze(-1), y, torch.zeros((), dtype=y.dtype))
        picked = y.float().gather(1, idx.unsqueeze(-1)).squeeze(-1)
        return y, picked.sum(), idx * 2 + 1, keep.logical_not(), picked.argmax()


def dtypes_scalars():
    torch.manual_seed(7)
    x = torch.randn(3, 4, generator=_g(11)).half()
    return Dtypes().eval(), (x, torch.tensor([0, 3, 1]), torch.tensor([True, False, True])), {}


# ---- channels_last and non-contiguous ----------------------------------------------------------------------
class ConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1, groups=2)

    def forward(self, x):
        h = F.relu(self.bn(self.c1(x)))
        return self.c2(h) + h, h.permute(0, 2, 3, 1)


def channels_last_model():
    """Model and its weights in channels_last, as users do for speed on CPU; the example too."""
    torch.manual_seed(8)
    m = ConvNet().eval().to(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 8, 8, generator=_g(12)).to(memory_format=torch.channels_last)
    return m, (x,), {}


def cl_weights_contiguous_input():
    """channels_last weights, a contiguous example (the usual pairing: ``model.to(memory_format=...)`` and images
    as loaded): eager answers channels_last. Every path answered the conv outputs contiguous where the graph ran
    locally, and a split 1.2e-7 off the local run, before session 17 (the graph ran contiguous weight copies)."""
    m, (x,), k = channels_last_model()
    return m, (x.contiguous(),), k


def contiguous_model():
    """The same network captured with a contiguous example; tests then call it with channels_last inputs."""
    torch.manual_seed(8)
    return ConvNet().eval(), (torch.randn(2, 3, 8, 8, generator=_g(12)),), {}


# ---- tied weights, a submodule called twice, weight norm / parametrizations ---------------------------------
class TiedLM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(30, 12)
        self.block = nn.Sequential(nn.Linear(12, 12), nn.GELU())
        self.head = nn.Linear(12, 30, bias=False)
        self.head.weight = self.emb.weight  # tied
        self.proj = parametrizations.weight_norm(nn.Linear(12, 12))
        self.orth = parametrizations.orthogonal(nn.Linear(12, 12))

    def forward(self, ids):
        h = self.emb(ids)
        h = self.block(h)
        h = self.block(h)  # the same block twice
        h = self.orth(self.proj(h))
        return self.head(h)


def tied_twice_param():
    torch.manual_seed(9)
    return TiedLM().eval(), (torch.randint(0, 30, (2, 5), generator=_g(13)),), {}


# ---- LSTM / GRU with packed sequences ----------------------------------------------------------------------
class PackedGRU(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.gru = nn.GRU(6, 8, batch_first=True)
        self.fc = nn.Linear(8, 2)

    def forward(self, x, lengths):
        packed = nn.utils.rnn.pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
        out, h = self.gru(packed)
        out, _ = nn.utils.rnn.pad_packed_sequence(out, batch_first=True, total_length=x.shape[1])
        return self.fc(h[-1]), out


def packed_gru():
    """Refused at capture (the batch size per step depends on ``lengths``' values), naming the fix below."""
    torch.manual_seed(10)
    return PackedGRU().eval(), (torch.randn(3, 5, 6, generator=_g(14)), torch.tensor([5, 3, 2])), {}


class PaddedGRU(PackedGRU):
    """``PackedGRU`` rewritten as the refusal says: the GRU on the padded batch, each sequence's state taken at
    ``lengths - 1`` with ``gather`` and the padded steps zeroed; equal to ``PackedGRU`` on the same weights."""

    def forward(self, x, lengths):
        out, _ = self.gru(x)
        idx = (lengths - 1).view(-1, 1, 1).expand(-1, 1, out.shape[-1])
        last = out.gather(1, idx).squeeze(1)
        valid = torch.arange(x.shape[1], device=x.device)[None, :] < lengths[:, None]
        return self.fc(last), out * valid.unsqueeze(-1).to(out.dtype)


def padded_gru():
    torch.manual_seed(10)
    return PaddedGRU().eval(), (torch.randn(3, 5, 6, generator=_g(14)), torch.tensor([5, 3, 2])), {}


class PlainLSTM(nn.Module):
    """An LSTM with an explicit initial state made inside forward (zeros with the input's dtype/device)."""

    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(6, 8, num_layers=2, batch_first=True, bidirectional=True)
        self.fc = nn.Linear(16, 2)

    def forward(self, x):
        h0 = x.new_zeros(4, x.shape[0], 8)
        out, (h, c) = self.lstm(x, (h0, torch.zeros_like(h0)))
        return self.fc(out[:, -1]), (h, c)


def lstm_state():
    torch.manual_seed(11)
    return PlainLSTM().eval(), (torch.randn(3, 5, 6, generator=_g(15)),), {}


# ---- einsum, a custom autograd Function ---------------------------------------------------------------------
class ScaledSwish(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, beta):
        ctx.save_for_backward(x)
        return x * torch.sigmoid(beta * x)

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        s = torch.sigmoid(x)
        return g * (s + x * s * (1 - s)), None


class EinsumNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.pre = nn.Linear(6, 6)
        self.w = nn.Parameter(torch.randn(4, 6, 5, generator=_g(16)))
        self.fc = nn.Linear(5, 3)

    def forward(self, x):
        h = torch.einsum("bhi,hio->bho", self.pre(x), self.w)  # einsum is off the server's allowlist
        h = ScaledSwish.apply(h, 1.5)
        return self.fc(h).sum(1)


def einsum_autograd_fn():
    torch.manual_seed(12)
    return EinsumNet().eval(), (torch.randn(3, 4, 6, generator=_g(17)),), {}


MODELS = {
    "hf_dataclass": hf_dataclass,
    "ordered_dict_out": ordered_dict_out,
    "namedtuple_out": namedtuple_out,
    "dict_kwargs": dict_kwargs,
    "dict_kwargs_none": dict_kwargs_none,
    "inplace_views": inplace_views,
    "hooks_bn_train": hooks_bn_train,
    "dtypes_scalars": dtypes_scalars,
    "channels_last_model": channels_last_model,
    "contiguous_model": contiguous_model,
    "cl_weights_contiguous_input": cl_weights_contiguous_input,
    "tied_twice_param": tied_twice_param,
    "padded_gru": padded_gru,
    "lstm_state": lstm_state,
    "einsum_autograd_fn": einsum_autograd_fn,
}

REFUSED = {
    "packed_gru": (packed_gru, r"runs an RNN on a PackedSequence .*torch\.gather"),
    "hook_records_on_module": (hook_records_on_module, r"changes the Python attribute .*feats"),
}
"""Models coinfer cannot split safely: each refused at capture in one line naming the cause (regex)."""
