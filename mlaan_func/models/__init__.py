"""Backbones with addressable blocks.

>>> from mlaan_func import models
>>> net = models.CifarResNet(14, num_classes=10, in_channels=3, widths=(8, 16, 32))
>>> [name for name, _ in net.named_blocks()]
['stem', '1.0', '1.1', '2.0', '2.1', '3.0', '3.1', 'classifier']
"""

from .catalog import arch_names, create
from .imagenet_resnet import (Bottleneck, ImageNetBasicBlock, ImageNetResNet, ImageNetStem, resnet18,
                              resnet34, resnet50, resnet101, resnet152)
from .lm import DecoderLM, lm_micro  # a language model: not an image backbone of the catalog
from .resnet import BasicBlock, CifarResNet, Classifier, Stem, resnet32, resnet110
from .vit import ViT, vit_micro, vit_mini, vit_tiny

__all__ = ["BasicBlock", "CifarResNet", "Classifier", "Stem", "resnet32", "resnet110",
           "ViT", "vit_micro", "vit_mini", "vit_tiny",
           "Bottleneck", "ImageNetBasicBlock", "ImageNetResNet", "ImageNetStem",
           "resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "DecoderLM"]
