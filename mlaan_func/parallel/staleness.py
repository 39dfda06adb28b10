"""Declared staleness for schemes whose gradient reach crosses ranks (issue #22 item 3):
the law, how a crossing window splits at a rank boundary, and a single-process simulator.

**The law** (docs/design.md §5, "Declared staleness"). Modules are owned by ranks
(``owner[i]``); an objective runs on the rank owning the module its net ends in; a key is
owned by the rank whose modules (or whose objectives' heads and trunks) hold it; an EMA twin
by the owner of the block it follows. θ_t are the parameters after t updates, B_t the t-th
batch, s the staleness. Every objective's loss at batch t is evaluated at θ_t. The update of
step t of a key owned by rank p uses

    g_t = Σ_{o on p} ∇ o(θ_t, B_t) + Σ_{o on q ≠ p, in scheme order} ∇_p o(θ_{t−s}, B_{t−s})

(the second sum empty for t < s at a fresh start). An EMA twin read on rank p that follows
blocks of rank q ≠ p is, at step t, the owner's twin of step t − s (the initial twin for
t < s): the twin updated from θ^q_{t+1−s} after p's step t, not updated while t + 1 − s ≤ 0.
Twins of p's own blocks, and BatchNorm statistics (written by the first objective in scheme
order that runs the block, and never read in training), are synchronous. With s = 0 this is
the synchronous step, bitwise equal to ``mf.step``.

In-flight contributions survive across calls: ``run(ts, batches, carry) -> (ts, history,
carry)``; ``carry`` (``StaleCarry``) holds the s contributions due at the next s steps and the
s stale twins they read. ``carry=None`` is a fresh start (no contributions in flight, the stale
twins equal to ``ts``'s). Passing the carry on makes a run independent of how the batches
are chunked into calls; dropping it drops the last s steps' cross-rank gradients.

The pipeline (``distributed.stale_pipeline_step``) computes exactly this: a window
objective ``o`` of rank q that runs through rank p = q − 1 is split at the boundary into a
*part* on p (its blocks in p's modules) and a *tail* on q that starts from the received
boundary as a parameter (``Received``), so the executor returns its cotangent; p applies it
s steps later as the gradient of ``(part(x) · cotangent).sum()`` recomputed at the stashed
θ_{t−s}, batch input and randomness key. ``simulate_staleness`` computes the same law in
one process from whole objectives (per-objective gradients of the executor and queues), so
the two agree bit for bit.
"""

from __future__ import annotations

import collections
from typing import Any, Callable, Iterable, NamedTuple, Sequence

import attrs
import torch
from torch import Tensor

from ..combinators import LeapBlock, Objective, local_loss
from ..core import hyper
from ..core.batch import as_batch, input_of
from ..core.net import INPUT, AfterStep, BlockDefaults, Net, Params, State
from ..errors import SchemeError
from ..optim import Optimizer
from ..train.execute import executor
from ..train.state import Gradients, TrainState, after_steps, scheme_names
from ..train.step import _step_randomness, finish_step, forward_only


class StaleCarry(NamedTuple):
    """What a staleness-``s`` run leaves in flight: ``grads[j]``, the cross-rank contributions
    due at the j-th next step, as ``(objective name, {key: gradient})`` in scheme order; and
    ``twins[j]``, the stale EMA twins read at that step (by non-owners)."""

    grads: tuple[tuple[tuple[str, Params], ...], ...]
    twins: tuple[State, ...]


class StalePlan(NamedTuple):
    """Who owns what under the law (module docstring)."""

    rank_of_objective: list[int]
    param_owner: dict[str, int]
    state_writer: dict[str, int]      # the rank that computes each state key
    twin_source: dict[str, str]       # EMA twin key -> the parameter it follows
    crossing: list[int]               # objectives whose net runs through another rank's modules
    split_at: dict[int, int]          # crossing objective -> how many of its net's blocks the earlier rank runs
    stale_twins: list[dict[int, tuple[str, ...]]]  # per rank: owner -> the twins it reads that the owner updates


def _leap_blocks(block: Any):
    if isinstance(block, LeapBlock):
        yield block
    for child in block.children():
        yield from _leap_blocks(child)


def plan_staleness(objectives: Sequence[Objective], module_ends: Sequence[str], owner: Sequence[int],
                   ranks: int, staleness: int) -> StalePlan:
    """The owners of every key under the law, the crossing windows and where they split;
    ``SchemeError`` naming the objective for what the law does not cover."""
    if not isinstance(staleness, int) or isinstance(staleness, bool) or staleness < 0:
        raise ValueError(f"staleness must be an int >= 0 (steps of delay), got {staleness!r}")
    if len(owner) != len(module_ends):
        raise ValueError(f"owner names {len(owner)} ranks for {len(module_ends)} modules; give one per module")
    index = {INPUT: -1, **{end: i for i, end in enumerate(module_ends)}}
    rank_of, param_owner, state_writer, twin_source = [], {}, {}, {}
    crossing, split_at = [], {}

    def own(key: str, r: int, o: Objective) -> None:
        if param_owner.setdefault(key, r) != r:
            raise SchemeError(f"objective {o.name!r} trains {key!r} on rank {r}, which rank {param_owner[key]} "
                              "trains too; declared staleness needs every parameter trained on one rank "
                              "(put these modules on one rank, owner=)")

    for i, o in enumerate(objectives):
        if o.output_name not in index or o.input_name not in index:
            raise SchemeError(f"objective {o.name!r} reads {o.input_name!r} and ends at {o.output_name!r}; a "
                              "pipeline needs every objective to start and end where a module ends")
        r = owner[index[o.output_name]]
        rank_of.append(r)
        module, ranks_run, n_earlier = index[o.input_name] + 1, [], 0
        for block in o.net.blocks:
            q = owner[module]
            ranks_run.append(q)
            n_earlier += q != r
            for k in block.param_names:
                own(k, q, o)
            for k in block.state_names:
                state_writer.setdefault(k, q)
            if block.name == module_ends[module] and module + 1 < len(module_ends):
                module += 1
        for block in (o.head.blocks if o.head is not None else ()):
            for k in block.param_names:
                own(k, r, o)
            for k in block.state_names:
                state_writer.setdefault(k, r)
        through = sorted(set(ranks_run))
        if len(through) > 2:
            raise SchemeError(f"objective {o.name!r} runs through modules of ranks {through}; declared "
                              "staleness splits a window over at most 2 ranks: give its modules to fewer ranks "
                              "(owner=) or use a narrower window")
        if len(through) == 2:
            if o.grad_fn is not None or o.loss_takes_context or o.active is not None:
                raise SchemeError(f"objective {o.name!r} crosses ranks and brings its own grad_fn, a loss "
                                  "context or an active= schedule, which a split window cannot honour; keep "
                                  "its modules on one rank (owner=)")
            crossing.append(i)
            split_at[i] = n_earlier
        for net in o.nets:
            for top in net.blocks:
                for leap in _leap_blocks(top):
                    twin_source.update(zip(leap.twin.param_names, leap.source.param_names))
    known = {"ema:" + ",".join(leap.twin.block_names) for o in objectives for net in o.nets
             for top in net.blocks for leap in _leap_blocks(top)}
    strange = [a.key for a in after_steps(objectives) if a.key not in known]
    if strange and ranks > 1:
        raise SchemeError(f"after-steps {strange[:3]} are not EMA twins (leap_ema); declared staleness "
                          "knows only those; put the whole scheme on one rank")
    for twin, source in twin_source.items():
        state_writer[twin] = param_owner.get(source, 0)
    stale: list[dict[int, dict[str, None]]] = [{} for _ in range(ranks)]
    for o, r in zip(objectives, rank_of):
        for k in o.state_names:
            if k in twin_source and state_writer[k] != r:
                stale[r].setdefault(state_writer[k], {})[k] = None
    stale_twins = [{q: tuple(keys) for q, keys in sorted(d.items())} for d in stale]
    if staleness > 0 and not crossing and not any(stale_twins):
        raise SchemeError(f"staleness={staleness} declared, but nothing of this scheme crosses ranks with "
                          f"owner={list(owner)}; use staleness=0 (exact, and as fast)")
    return StalePlan(rank_of, param_owner, state_writer, twin_source, crossing, split_at, stale_twins)


def fresh_carry(ts: TrainState, plan: StalePlan, staleness: int) -> StaleCarry:
    """A fresh start: nothing in flight, the stale twins equal to ``ts``'s."""
    twins = {k: ts.state[k] for keys in plan.stale_twins for ks in keys.values() for k in ks}
    return StaleCarry(((),) * staleness, (twins,) * staleness)


def check_carry(carry: StaleCarry, staleness: int) -> None:
    if len(carry.grads) != staleness or len(carry.twins) != staleness:
        raise SchemeError(f"the carry holds {len(carry.grads)} steps in flight but staleness={staleness}; "
                          "pass the carry the same run returned (or None for a fresh start)")


def owned_after_steps(post: Sequence[AfterStep], keys: Iterable[str]) -> tuple[AfterStep, ...]:
    """The after-steps, each keeping only its results for ``keys`` (the twins a rank owns)."""
    keys = frozenset(keys)

    def only(a: AfterStep) -> AfterStep:
        def fn(params: Params, state: State, step: Tensor | None = None) -> State:
            new = a.fn(params, state, step=step) if hyper.takes_step(a.fn) else a.fn(params, state)
            return {**state, **{k: v for k, v in new.items() if k in keys}}
        return AfterStep(a.key, fn)

    return tuple(only(a) for a in post)


def with_stale(state: State, stale: State, keys: Iterable[str]) -> State:
    return {**state, **{k: stale[k] for k in keys}} if keys else state


# ---------------------------------------------------------------- a window split at a rank boundary
@attrs.frozen(eq=False)
class Received(BlockDefaults):
    """A boundary received from the earlier rank, as a parameter under ``key``: the block
    returns ``params[key]`` (its input is that same value, unused), so the executor's
    gradient for ``key`` is the boundary's cotangent."""

    name: str
    key: str

    @property
    def param_names(self) -> tuple[str, ...]:
        return (self.key,)

    @property
    def state_names(self) -> tuple[str, ...]:
        return ()

    def meta_forward(self, x: Tensor) -> Tensor:
        return x

    def apply(self, params: Params, state: State, x: Tensor, *, train: bool) -> tuple[Tensor, State]:
        return params[self.key], {}

    def init(self, seed: int) -> tuple[Params, State]:
        raise SchemeError(f"{self.name!r} holds a received boundary; it has no initial value")

    def renamed(self, prefix: str) -> "Received":
        raise SchemeError(f"{self.name!r} holds a received boundary and cannot be copied")


def received_key(o: Objective) -> str:
    return f"received:{o.name}"


def tail_objective(o: Objective, n_earlier: int) -> Objective:
    """The part of ``o`` after its first ``n_earlier`` blocks, from the received boundary."""
    boundary = o.net.blocks[n_earlier - 1].name
    blocks = (Received(f"{boundary}@{o.name}", received_key(o)),) + o.net.blocks[n_earlier:]
    return attrs.evolve(o, net=Net(blocks, input_name=boundary))


def cotangent_loss(output: Tensor, batch: Any) -> tuple[Tensor, dict[str, Tensor]]:
    """``(output · cotangent).sum()``, the cotangent in the batch's second place: its gradient
    with respect to ``output`` is exactly the cotangent."""
    return (output * batch[1]).sum(), {}


def part_objective(o: Objective, n_earlier: int) -> Objective:
    """The first ``n_earlier`` blocks of ``o``, scored by ``cotangent_loss``."""
    return local_loss(Net(o.net.blocks[:n_earlier], input_name=o.input_name), None, cotangent_loss,
                      name=f"{o.name}@part")


def feeder(o: Objective) -> Objective:
    """``o`` forward only (no gradient, head or loss): it produces boundaries and statistics."""
    return attrs.evolve(o, grad_fn=forward_only, context_from=())


# ---------------------------------------------------------------- the law in one process
def simulate_staleness(objectives: Sequence[Objective], optimizer: Optimizer, module_ends: Sequence[str],
                       owner: Sequence[int], staleness: int, *, share: bool | str | None = None,
                       check_finite: bool = True) -> Callable:
    """The law (module docstring) in one process: ``run(ts, batches, carry=None) -> (ts,
    history, carry)``. Per step: every boundary forward once; per rank its objectives'
    gradients (the executor from those boundaries, the rank's view of the stale twins); per
    crossing objective its gradient alone, whose earlier rank's part waits ``staleness``
    steps in a queue; one update of every key; the twins of the step kept for the readers."""
    objectives = list(objectives)
    ranks = max(owner) + 1
    plan = plan_staleness(objectives, module_ends, owner, ranks, staleness)
    param_keys, state_keys = scheme_names(objectives)
    post = after_steps(objectives)
    inputs = [tuple(dict.fromkeys(o.input_name for o, r in zip(objectives, plan.rank_of_objective)
                                  if r == rank and o.input_name != INPUT)) for rank in range(ranks)]
    forward = executor([feeder(o) for o in objectives], share=False,
                       keep=dict.fromkeys(n for names in inputs for n in names))
    by_rank = [[o for o, r in zip(objectives, plan.rank_of_objective) if r == rank] for rank in range(ranks)]
    runs = [executor(objs, share=share, given=inputs[rank]) if objs else None for rank, objs in enumerate(by_rank)]
    alone = {i: executor([objectives[i]], share=share,
                         given=() if objectives[i].input_name == INPUT else (objectives[i].input_name,))
             for i in plan.crossing}
    first = {}
    for o, r in zip(objectives, plan.rank_of_objective):
        for k in o.state_names:
            first.setdefault(k, r)
    reads = [tuple(k for ks in plan.stale_twins[r].values() for k in ks) for r in range(ranks)]
    stale_keys = tuple(dict.fromkeys(k for ks in reads for k in ks))

    def run(ts: TrainState, batches: Iterable[Any], carry: StaleCarry | None = None):
        carry = fresh_carry(ts, plan, staleness) if carry is None else carry
        check_carry(carry, staleness)
        due_q = collections.deque(carry.grads)
        twin_q = collections.deque(carry.twins + ({k: ts.state[k] for k in stale_keys},))
        history = []
        for batch in batches:
            batch = as_batch(batch)
            x = input_of(batch)
            stale = twin_q.popleft()
            views = [ts._replace(state=with_stale(ts.state, stale, reads[r])) for r in range(ranks)]
            with _step_randomness(ts, x):
                _, bounds = forward(ts, batch, {})
                gs = [run_r(views[r], batch, {n: bounds[n] for n in inputs[r]})[0] if run_r else None
                      for r, run_r in enumerate(runs)]
                late = []
                for i in plan.crossing:
                    o, r = objectives[i], plan.rank_of_objective[i]
                    g, _ = alone[i](views[r], batch, {o.input_name: bounds[o.input_name]}
                                    if o.input_name != INPUT else {})
                    late.append((o.name, {k: g.grads[k] for k in o.param_names if plan.param_owner[k] != r}))
            due_q.append(tuple(late))
            grads = {}
            for k in param_keys:
                g = gs[plan.param_owner[k]]
                grads[k] = g.grads[k] if g is not None and k in g.grads else torch.zeros_like(ts.params[k])
            for _, contribution in due_q.popleft():
                for k, v in contribution.items():
                    grads[k] = grads[k] + v
            state = dict(ts.state)
            for k in state_keys:
                if k not in plan.twin_source:
                    state[k] = gs[first[k]].state[k]
            losses = {o.name: gs[r].losses[o.name] for o, r in zip(objectives, plan.rank_of_objective)}
            metrics = {o.name: gs[r].metrics[o.name] for o, r in zip(objectives, plan.rank_of_objective)}
            finite = torch.stack([torch.isfinite(v) for v in losses.values()]).all()
            ts, m = finish_step(ts, Gradients(grads, state, losses, metrics, finite), optimizer, post,
                                check_finite=check_finite)
            twin_q.append({k: ts.state[k] for k in stale_keys})
            history.append(m)
        return ts, history, StaleCarry(tuple(due_q), tuple(twin_q)[:staleness])

    return run
