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
from typing import Any, Callable, Iterable, Iterator, Sequence

import attrs
import torch
from torch import Tensor

from ..combinators import Objective
from ..core import hyper, layout
from ..core.batch import as_batch, check_device, check_structure, input_of
from ..core.identity import check_identity, module_blocks
from ..core.net import AfterStep, Block, Params, State, check_keys, init_params
from ..core.deferred import deferred_checks
from ..core.randomness import key_from_seed, keyed, seeded
from ..errors import NonFiniteLossError, SchemeError, ShapeError
from ..optim import Optimizer, apply_updates, keep_entries, state_metrics
from . import checkpoint
from .budget import budgeted_step
from .execute import executor, forward_values, gradient_fns, objective_fn  # noqa: F401  (re-exported)
from .plan import Route, plan_routes, plan_scheme  # noqa: F401
from .state import Gradients, TrainState, after_steps, scheme_names
from .vjp import dense


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


def gradients(objectives: Sequence[Objective], *, compile: bool = False,
              backend: str = "inductor", share: bool | str | None = None,
              observe: Callable[[int], None] | None = None,
              memory_format: torch.memory_format | None = None) -> Callable[[TrainState, Any], Gradients]:
    """The summed gradients of a scheme's local losses and the new state, without an update.

    BatchNorm statistics: every objective reads the state as it was at the start of the
    step; for each key, the first objective in scheme order that runs it writes it.
    Every form runs through the one executor (``mlaan_func.execute``). ``share``: run each
    block application that several objectives share once and deliver gradients by reach.
    ``None`` (the default): wherever it changes something, with gradients bit-identical to
    running each objective alone (one VJP per objective at each shared block); ``True``:
    always; ``"sum"``: also sum the cotangents arriving at a shared block before one VJP
    (fewer FLOPs; gradients equal to float32 rounding); ``False``: merge nothing (each
    objective runs its own blocks). ``observe`` as in ``execute.executor``: called before
    each objective and after the last (the memory planner measures a step in segments).
    ``memory_format``: the layout of the 4-d tensors (input, weights, state) the step runs
    on (``mlaan_func.core.layout``); ``None`` (the default): as given, bit for bit;
    ``torch.channels_last``: faster CPU convolutions, gradients equal to float32 rounding.

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
    check_identity(objectives)
    check_reads(objectives)
    run_step = executor(objectives, share=share, compile=compile, backend=backend, observe=observe)
    faulty = faulty_convolutions(objectives) if memory_format is not None else []
    param_keys, state_keys = scheme_names(objectives)
    shapes = param_shapes(objectives)
    first_structure = None
    draws: dict[str, bool] = {}  # whether this scheme draws random numbers (randomness.keyed)

    def run(ts: TrainState, batch: Any) -> Gradients:
        nonlocal first_structure
        check_keys("the train state's params", ts.params, param_keys)
        check_keys("the train state's state", ts.state, state_keys)
        wrong = [k for k, shape in shapes.items() if ts.params[k].shape != shape]
        if wrong:
            k = wrong[0]
            raise ShapeError(f"the train state's parameter {k!r} has shape {tuple(ts.params[k].shape)} but its block "
                             f"holds {shapes[k]} ({len(wrong)} such); build the train state with mlaan_func.init for "
                             "this scheme, or load a checkpoint written by it")
        batch = as_batch(batch)
        first_structure = check_structure(batch, first_structure)
        x = input_of(batch)
        check_device(x, ts.params)
        ts, batch = laid_out(ts, batch, layout.resolve(memory_format, x=x, faulty=faulty))
        if ts.key is None:
            return run_step(ts, batch, {})[0]
        return keyed(lambda: run_step(ts, batch, {})[0], ts.key, ts.step, x.device, draws)

    return run


def faulty_convolutions(objectives: Sequence[Objective]) -> list[str]:
    """The scheme's convolutions that channels-last breaks on the CPU (``layout.faulty_convolutions``)."""
    return layout.faulty_convolutions((f"{block.name}.{n}" if n else block.name, m)
                                      for block in scheme_module_blocks(objectives)
                                      for n, m in block.module.named_modules())


def scheme_module_blocks(objectives: Sequence[Objective]) -> Iterator[Block]:
    """Every module block of a scheme's nets (leap blocks' copies and twins included), in
    scheme order, a block as often as nets hold it."""
    for o in objectives:
        for top in (b for net in o.nets for b in net.blocks):
            yield from module_blocks(top)


def laid_out(ts: TrainState, batch: Any, memory_format: torch.memory_format) -> tuple[TrainState, Any]:
    """``ts`` and ``batch`` with their 4-d tensors in ``memory_format`` (same values)."""
    if memory_format == torch.preserve_format:
        return ts, batch
    return (ts._replace(params=layout.convert(ts.params, memory_format), state=layout.convert(ts.state, memory_format)),
            layout.convert_batch(batch, memory_format))


def _step_randomness(ts: TrainState, x: Tensor):
    """The step's random draws derive from ``(ts.key, ts.step)``; no key: the global generator."""
    if ts.key is None:
        return contextlib.nullcontext()
    return seeded(ts.key, ts.step, x.device)


def apply_gradients(ts: TrainState, grads: Params, state: State, optimizer: Optimizer,
                    post: Sequence[AfterStep], *, untouched: Iterable[str] = (), hand_over: bool = False) -> TrainState:
    """One pure optimizer update with ``grads``, then the after-step updates (EMA twins) on
    ``state``: the end of every step, single-process or distributed. ``hand_over``: the
    caller gives ``grads`` away, and it is emptied into the update's argument (no name here
    holds it), so a gradient is freed once the optimizer's first transform has read it."""
    # the dict is built in the call itself: a local name would keep every gradient alive to the end
    updates, opt_state = optimizer.update({k: grads.pop(k) for k in ts.params} if hand_over else
                                          {k: grads[k] for k in ts.params}, ts.opt_state, ts.params)
    params = apply_updates(ts.params, updates)
    untouched = frozenset(untouched)
    if untouched:
        params = {k: ts.params[k] if k in untouched else v for k, v in params.items()}
        opt_state = keep_entries(opt_state, ts.opt_state, untouched)
    for a in post:
        state = a.fn(params, state, step=ts.step) if hyper.takes_step(a.fn) else a.fn(params, state)
    return ts._replace(params=params, state=state, opt_state=opt_state, step=ts.step + 1)


def step(objectives: Sequence[Objective], optimizer: Optimizer, *, compile: bool = False,
         backend: str = "inductor", check_finite: bool = True, share: bool | str | None = None,
         memory_budget: int | float | None = None, observe: Callable[[int], None] | None = None,
         memory_format: torch.memory_format | None = None
         ) -> Callable[[TrainState, Any], tuple[TrainState, dict[str, dict[str, Tensor]]]]:
    """A pure training step ``(train_state, batch) -> (train_state, metrics)``.

    A batch is ``(x, y)``, a ``Batch``, or any pytree whose first leaf is the input (every
    loss gets the whole batch); every step must get the same structure. ``metrics`` holds
    each objective's metrics under its name, and what the optimizer state reports
    (``optim.state_metrics``: skipped updates, injected hyper-parameters), when anything,
    under ``"optimizer"``.

    ``compile=True`` runs each objective's own suffix, and each piece of several blocks, as
    one ``torch.compile``d graph shared by the runs that compute the same function
    (``mlaan_func.kernels.run_kernel``; the compile count does not grow with the number of
    modules); with ``share=False`` it compiles each objective's whole gradient
    function instead (one graph per objective). ``share`` and ``memory_format`` as in
    ``gradients``; a step asked for a layout converts its train state before it runs.
    A non-finite loss raises ``NonFiniteLossError`` (one flag per step, checked outside
    compiled code) and nothing is updated; with ``check_finite=False`` the step goes on
    (use ``optim.apply_if_finite`` to skip such updates).

    Objectives switched by a schedule (``local_loss(..., active=)``): each step runs only the
    objectives active at ``ts.step`` (worked out on the host, one read of the step), as a
    scheme of its own; what only switched-off objectives train keeps its parameters and
    per-parameter optimizer state (``finish_step(untouched=)``), and only the active
    objectives report metrics. After-steps (EMA twins) run every step.

    ``memory_budget`` (bytes, or a float: a fraction of the scheme's own no-remat peak) makes
    the step fit its peak live step bytes under the budget at the least recomputation:
    on its first batch (and on each new input shape) the planner (``mlaan_func.train.budget``)
    measures the scheme, picks per objective plain or ``mf.remat`` and runs that plan, with
    the same gradients bit for bit; the step's ``plan`` says what it chose, and a budget no
    plan reaches raises ``MemoryBudgetError`` naming the smallest reachable figure.
    ``observe`` as in ``execute.executor`` (the planner's probe).

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
    objectives = list(objectives)
    if memory_budget is not None:
        if compile or any(o.active is not None for o in objectives):
            raise SchemeError("memory_budget plans an eager step over every objective: it cannot be used with "
                              "compile=True (a compiled step's memory is not the eager one measured) nor with "
                              "active= schedules; drop one of them")
        return budgeted_step(objectives, memory_budget, lambda scheme, form, seen: step(
            scheme, optimizer, backend=backend, check_finite=check_finite, share=form, observe=seen,
            memory_format=memory_format), share=share)
    post = after_steps(objectives)
    faulty = faulty_convolutions(objectives) if memory_format is not None else []

    def in_layout(ts: TrainState, batch: Any) -> tuple[TrainState, Any]:
        """The step's tensors in the asked layout before it runs, so the update keeps it too."""
        if memory_format is None:
            return ts, batch
        batch = as_batch(batch)
        return laid_out(ts, batch, layout.resolve(memory_format, x=input_of(batch), faulty=faulty))

    if all(o.active is None for o in objectives):
        grad_step = gradients(objectives, compile=compile, backend=backend, share=share, observe=observe,
                              memory_format=memory_format)

        def train_step(ts: TrainState, batch: Any):
            ts, batch = in_layout(ts, batch)
            with deferred_checks():
                g = grad_step(ts, batch)
            return finish_step(ts, g, optimizer, post, check_finite=check_finite,
                               diagnose=lambda: grad_step(ts, batch), hand_over=True)

        return train_step
    check_identity(objectives)
    check_reads(objectives)
    by_active: dict[tuple[int, ...], tuple] = {}  # the step of each set of active objectives, built once

    def build(on: tuple[int, ...]):
        part, feeders = [], set()
        for j, o in enumerate(objectives):
            if j in on:
                part.append(o)
            elif any(objectives[k].input_name in o.net.block_names for k in on if k > j):
                # a later active objective reads its net; it runs no loss, so it reads no context either
                part.append(attrs.evolve(o, grad_fn=forward_only, context_from=()))
                feeders.add(o.name)
        trained = {k for o in part if o.name not in feeders for k in o.param_names}
        params, state = scheme_names(part)
        return (gradients(part, compile=compile, backend=backend, share=share, observe=observe,
                          memory_format=memory_format), params, state,
                frozenset(k for k in params if k not in trained), feeders)

    def switched_step(ts: TrainState, batch: Any):
        ts, batch = in_layout(ts, batch)
        on = tuple(i for i, o in enumerate(objectives) if o.active is None or bool(o.active(ts.step)))
        if not on:
            raise SchemeError(f"no objective is active at step {int(ts.step)}; every step needs one "
                              "(check the active= schedules)")
        if on not in by_active:
            by_active[on] = build(on)
        grad_step, params, state, fed, feeders = by_active[on]
        part = ts._replace(params={k: ts.params[k] for k in params}, state={k: ts.state[k] for k in state})
        with deferred_checks():
            g = grad_step(part, batch)
        g = g._replace(grads=dense(g.grads, ts.params), state={**ts.state, **g.state},
                       losses={n: v for n, v in g.losses.items() if n not in feeders},
                       metrics={n: v for n, v in g.metrics.items() if n not in feeders})
        untouched = (set(ts.params) - set(params)) | fed
        return finish_step(ts, g, optimizer, post, check_finite=check_finite, untouched=untouched,
                           diagnose=lambda: grad_step(part, batch), hand_over=True)

    return switched_step


def forward_only(objective: Objective, taps: tuple[str, ...]) -> Callable:
    """The ``grad_fn`` of a switched-off objective whose net a later active objective reads:
    its net runs forward in training mode (its statistics move, as any forward's do), with
    no gradient, no head and no loss."""
    def fn(params: Params, state: State, x: Tensor, batch: Any, step: Tensor | None = None):
        outputs = dict.fromkeys(taps)
        with torch.no_grad():
            h, updates = objective.net.run(params, state, x, train=True, taps=outputs)
        outputs[objective.output_name] = h
        return {}, (torch.zeros((), device=x.device), (updates, outputs, {}))

    return fn


forward_only.runs_no_loss = True  # its objective's loss (and any loss context) never runs


def param_shapes(objectives: Sequence[Objective]) -> dict[str, tuple[int, ...]]:
    """Every trained parameter's shape, as its block holds it."""
    shapes = {}
    for block in scheme_module_blocks(objectives):
        local = dict(block.module.named_parameters())
        shapes.update({k: tuple(local[n].shape) for k, n in zip(block.param_names, block.local_params)})
    return {k: shapes[k] for k in scheme_names(objectives)[0] if k in shapes}


def check_reads(objectives: Sequence[Objective]) -> None:
    """Every parameter a read-only view reads is trained by an objective of the scheme."""
    trained = {k for o in objectives for k in o.param_names}
    for o in objectives:
        orphan = [k for k in o.reads if k not in trained]
        if orphan:
            raise SchemeError(f"objective {o.name!r} reads {orphan[:3]} through a read-only view (frozen), but no "
                              "objective of the scheme trains them; add the objective that trains the source, "
                              "or use a trainable copy (mf.copy) instead of a view")


def finish_step(ts: TrainState, g: Gradients, optimizer: Optimizer, post: Sequence[AfterStep], *,
                check_finite: bool = True, untouched: Iterable[str] = (),
                diagnose: Callable[[], Any] | None = None,
                hand_over: bool = False) -> tuple[TrainState, dict[str, dict[str, Tensor]]]:
    """The end of every step, single-process or distributed: the non-finite check (nothing
    is updated past a non-finite loss), the optimizer update and after-steps
    (``apply_gradients``), and the metrics: each objective's, with its ``weighted_loss``,
    and what the optimizer state reports under ``"optimizer"``.

    ``untouched`` names parameters this step does not train (a scheme over part of a train
    state, as ``mf.schemes.pgl``'s end-to-end steps): they and their per-parameter optimizer
    state (momentum, moments) stay as they were, as ``torch.optim`` skips a parameter whose
    gradient is ``None``; shared counts (schedules, bias correction) advance.

    The finite flag is the step's one host read. A step computed under
    ``core.deferred.deferred_checks()`` passes ``diagnose``: on a non-finite loss it is
    called first (the same gradients with eager value checks), so a deferred check that
    failed raises its own error rather than ``NonFiniteLossError``.

    ``hand_over=True``: the caller reads ``g.grads`` no more, and the update empties it, so
    the update's peak holds one tree of gradients less (design.md §6, "The update"); the
    step passes it, a caller that keeps its gradients must not."""
    if ts.opt_state is None:
        raise SchemeError("the train state has no optimizer state (opt_state=None); build it with "
                          "mlaan_func.init(scheme, optimizer), or set opt_state=optimizer.init(ts.params)")
    if check_finite and not bool(g.finite):
        if diagnose is not None:
            diagnose()  # the gradients again with eager value checks: a bad label raises its own error
        bad = [n for n, v in g.losses.items() if not bool(torch.isfinite(v))]
        where = f"in objective(s) {bad}" if bad else "on another rank"
        raise NonFiniteLossError(
            f"non-finite loss {where} at step {int(ts.step)}; nothing was updated. Lower the learning "
            "rate, add gradient clipping (mlaan_func.optim.clip_by_global_norm), or check the inputs for NaN.")
    metrics = {n: {**m, "weighted_loss": g.losses[n]} for n, m in g.metrics.items()}
    ts = apply_gradients(ts, g.grads, g.state, optimizer, post, untouched=untouched, hand_over=hand_over)
    reported = state_metrics(ts.opt_state)
    if reported:
        if "optimizer" in metrics:
            raise SchemeError("an objective is named 'optimizer', where the step reports the optimizer's "
                              "metrics; rename it (local_loss(..., name=))")
        metrics["optimizer"] = reported
    return ts, metrics


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
    output and tapped blocks, by block name), e.g. for a linear probe on a module's output;
    one that takes a ``ts`` keyword also gets the train state (``schemes.ensemble_metric``).
    Each block application runs once per batch: evaluation runs the step's plan forward
    (``mlaan_func.execute.forward_values``), so an objective whose window overlaps blocks
    already run (the same block, by identity, on the same value) starts from them.

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
    plan = plan_scheme(objectives)
    routes = plan_routes(objectives)
    metrics = dict(metrics or {})
    clash = [n for n in metrics if n in {o.name for o in objectives}]
    if clash:
        raise SchemeError(f"metric functions {clash} share a name with objectives; rename them")
    wanted = {n for o, r in zip(objectives, routes) for n in (o.output_name, *r.taps)} if metrics else set()
    sums: dict[str, dict[str, Tensor]] = {}

    def add(name: str, reported: dict[str, Tensor], n: int) -> None:
        into = sums.setdefault(name, {})
        for k, v in reported.items():
            if not isinstance(v, Tensor) or v.dim() != 0:
                raise SchemeError(f"{name!r} reports metric {k!r} as {type(v).__name__}"
                                  f"{tuple(v.shape) if isinstance(v, Tensor) else ''}; a metric is a 0-d tensor")
            into[k] = into.get(k, 0.0) + v.double() * n

    seen, structure = 0, None
    for batch in batches:
        batch = as_batch(batch)
        structure = check_structure(batch, structure)
        n = input_of(batch).shape[0]
        scores, produced = forward_values(objectives, plan, ts, batch, wanted)
        for o, (_, m) in zip(objectives, scores):
            add(o.name, m, n)
        for name, fn in metrics.items():
            add(name, fn(produced, batch, ts=ts) if hyper.takes_keyword(fn, "ts") else fn(produced, batch), n)
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
    tensors plus a JSON tree (:mod:`mlaan_func.train.checkpoint`), so :func:`load` never unpickles.

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
    checksum is verified. A file that fails raises :class:`mlaan_func.errors.CheckpointError`
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
