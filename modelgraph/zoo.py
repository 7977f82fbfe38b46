"""Small reference models for tests, demos and benchmarks, usable as specs ``modelgraph.zoo:NAME``.

Each factory returns ``(module, example_inputs)`` with a deterministic (seeded) init, so two calls
build bit-identical models. The synthetic models each exercise one graph shape the partitioner and
the slice format must handle: a plain chain, a diamond, a wide fan-out, tied weights, several
inputs and outputs, and a small transformer (non-contiguous intermediates, attention, layer norm).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

SEED = 0


def _seeded(seed: int = SEED) -> None:
    torch.manual_seed(seed)


def _image(batch: int = 1, channels: int = 3, size: int = 32, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, channels, size, size, generator=g)


# ---- chain: conv / relu / pool / linear ------------------------------------------------------------
class Chain(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.fc = nn.Linear(16 * 8 * 8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(F.relu(self.conv1(x)))
        x = self.pool(F.relu(self.conv2(x)))
        return self.fc(torch.flatten(x, 1))


def chain() -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    _seeded()
    return Chain().eval(), (_image(),)


# ---- diamond: two branches merged by add -----------------------------------------------------------
class Diamond(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.left = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.right = nn.Sequential(nn.Conv2d(8, 8, 1), nn.Sigmoid())
        self.head = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = F.relu(self.stem(x))
        y = self.left(s) + self.right(s)
        return self.head(F.adaptive_avg_pool2d(y, 1).flatten(1))


def diamond() -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    _seeded()
    m = Diamond()
    with torch.no_grad():  # non-trivial running statistics so batch norm is not an identity
        m.left[1].running_mean.uniform_(-0.5, 0.5)
        m.left[1].running_var.uniform_(0.5, 1.5)
    return m.eval(), (_image(),)


# ---- fanout: one tensor read by many ops, merged by cat --------------------------------------------
class Fanout(nn.Module):
    def __init__(self, width: int = 4) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.branches = nn.ModuleList(nn.Conv2d(8, 4, k, padding=k // 2) for k in (1, 3, 5, 1)[:width])
        self.head = nn.Linear(4 * width, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = F.relu(self.stem(x))
        y = torch.cat([F.relu(b(s)) for b in self.branches], dim=1)
        return self.head(y.mean(dim=(2, 3)))


def fanout() -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    _seeded()
    return Fanout().eval(), (_image(),)


# ---- shared_weights: the same layers applied twice (tied parameters) --------------------------------
class SharedWeights(nn.Module):
    """One conv applied twice, one linear applied twice, and a second linear tied to the first's weight."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 1)
        self.conv = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 8)
        self.tied = nn.Linear(8, 8)
        self.tied.weight = self.fc.weight  # tied parameter: one tensor, two modules (own bias)
        self.head = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.stem(x))
        x = F.relu(self.conv(x))
        x = F.relu(self.conv(x))  # same conv, same weights
        v = torch.tanh(self.fc(x.mean(dim=(2, 3))))
        v = torch.tanh(self.fc(v))  # same linear again
        return self.head(self.tied(v))


def shared_weights() -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    _seeded()
    return SharedWeights().eval(), (_image(),)


# ---- multi_io: two inputs, two outputs -------------------------------------------------------------
class MultiIO(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.img = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.vec = nn.Sequential(nn.Linear(6, 8), nn.ReLU())
        self.cls = nn.Linear(16, 5)
        self.reg = nn.Linear(8, 2)

    def forward(self, image: torch.Tensor, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        a, b = self.img(image), self.vec(features)
        return self.cls(torch.cat([a, b], dim=1)), self.reg(a * b)


def multi_io() -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    _seeded()
    g = torch.Generator().manual_seed(2)
    return MultiIO().eval(), (_image(), torch.randn(1, 6, generator=g))


# ---- tiny_vit: a small ViT-style transformer ------------------------------------------------------
class Block(nn.Module):
    def __init__(self, dim: int, heads: int, mlp: int) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.ln2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp), nn.GELU(), nn.Linear(mlp, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.ln1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.ln2(x))


class SdpaBlock(nn.Module):
    """Attention written with F.scaled_dot_product_attention (permute/transpose: non-contiguous views)."""

    def __init__(self, dim: int, heads: int, mlp: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.ln2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp), nn.GELU(), nn.Linear(mlp, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        qkv = self.qkv(self.ln1(x)).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, d)
        x = x + self.proj(a)
        return x + self.mlp(self.ln2(x))


class TinyViT(nn.Module):
    def __init__(self, image: int = 32, patch: int = 8, dim: int = 32, heads: int = 4, mlp: int = 64,
                 classes: int = 10) -> None:
        super().__init__()
        self.embed = nn.Conv2d(3, dim, patch, stride=patch)
        n = (image // patch) ** 2
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.pos = nn.Parameter(torch.randn(1, n + 1, dim) * 0.02)
        self.blocks = nn.ModuleList([Block(dim, heads, mlp), SdpaBlock(dim, heads, mlp)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x).flatten(2).transpose(1, 2)  # (b, n, dim), a non-contiguous view
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos
        for blk in self.blocks:
            x = blk(x)
        return self.head(self.norm(x)[:, 0])


def tiny_vit() -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    _seeded()
    return TinyViT().eval(), (_image(),)


def vit_small() -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    """torchvision's VisionTransformer, shrunk to 32x32 images and 2 layers."""
    from modelgraph.tv_compat import import_torchvision

    tv = import_torchvision()
    _seeded()
    m = tv.models.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=4, hidden_dim=64,
                                    mlp_dim=128, num_classes=10)
    with torch.no_grad():  # torchvision zero-inits the head: the output would not depend on the input
        nn.init.normal_(m.heads.head.weight, std=0.2)
        nn.init.normal_(m.heads.head.bias, std=0.2)
    return m.eval(), (_image(),)


ZOO: dict[str, Callable[[], tuple[nn.Module, tuple[torch.Tensor, ...]]]] = {
    "chain": chain,
    "diamond": diamond,
    "fanout": fanout,
    "shared_weights": shared_weights,
    "multi_io": multi_io,
    "tiny_vit": tiny_vit,
    "vit_small": vit_small,
}
SYNTHETIC: list[str] = ["chain", "diamond", "fanout", "shared_weights", "multi_io"]
"""The hand-written graph-shape models (the ViTs are listed in ZOO only)."""
TRANSFORMERS: list[str] = ["tiny_vit", "vit_small"]


def spec(name: str) -> str:
    """The model spec string ``load_model`` accepts for a zoo model."""
    if name not in ZOO:
        raise KeyError(f"no zoo model {name!r} (known: {', '.join(ZOO)})")
    return f"{__name__}:{name}"


__all__ = ["SYNTHETIC", "TRANSFORMERS", "ZOO", "chain", "diamond", "fanout", "multi_io", "shared_weights", "spec",
           "tiny_vit", "vit_small"]
