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

from .core.hyper import Schedule, value_tensor
from .core.net import Params
from .errors import KeysError

Grads = dict[str, Tensor]
Updates = dict[str, Tensor]
OptState = Any


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


def _number(name: str, value: Any) -> "float | Tensor":
    if _is_hyperparameter(value):
        return value  # injected: checked once by inject_hyperparams / set_hyperparams
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite real number, got {value!r}")
    return float(value)


def _is_hyperparameter(value: Any) -> bool:
    """A 0-d floating tensor: a hyper-parameter held in an optimizer state (``inject_hyperparams``)."""
    return isinstance(value, Tensor) and value.dim() == 0 and value.is_floating_point()


def _non_negative(name: str, value: Any) -> "float | Tensor":
    value = _number(name, value)
    if not isinstance(value, Tensor) and value < 0:
        raise ValueError(f"{name} must be >= 0, got {value!r}")
    return value


def _unit_interval(name: str, value: Any) -> "float | Tensor":
    value = _number(name, value)
    if not isinstance(value, Tensor) and not 0.0 <= value < 1.0:
        raise ValueError(f"{name} must be in [0, 1), got {value!r}")
    return value


def _static(name: str, value: Any) -> float:
    if isinstance(value, Tensor):
        raise ValueError(f"{name} cannot be a tensor hyper-parameter; pass it through "
                         f"inject_hyperparams(factory, static_args=({name!r},))")
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
        raise KeysError(f"{what} has no entry for {missing[:5]}{' ...' if len(missing) > 5 else ''}; "
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
        if isinstance(weight_decay, Tensor):
            return dict(zip(keys, torch._foreach_add(list(grads.values()), torch._foreach_mul(ps, weight_decay)))), state
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
    if nesterov and not isinstance(momentum, Tensor) and momentum == 0.0:
        raise ValueError("nesterov=True needs momentum in (0, 1), got momentum=0")

    def init(params):
        # Zeros make the first step's buffer exactly the gradient, as in torch.
        return TraceState({k: torch.zeros_like(p) for k, p in params.items()})

    def update(grads, state, params=None):
        keys = list(grads)
        if not keys:
            return {}, state
        gs = list(grads.values())
        old = _take(state.momentum_buffer, keys, "momentum state")
        if isinstance(momentum, Tensor):
            bufs = torch._foreach_add(gs, torch._foreach_mul(old, momentum))
            out = torch._foreach_add(gs, torch._foreach_mul(bufs, momentum)) if nesterov else bufs
        else:
            bufs = torch._foreach_add(gs, old, alpha=momentum)
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
    b1 = _unit_interval("b1", _static("b1", b1))
    b2 = _unit_interval("b2", _static("b2", b2))
    eps = _non_negative("eps", _static("eps", eps))
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
    max_norm = _number("max_norm", _static("max_norm", max_norm))
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
        raise KeysError(f"updates for unknown parameters {extra[:5]}")
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
    if nesterov and not isinstance(momentum, Tensor) and momentum == 0.0:
        raise ValueError("nesterov=True needs momentum in (0, 1), got momentum=0")
    parts = []
    # an injected (tensor) hyper-parameter keeps its transform whatever its value, so the
    # state keeps one structure for the whole run
    if isinstance(weight_decay, Tensor) or weight_decay:
        parts.append(add_decayed_weights(weight_decay))
    if isinstance(momentum, Tensor) or momentum:
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


# --------------------------------------------------------------------------- combinators

Labels = "dict[str, Any] | Callable[[Params], dict[str, Any]]"


def _no_update(t: Tensor) -> Tensor:
    # -0.0, not 0.0: p + (-0.0) == p bitwise for every p, including p = -0.0
    return torch.full_like(t, -0.0)


def _select(flag: Tensor, new: Any, old: Any) -> Any:
    """``new`` where ``flag`` else ``old``, leaf by leaf over two states of one structure."""
    if isinstance(new, Tensor):
        return torch.where(flag.to(new.device), new, old)
    if isinstance(new, dict):
        return {k: _select(flag, v, old[k]) for k, v in new.items()}
    if isinstance(new, tuple):
        parts = [_select(flag, n, o) for n, o in zip(new, old)]
        return type(new)(*parts) if hasattr(new, "_fields") else tuple(parts)
    return new


def _names_of(spec: Any, tensors: Params, what: str, fix: str) -> dict[str, Any]:
    """``spec`` (a dict or a function of the tensors) checked to name exactly ``tensors``' keys."""
    given = spec(tensors) if callable(spec) else spec
    if not isinstance(given, dict):
        raise ValueError(f"{what} must be a dict from parameter names, or a function params -> "
                         f"such a dict; got {type(given).__name__}")
    missing = [k for k in tensors if k not in given]
    unknown = [k for k in given if k not in tensors]
    if missing:
        raise ValueError(f"{what} gives nothing for parameters {missing[:5]}"
                         f"{' ...' if len(missing) > 5 else ''} ({len(missing)} in all); {fix}")
    if unknown:
        raise ValueError(f"{what} names unknown parameters {unknown[:5]}"
                         f"{' ...' if len(unknown) > 5 else ''} ({len(unknown)} in all); the parameters "
                         f"are {list(tensors)[:5]}{' ...' if len(tensors) > 5 else ''}: check the spelling")
    return {k: given[k] for k in tensors}


class PartitionState(NamedTuple):
    inner: dict  # group label -> that group's transform state


def partition(transforms: "dict[Any, Optimizer]", labels: Labels) -> Optimizer:
    """Each parameter group its own transform (optax's ``multi_transform``).

    ``labels`` maps every parameter name to a key of ``transforms``: a dict, or a function
    ``params -> dict`` (called on the params at ``init`` and on the gradients, which have the
    same names and shapes, at each update; see ``mlaan_func.labels``).

    >>> import torch
    >>> params = {"head.w": torch.ones(1), "body.w": torch.ones(1)}
    >>> opt = partition({"head": sgd(0.5), "body": set_to_zero()},
    ...                 lambda p: {k: k.split(".")[0] for k in p})
    >>> u, _ = opt.update({"head.w": torch.ones(1), "body.w": torch.ones(1)}, opt.init(params), params)
    >>> apply_updates(params, u)
    {'head.w': tensor([0.5000]), 'body.w': tensor([1.])}
    """
    if not isinstance(transforms, dict) or not transforms:
        raise ValueError("partition takes a non-empty dict {group label: Optimizer}")
    for label, t in transforms.items():
        if not isinstance(t, Optimizer):
            raise ValueError(f"partition: the transform for group {label!r} is a {type(t).__name__}, "
                             "not an Optimizer")

    def groups(tensors: Params) -> dict[Any, list[str]]:
        named = _names_of(labels, tensors, "the partition's labels",
                          f"give every parameter one of the groups {list(transforms)}")
        unknown = list(dict.fromkeys(v for v in named.values() if v not in transforms))
        if unknown:
            raise ValueError(f"the partition's labels name groups {unknown} that have no transform; the "
                             f"groups are {list(transforms)}: add a transform for them or fix the labels")
        out: dict[Any, list[str]] = {label: [] for label in transforms}
        for k, label in named.items():
            out[label].append(k)
        return out

    def init(params):
        return PartitionState({label: transforms[label].init({k: params[k] for k in keys})
                               for label, keys in groups(params).items()})

    def update(grads, state, params=None):
        updates: Updates = {}
        inner = dict(state.inner)
        for label, keys in groups(params if params is not None else grads).items():
            sub = {k: grads[k] for k in keys if k in grads}
            sub_params = None if params is None else {k: params[k] for k in keys}
            u, inner[label] = transforms[label].update(sub, state.inner[label], sub_params)
            updates.update(u)
        return {k: updates[k] for k in grads}, PartitionState(inner)

    return Optimizer(init, update)


class MaskedState(NamedTuple):
    inner_state: OptState


def masked(transform: Optimizer, mask: "dict[str, bool] | Callable[[Params], dict[str, bool]]") -> Optimizer:
    """``transform`` on the parameters whose ``mask`` is true; the others' updates pass
    through unchanged. ``mask`` names every parameter (a dict, or a function ``params -> dict``).

    >>> import torch
    >>> params = {"w": torch.ones(1), "b": torch.ones(1)}
    >>> opt = masked(add_decayed_weights(0.5), {"w": True, "b": False})
    >>> opt.update({"w": torch.zeros(1), "b": torch.zeros(1)}, opt.init(params), params)[0]
    {'w': tensor([0.5000]), 'b': tensor([0.])}
    """
    if not isinstance(transform, Optimizer):
        raise ValueError(f"masked takes an Optimizer, got {type(transform).__name__}")

    def chosen(tensors: Params) -> list[str]:
        named = _names_of(mask, tensors, "the mask", "give every parameter True or False")
        bad = [k for k, v in named.items() if not isinstance(v, bool)]
        if bad:
            raise ValueError(f"the mask must be True or False per parameter; {bad[:5]} are not")
        return [k for k, v in named.items() if v]

    def init(params):
        return MaskedState(transform.init({k: params[k] for k in chosen(params)}))

    def update(grads, state, params=None):
        keys = chosen(params if params is not None else grads)
        sub_params = None if params is None else {k: params[k] for k in keys}
        u, inner = transform.update({k: grads[k] for k in keys}, state.inner_state, sub_params)
        return {k: u.get(k, g) for k, g in grads.items()}, MaskedState(inner)

    return Optimizer(init, update)


def set_to_zero() -> Optimizer:
    """Updates that leave the parameters exactly as they are: a frozen group.

    >>> import torch
    >>> params = {"w": torch.tensor([-0.0, 2.0])}
    >>> opt = set_to_zero()
    >>> u, _ = opt.update({"w": torch.ones(2)}, opt.init(params), params)
    >>> apply_updates(params, u)["w"]
    tensor([-0., 2.])
    """
    def update(grads, state, params=None):
        return {k: _no_update(g) for k, g in grads.items()}, state

    return Optimizer(lambda params: EmptyState(), update)


class ApplyIfFiniteState(NamedTuple):
    notfinite_count: Tensor  # 0-d int64: non-finite updates in a row
    last_finite: Tensor  # 0-d bool: whether the last update was applied
    total_notfinite: Tensor  # 0-d int64: non-finite updates skipped in all
    inner_state: OptState


def _all_finite(tensors: Sequence[Tensor], device: torch.device) -> Tensor:
    if not tensors:
        return torch.ones((), dtype=torch.bool, device=device)
    return torch.stack([torch.isfinite(t).all().to(device) for t in tensors]).all()


def apply_if_finite(transform: Optimizer, max_consecutive_errors: int) -> Optimizer:
    """``transform``, skipping any update whose gradients are not all finite: the parameters
    and ``transform``'s state stay bitwise as they were and the skip is counted.

    More than ``max_consecutive_errors`` skips in a row raise ``FloatingPointError`` (the run
    has diverged). ``optim.state_metrics(opt_state)`` reports the counts; ``mlaan_func.step``
    puts them in its metrics under ``"optimizer"``. Pass ``check_finite=False`` to
    ``mlaan_func.step``, which otherwise stops at the first non-finite loss.

    >>> import torch
    >>> params = {"w": torch.ones(1)}
    >>> opt = apply_if_finite(sgd(0.1), max_consecutive_errors=3)
    >>> u, state = opt.update({"w": torch.tensor([float("nan")])}, opt.init(params), params)
    >>> apply_updates(params, u)["w"], int(state.total_notfinite)
    (tensor([1.]), 1)
    """
    if not isinstance(transform, Optimizer):
        raise ValueError(f"apply_if_finite takes an Optimizer, got {type(transform).__name__}")
    max_consecutive_errors = _count("max_consecutive_errors", max_consecutive_errors, 0)

    def init(params):
        zero = _zero_count(params)
        return ApplyIfFiniteState(zero, torch.ones((), dtype=torch.bool, device=zero.device), zero,
                                  transform.init(params))

    def update(grads, state, params=None):
        finite = _all_finite(list(grads.values()), state.notfinite_count.device)
        u, inner = transform.update(grads, state.inner_state, params)
        count = torch.where(finite, torch.zeros_like(state.notfinite_count), state.notfinite_count + 1)
        if int(count) > max_consecutive_errors:
            raise FloatingPointError(
                f"{int(count)} updates in a row had non-finite gradients (apply_if_finite allows "
                f"{max_consecutive_errors}); the run has diverged: lower the learning rate, clip the "
                "gradients (optim.clip_by_global_norm) or check the data for NaN")
        updates = {k: torch.where(finite.to(v.device), v, _no_update(v)) for k, v in u.items()}
        return updates, ApplyIfFiniteState(count, finite, state.total_notfinite + (~finite).long(),
                                           _select(finite, inner, state.inner_state))

    return Optimizer(init, update)


class MultiStepsState(NamedTuple):
    mini_step: Tensor  # 0-d int64: gradients accumulated since the last update
    acc_grads: dict[str, Tensor]  # their sum
    inner_state: OptState


def multi_steps(transform: Optimizer, every_k: int) -> Optimizer:
    """Gradient accumulation: ``transform`` runs every ``every_k``-th call on the mean of the
    ``every_k`` gradients since its last update; the calls between leave the parameters as
    they are. With mean losses and equal micro-batches, one update equals one step on the
    ``every_k`` times larger batch (BatchNorm statistics and EMA twins still move every call).

    >>> import torch
    >>> params = {"w": torch.zeros(1)}
    >>> opt = multi_steps(sgd(1.0), every_k=2)
    >>> state = opt.init(params)
    >>> for g in (1.0, 3.0):
    ...     u, state = opt.update({"w": torch.tensor([g])}, state, params)
    ...     params = apply_updates(params, u)
    >>> params["w"]
    tensor([-2.])
    """
    if not isinstance(transform, Optimizer):
        raise ValueError(f"multi_steps takes an Optimizer, got {type(transform).__name__}")
    if isinstance(every_k, bool) or not isinstance(every_k, numbers.Integral) or every_k < 1:
        raise ValueError(f"every_k must be an int >= 1 (the number of micro-batches per update; 1 "
                         f"updates every call), got {every_k!r}")
    every_k = int(every_k)

    def init(params):
        return MultiStepsState(_zero_count(params), {k: torch.zeros_like(p) for k, p in params.items()},
                               transform.init(params))

    def update(grads, state, params=None):
        keys = list(grads)
        acc = dict(zip(keys, torch._foreach_add(_take(state.acc_grads, keys, "multi_steps state"),
                                                list(grads.values())))) if keys else {}
        mini = state.mini_step + 1
        emit = mini == every_k
        mean = dict(zip(keys, torch._foreach_div(list(acc.values()), float(every_k)))) if keys else {}
        u, inner = transform.update(mean, state.inner_state, params)
        updates = {k: torch.where(emit.to(v.device), v, _no_update(v)) for k, v in u.items()}
        acc = {k: torch.where(emit.to(v.device), torch.zeros_like(v), v) for k, v in acc.items()}
        return updates, MultiStepsState(torch.where(emit, torch.zeros_like(mini), mini),
                                        {**state.acc_grads, **acc}, _select(emit, inner, state.inner_state))

    return Optimizer(init, update)


class InjectHyperparamsState(NamedTuple):
    hyperparams: dict[str, Tensor]  # name -> 0-d float tensor, read at every update
    inner_state: OptState


def _hyper_tensor(name: str, value: Any, like: "Tensor | None" = None, device=None) -> Tensor:
    return value_tensor(value, f"hyper-parameter {name}", like=like, device=device)


def inject_hyperparams(factory: Callable[..., Optimizer], static_args: Sequence[str] = ()
                       ) -> Callable[..., Optimizer]:
    """``inject_hyperparams(factory)(**values)``: the optimizer ``factory(**values)`` whose
    numeric hyper-parameters live in its state as 0-d tensors, changed between steps with
    ``set_hyperparams`` (no rebuild, no recompile). Other values (booleans, schedules, and
    the names in ``static_args``) stay fixed.

    >>> import torch
    >>> params = {"w": torch.ones(1)}
    >>> opt = inject_hyperparams(sgd)(learning_rate=0.1, momentum=0.9)
    >>> state = set_hyperparams(opt.init(params), learning_rate=0.5)
    >>> u, state = opt.update({"w": torch.ones(1)}, state, params)
    >>> u["w"], float(state.hyperparams["learning_rate"])
    (tensor([-0.5000]), 0.5)
    """
    if not callable(factory):
        raise ValueError(f"inject_hyperparams takes an optimizer factory such as optim.sgd, got {factory!r}")
    static_args = tuple(static_args)

    def injected(**values) -> Optimizer:
        dynamic = [k for k, v in values.items() if k not in static_args
                   and (isinstance(v, Tensor) or (isinstance(v, numbers.Real) and not isinstance(v, bool)))]
        fixed = {k: v for k, v in values.items() if k not in dynamic}
        factory(**values)  # the factory's own checks, on the starting values

        def init(params):
            device = _device(params)
            hyper = {k: _hyper_tensor(k, values[k], device=device) for k in dynamic}
            return InjectHyperparamsState(hyper, factory(**fixed, **hyper).init(params))

        def update(grads, state, params=None):
            missing = [k for k in dynamic if k not in state.hyperparams]
            if missing:
                raise KeysError(f"the optimizer state has no hyper-parameters {missing}; use the state "
                               "from this optimizer's init")
            u, inner = factory(**fixed, **state.hyperparams).update(grads, state.inner_state, params)
            return u, InjectHyperparamsState(state.hyperparams, inner)

        return Optimizer(init, update)

    return injected


def _map_states(state: Any, fn: Callable[[Any], Any]) -> Any:
    """``state`` with ``fn`` applied to every sub-state, innermost first (NamedTuples,
    tuples and dicts are walked)."""
    if isinstance(state, dict):
        state = {k: _map_states(v, fn) for k, v in state.items()}
    elif isinstance(state, tuple):
        parts = [_map_states(v, fn) for v in state]
        state = type(state)(*parts) if hasattr(state, "_fields") else tuple(parts)
    return fn(state)


def set_hyperparams(opt_state: OptState, **values) -> OptState:
    """A new optimizer state with the injected hyper-parameters ``values`` replaced,
    wherever they occur in it (every ``inject_hyperparams`` part that has them).

    Values keep their tensor's dtype and device, so a compiled step never recompiles.

    >>> import torch
    >>> opt = partition({"a": inject_hyperparams(sgd)(learning_rate=0.1)},
    ...                 lambda p: dict.fromkeys(p, "a"))
    >>> state = set_hyperparams(opt.init({"w": torch.ones(1)}), learning_rate=0.01)
    >>> round(float(state.inner["a"].hyperparams["learning_rate"]), 4)
    0.01
    """
    found: set[str] = set()
    available: set[str] = set()

    def replace(s):
        if not isinstance(s, InjectHyperparamsState):
            return s
        available.update(s.hyperparams)
        hyper = dict(s.hyperparams)
        for k, v in values.items():
            if k in hyper:
                hyper[k] = _hyper_tensor(k, v, like=hyper[k])
                found.add(k)
        return InjectHyperparamsState(hyper, s.inner_state)

    new = _map_states(opt_state, replace)
    unknown = [k for k in values if k not in found]
    if unknown:
        raise KeysError(f"no injected hyper-parameter {unknown} in this optimizer state (it has "
                       f"{sorted(available)}); build the optimizer with "
                       "optim.inject_hyperparams(factory)(name=value, ...)")
    return new


def keep_entries(new: OptState, old: OptState, keys: frozenset[str]) -> OptState:
    """``new`` optimizer state with the per-parameter entries of ``keys`` taken from ``old``
    (every dict keyed by parameter names; counts and hyper-parameters stay ``new``): the
    state of a step that trains only some of the parameters.

    >>> import torch
    >>> opt = sgd(0.1, momentum=0.9)
    >>> old = opt.init({"a": torch.ones(1), "b": torch.ones(1)})
    >>> _, new = opt.update({"a": torch.ones(1), "b": torch.ones(1)}, old, {"a": torch.ones(1), "b": torch.ones(1)})
    >>> kept = keep_entries(new, old, frozenset({"b"}))
    >>> float(kept[0].momentum_buffer["a"]), float(kept[0].momentum_buffer["b"])
    (1.0, 0.0)
    """
    if isinstance(new, dict):
        return {k: old[k] if k in keys else keep_entries(v, old[k], keys) for k, v in new.items()}
    if isinstance(new, tuple):
        parts = [keep_entries(a, b, keys) for a, b in zip(new, old)]
        return type(new)(*parts) if hasattr(new, "_fields") else tuple(parts)
    return new


def map_entries(fn: Callable[[str, Tensor], Tensor], opt_state: OptState, keys: frozenset[str]) -> OptState:
    """``opt_state`` with each per-parameter tensor entry of ``keys`` (in every dict keyed by
    parameter names) replaced by ``fn(key, entry)``, in the state's own order: how a
    distributed step gives every rank the entries of the parameters another rank owns.

    >>> import torch
    >>> state = sgd(0.1, momentum=0.9).init({"a": torch.ones(1), "b": torch.ones(1)})
    >>> moved = map_entries(lambda k, v: v + 1, state, frozenset({"a"}))
    >>> float(moved[0].momentum_buffer["a"]), float(moved[0].momentum_buffer["b"])
    (1.0, 0.0)
    """
    if isinstance(opt_state, dict):
        return {k: fn(k, v) if k in keys and isinstance(v, Tensor) else map_entries(fn, v, keys)
                for k, v in opt_state.items()}
    if isinstance(opt_state, tuple):
        parts = [map_entries(fn, a, keys) for a in opt_state]
        return type(opt_state)(*parts) if hasattr(opt_state, "_fields") else tuple(parts)
    return opt_state


def state_metrics(opt_state: OptState) -> dict[str, Tensor]:
    """What the optimizer state reports: ``apply_if_finite``'s ``skipped`` flag and counts,
    ``multi_steps``' ``mini_step``, and every injected hyper-parameter, keyed by the
    partition groups they sit in (``"heads/learning_rate"``).

    >>> import torch
    >>> opt = apply_if_finite(inject_hyperparams(sgd)(learning_rate=0.1), max_consecutive_errors=2)
    >>> sorted(state_metrics(opt.init({"w": torch.ones(1)})))
    ['learning_rate', 'notfinite_count', 'skipped', 'total_notfinite']
    """
    out: dict[str, Tensor] = {}

    def walk(s, path):
        if isinstance(s, ApplyIfFiniteState):
            out[path + "skipped"] = (~s.last_finite).long()
            out[path + "notfinite_count"] = s.notfinite_count
            out[path + "total_notfinite"] = s.total_notfinite
        elif isinstance(s, MultiStepsState):
            out[path + "mini_step"] = s.mini_step
        elif isinstance(s, InjectHyperparamsState):
            out.update({path + k: v for k, v in s.hyperparams.items()})
        if isinstance(s, PartitionState):
            for label, v in s.inner.items():
                walk(v, f"{path}{label}/")
        elif isinstance(s, dict):
            for v in s.values():
                if not isinstance(v, Tensor):  # a per-parameter entry reports nothing
                    walk(v, path)
        elif isinstance(s, tuple):
            for v in s:
                walk(v, path)

    walk(opt_state, "")
    return out


__all__ = [
    "ApplyIfFiniteState", "EmptyState", "InjectHyperparamsState", "MaskedState", "MultiStepsState",
    "Optimizer", "PartitionState", "ScaleByAdamState", "ScaleByScheduleState", "TraceState",
    "apply_if_finite", "inject_hyperparams", "masked", "multi_steps", "partition", "set_hyperparams",
    "set_to_zero", "state_metrics",
    "add_decayed_weights", "adamw", "apply_updates", "chain", "clip_by_global_norm", "constant",
    "scale", "scale_by_adam", "scale_by_learning_rate", "scale_by_schedule", "sgd", "trace",
    "warmup_cosine",
]
