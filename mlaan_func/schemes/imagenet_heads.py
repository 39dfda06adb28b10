"""The released ImageNet auxiliary heads: MLAAN's classifier head, sized by its input width
(shipped data), and InfoPro's ImageNet decoder + classifier.

MLAAN: narrow features (C below ``narrow_below`` in the data file, 256) get two conv1×1 + BN +
ReLU (C → 2C → C) before the global pool and the linear layer; wide features only the pool
and the linear layer.

>>> import torch
>>> imagenet(64, 10)(torch.randn(2, 64, 7, 7)).shape
torch.Size([2, 10])
>>> len(imagenet(64, 10).layers), len(imagenet(512, 10).layers)
(8, 2)
"""

from __future__ import annotations

from typing import Sequence

from einops.layers.torch import Reduce
from torch import nn

from .heads import FEATURE_DIM, Head, InfoProHead
from .tables import tables


def _conv_bn_relu(c_in: int, c_out: int, kernel: int = 1, stride: int = 1, bias: bool = False) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, kernel, stride, kernel // 2, bias=bias), nn.BatchNorm2d(c_out), nn.ReLU()]


class ImageNetHead(Head):
    """[conv1×1 C→eC + BN + ReLU, conv1×1 eC→C + BN + ReLU] when C is narrow, then global
    average pool and Linear(C, n)."""

    def __init__(self, in_channels: int, num_classes: int, narrow_below: int, expansion: int):
        if in_channels < 1 or num_classes < 1:
            raise ValueError(f"in_channels and num_classes must be positive, got {in_channels}, {num_classes}")
        body = (_conv_bn_relu(in_channels, expansion * in_channels) + _conv_bn_relu(expansion * in_channels, in_channels)
                if in_channels < narrow_below else [])
        super().__init__(*body, Reduce("n c h w -> n c", "mean"), nn.Linear(in_channels, num_classes))


def imagenet(in_channels: int, num_classes: int) -> ImageNetHead:
    """The released ImageNet head for ``in_channels`` features (``imagenet_heads`` in the data)."""
    spec = tables()["imagenet_heads"]
    return ImageNetHead(in_channels, num_classes, int(spec["narrow_below"]), int(spec["expansion"]))


DECODER_WIDTHS = (128, 32, 12)
"""Channels of the released InfoPro ImageNet decoder after its 1×1 conv and each upsampling."""

CLASSIFIER_WIDTHS = (128, 256, 512, 2048)
"""Channels of the released InfoPro ImageNet classifier's four conv + BN + ReLU layers."""


class InfoProImageNetDecoder(Head):
    """conv1×1 C→128 + BN + ReLU, then three times: bilinear upsample (to a quarter, half, the
    whole image side) and conv3×3 (128→32, 32→12 with BN + ReLU, 12→image channels); sigmoid.
    Upsampling after the channel reduction keeps the full-resolution maps 12 channels wide."""

    def __init__(self, in_channels: int, image_channels: int, image_size: tuple[int, int]):
        h, w = image_size
        c0, c1, c2 = DECODER_WIDTHS
        super().__init__(
            *_conv_bn_relu(in_channels, c0, bias=True),
            nn.Upsample(size=(h // 4, w // 4), mode="bilinear", align_corners=True),
            *_conv_bn_relu(c0, c1, 3, bias=True),
            nn.Upsample(size=(h // 2, w // 2), mode="bilinear", align_corners=True),
            *_conv_bn_relu(c1, c2, 3, bias=True),
            nn.Upsample(size=(h, w), mode="bilinear", align_corners=True),
            nn.Conv2d(c2, image_channels, 3, padding=1),
            nn.Sigmoid(),
        )


class InfoProImageNetClassifier(Head):
    """conv1×1 C→128, conv3×3 128→256 stride 2, conv3×3 256→512 stride 2, conv1×1 512→2048
    (each + BN + ReLU), global pool, Linear(2048, out)."""

    def __init__(self, in_channels: int, out_features: int):
        a, b, c, d = CLASSIFIER_WIDTHS
        super().__init__(
            *_conv_bn_relu(in_channels, a), *_conv_bn_relu(a, b, 3, 2), *_conv_bn_relu(b, c, 3, 2),
            *_conv_bn_relu(c, d), Reduce("n c h w -> n c", "mean"), nn.Linear(d, out_features),
        )


def infopro_imagenet(in_channels: int, num_classes: int, image_channels: int, image_size: int | Sequence[int],
                     contrastive: bool = False) -> InfoProHead:
    """The released InfoPro ImageNet head (decoder + classifier): ``h -> (reconstruction, task)``.
    The released code trains the task output with cross-entropy (``contrastive=False``).

    >>> import torch
    >>> recon, task = infopro_imagenet(512, 10, 3, 64)(torch.randn(2, 512, 8, 8))
    >>> recon.shape, task.shape
    (torch.Size([2, 3, 64, 64]), torch.Size([2, 10]))
    """
    size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    out = FEATURE_DIM if contrastive else num_classes
    return InfoProHead(InfoProImageNetDecoder(in_channels, image_channels, size),
                       InfoProImageNetClassifier(in_channels, out))
