"""The released MLAAN ImageNet auxiliary head, sized by its input width (shipped data).

Narrow features (C below ``narrow_below`` in the data file, 256) get two conv1×1 + BN + ReLU
(C → 2C → C) before the global pool and the linear layer; wide features only the pool and
the linear layer.

>>> import torch
>>> imagenet(64, 10)(torch.randn(2, 64, 7, 7)).shape
torch.Size([2, 10])
>>> len(imagenet(64, 10).layers), len(imagenet(512, 10).layers)
(8, 2)
"""

from __future__ import annotations

from einops.layers.torch import Reduce
from torch import nn

from .heads import Head
from .published import tables


def _conv_bn_relu(c_in: int, c_out: int) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU()]


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
