"""The routing fold: run a scheme's objectives in order, each on the boundary it reads.

Every place that runs a scheme (the engine's gradients and evaluation, the law checkers,
module parallelism) goes through ``fold``: it hands each objective the output it reads,
keeps the outputs later objectives read, and frees each boundary after its last reader.
``accumulate`` adds gradient dicts out of place (autograd may return stride-0 or shared
gradients, which must never be written into).

>>> import torch
>>> from torch import nn
>>> import mlaan_func as mf
>>> a, b = mf.split(mf.from_module(nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))), ["0"])
>>> scheme = [mf.local_loss(a, None, mf.losses.cross_entropy), mf.local_loss(b, None, mf.losses.cross_entropy)]
>>> seen = []
>>> def run(i, objective, x):
...     seen.append((objective.name, tuple(x.shape)))
...     return {objective.output_name: x + 1}
>>> _ = fold(scheme, mf.plan.plan_routes(scheme), torch.zeros(3, 2), run)
>>> seen
[('0', (3, 2)), ('1', (3, 2))]
>>> accumulate({"w": torch.ones(2)}, {"w": torch.ones(2), "b": torch.zeros(1)})
{'w': tensor([2., 2.]), 'b': tensor([0.])}
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Mapping, Sequence

from torch import Tensor

from ..core.net import INPUT
from .vjp import accumulate as add_gradients

RunObjective = Callable[[int, Any, Tensor], Mapping[str, Tensor]]


def fold(objectives: Sequence[Any], routes: Sequence[Any], x: Tensor | None, run: RunObjective, *,
         acts: dict[str, Tensor] | None = None, only: Iterable[int] | None = None,
         free: bool = True) -> dict[str, Tensor]:
    """Call ``run(i, objective, input)`` for each objective in scheme order (or for the
    indices in ``only``); ``run`` returns the objective's outputs by block name.

    ``acts`` starts the boundaries (default ``{"input": x}``) and is updated in place, so
    ``run`` may read the boundaries held so far; a boundary is dropped after
    its last reader unless ``free=False``. Returns the boundaries still held.
    """
    acts = acts if acts is not None else {}
    if x is not None:
        acts.setdefault(INPUT, x)
    indices = range(len(objectives)) if only is None else only
    for i in indices:
        o = objectives[i]
        outputs = run(i, o, acts[o.input_name])
        for name, out in outputs.items():
            acts.setdefault(name, out)
        if free:
            for name in routes[i].free_after:
                acts.pop(name, None)
    return acts


def accumulate(total: Mapping[str, Tensor], new: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """``total + new`` key by key, out of place (keys of either): ``mlaan_func.vjp.accumulate``
    on a new dict."""
    return add_gradients(dict(total), new, new.values())
