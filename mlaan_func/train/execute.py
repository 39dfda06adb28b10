"""The executor: one function runs every step of every scheme, from its plan.

A step is a plan (``mlaan_func.plan``: which block runs on which value, how far each
objective's gradient reaches, what is kept for later, where a piece of chained blocks
starts and ends) executed here. The engine's options are options of the plan, not other
engines:

* ``share=None`` (the default) / ``True``: block applications that several objectives
  share are merged into one piece, computed once; each cotangent arriving at a shared
  piece gets its own VJP at once, in scheme order, so gradients are bit for bit those of
  running each objective alone. ``"sum"``: cotangents arriving at a shared piece are summed
  first (fewer FLOPs; gradients equal to float32 rounding). ``False``: nothing is merged
  (each objective runs its own blocks, the per-objective form).
* remat (``mf.remat(objective, every)``): the objective's pieces hold at most ``every``
  blocks and run without a graph, keeping only their input; each is recomputed inside its
  own VJPs (a piece is rematerialised when every objective through it is).
* ``compile=True``: each objective's own suffix (its tail of pieces, up to its loss) runs as
  one compiled graph, and so does each piece computed apart from a tail (on CPU only a piece
  of several blocks, ``kernels.worth_compiling``); runs that compute the same function share
  one kernel (``kernels.run_kernel``). With ``share=False`` each objective's whole gradient
  function is compiled instead (one graph per objective).
* objectives that bring their own ``grad_fn`` run it on their input, opaque to the plan.
* an objective whose loss takes a context (``LossContext``) runs alone in every form: its
  own blocks in one graph from its input (never shared, rematerialised or compiled, since
  its loss may differentiate through all of it), its loss reading the detached values its
  sources published earlier in the step, so its gradients are the same bits in every form.
* ``given``/``keep``: a part of a scheme started from boundaries received from outside,
  returning the boundaries asked for (a module-parallel rank).
* ``forward_values`` runs the same plan forward only, in eval mode (``mf.evaluate``).

One primitive differentiates (``mlaan_func.vjp``), one sum adds gradients, BatchNorm
statistics merge one way (for each key the first objective in scheme order that runs the
block writes it), and every block is seeded by its name (``mlaan_func.randomness``).

>>> import torch
>>> import mlaan_func as mf
>>> from mlaan_func.testing import assert_close
>>> backbone = mf.from_module(mf.models.CifarResNet(8, num_classes=5, widths=(4, 8, 8)))
>>> scheme = mf.schemes.mlaan(backbone, ["1.0", "2.0"], input_shape=(3, 8, 8))
>>> ts = mf.init(scheme, mf.optim.sgd(0.1))
>>> batch = (torch.randn(4, 3, 8, 8), torch.tensor([0, 1, 2, 3]))
>>> shared, _ = executor(scheme)(ts, batch, {})
>>> alone, _ = executor(scheme, share=False)(ts, batch, {})
>>> all(torch.equal(shared.grads[k], alone.grads[k]) for k in alone.grads)
True
>>> summed, _ = executor(scheme, share="sum")(ts, batch, {})
>>> assert_close(summed.grads, alone.grads); assert_close(summed.state, alone.state)
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterable, Sequence

import torch
from torch import Tensor
from torch.func import grad_and_value

from ..combinators import Objective
from ..core.batch import as_batch, input_of
from ..core.net import INPUT, Params, State, check_keys
from ..core.segments import segmented
from ..core.randomness import (
    generator_devices,
    generator_state,
    seed_block,
    set_generator_state,
)
from ..errors import SchemeError
from .kernels import RunKernel, own_code, retainable, run_kernel, worth_compiling
from .plan import Plan, plan_routes, plan_scheme, runs_own_grad_fn
from .state import Gradients, TrainState, scheme_names
from .vjp import accumulate, dense, input_leaf, param_leaves, vjp

Executor = Callable[[TrainState, Any, dict[str, Tensor]], tuple[Gradients, dict[str, Tensor]]]


def remat_of(objective: Objective) -> int | None:
    """The rematerialisation granularity ``mf.remat`` gave an objective, else ``None``."""
    return getattr(objective.grad_fn, "remat_every", None)


def inside_of(objective: Objective) -> Any:
    """Where ``mf.remat(..., inside=)`` cuts an objective's blocks, else ``None``."""
    return getattr(objective.grad_fn, "remat_inside", None)


def cut_nets(nets: list, plan: Plan, objectives: Sequence[Objective], opaque: dict[int, Callable]) -> list:
    """``nets`` with the pieces whose every objective asks for the same ``inside=`` cut inside
    their blocks (``core.segments``)."""
    insides = [None if i in opaque else inside_of(o) for i, o in enumerate(objectives)]
    cut = []
    for net, piece in zip(nets, plan.pieces):
        inside = insides[piece.users[0]]
        agreed = inside is not None and all(insides[u] is inside for u in piece.users)
        cut.append(segmented(net, inside) if agreed else net)
    return cut


def remat_every(objectives: Sequence[Objective]) -> int | None:
    """The rematerialisation granularity of a scheme whose objectives all use ``mf.remat``
    (the finest one when they differ), ``None`` when any does not."""
    everies = [getattr(o.grad_fn, "remat_every", None) for o in objectives if o.grad_fn is not None]
    return min(everies) if everies and len(everies) == len(objectives) and None not in everies else None


def use_shared(objectives: Sequence[Objective], *, share: bool | str | None, compile: bool,
               given: Iterable[str] = ()) -> bool:
    """Whether the step merges block applications (``Plan.shared``) or runs each objective
    on its own blocks.

    ``share=None`` (the default): wherever it is exact — no objective with a ``grad_fn``
    other than ``mf.remat``'s, and no mix of rematerialised and plain objectives — and it
    changes something: a block application that two objectives share, or ``compile=True``
    (whose kernels are shared by kind, so the number of compiles does not grow with the
    number of modules). Blocks that draw random numbers (dropout) are shared too: each
    block draws from its own name's stream (``mlaan_func.randomness``), so the one shared
    forward draws what every objective's own forward would. ``share=True`` asks for it (an
    error where it cannot run); ``share="sum"`` as ``True``, summing cotangents;
    ``share=False`` merges nothing. ``given`` as in ``plan_scheme``.
    """
    if share not in (None, True, False, "sum"):
        raise SchemeError(f"share must be None, True, False or 'sum', got {share!r}")
    if share is False:
        return False
    own = [o.name for o in objectives if o.grad_fn is not None]
    if own and remat_every(objectives) is None:
        if share is not None:
            raise SchemeError(f"share={share!r} cannot be used here: objectives {own[:3]} bring their own "
                              "grad_fn (other than mf.remat on every objective). Pass share=False (or leave "
                              "share unset) to run each objective on its own blocks.")
        return False
    return share is not None or compile or bool(plan_scheme(objectives, given=given).shared)


def objective_fn(objective: Objective, taps: tuple[str, ...] = ()) -> Callable:
    """``(params, state, x, batch, step) -> (loss, (updates, outputs, metrics))`` in training
    mode: what an objective's own gradient function differentiates."""
    def objective_loss(params: Params, state: State, x: Tensor, batch: Any, step: Tensor | None = None):
        loss, updates, outputs, metrics = objective.forward(params, state, x, batch, train=True, taps=taps,
                                                            step=step)
        return loss, (updates, outputs, metrics)

    return objective_loss


def objective_gradient_fn(objective: Objective, taps: tuple[str, ...] = ()) -> Callable:
    """One objective's gradient function alone, computed by the executor:
    ``(params, state, x, batch, step=None) -> (grads, (loss, (updates, outputs, metrics)))``
    on the input ``x`` it reads, with ``outputs`` its net's output and the blocks in ``taps``
    and ``updates`` the state entries it wrote (the form ``Objective.grad_fn`` builds)."""
    given = () if objective.input_name == INPUT else (objective.input_name,)
    run = executor([objective], share=False, given=given, keep=(*taps, objective.output_name))

    def grad_and_value(params: Params, state: State, x: Tensor, batch: Any, step: Tensor | None = None):
        ts = TrainState(params, state, None, step)
        g, outputs = run(ts, batch, {objective.input_name: x})
        written = {k: v for k, v in g.state.items() if v is not state[k]}
        return g.grads, (g.losses[objective.name], (written, outputs, g.metrics[objective.name]))

    return grad_and_value


def context_gradient_fn(objective: Objective, taps: tuple[str, ...] = ()) -> Callable:
    """The gradient function of an objective whose loss takes a context: ``(params, state, x,
    batch, step=None, *, published) -> (grads, (loss, (updates, outputs, metrics)))``, its
    blocks in one eager graph from its input (``Objective.forward``, which makes the input a
    leaf for the loss), its loss reading and writing ``published`` (the step's board)."""
    def fn(params: Params, state: State, x: Tensor, batch: Any, step: Tensor | None = None, *,
           published: dict[str, dict[str, Tensor]]):
        leaves = param_leaves(params, objective.param_names)
        with torch.enable_grad():
            loss, updates, outputs, metrics = objective.forward({**params, **leaves}, state, x, batch, train=True,
                                                                taps=taps, step=step, published=published)
            grads = vjp(loss, list(leaves.values()))
        detach = lambda d: {k: v.detach() for k, v in d.items()}  # noqa: E731
        return (dict(zip(leaves, grads)),
                (loss.detach(), (detach(updates), detach(outputs), detach(metrics))))

    return fn


def gradient_fns(objectives: Sequence[Objective], routes: Sequence[Any], *, compile: bool = False,
                 backend: str = "inductor") -> list[Callable]:
    """Per objective, its gradient function alone: ``(params, state, x, batch, step) ->
    (grads, (loss, (updates, outputs, metrics)))`` (what ``Objective.grad_fn`` builds; the
    executor calls such a function where an objective brings its own). Eager: its own
    ``grad_fn``, else ``objective_gradient_fn``; compiled: ``compiled_gradient_fn``. For
    measuring one objective alone (``bench/``) and for references in tests.
    """
    if compile:
        return [compiled_gradient_fn(o, r.taps, i, backend) for i, (o, r) in enumerate(zip(objectives, routes))]
    return [o.grad_fn(o, r.taps) if o.grad_fn is not None else objective_gradient_fn(o, r.taps)
            for o, r in zip(objectives, routes)]


def compiled_gradient_fn(objective: Objective, taps: tuple[str, ...], index: int, backend: str) -> Callable:
    """One objective's whole gradient function as one compiled graph (``compile=True,
    share=False``): ``torch.func.grad_and_value`` traced by AOTAutograd, or the objective's
    own ``grad_fn`` compiled."""
    fn = objective.grad_fn(objective, taps) if objective.grad_fn is not None else \
        grad_and_value(objective_fn(objective, taps), has_aux=True)
    return torch.compile(own_code(fn, f"objective_{index}"), backend=backend, dynamic=False)


def _part(what: str, tensors: dict[str, Tensor], keys: tuple[str, ...]) -> dict[str, Tensor]:
    """The entries of ``tensors`` named in ``keys``, in their order (an error names the
    missing ones)."""
    wanted = set(keys)
    part = {k: v for k, v in tensors.items() if k in wanted}
    check_keys(what, part, keys)
    return part


def _add(a: Tensor | None, b: Tensor) -> Tensor:
    return b if a is None else a + b


class _Live:
    """The graph (or, rematerialised, the stored input) and pending cotangents of one piece
    during one step."""

    __slots__ = ("computed", "value", "out", "inp", "leaves", "rng", "total", "pending", "groups",
                 "children", "updates")

    def __init__(self, piece, children: int):
        self.computed = False
        self.value = self.out = self.inp = self.total = self.rng = None
        self.leaves: Params = {}
        self.pending = set(piece.users)
        self.groups = {s: [None, set(us), tuple(us)] for s, us in piece.groups}
        self.children = children
        self.updates: State = {}


def executor(objectives: Sequence[Objective], *, share: bool | str | None = None, compile: bool = False,
             backend: str = "inductor", given: Iterable[str] = (), keep: Iterable[str] = (),
             observe: Callable[[int], None] | None = None) -> Executor:
    """``(ts, batch, boundaries) -> (gradients, kept)``: the step of ``objectives`` (see the
    module docstring), started from the input and the ``given`` boundaries passed by name,
    returning the summed gradients, new state, losses and metrics of these objectives and
    the (detached) values of the boundaries named in ``keep``. ``ts`` may hold a larger
    scheme's parameters and state; the gradients and state returned are these objectives'.
    ``observe``, when given, is called with ``i`` before objective ``i`` runs and with
    ``len(objectives)`` after the last (the memory planner measures a step in these segments).

    >>> import torch
    >>> import mlaan_func as mf
    >>> backbone = mf.from_module(mf.models.CifarResNet(8, num_classes=5, widths=(4, 8, 8)))
    >>> scheme = mf.schemes.mlaan(backbone, ["1.0", "2.0"], input_shape=(3, 8, 8))
    >>> ts = mf.init(scheme, mf.optim.sgd(0.1))
    >>> rank = scheme[1:]                      # reads the output of block 1.0, as received
    >>> batch, h = (torch.randn(4, 3, 8, 8), torch.tensor([0, 1, 2, 3])), torch.randn(4, 4, 8, 8)
    >>> g, kept = executor(rank, given=["1.0"], keep=["2.0"])(ts, batch, {"1.0": h})
    >>> list(g.losses), list(kept), tuple(kept["2.0"].shape)
    (['m1.independent', 'final'], ['2.0'], (4, 8, 4, 4))
    """
    objectives, given, keep = list(objectives), tuple(given), tuple(keep)
    if compile and any(inside_of(o) is not None for o in objectives):
        raise SchemeError("mf.remat(..., inside=) runs eagerly (its segments are torch.utils.checkpoint "
                          "regions): pass compile=False, or drop inside= to compile the rematerialised step")
    merged = use_shared(objectives, share=share, compile=compile, given=given)
    remats = [remat_of(o) for o in objectives]
    routes = plan_routes(objectives, given=given)
    opaque: dict[int, Callable] = {}
    for i, (o, route) in enumerate(zip(objectives, routes)):
        taps = route.taps + tuple(n for n in o.net.block_names[:-1] if n in keep and n not in route.taps)
        if o.loss_takes_context and not runs_own_grad_fn(o):
            opaque[i] = context_gradient_fn(o, taps)
        elif compile and not merged:
            opaque[i] = compiled_gradient_fn(o, taps, i, backend)
        elif o.grad_fn is not None and remats[i] is None:
            opaque[i] = o.grad_fn(o, taps)
    # cut inside its blocks (mf.remat(o, inside=)), an objective's pieces keep their graph
    piece_remats = [None if inside_of(o) is not None else r for o, r in zip(objectives, remats)]
    caps = [None if i in opaque else r for i, r in enumerate(piece_remats)]
    plan = plan_scheme(objectives, max_blocks=caps, given=given, keep=keep, merge=merged, opaque=opaque)
    nets = cut_nets([p.net for p in plan.pieces], plan, objectives, opaque)
    rematerialised = [i not in opaque and r is not None for i, r in enumerate(piece_remats)]
    step = _Step(objectives, plan, nets, opaque, rematerialised, sum_cotangents=share == "sum", routes=routes,
                 observe=observe)
    if compile and merged:
        step.compile_runs(backend)

        def run(ts: TrainState, batch: Any, boundaries: dict[str, Tensor]):
            with retainable():
                return step(ts, batch, boundaries)
        return run
    return step


class _Step:
    """The executor of one plan: ``__call__(ts, batch, boundaries)`` runs one step."""

    def __init__(self, objectives, plan: Plan, nets, opaque: dict[int, Callable], rematerialised: list[bool],
                 sum_cotangents: bool, routes: Sequence[Any] = (), observe: Callable[[int], None] | None = None):
        self.objectives, self.plan, self.nets, self.opaque = objectives, plan, nets, opaque
        self.observe = observe
        # loss contexts: which objectives get the step's board, and whose values leave it after each
        self.contextual = {i for i, o in enumerate(objectives) if o.loss_takes_context and i in opaque
                           and not runs_own_grad_fn(o)}
        self.unpublish = [r.unpublish for r in routes] if routes else [frozenset()] * len(objectives)
        # a piece is rematerialised when every objective through it is
        self.remat = [all(rematerialised[u] for u in p.users) for p in plan.pieces]
        self.sum_cotangents = sum_cotangents
        self.param_keys, self.state_keys = scheme_names(objectives)
        # read-only views read parameters that other objectives (maybe on other ranks) train
        self.param_keys += tuple(dict.fromkeys(k for o in objectives for k in o.reads if k not in self.param_keys))
        self.views = [p.net.reads for p in plan.pieces]
        pieces = plan.pieces
        self.reads = {p.parent for p in pieces if isinstance(p.parent, str)} | {
            at for _, at in plan.kept if isinstance(at, str)}
        self.kept_at = {at: name for name, at in plan.kept if isinstance(at, int)}
        # A piece's readers, less those inside an opaque objective (which reads its own blocks itself).
        inside = {k: i for i in opaque for k in plan.objectives[i].path}
        self.children = [p.children for p in pieces]
        for n, p in enumerate(pieces):
            if isinstance(p.parent, int) and n in inside and inside.get(p.parent) == inside[n]:
                self.children[p.parent] -= 1
        self.tails = []
        for op, again in zip(plan.objectives, rematerialised):
            if not again:
                self.tails.append(op.tail)
            else:  # rematerialised: only the last piece runs with the loss
                self.tails.append(len(op.path) - 1 if op.tail < len(op.path) else len(op.path))
        self.piece_kernels: list[RunKernel | None] = [None] * len(plan.pieces)
        self.tail_kernels: list[RunKernel | None] = [None] * len(objectives)

    def compile_runs(self, backend: str) -> None:
        """Compiled kernels for this plan (``compile=True``): one per objective's own suffix
        (its tail of pieces, run in one graph with its loss), and one per piece computed
        apart from a tail; runs that compute the same function share one."""
        table: dict = {}
        for i, op in enumerate(self.plan.objectives):
            tail = op.path[self.tails[i]:]
            if i not in self.opaque and tail:
                self.tail_kernels[i] = run_kernel(tuple(self.nets[k] for k in tail), table, backend=backend)
        for k, net in enumerate(self.nets):
            self.piece_kernels[k] = run_kernel((net,), table, backend=backend)

    def __call__(self, ts: TrainState, batch: Any, boundaries: dict[str, Tensor]) -> tuple[Gradients, dict[str, Tensor]]:
        return _Run(self, ts, batch, boundaries).run()


class _Run:
    """The live values of one step of a ``_Step``."""

    def __init__(self, step: _Step, ts: TrainState, batch: Any, boundaries: dict[str, Tensor]):
        self.s = step
        self.ts = ts._replace(params=_part("the train state's params", ts.params, step.param_keys),
                              state=_part("the train state's state", ts.state, step.state_keys))
        self.batch = as_batch(batch)
        x_in = input_of(self.batch)
        self.roots = {INPUT: x_in, **boundaries}
        missing = sorted(step.reads - set(self.roots))
        if missing:
            raise SchemeError(f"the boundaries {missing} are read but not passed; pass them by name")
        self.devices = generator_devices(x_in)
        self.live = [_Live(p, c) for p, c in zip(step.plan.pieces, step.children)]
        self.grads: Params = {}
        self.kept: dict[str, Tensor] = {}
        self.queue: list[tuple[int, Tensor, tuple[int, ...], int]] = []
        self.own_updates: dict[int, State] = {}
        self.board: dict[str, dict[str, Tensor]] = {}  # loss-context values published so far

    # -------------------------------------------------------------- values and graphs
    def release(self, k: int) -> None:
        lk = self.live[k]
        if lk.children == 0 and (not self.s.remat[k] or not lk.pending):
            lk.value = None

    def parent_value(self, k: int) -> Tensor:
        parent = self.s.plan.pieces[k].parent
        if isinstance(parent, str):
            return self.roots[parent]
        lp = self.live[parent]
        value = lp.value
        lp.children -= 1
        self.release(parent)
        return value

    def with_graph(self, k: int, x: Tensor) -> State:
        piece, lk = self.s.plan.pieces[k], self.live[k]
        lk.inp, value = input_leaf(x, piece.needs_input_grad)
        lk.leaves = param_leaves(self.ts.params, piece.param_names)
        with torch.enable_grad():
            lk.out, updates = self.run_piece(k, self.with_reads(k, lk.leaves), value)
        return updates

    def run_piece(self, k: int, params: Params, x: Tensor) -> tuple[Tensor, State]:
        """Piece ``k`` in training: through its compiled kernel where one pays (``worth_compiling``)."""
        kernel = self.s.piece_kernels[k]
        if kernel is None or not worth_compiling(self.s.nets[k], x):
            return self.s.nets[k].run(params, self.ts.state, x, train=True)
        (y,), (updates,) = kernel(params, self.ts.state, x)
        return y, updates

    def with_reads(self, k: int, leaves: Params) -> Params:
        """``leaves`` and the parameters piece ``k``'s read-only views read."""
        views = self.s.views[k]
        return {**leaves, **{n: self.ts.params[n] for n in views}} if views else leaves

    def keep_output(self, k: int, value: Tensor) -> None:
        if k in self.s.kept_at:
            self.kept[self.s.kept_at[k]] = value.detach()

    def forward(self, k: int) -> None:
        lk = self.live[k]
        x = self.parent_value(k)
        lk.computed = True
        if not self.s.remat[k]:
            lk.updates = self.with_graph(k, x)
            lk.value = lk.out.detach() if lk.children else None
        else:  # no graph: keep the input (to recompute) and the output (for the children, a loss)
            lk.rng = generator_state(self.devices)
            with torch.no_grad():
                lk.value, lk.updates = self.run_piece(k, self.ts.params, x)
            lk.inp = x
        self.keep_output(k, lk.value if self.s.remat[k] else lk.out)

    @contextlib.contextmanager
    def graph(self, k: int):
        """Piece ``k``'s graph for its VJPs: the forward's, or, rematerialised, recomputed
        (the generator replayed) and dropped again afterwards."""
        lk = self.live[k]
        if not self.s.remat[k]:
            yield
            return
        stored = lk.inp
        with torch.random.fork_rng(devices=self.devices):
            set_generator_state(lk.rng, self.devices)
            self.with_graph(k, stored)
        try:
            yield
        finally:
            lk.out, lk.leaves, lk.inp = None, {}, stored

    def finish(self, k: int) -> None:
        """Piece ``k``'s last user has delivered: free its graph."""
        lk = self.live[k]
        lk.out = lk.inp = lk.total = lk.rng = None
        lk.leaves = {}
        self.release(k)

    # -------------------------------------------------------------- cotangents
    def deliver(self, k: int, g: Tensor, users: tuple[int, ...], start: int) -> None:
        """Hand cotangent ``g`` of ``users`` (who started at piece ``start``) to piece ``k``;
        ``drain`` processes it. A queue rather than recursion, so that no caller keeps a
        cotangent alive after it has been passed down."""
        self.queue.append((k, g, users, start))

    def drain(self) -> None:
        while self.queue:
            (self.add_summed if self.s.sum_cotangents else self.deliver_alone)(*self.queue.pop())

    def deliver_alone(self, k: int, g: Tensor, users: tuple[int, ...], start: int) -> None:
        """One VJP per arriving cotangent, at once: each objective's own computation."""
        piece, lk = self.s.plan.pieces[k], self.live[k]
        lk.pending.difference_update(users)
        final = not lk.pending
        continues = start != k
        gs: tuple = ()
        if piece.param_names or continues:
            with self.graph(k):
                params = list(lk.leaves.values())
                gs = vjp(lk.out, [*params, lk.inp] if continues else params, g,
                         retain_graph=not final and not self.s.remat[k])
                accumulate(self.grads, lk.leaves, gs[:len(params)])
                del params
        if final:
            self.finish(k)
        if continues:
            self.deliver(piece.parent, gs[-1], users, start)
        del gs

    def add_summed(self, k: int, g: Tensor, users: tuple[int, ...], start: int) -> None:
        lk = self.live[k]
        if self.s.plan.pieces[k].param_names:
            lk.total = _add(lk.total, g)
        lk.pending.difference_update(users)
        if start != k:
            group = lk.groups[start]
            group[0] = _add(group[0], g)
            group[1].difference_update(users)
        self.settle(k)

    def settle(self, k: int) -> None:
        again = self.s.remat[k]
        piece, lk = self.s.plan.pieces[k], self.live[k]
        ready = [s for s, group in lk.groups.items() if not group[1]]
        final = not lk.pending
        # Rematerialised, every arrival is turned into parameter gradients at once: holding
        # its cotangent until the last user arrives would outweigh the stored inputs.
        flush = final or again
        with_params = flush and lk.total is not None and bool(piece.param_names)
        sends = []
        if ready or with_params:
            with self.graph(k):
                out, params = lk.out, list(lk.leaves.values())
                single = len(ready) == 1 and (lk.total is lk.groups[ready[0]][0] or (
                    not again and len(piece.groups) == 1 and not piece.stops))
                if with_params and single:
                    # one group carries every objective through here: one VJP for both
                    gs = vjp(out, [*params, lk.inp], lk.total)
                    accumulate(self.grads, lk.leaves, gs[:-1])
                    sends.append((ready[0], gs[-1]))
                else:
                    calls = [(s, lk.groups[s][0]) for s in ready] + ([(None, lk.total)] if with_params else [])
                    for j, (s, cot) in enumerate(calls):
                        retain = not ((final or again) and j == len(calls) - 1)
                        if s is None:
                            accumulate(self.grads, lk.leaves, vjp(out, params, cot, retain_graph=retain))
                        else:
                            sends.append((s, vjp(out, [lk.inp], cot, retain_graph=retain)[0]))
                del out, params
                if with_params:
                    lk.total = None
        users = {s: lk.groups.pop(s)[2] for s in ready}
        if final:
            self.finish(k)
        for s, g in sends:
            self.deliver(piece.parent, g, users[s], s)

    # -------------------------------------------------------------- objectives
    def run_objective(self, i: int, o: Objective) -> tuple[Tensor, dict[str, Tensor]]:
        """Objective ``i``: the shared pieces on its path no earlier objective computed, then
        its own suffix with its loss in one graph; its cotangent goes to the piece below."""
        s, live, op = self.s, self.live, self.s.plan.objectives[i]
        tails = s.tails[i]
        shared_part, tail = op.path[:tails], op.path[tails:]
        for k in shared_part:
            if not live[k].computed:
                self.forward(k)
        with torch.enable_grad():
            if tail:
                inp, h = input_leaf(self.parent_value(tail[0]), tails > 0)
                leaves = param_leaves(self.ts.params, dict.fromkeys(
                    n for k in tail for n in s.plan.pieces[k].param_names))
                kernel, outs, ups = s.tail_kernels[i], (), ()
                if kernel is not None:
                    params = {**leaves, **{n: self.ts.params[n] for k in tail for n in s.views[k]}}
                    outs, ups = kernel(params, self.ts.state, h)
                    del params
                for j, k in enumerate(tail):
                    if j:
                        self.parent_value(k)  # bookkeeping: the value flows inside this graph
                    if kernel is None:
                        h, live[k].updates = s.nets[k].run(self.with_reads(k, leaves), self.ts.state, h, train=True)
                    else:
                        h, live[k].updates = outs[j], ups[j]
                    self.keep_output(k, h)
                    live[k].computed = True
                    live[k].pending.clear()  # its gradient is this graph's
                    if live[k].children:
                        live[k].value = h.detach()
                del outs, ups
            else:
                end = live[op.path[-1]]
                inp, h = input_leaf(end.value if s.remat[op.path[-1]] else end.out, True)
                leaves = {}
            seed_block("loss:" + o.name)
            loss, m = o.score(h, self.batch, self.ts.state, self.ts.step)
            del h  # the backward keeps what it saved; the head's output itself need not outlive the loss
            gs = vjp(loss, [*leaves.values(), inp] if inp.requires_grad else list(leaves.values()))
        accumulate(self.grads, leaves, gs[:len(leaves)])
        if inp.requires_grad:
            end = op.path[tails - 1] if tail else op.path[-1]
            self.deliver(end, gs[-1], (i,), op.start)
        del gs, inp, leaves
        self.drain()
        return loss.detach(), {n: v.detach() for n, v in m.items()}

    def run_opaque(self, i: int, o: Objective) -> tuple[Tensor, dict[str, Tensor]]:
        """Objective ``i`` through its own gradient function, on its input; the boundaries
        later objectives read from inside it come from its outputs."""
        path = self.s.plan.objectives[i].path
        x = self.parent_value(path[0])
        seed_block(o.name)
        p = {k: self.ts.params[k] for k in (*o.param_names, *o.reads)}
        extra = {"published": self.board} if i in self.s.contextual else {}
        g, (loss, (updates, outputs, m)) = self.s.opaque[i](p, self.ts.state, x, self.batch, self.ts.step, **extra)
        accumulate(self.grads, g, g.values())
        self.own_updates[i] = updates
        for k in path:
            lk, name = self.live[k], self.s.plan.pieces[k].block_names[-1]
            lk.computed = True
            lk.pending.clear()
            if name in outputs:
                lk.value = outputs[name].detach() if lk.children else None
                self.keep_output(k, outputs[name])
        return loss, m

    def run(self) -> tuple[Gradients, dict[str, Tensor]]:
        losses: dict[str, Tensor] = {}
        metrics: dict[str, dict[str, Tensor]] = {}
        observe = self.s.observe
        for i, o in enumerate(self.s.objectives):
            if observe is not None:
                observe(i)
            run = self.run_opaque if i in self.s.opaque else self.run_objective
            losses[o.name], metrics[o.name] = run(i, o)
            for name in self.s.unpublish[i]:
                self.board.pop(name, None)
        if observe is not None:
            observe(len(self.s.objectives))
        updates: State = {}
        for i, op in enumerate(self.s.plan.objectives):
            mine = self.own_updates.get(i)
            if mine is None:
                mine = {}
                for k in op.path:
                    mine.update(self.live[k].updates)
            for key, v in mine.items():
                updates.setdefault(key, v.detach())
        finite = torch.stack([torch.isfinite(v) for v in losses.values()]).all()
        self.kept.update({name: self.roots[at] for name, at in self.s.plan.kept if isinstance(at, str)})
        return (Gradients(dense(self.grads, self.ts.params), {**self.ts.state, **updates}, losses, metrics, finite),
                {name: self.kept[name] for name, _ in self.s.plan.kept})


def forward_values(objectives: Sequence[Objective], plan: Plan, ts: TrainState, batch: Any,
                   wanted: Iterable[str] = ()) -> tuple[list[tuple[Tensor, dict[str, Tensor]]], dict[str, Tensor]]:
    """The plan run forward in eval mode, each piece once: per objective its ``(loss,
    metrics)``, and the output of every block named in ``wanted`` (its first application).
    A piece's value is freed after its last reader, unless an objective scores it."""
    pieces = plan.pieces
    wanted = set(wanted)
    values: dict[int | str, Tensor] = {INPUT: input_of(batch)}
    produced: dict[str, Tensor] = {INPUT: values[INPUT]} if wanted else {}
    left = [p.children for p in pieces]
    scored = {op.path[-1] for op in plan.objectives}
    computed: set[int] = set()
    scores = []
    board: dict[str, dict[str, Tensor]] = {}  # loss-context values (a loss publishes in eval too, if it likes)
    for o, op in zip(objectives, plan.objectives):
        # an objective whose loss takes a context runs alone (plan_scheme): its pieces start here
        x_in = values[pieces[op.path[0]].parent] if o.loss_takes_context else None
        h = None
        for k in op.path:
            if k in computed:
                continue
            computed.add(k)
            parent = pieces[k].parent
            taps = dict.fromkeys(n for n in pieces[k].block_names if n in wanted or (
                o.loss_takes_context and n == o.output_name))
            values[k], _ = pieces[k].net.run(ts.params, ts.state, values[parent], train=False, taps=taps)
            for n, v in taps.items():
                if n in wanted:
                    produced.setdefault(n, v)
            h = taps.get(o.output_name, h)
            if isinstance(parent, int):
                left[parent] -= 1
                if left[parent] == 0 and parent not in scored:
                    del values[parent]
        context = None
        if o.loss_takes_context:
            context = o.context(x_in, h, train=False, step=ts.step, published=board)
        scores.append(o.score(values[op.path[-1]], batch, ts.state, ts.step, context))
        if context is not None:
            board[o.name] = context.published
    return scores, produced
