"""Vision transformers (Dosovitskiy et al. 2021) as an ordered list of named blocks.

Blocks are named ``"embed"`` (patch embedding, cls token, positional embedding),
``"blocks.0"`` … ``"blocks.{depth-1}"`` (pre-norm encoder blocks, the paths of
``model.named_modules()``) and ``"classifier"`` (final LayerNorm, the cls token, Linear), which
always belongs to the last module. Features between blocks are ``(N, T, D)`` tokens, the cls
token first.

>>> net = vit_micro(num_classes=10, in_channels=1, image_size=28)
>>> [name for name, _ in net.named_blocks()][:3]
['embed', 'blocks.0', 'blocks.1']
>>> net(torch.zeros(2, 1, 28, 28)).shape
torch.Size([2, 10])
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

POSITION_STD = 0.02
"""Standard deviation of the (truncated normal) cls token and positional embedding."""


def default_patch_size(image_size: int) -> int:
    """16 for images of 128 pixels or more (ViT-*/16), else the smallest divisor ≥ 2 of the
    side that gives at most 8 × 8 patches.

    >>> default_patch_size(224), default_patch_size(32), default_patch_size(28), default_patch_size(96)
    (16, 4, 4, 12)
    """
    if image_size >= 128:
        return 16
    for p in range(2, image_size + 1):
        if image_size % p == 0 and image_size // p <= 8:
            return p
    return image_size


class PatchEmbedding(nn.Module):
    """Non-overlapping patches → Linear (a conv with stride = kernel), the cls token in
    front, plus a learnt positional embedding: ``(N, C, H, W) -> (N, 1 + HW/p², D)``."""

    def __init__(self, in_channels: int, dim: int, image_size: int, patch_size: int):
        super().__init__()
        if image_size % patch_size:
            raise ValueError(f"image size {image_size} is not a multiple of the patch size {patch_size}; "
                             "choose a patch size that divides it")
        self.image_size, self.patch_size = image_size, patch_size
        self.proj = nn.Conv2d(in_channels, dim, patch_size, stride=patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.position = nn.Parameter(torch.zeros(1, 1 + (image_size // patch_size) ** 2, dim))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        self.proj.reset_parameters()
        nn.init.trunc_normal_(self.cls_token, std=POSITION_STD)
        nn.init.trunc_normal_(self.position, std=POSITION_STD)

    def forward(self, x: Tensor) -> Tensor:
        tokens = rearrange(self.proj(x), "n d h w -> n (h w) d")
        cls = self.cls_token.expand(tokens.shape[0], -1, -1)
        return torch.cat([cls, tokens], dim=1) + self.position


class SelfAttention(nn.Module):
    """Multi-head self-attention from one qkv Linear and an output Linear."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        if dim % heads:
            raise ValueError(f"width {dim} is not a multiple of the {heads} heads; choose dim = heads · k")
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        q, k, v = rearrange(self.qkv(x), "n t (three h e) -> three n h t e", three=3, h=self.heads)
        y = F.scaled_dot_product_attention(q, k, v)
        return self.out(rearrange(y, "n h t e -> n t (h e)"))


class EncoderBlock(nn.Module):
    """Pre-norm transformer block: ``x + attn(LN(x))``, then ``x + MLP(LN(x))`` (GELU)."""

    def __init__(self, dim: int, heads: int, mlp_ratio: int = 4):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = SelfAttention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_ratio * dim), nn.GELU(), nn.Linear(mlp_ratio * dim, dim))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class TokenClassifier(nn.Module):
    """Final LayerNorm, the cls token, Linear."""

    def __init__(self, dim: int, num_classes: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc = nn.Linear(dim, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.norm(x)[:, 0])


class ViT(nn.Module):
    """Patch embedding, ``depth`` pre-norm encoder blocks of width ``dim``, classifier."""

    def __init__(self, *, num_classes: int = 10, in_channels: int = 3, image_size: int = 32,
                 patch_size: int | None = None, dim: int = 192, depth: int = 12, heads: int = 3,
                 mlp_ratio: int = 4):
        super().__init__()
        if min(num_classes, in_channels, image_size, dim, depth, heads, mlp_ratio) < 1:
            raise ValueError("ViT sizes (classes, channels, image size, dim, depth, heads, mlp ratio) "
                             "must all be positive")
        patch_size = default_patch_size(image_size) if patch_size is None else patch_size
        self.num_classes, self.in_channels, self.image_size = num_classes, in_channels, image_size
        self.embed = PatchEmbedding(in_channels, dim, image_size, patch_size)
        self.blocks = nn.ModuleList(EncoderBlock(dim, heads, mlp_ratio) for _ in range(depth))
        self.classifier = TokenClassifier(dim, num_classes)

    def named_blocks(self) -> list[tuple[str, nn.Module]]:
        """The ordered blocks local learning splits between: embed, ``blocks.i``, classifier."""
        return ([("embed", self.embed)] + [(f"blocks.{i}", b) for i, b in enumerate(self.blocks)]
                + [("classifier", self.classifier)])

    def forward(self, x: Tensor) -> Tensor:
        x = self.embed(x)
        for block in self.blocks:
            x = block(x)
        return self.classifier(x)


def vit_tiny(num_classes: int = 10, in_channels: int = 3, image_size: int = 32,
             patch_size: int | None = None) -> ViT:
    """ViT-Tiny: width 192, 12 blocks, 3 heads (5.5 M parameters at 224 px, patch 16)."""
    return ViT(num_classes=num_classes, in_channels=in_channels, image_size=image_size,
               patch_size=patch_size, dim=192, depth=12, heads=3)


def vit_mini(num_classes: int = 10, in_channels: int = 3, image_size: int = 32,
             patch_size: int | None = None) -> ViT:
    """A small ViT for CPU runs: width 64, 6 blocks, 4 heads."""
    return ViT(num_classes=num_classes, in_channels=in_channels, image_size=image_size,
               patch_size=patch_size, dim=64, depth=6, heads=4, mlp_ratio=2)


def vit_micro(num_classes: int = 10, in_channels: int = 3, image_size: int = 32,
              patch_size: int | None = None) -> ViT:
    """A test-sized ViT: width 16, 4 blocks, 2 heads."""
    return ViT(num_classes=num_classes, in_channels=in_channels, image_size=image_size,
               patch_size=patch_size, dim=16, depth=4, heads=2, mlp_ratio=2)
