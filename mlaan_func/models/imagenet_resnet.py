"""ImageNet ResNets (He et al. 2016; torchvision's "v1.5" stride placement) as named blocks.

ResNet-18/34 use BasicBlocks, ResNet-50/101/152 Bottlenecks (stride on the 3×3 conv, 4×
expansion). Blocks are named ``"stem"`` (conv7×7/2 + BN + ReLU + max-pool 3×3/2), ``"s.b"``
for stages 1–4 (blocks from 0) and ``"classifier"`` (global pool + linear), like the CIFAR
ResNets, so splits, trunks and heads address them the same way.

>>> net = resnet18(num_classes=10)
>>> [name for name, _ in net.named_blocks()][:4], len(net.named_blocks())
(['stem', '1.0', '1.1', '2.0'], 10)
>>> net(torch.zeros(1, 3, 64, 64)).shape
torch.Size([1, 10])
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from .resnet import Classifier, StagedResNet

LAYOUTS: dict[str, tuple[str, tuple[int, int, int, int]]] = {
    "resnet18": ("basic", (2, 2, 2, 2)),
    "resnet34": ("basic", (3, 4, 6, 3)),
    "resnet50": ("bottleneck", (3, 4, 6, 3)),
    "resnet101": ("bottleneck", (3, 4, 23, 3)),
    "resnet152": ("bottleneck", (3, 8, 36, 3)),
}
"""Block kind and blocks per stage of each ImageNet ResNet."""

WIDTHS = (64, 128, 256, 512)


def _init(module: nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            m.reset_running_stats()
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def _shortcut(in_channels: int, out_channels: int, stride: int) -> nn.Sequential:
    if stride == 1 and in_channels == out_channels:
        return nn.Sequential()
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, stride, bias=False),
                         nn.BatchNorm2d(out_channels))


class ImageNetStem(nn.Module):
    """conv7×7 stride 2 (channels→64) + BN + ReLU + max-pool 3×3 stride 2: a quarter of each side."""

    def __init__(self, in_channels: int, width: int = 64):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, width, 7, 2, 3, bias=False)
        self.bn = nn.BatchNorm2d(width)
        self.pool = nn.MaxPool2d(3, 2, 1)
        _init(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(torch.relu(self.bn(self.conv(x))))


class ImageNetBasicBlock(nn.Module):
    """Two conv3×3 + BN with a residual (conv1×1 + BN shortcut when the shape changes).

    ``zero_init_residual`` starts the last BN's weight at 0, so the block starts as its shortcut.
    """

    expansion = 1

    def __init__(self, in_channels: int, width: int, stride: int = 1, zero_init_residual: bool = False):
        super().__init__()
        out = width * self.expansion
        self.conv1 = nn.Conv2d(in_channels, width, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.shortcut = _shortcut(in_channels, out, stride)
        self.in_channels, self.out_channels, self.stride = in_channels, out, stride
        _init(self)
        if zero_init_residual:
            nn.init.zeros_(self.bn2.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class Bottleneck(nn.Module):
    """conv1×1 + BN + ReLU, conv3×3 (the stride) + BN + ReLU, conv1×1 to 4× width + BN, residual.

    ``zero_init_residual`` starts the last BN's weight at 0.
    """

    expansion = 4

    def __init__(self, in_channels: int, width: int, stride: int = 1, zero_init_residual: bool = False):
        super().__init__()
        out = width * self.expansion
        self.conv1 = nn.Conv2d(in_channels, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out)
        self.shortcut = _shortcut(in_channels, out, stride)
        self.in_channels, self.out_channels, self.stride = in_channels, out, stride
        _init(self)
        if zero_init_residual:
            nn.init.zeros_(self.bn3.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = torch.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return torch.relu(out + self.shortcut(x))


class ImageNetResNet(StagedResNet):
    """Stem, four stages at widths 64/128/256/512 (× expansion), classifier.

    Stages 2–4 open with a stride-2 block; stage 1 keeps the stem's resolution.
    """

    def __init__(self, arch: str, num_classes: int = 1000, in_channels: int = 3, *,
                 zero_init_residual: bool = False, widths: Sequence[int] = WIDTHS):
        super().__init__()
        if arch not in LAYOUTS:
            raise ValueError(f"unknown ImageNet ResNet {arch!r}; choose one of {', '.join(LAYOUTS)}")
        if num_classes < 1 or in_channels < 1:
            raise ValueError(f"num_classes and in_channels must be positive, got {num_classes}, {in_channels}")
        if len(widths) != 4:
            raise ValueError(f"an ImageNet ResNet has 4 stages; got widths {tuple(widths)}")
        kind, per_stage = LAYOUTS[arch]
        block = ImageNetBasicBlock if kind == "basic" else Bottleneck
        self.arch, self.num_classes, self.in_channels = arch, num_classes, in_channels
        self.stem = ImageNetStem(in_channels, widths[0])
        self.stages = nn.ModuleList()
        width_in = widths[0]
        for s, (width, n) in enumerate(zip(widths, per_stage)):
            blocks = []
            for b in range(n):
                blocks.append(block(width_in, width, 2 if (b == 0 and s > 0) else 1, zero_init_residual))
                width_in = width * block.expansion
            self.stages.append(nn.Sequential(*blocks))
        self.classifier = Classifier(width_in, num_classes)


def resnet18(num_classes: int = 1000, in_channels: int = 3, *, zero_init_residual: bool = False) -> ImageNetResNet:
    """ImageNet ResNet-18: BasicBlocks 2-2-2-2 (11.7 M parameters at 1000 classes)."""
    return ImageNetResNet("resnet18", num_classes, in_channels, zero_init_residual=zero_init_residual)


def resnet34(num_classes: int = 1000, in_channels: int = 3, *, zero_init_residual: bool = False) -> ImageNetResNet:
    """ImageNet ResNet-34: BasicBlocks 3-4-6-3 (21.8 M parameters at 1000 classes)."""
    return ImageNetResNet("resnet34", num_classes, in_channels, zero_init_residual=zero_init_residual)


def resnet50(num_classes: int = 1000, in_channels: int = 3, *, zero_init_residual: bool = False) -> ImageNetResNet:
    """ImageNet ResNet-50: Bottlenecks 3-4-6-3 (25.6 M parameters at 1000 classes)."""
    return ImageNetResNet("resnet50", num_classes, in_channels, zero_init_residual=zero_init_residual)


def resnet101(num_classes: int = 1000, in_channels: int = 3, *, zero_init_residual: bool = False) -> ImageNetResNet:
    """ImageNet ResNet-101: Bottlenecks 3-4-23-3 (44.5 M parameters at 1000 classes)."""
    return ImageNetResNet("resnet101", num_classes, in_channels, zero_init_residual=zero_init_residual)


def resnet152(num_classes: int = 1000, in_channels: int = 3, *, zero_init_residual: bool = False) -> ImageNetResNet:
    """ImageNet ResNet-152: Bottlenecks 3-8-36-3 (60.2 M parameters at 1000 classes)."""
    return ImageNetResNet("resnet152", num_classes, in_channels, zero_init_residual=zero_init_residual)
