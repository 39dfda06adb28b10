"""Hyper-parameters that move during a run, in one place: an objective's weight, a twin's
EMA decay, and (through ``mlaan_func.optim.inject_hyperparams``, which uses the same
values) the optimizer's learning rate and friends.

A loss weight or decay is one of three things:

- a number (or 0-d tensor): fixed, as before;
- a *schedule*: a function of the step (a 0-d int64 tensor) returning a 0-d tensor, worked
  out inside the step, so a compiled step never recompiles;
- ``held(value)``: a 0-d tensor kept in the train state's ``state`` (under ``weight:<objective>``
  or ``decay:<twin blocks>``), read by every step and changed from outside with ``set_held``.

>>> import torch
>>> from torch import nn
>>> import mlaan_func as mf
>>> fc = mf.from_module(nn.Linear(2, 3), name="fc")
>>> scheme = [mf.local_loss(fc, None, mf.losses.cross_entropy, weight=held(1.0), name="final")]
>>> ts = mf.init(scheme, mf.optim.sgd(0.1))
>>> ts = set_held(ts, {"weight:final": 0.5})
>>> float(ts.state["weight:final"])
0.5
"""

from __future__ import annotations

import inspect
import math
import numbers
from typing import Any, Callable, Sequence

import attrs
import torch
from torch import Tensor

from ..errors import KeysError

Schedule = Callable[[Tensor], Tensor]
"""A function of a step count (a 0-d int64 tensor) returning a 0-d float tensor. Loss weights
and decays read the train state's ``step``; the optimizer's schedules read its own count of
updates applied (the same number, except under ``optim.multi_steps``, which applies an
update every few steps)."""


@attrs.frozen
class Held:
    """A hyper-parameter held in the train state: ``value`` to start from, under ``key``
    (given by ``local_loss`` / ``leap_ema``). Made by ``held``."""

    value: Tensor
    key: str = ""


def finite_number(value: Any, what: str) -> float:
    """``value`` (a number or a 0-d tensor) as a finite float, or a ``ValueError`` naming ``what``.

    >>> finite_number(torch.tensor(0.5), "lr")
    0.5
    """
    if isinstance(value, Tensor):
        if value.dim() != 0:
            raise ValueError(f"{what} must be a number or a 0-d tensor, got shape {tuple(value.shape)}")
        value = float(value)
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValueError(f"{what} was set to {value!r}; set it to a finite number")
    return float(value)


def value_tensor(value: Any, what: str, *, like: Tensor | None = None, device=None) -> Tensor:
    """A moving hyper-parameter's 0-d tensor: ``value`` checked by ``finite_number``, with
    ``like``'s dtype and device (so a compiled step never recompiles), else float32 on
    ``device``.

    >>> value_tensor(2, "a weight", like=torch.tensor(1.0, dtype=torch.float64))
    tensor(2., dtype=torch.float64)
    """
    number = finite_number(value, what)
    if like is not None:
        return torch.full((), number, dtype=like.dtype, device=like.device)
    return torch.full((), number, dtype=torch.float32, device=device)


def held(value: float | Tensor) -> Held:
    """A loss weight or EMA decay kept in the train state, changed between steps by ``set_held``.

    >>> held(0.5).value
    tensor(0.5000)
    """
    return Held(value_tensor(value, "a held hyper-parameter"))


def weight_key(objective_name: str) -> str:
    """The state key of an objective's held weight.

    >>> weight_key("m0")
    'weight:m0'
    """
    return f"weight:{objective_name}"


def decay_key(twin_blocks: Sequence[str]) -> str:
    """The state key of a twin's held EMA decay.

    >>> decay_key(["twin.2.0"])
    'decay:twin.2.0'
    """
    return "decay:" + ",".join(twin_blocks)


def is_schedule(value: Any) -> bool:
    return callable(value) and not isinstance(value, (Tensor, Held))


def resolve(spec: "Tensor | Schedule | Held", state: dict[str, Tensor], step: Tensor | None,
            what: str) -> Tensor:
    """The value of a hyper-parameter at this step."""
    if isinstance(spec, Tensor):
        return spec
    if isinstance(spec, Held):
        if spec.key not in state:
            raise KeysError(f"{what} is held in the train state under {spec.key!r}, which the state passed "
                           "in lacks; build the train state with mlaan_func.init for this scheme")
        return state[spec.key]
    if step is None:
        raise ValueError(f"{what} is a schedule of the step, but no step was passed; pass step= "
                         "(the train state's step)")
    value = spec(step)
    if not isinstance(value, Tensor):
        value = torch.tensor(float(value), dtype=torch.float32, device=step.device)
    if value.dim() != 0:
        raise ValueError(f"{what}'s schedule must return a 0-d tensor, got shape {tuple(value.shape)}")
    return value


def set_held(ts: Any, values: dict[str, float | Tensor]) -> Any:
    """A train state with the held hyper-parameters ``values`` (state key -> number)
    replaced; each keeps its dtype and device, so nothing recompiles.

    >>> import torch
    >>> from torch import nn
    >>> import mlaan_func as mf
    >>> fc = mf.from_module(nn.Linear(2, 3), name="fc")
    >>> scheme = [mf.local_loss(fc, None, mf.losses.cross_entropy, weight=held(1.0), name="final")]
    >>> ts = mf.init(scheme, mf.optim.sgd(0.1))
    >>> try:
    ...     set_held(ts, {"weight:final": float("nan")})
    ... except ValueError as err:
    ...     print(err)
    weight:final was set to nan; set it to a finite number
    """
    state = dict(ts.state)
    held_keys = sorted(k for k in state if k.startswith(("weight:", "decay:")))
    for key, value in values.items():
        if key not in held_keys:
            raise KeysError(f"{key!r} is not a held hyper-parameter of this train state (it has "
                           f"{held_keys}); hold one with local_loss(..., weight=held(w)) or "
                           "leap_ema(..., decay=held(m))")
        new = value_tensor(value, key, like=state[key])
        if key.startswith("decay:") and not 0.0 <= float(new) <= 1.0:
            raise ValueError(f"{key} was set to {float(new)}; an EMA decay must be in [0, 1]")
        state[key] = new
    return ts._replace(state=state)


def takes_keyword(fn: Callable, name: str) -> bool:
    """Whether ``fn`` accepts the keyword ``name`` (or any keyword).

    >>> takes_keyword(lambda outputs, batch, *, ts: None, "ts"), takes_keyword(len, "ts")
    (True, False)
    """
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.name == name or p.kind is p.VAR_KEYWORD for p in params)


def takes_step(fn: Callable) -> bool:
    """Whether ``fn`` accepts a ``step`` keyword (losses and after-step updates that want it)."""
    return takes_keyword(fn, "step")


__all__ = ["Held", "Schedule", "decay_key", "finite_number", "held", "is_schedule", "resolve", "set_held",
           "takes_keyword", "takes_step", "value_tensor", "weight_key"]
