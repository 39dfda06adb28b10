"""Optimizers and learning-rate schedules: optax-style pure ``(init, update)`` pairs.

An optimizer works on flat ``dict[str, Tensor]`` parameters. ``init(params)`` gives its
state; ``update(grads, state, params)`` gives ``(updates, new_state)``, and the updates are
*added* to the parameters with ``apply_updates``. Nothing mutates its inputs. Transforms
compose with ``chain``; ``sgd`` and ``adamw`` are chains that match ``torch.optim.SGD`` and
``torch.optim.AdamW`` step for step.

A learning rate is a float or a *schedule*: a function of the step count (a 0-d int64
tensor kept in the optimizer state) returning a 0-d float tensor, so a changing learning
rate never makes ``torch.compile`` recompile.

>>> import torch
>>> params = {"w": torch.tensor([1.0, -2.0])}
>>> opt = sgd(warmup_cosine(0.1, warmup_steps=2, total_steps=10), momentum=0.9)
>>> opt_state = opt.init(params)
>>> updates, opt_state = opt.update({"w": torch.tensor([1.0, 1.0])}, opt_state, params)
>>> apply_updates(params, updates)["w"]
tensor([ 0.9990, -2.0010])
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Callable, NamedTuple, Sequence

import torch
from torch import Tensor

from .core import Params

Grads = dict[str, Tensor]
Updates = dict[str, Tensor]
OptState = Any
Schedule = Callable[[Tensor], Tensor]


class Optimizer(NamedTuple):
    """A pure gradient transformation: ``init(params)`` and ``update(grads, state, params)``."""

    init: Callable[[Params], OptState]
    update: Callable[[Grads, OptState, Params], tuple[Updates, OptState]]


class EmptyState(NamedTuple):
    """The state of a stateless transform."""


class ScaleByScheduleState(NamedTuple):
    count: Tensor  # 0-d int64: updates done so far


class TraceState(NamedTuple):
    momentum_buffer: dict[str, Tensor]


class ScaleByAdamState(NamedTuple):
    count: Tensor  # 0-d int64: updates done so far
    mu: dict[str, Tensor]  # first moment
    nu: dict[str, Tensor]  # second moment


# --------------------------------------------------------------------------- helpers


def _number(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite real number, got {value!r}")
    return float(value)


def _non_negative(name: str, value: Any) -> float:
    value = _number(name, value)
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value!r}")
    return value


def _unit_interval(name: str, value: Any) -> float:
    value = _number(name, value)
    if not 0.0 <= value < 1.0:
        raise ValueError(f"{name} must be in [0, 1), got {value!r}")
    return value


def _count(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return int(value)


def _learning_rate(value: Any) -> "float | Schedule":
    if callable(value):
        return value
    return _non_negative("learning_rate", value)


def _device(params: Params) -> torch.device:
    return next(iter(params.values())).device if params else torch.device("cpu")


def _zero_count(params: Params) -> Tensor:
    return torch.zeros((), dtype=torch.int64, device=_device(params))


def _take(tensors: dict[str, Tensor], keys: Sequence[str], what: str) -> list[Tensor]:
    missing = [k for k in keys if k not in tensors]
    if missing:
        raise KeyError(f"{what} has no entry for {missing[:5]}{' ...' if len(missing) > 5 else ''}; "
                       "initialise the optimizer with the same parameter names as the gradients")
    return [tensors[k] for k in keys]


def _merge(old: dict[str, Tensor], keys: Sequence[str], new: Sequence[Tensor]) -> dict[str, Tensor]:
    """``old`` with ``keys`` replaced by ``new``, in ``old``'s key order."""
    return {**old, **dict(zip(keys, new))}


def _scalar(value: Any, name: str) -> "float | Tensor":
    if isinstance(value, Tensor):
        if value.dim() != 0:
            raise ValueError(f"{name} must be a 0-d tensor, got shape {tuple(value.shape)}")
        return value
    return float(value)


# --------------------------------------------------------------------------- transforms


def scale(factor: float) -> Optimizer:
    """Multiply the updates by a constant ``factor``.

    >>> import torch
    >>> opt = scale(-0.5)
    >>> opt.update({"w": torch.tensor([2.0])}, opt.init({}), None)[0]
    {'w': tensor([-1.])}
    """
    factor = _number("factor", factor)

    def update(grads, state, params=None):
        keys = list(grads)
        if not keys:
            return {}, state
        return dict(zip(keys, torch._foreach_mul(list(grads.values()), factor))), state

    return Optimizer(lambda params: EmptyState(), update)


def scale_by_schedule(schedule: Schedule) -> Optimizer:
    """Multiply the updates by ``schedule(count)``, ``count`` being the updates done so far.

    The first update uses ``schedule(0)``. The count is a 0-d int64 tensor in the state.

    >>> import torch
    >>> opt = scale_by_schedule(lambda step: 1.0 / (step + 1).float())
    >>> state = opt.init({"w": torch.zeros(1)})
    >>> u, state = opt.update({"w": torch.tensor([4.0])}, state)
    >>> u, state = opt.update({"w": torch.tensor([4.0])}, state)
    >>> u["w"], int(state.count)
    (tensor([2.]), 2)
    """
    if not callable(schedule):
        raise ValueError(f"schedule must be a function step_tensor -> 0-d tensor, got {schedule!r}")

    def init(params):
        return ScaleByScheduleState(_zero_count(params))

    def update(grads, state, params=None):
        factor = _scalar(schedule(state.count), "schedule(step)")
        keys = list(grads)
        updates = dict(zip(keys, torch._foreach_mul(list(grads.values()), factor))) if keys else {}
        return updates, ScaleByScheduleState(state.count + 1)

    return Optimizer(init, update)


def scale_by_learning_rate(learning_rate: "float | Schedule") -> Optimizer:
    """Multiply the updates by ``-learning_rate`` (a float or a schedule), for descent.

    >>> import torch
    >>> opt = scale_by_learning_rate(0.1)
    >>> opt.update({"w": torch.tensor([1.0])}, opt.init({}), None)[0]
    {'w': tensor([-0.1000])}
    """
    learning_rate = _learning_rate(learning_rate)
    if callable(learning_rate):
        return scale_by_schedule(lambda step: -learning_rate(step))
    return scale(-learning_rate)


def add_decayed_weights(weight_decay: float) -> Optimizer:
    """Add ``weight_decay * param`` to each update (coupled L2 before a scale, decoupled after).

    >>> import torch
    >>> opt = add_decayed_weights(0.1)
    >>> params = {"w": torch.tensor([2.0])}
    >>> opt.update({"w": torch.tensor([1.0])}, opt.init(params), params)[0]
    {'w': tensor([1.2000])}
    """
    weight_decay = _non_negative("weight_decay", weight_decay)

    def update(grads, state, params=None):
        if params is None:
            raise ValueError("add_decayed_weights needs the params: call update(grads, state, params)")
        keys = list(grads)
        if not keys:
            return {}, state
        ps = _take(params, keys, "params")
        return dict(zip(keys, torch._foreach_add(list(grads.values()), ps, alpha=weight_decay))), state

    return Optimizer(lambda params: EmptyState(), update)


def trace(momentum: float, nesterov: bool = False) -> Optimizer:
    """Heavy-ball momentum with ``torch.optim.SGD`` semantics (dampening 0).

    ``buf = momentum * buf + grad`` (the first buffer is the gradient itself); the update is
    ``buf``, or ``grad + momentum * buf`` with ``nesterov``.

    >>> import torch
    >>> opt = trace(0.5)
    >>> state = opt.init({"w": torch.zeros(1)})
    >>> u, state = opt.update({"w": torch.tensor([1.0])}, state)
    >>> u, state = opt.update({"w": torch.tensor([1.0])}, state)
    >>> u["w"]
    tensor([1.5000])
    """
    momentum = _unit_interval("momentum", momentum)
    if nesterov and momentum == 0.0:
        raise ValueError("nesterov=True needs momentum in (0, 1), got momentum=0")

    def init(params):
        # Zeros make the first step's buffer exactly the gradient, as in torch.
        return TraceState({k: torch.zeros_like(p) for k, p in params.items()})

    def update(grads, state, params=None):
        keys = list(grads)
        if not keys:
            return {}, state
        gs = list(grads.values())
        bufs = torch._foreach_add(gs, _take(state.momentum_buffer, keys, "momentum state"), alpha=momentum)
        out = torch._foreach_add(gs, bufs, alpha=momentum) if nesterov else bufs
        return dict(zip(keys, out)), TraceState(_merge(state.momentum_buffer, keys, bufs))

    return Optimizer(init, update)


def scale_by_adam(b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8) -> Optimizer:
    """Adam's bias-corrected ``m̂ / (sqrt(v̂) + eps)``, with ``torch.optim.Adam``'s arithmetic.

    >>> import torch
    >>> opt = scale_by_adam()
    >>> state = opt.init({"w": torch.zeros(2)})
    >>> opt.update({"w": torch.tensor([3.0, -0.5])}, state)[0]["w"]
    tensor([ 1.0000, -1.0000])
    """
    b1 = _unit_interval("b1", b1)
    b2 = _unit_interval("b2", b2)
    eps = _non_negative("eps", eps)
    # 1 - b**t as -expm1(t log b): exact enough in float32 where 1 - 0.999 is not.
    log_b1 = math.log(b1) if b1 > 0 else -math.inf
    log_b2 = math.log(b2) if b2 > 0 else -math.inf

    def init(params):
        zeros = lambda: {k: torch.zeros_like(p) for k, p in params.items()}  # noqa: E731
        return ScaleByAdamState(_zero_count(params), zeros(), zeros())

    def update(grads, state, params=None):
        count = state.count + 1
        keys = list(grads)
        if not keys:
            return {}, ScaleByAdamState(count, state.mu, state.nu)
        gs = list(grads.values())
        mu = torch._foreach_lerp(_take(state.mu, keys, "Adam state"), gs, 1.0 - b1)
        nu = torch._foreach_mul(_take(state.nu, keys, "Adam state"), b2)
        torch._foreach_addcmul_(nu, gs, gs, value=1.0 - b2)
        t = count.to(torch.float32)
        bias1 = -torch.expm1(t * log_b1)
        bias2_sqrt = (-torch.expm1(t * log_b2)).sqrt()
        denom = torch._foreach_sqrt(nu)
        torch._foreach_div_(denom, bias2_sqrt)
        torch._foreach_add_(denom, eps)
        out = torch._foreach_div(mu, denom)
        torch._foreach_div_(out, bias1)
        return dict(zip(keys, out)), ScaleByAdamState(count, _merge(state.mu, keys, mu), _merge(state.nu, keys, nu))

    return Optimizer(init, update)


def clip_by_global_norm(max_norm: float) -> Optimizer:
    """Scale all updates by ``min(1, max_norm / (global_norm + 1e-6))``, as
    ``torch.nn.utils.clip_grad_norm_`` does.

    >>> import torch
    >>> opt = clip_by_global_norm(1.0)
    >>> opt.update({"a": torch.tensor([3.0]), "b": torch.tensor([4.0])}, opt.init({}))[0]
    {'a': tensor([0.6000]), 'b': tensor([0.8000])}
    """
    max_norm = _number("max_norm", max_norm)
    if max_norm <= 0:
        raise ValueError(f"max_norm must be > 0, got {max_norm!r}")

    def update(grads, state, params=None):
        keys = list(grads)
        if not keys:
            return {}, state
        gs = list(grads.values())
        device = gs[0].device
        norms = torch._foreach_norm(gs)
        total = torch.linalg.vector_norm(torch.stack([n.to(device) for n in norms]))
        coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        return dict(zip(keys, torch._foreach_mul(gs, coef))), state

    return Optimizer(lambda params: EmptyState(), update)


def chain(*optimizers: Optimizer) -> Optimizer:
    """Run transforms in order, each on the previous one's updates; the state is the tuple of
    their states.

    >>> import torch
    >>> opt = chain(clip_by_global_norm(1.0), scale(-0.1))
    >>> params = {"w": torch.tensor([0.0])}
    >>> opt.update({"w": torch.tensor([5.0])}, opt.init(params), params)[0]
    {'w': tensor([-0.1000])}
    """
    for i, o in enumerate(optimizers):
        if not isinstance(o, Optimizer):
            raise ValueError(f"chain takes Optimizers, argument {i} is {type(o).__name__}")

    def init(params):
        return tuple(o.init(params) for o in optimizers)

    def update(grads, state, params=None):
        if len(state) != len(optimizers):
            raise ValueError(f"chain of {len(optimizers)} got a state of {len(state)} parts; "
                             "use the state from this optimizer's init")
        if not optimizers:
            return {k: g.clone() for k, g in grads.items()}, state
        new_state = []
        for o, s in zip(optimizers, state):
            grads, s = o.update(grads, s, params)
            new_state.append(s)
        return grads, tuple(new_state)

    return Optimizer(init, update)


def apply_updates(params: Params, updates: Updates) -> Params:
    """A new dict with ``param + update`` for keys in ``updates``; other keys passed through.

    >>> import torch
    >>> apply_updates({"a": torch.tensor([1.0]), "b": torch.tensor([2.0])}, {"a": torch.tensor([0.5])})
    {'a': tensor([1.5000]), 'b': tensor([2.])}
    """
    keys = [k for k in params if k in updates]
    if len(keys) != len(updates):
        extra = [k for k in updates if k not in params]
        raise KeyError(f"updates for unknown parameters {extra[:5]}")
    if not keys:
        return dict(params)
    ps = [params[k] for k in keys]
    new = torch._foreach_add(ps, [updates[k] for k in keys])
    new = [n if n.dtype == p.dtype else n.to(p.dtype) for n, p in zip(new, ps)]
    return {**params, **dict(zip(keys, new))}


# --------------------------------------------------------------------------- optimizers


def sgd(learning_rate: "float | Schedule", momentum: float = 0.0, nesterov: bool = False,
        weight_decay: float = 0.0) -> Optimizer:
    """``torch.optim.SGD``: coupled weight decay, momentum (dampening 0), optional Nesterov.

    >>> import torch
    >>> opt = sgd(0.1, momentum=0.9, nesterov=True, weight_decay=1e-4)
    >>> params = {"w": torch.ones(2)}
    >>> updates, _ = opt.update({"w": torch.ones(2)}, opt.init(params), params)
    >>> apply_updates(params, updates)["w"]
    tensor([0.8100, 0.8100])
    """
    learning_rate = _learning_rate(learning_rate)
    momentum = _unit_interval("momentum", momentum)
    weight_decay = _non_negative("weight_decay", weight_decay)
    if nesterov and momentum == 0.0:
        raise ValueError("nesterov=True needs momentum in (0, 1), got momentum=0")
    parts = []
    if weight_decay:
        parts.append(add_decayed_weights(weight_decay))
    if momentum:
        parts.append(trace(momentum, nesterov))
    parts.append(scale_by_learning_rate(learning_rate))
    return chain(*parts)


def adamw(learning_rate: "float | Schedule", b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8,
          weight_decay: float = 1e-2) -> Optimizer:
    """``torch.optim.AdamW``: Adam with decoupled weight decay ``lr * weight_decay * param``.

    >>> import torch
    >>> opt = adamw(0.1, weight_decay=0.0)
    >>> params = {"w": torch.ones(2)}
    >>> updates, _ = opt.update({"w": torch.tensor([2.0, -2.0])}, opt.init(params), params)
    >>> apply_updates(params, updates)["w"]
    tensor([0.9000, 1.1000])
    """
    learning_rate = _learning_rate(learning_rate)
    weight_decay = _non_negative("weight_decay", weight_decay)
    return chain(scale_by_adam(b1, b2, eps), add_decayed_weights(weight_decay),
                 scale_by_learning_rate(learning_rate))


# --------------------------------------------------------------------------- schedules


def constant(lr: float) -> Schedule:
    """The schedule that is ``lr`` at every step.

    >>> import torch
    >>> float(constant(0.5)(torch.tensor(7)))
    0.5
    """
    lr = _non_negative("lr", lr)

    def schedule(step: Tensor) -> Tensor:
        return torch.full((), lr, dtype=torch.float32, device=step.device)

    return schedule


def warmup_cosine(peak_lr: float, warmup_steps: int, total_steps: int,
                  start_factor: float = 0.01) -> Schedule:
    """Linear warm-up from ``start_factor * peak_lr`` to ``peak_lr`` over ``warmup_steps``,
    then cosine decay to 0 at ``total_steps``, and 0 after.

    >>> import torch
    >>> lr = warmup_cosine(1.0, warmup_steps=10, total_steps=110)
    >>> [round(float(lr(torch.tensor(s))), 4) for s in (0, 5, 10, 60, 110, 200)]
    [0.01, 0.505, 1.0, 0.5, 0.0, 0.0]
    """
    peak_lr = _non_negative("peak_lr", peak_lr)
    warmup_steps = _count("warmup_steps", warmup_steps, 0)
    total_steps = _count("total_steps", total_steps, 1)
    if total_steps < warmup_steps:
        raise ValueError(f"total_steps must be >= warmup_steps, got total_steps={total_steps} "
                         f"< warmup_steps={warmup_steps}")
    start_factor = _number("start_factor", start_factor)
    if not 0.0 <= start_factor <= 1.0:
        raise ValueError(f"start_factor must be in [0, 1], got {start_factor!r}")
    decay_steps = max(total_steps - warmup_steps, 1)

    def schedule(step: Tensor) -> Tensor:
        s = step.to(torch.float32)
        warm = peak_lr * (start_factor + (1.0 - start_factor) * s / max(warmup_steps, 1))
        progress = ((s - warmup_steps) / decay_steps).clamp(0.0, 1.0)
        cos = peak_lr * 0.5 * (1.0 + torch.cos(math.pi * progress))
        lr = torch.where(s < warmup_steps, warm, cos)
        return torch.where(s >= total_steps, torch.zeros_like(lr), lr)

    return schedule


__all__ = [
    "EmptyState", "Optimizer", "ScaleByAdamState", "ScaleByScheduleState", "TraceState",
    "add_decayed_weights", "adamw", "apply_updates", "chain", "clip_by_global_norm", "constant",
    "scale", "scale_by_adam", "scale_by_learning_rate", "scale_by_schedule", "sgd", "trace",
    "warmup_cosine",
]
