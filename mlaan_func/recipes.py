"""The field's methods around MLAAN as short compositions of the combinators (issue #23).

Each recipe returns an ordered list of objectives like :mod:`mlaan_func.schemes` (which
re-exports them) and is tested against an independent plain-PyTorch implementation in
``tests/test_recipes.py``; ``docs/schemes.md`` lists where each paper and its released code
differ.

>>> import mlaan_func as mf
>>> net = mf.from_module(mf.models.CifarResNet(14, num_classes=10, widths=(4, 8, 8)))
>>> [o.name for o in hpff(net, ["1.0", "2.0"], input_shape=(3, 8, 8))]
['m1.cascaded', 'm1.independent', 'm2.cascaded', 'final']
"""

from __future__ import annotations

from typing import Sequence

from torch import nn

from . import heads, losses
from .combinators import Objective, cascade, local_loss, split
from .core import Net
from .losses import cross_entropy
from .schemes import (CIFAR10_MEAN, CIFAR10_STD, DEFAULT_LAMBDAS, _final_width, classifier_head,
                      e2e, module_shapes, multilaminar, num_classes_of, window_width)

HPFF_HEADS = ("dgl", "infopro")


def _patch_head(kind: str, shape: Sequence[int], n: int, grid: int) -> nn.Module:
    c, h, w = shape
    return heads.patch_fused(lambda: classifier_head(kind, (c, max(h // grid, 1), max(w // grid, 1)), n), grid)


def _patch_infopro(shape, n, input_shape, final_width: int, grid: int, contrastive: bool) -> nn.Module:
    c = shape[0]
    image_channels, height, width = input_shape
    if height % grid or width % grid:
        raise ValueError(f"HPFF's patch decoders tile the image: {height}x{width} does not split into a "
                         f"{grid}x{grid} grid; pick a grid that divides the image size")
    out = heads.FEATURE_DIM if contrastive else n
    decoders = heads.patch_fused(lambda: heads.infopro_decoder(c, image_channels, (height // grid, width // grid)),
                                 grid, fuse="tile")
    return heads.InfoProHead(decoders, heads.infopro_classifier(c, out, final_width=c == final_width))


def hpff(backbone: Net, at: Sequence[str], *, input_shape: Sequence[int] = (3, 32, 32), head: str = "dgl",
         trunks: str | None = None, width: int | None = None, grid: int = 2, w_x: float = 0.001,
         w_y: float = 0.999, lambdas: Sequence[float] = DEFAULT_LAMBDAS, contrastive: bool = False,
         mean: Sequence[float] = CIFAR10_MEAN, std: Sequence[float] = CIFAR10_STD, **options) -> list[Objective]:
    """HPFF (Su et al., arXiv 2407.05638): the hierarchical cascade (for ``W-1 ≤ i ≤ K-2`` a
    cascaded objective ``w_y · L(E_i ∘ … ∘ E_{i-W+1})`` beside an independent one
    ``w_x · L(E_i)``; the last module scored by ``w_y · CE`` through the final window,
    ``m{K-1}.cascaded``, and ``w_x · CE`` alone, ``final``, which comes last because the
    window produces its input), with patch feature fusion on the cascaded heads.

    ``head="dgl"``: DGL classifiers; the cascaded one is one head per patch of a ``grid`` ×
    ``grid`` split, logits averaged. ``head="infopro"`` (the released CIFAR code): the
    independent head is InfoPro's classifier alone; the cascaded one is a decoder per patch,
    each reconstructing its image patch (BCE summed over patches as released, hence
    ``λ1 · grid²`` on the tiled image's mean BCE), beside the classifier. ``trunks="rule"``
    puts MLAAN's leap trunks in front of the cascaded heads (HPFF on MLAAN);
    ``W`` = 2 by default.
    """
    if head not in HPFF_HEADS:
        raise ValueError(f"unknown HPFF head {head!r}; choose one of {HPFF_HEADS}")
    modules = split(backbone, at)
    k = len(modules)
    if k == 1:
        return e2e(backbone)
    n, final = num_classes_of(backbone, input_shape), _final_width(backbone, input_shape)
    task = losses.supervised_contrastive(0.07) if contrastive else cross_entropy

    def independent(i, shape):
        if head == "dgl":
            return classifier_head("dgl", shape, n), cross_entropy
        return heads.infopro_classifier(shape[0], heads.FEATURE_DIM if contrastive else n, shape[0] == final), task

    def cascaded(i, shape):
        if head == "dgl":
            return _patch_head("dgl", shape, n, grid), cross_entropy
        lam1, lam2 = losses.infopro_lambdas(i, k, *lambdas)
        return (_patch_infopro(shape, n, input_shape, final, grid, contrastive),
                losses.weighted_sum((losses.reconstruction_bce(mean, std), lam1 * grid * grid), (task, lam2)))

    w = window_width(width, 2, k)
    objectives = multilaminar(backbone, at, input_shape=input_shape, width=w, independent=independent,
                              cascaded=cascaded, trunks=trunks, w_x=w_x, w_y=w_y, **options)[:-1]
    return objectives + [local_loss(cascade(*modules[k - w:]), None, cross_entropy, w_y, name=f"m{k - 1}.cascaded"),
                         local_loss(modules[-1], None, cross_entropy, w_x, name="final")]
