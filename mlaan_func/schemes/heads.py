"""Auxiliary networks (heads) as ordinary ``nn.Module`` factories.

Each head is a plain module with parameters and BatchNorm buffers and no other state; the
core turns it into a pure function. Every head class defines ``reset_parameters`` that
re-initialises all of its parameters and buffers: convolutions ~ N(0, sqrt(2 / (k·k·C_out)))
with zero bias, BatchNorm weight 1, bias 0 and fresh running statistics, Linear layers
PyTorch's default.

Inputs are (N, C, H, W) feature maps; ``linear`` also takes (N, T, D) tokens and (N, D)
vectors, and ``dgl_tokens``, ``mlp`` and ``infopro_tokens`` are the DGL and InfoPro heads for
tokens and vectors. ``for_shape`` picks the head for a feature shape. A head given features
of a rank it cannot take raises ``ShapeError`` naming the head to use.

>>> import torch
>>> linear(8, 10)(torch.randn(2, 8, 4, 4)).shape
torch.Size([2, 10])
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from einops import rearrange, reduce
from einops.layers.torch import Rearrange, Reduce
from torch import Tensor, fx, nn

from ..core.net import ShapeError

FEATURE_DIM = 128
"""Width of the InfoPro classifier's hidden layer and of its contrastive output."""

DECODER_WIDTH = 12
"""Hidden channels of the InfoPro decoder."""

DGL_WIDE_CHANNELS = 128
DGL_WIDE_FEATURES = 512


def _positive_int(value: object, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{what} must be a positive int, got {value!r}")
    return value


def _pair(value: int | Sequence[int], what: str) -> tuple[int, int]:
    if isinstance(value, int) and not isinstance(value, bool):
        value = (value, value)
    if not isinstance(value, Sequence) or len(value) != 2:
        raise ValueError(f"{what} must be an int or a pair (height, width), got {value!r}")
    return _positive_int(value[0], f"{what}[0]"), _positive_int(value[1], f"{what}[1]")


def _conv_bn_relu(c_in: int, c_out: int, kernel: int = 1, stride: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, kernel, stride, kernel // 2, bias=False),
            nn.BatchNorm2d(c_out), nn.ReLU()]


def _global_pool() -> nn.Module:
    return Reduce("n c h w -> n c", "mean")


def init_weights(module: nn.Module) -> None:
    """Re-initialise every conv, BatchNorm and Linear layer inside ``module``."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            k_h, k_w = m.kernel_size
            nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / (k_h * k_w * m.out_channels)))
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.Linear, nn.LayerNorm)):
            m.reset_parameters()


_RANK_NAMES = {2: "(N, D) vectors", 3: "(N, T, D) tokens", 4: "(N, C, H, W) feature maps"}
_HEAD_FOR_RANK = {2: "heads.mlp or heads.linear", 3: "heads.dgl_tokens, heads.linear or "
                  "heads.infopro_tokens", 4: "heads.dgl, heads.linear or heads.infopro"}


def check_rank(head: str, x: Tensor, ranks: Sequence[int]) -> None:
    """Raise ``ShapeError`` when ``x``'s rank is not one of ``ranks`` (of the head class named
    ``head``), naming the heads that take it."""
    if x.dim() not in ranks:
        takes = " or ".join(_RANK_NAMES.get(r, f"rank-{r} tensors") for r in ranks)
        use = _HEAD_FOR_RANK.get(x.dim(), "einops.rearrange to one of those ranks, or a head of your own")
        raise ShapeError(f"{head} takes {takes}, got features of shape {tuple(x.shape)}; "
                         f"use {use} (heads.for_shape picks one from the feature shape)")


fx.wrap("check_rank")  # a call in traced graphs (remat inside blocks), not a branch on a traced value


class Head(nn.Module):
    """Base of the heads: a ``layers`` chain, initialised by ``reset_parameters``;
    ``ranks`` are the feature ranks it takes."""

    ranks: tuple[int, ...] = (4,)

    def __init__(self, *layers: nn.Module):
        super().__init__()
        self.layers = nn.Sequential(*layers)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        init_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        check_rank(type(self).__name__, x, self.ranks)
        return self.layers(x)


class FeaturePool(nn.Module):
    """Features of any rank to (N, C): mean over the map of (N, C, H, W); the cls token
    (``tokens="cls"``, the first) or the mean over tokens (``"mean"``) of (N, T, D); (N, D)
    as it is."""

    def __init__(self, tokens: str = "mean"):
        super().__init__()
        if tokens not in ("mean", "cls"):
            raise ValueError(f"tokens must be 'mean' or 'cls', got {tokens!r}")
        self.tokens = tokens

    def forward(self, x: Tensor) -> Tensor:
        check_rank(type(self).__name__, x, (2, 3, 4))
        if x.dim() == 4:
            return reduce(x, "n c h w -> n c", "mean")
        if x.dim() == 3:
            return x[:, 0] if self.tokens == "cls" else reduce(x, "n t d -> n d", "mean")
        return x


class LinearHead(Head):
    """Pool (maps: global mean; tokens: cls token or mean), Linear(C, n)."""

    ranks = (2, 3, 4)

    def __init__(self, in_channels: int, num_classes: int, tokens: str = "mean"):
        super().__init__(FeaturePool(tokens), nn.Linear(in_channels, num_classes))


class DGLHead(Head):
    """DGL (Belilovsky et al.): pool to a quarter side (≥ 2), two 1×1 conv + BN + ReLU,
    pool to 2×2, flatten, three Linear layers (ReLU between)."""

    def __init__(self, in_channels: int, num_classes: int, spatial_size: tuple[int, int]):
        c = in_channels
        pool_size = tuple(max(2, side // 4) for side in spatial_size)
        super().__init__(
            nn.AdaptiveAvgPool2d(pool_size),
            *_conv_bn_relu(c, c), *_conv_bn_relu(c, c),
            nn.AdaptiveAvgPool2d((2, 2)),
            Rearrange("n c h w -> n (c h w)"),
            nn.Linear(4 * c, 4 * c), nn.ReLU(),
            nn.Linear(4 * c, 4 * c), nn.ReLU(),
            nn.Linear(4 * c, num_classes),
        )
        self.pool_size = pool_size


def _linear_bn_relu(f_in: int, f_out: int) -> list[nn.Module]:
    return [nn.Linear(f_in, f_out), nn.BatchNorm1d(f_out), nn.ReLU()]


class DGLWideHead(Head):
    """The released DGL+MLAAN head: three 1×1 conv + BN + ReLU to 128 channels at full
    resolution, global pool, Linear 128→512 + BN + ReLU, two Linear 512→512 + BN + ReLU,
    Linear 512→n."""

    def __init__(self, in_channels: int, num_classes: int):
        c, f = DGL_WIDE_CHANNELS, DGL_WIDE_FEATURES
        super().__init__(
            *_conv_bn_relu(in_channels, c), *_conv_bn_relu(c, c), *_conv_bn_relu(c, c),
            _global_pool(),
            *_linear_bn_relu(c, f), *_linear_bn_relu(f, f), *_linear_bn_relu(f, f),
            nn.Linear(f, num_classes),
        )


class InfoProDecoder(Head):
    """Bilinear upsample to the image size (``align_corners=True``, as the released InfoPro
    code), conv3×3 C→12 + BN + ReLU, conv3×3 12→image channels (with bias), sigmoid."""

    def __init__(self, in_channels: int, image_channels: int, image_size: tuple[int, int]):
        super().__init__(
            nn.Upsample(size=image_size, mode="bilinear", align_corners=True),
            *_conv_bn_relu(in_channels, DECODER_WIDTH, kernel=3),
            nn.Conv2d(DECODER_WIDTH, image_channels, 3, padding=1),
            nn.Sigmoid(),
        )


class InfoProClassifier(Head):
    """conv3×3 C→2C stride 2 (C→C stride 1 at the final width) + BN + ReLU, global pool,
    Linear→128, ReLU, Linear→out."""

    def __init__(self, in_channels: int, out_features: int, final_width: bool):
        c_out, stride = (in_channels, 1) if final_width else (2 * in_channels, 2)
        super().__init__(
            *_conv_bn_relu(in_channels, c_out, kernel=3, stride=stride),
            _global_pool(),
            nn.Linear(c_out, FEATURE_DIM), nn.ReLU(),
            nn.Linear(FEATURE_DIM, out_features),
        )


class InfoProHead(nn.Module):
    """Decoder and classifier side by side: ``h -> (reconstruction, task_output)``."""

    def __init__(self, decoder: InfoProDecoder, classifier: InfoProClassifier):
        super().__init__()
        self.decoder = decoder
        self.classifier = classifier

    def reset_parameters(self) -> None:
        init_weights(self)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self.decoder(x), self.classifier(x)


def linear(in_channels: int, num_classes: int, tokens: str = "mean") -> LinearHead:
    """Pool, Linear(C, n), for maps (N, C, H, W), tokens (N, T, D; ``tokens`` = ``"mean"``
    or ``"cls"``) and vectors (N, D).

    >>> linear(4, 3)(torch.randn(2, 4, 5, 5)).shape, linear(4, 3)(torch.randn(2, 7, 4)).shape
    (torch.Size([2, 3]), torch.Size([2, 3]))
    """
    return LinearHead(_positive_int(in_channels, "in_channels"), _positive_int(num_classes, "num_classes"),
                      tokens)


def dgl(in_channels: int, num_classes: int, spatial_size: int | Sequence[int]) -> DGLHead:
    """The DGL head for (C, H, W) = (``in_channels``, *``spatial_size``) feature maps.

    >>> head = dgl(4, 3, (16, 8))
    >>> head.pool_size, head(torch.randn(2, 4, 16, 8)).shape
    ((4, 2), torch.Size([2, 3]))
    """
    return DGLHead(_positive_int(in_channels, "in_channels"), _positive_int(num_classes, "num_classes"),
                   _pair(spatial_size, "spatial_size"))


def dgl_wide(in_channels: int, num_classes: int) -> DGLWideHead:
    """The wide head of the released DGL+MLAAN code (far more memory than ``dgl``).

    >>> dgl_wide(4, 3)(torch.randn(2, 4, 6, 6)).shape
    torch.Size([2, 3])
    """
    return DGLWideHead(_positive_int(in_channels, "in_channels"), _positive_int(num_classes, "num_classes"))


def infopro_decoder(in_channels: int, image_channels: int, image_size: int | Sequence[int]) -> InfoProDecoder:
    """InfoPro's decoder: a sigmoid image of ``image_size`` from a feature map.

    >>> infopro_decoder(8, 3, 32)(torch.randn(2, 8, 8, 8)).shape
    torch.Size([2, 3, 32, 32])
    """
    return InfoProDecoder(_positive_int(in_channels, "in_channels"),
                          _positive_int(image_channels, "image_channels"), _pair(image_size, "image_size"))


def infopro_classifier(in_channels: int, out_features: int, final_width: bool) -> InfoProClassifier:
    """InfoPro's auxiliary classifier; ``final_width`` keeps the width and resolution.

    >>> infopro_classifier(8, 10, final_width=False)(torch.randn(2, 8, 8, 8)).shape
    torch.Size([2, 10])
    """
    return InfoProClassifier(_positive_int(in_channels, "in_channels"),
                             _positive_int(out_features, "out_features"), bool(final_width))


def infopro(in_channels: int, num_classes: int, image_channels: int, image_size: int | Sequence[int],
            final_width: bool, contrastive: bool = True) -> InfoProHead:
    """Decoder + classifier: ``h -> (reconstruction, task_output)``.

    ``task_output`` is the raw 128-d feature when ``contrastive`` (the loss,
    ``losses.supervised_contrastive``, L2-normalises it), else ``num_classes`` logits.

    >>> recon, task = infopro(8, 10, 3, (32, 32), final_width=False)(torch.randn(2, 8, 16, 16))
    >>> recon.shape, task.shape
    (torch.Size([2, 3, 32, 32]), torch.Size([2, 128]))
    """
    num_classes = _positive_int(num_classes, "num_classes")
    out = FEATURE_DIM if contrastive else num_classes
    return InfoProHead(infopro_decoder(in_channels, image_channels, image_size),
                       infopro_classifier(in_channels, out, final_width))


class DGLTokenHead(Head):
    """DGL's head for (N, T, D) tokens: two token-wise pre-norm MLP layers (LayerNorm,
    Linear D→D, GELU) in place of the 1×1 convs, mean over tokens, then Linear(D, D) + GELU,
    Linear(D, n)."""

    ranks = (3,)

    def __init__(self, dim: int, num_classes: int):
        super().__init__(
            nn.LayerNorm(dim), nn.Linear(dim, dim), nn.GELU(),
            nn.LayerNorm(dim), nn.Linear(dim, dim), nn.GELU(),
            Reduce("n t d -> n d", "mean"),
            nn.Linear(dim, dim), nn.GELU(),
            nn.Linear(dim, num_classes),
        )


class MLPHead(Head):
    """DGL's head for (N, D) vectors: Linear(D, D) + ReLU twice, Linear(D, n)."""

    ranks = (2,)

    def __init__(self, dim: int, num_classes: int):
        super().__init__(nn.Linear(dim, dim), nn.ReLU(), nn.Linear(dim, dim), nn.ReLU(),
                         nn.Linear(dim, num_classes))


class PatchDecoder(Head):
    """InfoPro's decoder for tokens: each patch token predicts its patch's pixels (LayerNorm,
    Linear D → p²·C), arranged into the image, sigmoid. A leading cls token is dropped."""

    ranks = (3,)

    def __init__(self, dim: int, image_channels: int, image_size: tuple[int, int], patch_size: int,
                 cls_token: bool):
        self.grid = (image_size[0] // patch_size, image_size[1] // patch_size)
        self.patch_size, self.cls_token = patch_size, cls_token
        super().__init__(nn.LayerNorm(dim), nn.Linear(dim, patch_size * patch_size * image_channels),
                         nn.Sigmoid())

    def forward(self, x: Tensor) -> Tensor:
        check_rank(type(self).__name__, x, self.ranks)
        pixels = self.layers(x[:, 1:] if self.cls_token else x)
        return rearrange(pixels, "n (h w) (p q c) -> n c (h p) (w q)", h=self.grid[0], w=self.grid[1],
                         p=self.patch_size, q=self.patch_size)


class TokenInfoProClassifier(Head):
    """InfoPro's auxiliary classifier for tokens: mean over tokens, Linear→128, ReLU,
    Linear→out."""

    ranks = (3,)

    def __init__(self, dim: int, out_features: int):
        super().__init__(Reduce("n t d -> n d", "mean"), nn.Linear(dim, FEATURE_DIM), nn.ReLU(),
                         nn.Linear(FEATURE_DIM, out_features))


def dgl_tokens(dim: int, num_classes: int) -> DGLTokenHead:
    """The DGL-like head for (N, T, D) tokens.

    >>> dgl_tokens(8, 3)(torch.randn(2, 5, 8)).shape
    torch.Size([2, 3])
    """
    return DGLTokenHead(_positive_int(dim, "dim"), _positive_int(num_classes, "num_classes"))


def mlp(dim: int, num_classes: int) -> MLPHead:
    """The DGL-like head for (N, D) vectors.

    >>> mlp(8, 3)(torch.randn(2, 8)).shape
    torch.Size([2, 3])
    """
    return MLPHead(_positive_int(dim, "dim"), _positive_int(num_classes, "num_classes"))


def patch_layout(tokens: int, image_size: int | Sequence[int]) -> tuple[int, bool]:
    """``(patch size, cls token?)`` of ``tokens`` tokens over an image of ``image_size``:
    square patches tiling the image, with or without one leading cls token.

    >>> patch_layout(50, 28), patch_layout(49, 28), patch_layout(16, 32)
    ((4, True), (4, False), (8, False))
    """
    height, width = _pair(image_size, "image_size")
    for cls_token in (True, False):
        patches = tokens - int(cls_token)
        side = math.isqrt(height * width // max(patches, 1))
        if patches > 0 and side > 0 and height % side == 0 and width % side == 0 and \
                (height // side) * (width // side) == patches:
            return side, cls_token
    raise ValueError(f"{tokens} tokens are not square patches of a {height}x{width} image (with or without "
                     "a cls token); the InfoPro decoder for tokens needs patch tokens: give "
                     "infopro_tokens the right image_size, or use a head without a decoder")


def infopro_tokens(dim: int, num_classes: int, image_channels: int, image_size: int | Sequence[int],
                   tokens: int, contrastive: bool = True) -> "InfoProHead":
    """InfoPro's decoder + classifier for (N, T, D) patch tokens: ``h -> (reconstruction,
    task_output)``; the patch size and cls token are read from ``tokens`` and ``image_size``.

    >>> recon, task = infopro_tokens(8, 10, 1, 28, tokens=50)(torch.randn(2, 50, 8))
    >>> recon.shape, task.shape
    (torch.Size([2, 1, 28, 28]), torch.Size([2, 128]))
    """
    size = _pair(image_size, "image_size")
    patch, cls_token = patch_layout(tokens, size)
    dim = _positive_int(dim, "dim")
    out = FEATURE_DIM if contrastive else _positive_int(num_classes, "num_classes")
    return InfoProHead(PatchDecoder(dim, _positive_int(image_channels, "image_channels"), size, patch, cls_token),
                       TokenInfoProClassifier(dim, out))


def for_shape(kind: str, shape: Sequence[int], num_classes: int) -> nn.Module:
    """The auxiliary classifier ``kind`` (``"linear"`` or ``"dgl"``) for features of
    ``shape`` (batch excluded): (C, H, W) maps, (T, D) tokens or (D,) vectors.

    >>> type(for_shape("dgl", (5, 8), 3)).__name__, type(for_shape("dgl", (8,), 3)).__name__
    ('DGLTokenHead', 'MLPHead')
    """
    shape = tuple(shape)
    if kind == "linear" and len(shape) in (1, 2, 3):
        return linear(shape[0] if len(shape) != 2 else shape[1], num_classes)
    if kind == "dgl" and len(shape) == 3:
        return dgl(shape[0], num_classes, shape[1:])
    if kind == "dgl" and len(shape) == 2:
        return dgl_tokens(shape[1], num_classes)
    if kind == "dgl" and len(shape) == 1:
        return mlp(shape[0], num_classes)
    if kind == "dgl_wide" and len(shape) == 3:
        return dgl_wide(shape[0], num_classes)
    if kind not in ("linear", "dgl", "dgl_wide"):
        raise ValueError(f"unknown head {kind!r}; choose 'linear', 'dgl' or 'dgl_wide'")
    raise ValueError(f"head {kind!r} takes (C, H, W) feature maps; features of shape {shape} need "
                     "'linear' or 'dgl' (which have token and vector forms)")


PATCH_FUSIONS = ("mean", "tile")
"""How :class:`PatchFused` joins its patch outputs (see there)."""


def patch_bounds(size: int, parts: int) -> list[tuple[int, int]]:
    """``parts`` contiguous ``[start, stop)`` ranges tiling ``size``, cut at ``size·j // parts``
    (for two parts: ``[:size // 2]`` and ``[size // 2:]``, as the released HPFF code).

    >>> patch_bounds(8, 2), patch_bounds(5, 2)
    ([(0, 4), (4, 8)], [(0, 2), (2, 5)])
    """
    cuts = [size * j // parts for j in range(parts + 1)]
    return list(zip(cuts[:-1], cuts[1:]))


class PatchFused(nn.Module):
    """HPFF's patch feature fusion: the (N, C, H, W) map cut into a ``grid`` of patches, one
    head per patch (its own parameters), the outputs fused: ``"mean"`` averages them (patch
    logits scored as one prediction), ``"tile"`` lays image outputs out in the grid (each
    patch reconstructs its image patch)."""

    def __init__(self, make_head, grid: tuple[int, int], fuse: str):
        super().__init__()
        if fuse not in PATCH_FUSIONS:
            raise ValueError(f"fuse must be 'mean' (average the patch outputs) or 'tile' (lay image "
                             f"outputs out in the grid), got {fuse!r}")
        self.grid, self.fuse = grid, fuse
        self.heads = nn.ModuleList([make_head() for _ in range(grid[0] * grid[1])])

    def reset_parameters(self) -> None:
        for head in self.heads:
            head.reset_parameters()

    def forward(self, x: Tensor) -> Tensor:
        check_rank(type(self).__name__, x, (4,))
        rows, cols = patch_bounds(x.shape[2], self.grid[0]), patch_bounds(x.shape[3], self.grid[1])
        if any(a == b for a, b in rows + cols):
            raise ShapeError(f"a {x.shape[2]}x{x.shape[3]} map has an empty patch in a {self.grid[0]}x"
                             f"{self.grid[1]} grid; use a smaller grid for this module")
        outs = [self.heads[r * len(cols) + c](x[:, :, r0:r1, c0:c1])
                for r, (r0, r1) in enumerate(rows) for c, (c0, c1) in enumerate(cols)]
        if self.fuse == "mean":
            return torch.stack(outs).mean(dim=0)
        return torch.cat([torch.cat(outs[r * len(cols):(r + 1) * len(cols)], dim=3) for r in range(len(rows))],
                         dim=2)


def patch_fused(make_head, grid: int | Sequence[int] = 2, fuse: str = "mean") -> PatchFused:
    """One head per patch of a ``grid`` (an int or (rows, cols)) over the map, fused by
    ``fuse`` (``"mean"`` or ``"tile"``); ``make_head()`` builds each patch's head.

    >>> scored = patch_fused(lambda: linear(4, 3), grid=2)
    >>> scored(torch.randn(2, 4, 8, 8)).shape, len(scored.heads)
    (torch.Size([2, 3]), 4)
    >>> decoded = patch_fused(lambda: infopro_decoder(4, 3, 16), grid=2, fuse="tile")
    >>> decoded(torch.randn(2, 4, 8, 8)).shape
    torch.Size([2, 3, 32, 32])
    """
    if not callable(make_head):
        raise TypeError("patch_fused takes a function that builds one patch's head, e.g. "
                        "lambda: heads.dgl(c, n, (h // 2, w // 2))")
    return PatchFused(make_head, _pair(grid, "grid"), fuse)


class ChannelGroup(nn.Module):
    """Neuron groups: group ``group`` of ``groups`` equal channel groups (dim 1) passes as it
    is, every other channel is detached, so a loss on the output reaches only the group's
    neurons through this map."""

    def __init__(self, group: int, groups: int):
        super().__init__()
        if not 0 <= group < groups:
            raise ValueError(f"group {group} is not one of the {groups} groups (0 … {groups - 1})")
        self.group, self.groups = group, groups

    def forward(self, x: Tensor) -> Tensor:
        width = x.shape[1]
        if width % self.groups:
            raise ShapeError(f"{width} channels do not split into {self.groups} equal groups; pick a "
                             "number of groups that divides every module's width")
        size = width // self.groups
        own = torch.zeros(width, dtype=torch.bool, device=x.device)
        own[self.group * size:(self.group + 1) * size] = True
        return torch.where(own.view(1, -1, *([1] * (x.dim() - 2))), x, x.detach())


def channel_group(group: int, groups: int) -> ChannelGroup:
    """The map with every channel outside group ``group`` of ``groups`` detached.

    >>> x = torch.ones(1, 4, 2, 2, requires_grad=True)
    >>> channel_group(1, 2)(x).sum().backward()
    >>> x.grad[0, :, 0, 0].tolist()
    [0.0, 0.0, 1.0, 1.0]
    """
    return ChannelGroup(_positive_int(group + 1, "group + 1") - 1, _positive_int(groups, "groups"))


class Detached(nn.Module):
    """The map itself, detached: a loss on what follows reaches nothing before it."""

    def forward(self, x: Tensor) -> Tensor:
        return x.detach()


def detached() -> Detached:
    """A module ``x ↦ x.detach()`` (neuron groups read the other groups' heads on it).

    >>> x = torch.ones(2, requires_grad=True)
    >>> detached()(x).requires_grad
    False
    """
    return Detached()


class AugLocalHead(Head):
    """AugLocal's auxiliary net: fresh blocks of the sampled later layers' widths
    (``make_block(in, out, stride)``; stride 2 once per doubling of the width, at most one per
    block, as the released code), global pool, a BatchNorm1d when it has at most one block,
    Linear(C, n)."""

    def __init__(self, in_channels: int, widths: Sequence[int], num_classes: int, make_block):
        layers, c, pools = [], in_channels, 0
        for w in widths:
            if w < c or w % c or (w // c) & (w // c - 1):
                raise ValueError(f"AugLocal's auxiliary blocks widen by powers of two; a {c}-channel map "
                                 f"cannot feed a sampled layer of width {w}")
            pools += int(math.log2(w // c))
            stride = 2 if pools >= 1 else 1
            pools -= stride == 2
            layers.append(make_block(c, w, stride))
            c = w
        tail = [nn.BatchNorm1d(c)] if len(widths) <= 1 else []
        super().__init__(*layers, _global_pool(), *tail, nn.Linear(c, num_classes))


def auglocal(in_channels: int, widths: Sequence[int], num_classes: int, make_block=None) -> AugLocalHead:
    """AugLocal's auxiliary net for a (C, H, W) map: blocks of ``widths`` (the sampled later
    layers' widths), built by ``make_block(in, out, stride)`` (default: the CIFAR ResNet
    ``BasicBlock``), then pool and linear.

    >>> head = auglocal(4, [8, 8], 10)
    >>> [b.stride for b in head.layers[:2]], head(torch.randn(2, 4, 8, 8)).shape
    ([2, 1], torch.Size([2, 10]))
    """
    if make_block is None:
        from ..models.resnet import BasicBlock as make_block
    return AugLocalHead(_positive_int(in_channels, "in_channels"), [_positive_int(w, "width") for w in widths],
                        _positive_int(num_classes, "num_classes"), make_block)


class TokenReadout(Head):
    """A language model's readout for (N, T, D) tokens: LayerNorm, Linear(D, V) without bias,
    ``(N, T, V)`` next-token logits."""

    ranks = (3,)

    def __init__(self, dim: int, vocab_size: int):
        super().__init__(nn.LayerNorm(dim), nn.Linear(dim, vocab_size, bias=False))


def token_readout(dim: int, vocab_size: int) -> TokenReadout:
    """Next-token logits from (N, T, D) tokens.

    >>> token_readout(8, 20)(torch.randn(2, 5, 8)).shape
    torch.Size([2, 5, 20])
    """
    return TokenReadout(_positive_int(dim, "dim"), _positive_int(vocab_size, "vocab_size"))
