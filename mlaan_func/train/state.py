"""What a run carries from step to step (``TrainState``) and what a step computes before
its update (``Gradients``), with the names a scheme reads.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Sequence

from torch import Tensor

from ..core.net import AfterStep, Params, State


class TrainState(NamedTuple):
    """Everything a run carries from step to step.

    >>> from torch import nn
    >>> import mlaan_func as mf
    >>> scheme = [mf.local_loss(mf.from_module(nn.Linear(2, 3), name="fc"), None,
    ...                         mf.losses.cross_entropy, name="final")]
    >>> ts = mf.init(scheme, mf.optim.sgd(0.1, momentum=0.9))
    >>> ts._fields, sorted(ts.params), int(ts.step), int(ts.key)
    (('params', 'state', 'opt_state', 'step', 'key'), ['fc.bias', 'fc.weight'], 0, 0)

    ``key`` (int64, 0-d) is the randomness input: every random draw of a step derives from
    ``(key, step, block)`` (see ``mlaan_func.randomness``). ``None`` (a train state built by
    hand) leaves randomness to the global generator.
    """

    params: Params
    state: State
    opt_state: Any
    step: Tensor
    key: Tensor | None = None


class Gradients(NamedTuple):
    grads: Params
    state: State
    losses: dict[str, Tensor]
    metrics: dict[str, dict[str, Tensor]]
    finite: Tensor
    """What a step computes before its update: summed gradients, the new state, each
    objective's weighted loss and metrics, and whether every loss was finite."""


def scheme_names(objectives: Sequence[Any]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The parameter and state keys a scheme reads, in scheme order."""
    params = dict.fromkeys(k for o in objectives for k in o.param_names)
    state = dict.fromkeys(k for o in objectives for k in o.state_names)
    return tuple(params), tuple(state)


def after_steps(objectives: Sequence[Any]) -> tuple[AfterStep, ...]:
    """The distinct after-step updates of a scheme (one per key, in scheme order)."""
    return tuple({a.key: a for o in objectives for a in o.after_steps}.values())
