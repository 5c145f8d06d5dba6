"""Small built-in classifiers for `model.kind: builtin`: a ViT and an MLP.

Both are built at their *maximum* dropout rates with real modules (``nn.Dropout``,
:class:`DropPath`), never ``nn.Identity``, so that a dropout schedule
(`techniques.dropout`) can set any rate, including 0, every step. Stochastic depth
follows the usual linear-in-depth profile: block ``i`` of ``depth`` gets
``drop_path * i / (depth - 1)``.

Both take ``pixel_values`` (``B x C x H x W`` or already flat) and return logits.
Sizes come from `model.config`; unknown keys are errors.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from orchestrator.errors import UsageError
from orchestrator.recipe.builtin_models import DEFAULTS, MLP_DEFAULTS, VIT_DEFAULTS, unknown_keys


class DropPath(nn.Module):
    """Stochastic depth per sample: drop the residual branch with probability ``drop_prob``.

    Kept as a real module at rate 0 (a no-op then), unlike timm's ``nn.Identity``
    substitution, so a schedule can raise the rate later.
    """

    def __init__(self, drop_prob: float = 0.0):
        super().__init__()
        self.drop_prob = float(drop_prob)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep = 1.0 - self.drop_prob
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob:.3g}"


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, dropout: float):
        super().__init__()
        if dim % heads:
            raise UsageError(f"model.config: dim {dim} must be a multiple of heads {heads}")
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.attn_drop = nn.Dropout(dropout)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        attn = (q @ k.transpose(-2, -1)) * (d // self.heads) ** -0.5
        attn = self.attn_drop(attn.softmax(dim=-1))
        out = (attn @ v).transpose(1, 2).reshape(b, n, d)
        return self.proj_drop(self.proj(out))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: float, dropout: float, drop_path: float):
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads, dropout)
        self.drop_path1 = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(
            nn.Linear(dim, hidden),
            nn.GELU(),
            nn.Dropout(dropout),
            nn.Linear(hidden, dim),
            nn.Dropout(dropout),
        )
        self.drop_path2 = DropPath(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path1(self.attn(self.norm1(x)))
        return x + self.drop_path2(self.mlp(self.norm2(x)))


class TinyViT(nn.Module):
    """A ViT for small images: conv patch embedding, CLS token, pre-norm blocks."""

    def __init__(self, **cfg: Any):
        super().__init__()
        c = {**VIT_DEFAULTS, **cfg}
        size, patch, dim, depth = c["image_size"], c["patch_size"], c["dim"], c["depth"]
        if size % patch:
            raise UsageError(f"model.config: image_size {size} must be a multiple of patch_size")
        self.channels, self.image_size = c["channels"], size
        self.patch = nn.Conv2d(c["channels"], dim, kernel_size=patch, stride=patch)
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos = nn.Parameter(torch.randn(1, (size // patch) ** 2 + 1, dim) * 0.02)
        self.pos_drop = nn.Dropout(c["dropout"])
        rates = [c["drop_path"] * i / max(1, depth - 1) for i in range(depth)]
        self.blocks = nn.ModuleList(
            Block(dim, c["heads"], c["mlp_ratio"], c["dropout"], r) for r in rates
        )
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, c["num_classes"])

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = pixel_values.reshape(-1, self.channels, self.image_size, self.image_size)
        x = self.patch(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1)
        x = self.pos_drop(x + self.pos)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x[:, 0]))


class MLP(nn.Module):
    """Flatten, ``depth`` hidden layers (Linear, GELU, Dropout), then a linear head."""

    def __init__(self, **cfg: Any):
        super().__init__()
        c = {**MLP_DEFAULTS, **cfg}
        layers: list[nn.Module] = [nn.Flatten()]
        width = c["in_features"]
        for _ in range(c["depth"]):
            layers += [nn.Linear(width, c["hidden"]), nn.GELU(), nn.Dropout(c["dropout"])]
            width = c["hidden"]
        layers.append(nn.Linear(width, c["num_classes"]))
        self.net = nn.Sequential(*layers)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.net(pixel_values)


def build_builtin(architecture: str, config: dict[str, Any], seed: int) -> nn.Module:
    """A seeded builtin model (`vit` or `mlp`) sized by ``config``."""
    if architecture not in DEFAULTS:
        raise UsageError(
            f"model.architecture: '{architecture}' is not a builtin model: use vit or mlp"
        )
    bad = unknown_keys(architecture, config)
    if bad:
        raise UsageError(
            f"model.config: unknown key(s) {bad} for builtin {architecture}: "
            f"use {sorted(DEFAULTS[architecture])}"
        )
    torch.manual_seed(seed)
    return TinyViT(**config) if architecture == "vit" else MLP(**config)
