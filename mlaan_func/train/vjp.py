"""The one differentiation primitive of the engine: detached leaves, a vector-Jacobian
product, and gradient sums.

Every gradient the engine computes is ``torch.autograd.grad`` of a graph built on *leaves*:
detached aliases of the parameters (and of a piece's input, where a gradient continues
below it), so each saved activation is freed as soon as the backward pass has used it.
An input leaf is handed to blocks through a view (``input_leaf``), so torch's module
hooks (``FlopCounterMode``, the profiler's module tracker) never see a leaf tensor inside
``autograd.grad``, which they cannot handle.

>>> import torch
>>> w = {"w": torch.tensor([2.0])}
>>> leaves = param_leaves(w, ["w"])
>>> leaf, x = input_leaf(torch.tensor([3.0]), True)
>>> out = leaves["w"] * x
>>> g = vjp(out, [*leaves.values(), leaf], torch.ones(1))
>>> [t.tolist() for t in g]
[[3.0], [2.0]]
>>> accumulate({"w": torch.ones(1)}, ["w", "b"], [torch.ones(1), None])
{'w': tensor([2.])}
"""

from __future__ import annotations

from typing import Iterable, Mapping, Sequence

import torch
from torch import Tensor


def param_leaves(params: Mapping[str, Tensor], names: Iterable[str]) -> dict[str, Tensor]:
    """Detached, gradient-requiring aliases of ``params[name]`` for each name."""
    return {n: params[n].detach().requires_grad_(True) for n in names}


def input_leaf(x: Tensor, needs_grad: bool) -> tuple[Tensor, Tensor]:
    """``(leaf, value)``: the detached input to differentiate against and the value to run
    blocks on (a view of the leaf when it needs a gradient, the leaf itself otherwise)."""
    leaf = x.detach().requires_grad_(needs_grad)
    return leaf, (leaf.view_as(leaf) if needs_grad else leaf)


def vjp(output: Tensor, targets: Sequence[Tensor], cotangent: Tensor | None = None, *,
        retain_graph: bool = False) -> tuple[Tensor | None, ...]:
    """``cotangent`` pulled back from ``output`` to each of ``targets`` (``None`` for a
    target the output does not depend on)."""
    if not targets:
        return ()
    return torch.autograd.grad(output, list(targets), cotangent, retain_graph=retain_graph, allow_unused=True)


def accumulate(total: dict[str, Tensor], names: Iterable[str], values: Iterable[Tensor | None]) -> dict[str, Tensor]:
    """Add ``values`` into ``total`` by name, out of place per entry (autograd may return
    stride-0 or shared gradients, which must never be written into); ``None`` adds nothing.
    Returns ``total``."""
    for k, g in zip(names, values):
        if g is not None:
            total[k] = total[k] + g if k in total else g
    return total


def dense(grads: Mapping[str, Tensor], params: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """A gradient for every parameter, in the parameters' order: zeros where none arrived."""
    return {k: grads[k] if k in grads else torch.zeros_like(v) for k, v in params.items()}
