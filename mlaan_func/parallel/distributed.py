"""Scale-out on ``torch.distributed``: data parallel and module parallel training steps.

Both return a step with the signature of ``mlaan_func.step`` and keep every rank's
``TrainState`` identical, so any rank can save it (rank 0 does).

* ``data_parallel_step``: each rank runs the whole scheme on its shard of the global batch;
  the summed gradient dict is averaged over ranks in flat buckets (one collective per dtype
  and bucket, not one per tensor), BatchNorm statistics are averaged, and the pure optimizer
  update and the EMA twins then agree on every rank. Equals one process that treats each
  shard as its own BatchNorm batch and averages the shards' gradients.
* ``module_parallel_step``: each rank owns a contiguous run of modules and runs the
  objectives that end in them (through the shared step, from the boundaries it receives,
  where they share blocks); module boundaries flow forward rank to rank (``send`` /
  ``recv``) one micro-batch at a time, so rank r works on micro-batch m while rank r+1
  works on m-1. Gradients that a window loss sends into modules of an earlier rank, and
  the parameters that EMA twins follow on later ranks, travel in the one bucketed
  all-reduce per step that keeps the (small) parameter replicas equal. Synchronous:
  equals one process running the same micro-batches in sequence and averaging their
  gradients — no staleness.
* ``pipeline_step``: the same ranks streaming batches across steps: while rank r+1 trains
  on batch t, rank r already trains on batch t+1; a rank waits only for its input, and at
  most ``depth`` sends per boundary are outstanding, which bounds memory. Each rank is the
  executor started from the boundaries it receives and ends every step with
  ``finish_step``, leaving the parameters it does not own untouched. Exact (bitwise equal
  to one process) when no objective's gradient reach crosses a rank (DGL, InfoPro, E2E on
  one rank); a scheme whose reach crosses ranks (MLAAN windows, EMA twins) is refused
  (``crossing_objectives``), unless it declares ``staleness`` (``stale_pipeline_step``,
  docs/design.md §5.1: cross-rank cotangents and EMA twins arrive ``staleness`` steps late).

>>> import mlaan_func.distributed as dist_mf
>>> dist_mf.assign_modules(5, 2)
[0, 0, 0, 1, 1]
"""

from __future__ import annotations

import collections
import datetime
import time
from typing import Any, Callable, Iterable, NamedTuple, Sequence

import torch
import torch.distributed as dist
from torch import Tensor
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten

from ..combinators import Objective
from ..core.batch import as_batch
from ..core.net import INPUT, Params
from ..core.randomness import fold_in
from ..errors import DistributedError, SchemeError
from ..optim import Optimizer
from ..schemes.losses import input_of
from ..train.execute import executor
from ..train.plan import plan_routes
from ..train.routing import accumulate
from ..train.state import Gradients, TrainState, after_steps, scheme_names
from ..train.step import _step_randomness, finish_step, gradients

BUCKET_BYTES = 25 * 2**20




def init_from_env(backend: str | None = None, timeout_s: float = 120.0) -> tuple[int, int]:
    """Join the process group ``torchrun`` describes (gloo on CPU, NCCL on CUDA) with a
    timeout on every collective; returns ``(rank, world_size)``."""
    if not dist.is_initialized():
        backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    return dist.get_rank(), dist.get_world_size()


def _guard(what: str, fn: Callable, *args, **kwargs):
    try:
        return fn(*args, **kwargs)
    except RuntimeError as err:
        raise DistributedError(
            f"{what} failed on rank {dist.get_rank()}: {err}. A rank died, hangs, or was started "
            "with another configuration; check every rank's log (torchrun prints which exited)."
        ) from err


def check_same_config(config: dict, group=None) -> None:
    """Raise ``DistributedError`` unless every rank passes the same ``config``."""
    configs: list[Any] = [None] * dist.get_world_size(group)
    _guard("comparing configurations", dist.all_gather_object, configs, config, group=group)
    for r, other in enumerate(configs):
        if other != config:
            diff = sorted(k for k in set(config) | set(other) if config.get(k) != other.get(k))
            raise DistributedError(f"rank {r} runs another configuration than rank {dist.get_rank()} "
                                   f"(differs in {diff}); start every rank with the same flags")


def all_reduce_tree(tensors: dict[str, Tensor], op=dist.ReduceOp.SUM, group=None,
                    bucket_bytes: int = BUCKET_BYTES) -> dict[str, Tensor]:
    """All-reduce a dict of tensors in flat buckets (one collective per dtype and bucket);
    returns new tensors, the inputs are left as they were."""
    out: dict[str, Tensor] = {}
    by_dtype: dict[tuple, list[str]] = {}
    for k, v in tensors.items():
        by_dtype.setdefault((v.dtype, v.device), []).append(k)
    for keys in by_dtype.values():
        bucket: list[str] = []
        size = 0
        for k in keys + [None]:
            if k is not None:
                bucket.append(k)
                size += tensors[k].numel() * tensors[k].element_size()
            if bucket and (k is None or size >= bucket_bytes):
                flat = torch.cat([tensors[b].reshape(-1) for b in bucket])
                _guard("all-reduce", dist.all_reduce, flat, op=op, group=group)
                offset = 0
                for b in bucket:
                    n = tensors[b].numel()
                    out[b] = flat[offset:offset + n].view_as(tensors[b])
                    offset += n
                bucket, size = [], 0
    return {k: out[k] for k in tensors}


def group_device(group=None) -> torch.device:
    """The device collectives of ``group`` run on: the current CUDA device for NCCL, else CPU."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def broadcast_train_state(ts: TrainState, group=None, src: int = 0) -> TrainState:
    """Every rank gets rank ``src``'s train state (params, state, optimizer state, step, key):
    replicas start equal whatever each rank's seed or global generator was."""
    leaves, spec = tree_flatten(ts)
    tensors = {str(i): t for i, t in enumerate(leaves) if isinstance(t, Tensor)}
    by_kind: dict[tuple, list[str]] = {}
    for k, v in tensors.items():
        by_kind.setdefault((v.dtype, v.device), []).append(k)
    root = dist.get_global_rank(group, src) if group is not None else src
    for keys in by_kind.values():
        flat = torch.cat([tensors[k].reshape(-1) for k in keys])
        _guard("broadcasting the train state", dist.broadcast, flat, root, group=group)
        offset = 0
        for k in keys:
            n = tensors[k].numel()
            leaves[int(k)] = flat[offset:offset + n].view_as(tensors[k]).clone()
            offset += n
    return tree_unflatten(leaves, spec)


def check_replicas(ts: TrainState, group=None) -> None:
    """Raise ``DistributedError`` naming the first parameter or state key whose checksum
    differs between ranks (two float64 sums per tensor, two small all-reduces)."""
    tensors = {**{f"params[{k!r}]": v for k, v in ts.params.items()},
               **{f"state[{k!r}]": v for k, v in ts.state.items()}}
    device = group_device(group)
    sums = torch.stack([torch.stack([v.double().sum(), v.double().square().sum()]).to(device)
                        for v in tensors.values()]) if tensors else torch.zeros(0, 2, device=device)
    high, low = sums.clone(), sums.clone()
    _guard("comparing replicas", dist.all_reduce, high, op=dist.ReduceOp.MAX, group=group)
    _guard("comparing replicas", dist.all_reduce, low, op=dist.ReduceOp.MIN, group=group)
    differs = (high != low).any(dim=1).nonzero()
    if len(differs):
        key = list(tensors)[int(differs[0])]
        raise DistributedError(
            f"the replicas differ at step {int(ts.step)}, first in {key}: some rank changed its "
            "train state outside the data-parallel step, or runs other code. Start every rank from "
            "the same checkpoint; data_parallel_step broadcasts rank 0's state at step 0.")


def samples(batch: Any, start: int, stop: int) -> Any:
    """Samples ``start:stop`` of a batch (any pytree): every tensor whose first dimension is
    the input's is sliced, anything else is kept as it is."""
    n = input_of(batch).shape[0]
    return tree_map(lambda t: t[start:stop] if isinstance(t, Tensor) and t.dim() > 0 and t.shape[0] == n else t,
                    batch)


def shard(batch: Any, rank: int, world: int) -> Any:
    """Rank ``rank``'s contiguous share of a global batch (sizes must divide evenly)."""
    batch = as_batch(batch)
    n = input_of(batch).shape[0]
    if n % world:
        raise ValueError(f"the global batch of {n} does not split evenly over {world} ranks; "
                         "choose a batch size divisible by the number of processes")
    per = n // world
    return samples(batch, rank * per, (rank + 1) * per)


def data_parallel_step(objectives: Sequence[Objective], optimizer: Optimizer, *, group=None,
                       compile: bool = False, backend: str = "inductor", check_finite: bool = True,
                       check_every: int = 100, share: bool | str | None = None):
    """A data-parallel training step over the global batch: ``(ts, (x, y)) -> (ts, metrics)``.

    Every rank passes the same global batch (or its own shard with ``sharded=True`` in the
    call); see the module docstring for what is averaged. At step 0 every rank takes rank
    0's train state (``broadcast_train_state``); every ``check_every`` steps the replicas'
    checksums are compared (``check_replicas``; 0 turns it off). Random draws use the key
    folded with the rank, so shards get independent dropout masks. ``share`` as in
    ``mlaan_func.gradients``.
    """

    grad_step = gradients(objectives, compile=compile, backend=backend, share=share)
    post = after_steps(objectives)

    def train_step(ts: TrainState, batch: Any, *, sharded: bool = False):
        world, rank = dist.get_world_size(group), dist.get_rank(group)
        at = int(ts.step)
        if at == 0:
            ts = broadcast_train_state(ts, group)
        elif check_every and at % check_every == 0:
            check_replicas(ts, group)
        local = as_batch(batch) if sharded else shard(batch, rank, world)
        g = grad_step(ts if ts.key is None else ts._replace(key=fold_in(ts.key, rank)), local)
        grads = all_reduce_tree(g.grads, group=group)
        grads = {k: v / world for k, v in grads.items()}
        floats = {k: v for k, v in g.state.items() if v.is_floating_point()}
        state = {**g.state, **{k: v / world for k, v in all_reduce_tree(floats, group=group).items()}}
        finite = all_reduce_tree({"f": g.finite.to(torch.int64).reshape(1)}, op=dist.ReduceOp.MIN,
                                 group=group)["f"].bool()[0]
        return finish_step(ts, g._replace(grads=grads, state=state, finite=finite), optimizer, post,
                           check_finite=check_finite)

    return train_step


def assign_modules(modules: int, ranks: int, costs: Sequence[float] | None = None) -> list[int]:
    """The rank of each module: contiguous runs of near-equal cost (default: equal)."""
    if ranks > modules:
        raise ValueError(f"{ranks} ranks but only {modules} modules: module parallelism needs at "
                         "least one module per rank; use fewer processes or more --modules")
    costs = list(costs) if costs is not None else [1.0] * modules
    total, owner, acc = sum(costs), [], 0.0
    for i, c in enumerate(costs):
        r = min(int(acc / total * ranks + 1e-9), ranks - 1)
        r = max(r, ranks - (modules - i))  # leave at least one module for every later rank
        if owner and r < owner[-1]:
            r = owner[-1]
        owner.append(r)
        acc += c
    return owner


def balanced_owner(objectives: Sequence[Objective], module_ends: Sequence[str], ranks: int) -> list[int]:
    """Module owners balancing the blocks each rank's objectives run (a window's cost falls
    on the module it ends in)."""
    index = {end: i for i, end in enumerate(module_ends)}
    costs = [0.0] * len(module_ends)
    for o in objectives:
        if o.output_name in index:
            costs[index[o.output_name]] += sum(len(n.blocks) for n in o.nets)
    return assign_modules(len(module_ends), ranks, [c or 1e-3 for c in costs])


class ModulePlan(NamedTuple):
    """Which objectives each rank runs and which boundaries it receives and sends on."""

    rank_of_objective: list[int]
    receives: list[list[str]]
    sends: list[list[str]]


def plan_modules(objectives: Sequence[Objective], module_ends: Sequence[str], owner: Sequence[int],
                 ranks: int) -> ModulePlan:
    """Objectives run on the rank that owns the module their net ends in."""
    routes = plan_routes(objectives)
    rank_of_end = {end: owner[i] for i, end in enumerate(module_ends)}
    rank_of_obj, produced = [], [set() for _ in range(ranks)]
    for o, route in zip(objectives, routes):
        if o.output_name not in rank_of_end:
            raise ValueError(f"objective {o.name!r} does not end at a module boundary; module "
                             "parallelism needs each objective's net to end where a module ends")
        r = rank_of_end[o.output_name]
        rank_of_obj.append(r)
        produced[r] |= {o.output_name, *route.taps}
    needs = [set() for _ in range(ranks)]
    for o, r in zip(objectives, rank_of_obj):
        if o.input_name != INPUT and o.input_name not in produced[r]:
            needs[r].add(o.input_name)
    receives = [set() for _ in range(ranks)]
    for r in range(ranks):
        for name in needs[r]:
            src = next(q for q in range(r - 1, -1, -1) if name in produced[q])
            for q in range(src + 1, r + 1):
                receives[q].add(name)
    sends = [sorted(receives[r + 1]) if r + 1 < ranks else [] for r in range(ranks)]
    return ModulePlan(rank_of_obj, [sorted(x) for x in receives], sends)


def _gather_metrics(objectives, losses, metrics, group):
    """Every objective's loss (and accuracy, where it has one) on every rank; each rank ran
    only its own objectives. Reduced on the group's device (NCCL cannot reduce CPU tensors)."""
    flat = {}
    device = group_device(group)

    def on_device(v):
        return torch.as_tensor(v, dtype=torch.float32).to(device)

    for o in objectives:
        mine = metrics.get(o.name, {})
        flat[f"{o.name}/weighted_loss"] = on_device(losses.get(o.name, 0.0))
        flat[f"{o.name}/loss"] = on_device(mine.get("loss", 0.0))
        flat[f"{o.name}/accuracy"] = on_device(mine.get("accuracy", 0.0))
        flat[f"{o.name}/has_accuracy"] = on_device(float("accuracy" in mine))
    flat = {k: v[0] for k, v in all_reduce_tree({k: v.reshape(1) for k, v in flat.items()}, group=group).items()}
    gathered = {}
    for o in objectives:
        gathered[o.name] = {"loss": flat[f"{o.name}/loss"]}
        if bool(flat[f"{o.name}/has_accuracy"]):
            gathered[o.name]["accuracy"] = flat[f"{o.name}/accuracy"]
    return {o.name: flat[f"{o.name}/weighted_loss"] for o in objectives}, gathered


def _rank_gradients(objectives: Sequence[Objective], mine: Sequence[int], receives: Sequence[str],
                    sends: Sequence[str], share: bool | str | None
                    ) -> Callable[[TrainState, Any, dict[str, Tensor]], tuple[Gradients, dict[str, Tensor]]]:
    """``(ts, micro_batch, boundaries) -> (gradients, boundaries)`` for the objectives ``mine``
    of a rank, started from the input and the received boundaries; the boundaries returned
    hold the ones to send. The executor (``mlaan_func.execute``) from the received
    boundaries; ``gradients.state`` holds at least the keys they write."""
    local = [objectives[i] for i in mine]
    if not local:
        def idle(ts: TrainState, batch: Any, acts: dict[str, Tensor]) -> tuple[Gradients, dict[str, Tensor]]:
            return Gradients({}, {}, {}, {}, torch.ones((), dtype=torch.bool)), acts
        return idle
    run_local = executor(local, share=share, given=receives, keep=sends)

    def run(ts: TrainState, batch: Any, acts: dict[str, Tensor]) -> tuple[Gradients, dict[str, Tensor]]:
        g, sent = run_local(ts, batch, {name: acts[name] for name in receives})
        return g, {**acts, **sent}

    return run


def module_parallel_step(objectives: Sequence[Objective], optimizer: Optimizer, module_ends: Sequence[str],
                         *, micro_batches: int = 4, owner: Sequence[int] | None = None, group=None,
                         check_finite: bool = True, stats: dict | None = None, share: bool | None = None):
    """A module-parallel, synchronous step; ``module_ends`` names each module's last block
    (``[m.output_name for m in split(net, at)]``). ``stats``, when given, receives this
    rank's busy and waiting seconds.

    ``share`` as in ``mlaan_func.step``: by default a rank runs its objectives through the
    shared step, from the boundaries it receives (``mlaan_func.execute.executor``),
    where that is exact and changes something (MLAAN windows on one rank); ``share=False``
    runs them one at a time.
    """
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    owner = list(owner) if owner is not None else balanced_owner(objectives, module_ends, world)
    plan = plan_modules(objectives, module_ends, owner, world)
    mine = [i for i, r in enumerate(plan.rank_of_objective) if r == rank]
    param_keys, _ = scheme_names(objectives)
    post = after_steps(objectives)
    first_writer: dict[str, int] = {}
    for i, o in enumerate(objectives):
        for k in o.state_names:
            first_writer.setdefault(k, plan.rank_of_objective[i])
    run_rank = _rank_gradients(objectives, mine, plan.receives[rank], plan.sends[rank], share)

    def train_step(ts: TrainState, batch: Any):
        batch = as_batch(batch)
        n = input_of(batch).shape[0]
        if n % micro_batches:
            raise ValueError(f"the batch of {n} does not split into {micro_batches} equal micro-batches")
        per = n // micro_batches
        shapes: dict[str, tuple] = {}  # micro-batches of one step share their boundary shapes
        device = group_device(group)
        grads: Params = {}
        state = dict(ts.state)
        losses: dict[str, Tensor] = {}
        metrics: dict[str, dict[str, Tensor]] = {}
        finite = torch.ones((), dtype=torch.bool, device=device)
        busy = wait = 0.0
        pending: list = []
        for m in range(micro_batches):
            mb = samples(batch, m * per, (m + 1) * per)
            x = input_of(mb)
            acts: dict[str, Tensor] = {INPUT: x}
            tic = time.perf_counter()
            for name in plan.receives[rank]:
                if name not in shapes:
                    shape = torch.zeros(8, dtype=torch.int64)
                    _guard(f"receiving the shape of {name!r}", dist.recv, shape, rank - 1, group=group)
                    shapes[name] = tuple(int(s) for s in shape[1:1 + int(shape[0])])
                buf = torch.empty(shapes[name], dtype=x.dtype, device=x.device)
                _guard(f"receiving {name!r}", dist.recv, buf, rank - 1, group=group)
                acts[name] = buf
            wait += time.perf_counter() - tic
            tic = time.perf_counter()
            micro_ts = ts if ts.key is None else ts._replace(key=fold_in(ts.key, m))
            with _step_randomness(micro_ts, x):
                g, acts = run_rank(micro_ts._replace(state=state), mb, acts)
            grads = accumulate(grads, g.grads)
            state.update({k: v for k, v in g.state.items() if first_writer.get(k) == rank})
            for name, loss in g.losses.items():
                losses[name] = losses.get(name, 0) + loss / micro_batches
                metrics[name] = {k: metrics.get(name, {}).get(k, 0) + v / micro_batches
                                 for k, v in g.metrics[name].items()}
            finite = finite & g.finite.to(device)
            busy += time.perf_counter() - tic
            for name in plan.sends[rank]:
                t = acts[name].contiguous()
                if name not in shapes:
                    shape = torch.zeros(8, dtype=torch.int64)
                    shape[0] = t.ndim
                    shape[1:1 + t.ndim] = torch.tensor(t.shape)
                    shapes[name] = tuple(t.shape)
                    _guard(f"sending the shape of {name!r}", dist.send, shape, rank + 1, group=group)
                pending.append((_guard(f"sending {name!r}", dist.isend, t, rank + 1, group=group), t))
        tic = time.perf_counter()
        for req, _ in pending:
            _guard("waiting for a send", req.wait)
        full = {k: grads[k] / micro_batches if k in grads else torch.zeros_like(ts.params[k]) for k in param_keys}
        full = all_reduce_tree(full, group=group)
        owned = {k: (v if first_writer.get(k) == rank else torch.zeros_like(v)) for k, v in state.items()
                 if k in first_writer}
        synced = all_reduce_tree(owned, group=group)
        state = {**state, **synced}
        finite = all_reduce_tree({"f": finite.to(torch.int64).reshape(1)}, op=dist.ReduceOp.MIN,
                                 group=group)["f"].bool()[0]
        losses, metrics = _gather_metrics(objectives, losses, metrics, group)
        wait += time.perf_counter() - tic
        if stats is not None:
            stats["busy_s"] = stats.get("busy_s", 0.0) + busy
            stats["wait_s"] = stats.get("wait_s", 0.0) + wait
        return finish_step(ts, Gradients(full, state, losses, metrics, finite), optimizer, post,
                           check_finite=check_finite)

    return train_step


# ---------------------------------------------------------------- the streamed pipeline
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
    same batches (the labels are read on every rank). ``stats`` receives busy/wait seconds.
    ``staleness`` > 0 hands the scheme to ``stale_pipeline_step`` (docs/design.md §5.1), whose
    ``run(ts, batches, carry=None)`` also returns the carry of what is in flight."""
    if staleness != 0:
        return stale_pipeline_step(objectives, optimizer, module_ends, staleness=staleness, depth=depth,
                                   owner=owner, group=group, check_finite=check_finite, share=share, stats=stats)
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    owner = list(owner) if owner is not None else balanced_owner(objectives, module_ends, world)
    plan = plan_modules(objectives, module_ends, owner, world)
    problems = crossing_objectives(objectives, module_ends, owner, plan.rank_of_objective)
    if problems:
        raise SchemeError("the scheme's gradient reach crosses ranks, so a streamed pipeline is not "
                         f"exact: {'; '.join(problems)}. Use module_parallel_step, put these "
                         "modules on one rank (owner=), or declare staleness (stale_pipeline_step; "
                         "staleness=0 is exact with a round trip per step)")
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


# ---------------------------------------------------------------- declared staleness (issue #22 item 3)
from ..core.batch import Batch  # noqa: E402
from ..core.net import State  # noqa: E402
from .staleness import (  # noqa: E402
    StaleCarry,
    check_carry,
    feeder,
    fresh_carry,
    owned_after_steps,
    part_objective,
    plan_staleness,
    received_key,
    tail_objective,
    with_stale,
)


class _Piece(NamedTuple):
    """One objective of the split scheme: ``index`` in the scheme, the rank that runs it,
    and whether it is whole, a crossing window's ``part`` (earlier rank) or its ``tail``."""

    index: int
    rank: int
    objective: Objective
    kind: str


def split_scheme(objectives: Sequence[Objective], module_ends: Sequence[str], owner: Sequence[int],
                 law) -> list[_Piece]:
    """The scheme with every crossing window split at its rank boundary (``staleness``)."""
    index = {INPUT: -1, **{end: i for i, end in enumerate(module_ends)}}
    pieces = []
    for i, o in enumerate(objectives):
        r = law.rank_of_objective[i]
        if i not in law.split_at:
            pieces.append(_Piece(i, r, o, "whole"))
            continue
        p = owner[index[o.input_name] + 1]
        if p != r - 1:
            raise SchemeError(f"objective {o.name!r} runs on rank {r} through modules of rank {p}; a split window "
                              "must span neighbouring ranks: give every rank at least one module (owner=)")
        pieces.append(_Piece(i, p, part_objective(o, law.split_at[i]), "part"))
        pieces.append(_Piece(i, r, tail_objective(o, law.split_at[i]), "tail"))
    return pieces


def stale_pipeline_step(objectives: Sequence[Objective], optimizer: Optimizer, module_ends: Sequence[str],
                        *, staleness: int, depth: int = 2, owner: Sequence[int] | None = None, group=None,
                        check_finite: bool = True, share: bool | None = None, stats: dict | None = None):
    """The streamed pipeline for a scheme whose reach crosses ranks (MLAAN windows and twins),
    under the declared-staleness law (``mlaan_func.parallel.staleness``, docs/design.md §5):
    ``run(ts, batches, carry=None) -> (ts, history, carry)``.

    A window of rank q through rank p = q − 1 is split at their boundary: p runs its part
    forward (the boundary it sends anyway) and stashes its input, train state and step; q runs
    the tail from the received boundary as a parameter and sends its cotangent back; p
    applies it ``staleness`` steps later as the gradient of ``(part · cotangent).sum()``,
    recomputed from the stash (a recompute rather than a kept graph: nothing but tensors is
    held across steps, and only ``staleness + 1`` stashes). Owners send the EMA twins other
    ranks read after each step; a reader uses the one of ``staleness`` steps before. The
    queues are bounded (``depth`` sends per channel outstanding); no barrier per step.
    ``staleness=0`` is the synchronous step with one round trip per boundary and step. At the
    end the in-flight cotangents are received and turned into the ``carry``'s gradients,
    and every key is broadcast from its owner. ``carry``: as ``simulate_staleness``'s (each
    rank keeps its own share); pass it to the next call. Checks as ``pipeline_step``."""
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    objectives = list(objectives)
    owner = list(owner) if owner is not None else balanced_owner(objectives, module_ends, world)
    law = plan_staleness(objectives, module_ends, owner, world, staleness)
    pieces = split_scheme(objectives, module_ends, owner, law)
    plan = plan_modules([c.objective for c in pieces], module_ends, owner, world)
    receives, sends = plan.receives[rank], plan.sends[rank]
    mine = [c for c in pieces if c.rank == rank and c.kind != "part"]
    parts = [c.objective for c in pieces if c.rank == rank and c.kind == "part"]
    names = [objectives[c.index].name for c in pieces if c.rank == rank and c.kind == "part"]
    tails = [c.objective for c in mine if c.kind == "tail"]
    made = {c.objective.output_name for c in mine}
    written = {k for c in mine for k in c.objective.state_names}
    feeders = [c._replace(objective=feeder(c.objective)) for c in pieces if c.rank == rank and c.kind == "part"
               and (c.objective.output_name not in made or set(c.objective.state_names) - written)]
    local = [c.objective for c in sorted(mine + feeders, key=lambda c: c.index)]
    fed = {c.objective.name for c in feeders}
    keep = tuple(dict.fromkeys([*sends, *(p.input_name for p in parts if p.input_name not in (INPUT, *receives))]))
    run_local = executor(local, share=share, given=receives, keep=keep) if local else None
    run_parts = [executor([p], share=share, given=() if p.input_name == INPUT else (p.input_name,)) for p in parts]
    param_keys, state_keys = scheme_names(objectives)
    owned = tuple(k for k in param_keys if law.param_owner[k] == rank)
    untouched = tuple(k for k in param_keys if law.param_owner[k] != rank)
    writes = {k for k in state_keys if law.state_writer[k] == rank and k not in law.twin_source}
    post = owned_after_steps(after_steps(objectives), [k for k in law.twin_source if law.state_writer[k] == rank])
    reads = law.stale_twins[rank]
    my_reads = tuple(k for keys in reads.values() for k in keys)
    readers = {c: law.stale_twins[c][rank] for c in range(world) if rank in law.stale_twins[c]}

    def run(ts: TrainState, batches: Iterable[Any], carry: StaleCarry | None = None
            ) -> tuple[TrainState, list[dict], StaleCarry]:
        carry = fresh_carry(ts, law, staleness) if carry is None else carry
        check_carry(carry, staleness)
        due = collections.deque(carry.grads)
        twins = collections.deque([{k: t[k] for k in my_reads} for t in carry.twins] +
                                  [{k: ts.state[k] for k in my_reads}])
        counts = {"base": 0, "got": 0}  # twins[0] is the view of step base; twin messages received
        stash: collections.deque = collections.deque()
        forward_q, back_q = collections.deque(), collections.deque()
        twin_q = {c: collections.deque() for c in readers}
        history, busy, wait = [], 0.0, 0.0

        def receive_twins() -> State:
            view = {}
            for q, keys in reads.items():
                flat = _recv(ts.state[keys[0]], q, group, f"the EMA twins of rank {q}")
                offset = 0
                for k in keys:
                    n = ts.state[k].numel()
                    view[k] = flat[offset:offset + n].view_as(ts.state[k])
                    offset += n
            counts["got"] += 1
            return view

        def twins_through(j: int) -> None:
            """The stale twins of step ``j`` received, in the order their owners sent them."""
            while counts["base"] + len(twins) <= j:
                twins.append(receive_twins())

        def late() -> tuple[tuple[str, Params], ...]:
            """The cotangents of the oldest stashed step, as gradients of this rank's parts."""
            then, x, inputs = stash.popleft()
            out = []
            for name, part, run_part in zip(names, parts, run_parts):
                cot = _recv(x, rank + 1, group, f"the cotangent of {name!r}")
                with _step_randomness(then, x):
                    g, _ = run_part(then, Batch(x, cot), {k: v for k, v in inputs.items() if k == part.input_name})
                out.append((name, g.grads))
            return tuple(out)

        n = 0
        for j, batch in enumerate(batches):
            n = j + 1
            batch = as_batch(batch)
            x = input_of(batch)
            tic = time.perf_counter()
            twins_through(j)
            stale = twins.popleft()
            counts["base"] += 1
            acts: dict[str, Tensor] = {INPUT: x}
            for name in receives:
                acts[name] = _recv(x, rank - 1, group, name)
            wait += time.perf_counter() - tic
            tic = time.perf_counter()
            view = ts._replace(params={**ts.params, **{received_key(t): acts[t.input_name] for t in tails}},
                               state=with_stale(ts.state, stale, my_reads))
            if run_local is not None:
                with _step_randomness(ts, x):
                    g, kept = run_local(view, batch, {name: acts[name] for name in receives})
            else:
                g, kept = Gradients({}, {}, {}, {}, torch.ones((), dtype=torch.bool)), {}
            values = {**acts, **kept}
            for name in sends:
                _send(values[name], rank + 1, group, forward_q, depth, name)
            for t in tails:
                _send(g.grads[received_key(t)], rank - 1, group, back_q, depth, f"the cotangent of {t.name!r}")
            if parts:
                stash.append((view, x, {p.input_name: values[p.input_name] for p in parts if p.input_name != INPUT}))
            if j >= staleness:
                due.append(late() if parts else ())
            grads = {k: g.grads[k] if k in g.grads else torch.zeros_like(ts.params[k]) for k in owned}
            for _, contribution in due.popleft():
                for k, v in contribution.items():
                    grads[k] = grads[k] + v
            grads.update({k: torch.zeros_like(ts.params[k]) for k in untouched})
            state = {**ts.state, **{k: v for k, v in g.state.items() if k in writes}}
            losses = {k: v for k, v in g.losses.items() if k not in fed}
            metrics = {k: v for k, v in g.metrics.items() if k not in fed}
            ts, reported = finish_step(ts, Gradients(grads, state, losses, metrics, g.finite), optimizer, post,
                                       check_finite=check_finite, untouched=untouched)
            for c, keys in readers.items():
                _send(torch.cat([ts.state[k].reshape(-1) for k in keys]), c, group, twin_q[c], depth,
                      f"the EMA twins for rank {c}")
            busy += time.perf_counter() - tic
            history.append(reported)
        tic = time.perf_counter()
        for j in range(n, n + staleness):  # the last steps' cotangents, in the order they were sent
            twins_through(j)
            if j >= staleness:
                due.append(late() if parts else ())
        while counts["got"] < n:
            twins.append(receive_twins())
        for pending in (forward_q, back_q, *twin_q.values()):
            while pending:
                req, _ = pending.popleft()
                _guard("waiting for a send", req.wait)
        params, state = dict(ts.params), dict(ts.state)
        for k in param_keys:
            src = law.param_owner[k]
            params[k] = params[k] if src == rank else torch.empty_like(params[k])
            _guard(f"broadcasting {k!r}", dist.broadcast, params[k], src, group=group)
        for k in state_keys:
            src = law.state_writer[k]
            state[k] = state[k] if src == rank else torch.empty_like(state[k])
            _guard(f"broadcasting {k!r}", dist.broadcast, state[k], src, group=group)
        wait += time.perf_counter() - tic
        if stats is not None:
            stats["busy_s"] = stats.get("busy_s", 0.0) + busy
            stats["wait_s"] = stats.get("wait_s", 0.0) + wait
        return ts._replace(params=params, state=state), history, StaleCarry(tuple(due), tuple(twins)[:staleness])

    return run
