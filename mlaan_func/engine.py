"""The training engine: ``init``, ``step``, ``evaluate``, ``save``, ``load``.

A step differentiates each objective (``torch.autograd.grad`` eagerly,
``torch.func.grad_and_value`` when compiled) over only the parameters it touches, on the detached output of the objective that produced its input, adds the
gradients, releases each objective's graph before the next, applies one pure optimizer
update and then the objectives' ``after_steps`` (EMA twins).

>>> import torch
>>> from torch import nn
>>> import mlaan_func as mf
>>> net = mf.from_module(nn.Sequential(nn.Flatten(), nn.Linear(12, 3)))
>>> scheme = [mf.local_loss(net, None, mf.losses.cross_entropy)]
>>> opt = mf.optim.sgd(0.1)
>>> ts = mf.init(scheme, opt, seed=0)
>>> ts, metrics = mf.step(scheme, opt)(ts, (torch.randn(4, 3, 2, 2), torch.tensor([0, 1, 2, 0])))
>>> int(ts.step)
1
"""

from __future__ import annotations

import contextlib
import os
import types
from typing import Any, Callable, Iterable, NamedTuple, Sequence

import torch
from torch import Tensor
from torch.func import grad_and_value
from torch.utils._pytree import tree_map, tree_structure, tree_unflatten

from . import checkpoint, hyper
from .batch import as_batch, check_device, check_structure, input_of
from .combinators import Objective
from .core import INPUT, AfterStep, Params, State, check_keys, init_params
from .errors import NonFiniteLossError
from .identity import check_identity
from .kernels import own_code
from .plan import Route, plan_routes
from .shared_step import shared_gradients, use_shared
from .train_state import Gradients, TrainState, after_steps, scheme_names
from .vjp import dense, param_leaves, vjp
from .optim import Optimizer, apply_updates, state_metrics
from .randomness import key_from_seed, seed_block, seeded
from .routing import accumulate, fold


def init(objectives: Sequence[Objective], optimizer: Optimizer, *, seed: int = 0,
         device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> TrainState:
    """A fresh ``TrainState`` for a scheme: parameters and state from ``seed``.

    >>> from torch import nn
    >>> import mlaan_func as mf
    >>> scheme = [mf.local_loss(mf.from_module(nn.Linear(2, 3), name="fc"), None,
    ...                         mf.losses.cross_entropy, name="final")]
    >>> ts = init(scheme, mf.optim.sgd(0.1), seed=0)
    >>> sorted(ts.params), ts.state, int(ts.step)
    (['fc.bias', 'fc.weight'], {}, 0)
    """
    plan_routes(objectives)
    params, state = init_params(*objectives, seed=seed, device=device, dtype=dtype)
    held = {o.weight.key: o.weight.value.to(device) for o in objectives if isinstance(o.weight, hyper.Held)}
    state = {**state, **held}
    return TrainState(params, state, optimizer.init(params),
                      torch.zeros((), dtype=torch.int64, device=device), key_from_seed(seed, device))


def objective_fn(objective: Objective, taps: tuple[str, ...] = ()) -> Callable:
    """``(params, state, x, batch, step) -> (loss, (updates, outputs, metrics))`` in training mode."""
    def objective_loss(params: Params, state: State, x: Tensor, batch: Any, step: Tensor | None = None):
        loss, updates, outputs, metrics = objective.forward(params, state, x, batch, train=True, taps=taps,
                                                            step=step)
        return loss, (updates, outputs, metrics)

    return objective_loss


def autograd_grad_and_value(fn: Callable) -> Callable:
    """``torch.func.grad_and_value(fn, has_aux=True)`` computed with ``torch.autograd.grad``
    on detached aliases of the parameters, which frees each saved activation as soon as the
    backward pass has used it. ``torch.func`` keeps the whole graph alive until the transform
    returns (it builds it for higher-order use), which doubled the step peak of E2E ResNet-32
    (606 MiB against 306 MiB for plain ``.backward()``). Used in eager mode; compiled steps
    trace ``torch.func.grad_and_value``, which AOTAutograd turns into one joint graph.
    """
    def grad_and_value_fn(params: Params, *args):
        leaves = param_leaves(params, params)
        with torch.enable_grad():
            loss, aux = fn(leaves, *args)
            grads = vjp(loss, list(leaves.values()))
        grads = dense({k: g for k, g in zip(params, grads) if g is not None}, params)
        return grads, (loss.detach(), tree_map(_detach, aux))

    return grad_and_value_fn


def _detach(x: Any) -> Any:
    return x.detach() if isinstance(x, Tensor) else x


def gradient_fns(objectives: Sequence[Objective], routes: Sequence[Route], *, compile: bool = False,
                 backend: str = "inductor") -> list[Callable]:
    """Per objective: ``(params, state, x, batch, step) -> (grads, (loss, (updates, outputs, metrics)))``.

    Eager: ``autograd_grad_and_value``; compiled: ``torch.func.grad_and_value`` under
    ``torch.compile``. An objective's own ``grad_fn(objective, taps)`` builds its function
    in place of either.
    """
    fns = []
    for o, r in zip(objectives, routes):
        if o.grad_fn is not None:
            fn = o.grad_fn(o, r.taps)
        elif compile:
            fn = grad_and_value(objective_fn(o, r.taps), has_aux=True)
        else:
            fn = autograd_grad_and_value(objective_fn(o, r.taps))
        fns.append(torch.compile(own_code(fn, f"objective_{len(fns)}"), backend=backend, dynamic=False)
                   if compile else fn)
    return fns


def gradients(objectives: Sequence[Objective], *, compile: bool = False,
              backend: str = "inductor", share: bool | str | None = None) -> Callable[[TrainState, Any], Gradients]:
    """The summed gradients of a scheme's local losses and the new state, without an update.

    BatchNorm statistics: every objective reads the state as it was at the start of the
    step; for each key, the first objective in scheme order that runs it writes it.
    ``share``: run each block application that several objectives share once and deliver
    gradients by reach (``mlaan_func.shared_step``). ``None`` (the default): wherever it
    changes something, with gradients bit-identical to running each objective alone (one
    VJP per objective at each shared block); ``True``: always; ``"sum"``: also sum the
    cotangents arriving at a shared block before one VJP (fewer FLOPs; gradients equal to
    float32 rounding); ``False``: the per-objective engine.

    >>> from torch import nn
    >>> import mlaan_func as mf
    >>> scheme = [mf.local_loss(mf.from_module(nn.Linear(2, 3), name="fc"), None,
    ...                         mf.losses.cross_entropy, name="final")]
    >>> ts = mf.init(scheme, mf.optim.sgd(0.1))
    >>> g = gradients(scheme)(ts, (torch.randn(4, 2), torch.tensor([0, 1, 2, 0])))
    >>> sorted(g.grads), list(g.losses), bool(g.finite)
    (['fc.bias', 'fc.weight'], ['final'], True)
    """
    objectives = list(objectives)
    routes = plan_routes(objectives)
    check_identity(objectives)
    param_keys, state_keys = scheme_names(objectives)
    first_structure = None

    def checked(ts: TrainState, batch: Any) -> tuple[Any, Tensor]:
        nonlocal first_structure
        check_keys("the train state's params", ts.params, param_keys)
        check_keys("the train state's state", ts.state, state_keys)
        batch = as_batch(batch)
        first_structure = check_structure(batch, first_structure)
        x = input_of(batch)
        check_device(x, ts.params)
        return batch, x

    if use_shared(objectives, share=share, compile=compile):
        shared = shared_gradients(objectives, compile=compile, backend=backend, sum_cotangents=share == "sum")

        def run_shared(ts: TrainState, batch: Any) -> Gradients:
            batch, x = checked(ts, batch)
            with _step_randomness(ts, x):
                return shared(ts, batch)

        return run_shared

    fns = gradient_fns(objectives, routes, compile=compile, backend=backend)

    def run(ts: TrainState, batch: Any) -> Gradients:
        batch, x = checked(ts, batch)
        with _step_randomness(ts, x):
            g, _ = objectives_alone(objectives, routes, fns, ts, batch, {INPUT: x})
        return g._replace(grads={k: g.grads[k] for k in ts.params}, state={**ts.state, **g.state})

    return run


def objectives_alone(objectives: Sequence[Objective], routes: Sequence[Route], fns: Sequence[Callable],
                     ts: TrainState, batch: Any, acts: dict[str, Tensor], *, only: Iterable[int] | None = None
                     ) -> tuple[Gradients, dict[str, Tensor]]:
    """The per-objective engine's body: each objective (those in ``only``, default all) run
    alone with its gradient function from ``gradient_fns``, from the boundaries in ``acts``.
    Returns the summed gradients, the state entries written (first writer wins), losses,
    metrics and the finite flag, and the boundaries held afterwards (all of them when
    ``only`` is given, for a rank to send on)."""
    grads: Params = {}
    updates: State = {}
    losses: dict[str, Tensor] = {}
    metrics: dict[str, dict[str, Tensor]] = {}

    def run_objective(i: int, o: Objective, x: Tensor) -> dict[str, Tensor]:
        nonlocal grads
        p = {k: ts.params[k] for k in o.param_names}
        seed_block(o.name)
        g, (loss, (new, outputs, m)) = fns[i](p, ts.state, x, batch, ts.step)
        grads = accumulate(grads, g)
        for k, v in new.items():
            updates.setdefault(k, v)
        losses[o.name], metrics[o.name] = loss, m
        return outputs

    acts = fold(objectives, routes, None, run_objective, acts=acts, only=only, free=only is None)
    finite = torch.stack([torch.isfinite(v) for v in losses.values()]).all() if losses else torch.tensor(True)
    return Gradients(grads, updates, losses, metrics, finite), acts


def _step_randomness(ts: TrainState, x: Tensor):
    """The step's random draws derive from ``(ts.key, ts.step)``; no key: the global generator."""
    if ts.key is None:
        return contextlib.nullcontext()
    return seeded(ts.key, ts.step, x.device)


def apply_gradients(ts: TrainState, grads: Params, state: State, optimizer: Optimizer,
                    post: Sequence[AfterStep]) -> TrainState:
    """One pure optimizer update with ``grads``, then the after-step updates (EMA twins) on
    ``state``: the end of every step, single-process or distributed."""
    updates, opt_state = optimizer.update({k: grads[k] for k in ts.params}, ts.opt_state, ts.params)
    params = apply_updates(ts.params, updates)
    for a in post:
        state = a.fn(params, state, step=ts.step) if hyper.takes_step(a.fn) else a.fn(params, state)
    return ts._replace(params=params, state=state, opt_state=opt_state, step=ts.step + 1)


def step(objectives: Sequence[Objective], optimizer: Optimizer, *, compile: bool = False,
         backend: str = "inductor", check_finite: bool = True, share: bool | str | None = None
         ) -> Callable[[TrainState, Any], tuple[TrainState, dict[str, dict[str, Tensor]]]]:
    """A pure training step ``(train_state, batch) -> (train_state, metrics)``.

    A batch is ``(x, y)``, a ``Batch``, or any pytree whose first leaf is the input (every
    loss gets the whole batch); every step must get the same structure. ``metrics`` holds
    each objective's metrics under its name, and what the optimizer state reports
    (``optim.state_metrics``: skipped updates, injected hyper-parameters), when anything,
    under ``"optimizer"``.

    ``compile=True`` runs every block through a ``torch.compile``d kernel shared by all
    blocks of its kind (``mlaan_func.kernels``; the compile count does not grow with the
    number of modules); with ``share=False`` it compiles each objective's whole gradient
    function instead (one graph per objective). ``share`` as in ``gradients``.
    A non-finite loss raises ``NonFiniteLossError`` (one flag per step, checked outside
    compiled code) and nothing is updated; with ``check_finite=False`` the step goes on
    (use ``optim.apply_if_finite`` to skip such updates).

    >>> from torch import nn
    >>> import mlaan_func as mf
    >>> scheme = [mf.local_loss(mf.from_module(nn.Linear(2, 3), name="fc"), None,
    ...                         mf.losses.cross_entropy, name="final")]
    >>> opt = mf.optim.sgd(0.5)
    >>> train_step = step(scheme, opt)
    >>> ts = mf.init(scheme, opt, seed=0)
    >>> batch = (torch.randn(8, 2), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1]))
    >>> first = None
    >>> for _ in range(20):
    ...     ts, metrics = train_step(ts, batch)
    ...     first = first if first is not None else float(metrics["final"]["loss"])
    >>> int(ts.step), float(metrics["final"]["loss"]) < first
    (20, True)
    """
    grad_step = gradients(objectives, compile=compile, backend=backend, share=share)
    post = after_steps(objectives)

    def train_step(ts: TrainState, batch: Any):
        g = grad_step(ts, batch)
        if check_finite and not bool(g.finite):
            bad = [n for n, v in g.losses.items() if not bool(torch.isfinite(v))]
            raise NonFiniteLossError(
                f"non-finite loss in objective(s) {bad} at step {int(ts.step)}; nothing was updated. "
                "Lower the learning rate, add gradient clipping (mlaan_func.optim.clip_by_global_norm), "
                "or check the inputs for NaN.")
        metrics = {n: {**m, "weighted_loss": g.losses[n]} for n, m in g.metrics.items()}
        ts = apply_gradients(ts, g.grads, g.state, optimizer, post)
        reported = state_metrics(ts.opt_state)
        if reported:
            if "optimizer" in metrics:
                raise ValueError("an objective is named 'optimizer', where the step reports the optimizer's "
                                 "metrics; rename it (local_loss(..., name=))")
            metrics["optimizer"] = reported
        return ts, metrics

    return train_step


@torch.no_grad()
def evaluate(objectives: Sequence[Objective], ts: TrainState, batches: Iterable[Any], *,
             metrics: dict[str, Callable] | None = None, select: str | None = "accuracy"
             ) -> dict[str, Any]:
    """Every metric the objectives report (and the user ``metrics``), in eval mode, averaged
    over samples.

    ``select="accuracy"`` (the default) returns ``{objective: accuracy}`` for the objectives
    that report one (the final classifier and each auxiliary head); ``select=None`` returns
    ``{name: {metric: value}}`` for every objective and every function in ``metrics``. A
    metric function ``fn(outputs, batch) -> {metric: 0-d tensor}`` gets ``outputs``, the
    output of every boundary the scheme produced (``"input"``, then each objective's net
    output and tapped blocks, by block name), e.g. for a linear probe on a module's output.
    Each block runs once per batch: an objective whose window overlaps blocks already run
    starts from the last of them (in eval mode a block's output depends only on its input).

    >>> from torch import nn
    >>> import mlaan_func as mf
    >>> scheme = [mf.local_loss(mf.from_module(nn.Linear(2, 3), name="fc"), None,
    ...                         mf.losses.cross_entropy, name="final")]
    >>> ts = mf.init(scheme, mf.optim.sgd(0.1))
    >>> acc = evaluate(scheme, ts, [(torch.randn(4, 2), torch.tensor([0, 1, 2, 0]))])
    >>> list(acc), 0.0 <= acc["final"] <= 1.0
    (['final'], True)
    >>> mean_logit = lambda outputs, batch: {"mean": outputs["fc"].mean()}
    >>> every = evaluate(scheme, ts, [(torch.randn(4, 2), torch.tensor([0, 1, 2, 0]))],
    ...                  metrics={"logits": mean_logit}, select=None)
    >>> sorted(every), sorted(every["final"])
    (['final', 'logits'], ['accuracy', 'loss'])
    """
    objectives = list(objectives)
    routes = plan_routes(objectives)
    metrics = dict(metrics or {})
    clash = [n for n in metrics if n in {o.name for o in objectives}]
    if clash:
        raise ValueError(f"metric functions {clash} share a name with objectives; rename them")
    sums: dict[str, dict[str, Tensor]] = {}

    def add(name: str, reported: dict[str, Tensor], n: int) -> None:
        into = sums.setdefault(name, {})
        for k, v in reported.items():
            if not isinstance(v, Tensor) or v.dim() != 0:
                raise ValueError(f"{name!r} reports metric {k!r} as {type(v).__name__}"
                                 f"{tuple(v.shape) if isinstance(v, Tensor) else ''}; a metric is a 0-d tensor")
            into[k] = into.get(k, 0.0) + v.double() * n

    seen, structure = 0, None
    for batch in batches:
        batch = as_batch(batch)
        structure = check_structure(batch, structure)
        x = input_of(batch)
        n = x.shape[0]
        known = {INPUT: x}
        produced = {INPUT: x}

        def run_objective(i: int, o: Objective, x: Tensor) -> dict[str, Tensor]:
            _, _, outputs, m = o.forward(ts.params, ts.state, x, batch, train=False,
                                         taps=routes[i].taps, step=ts.step, known=known)
            if metrics:
                for name, out in outputs.items():
                    produced.setdefault(name, out)
            add(o.name, m, n)
            return outputs

        fold(objectives, routes, x, run_objective, acts=known)
        for name, fn in metrics.items():
            add(name, fn(produced, batch), n)
        seen += n
    if seen == 0:
        raise ValueError("evaluate got no batches")
    averaged = {name: {k: float(v / seen) for k, v in m.items()} for name, m in sums.items()}
    if select is None:
        return averaged
    return {name: m[select] for name, m in averaged.items() if select in m}


def save(path: str | os.PathLike, ts: TrainState, extra: dict | None = None) -> None:
    """Write ``ts`` (and ``extra``: numbers, strings, lists, dicts, tensors) atomically, with a
    checksum: a reader sees the old file or the new one, never a partial one. The format is
    tensors plus a JSON tree (:mod:`mlaan_func.checkpoint`), so :func:`load` never unpickles.

    >>> from torch import nn
    >>> import mlaan_func as mf
    >>> scheme = [mf.local_loss(mf.from_module(nn.Linear(2, 3), name="fc"), None,
    ...                         mf.losses.cross_entropy, name="final")]
    >>> import os, tempfile
    >>> ts = mf.init(scheme, mf.optim.sgd(0.1))
    >>> with tempfile.TemporaryDirectory() as d:
    ...     save(os.path.join(d, "checkpoint.pt"), ts, extra={"epoch": 3})
    ...     os.listdir(d)
    ['checkpoint.pt']
    """
    checkpoint.write(path, {"train_state": ts, "extra": extra or {}})


def load(path: str | os.PathLike, map_location: Any = None, *, with_extra: bool = False,
         types: Iterable[type] = ()):
    """Read a ``TrainState`` written by ``save`` (``(ts, extra)`` with ``with_extra``).

    Nothing in the file is executed: NamedTuples are rebuilt only from ``mlaan_func``'s own
    classes and the ones in ``types`` (pass your optimizer's state class there), and the
    checksum is verified. A file that fails raises :class:`mlaan_func.checkpoint.CheckpointError`
    (a ``ValueError``) saying why.

    >>> from torch import nn
    >>> import mlaan_func as mf
    >>> scheme = [mf.local_loss(mf.from_module(nn.Linear(2, 3), name="fc"), None,
    ...                         mf.losses.cross_entropy, name="final")]
    >>> import os, tempfile
    >>> ts = mf.init(scheme, mf.optim.sgd(0.1))
    >>> with tempfile.TemporaryDirectory() as d:
    ...     save(os.path.join(d, "checkpoint.pt"), ts, extra={"epoch": 3})
    ...     back, extra = load(os.path.join(d, "checkpoint.pt"), with_extra=True)
    >>> extra, torch.equal(back.params["fc.weight"], ts.params["fc.weight"])
    ({'epoch': 3}, True)
    """
    blob = checkpoint.read(path, map_location, types=types)
    if not isinstance(blob, dict) or not isinstance(blob.get("train_state"), TrainState):
        raise checkpoint.CheckpointError(f"{path} holds no TrainState; it was not written by "
                                         "mlaan_func.save")
    return (blob["train_state"], blob.get("extra", {})) if with_extra else blob["train_state"]
