"""Local losses: pure ``loss(output, batch) -> (loss, metrics)``.

``loss`` is a 0-d tensor; ``metrics`` maps names to detached 0-d tensors (never Python
numbers, so a compiled step never syncs). ``batch`` is what the step was given: a
``Batch(x, y)`` (normalised images and int64 labels; a plain ``(x, y)`` becomes one) or any
pytree whose first leaf is the input (``{"x": ..., "y": ..., "x2": ...}``, ``(x, y, mask)``).
The losses here read the labels with ``target_of``. A loss that takes a ``step`` keyword
also receives the train state's step.

>>> import torch
>>> batch = Batch(torch.zeros(2, 3, 4, 4), torch.tensor([0, 1]))
>>> loss, metrics = cross_entropy(torch.tensor([[2.0, 0.0], [2.0, 0.0]]), batch)
>>> sorted(metrics), float(metrics["accuracy"])
(['accuracy', 'loss'], 0.5)
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor

from ..core.batch import Batch, input_of
from ..core.deferred import checks_deferred, poison

Metrics = dict[str, Tensor]
LossFn = Callable[[object, "Batch"], tuple[Tensor, Metrics]]


def target_of(batch: Any) -> Tensor:
    """A batch's labels: ``batch.y``, ``batch["y"]``, or the second item of a tuple.

    >>> target_of((torch.zeros(2, 3), torch.tensor([0, 1]), torch.ones(2))).tolist()
    [0, 1]
    """
    if hasattr(batch, "y"):
        return batch.y
    if isinstance(batch, dict):
        if "y" not in batch:
            raise KeyError(f"this loss reads the labels under 'y'; the batch has keys {list(batch)}: "
                           "name the labels 'y' or write a loss that reads your key")
        return batch["y"]
    if isinstance(batch, (tuple, list)) and len(batch) >= 2:
        return batch[1]
    raise TypeError(f"this loss reads labels from batch.y, batch['y'] or batch[1]; got a {type(batch).__name__}")


def _check_labels(y: Tensor, num_logits: int | None, what: str) -> tuple[Tensor, Tensor | None]:
    """``y`` as int64 class indices (or a ``ValueError`` that says how to fix them) and, where
    the range check is deferred (``core.deferred``: inside a step, or compiling), the 0-d
    flag "some label is out of range" (the labels are then clamped into range, so no kernel
    indexes out of bounds); ``None`` when checked eagerly."""
    if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
        raise ValueError(f"{what} takes integer class indices as labels, got {y.dtype} labels of shape "
                         f"{tuple(y.shape)}; for one-hot labels pass y.argmax(dim=1), for soft labels "
                         "write a loss on probabilities (F.cross_entropy accepts them)")
    if y.dim() != 1:
        raise ValueError(f"{what} takes labels of shape (N,), got {tuple(y.shape)}; one-hot labels "
                         "become class indices with y.argmax(dim=1)")
    if y.dtype != torch.int64:
        y = y.long()
    if num_logits is None or not y.numel():
        return y, None
    if checks_deferred():
        return y.clamp(0, num_logits - 1), (y < 0) | (y >= num_logits)
    low, high = (int(v) for v in torch.aminmax(y))
    if low < 0 or high >= num_logits:
        raise ValueError(f"{what}: labels must lie in [0, {num_logits}) for {num_logits} logits, got "
                         f"labels from {low} to {high}; build the classifier and heads with "
                         f"num_classes={max(high + 1, num_logits)} or remap the labels")
    return y, None


def _poisoned(loss: Tensor, bad: Tensor | None) -> Tensor:
    return loss if bad is None else loss * poison(bad, loss.dtype)


def _check_rows(output: Tensor, y: Tensor, what: str) -> None:
    if output.dim() != 2:
        raise ValueError(f"{what} takes (N, features) outputs, got shape {tuple(output.shape)}")
    if output.shape[0] != y.shape[0]:
        raise ValueError(f"{what}: {output.shape[0]} outputs but {y.shape[0]} labels")


def cross_entropy(output: Tensor, batch: Batch) -> tuple[Tensor, Metrics]:
    """Mean cross-entropy of logits ``output`` (N, n); metrics ``loss`` and ``accuracy``.

    >>> loss, m = cross_entropy(torch.zeros(4, 10), Batch(torch.zeros(4, 1, 2, 2), torch.zeros(4, dtype=torch.long)))
    >>> round(float(loss), 4)
    2.3026
    """
    y = target_of(batch)
    _check_rows(output, y, "cross_entropy")
    y, bad = _check_labels(y, output.shape[1], "cross_entropy")
    loss = _poisoned(F.cross_entropy(output, y), bad)
    accuracy = (output.detach().argmax(dim=1) == y).to(output.dtype).mean()
    return loss, {"loss": loss.detach(), "accuracy": accuracy}


def reconstruction_bce(mean: Sequence[float], std: Sequence[float]) -> LossFn:
    """BCE between a sigmoid image and the de-normalised input ``(x·std + mean).clamp(0, 1)``;
    ``mean`` and ``std`` are per channel. Metrics ``loss``.

    >>> bce = reconstruction_bce([0.5], [0.5])
    >>> loss, _ = bce(torch.full((2, 1, 3, 3), 0.5), Batch(torch.zeros(2, 1, 3, 3), torch.zeros(2, dtype=torch.long)))
    >>> round(float(loss), 4)
    0.6931
    """
    mean, std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
    if not mean or len(mean) != len(std):
        raise ValueError(f"mean and std need one value per channel, got {len(mean)} and {len(std)}")
    if min(std) <= 0:
        raise ValueError(f"std must be positive, got {std}")

    def reconstruction_bce(output: Tensor, batch: Batch) -> tuple[Tensor, Metrics]:
        x = input_of(batch)
        if output.shape != x.shape:
            raise ValueError(f"reconstruction_bce: reconstruction of shape {tuple(output.shape)} "
                             f"for images of shape {tuple(x.shape)}")
        if x.dim() != 4 or x.shape[1] != len(mean):
            raise ValueError(f"reconstruction_bce: images of shape {tuple(x.shape)} for "
                             f"{len(mean)}-channel mean and std")
        m = rearrange(torch.tensor(mean, dtype=x.dtype, device=x.device), "c -> 1 c 1 1")
        s = rearrange(torch.tensor(std, dtype=x.dtype, device=x.device), "c -> 1 c 1 1")
        # On CPU the mean is a 0-d view of the per-pixel buffer; the clone (gradient: identity)
        # lets that buffer die here instead of living as long as the loss or its metric.
        loss = F.binary_cross_entropy(output, (x * s + m).clamp(0, 1)).clone()
        return loss, {"loss": loss.detach()}

    return reconstruction_bce


SUPCON_ANCHORS = ("all", "with_positive")
"""How :func:`supervised_contrastive` averages over anchors (see there)."""


def supervised_contrastive(temperature: float = 0.07, anchors: str = "all") -> LossFn:
    """Supervised contrastive loss (Khosla et al. 2020) on one view, as InfoPro used it.

    Features are L2-normalised here; each anchor's log-softmax over all other samples is
    averaged over its positives (same label, not itself); ``base_temperature = temperature``.
    The anchors are then averaged in one of two ways, which differ only when some label occurs
    once in the batch (Khosla's paper uses two views, so every anchor has a positive):

    - ``anchors="all"`` (default): over every anchor, one without a positive counting 0 — the
      released InfoPro code (``SupConLoss`` of Khosla et al.'s reference implementation,
      ``mask_sum`` of 0 set to 1, then ``.mean()``). On Fashion-MNIST at batch 32 (a singleton
      label in most batches) it scored 0.627 against 0.623 (docs/benchmarks.md), so the
      released averaging is the default.
    - ``anchors="with_positive"``: over the anchors that have a positive only (0 when none
      has) — Khosla et al.'s Eq. 2 with its undefined terms (``|P(i)| = 0``) left out.

    Metrics ``loss``.

    >>> supcon = supervised_contrastive(0.05)
    >>> y = torch.tensor([0, 0, 1, 1])
    >>> loss, _ = supcon(torch.tensor([[1.0, 0], [1, 0], [0, 1], [0, 1]]), Batch(torch.zeros(4, 1, 1, 1), y))
    >>> bool(loss.abs() < 1e-6)  # positives aligned, negatives orthogonal
    True
    >>> f, y = torch.tensor([[1.0, 0], [1, 0], [0, 1]]), torch.tensor([0, 0, 1])  # label 1 is alone
    >>> a = supervised_contrastive(1.0, "all")(f, Batch(torch.zeros(3, 1, 1, 1), y))[0]
    >>> p = supervised_contrastive(1.0, "with_positive")(f, Batch(torch.zeros(3, 1, 1, 1), y))[0]
    >>> bool(torch.isclose(a, p * 2 / 3))
    True
    """
    temperature = float(temperature)
    if not temperature > 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    if anchors not in SUPCON_ANCHORS:
        raise ValueError(f"anchors must be 'all' (the released InfoPro averaging) or 'with_positive', "
                         f"got {anchors!r}")
    over_all = anchors == "all"

    def supervised_contrastive(output: Tensor, batch: Batch) -> tuple[Tensor, Metrics]:
        y = target_of(batch)
        _check_rows(output, y, "supervised_contrastive")
        y, _ = _check_labels(y, None, "supervised_contrastive")
        f = F.normalize(output, dim=1)
        n = f.shape[0]
        self_mask = torch.eye(n, dtype=torch.bool, device=f.device)
        # a finite fill keeps a lone sample (n = 1) free of NaN in value and gradient
        logits = (f @ f.T / temperature).masked_fill(self_mask, torch.finfo(f.dtype).min)
        log_prob = logits.log_softmax(dim=1)
        positive = (y[:, None] == y[None, :]) & ~self_mask
        count = positive.sum(dim=1)
        mean_pos = torch.where(positive, log_prob, 0.0).sum(dim=1) / count.clamp(min=1)
        if over_all:
            loss = -mean_pos.mean()
        else:
            has_pos = (count > 0).to(f.dtype)
            loss = -(mean_pos * has_pos).sum() / has_pos.sum().clamp(min=1)
        return loss, {"loss": loss.detach()}

    return supervised_contrastive


def weighted_sum(*pairs: tuple[LossFn, float | Tensor]) -> LossFn:
    """``Σ_k w_k · loss_k(output[k], batch)`` over a tuple output.

    Metrics: each part's under ``"<k>.<name>"``, ``loss`` = the weighted total, and
    ``accuracy`` passed through from the first part that reports one.

    >>> fn = weighted_sum((cross_entropy, 0.5), (cross_entropy, 2.0))
    >>> b = Batch(torch.zeros(2, 1, 1, 1), torch.tensor([0, 1]))
    >>> loss, m = fn((torch.zeros(2, 3), torch.zeros(2, 3)), b)
    >>> sorted(m)
    ['0.accuracy', '0.loss', '1.accuracy', '1.loss', 'accuracy', 'loss']
    """
    if not pairs:
        raise ValueError("weighted_sum needs at least one (loss_fn, weight) pair")
    for k, pair in enumerate(pairs):
        if not (isinstance(pair, tuple) and len(pair) == 2 and callable(pair[0])):
            raise ValueError(f"weighted_sum: part {k} must be a pair (loss_fn, weight), got {pair!r}")
    pairs = tuple(pairs)

    def weighted_sum(output: Sequence[Tensor], batch: Batch) -> tuple[Tensor, Metrics]:
        if not isinstance(output, (tuple, list)) or len(output) != len(pairs):
            got = f"a {len(output)}-tuple" if isinstance(output, (tuple, list)) else type(output).__name__
            raise ValueError(f"weighted_sum of {len(pairs)} losses needs a {len(pairs)}-tuple output, got {got}")
        total, metrics = None, {}
        for k, ((fn, weight), out) in enumerate(zip(pairs, output)):
            loss, part = fn(out, batch)
            total = weight * loss if total is None else total + weight * loss
            metrics.update({f"{k}.{name}": v for name, v in part.items()})
            if "accuracy" in part and "accuracy" not in metrics:
                metrics["accuracy"] = part["accuracy"]
        metrics["loss"] = total.detach()
        return total, metrics

    return weighted_sum


def group_diversity(weight: float = 0.5, temperature: float = 3.0) -> LossFn:
    """Neuron groups' cross-entropy with the diversity term (Patel et al., arXiv 2301.07635,
    the released ``div_loss_calc``), for one group's objective. ``output`` is ``(N, G, C)``:
    the group's own logits first, then the other ``G-1`` groups' (read-only: detached here).
    Each prediction is ``softmax(logits / temperature)`` with the true class removed,
    renormalised and L2-normalised (``q``); the loss is ``CE(own) + weight · (2/G) ·
    mean_{i, l≠own} <q_own,i, sg q_l,i>``. Summed over the G groups of a module, these terms
    give every group exactly the gradient of the released module loss ``Σ_g CE_g + weight ·
    Σ_i Σ_{k≠l} <q_k,i, q_l,i> / (N·G·(G−1))`` (each pair appears in both groups' terms with
    the other side held fixed, hence the 2). Metrics: ``loss``, ``accuracy`` and
    ``cross_entropy`` of the own logits, ``similarity`` (the mean cosine, 0 = diverse).

    >>> out = torch.tensor([[[2.0, 1.0, 0.0], [2.0, 1.0, 0.0]]])   # two groups that agree
    >>> loss, m = group_diversity(0.5, 3.0)(out, Batch(torch.zeros(1, 1), torch.tensor([0])))
    >>> round(float(m["similarity"]), 4), round(float(loss - m["cross_entropy"]), 4)
    (1.0, 0.5)
    """
    if not temperature > 0:
        raise ValueError(f"the diversity temperature must be positive, got {temperature}")

    def tempered(logits: Tensor, y: Tensor) -> Tensor:   # y: the labels, shaped as logits without classes
        probs = torch.softmax(logits / temperature, dim=-1)
        probs = probs * torch.ones_like(probs).scatter(-1, y.unsqueeze(-1), 0.0)
        probs = probs / (probs.sum(dim=-1, keepdim=True) + 1e-8)
        return probs / torch.sqrt((probs ** 2).sum(dim=-1, keepdim=True) + 1e-8)

    def group_diversity(output: Tensor, batch: Batch) -> tuple[Tensor, Metrics]:
        if output.dim() != 3 or output.shape[1] < 2:
            raise ValueError(f"group_diversity scores (N, G, C) logits with G ≥ 2 (own group first), got shape "
                             f"{tuple(output.shape)}; build the head with mf.stack(own, *others)")
        y = target_of(batch)
        own, rest = output[:, 0], output[:, 1:].detach()
        ce, metrics = cross_entropy(own, batch)
        q_own = tempered(own, y)
        q_rest = tempered(rest, y.view(-1, 1).expand(-1, rest.shape[1]))
        similarity = (q_own.unsqueeze(1) * q_rest).sum(dim=-1).mean()
        loss = ce + weight * (2.0 / output.shape[1]) * similarity
        return loss, {"loss": loss.detach(), "accuracy": metrics["accuracy"], "cross_entropy": ce.detach(),
                      "similarity": similarity.detach()}

    return group_diversity


def infopro_lambdas(i: int, num_modules: int, ixx_1: float, ixy_1: float, ixx_2: float,
                    ixy_2: float) -> tuple[float, float]:
    """InfoPro's weights ``(λ1, λ2)`` for module ``i`` of ``num_modules`` (K):
    with ``r = i / max(K-2, 1)``, ``λ1 = ixx_1·(1-r) + ixx_2·r``, ``λ2 = ixy_1·(1-r) + ixy_2·r``.

    >>> infopro_lambdas(0, 4, 5.0, 0.5, 0.0, 0.0), infopro_lambdas(2, 4, 5.0, 0.5, 0.0, 0.0)
    ((5.0, 0.5), (0.0, 0.0))
    """
    if isinstance(num_modules, bool) or not isinstance(num_modules, int) or num_modules < 1:
        raise ValueError(f"num_modules must be a positive int, got {num_modules!r}")
    if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < num_modules:
        raise ValueError(f"module index must be an int in [0, {num_modules}), got {i!r}")
    r = i / max(num_modules - 2, 1)
    return float(ixx_1 * (1 - r) + ixx_2 * r), float(ixy_1 * (1 - r) + ixy_2 * r)


def sequence_cross_entropy(output: Tensor, batch: Any) -> tuple[Tensor, Metrics]:
    """Mean next-token cross-entropy of logits ``output`` (N, T, V) against the int64 targets
    (N, T) of the batch (``target_of``); metrics ``loss`` and ``accuracy`` (over tokens).
    ``exp(loss)`` is the perplexity.

    >>> tokens = torch.zeros(2, 3, dtype=torch.long)
    >>> loss, m = sequence_cross_entropy(torch.zeros(2, 3, 4), (tokens, tokens))
    >>> round(float(loss), 4), round(float(loss.exp()), 4)
    (1.3863, 4.0)
    """
    y = target_of(batch)
    if output.dim() != 3:
        raise ValueError(f"sequence_cross_entropy takes (N, T, V) logits, got shape {tuple(output.shape)}; "
                         "for (N, V) logits use cross_entropy")
    if tuple(y.shape) != tuple(output.shape[:2]):
        raise ValueError(f"sequence_cross_entropy: logits of shape {tuple(output.shape)} need targets of shape "
                         f"{tuple(output.shape[:2])}, got {tuple(y.shape)}")
    y, bad = _check_labels(y.reshape(-1), output.shape[2], "sequence_cross_entropy")
    logits = rearrange(output, "n t v -> (n t) v")
    loss = _poisoned(F.cross_entropy(logits, y), bad)
    accuracy = (logits.detach().argmax(dim=1) == y).to(output.dtype).mean()
    return loss, {"loss": loss.detach(), "accuracy": accuracy}


RECONCILED = "grad_output"
"""The key under which ``gradient_reconciliation`` publishes its module's output gradient."""


def gradient_reconciliation(task: LossFn, weight: float = 1.0, previous: str | None = None, *,
                            publish: bool = True) -> Callable:
    """SGR's local loss (Yang et al., ICML 2024): ``task`` plus ``weight`` times the distance
    between this module's input gradient and the previous module's output gradient,

        ``task(output) + weight · (1/N) Σ_n ‖N·∂task/∂x_n − N·sg(∂task_prev/∂h_prev,n)‖²``,

    where ``x`` is the objective's input (= ``h_prev``, the output of the objective named
    ``previous``), ``N`` the batch size (so each term is a per-sample gradient of a mean loss)
    and the previous gradient a detached value that objective published in the same step.
    The step follows the term's own gradient through this module (a second-order term inside
    the objective, ``create_graph=True``); nothing reaches the previous module. With
    ``publish`` (all modules but the last) it publishes ``∂task/∂h`` of its own net output
    under ``RECONCILED`` for the next module. In eval, or when nothing is differentiated,
    it is ``task`` alone. Metrics: ``task``'s, and ``reconciliation`` (the distance) while
    training. Use it with ``local_loss(..., context_from=[previous])``
    (``mlaan_func.schemes.sgr``).

    >>> import torch
    >>> from torch import nn
    >>> import mlaan_func as mf
    >>> a, b = mf.split(mf.from_module(nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 3))), ["0"])
    >>> head = mf.from_module(nn.Linear(3, 3), name="head0")
    >>> scheme = [mf.local_loss(a, head, gradient_reconciliation(cross_entropy), name="m0"),
    ...           mf.local_loss(b, None, gradient_reconciliation(cross_entropy, 0.5, "m0", publish=False),
    ...                         name="final", context_from=["m0"])]
    >>> g = mf.gradients(scheme)(mf.init(scheme, mf.optim.sgd(0.1)), (torch.randn(6, 4), torch.arange(6) % 3))
    >>> sorted(g.metrics["final"])
    ['accuracy', 'loss', 'reconciliation']
    """
    if previous is None and not publish:
        raise ValueError("gradient_reconciliation with no previous module and publish=False is the task loss; "
                         "use the task loss itself")

    def reconciled(output: Any, batch: Any, *, context) -> tuple[Tensor, Metrics]:
        value, metrics = task(output, batch)
        if not context.differentiable:
            return value, metrics
        if previous is not None:
            n = context.input.shape[0]
            grad_input, = torch.autograd.grad(value, context.input, create_graph=True)
            target = context.read(previous, RECONCILED)
            if target.shape != grad_input.shape:
                raise ValueError(f"objective {context.objective!r} reconciles its input gradient of shape "
                                 f"{tuple(grad_input.shape)} with {previous!r}'s output gradient of shape "
                                 f"{tuple(target.shape)}; name the objective whose output this one reads")
            distance = n * (grad_input - target).pow(2).sum()
            metrics = {**metrics, "reconciliation": distance.detach()}
        if publish:
            grad_output, = torch.autograd.grad(value, context.net_output, retain_graph=True)
            context.publish(RECONCILED, grad_output)
        return (value + weight * distance if previous is not None else value), metrics

    return reconciled
