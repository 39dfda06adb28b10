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

from typing import Callable, Sequence

import attrs
import torch
from torch import nn

from ..combinators import Objective, cascade, frozen, local_loss, split, stack
from ..core import Net, copy, from_module, output_shape
from . import heads, losses
from .catalog import (
    _PROBE_BATCH,
    CIFAR10_MEAN,
    CIFAR10_STD,
    DEFAULT_LAMBDAS,
    _final_width,
    classifier_head,
    e2e,
    infopro_head,
    infopro_loss,
    module_shapes,
    multilaminar,
    num_classes_of,
    stage_fraction,
    window_width,
)
from .losses import cross_entropy
from .trunks import block_shapes, leap_trunk

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
    k = len(split(backbone, at))
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

    return multilaminar(backbone, at, input_shape=input_shape, width=window_width(width, 2, k),
                        independent=independent, cascaded=cascaded, trunks=trunks, w_x=w_x, w_y=w_y,
                        final_weight=w_y, final_alone=w_x, **options)


def neuron_groups(backbone: Net, at: Sequence[str], groups: int, *, input_shape: Sequence[int] = (3, 32, 32),
                  head: str = "dgl", diversity: float = 0.5, temperature: float = 3.0) -> list[Objective]:
    """Local learning with neuron groups (Patel et al., arXiv 2301.07635): module ``i < K-1``
    of width ``C`` is also split along its width into ``groups`` channel groups; group ``g``
    trains on ``CE(head_{i,g}(view_g(E_i(sg h_{i-1}))))``, where ``view_g`` detaches every
    channel outside group ``g`` (``heads.channel_group``), so the head sees the whole map,
    plus the diversity term (``losses.group_diversity``, weight ``diversity``, temperature
    ``temperature``: the released ``--div-weight 0.5 --div-temp 3.0``), which compares the
    group's tempered prediction with the other groups' heads, read through read-only views
    (``frozen``) on the detached map beside its own (``stack``); ``diversity=0`` drops it.
    The last module on the backbone's classifier. The groups are gradient-isolated only if
    the backbone's convolutions after each module's first layer are grouped (``groups=G``):
    ``testing.check_isolation`` checks it width-wise. Evaluate the head ensemble with
    :func:`ensemble_metric` (``layerwise=True``: the released ``--ensemble-type layerwise``).

    >>> import mlaan_func as mf
    >>> net = mf.from_module(mf.models.CifarResNet(14, num_classes=10, widths=(4, 8, 8)))
    >>> scheme = neuron_groups(net, ["2.1"], 2, input_shape=(3, 8, 8))
    >>> [(o.name, o.reads[:1]) for o in scheme]
    [('m0.g0', ('head0.1.layers.1.weight',)), ('m0.g1', ('head0.0.layers.1.weight',)), ('final', ())]
    """
    modules = split(backbone, at)
    shapes, n = module_shapes(modules, input_shape), num_classes_of(backbone, input_shape)
    objectives = []
    for i, (m, s) in enumerate(zip(modules[:-1], shapes)):
        own = [cascade(from_module(heads.channel_group(g, groups), name=f"view{i}.{g}"),
                       from_module(classifier_head(head, s, n), name=f"head{i}.{g}")) for g in range(groups)]
        for g in range(groups):
            if not diversity or groups == 1:
                objectives.append(local_loss(m, own[g], cross_entropy, name=f"m{i}.g{g}"))
                continue
            others = [cascade(from_module(heads.detached(), name=f"sg{i}"), frozen(own[j].block(f"head{i}.{j}")))
                      for j in range(groups) if j != g]
            objectives.append(local_loss(m, stack(own[g], *others, name=f"groups{i}.{g}"),
                                         losses.group_diversity(diversity, temperature), name=f"m{i}.g{g}"))
    return objectives + [local_loss(modules[-1], None, cross_entropy, name="final")]


def ensemble_metric(objectives: Sequence[Objective], ts=None, *, layerwise: bool = False) -> Callable:
    """A metric for ``mf.evaluate(..., metrics={"ensemble": ensemble_metric(heads)})``: the
    accuracy of the mean softmax of ``objectives``' heads (e.g. one module's group heads) on
    their nets' outputs, in eval mode, with the train state ``evaluate`` passes it (``ts``,
    when given, is used instead). A head that stacks its group's logits before the other
    groups' (``neuron_groups`` with the diversity term) counts with its own group's.

    ``layerwise=True`` is the released neuron-groups ensemble (``--ensemble-type
    layerwise``) over a whole scheme: per module (objectives on one net output), the mean
    softmax of its heads, the last module scored by the backbone's classifier; module ``i``
    of ``K`` weighted ``2^i / Σ_j 2^j``.
    """
    if layerwise:
        modules: dict[str, list[Objective]] = {}
        for o in objectives:
            modules.setdefault(o.output_name, []).append(o)
        weights = [2.0 ** k for k in range(len(modules))]
        members = [(os, w / sum(weights)) for os, w in zip(modules.values(), weights)]
    else:
        members = [([o for o in objectives if o.head is not None], 1.0)]
    if not members or not members[0][0]:
        raise ValueError("ensemble_metric needs objectives with heads (the final objective scores the "
                         "backbone's classifier and has none)")

    fixed = ts

    def probs_of(o, ts, outputs):
        if o.head is None:
            return outputs[o.output_name].softmax(dim=1)
        logits = o.head(ts.params, ts.state, outputs[o.output_name], train=False)[0]
        return (logits[:, 0] if logits.dim() == 3 else logits).softmax(dim=1)

    def ensemble(outputs, batch, *, ts=None):
        ts = fixed if fixed is not None else ts
        mixed = sum(w * torch.stack([probs_of(o, ts, outputs) for o in os]).mean(dim=0) for os, w in members)
        y = losses.target_of(batch)
        return {"accuracy": (mixed.argmax(dim=1) == y).to(mixed.dtype).mean()}

    return ensemble


def auglocal_depths(modules: int, depth: int, coeff: float = 1.0) -> list[int]:
    """AugLocal's depth pyramid: the auxiliary depth of module ``i < K-1``, linear from ``depth``
    at ``i = 0`` to 1 at ``i = K-2`` (``coeff`` scales the slope), ``max(1, round(·))`` as
    released (Python's ``round``: halves to even).

    >>> auglocal_depths(4, 3), auglocal_depths(6, 5)
    ([3, 2, 1], [5, 4, 3, 2, 1])
    """
    span = max(modules - 2, 1)
    return [max(1, round(depth * (1 - i * coeff / span) + i * coeff / span)) for i in range(modules - 1)]


def uniform_layers(after: int, layers: int, depth: int) -> list[int]:
    """The layers AugLocal samples after layer ``after`` of ``layers`` (classifier excluded):
    all of them when ``depth`` reaches their number, else ``round(after + j·(layers - after - 1)
    / depth)`` for ``j = 1 … depth`` (the last layer always among them).

    >>> uniform_layers(1, 7, 3), uniform_layers(5, 7, 2)
    ([3, 4, 6], [6])
    """
    if depth >= layers - 1 - after:
        return list(range(after + 1, layers))
    return [round(after + (layers - after - 1) / depth * j) for j in range(1, depth + 1)]


def auglocal(backbone: Net, at: Sequence[str], *, input_shape: Sequence[int] = (3, 32, 32), depth: int = 3,
             pyramid: bool = True, coeff: float = 1.0, make_block=None) -> list[Objective]:
    """AugLocal (Ma et al., arXiv 2402.17318): module ``i < K-1`` trains on
    ``CE(aux_i(E_i(sg h_{i-1})))``, where ``aux_i`` is built from the layers uniformly sampled
    after the module's last block (:func:`uniform_layers`), as fresh blocks of their widths
    (``heads.auglocal``), ``depth`` of them, fewer deeper up with ``pyramid``
    (:func:`auglocal_depths`); the last module on the backbone's classifier.

    >>> import mlaan_func as mf
    >>> net = mf.from_module(mf.models.CifarResNet(14, num_classes=10, widths=(4, 8, 8)))
    >>> scheme = auglocal(net, ["stem", "1.1"], input_shape=(3, 8, 8))
    >>> [sum(isinstance(m, mf.models.BasicBlock) for m in o.head.blocks[0].module.layers) for o in scheme[:-1]]
    [3, 1]
    """
    modules = split(backbone, at)
    names = list(backbone.block_names[:-1])
    widths = [out[0] for _, out in block_shapes(backbone, input_shape)[:-1]]
    n, k = num_classes_of(backbone, input_shape), len(modules)
    depths = auglocal_depths(k, depth, coeff) if pyramid else [depth] * (k - 1)
    objectives = []
    for i, m in enumerate(modules[:-1]):
        last = names.index(m.output_name)
        aux = heads.auglocal(widths[last], [widths[j] for j in uniform_layers(last, len(names), depths[i])], n,
                             make_block)
        objectives.append(local_loss(m, from_module(aux, name=f"aux{i}"), cross_entropy, name=f"m{i}"))
    return objectives + [local_loss(modules[-1], None, cross_entropy, name="final")]


MAN_HEADS = ("infopro", "dgl")


def man(backbone: Net, at: Sequence[str], *, input_shape: Sequence[int] = (3, 32, 32), head: str = "infopro",
        decay: float = 0.995, lambdas: Sequence[float] = DEFAULT_LAMBDAS, lambda_by: str = "stage",
        contrastive: bool = False, mean: Sequence[float] = CIFAR10_MEAN,
        std: Sequence[float] = CIFAR10_STD, scaled: bool = False) -> list[Objective]:
    """MAN (Su et al., arXiv 2407.05623): module ``i < K-1`` trains on ``L(head_i(copy(z) +
    twin(z)))`` with ``z = E_i(sg h_{i-1})``, where ``copy`` is a trainable copy of the next
    module's first block and ``twin`` its EMA (``leap_ema``, decay ``decay``); the last
    module on the backbone's classifier. A module followed by the classifier alone has no
    block to copy and scores ``z`` itself. ``head="infopro"`` (the released CIFAR code):
    ``λ1·BCE + λ2·task`` with λ interpolated at ``stage / (K-2)`` of the copied block, at most 1
    (``lambda_by="stage"``, as released; ``"module"`` for ``i / (K-2)``); ``"dgl"``: DGL's
    head and CE. ``scaled=True`` is MAN++ (:func:`man_pp`).

    >>> import mlaan_func as mf
    >>> net = mf.from_module(mf.models.CifarResNet(14, num_classes=10, widths=(4, 8, 8)))
    >>> [b.name for b in man(net, ["1.0", "2.0"], input_shape=(3, 8, 8))[0].head.blocks]
    ['lb0.1.1', 'head0']
    """
    if head not in MAN_HEADS or lambda_by not in ("stage", "module"):
        raise ValueError(f"MAN takes head in {MAN_HEADS} and lambda_by 'stage' or 'module', got {head!r} and "
                         f"{lambda_by!r}")
    modules = split(backbone, at)
    k, shapes = len(modules), module_shapes(modules, input_shape)
    n, final = num_classes_of(backbone, input_shape), _final_width(backbone, input_shape)
    objectives = []
    for i, (m, s) in enumerate(zip(modules[:-1], shapes)):
        first = modules[i + 1].blocks[0].name
        # the backbone's final block (its classifier) is never copied: that module's head reads z itself
        trunk = None if first == backbone.output_name else leap_trunk(
            backbone, [first], f"lb{i}", decay, scale=f"lb{i}.scale" if scaled else None)
        z = s if trunk is None else output_shape(trunk, (_PROBE_BATCH, *s))[1:]
        if head == "dgl":
            aux, loss = classifier_head("dgl", z, n), cross_entropy
        else:
            # the released r = stage / (K-2) passes 1 when the stage exceeds K-2 (K ≤ 4 on three stages),
            # where λ turns negative and the reconstruction is maximised: held at 1 (docs/schemes.md, MAN)
            r = min(stage_fraction(first, k), 1.0) if lambda_by == "stage" else None
            aux = infopro_head(z, n, input_shape, final, contrastive)
            loss = infopro_loss(i, k, lambdas, contrastive=contrastive, mean=mean, std=std, stage_fraction=r)
        aux = from_module(aux, name=f"head{i}")
        objectives.append(local_loss(m, aux if trunk is None else cascade(trunk, aux), loss, name=f"m{i}"))
    return objectives + [local_loss(modules[-1], None, cross_entropy, name="final")]


def man_pp(backbone: Net, at: Sequence[str], **options) -> list[Objective]:
    """MAN++ (Su et al., arXiv 2507.16279): MAN (:func:`man`, same options) whose head reads
    ``s_i·copy(z) + (2 − s_i)·twin(z)``, ``s_i`` a learnable scalar per module
    (``lb{i}.scale``, initialised to 1, so a step from initialisation starts as MAN's sum),
    trained with the copy by the module's auxiliary loss (``leap_ema(..., scale=)``), as the
    released code's ``ema_s`` (``s·LB(x) + (2 − s)·EMA(x)``).

    >>> import mlaan_func as mf
    >>> net = mf.from_module(mf.models.CifarResNet(14, num_classes=10, widths=(4, 8, 8)))
    >>> scheme = man_pp(net, ["1.0", "2.0"], input_shape=(3, 8, 8), head="dgl")
    >>> [k for o in scheme for k in o.param_names if k.endswith(".scale")]
    ['lb0.scale', 'lb1.scale']
    """
    return man(backbone, at, scaled=True, **options)


def pgl(local: Sequence[Objective], global_scheme: Sequence[Objective], *, every: int) -> list[Objective]:
    """PGL (Bhatti et al., arXiv 2208.00821): one scheme that trains ``local`` and, on steps
    ``every-1, 2·every-1, …`` (counted from 0), the global (end-to-end) scheme instead, over
    one train state and one optimizer state (``mf.step`` switches objectives by their
    ``active`` schedules). The global objectives are renamed ``global.<name>``.

    Rules for the entries the global step does not touch (the auxiliary heads, trunks, their
    statistics), which ``finish_step(..., untouched=)`` applies: their parameters, BatchNorm
    statistics and per-parameter optimizer state (momentum, Adam moments) stay as they were,
    as ``torch.optim`` skips a parameter whose gradient is ``None``; the optimizer's shared
    counts (learning-rate schedule, Adam's bias correction) advance on every step, where
    ``torch.optim.Adam`` counts each parameter's own updates; the local scheme's after-step
    updates (EMA twins) run on every step.

    >>> import mlaan_func as mf
    >>> net = mf.from_module(mf.models.CifarResNet(14, num_classes=10, widths=(4, 8, 8)))
    >>> scheme = pgl(mf.schemes.dgl(net, ["1.1"], input_shape=(3, 8, 8)), mf.schemes.e2e(net), every=2)
    >>> opt = mf.optim.sgd(0.1)
    >>> train_step, ts = mf.step(scheme, opt), mf.init(scheme, opt)
    >>> batch = (torch.randn(4, 3, 8, 8), torch.tensor([0, 1, 2, 3]))
    >>> [sorted(train_step(ts, batch)[1]) for ts in [ts, ts._replace(step=ts.step + 1)]]
    [['final', 'm0'], ['global.final']]
    """
    if isinstance(every, bool) or not isinstance(every, int) or every < 1:
        raise ValueError(f"every must be a positive int (a global step every that many steps), got {every!r}")
    trained = {k for o in local for k in o.param_names}
    outside = [k for o in global_scheme for k in o.param_names if k not in trained]
    if outside:
        raise ValueError(f"the global scheme trains {outside[:3]}, which the local scheme does not hold; both "
                         "must run over the same backbone (mf.schemes.e2e(backbone) beside a local scheme of it)")
    is_global = lambda step: step % every == every - 1  # noqa: E731
    return ([attrs.evolve(o, active=lambda step: ~is_global(step)) for o in local]
            + [attrs.evolve(o, name=f"global.{o.name}", active=is_global) for o in global_scheme])


def lm_local(backbone: Net, at: Sequence[str], *, readout: str = "readout", shared: bool = True
             ) -> list[Objective]:
    """Local learning of a language model (``mf.models.DecoderLM``): module ``i < K-1`` predicts
    the next token through the final readout block ``readout``, scored by
    ``losses.sequence_cross_entropy``; the last module through the final readout itself,
    which only it trains (``at=[]``: end-to-end). ``shared=True`` (SOLO-style): every module
    reads the final readout through a read-only view (``mf.frozen``), which follows it every
    step and passes it no gradient; ``shared=False``: each module has its own trainable copy
    that starts equal to it (``copy``).

    >>> import mlaan_func as mf
    >>> net = mf.from_module(mf.models.lm_micro(vocab_size=16, context=8))
    >>> [(o.name, o.reads[:1]) for o in lm_local(net, ["blocks.1"])]
    [('m0', ('readout.norm.weight',)), ('final', ())]
    >>> [(o.name, o.head.block_names if o.head else None) for o in lm_local(net, ["blocks.1"], shared=False)]
    [('m0', ('readout0.readout',)), ('final', None)]
    """
    if readout not in backbone.block_names:
        raise ValueError(f"no readout block {readout!r}; the blocks are {list(backbone.block_names)}")
    modules, final = split(backbone, at), backbone.block(readout)
    objectives = [local_loss(m, frozen(final) if shared else copy(final, f"readout{i}"),
                             losses.sequence_cross_entropy, name=f"m{i}")
                  for i, m in enumerate(modules[:-1])]
    return objectives + [local_loss(modules[-1], None, losses.sequence_cross_entropy, name="final")]


def sgr(backbone: Net, at: Sequence[str], *, input_shape: Sequence[int] = (3, 32, 32), head: str = "dgl",
        weight: float = 1.0) -> list[Objective]:
    """SGR (Yang et al., ICML 2024, arXiv 2406.05222) on DGL's modules and heads: module ``i``
    trains on its task loss plus ``weight`` times the distance between the gradient of that
    loss w.r.t. its input ``h_{i-1}`` and module ``i-1``'s (detached) gradient w.r.t. its output
    ``h_{i-1}`` (``losses.gradient_reconciliation``), which module ``i-1`` publishes in the same
    step through its loss context; the term's own gradient is second order inside module
    ``i`` and reaches nothing before it. Module 0 only publishes; the last module (the
    backbone's classifier) only reconciles. ``K = 1`` is E2E.

    >>> import mlaan_func as mf
    >>> net = mf.from_module(mf.models.CifarResNet(14, num_classes=10, widths=(4, 8, 8)))
    >>> [(o.name, o.context_from) for o in sgr(net, ["1.1", "2.1"], input_shape=(3, 8, 8))]
    [('m0', ()), ('m1', ('m0',)), ('final', ('m1',))]
    """
    from .catalog import dgl  # here, so that this recipe's lines stay together

    base = dgl(backbone, at, input_shape=input_shape, head=head)
    if len(base) == 1:
        return base
    before = [None, *(o.name for o in base[:-1])]
    return [attrs.evolve(o, loss=losses.gradient_reconciliation(o.loss, weight, p, publish=o is not base[-1]),
                         context_from=() if p is None else (p,))
            for p, o in zip(before, base)]
