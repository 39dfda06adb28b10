"""Rematerialisation: an objective's gradients at the memory of a few blocks.

``remat(objective, every=n)`` marks the objective; the executor (``mlaan_func.execute``)
then runs its blocks in pieces of at most ``n``, forward without keeping a graph, storing
only each piece's input, and recomputes each piece inside its own VJP (``torch.autograd.grad``
frees each saved tensor as soon as it is used). The loss, gradients and new state are bit
for bit those of the plain objective: BatchNorm statistics come from the first (stored)
forward and are never touched by a recomputation, and random draws repeat (each block
reseeds from the step's key inside a step; outside one the generator's state is replayed).

>>> import torch
>>> from torch import nn
>>> import mlaan_func as mf
>>> net = mf.from_module(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)))
>>> obj = remat(mf.local_loss(net, None, mf.losses.cross_entropy, name="final"))
>>> opt = mf.optim.sgd(0.1)
>>> ts, _ = mf.step([obj], opt)(mf.init([obj], opt), (torch.randn(5, 4), torch.tensor([0, 1, 2, 0, 1])))
"""

from __future__ import annotations

from typing import Callable

import attrs

from ..combinators import Objective
from ..core.segments import Inside, cut_rule
from ..errors import SchemeError
from .execute import objective_gradient_fn


def remat_grad_fn(every: int = 1, inside: Inside | None = None) -> Callable:
    """The ``grad_fn`` factory ``remat`` gives an objective: the executor's own gradient
    function for it (``execute.objective_gradient_fn``), marked with ``remat_every`` (and
    ``remat_inside``) so that the executor rematerialises its pieces (and cuts its blocks)."""
    if isinstance(every, bool) or not isinstance(every, int) or every < 1:
        raise SchemeError(f"remat granularity must be a positive number of blocks, got {every!r}")
    if inside is not None:
        cut_rule(inside)
        if every != 1:
            raise SchemeError(f"remat(..., inside={inside!r}) cuts inside blocks instead of rematerialising "
                              f"pieces of blocks, so it takes no every= (got {every}); pass one or the other")

    def factory(objective: Objective, taps: tuple[str, ...]) -> Callable:
        return objective_gradient_fn(objective, taps)

    factory.remat_every = every
    factory.remat_inside = inside
    return factory


def remat(objective: Objective, every: int = 1, inside: Inside | None = None) -> Objective:
    """The same objective, differentiated by rematerialisation every ``every`` blocks; with
    ``inside`` (``"block_input"``, ``"conv_inputs"``, ``"nested"`` or a predicate ``(name,
    module) -> bool``) instead, its blocks run with a graph but keep only the values that cross their cuts,
    and each segment between cuts is recomputed in the backward, one at a time
    (``mlaan_func.core.segments``). Gradients, state and losses are bit for bit the plain
    objective's either way.

    >>> import torch
    >>> from torch import nn
    >>> import mlaan_func as mf
    >>> net = mf.from_module(nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)))
    >>> plain = mf.local_loss(net, None, mf.losses.cross_entropy, name="final")
    >>> ts = mf.init([plain], mf.optim.sgd(0.1))
    >>> batch = (torch.randn(5, 4), torch.tensor([0, 1, 2, 0, 1]))
    >>> want = mf.gradients([plain])(ts, batch).grads
    >>> got = mf.gradients([remat(plain, every=2)])(ts, batch).grads
    >>> all(torch.equal(got[k], want[k]) for k in want)
    True
    >>> inner = mf.gradients([remat(plain, inside="conv_inputs")])(ts, batch).grads
    >>> all(torch.equal(inner[k], want[k]) for k in want)
    True
    """
    return attrs.evolve(objective, grad_fn=remat_grad_fn(every, inside))
