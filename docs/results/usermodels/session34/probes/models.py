import sys

sys.path.insert(0, "docs/results/usermodels/session34")
import dataclasses
from typing import NamedTuple

import harness
import torch
import torch.nn.functional as F
from torch import nn

which = sys.argv[1:]


class Out(NamedTuple):
    logits: torch.Tensor
    pred: torch.Tensor
    mask: torch.Tensor
    count: int


class NT(nn.Module):
    def __init__(s):
        super().__init__()
        s.fc = nn.Linear(6, 4)

    def forward(s, x):
        l = s.fc(x)  # noqa: E741
        return Out(l, l.argmax(-1), l > 0, 3)


class Shared(nn.Module):
    """outputs sharing storage, and in-place on intermediates"""

    def __init__(s):
        super().__init__()
        s.fc = nn.Linear(6, 6)

    def forward(s, x):
        h = s.fc(x)
        h.relu_()
        flat = h.view(-1)
        return {"h": h, "flat": flat, "t": h.t(), "row0": h[0], "chunks": h.chunk(2, dim=1), "x": x, "xv": x[:, :2]}


class ShapeFlow(nn.Module):
    def __init__(s):
        super().__init__()
        s.a = nn.Linear(8, 8)
        s.b = nn.Linear(8, 8)

    def forward(s, x):
        if x.shape[0] > 2:
            return s.a(x).sum(0)
        return s.b(x).mean(0)


class RNNs(nn.Module):
    def __init__(s):
        super().__init__()
        s.lstm = nn.LSTM(5, 7, num_layers=2, batch_first=True)
        s.gru = nn.GRU(7, 3, bidirectional=True)

    def forward(s, x, h0: tuple | None = None):
        y, (h, c) = s.lstm(x, h0)
        z, hg = s.gru(y.transpose(0, 1))
        return y, (h, c), z, hg


class TEnc(nn.Module):
    def __init__(s):
        super().__init__()
        layer = nn.TransformerEncoderLayer(16, 4, 32, dropout=0.1, batch_first=True)
        s.enc = nn.TransformerEncoder(layer, 2)

    def forward(s, x, pad=None):
        return s.enc(x, src_key_padding_mask=pad)


class MHA(nn.Module):
    def __init__(s):
        super().__init__()
        s.mha = nn.MultiheadAttention(16, 4, batch_first=True)

    def forward(s, q, kv, attn_mask=None, key_padding_mask=None):
        return s.mha(
            q,
            kv,
            kv,
            attn_mask=attn_mask,
            key_padding_mask=key_padding_mask,
            need_weights=True,
            average_attn_weights=False,
        )


class Det(nn.Module):
    def __init__(s):
        super().__init__()
        s.body = nn.Conv2d(3, 8, 3, padding=1)
        s.cls = nn.Conv2d(8, 4, 1)
        s.box = nn.Conv2d(8, 4, 1)
        s.register_buffer("anchors", torch.rand(64, 4))

    def forward(s, images):
        f = F.relu(s.body(images))
        logits = s.cls(f).flatten(2).transpose(1, 2)
        deltas = s.box(f).flatten(2).transpose(1, 2)
        boxes = s.anchors + deltas
        scores, labels = logits.softmax(-1).max(-1)
        topv, topi = scores.topk(5, dim=1)
        return [
            {
                "boxes": torch.gather(boxes, 1, topi[..., None].expand(-1, -1, 4))[i],
                "scores": topv[i],
                "labels": labels.gather(1, topi)[i],
            }
            for i in range(images.shape[0])
        ]


@dataclasses.dataclass
class HFOut:
    last_hidden_state: torch.Tensor
    pooler_output: torch.Tensor | None = None
    attentions: tuple | None = None


torch.utils._pytree.register_dataclass(HFOut)


class HF(nn.Module):
    def __init__(s):
        super().__init__()
        s.emb = nn.Embedding(50, 16)
        s.pos = nn.Embedding(32, 16)
        s.ln = nn.LayerNorm(16)
        s.layer = nn.TransformerEncoderLayer(16, 2, 32, batch_first=True, dropout=0.0)
        s.pool = nn.Linear(16, 16)

    def forward(s, input_ids, attention_mask=None, *, output_attentions=False, return_dict=True):
        pos = torch.arange(input_ids.shape[1], device=input_ids.device)
        h = s.ln(s.emb(input_ids) + s.pos(pos)[None])
        pad = None if attention_mask is None else attention_mask == 0
        h = s.layer(h, src_key_padding_mask=pad)
        pooled = torch.tanh(s.pool(h[:, 0]))
        if not return_dict:
            return (h, pooled)
        return HFOut(h, pooled, (h.mean(-1),) if output_attentions else None)


class BNInplace(nn.Module):
    def __init__(s):
        super().__init__()
        s.c = nn.Conv2d(3, 8, 3)
        s.bn = nn.BatchNorm2d(8)
        s.c2 = nn.Conv2d(8, 4, 1)

    def forward(s, x):
        y = s.bn(s.c(x))
        y += 1
        y = F.hardswish(y, inplace=True)
        z = s.c2(y)
        z[:, 0] = 0
        return z, y


class IntBool(nn.Module):
    def __init__(s):
        super().__init__()
        s.e = nn.Embedding(20, 8)

    def forward(s, ids):
        h = s.e(ids)
        return (
            ids * 2,
            ids > 5,
            h.sum(-1).long(),
            (ids % 3).to(torch.uint8),
            h.norm(dim=-1).to(torch.float16),
            h.double(),
        )


MODELS = {
    "namedtuple": (NT(), (torch.randn(3, 6),), {}, [((torch.randn(5, 6),), {})]),
    "shared": (Shared(), (torch.randn(4, 6),), {}, [((torch.randn(4, 6),), {})]),
    "shapeflow": (ShapeFlow(), (torch.randn(4, 8),), {}, [((torch.randn(2, 8),), {}), ((torch.randn(5, 8),), {})]),
    "rnns": (
        RNNs(),
        (torch.randn(2, 4, 5),),
        {},
        [((torch.randn(3, 6, 5),), {}), ((torch.randn(2, 4, 5), (torch.randn(2, 2, 7), torch.randn(2, 2, 7))), {})],
    ),
    "tenc": (
        TEnc().eval(),
        (torch.randn(2, 5, 16),),
        {"pad": torch.tensor([[False] * 5, [False] * 3 + [True] * 2])},
        None,
    ),
    "tenc_nomask": (TEnc().eval(), (torch.randn(2, 5, 16),), {}, None),
    "mha": (
        MHA().eval(),
        (torch.randn(2, 3, 16), torch.randn(2, 5, 16)),
        {
            "attn_mask": torch.zeros(3, 5).masked_fill(torch.rand(3, 5) > 0.7, float("-inf")),
            "key_padding_mask": torch.tensor([[False] * 5, [False] * 4 + [True]]),
        },
        None,
    ),
    "det": (Det().eval(), (torch.randn(2, 3, 8, 8),), {}, [((torch.randn(3, 3, 8, 8),), {})]),
    "hf": (
        HF().eval(),
        (torch.randint(0, 50, (2, 7)),),
        {"attention_mask": torch.tensor([[1] * 7, [1] * 5 + [0] * 2])},
        [
            ((torch.randint(0, 50, (2, 7)),), {}),
            ((torch.randint(0, 50, (2, 7)),), {"return_dict": False}),
            (
                (torch.randint(0, 50, (2, 7)),),
                {"attention_mask": torch.ones(2, 7, dtype=torch.long), "output_attentions": True},
            ),
        ],
    ),
    "bninplace": (
        BNInplace().eval(),
        (torch.randn(2, 3, 8, 8),),
        {},
        [
            ((torch.randn(2, 3, 8, 8).to(memory_format=torch.channels_last),), {}),
            ((torch.randn(2, 3, 8, 10)[..., 1:9],), {}),
        ],
    ),
    "intbool": (IntBool(), (torch.randint(0, 20, (2, 5)),), {}, None),
}
for name in which or MODELS:
    torch.manual_seed(1)
    m, a, k, calls = MODELS[name]
    calls = [(a, k)] + (calls or [])
    harness.check_all(name, m, a, k, calls=calls, modes=("grad", "inference"))
