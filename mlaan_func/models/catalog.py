"""Backbones by name: every image backbone factory of ``mlaan_func.models``.

>>> "vit_tiny" in arch_names() and "resnet32" in arch_names()
True
>>> create("vit_micro", num_classes=10, in_channels=1, image_size=28).image_size
28
"""

from __future__ import annotations

import inspect
from typing import Callable

from torch import nn

from .imagenet_resnet import resnet18, resnet34, resnet50, resnet101, resnet152
from .resnet import resnet32, resnet110
from .vit import vit_micro, vit_mini, vit_tiny

FACTORIES: dict[str, Callable[..., nn.Module]] = {f.__name__: f for f in (
    resnet32, resnet110, resnet18, resnet34, resnet50, resnet101, resnet152, vit_tiny, vit_mini, vit_micro)}
"""Every backbone factory by name; a new backbone is added here and in ``models/__init__``."""


def _factories() -> dict[str, Callable[..., nn.Module]]:
    return FACTORIES


def arch_names() -> list[str]:
    """Names ``create`` accepts (``resnet32``, ``vit_tiny``, …)."""
    return sorted(_factories())


def create(arch: str, *, num_classes: int, in_channels: int, image_size: int) -> nn.Module:
    """The backbone ``arch`` for images of ``in_channels`` × ``image_size``²; factories that
    do not depend on the image size (the CIFAR ResNets) are not given it."""
    factories = _factories()
    if arch not in factories:
        raise ValueError(f"unknown arch {arch!r}; choose one of {', '.join(sorted(factories))}")
    factory = factories[arch]
    options = {"num_classes": num_classes, "in_channels": in_channels}
    if "image_size" in inspect.signature(factory).parameters:
        options["image_size"] = image_size
    return factory(**options)
