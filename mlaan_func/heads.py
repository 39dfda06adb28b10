"""Auxiliary networks (heads) as ordinary ``nn.Module`` factories.

Each head is a plain module with parameters and BatchNorm buffers and no other state; the
core turns it into a pure function. Every head class defines ``reset_parameters`` that
re-initialises all of its parameters and buffers: convolutions ~ N(0, sqrt(2 / (k·k·C_out)))
with zero bias, BatchNorm weight 1, bias 0 and fresh running statistics, Linear layers
PyTorch's default.

Inputs are (N, C, H, W) feature maps.

>>> import torch
>>> linear(8, 10)(torch.randn(2, 8, 4, 4)).shape
torch.Size([2, 10])
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from einops.layers.torch import Rearrange, Reduce
from torch import Tensor, nn

from .core import ShapeError

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
        elif isinstance(m, nn.Linear):
            m.reset_parameters()


class Head(nn.Module):
    """Base of the heads: a ``layers`` chain, initialised by ``reset_parameters``."""

    def __init__(self, *layers: nn.Module):
        super().__init__()
        self.layers = nn.Sequential(*layers)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        init_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        _check_maps(self, x)
        return self.layers(x)


def _check_maps(head: nn.Module, x: Tensor) -> None:
    if x.ndim != 4:
        raise ShapeError(
            f"{type(head).__name__} takes (N, C, H, W) feature maps, got a tensor of shape "
            f"{tuple(x.shape)} ({x.ndim} dims); for (N, D) vectors use a linear head made from "
            "nn.Linear(D, classes), for (N, T, D) tokens pool the tokens first")


class LinearHead(Head):
    """Global average pool, Linear(C, n)."""

    def __init__(self, in_channels: int, num_classes: int):
        super().__init__(_global_pool(), nn.Linear(in_channels, num_classes))


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
        _check_maps(self, x)
        return self.decoder(x), self.classifier(x)


def linear(in_channels: int, num_classes: int) -> LinearHead:
    """Global average pool, Linear(C, n).

    >>> linear(4, 3)(torch.randn(2, 4, 5, 5)).shape
    torch.Size([2, 3])
    """
    return LinearHead(_positive_int(in_channels, "in_channels"), _positive_int(num_classes, "num_classes"))


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
