"""The shared step: each piece of a plan (``mlaan_func.plan``) runs forward once per step and
its gradients are delivered by reach.

Objectives run in scheme order. Each computes the shared pieces on its path that no earlier
objective computed (keeping their graphs), then runs the suffix only it passes through (its
trunk and head) together with its loss, as the per-objective engine would, and delivers the
cotangent of that suffix's input to the shared piece below. By default a shared piece
turns each arriving cotangent into its own VJP at once (parameters, and the input where
that objective continues below), so the gradients are bit for bit the per-objective
engine's: only the repeated forwards are saved. With ``sum_cotangents=True`` (``share="sum"``)
a piece sums what arrives: when every objective of a group that continues below it has
delivered, one input-only vector-Jacobian product (``torch.autograd.grad`` skips the
weight gradients it is not asked for) passes the group's sum down; when every objective
through it has delivered, one parameter VJP of the sum of all of them gives its parameter
gradients (equal to float32 rounding: the sums are re-associated). The graph of a piece is
freed when its last user has delivered. BatchNorm statistics come from the one shared forward; for each key the
first objective in scheme order that runs the block writes it, as in the per-objective
engine. ``shared_gradients_from`` runs objectives that start from boundaries given from
outside (a module-parallel rank's received activations) and returns the boundaries asked for.

>>> import torch
>>> import mlaan_func as mf
>>> from mlaan_func.testing import assert_close
>>> backbone = mf.from_module(mf.models.CifarResNet(8, num_classes=5, widths=(4, 8, 8)))
>>> scheme = mf.schemes.mlaan(backbone, ["1.0", "2.0"], input_shape=(3, 8, 8))
>>> ts = mf.init(scheme, mf.optim.sgd(0.1))
>>> batch = (torch.randn(4, 3, 8, 8), torch.tensor([0, 1, 2, 3]))
>>> shared = shared_gradients(scheme)(ts, batch)
>>> alone = mf.gradients(scheme, share=False)(ts, batch)
>>> all(torch.equal(shared.grads[k], alone.grads[k]) for k in alone.grads)
True
>>> summed = shared_gradients(scheme, sum_cotangents=True)(ts, batch)
>>> assert_close(summed.grads, alone.grads); assert_close(summed.state, alone.state)
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterable, Sequence

import torch
from torch import Tensor

from .combinators import Objective
from .core import INPUT, Params, check_keys
from .batch import as_batch, input_of
from .train_state import Gradients, TrainState, scheme_names
from .randomness import seed_block
from .vjp import accumulate as add_gradients, dense, input_leaf, param_leaves
from .kernels import kernel_net, kernel_table, retainable
from .plan import Plan, plan_scheme
from .remat import _rng_devices, _rng_state, _set_rng_state


def remat_every(objectives: Sequence[Objective]) -> int | None:
    """The rematerialisation granularity of a scheme whose objectives use ``mf.remat``
    (the finest one when they differ), ``None`` when none does."""
    everies = [getattr(o.grad_fn, "remat_every", None) for o in objectives if o.grad_fn is not None]
    return min(everies) if everies and None not in everies else None


def use_shared(objectives: Sequence[Objective], *, share: bool | str | None, compile: bool,
               given: Iterable[str] = ()) -> bool:
    """Whether ``gradients``/``step`` run the shared step.

    ``share=None`` (the default): wherever it is exact — no objective with a ``grad_fn``
    other than ``mf.remat``'s — and it changes something: a block application that two
    objectives share, or ``compile=True`` (whose kernels are shared by kind, so the number
    of compiles does not grow with the number of modules). Blocks that draw random numbers
    (dropout) are shared too: each block draws from its own name's stream
    (``mlaan_func.randomness``), so the one shared forward draws what every objective's own
    forward would. ``share=True`` asks for it (an error where it cannot run);
    ``share="sum"`` as ``True``, summing cotangents; ``share=False`` keeps the
    per-objective engine. ``given`` as in
    ``plan_scheme`` (a part of a scheme that starts from received boundaries).
    """
    if share not in (None, True, False, "sum"):
        raise ValueError(f"share must be None, True, False or 'sum', got {share!r}")
    if share is False:
        return False
    own = [o.name for o in objectives if o.grad_fn is not None]
    if own and remat_every(objectives) is None:
        if share is True:
            raise ValueError(f"share=True cannot be used here: objectives {own[:3]} bring their own grad_fn "
                             "(other than mf.remat). Pass share=False (or leave share unset) to use the "
                             "per-objective engine.")
        return False
    return share is not None or compile or bool(plan_scheme(objectives, given=given).shared)


class _Live:
    """The graph (or, rematerialised, the stored input) and pending cotangents of one piece
    during one step."""

    __slots__ = ("computed", "value", "out", "inp", "leaves", "rng", "total", "pending", "groups",
                 "children", "updates")

    def __init__(self, piece):
        self.computed = False
        self.value = self.out = self.inp = self.total = self.rng = None
        self.leaves: Params = {}
        self.pending = set(piece.users)
        self.groups = {s: [None, set(us), tuple(us)] for s, us in piece.groups}
        self.children = piece.children
        self.updates = {}


def _part(what: str, tensors: dict[str, Tensor], keys: tuple[str, ...]) -> dict[str, Tensor]:
    """The entries of ``tensors`` named in ``keys``, in their order (a ``KeyError`` names the
    missing ones)."""
    wanted = set(keys)
    part = {k: v for k, v in tensors.items() if k in wanted}
    check_keys(what, part, keys)
    return part


def _add(a: Tensor | None, b: Tensor) -> Tensor:
    return b if a is None else a + b


def shared_gradients(objectives: Sequence[Objective], plan: Plan | None = None, *, compile: bool = False,
                     backend: str = "inductor", sum_cotangents: bool = False
                     ) -> Callable[[TrainState, Any], Gradients]:
    """``gradients(objectives)`` computed with one forward per shared piece (see the module
    docstring); same signature and result as ``mlaan_func.gradients``.

    When the objectives use ``mf.remat(objective, every=n)``, pieces hold at most ``n``
    blocks and each runs forward without a graph, keeping only its input; it is recomputed
    inside its own VJPs (BatchNorm statistics from the first forward, the generator replayed).

    ``compile=True`` runs every block through a compiled kernel shared by all blocks of its
    kind (``mlaan_func.kernels``): the number of compiles depends on the kinds of blocks,
    not on the number of modules.
    """
    objectives = list(objectives)
    param_keys, state_keys = scheme_names(objectives)
    from_given = shared_gradients_from(objectives, plan=plan, compile=compile, backend=backend,
                                       sum_cotangents=sum_cotangents)

    def run(ts: TrainState, batch: Any) -> Gradients:
        check_keys("the train state's params", ts.params, param_keys)
        check_keys("the train state's state", ts.state, state_keys)
        return from_given(ts, batch, {})[0]

    return run


def shared_gradients_from(objectives: Sequence[Objective], given: Iterable[str] = (), keep: Iterable[str] = (),
                          plan: Plan | None = None, *, compile: bool = False, backend: str = "inductor",
                          sum_cotangents: bool = False
                          ) -> Callable[[TrainState, Any, dict[str, Tensor]], tuple[Gradients, dict[str, Tensor]]]:
    """The shared step of objectives that may start from boundaries ``given`` from outside
    (what a module-parallel rank receives): ``(ts, batch, boundaries) -> (gradients, kept)``
    with ``boundaries`` the given tensors by name and ``kept`` the (detached) values of the
    boundaries named in ``keep`` (what the rank sends on). ``ts`` may hold a whole scheme's
    parameters and state; the gradients and state returned are these objectives' only.

    >>> import torch
    >>> import mlaan_func as mf
    >>> backbone = mf.from_module(mf.models.CifarResNet(8, num_classes=5, widths=(4, 8, 8)))
    >>> scheme = mf.schemes.mlaan(backbone, ["1.0", "2.0"], input_shape=(3, 8, 8))
    >>> ts = mf.init(scheme, mf.optim.sgd(0.1))
    >>> rank = scheme[1:]                      # reads the output of block 1.0, as received
    >>> batch, h = (torch.randn(4, 3, 8, 8), torch.tensor([0, 1, 2, 3])), torch.randn(4, 4, 8, 8)
    >>> g, kept = shared_gradients_from(rank, given=["1.0"], keep=["2.0"])(ts, batch, {"1.0": h})
    >>> list(g.losses), list(kept), tuple(kept["2.0"].shape)
    (['m1.independent', 'final'], ['2.0'], (4, 8, 4, 4))
    """
    objectives = list(objectives)
    every = remat_every(objectives)
    plan = plan or plan_scheme(objectives, max_blocks=every, given=given, keep=keep)
    reads = {p.parent for p in plan.pieces if isinstance(p.parent, str)} | {
        at for _, at in plan.kept if isinstance(at, str)}
    kept_at = {at: name for name, at in plan.kept if isinstance(at, int)}
    param_keys, state_keys = scheme_names(objectives)
    pieces = plan.pieces
    if compile:
        table = kernel_table(objectives, backend=backend)
        nets = [kernel_net(p.net, table) for p in pieces]
    else:
        nets = [p.net for p in pieces]
    tails = []
    for i, op in enumerate(plan.objectives):
        if every is None:
            tails.append(op.tail)
        else:  # rematerialised: only the last piece runs with the loss, as in remat.py
            tails.append(len(op.path) - 1 if op.tail < len(op.path) else len(op.path))

    def run(ts: TrainState, batch: Any, boundaries: dict[str, Tensor]) -> tuple[Gradients, dict[str, Tensor]]:
        with retainable() if compile else contextlib.nullcontext():
            return run_step(ts, batch, boundaries)

    def run_step(ts: TrainState, batch: Any, boundaries: dict[str, Tensor]) -> tuple[Gradients, dict[str, Tensor]]:
        ts = ts._replace(params=_part("the train state's params", ts.params, param_keys),
                         state=_part("the train state's state", ts.state, state_keys))
        batch = as_batch(batch)
        x_in = input_of(batch)
        roots = {**boundaries, INPUT: x_in}
        missing = sorted(reads - set(roots))
        if missing:
            raise ValueError(f"the boundaries {missing} are read but not passed; pass them by name")
        devices = _rng_devices(x_in)
        live = [_Live(p) for p in pieces]
        grads: Params = {}
        kept: dict[str, Tensor] = {}

        def accumulate(keys, values) -> None:
            add_gradients(grads, keys, values)

        def release(k: int) -> None:
            lk = live[k]
            if lk.children == 0 and (every is None or not lk.pending):
                lk.value = None

        def parent_value(k: int) -> Tensor:
            parent = pieces[k].parent
            if isinstance(parent, str):
                return roots[parent]
            lp = live[parent]
            value = lp.value
            lp.children -= 1
            release(parent)
            return value

        def with_graph(k: int, x: Tensor):
            piece, lk = pieces[k], live[k]
            lk.inp, value = input_leaf(x, piece.needs_input_grad)
            lk.leaves = param_leaves(ts.params, piece.param_names)
            with torch.enable_grad():
                lk.out, updates = nets[k].run(lk.leaves, ts.state, value, train=True)
            return updates

        def keep_output(k: int, value: Tensor) -> None:
            if k in kept_at:
                kept[kept_at[k]] = value.detach()

        def forward(k: int) -> None:
            piece, lk = pieces[k], live[k]
            x = parent_value(k)
            lk.computed = True
            if every is None:
                lk.updates = with_graph(k, x)
                lk.value = lk.out.detach() if piece.children else None
            else:  # no graph: keep the input (to recompute) and the output (for the children, a loss)
                lk.rng = _rng_state(devices)
                with torch.no_grad():
                    lk.value, lk.updates = nets[k].run(ts.params, ts.state, x, train=True)
                lk.inp = x
            keep_output(k, lk.out if every is None else lk.value)

        queue: list[tuple[int, Tensor, tuple[int, ...], int]] = []

        def deliver(k: int, g: Tensor, users: tuple[int, ...], start: int) -> None:
            """Hand cotangent ``g`` of ``users`` (who started at piece ``start``) to piece ``k``;
            ``drain`` processes it. A queue rather than recursion, so that no caller keeps a
            cotangent alive after it has been passed down."""
            queue.append((k, g, users, start))

        def drain() -> None:
            while queue:
                (deliver_alone if not sum_cotangents else add_summed)(*queue.pop())

        def add_summed(k: int, g: Tensor, users: tuple[int, ...], start: int) -> None:
            lk = live[k]
            if pieces[k].param_names:
                lk.total = _add(lk.total, g)
            lk.pending.difference_update(users)
            if start != k:
                group = lk.groups[start]
                group[0] = _add(group[0], g)
                group[1].difference_update(users)
            settle(k)

        @contextlib.contextmanager
        def graph(k: int):
            """Piece ``k``'s graph for its VJPs: the forward's, or, rematerialised, recomputed
            (the generator replayed) and dropped again afterwards."""
            lk = live[k]
            if every is None:
                yield
                return
            stored = lk.inp
            with torch.random.fork_rng(devices=devices):
                _set_rng_state(lk.rng, devices)
                with_graph(k, stored)
            try:
                yield
            finally:
                lk.out, lk.leaves, lk.inp = None, {}, stored

        def finish(k: int) -> None:
            """Piece ``k``'s last user has delivered: free its graph."""
            lk = live[k]
            lk.out = lk.inp = lk.total = lk.rng = None
            lk.leaves = {}
            release(k)

        def deliver_alone(k: int, g: Tensor, users: tuple[int, ...], start: int) -> None:
            """One VJP per arriving cotangent, at once: the per-objective engine's computation."""
            piece, lk = pieces[k], live[k]
            lk.pending.difference_update(users)
            final = not lk.pending
            continues = start != k
            gs: tuple = ()
            if piece.param_names or continues:
                with graph(k):
                    params = list(lk.leaves.values())
                    targets = [*params, lk.inp] if continues else params
                    gs = torch.autograd.grad(lk.out, targets, g, retain_graph=not final and every is None,
                                             allow_unused=True)
                    accumulate(lk.leaves, gs[:len(params)])
                    del params, targets
            if final:
                finish(k)
            if continues:
                deliver(piece.parent, gs[-1], users, start)
            del gs

        def settle(k: int) -> None:
            piece, lk = pieces[k], live[k]
            ready = [s for s, group in lk.groups.items() if not group[1]]
            final = not lk.pending
            # Rematerialised, every arrival is turned into parameter gradients at once: holding
            # its cotangent until the last user arrives would outweigh the stored inputs.
            flush = final or every is not None
            with_params = flush and lk.total is not None and bool(piece.param_names)
            sends = []
            if ready or with_params:
                with graph(k):
                    out, params = lk.out, list(lk.leaves.values())
                    single = len(ready) == 1 and (lk.total is lk.groups[ready[0]][0] or (
                        every is None and len(piece.groups) == 1 and not piece.stops))
                    if with_params and single:
                        # one group carries every objective through here: one VJP for both
                        gs = torch.autograd.grad(out, [*params, lk.inp], lk.total, allow_unused=True)
                        accumulate(lk.leaves, gs[:-1])
                        sends.append((ready[0], gs[-1]))
                    else:
                        calls = [(s, lk.groups[s][0]) for s in ready] + ([(None, lk.total)] if with_params else [])
                        for j, (s, cot) in enumerate(calls):
                            retain = not ((final or every is not None) and j == len(calls) - 1)
                            if s is None:
                                accumulate(lk.leaves, torch.autograd.grad(out, params, cot, retain_graph=retain,
                                                                          allow_unused=True))
                            else:
                                sends.append((s, torch.autograd.grad(out, lk.inp, cot, retain_graph=retain)[0]))
                    del out, params
                    if with_params:
                        lk.total = None
            users = {s: lk.groups.pop(s)[2] for s in ready}
            if final:
                finish(k)
            for s, g in sends:
                deliver(piece.parent, g, users[s], s)

        losses: dict[str, Tensor] = {}
        metrics: dict[str, dict[str, Tensor]] = {}
        for i, (o, op) in enumerate(zip(objectives, plan.objectives)):
            shared_part, tail = op.path[:tails[i]], op.path[tails[i]:]
            for k in shared_part:
                if not live[k].computed:
                    forward(k)
            with torch.enable_grad():
                if tail:
                    x = parent_value(tail[0])
                    inp, h = input_leaf(x, tails[i] > 0)
                    leaves = param_leaves(ts.params, dict.fromkeys(n for k in tail for n in pieces[k].param_names))
                    for j, k in enumerate(tail):
                        if j:
                            parent_value(k)  # bookkeeping: the value flows inside this graph
                        h, live[k].updates = nets[k].run(leaves, ts.state, h, train=True)
                        keep_output(k, h)
                        live[k].computed = True
                        live[k].pending.clear()  # its gradient is this graph's
                        if pieces[k].children:
                            live[k].value = h.detach()
                else:
                    end = live[op.path[-1]]
                    inp, h = input_leaf(end.out if every is None else end.value, True)
                    leaves = {}
                seed_block("loss:" + o.name)
                loss, m = o.score(h, batch, ts.state, ts.step)
                targets = [*leaves.values(), inp] if inp.requires_grad else list(leaves.values())
                gs = torch.autograd.grad(loss, targets, allow_unused=True) if targets else ()
            accumulate(leaves, gs[:len(leaves)])
            losses[o.name] = loss.detach()
            metrics[o.name] = {n: v.detach() for n, v in m.items()}
            del h, loss, m
            if inp.requires_grad:
                end = op.path[tails[i] - 1] if tail else op.path[-1]
                deliver(end, gs[-1], (i,), op.start)
            del gs, inp, leaves
            drain()
        updates = {}
        for op in plan.objectives:
            mine = {}
            for k in op.path:
                mine.update(live[k].updates)
            for key, v in mine.items():
                updates.setdefault(key, v.detach())
        finite = torch.stack([torch.isfinite(v) for v in losses.values()]).all()
        out = dense(grads, ts.params)
        kept.update({name: roots[at] for name, at in plan.kept if isinstance(at, str)})
        return (Gradients(out, {**ts.state, **updates}, losses, metrics, finite),
                {name: kept[name] for name, _ in plan.kept})

    return run
