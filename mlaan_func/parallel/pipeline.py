"""An update-unlocked pipeline over ``torch.distributed``: each rank owns a contiguous run of
modules and streams batches, so while rank r+1 trains on batch t, rank r already trains on
batch t+1. No per-step barrier: a rank waits only for its input; at most ``depth`` sends per
boundary are outstanding, which bounds memory.

A rank is the one executor (``mlaan_func.train.execute.executor``) started from the
boundaries it receives (``given``/``keep``) and ends every step with
``train.step.finish_step``, leaving the parameters it does not own untouched. Exact
(bitwise equal to one process) when no objective's gradient reach crosses a rank: DGL,
InfoPro, E2E on one rank. Such a scheme is checked up front; one whose reach crosses
ranks (MLAAN windows, EMA twins) is refused (``staleness`` > 0 is not implemented yet).

>>> import mlaan_func.distributed as dist_mf
>>> callable(dist_mf.pipeline_step)
True
"""

from __future__ import annotations

import collections
import time
from typing import Any, Iterable, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from ..combinators import Objective
from ..core.batch import as_batch
from ..core.net import INPUT
from ..optim import Optimizer
from ..schemes.losses import input_of
from ..train.state import Gradients, TrainState, scheme_names
from ..train.step import _step_randomness, finish_step
from .distributed import _guard, _rank_gradients, balanced_owner, plan_modules

MAX_DIMS = 8


def crossing_objectives(objectives: Sequence[Objective], module_ends: Sequence[str],
                        owner: Sequence[int], rank_of_objective: Sequence[int]) -> list[str]:
    """Why a scheme's gradient reach crosses ranks, one line per objective: its net runs
    through modules of other ranks (a window, E2E), it shares a parameter or state key with
    objectives of other ranks, or it has after-steps (EMA twins) while the run spans ranks."""
    index = {INPUT: -1, **{end: i for i, end in enumerate(module_ends)}}
    keys: dict[str, set[int]] = {}
    for o, r in zip(objectives, rank_of_objective):
        for k in (*o.param_names, *o.state_names):
            keys.setdefault(k, set()).add(r)
    problems = []
    for o, r in zip(objectives, rank_of_objective):
        if o.input_name not in index:
            problems.append(f"objective {o.name!r} (rank {r}) starts inside a module ({o.input_name!r})")
            continue
        through = sorted({owner[m] for m in range(index[o.input_name] + 1, index[o.output_name] + 1)} - {r})
        shared = sorted({q for k in (*o.param_names, *o.state_names) for q in keys[k]} - {r})
        if through:
            problems.append(f"objective {o.name!r} (rank {r}) runs through modules of ranks {through}")
        if shared:
            problems.append(f"objective {o.name!r} (rank {r}) shares keys with ranks {shared}")
        if o.after_steps and len(set(owner)) > 1:
            problems.append(f"objective {o.name!r} (rank {r}) has after-steps (EMA twins) that "
                            "follow blocks of other ranks")
    return problems


def _send(t: Tensor, dst: int, group, pending: collections.deque, depth: int, name: str) -> None:
    t = t.contiguous()
    shape = torch.zeros(MAX_DIMS + 1, dtype=torch.int64)
    shape[0] = t.ndim
    shape[1:1 + t.ndim] = torch.tensor(t.shape)
    pending.append((_guard(f"sending the shape of {name!r}", dist.isend, shape, dst, group=group), shape))
    pending.append((_guard(f"sending {name!r}", dist.isend, t, dst, group=group), t))
    while len(pending) > 2 * depth:
        req, _ = pending.popleft()
        _guard(f"waiting for a send of {name!r}", req.wait)


def _recv(like: Tensor, src: int, group, name: str) -> Tensor:
    shape = torch.zeros(MAX_DIMS + 1, dtype=torch.int64)
    _guard(f"receiving the shape of {name!r}", dist.recv, shape, src, group=group)
    buf = torch.empty(tuple(int(s) for s in shape[1:1 + int(shape[0])]), dtype=like.dtype, device=like.device)
    _guard(f"receiving {name!r}", dist.recv, buf, src, group=group)
    return buf


def pipeline_step(objectives: Sequence[Objective], optimizer: Optimizer, module_ends: Sequence[str],
                   *, staleness: int = 0, depth: int = 2, owner: Sequence[int] | None = None, group=None,
                   check_finite: bool = True, share: bool | None = None, stats: dict | None = None):
    """``run(ts, batches) -> (ts, metrics)``: trains over an iterable of batches, streaming
    them through the ranks; ``metrics`` holds, per step, this rank's objectives' metrics. The
    returned state has every parameter and state key broadcast from its owner, so all ranks
    agree on them (per-parameter optimizer state stays on the owner). Every rank must get the
    same batches (the labels are read on every rank). ``stats`` receives busy/wait seconds."""
    if staleness != 0:
        raise NotImplementedError("pipeline staleness > 0 is not implemented yet; use staleness=0 "
                                  "with a scheme whose gradient reach stays on one rank (dgl, infopro)")
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    owner = list(owner) if owner is not None else balanced_owner(objectives, module_ends, world)
    plan = plan_modules(objectives, module_ends, owner, world)
    problems = crossing_objectives(objectives, module_ends, owner, plan.rank_of_objective)
    if problems:
        raise ValueError("the scheme's gradient reach crosses ranks, so a streamed pipeline is not "
                         f"exact: {'; '.join(problems)}. Use module_parallel_step, or put these "
                         "modules on one rank (owner=)")
    mine = [i for i, r in enumerate(plan.rank_of_objective) if r == rank]
    param_keys, state_keys = scheme_names(objectives)
    owned = {k for i in mine for k in (*objectives[i].param_names, *objectives[i].state_names)}
    untouched = tuple(k for k in param_keys if k not in owned)
    rank_of_key = {k: plan.rank_of_objective[i] for i, o in enumerate(objectives)
                   for k in (*o.param_names, *o.state_names)}
    run_rank = _rank_gradients(objectives, mine, plan.receives[rank], plan.sends[rank], share)

    def run(ts: TrainState, batches: Iterable[Any]) -> tuple[TrainState, list[dict]]:
        pending: collections.deque = collections.deque()
        history, busy, wait = [], 0.0, 0.0
        for batch in batches:
            batch = as_batch(batch)
            x = input_of(batch)
            acts: dict[str, Tensor] = {INPUT: x}
            tic = time.perf_counter()
            for name in plan.receives[rank]:
                acts[name] = _recv(x, rank - 1, group, name)
            wait += time.perf_counter() - tic
            tic = time.perf_counter()
            with _step_randomness(ts, x):
                g, acts = run_rank(ts, batch, acts)
            grads = {k: v for k, v in g.grads.items() if k in owned}
            zeros = {k: torch.zeros_like(ts.params[k]) for k in untouched}
            ts, metrics = finish_step(ts, Gradients({**grads, **zeros}, {**ts.state, **g.state}, g.losses,
                                                    g.metrics, g.finite), optimizer, (),
                                      check_finite=check_finite, untouched=untouched)
            busy += time.perf_counter() - tic
            for name in plan.sends[rank]:
                _send(acts[name], rank + 1, group, pending, depth, name)
            history.append(metrics)
        tic = time.perf_counter()
        while pending:
            req, _ = pending.popleft()
            _guard("waiting for a send", req.wait)
        params, state = dict(ts.params), dict(ts.state)
        for k in param_keys:
            _guard(f"broadcasting {k!r}", dist.broadcast, params[k], rank_of_key[k], group=group)
        for k in state_keys:
            if k in state:
                _guard(f"broadcasting {k!r}", dist.broadcast, state[k], rank_of_key[k], group=group)
        wait += time.perf_counter() - tic
        if stats is not None:
            stats["busy_s"] = stats.get("busy_s", 0.0) + busy
            stats["wait_s"] = stats.get("wait_s", 0.0) + wait
        return ts._replace(params=params, state=state), history

    return run
