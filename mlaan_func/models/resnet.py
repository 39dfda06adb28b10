"""CIFAR ResNets (He et al. 2016) as an ordered list of named blocks.

Blocks are named ``"stem"``, ``"stage.block"`` (stages from 1, blocks from 0) and
``"classifier"`` (global pool + linear), which always belongs to the last module.

>>> net = resnet32(num_classes=10)
>>> [name for name, _ in net.named_blocks()][:3]
['stem', '1.0', '1.1']
>>> net(torch.zeros(2, 3, 32, 32)).shape
torch.Size([2, 10])
"""

from __future__ import annotations

import math

import torch
from einops.layers.torch import Reduce
from torch import nn


def _init_conv(conv: nn.Conv2d) -> None:
    k_h, k_w = conv.kernel_size
    nn.init.normal_(conv.weight, 0.0, math.sqrt(2.0 / (k_h * k_w * conv.out_channels)))


def _init_bn(bn: nn.BatchNorm2d) -> None:
    bn.reset_running_stats()
    nn.init.ones_(bn.weight)
    nn.init.zeros_(bn.bias)


class Stem(nn.Module):
    """conv3×3(channels→width) + BN + ReLU."""

    def __init__(self, in_channels: int, width: int):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, width, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(width)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        _init_conv(self.conv)
        _init_bn(self.bn)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.bn(self.conv(x)))


class BasicBlock(nn.Module):
    """Two conv3×3 + BN with a residual; conv1×1 + BN shortcut when shape changes."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )
        self.in_channels, self.out_channels, self.stride = in_channels, out_channels, stride
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                _init_conv(m)
            elif isinstance(m, nn.BatchNorm2d):
                _init_bn(m)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class Classifier(nn.Module):
    """Global average pool + Linear."""

    def __init__(self, in_channels: int, num_classes: int):
        super().__init__()
        self.pool = Reduce("n c h w -> n c", "mean")
        self.fc = nn.Linear(in_channels, num_classes)

    def reset_parameters(self) -> None:
        self.fc.reset_parameters()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(x))


class StagedResNet(nn.Module):
    """A ResNet as ``stem``, ``stages`` (an ``nn.ModuleList`` of ``nn.Sequential``) and
    ``classifier``, addressable per block: ``"stem"``, ``"1.0"`` … , ``"classifier"``."""

    def named_blocks(self) -> list[tuple[str, nn.Module]]:
        """The ordered blocks local learning splits between: stem, ``s.b``, classifier."""
        blocks: list[tuple[str, nn.Module]] = [("stem", self.stem)]
        for s, stage in enumerate(self.stages, start=1):
            blocks += [(f"{s}.{b}", block) for b, block in enumerate(stage)]
        blocks.append(("classifier", self.classifier))
        return blocks

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for _, block in self.named_blocks():
            x = block(x)
        return x


class CifarResNet(StagedResNet):
    """Stem, three stages of BasicBlocks at widths 16/32/64, classifier."""

    def __init__(self, depth: int, num_classes: int = 10, in_channels: int = 3,
                 widths: tuple[int, int, int] = (16, 32, 64)):
        super().__init__()
        if (depth - 2) % 6 != 0 or depth < 8:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2 with n >= 1 (20, 32, 56, 110, ...), got {depth}")
        if num_classes < 1 or in_channels < 1:
            raise ValueError(f"num_classes and in_channels must be positive, got {num_classes}, {in_channels}")
        per_stage = (depth - 2) // 6
        self.depth, self.num_classes, self.in_channels = depth, num_classes, in_channels
        self.stem = Stem(in_channels, widths[0])
        self.stages = nn.ModuleList()
        width_in = widths[0]
        for s, width in enumerate(widths):
            blocks = [BasicBlock(width_in if b == 0 else width, width, 2 if (b == 0 and s > 0) else 1)
                      for b in range(per_stage)]
            self.stages.append(nn.Sequential(*blocks))
            width_in = width
        self.classifier = Classifier(widths[-1], num_classes)


def resnet32(num_classes: int = 10, in_channels: int = 3) -> CifarResNet:
    """CIFAR ResNet-32: 5 BasicBlocks per stage (0.46 M parameters)."""
    return CifarResNet(32, num_classes, in_channels)


def resnet110(num_classes: int = 10, in_channels: int = 3) -> CifarResNet:
    """CIFAR ResNet-110: 18 BasicBlocks per stage (1.7 M parameters)."""
    return CifarResNet(110, num_classes, in_channels)
