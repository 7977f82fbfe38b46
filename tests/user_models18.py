"""Session 18 (newuser18): more models written as users write them, each with a habit the earlier zoos
(``tests/user_zoo.py``, ``tests/user_models17.py``) did not have.

Each factory returns ``(module, args, kwargs)`` with a seeded init (two calls build bit-identical models) and
small inputs, so a real server runs each over several fixed partitions in about a second.
``tests/test_user_models18.py`` runs them cold and warm and compares every answer with the user's own eager
``module(*args, **kwargs)``: structure, output classes, dtypes, shapes, strides and values.
"""

from __future__ import annotations

import random

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize


def _g(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---- BERT-style: token types, an extended additive mask, SDPA, position ids from the mask's cumsum ----------
class BertLayer(nn.Module):
    def __init__(self, dim: int = 16, heads: int = 2) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.o = nn.Linear(dim, dim)
        self.ln1 = nn.LayerNorm(dim, eps=1e-12)
        self.ff = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))
        self.ln2 = nn.LayerNorm(dim, eps=1e-12)

    def forward(self, h, ext_mask):
        b, n, d = h.shape
        q, k, v = self.qkv(h).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        scores = q @ k.transpose(-1, -2) / (d // self.heads) ** 0.5 + ext_mask
        a = scores.softmax(-1) @ v
        h = self.ln1(h + self.o(a.transpose(1, 2).reshape(b, n, d)))
        return self.ln2(h + self.ff(h))


class Bert(nn.Module):
    """``forward(input_ids, token_type_ids, attention_mask)`` as BERT/RoBERTa: position ids from
    ``mask.cumsum(1) * mask + padding_idx`` (int64), the extended mask ``(1.0 - mask[:, None, None, :]) *
    torch.finfo(dtype).min``, two layers, a pooled CLS and the per-layer hidden states (a tuple)."""

    def __init__(self, vocab: int = 40, dim: int = 16, max_pos: int = 20) -> None:
        super().__init__()
        self.word = nn.Embedding(vocab, dim, padding_idx=1)
        self.pos = nn.Embedding(max_pos, dim, padding_idx=1)
        self.tok = nn.Embedding(2, dim)
        self.ln = nn.LayerNorm(dim, eps=1e-12)
        self.layers = nn.ModuleList(BertLayer(dim) for _ in range(2))
        self.pool = nn.Linear(dim, dim)

    def forward(self, input_ids, token_type_ids, attention_mask):
        mask = attention_mask.to(torch.long)
        pos = torch.cumsum(mask, dim=1).type_as(mask) * mask + 1
        h = self.ln(self.word(input_ids) + self.pos(pos) + self.tok(token_type_ids))
        ext = (1.0 - attention_mask[:, None, None, :].to(h.dtype)) * torch.finfo(h.dtype).min
        states = (h,)
        for layer in self.layers:
            h = layer(h, ext)
            states = (*states, h)
        return {"last_hidden_state": h, "pooler_output": torch.tanh(self.pool(h[:, 0])), "hidden_states": states}


def bert_token_types():
    torch.manual_seed(21)
    ids = torch.randint(2, 40, (2, 7), generator=_g(21))
    types = torch.tensor([[0, 0, 0, 1, 1, 1, 1], [0, 0, 1, 1, 1, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 0, 0]])
    return Bert().eval(), (ids, types, mask), {}


# ---- F.scaled_dot_product_attention with a boolean mask (True = attend) --------------------------------------
class BoolMaskAttention(nn.Module):
    def __init__(self, dim: int = 16, heads: int = 4) -> None:
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, x, keep):
        b, n, d = x.shape

        def split(t):
            return t.view(b, n, self.heads, d // self.heads).transpose(1, 2)

        causal = torch.ones(n, n, dtype=torch.bool, device=x.device).tril()
        mask = causal[None, None] & keep[:, None, None, :]
        a = F.scaled_dot_product_attention(split(self.q(x)), split(self.k(x)), split(self.v(x)), attn_mask=mask)
        return self.out(a.transpose(1, 2).reshape(b, n, d))


def sdpa_bool_mask():
    torch.manual_seed(22)
    keep = torch.tensor([[True] * 6, [True, True, True, True, False, False]])
    return BoolMaskAttention().eval(), (torch.randn(2, 6, 16, generator=_g(22)), keep), {}


# ---- a small UNet: skip concat, F.interpolate (bilinear, nearest), max-pool, a transposed conv ---------------
class UNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.d1 = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(inplace=True))
        self.d2 = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(inplace=True))
        self.bott = nn.Conv2d(16, 16, 3, padding=1)
        self.up2 = nn.ConvTranspose2d(16, 8, 2, stride=2)
        self.u1 = nn.Conv2d(16 + 16, 16, 3, padding=1)
        self.u0 = nn.Conv2d(8 + 8, 4, 1)

    def forward(self, x):
        s1 = self.d1(x)
        s2 = self.d2(F.max_pool2d(s1, 2))
        b = F.relu(self.bott(F.max_pool2d(s2, 2)))
        u = F.interpolate(b, scale_factor=2, mode="bilinear", align_corners=False)
        u = F.relu(self.u1(torch.cat([u, s2], dim=1)))
        u = self.up2(torch.cat([u[:, :8], u[:, 8:]], 1))
        u = torch.cat([u, F.interpolate(s1, size=u.shape[-2:], mode="nearest")], dim=1)
        return self.u0(u)


def unet_skips():
    torch.manual_seed(23)
    return UNet().eval(), (torch.randn(2, 3, 16, 16, generator=_g(23)),), {}


# ---- detection-style head: a dict of lists of tensors, a buffer of anchors returned as is -------------------
class DetHead(nn.Module):
    """An FPN-ish head over two levels: ``{"cls": [l0, l1], "box": [l0, l1], "anchors": self.anchors}``, the
    anchors a registered buffer returned unchanged (users return them for decoding), transposed: every path
    returned a contiguous copy before session 18 (eager: the buffer itself, strides (1, 3))."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.down = nn.Conv2d(8, 8, 3, stride=2, padding=1)
        self.cls = nn.Conv2d(8, 3, 1)
        self.box = nn.Conv2d(8, 4, 1)
        self.register_buffer("anchors", torch.linspace(0, 1, 12).view(4, 3).t())  # (3, 4), strides (1, 3)

    def forward(self, x):
        p0 = F.relu(self.stem(x))
        p1 = F.relu(self.down(p0))
        return {"cls": [self.cls(p).flatten(2).sigmoid() for p in (p0, p1)],
                "box": [self.box(p).flatten(2) for p in (p0, p1)], "anchors": self.anchors}


def det_dict_of_lists():
    torch.manual_seed(24)
    return DetHead().eval(), (torch.randn(2, 3, 8, 8, generator=_g(24)),), {}


# ---- torch.where with masks, masked_fill with -inf, nan_to_num, a bool output --------------------------------
class MaskedPool(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 6)

    def forward(self, x, valid):
        h = self.fc(x)
        scores = h.masked_fill(~valid[..., None], float("-inf")).softmax(1)
        scores = torch.nan_to_num(scores, nan=0.0)  # a row with no valid position is NaN after softmax
        pooled = torch.where(valid[..., None], h * scores, torch.zeros_like(h)).sum(1)
        return pooled, torch.where(pooled > 0, pooled, 0.1 * pooled), valid.any(1)


def where_masks():
    torch.manual_seed(25)
    valid = torch.tensor([[True, True, False, True], [False, False, False, False], [True, False, False, False]])
    return MaskedPool().eval(), (torch.randn(3, 4, 6, generator=_g(25)), valid), {}


# ---- buffers read in forward: persistent and not, a float64 buffer in a float32 model --------------------------
class Normalizer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale64", torch.tensor(1.5, dtype=torch.float64))
        self.register_buffer("steps", torch.tensor(3))  # an int64 0-d buffer
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm1d(4)

    def forward(self, img_u8):
        x = (img_u8.float() / 255.0 - self.mean) / self.std
        h = self.conv(x).mean((2, 3))
        h = self.bn(h) * self.scale64.float() + self.steps
        return h, (h.double() * self.scale64)


def buffers_uint8_image():
    torch.manual_seed(26)
    m = Normalizer().eval()
    with torch.no_grad():
        m.bn.running_mean.uniform_(-0.2, 0.2, generator=_g(26))
        m.bn.running_var.uniform_(0.5, 1.5, generator=_g(27))
    return m, (torch.randint(0, 256, (2, 3, 8, 8), dtype=torch.uint8, generator=_g(28)),), {}


# ---- parametrize: a user's own parametrization, cached; spectral_norm (both APIs) ----------------------------
class Symmetric(nn.Module):
    def forward(self, w):
        return w.triu() + w.triu(1).transpose(-1, -2)


class ParamNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.sym = nn.Linear(8, 8)
        parametrize.register_parametrization(self.sym, "weight", Symmetric())
        self.sn_new = nn.utils.parametrizations.spectral_norm(nn.Linear(8, 8))
        self.sn_old = nn.utils.spectral_norm(nn.Conv1d(8, 8, 1))

    def forward(self, x):
        h = torch.tanh(self.sym(x))
        h = self.sn_new(h)
        return self.sn_old(h.unsqueeze(-1)).squeeze(-1)


def parametrized_spectral():
    torch.manual_seed(27)
    m = ParamNet()
    x = torch.randn(4, 8, generator=_g(29))
    with torch.no_grad():  # a few training steps of power iteration, as a trained GAN has
        for _ in range(3):
            m(x)
    return m.eval(), (x,), {}


# ---- hooks: a global module forward hook, a hook with kwargs, a pre-hook with kwargs -----------------------
class KwBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 6)

    def forward(self, x, *, gate=None):
        y = self.fc(x)
        return y if gate is None else y * gate


class HookKw(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = KwBlock()
        self.b = KwBlock()
        self.a.register_forward_pre_hook(lambda m, args, kwargs: (args, {**kwargs, "gate": torch.sigmoid(args[0])}),
                                         with_kwargs=True)
        self.b.register_forward_hook(lambda m, args, kwargs, out: out + args[0], with_kwargs=True)

    def forward(self, x):
        return self.b(self.a(x))


def hooks_with_kwargs():
    torch.manual_seed(28)
    return HookKw().eval(), (torch.randn(3, 6, generator=_g(30)),), {}


# ---- a ModuleDict routed by a constant string argument ----------------------------------------------------
class Router(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Linear(8, 8)
        self.heads = nn.ModuleDict({"cls": nn.Linear(8, 3), "reg": nn.Sequential(nn.Linear(8, 2), nn.Tanh())})

    def forward(self, x, task: str = "cls"):
        return self.heads[task](F.silu(self.trunk(x)))


def moduledict_route():
    torch.manual_seed(29)
    return Router().eval(), (torch.randn(4, 8, generator=_g(31)),), {"task": "reg"}


# ---- a deep Sequential (1000+ ops) -----------------------------------------------------------------------
class Affine(nn.Module):
    def __init__(self, i: int) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.full((4,), 1.0 + 0.001 * (i % 7)))

    def forward(self, x):
        return torch.tanh(x * self.w) + x


def deep_sequential(depth: int = 400):
    """``depth`` blocks of 3 ops (mul, tanh, add): 1200 ops."""
    torch.manual_seed(30)
    return nn.Sequential(*(Affine(i) for i in range(depth))).eval(), (torch.randn(2, 4, generator=_g(32)),), {}


# ---- a forward that reads self.training; a module left in train() with dropout ------------------------------
class TrainAware(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.drop = nn.Dropout(0.5)
        self.out = nn.Linear(8, 2)

    def forward(self, x):
        h = self.drop(F.relu(self.fc(x)))
        if self.training:
            return {"logits": self.out(h), "aux": h.mean()}
        return {"logits": self.out(h)}


def train_mode_dropout():
    """Left in training mode: the capture switches it to eval (dropout off, the eval branch)."""
    torch.manual_seed(31)
    return TrainAware(), (torch.randn(3, 8, generator=_g(33)),), {}


# ---- complex tensors in and out --------------------------------------------------------------------------
class ComplexMix(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, z):
        re = self.fc(torch.view_as_real(z).flatten(-2))
        w = torch.view_as_complex(re.view(*re.shape[:-1], 4, 2).contiguous())
        return w * z[..., :4].conj(), (w.abs() ** 2).sum(-1)


def complex_io():
    torch.manual_seed(32)
    z = torch.randn(3, 4, dtype=torch.complex64, generator=_g(34))
    return ComplexMix().eval(), (z,), {}


# ---- empty and 0-d tensors; the same tensor twice in the output; an output that is a view of an input --------
class EdgeShapes(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(5, 5)

    def forward(self, x, t, none_yet):
        h = self.fc(x) * t
        e = self.fc(none_yet)  # (0, 5)
        s = h.sum()
        return h, h, x[:, 1:3], s, e, (s, e.sum(0))


def edge_shapes():
    torch.manual_seed(33)
    return EdgeShapes().eval(), (torch.randn(4, 5, generator=_g(35)), torch.tensor(0.5), torch.empty(0, 5)), {}


# ---- bfloat16 and autocast inside forward --------------------------------------------------------------------
class Autocast(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(8, 16)
        self.b = nn.Linear(16, 4)

    def forward(self, x):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            h = F.gelu(self.a(x))
            y = self.b(h)
        return y, y.float().softmax(-1)


def autocast_bf16():
    torch.manual_seed(34)
    return Autocast().eval(), (torch.randn(3, 8, generator=_g(36)),), {}


# ---- einsum (off the allowlist) in the middle of a model, a list of tensors as input -------------------------
class ListIn(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(6, 6)
        self.bil = nn.Parameter(torch.randn(6, 6, generator=_g(37)) * 0.1)
        self.out = nn.Linear(6, 2)

    def forward(self, feats: list[torch.Tensor]):
        h = torch.stack([self.proj(f) for f in feats], 1)  # (b, k, 6)
        inter = torch.einsum("bkd,de,bje->bkj", h, self.bil, h)
        return self.out(h.mean(1)), inter


def list_input_einsum():
    torch.manual_seed(35)
    return ListIn().eval(), ([torch.randn(2, 6, generator=_g(38 + i)) for i in range(3)],), {}


# ---- no_grad inside forward producing the output, an in-place op on a buffer-derived clone -----------------
class EmaTeacher(nn.Module):
    """A student/teacher pair: the teacher under ``torch.no_grad()``, its output detached and returned."""

    def __init__(self) -> None:
        super().__init__()
        self.student = nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 4))
        self.teacher = nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 4))

    def forward(self, x):
        s = self.student(x)
        with torch.no_grad():
            t = self.teacher(x).detach()
            t = t.clone().clamp_(-0.5, 0.5)
        return s.log_softmax(-1), t.softmax(-1)


def no_grad_teacher():
    torch.manual_seed(36)
    return EmaTeacher().eval(), (torch.randn(5, 6, generator=_g(41)),), {}


# ---- GroupNorm, InstanceNorm, PixelShuffle, reflect padding -------------------------------------------------
class SuperRes(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1, padding_mode="reflect")
        self.gn = nn.GroupNorm(2, 8)
        self.c2 = nn.Conv2d(8, 12, 3, padding=1)
        self.inorm = nn.InstanceNorm2d(12, affine=True)
        self.ps = nn.PixelShuffle(2)

    def forward(self, x):
        h = F.leaky_relu(self.gn(self.c1(x)), 0.2)
        h = self.inorm(self.c2(h))
        return torch.sigmoid(self.ps(h))


def super_res():
    torch.manual_seed(37)
    return SuperRes().eval(), (torch.randn(1, 3, 6, 6, generator=_g(42)),), {}


# ---- dict outputs with integer keys, a python constant and None besides ---------------------------------------
class IntKeys(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.ModuleList(nn.Linear(4, 4) for _ in range(3))

    def forward(self, x):
        out = {}
        for i, f in enumerate(self.fc):
            x = f(x).relu()
            out[i] = x
        return out, None, "v1", x.shape[0]


def int_keys_out():
    torch.manual_seed(38)
    return IntKeys().eval(), (torch.randn(2, 4, generator=_g(43)),), {}


# ---- forwards that read the autograd mode ------------------------------------------------------------------
class GradAware(nn.Module):
    """Another answer by the autograd mode, as some users write a cheaper inference path:
    ``torch.is_grad_enabled()``, ``torch.is_inference_mode_enabled()`` or the input's ``requires_grad``."""

    def __init__(self, reads: str) -> None:
        super().__init__()
        self.reads = reads
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        if self.reads == "grad":
            on = torch.is_grad_enabled()
        elif self.reads == "inference":
            on = torch.is_inference_mode_enabled()
        else:
            on = x.requires_grad
        return self.fc(x) * (2.0 if on else 3.0)


def grad_aware(reads: str = "grad"):
    torch.manual_seed(39)
    return GradAware(reads).eval(), (torch.randn(3, 4, generator=_g(44)),), {}


class DefaultDtypeOut(nn.Module):
    """Casts its output to torch's default dtype (``torch.get_default_dtype()`` read in forward)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        return self.fc(x).to(torch.get_default_dtype())


def default_dtype_out():
    torch.manual_seed(42)
    return DefaultDtypeOut().eval(), (torch.randn(3, 4, generator=_g(47)),), {}


class TracedBranch(nn.Module):
    """Another answer while torch traces it (``torch.compiler.is_compiling()``: True under torch.export)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        y = self.fc(x)
        return y * 2 if torch.compiler.is_compiling() else y


def traced_branch():
    torch.manual_seed(43)
    return TracedBranch().eval(), (torch.randn(3, 4, generator=_g(48)),), {}


class TestTimeFlip(nn.Module):
    """Test-time augmentation with Python's ``random``: flips 10 % of calls. Traced and checked with two draws over
    0.1 (``random.seed(3)``), the graph never flips while ``model(x)`` does, 1.49 off in 30 calls (before)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        if random.random() < 0.1:
            x = x.flip(-1)
        return self.fc(x)


def python_random():
    torch.manual_seed(44)
    random.seed(3)
    return TestTimeFlip().eval(), (torch.randn(3, 4, generator=_g(49)),), {}


class NumpyJitter(nn.Module):
    """A NumPy draw small enough to pass the capture's comparison with eager (before: captured, every call then
    answered the traced draw)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        return self.fc(x) * float(np.random.uniform(1.0, 1.00001))


def numpy_random():
    torch.manual_seed(45)
    return NumpyJitter().eval(), (torch.randn(3, 4, generator=_g(50)),), {}


# ---- refused: a lazy module never run, a dynamically quantized model ---------------------------------------
def lazy_uninitialized():
    torch.manual_seed(40)
    return nn.Sequential(nn.LazyLinear(3), nn.ReLU()).eval(), (torch.randn(2, 4, generator=_g(45)),), {}


def quantized_dynamic():
    torch.manual_seed(41)
    m = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)).eval()
    q = torch.ao.quantization.quantize_dynamic(m, {nn.Linear}, dtype=torch.qint8)
    return q, (torch.randn(2, 4, generator=_g(46)),), {}


REFUSED = {
    "lazy_uninitialized": (lazy_uninitialized, r"_uninitialized\.0 \(LazyLinear\) has uninitialized lazy parameters "
                                               r"\(weight, bias\): call the model once"),
    "quantized_dynamic": (quantized_dynamic, r"_dynamic\.0 is a quantized module .*pass the float model"),
    "python_random": (python_random, r"python_random draws random numbers in Python \(the random module's global "
                                     r"generator, through the global random\) in forward: the graph keeps the value "
                                     r"drawn while torch\.export traced it"),
    "numpy_random": (numpy_random, r"numpy_random draws random numbers in Python \(the numpy\.random module's global "
                                   r"RandomState, through the global np\)"),
    "traced_branch": (traced_branch, r"traced_branch: the captured graph differs .*asks whether it is traced "
                                     r"\(torch\.compiler\.is_compiling\(\): true while torch\.export"),
}
"""Models coinfer cannot split: each refused at capture in one line naming the cause and the fix (regex)."""


MODELS = {
    "bert_token_types": bert_token_types,
    "sdpa_bool_mask": sdpa_bool_mask,
    "unet_skips": unet_skips,
    "det_dict_of_lists": det_dict_of_lists,
    "where_masks": where_masks,
    "buffers_uint8_image": buffers_uint8_image,
    "parametrized_spectral": parametrized_spectral,
    "hooks_with_kwargs": hooks_with_kwargs,
    "moduledict_route": moduledict_route,
    "deep_sequential": deep_sequential,
    "train_mode_dropout": train_mode_dropout,
    "complex_io": complex_io,
    "edge_shapes": edge_shapes,
    "autocast_bf16": autocast_bf16,
    "list_input_einsum": list_input_einsum,
    "no_grad_teacher": no_grad_teacher,
    "super_res": super_res,
    "int_keys_out": int_keys_out,
}
