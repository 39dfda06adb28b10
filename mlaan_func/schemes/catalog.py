"""Published schemes, each a short composition of the combinators.

A scheme is an ordered list of objectives; the last one is named ``"final"`` and scores the
backbone's own classifier.

>>> import mlaan_func as mf
>>> net = mf.from_module(mf.models.resnet32())
>>> [o.name for o in dgl(net, ["1.4", "2.4"], input_shape=(3, 32, 32))]
['m0', 'm1', 'final']
"""

from __future__ import annotations

from typing import Callable, Sequence

from torch import nn

from ..combinators import Objective, cascade, local_loss, split
from ..core.net import Net, from_module, output_shape
from . import heads, losses
from .losses import cross_entropy

_PROBE_BATCH = 2


def module_shapes(modules: Sequence[Net], input_shape: Sequence[int]) -> list[tuple[int, ...]]:
    """The output shape (without batch) of each module in turn, for one input of ``input_shape``."""
    shape, shapes = (_PROBE_BATCH, *input_shape), []
    for m in modules:
        shape = output_shape(m, shape)
        shapes.append(tuple(shape[1:]))
    return shapes


def num_classes_of(backbone: Net, input_shape: Sequence[int]) -> int:
    """The number of outputs of ``backbone``'s classifier."""
    return output_shape(backbone, (_PROBE_BATCH, *input_shape))[-1]


def classifier_head(kind: str, shape: Sequence[int], num_classes: int, *,
                    final_width: int | None = None) -> nn.Module:
    """An auxiliary classifier (``"linear"``, ``"dgl"``, ``"dgl_wide"`` or ``"infopro_1c2f"``)
    for a feature map of ``shape`` = (C, H, W). ``"infopro_1c2f"`` (InfoPro's classifier with
    ``num_classes`` logits, the released DGL baseline's head) needs the backbone's
    ``final_width``: a map of that width keeps its width and resolution."""
    if len(shape) != 3:  # tokens (T, D) or vectors (D,)
        return heads.for_shape(kind, shape, num_classes)
    channels, height, width = shape
    if kind == "linear":
        return heads.linear(channels, num_classes)
    if kind == "dgl":
        return heads.dgl(channels, num_classes, (height, width))
    if kind == "dgl_wide":
        return heads.dgl_wide(channels, num_classes)
    if kind == "infopro_1c2f":
        if final_width is None:
            raise ValueError("head 'infopro_1c2f' needs final_width (the backbone's last feature width): "
                             "pass final_width=..., or build it through mf.schemes.dgl")
        return heads.infopro_classifier(channels, num_classes, final_width=channels == final_width)
    if kind == "imagenet":
        from .imagenet_heads import imagenet
        return imagenet(channels, num_classes)
    raise ValueError(f"unknown head {kind!r}; choose 'linear', 'dgl', 'dgl_wide', 'infopro_1c2f' or 'imagenet'")


def e2e(backbone: Net) -> list[Objective]:
    """End-to-end training: one module, the backbone's own cross-entropy."""
    return [local_loss(backbone, None, cross_entropy, name="final")]


def dgl(backbone: Net, at: Sequence[str], *, input_shape: Sequence[int] = (3, 32, 32),
        head: str = "dgl") -> list[Objective]:
    """DGL (Belilovsky et al.): module ``i < K-1`` trains on ``CE(head_i(E_i(sg h_{i-1})))``;
    the last module on the backbone's classifier. ``at`` is the split (K = len(at) + 1).
    ``head="infopro_1c2f"`` is the released DGL baseline of the InfoPro and MLAAN papers
    (InfoPro's ``1c2f`` classifier with cross-entropy); ``"dgl"`` is the DGL paper's head."""
    modules = split(backbone, at)
    shapes = module_shapes(modules, input_shape)
    n = num_classes_of(backbone, input_shape)
    final = _final_width(backbone, input_shape) if head == "infopro_1c2f" else None
    objectives = [
        local_loss(m, from_module(classifier_head(head, s, n, final_width=final), name=f"head{i}"),
                   cross_entropy, name=f"m{i}")
        for i, (m, s) in enumerate(zip(modules[:-1], shapes))
    ]
    objectives.append(local_loss(modules[-1], None, cross_entropy, name="final"))
    return objectives


HeadFactory = Callable[[int, Sequence[int]], tuple[nn.Module, Callable]]
"""``(module index, feature shape) -> (head module, loss)``."""

# The released InfoPro/MLAAN constants (as in data.STATS), so that the de-normalised image the
# decoder reconstructs is the released one; they differ from the usual 0.4914… in the 4th decimal.
CIFAR10_MEAN = (125.3 / 255, 123.0 / 255, 113.9 / 255)
CIFAR10_STD = (63.0 / 255, 62.1 / 255, 66.7 / 255)
DEFAULT_LAMBDAS = (5.0, 0.5, 0.0, 0.0)


def _final_width(backbone: Net, input_shape: Sequence[int]) -> int:
    features = Net(backbone.blocks[:-1]) if len(backbone.blocks) > 1 else backbone
    return output_shape(features, (_PROBE_BATCH, *input_shape))[1]


def stage_fraction(name: str, modules: int) -> float:
    """The released InfoPro+MLAAN's λ interpolation point for the module ending at block
    ``name``: ``r = stage / (K - 2)`` with stages counted from 1 (0 when K ≤ 2 or for the stem).

    >>> stage_fraction("1.4", 8), stage_fraction("3.0", 15)
    (0.16666666666666666, 0.23076923076923078)
    """
    head = name.split(".")[0]
    return int(head) / (modules - 2) if head.isdigit() and modules > 2 else 0.0


def infopro_loss(i: int, modules: int, lambdas: Sequence[float], *, contrastive: bool,
                 mean: Sequence[float], std: Sequence[float], stage_fraction: float | None = None,
                 supcon_anchors: str = "all"):
    """``λ1(i) · BCE(reconstruction) + λ2(i) · task`` for module ``i`` of ``modules``.

    λ is interpolated by module (``r = i / max(K-2, 1)``) or, with ``stage_fraction``, at that
    ``r`` (the released InfoPro+MLAAN: :func:`stage_fraction`). ``supcon_anchors``: see
    :func:`mlaan_func.losses.supervised_contrastive` (``"all"`` reproduces the released code).
    """
    ixx_1, ixy_1, ixx_2, ixy_2 = lambdas
    if stage_fraction is None:
        lam1, lam2 = losses.infopro_lambdas(i, modules, ixx_1, ixy_1, ixx_2, ixy_2)
    else:
        r = stage_fraction
        lam1, lam2 = ixx_1 * (1 - r) + ixx_2 * r, ixy_1 * (1 - r) + ixy_2 * r
    task = losses.supervised_contrastive(0.07, supcon_anchors) if contrastive else cross_entropy
    return losses.weighted_sum((losses.reconstruction_bce(mean, std), lam1), (task, lam2))


def infopro_head(shape: Sequence[int], num_classes: int, input_shape: Sequence[int], final_width: int,
                 contrastive: bool) -> nn.Module:
    """Decoder + classifier on a (C, H, W) feature map or (T, D) patch tokens, for images of
    ``input_shape``."""
    if len(shape) == 2:
        return heads.infopro_tokens(shape[1], num_classes, input_shape[0], tuple(input_shape[1:]),
                                    tokens=shape[0], contrastive=contrastive)
    channels = shape[0]
    return heads.infopro(channels, num_classes, input_shape[0], tuple(input_shape[1:]),
                         final_width=channels == final_width, contrastive=contrastive)


def imagenet_infopro_head(shape: Sequence[int], num_classes: int, input_shape: Sequence[int], final_width: int,
                          contrastive: bool) -> nn.Module:
    """The released InfoPro ImageNet decoder + classifier (``infopro(..., head="imagenet")``)."""
    from .imagenet_heads import infopro_imagenet

    return infopro_imagenet(shape[0], num_classes, input_shape[0], tuple(input_shape[1:]), contrastive)


def infopro(backbone: Net, at: Sequence[str], *, input_shape: Sequence[int] = (3, 32, 32),
            lambdas: Sequence[float] | None = None, contrastive: bool = True,
            mean: Sequence[float] = CIFAR10_MEAN, std: Sequence[float] = CIFAR10_STD,
            supcon_anchors: str = "all", head: str = "infopro") -> list[Objective]:
    """InfoPro (Wang et al.): module ``i < K-1`` trains on ``λ1·BCE(decoder(h_i), image) +
    λ2·task(classifier(h_i))`` (task: supervised contrastive by default); the last module on
    the backbone's classifier. ``lambdas = (ixx_1, ixy_1, ixx_2, ixy_2)``;
    ``supcon_anchors="all"`` averages the contrastive loss as the released code.
    ``head="imagenet"`` uses the released ImageNet decoder and classifier (pass
    ``contrastive=False`` as released)."""
    if head not in ("infopro", "imagenet"):
        raise ValueError(f"unknown InfoPro head {head!r}; choose 'infopro' or 'imagenet'")
    modules = split(backbone, at)
    shapes = module_shapes(modules, input_shape)
    n, final = num_classes_of(backbone, input_shape), _final_width(backbone, input_shape)
    lambdas = DEFAULT_LAMBDAS if lambdas is None else tuple(lambdas)
    make_head = imagenet_infopro_head if head == "imagenet" else infopro_head
    objectives = [
        local_loss(m, from_module(make_head(s, n, input_shape, final, contrastive), name=f"head{i}"),
                   infopro_loss(i, len(modules), lambdas, contrastive=contrastive, mean=mean, std=std,
                                supcon_anchors=supcon_anchors),
                   name=f"m{i}")
        for i, (m, s) in enumerate(zip(modules[:-1], shapes))
    ]
    objectives.append(local_loss(modules[-1], None, cross_entropy, name="final"))
    return objectives


DEFAULT_WIDTH = {"mlaan": 2, "dgl_mlaan": 3, "infopro_mlaan": 3}


def window_width(width: int | None, default: int, modules: int) -> int:
    """W = min(default, K) when not given; an explicit W must lie in [1, K]."""
    if width is None:
        return min(default, modules)
    if not 1 <= width <= modules:
        raise ValueError(f"window width W={width} must lie in [1, K={modules}]: a window covers W "
                         "consecutive modules; lower --window or raise --modules")
    return width


def multilaminar(backbone: Net, at: Sequence[str], *, input_shape: Sequence[int], width: int,
                 independent: HeadFactory, cascaded: HeadFactory,
                 trunks: Sequence[Sequence[str]] | str | None = "rule", trunk_depth: int = 4,
                 decay: float = 0.995, ema_update: str = "all",
                 w_x: float = 0.001, w_y: float = 0.999, final_weight: float = 1.0,
                 final_alone: float | None = None) -> list[Objective]:
    """MLAAN's objectives over any pair of head factories (docs/design.md §2).

    For each module ``W-1 ≤ i ≤ K-2``: a cascaded objective ``w_y · L(casc_head(trunk(
    E_i ∘ … ∘ E_{i-W+1}(sg h_{i-W}))))`` and an independent one ``w_x · L(head(E_i(sg
    h_{i-1})))``, as separate objectives so their graphs never coexist; then the final window
    into the backbone's classifier, weighted ``final_weight``. ``trunks``: ``"rule"`` (the
    leap-trunk rule), a table (row ``i`` for the window ending at module ``i``), or ``None``
    (MLM without LAM). A factory is ``(i, feature shape) -> (head module, loss)``.
    ``final_alone=w`` adds an independent term on the last module, ``w · CE(E_{K-1}(sg
    h_{K-2}))`` (HPFF); it is then the objective named ``"final"``, after the window
    (``m{K-1}.cascaded``), which produces its input.
    """
    from .trunks import leap_trunk, leap_trunk_blocks

    modules = split(backbone, at)
    k = len(modules)
    if ema_update not in ("all", "last"):
        raise ValueError(f"ema_update must be 'all' or 'last', got {ema_update!r}")
    if isinstance(trunks, str) and trunks != "rule":
        raise ValueError(f"trunks must be 'rule', a table (list of block lists) or None, got {trunks!r}")
    if not isinstance(trunks, str) and trunks is not None and len(trunks) < k - 1:
        raise ValueError(f"the trunk table has {len(trunks)} rows but {k} modules need {k - 1}")
    shapes = module_shapes(modules, input_shape)
    objectives: list[Objective] = []
    for i in range(width - 1, k - 1):
        window = cascade(*modules[i - width + 1:i + 1])
        z_shape = shapes[i]
        rows = [] if trunks is None else (
            leap_trunk_blocks(backbone, modules[i].output_name, trunk_depth, input_shape=input_shape)
            if trunks == "rule" else list(trunks[i]))
        if not rows:  # MLM without LAM, or a window that already ends at the last block
            chain = None
        else:
            last = ema_update == "all" or i == k - 2
            chain = leap_trunk(backbone, rows, f"trunk{i}", decay if last else 1.0,
                               twin="twin" if ema_update == "all" else f"twin{i}",
                               input_shape=(_PROBE_BATCH, *z_shape))
            z_shape = output_shape(chain, (_PROBE_BATCH, *z_shape))[1:]
        head, loss = cascaded(i, z_shape)
        head_net = from_module(head, name=f"chead{i}")
        objectives.append(local_loss(window, head_net if chain is None else cascade(chain, head_net),
                                     loss, w_y, name=f"m{i}.cascaded"))
        head, loss = independent(i, shapes[i])
        objectives.append(local_loss(modules[i], from_module(head, name=f"head{i}"), loss, w_x,
                                     name=f"m{i}.independent"))
    window = cascade(*modules[k - width:])
    if final_alone is None:
        return objectives + [local_loss(window, None, cross_entropy, final_weight, name="final")]
    return objectives + [local_loss(window, None, cross_entropy, final_weight, name=f"m{k - 1}.cascaded"),
                         local_loss(modules[-1], None, cross_entropy, final_alone, name="final")]


def _ce_factory(kind: str, num_classes: int):
    return lambda i, shape: (classifier_head(kind, shape, num_classes), cross_entropy)


def mlaan(backbone: Net, at: Sequence[str], *, input_shape: Sequence[int] = (3, 32, 32),
          width: int | None = None, head: str = "linear", **options) -> list[Objective]:
    """MLAAN with linear heads and CE on both paths (W = 2 by default)."""
    n = num_classes_of(backbone, input_shape)
    w = window_width(width, DEFAULT_WIDTH["mlaan"], len(at) + 1)
    return multilaminar(backbone, at, input_shape=input_shape, width=w, independent=_ce_factory(head, n),
                        cascaded=_ce_factory(head, n), **options)


def dgl_mlaan(backbone: Net, at: Sequence[str], *, input_shape: Sequence[int] = (3, 32, 32),
              width: int | None = None, head: str = "dgl", **options) -> list[Objective]:
    """DGL + MLAAN: DGL heads (or ``head="dgl_wide"``) and CE on both paths (W = 3 by default)."""
    n = num_classes_of(backbone, input_shape)
    w = window_width(width, DEFAULT_WIDTH["dgl_mlaan"], len(at) + 1)
    return multilaminar(backbone, at, input_shape=input_shape, width=w, independent=_ce_factory(head, n),
                        cascaded=_ce_factory(head, n), **options)


def infopro_mlaan(backbone: Net, at: Sequence[str], *, input_shape: Sequence[int] = (3, 32, 32),
                  width: int | None = None, lambdas: Sequence[float] | None = None,
                  lambda_by: str = "module", mean: Sequence[float] = CIFAR10_MEAN,
                  std: Sequence[float] = CIFAR10_STD, supcon_anchors: str = "all",
                  **options) -> list[Objective]:
    """InfoPro + MLAAN: decoder + classifier heads; λ1·BCE + λ2·SupCon on the independent
    path, λ1·BCE + λ2·CE on the cascaded one (W = 3 by default). ``lambda_by="stage"``
    interpolates λ by stage as the released code did (:func:`stage_fraction`);
    ``supcon_anchors="all"`` averages the contrastive loss as the released code."""
    if lambda_by not in ("module", "stage"):
        raise ValueError(f"lambda_by must be 'module' or 'stage', got {lambda_by!r}")
    modules_k = len(at) + 1
    n, final = num_classes_of(backbone, input_shape), _final_width(backbone, input_shape)
    w = window_width(width, DEFAULT_WIDTH["infopro_mlaan"], modules_k)
    lambdas = DEFAULT_LAMBDAS if lambdas is None else tuple(lambdas)
    ends = list(at) + [backbone.block_names[-1]]

    def factory(contrastive: bool):
        def make(i: int, shape):
            stage = stage_fraction(ends[i], modules_k) if lambda_by == "stage" else None
            return (infopro_head(shape, n, input_shape, final, contrastive),
                    infopro_loss(i, modules_k, lambdas, contrastive=contrastive, mean=mean, std=std,
                                 stage_fraction=stage, supcon_anchors=supcon_anchors))
        return make

    return multilaminar(backbone, at, input_shape=input_shape, width=w, independent=factory(True),
                        cascaded=factory(False), **options)
