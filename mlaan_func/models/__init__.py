"""Backbones with addressable blocks."""

from .resnet import BasicBlock, CifarResNet, Classifier, Stem, resnet32, resnet110

__all__ = ["BasicBlock", "CifarResNet", "Classifier", "Stem", "resnet32", "resnet110"]
