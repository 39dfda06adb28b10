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
  most ``depth`` sends per boundary are outstanding, which bounds memory; the next batch's
  boundaries are received while a rank computes (their shapes follow from the batch's
  shape). Each rank is the executor started from the boundaries it receives and ends every
  step with
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
from ..core.batch import Batch, as_batch
from ..core.net import INPUT, Params, State
from ..core.randomness import fold_in
from ..errors import DistributedError, NonFiniteLossError, SchemeError
from ..optim import Optimizer, map_entries
from ..schemes.losses import input_of
from ..train.execute import executor, gradient_fns
from ..train.plan import plan_routes
from ..train.routing import accumulate
from ..train.state import Gradients, TrainState, after_steps, scheme_names
from ..train.step import _step_randomness, finish_step, gradients
from .staleness import (StaleCarry, check_carry, feeder, fresh_carry, owned_after_steps, part_objective,
                        plan_staleness, received_key, tail_objective, with_stale)

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


def global_rank(group, rank: int) -> int:
    """The global rank of ``group``'s rank ``rank`` (point-to-point calls and ``src`` take global ranks)."""
    return rank if group is None else dist.get_global_rank(group, rank)


def mesh_groups(replicas: int, group=None):
    """``(pipeline group, data group)`` of this rank in a (``replicas`` × stages) mesh of the
    world: global rank ``d · stages + p`` is stage ``p`` of data replica ``d``. Every rank
    must call it (``new_group`` is collective); ``replicas`` must divide the world size."""
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    if replicas < 1 or world % replicas:
        raise ValueError(f"{replicas} data replicas do not split {world} processes evenly; choose a "
                         "number of replicas that divides the number of processes")
    stages = world // replicas
    mine = {}
    for d in range(replicas):
        ranks = [global_rank(group, d * stages + p) for p in range(stages)]
        made = dist.new_group(ranks)
        if rank // stages == d:
            mine["pipeline"] = made
    for p in range(stages):
        ranks = [global_rank(group, d * stages + p) for d in range(replicas)]
        made = dist.new_group(ranks)
        if rank % stages == p:
            mine["data"] = made
    return mine["pipeline"], mine["data"]


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
    """The rank of each module: contiguous runs, at least one module per rank, with the
    costliest run as cheap as any split allows (a pipeline runs at the pace of its slowest
    rank); on a tie the earlier ranks take more. Default costs: equal.

    >>> assign_modules(4, 2, costs=[1, 1, 1, 5])
    [0, 0, 0, 1]
    """
    if ranks > modules:
        raise ValueError(f"{ranks} ranks but only {modules} modules: module parallelism needs at "
                         "least one module per rank; use fewer processes or more --modules")
    costs = list(costs) if costs is not None else [1.0] * modules
    if len(costs) != modules:
        raise ValueError(f"{len(costs)} costs for {modules} modules; give one cost per module")
    prefix = [0.0]
    for c in costs:
        prefix.append(prefix[-1] + c)
    inf = float("inf")
    # worst[r][i]: the least possible cost of the costliest run when modules [0, i) form r runs
    worst = [[inf] * (modules + 1) for _ in range(ranks + 1)]
    cut = [[0] * (modules + 1) for _ in range(ranks + 1)]
    worst[0][0] = 0.0
    for r in range(1, ranks + 1):
        for i in range(r, modules - (ranks - r) + 1):
            for j in range(i - 1, r - 2, -1):  # the last run is [j, i); latest j first: ties keep it short
                v = max(worst[r - 1][j], prefix[i] - prefix[j])
                if v < worst[r][i]:
                    worst[r][i], cut[r][i] = v, j
    owner, i = [0] * modules, modules
    for r in range(ranks, 0, -1):
        j = cut[r][i]
        owner[j:i] = [r - 1] * (i - j)
        i = j
    return owner


def objective_seconds(objectives: Sequence[Objective], ts: TrainState, batch: Any, *,
                      repeats: int = 3) -> list[float]:
    """Median seconds of each objective's gradient alone on ``batch`` (its input from the
    objectives before it), in scheme order: the costs a pipeline is balanced by."""
    batch = as_batch(batch)
    routes = plan_routes(objectives)
    fns = gradient_fns(objectives, routes)
    acts, seconds = {INPUT: input_of(batch)}, []
    for o, fn in zip(objectives, fns):
        params = {k: ts.params[k] for k in o.param_names}
        samples = []
        for _ in range(repeats):
            tic = time.perf_counter()
            _, (_, (_, outputs, _)) = fn(params, ts.state, acts[o.input_name], batch)
            samples.append(time.perf_counter() - tic)
        for name, tensor in outputs.items():
            acts.setdefault(name, tensor)
        seconds.append(sorted(samples)[len(samples) // 2])
    return seconds


def balanced_owner(objectives: Sequence[Objective], module_ends: Sequence[str], ranks: int,
                   seconds: Sequence[float] | None = None) -> list[int]:
    """Module owners balancing the work of each rank's objectives (a window's cost falls on
    the module it ends in): by the blocks they run, or by measured ``seconds`` per objective
    (``objective_seconds``), which also weigh heads and losses."""
    index = {end: i for i, end in enumerate(module_ends)}
    if seconds is not None and len(seconds) != len(objectives):
        raise ValueError(f"{len(seconds)} seconds for {len(objectives)} objectives; give one per objective "
                         "(objective_seconds measures them)")
    costs = [0.0] * len(module_ends)
    for i, o in enumerate(objectives):
        if o.output_name in index:
            costs[index[o.output_name]] += seconds[i] if seconds is not None else sum(len(n.blocks) for n in o.nets)
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
        # micro-batches of one step share their boundary shapes: each travels once per step and
        # direction (a forwarded boundary is both received and sent)
        got: dict[str, tuple] = {}
        sent: set[str] = set()
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
                if name not in got:
                    shape = torch.zeros(8, dtype=torch.int64, device=x.device)
                    _guard(f"receiving the shape of {name!r}", dist.recv, shape, global_rank(group, rank - 1),
                           group=group)
                    shape = shape.cpu()
                    got[name] = tuple(int(s) for s in shape[1:1 + int(shape[0])])
                buf = torch.empty(got[name], dtype=x.dtype, device=x.device)
                _guard(f"receiving {name!r}", dist.recv, buf, global_rank(group, rank - 1), group=group)
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
                if name not in sent:
                    shape = torch.zeros(8, dtype=torch.int64)
                    shape[0] = t.ndim
                    shape[1:1 + t.ndim] = torch.tensor(t.shape)
                    shape = shape.to(t.device)
                    sent.add(name)
                    _guard(f"sending the shape of {name!r}", dist.send, shape, global_rank(group, rank + 1),
                           group=group)
                pending.append((_guard(f"sending {name!r}", dist.isend, t, global_rank(group, rank + 1),
                                       group=group), t))
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
    """``t`` with its shape header to ``group``'s rank ``dst``, at most ``depth`` sends outstanding."""
    dst = global_rank(group, dst)
    t = t.contiguous()
    shape = torch.zeros(MAX_DIMS + 1, dtype=torch.int64)  # built on the host, sent from t's device (NCCL)
    shape[0] = t.ndim
    shape[1:1 + t.ndim] = torch.tensor(t.shape)
    shape = shape.to(t.device)
    pending.append((_guard(f"sending the shape of {name!r}", dist.isend, shape, dst, group=group), shape))
    pending.append((_guard(f"sending {name!r}", dist.isend, t, dst, group=group), t))
    while len(pending) > 2 * depth:
        req, _ = pending.popleft()
        _guard(f"waiting for a send of {name!r}", req.wait)


def _recv(like: Tensor, src: int, group, name: str) -> Tensor:
    """A tensor sent by ``_send`` from ``group``'s rank ``src``, on ``like``'s device and dtype."""
    src = global_rank(group, src)
    shape = torch.zeros(MAX_DIMS + 1, dtype=torch.int64, device=like.device)
    _guard(f"receiving the shape of {name!r}", dist.recv, shape, src, group=group)
    shape = shape.cpu()
    buf = torch.empty(tuple(int(s) for s in shape[1:1 + int(shape[0])]), dtype=like.dtype, device=like.device)
    _guard(f"receiving {name!r}", dist.recv, buf, src, group=group)
    return buf


def _whole(ts: TrainState, source: dict[str, int], param_keys: Sequence[str], group) -> TrainState:
    """Every parameter, state entry and per-parameter optimizer entry broadcast from the rank
    of ``group`` that ``source`` names for its key; a copy where it is received, so no
    caller's tensor changes. What a drained pipeline returns on every rank."""
    rank = dist.get_rank(group)

    def from_owner(k: str, v: Tensor) -> Tensor:
        src = source[k]
        v = v if src == rank else v.clone()
        _guard(f"broadcasting {k!r}", dist.broadcast, v, global_rank(group, src), group=group)
        return v

    params = {k: from_owner(k, v) if k in source else v for k, v in ts.params.items()}
    state = {k: from_owner(k, v) if k in source else v for k, v in ts.state.items()}
    opt_state = map_entries(from_owner, ts.opt_state, frozenset(k for k in param_keys if k in source))
    return ts._replace(params=params, state=state, opt_state=opt_state)


def _gathered(steps: list, group, data_group=None) -> tuple[list[dict], Tensor]:
    """Every objective's metrics per step from the rank that ran it (one all-reduce of a
    steps x metrics table over ``group``), and per step the number of ranks (of the whole
    mesh) whose losses were not all finite. ``steps``: this rank's ``(metrics, finite)``."""
    world = dist.get_world_size(group)
    local = sorted({(o, k) for metrics, _ in steps[:1] for o, m in metrics.items() if o != "optimizer"
                    for k in m})
    names: list = [None] * world
    _guard("gathering the names of the metrics", dist.all_gather_object, names, local, group=group)
    columns = sorted({c for part in names for c in part})
    device = group_device(group)
    table = torch.zeros(len(steps), len(columns) + 1, device=device)
    for i, (metrics, finite) in enumerate(steps):
        row = [metrics[o][k].detach().float().reshape(()).to(device) if o in metrics
               else torch.zeros((), device=device) for o, k in columns]
        table[i] = torch.stack([*row, (~finite).float().to(device)])
    table = all_reduce_tree({"t": table}, group=group)["t"]
    if data_group is not None:  # every replica stops at the same step
        bad = all_reduce_tree({"bad": table[:, -1].contiguous()}, group=data_group)["bad"]
        table = torch.cat([table[:, :-1], bad[:, None]], dim=1)
    history = []
    for i, (metrics, _) in enumerate(steps):
        row: dict[str, dict[str, Tensor]] = {}
        for j, (o, k) in enumerate(columns):
            row.setdefault(o, {})[k] = table[i, j]
        if "optimizer" in metrics:
            row["optimizer"] = metrics["optimizer"]
        history.append(row)
    return history, table[:, -1]


def _drained(ts: TrainState, steps: list, source: dict[str, int], param_keys: Sequence[str], group, data_group,
             replay: Callable[[int], TrainState] | None, first_step: int, stats: dict | None,
             busy: float, wait: float) -> tuple[TrainState, list[dict]]:
    """The end of a streamed call, after its sends are waited for: the whole state (``_whole``)
    and the gathered history; ``stats`` gets the call's busy and wait seconds. With ``replay``
    (the check on), a non-finite loss at call step j on any rank raises ``NonFiniteLossError``
    on every rank, its ``train_state`` the whole state ``replay(j)`` gives after the j good steps."""
    tic = time.perf_counter()
    history, bad = _gathered(steps, group, data_group)
    failed = bad.nonzero().flatten()
    if replay is not None and failed.numel():  # the call's one host read
        j = int(failed[0])
        good = _whole(replay(j), source, param_keys, group)
        which = [o for o, m in history[j].items() if o != "optimizer" and not bool(torch.isfinite(m["loss"]))]
        error = NonFiniteLossError(
            f"non-finite loss in objective(s) {which} at step {first_step + j}; nothing was updated past "
            f"step {first_step + j - 1} (the error's train_state). Lower the learning rate, add gradient "
            "clipping (mlaan_func.optim.clip_by_global_norm), or check the inputs for NaN.")
        error.train_state = good
        raise error
    ts = _whole(ts, source, param_keys, group)
    if stats is not None:
        stats["busy_s"] = stats.get("busy_s", 0.0) + busy
        stats["wait_s"] = stats.get("wait_s", 0.0) + wait + time.perf_counter() - tic
    return ts, history


def _post_ahead(shapes: dict[str, tuple] | None, like: Tensor, src: int, group, names: Sequence[str]):
    """Receives of ``names`` from ``group``'s rank ``src`` posted now (headers and data, in the
    order they are sent), so they arrive while this rank computes; ``None`` when a shape is
    not known yet. ``shapes``: each boundary's shape for this input shape (a boundary's shape
    follows from its batch's)."""
    if shapes is None or any(n not in shapes for n in names):
        return None
    src = global_rank(group, src)
    posted = []
    for n in names:
        header = torch.empty(MAX_DIMS + 1, dtype=torch.int64, device=like.device)
        buf = torch.empty(shapes[n], dtype=like.dtype, device=like.device)
        posted.append((n, header, buf, _guard(f"receiving the shape of {n!r}", dist.irecv, header, src, group=group),
                       _guard(f"receiving {n!r}", dist.irecv, buf, src, group=group)))
    return posted


def _collect(posted) -> dict[str, Tensor]:
    """The boundaries ``_post_ahead`` posted, once arrived; their headers checked."""
    out = {}
    for n, header, buf, got_header, got_data in posted:
        _guard(f"receiving the shape of {n!r}", got_header.wait)
        _guard(f"receiving {n!r}", got_data.wait)
        header = header.cpu()
        shape = tuple(int(v) for v in header[1:1 + int(header[0])])
        if shape != tuple(buf.shape):
            raise DistributedError(f"boundary {n!r} arrived with shape {shape}, not {tuple(buf.shape)} as for "
                                   "an earlier batch of the same shape: a pipeline needs every boundary's shape "
                                   "to follow from its batch's")
        out[n] = buf
    return out


def pipeline_step(objectives: Sequence[Objective], optimizer: Optimizer, module_ends: Sequence[str],
                   *, staleness: int = 0, depth: int = 2, owner: Sequence[int] | None = None, group=None,
                   data_group=None, check_finite: bool = True, share: bool | None = None,
                   stats: dict | None = None):
    """``run(ts, batches) -> (ts, metrics)``: trains over an iterable of batches, streaming
    them through the ranks of ``group`` (the stages), and drains at the end. ``metrics``
    holds, per step, every objective's metrics (gathered from their ranks at the drain) and
    the optimizer's.

    ``data_group``: the ranks holding the same stage in other data replicas (``mesh_groups``).
    Each replica streams its own shard of every (global) batch, and a stage's gradients and
    BatchNorm statistics are averaged over its data group before each update, as
    ``data_parallel_step`` does over its ranks: the run equals ``data_parallel_step`` over the
    replicas, and the metrics are the replica's own shard's.

    The returned state is whole on every rank: each parameter, state entry and
    per-parameter optimizer entry is broadcast from the rank that owns it, so any rank can
    save it and ``run`` can continue from it (bitwise, whatever the chunking of batches
    into calls). Every rank must get the same batches (the labels are read on every rank);
    a rank reads them lazily, one step ahead of its work.

    With ``check_finite`` a non-finite loss on any rank raises ``NonFiniteLossError`` on
    every rank at the drain, naming the step and the objectives; its ``train_state`` is the
    state after the last good step (the run is replayed up to it from the kept batches, so
    a run keeps its batches until it drains). ``stats`` receives busy/wait seconds.

    ``staleness`` > 0 hands the scheme to ``stale_pipeline_step`` (docs/design.md §5.1), whose
    ``run(ts, batches, carry=None)`` also returns the carry of what is in flight.
    """
    if staleness != 0 and data_group is not None:
        raise SchemeError("a pipeline under staleness > 0 does not take data_group yet: use staleness=0 with "
                          "a data x pipeline mesh, or one pipeline")
    if staleness != 0:
        return stale_pipeline_step(objectives, optimizer, module_ends, staleness=staleness, depth=depth,
                                   owner=owner, group=group, check_finite=check_finite, share=share, stats=stats)
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    replicas = 1 if data_group is None else dist.get_world_size(data_group)
    replica = 0 if data_group is None else dist.get_rank(data_group)
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

    def stream(ts: TrainState, batches: Iterable[Any], kept: list | None):
        """This rank's part of every batch; ``(ts, [(metrics, finite)] per step, busy, wait)``."""
        pending: collections.deque = collections.deque()
        steps, busy, wait = [], 0.0, 0.0
        known: dict[tuple, dict[str, tuple]] = {}  # input shape -> the shape of each received boundary
        ahead = None
        items = iter(batches)
        upcoming = next(items, None)
        while upcoming is not None:
            batch, upcoming = as_batch(upcoming), next(items, None)
            if kept is not None:
                kept.append(batch)
            if data_group is not None:
                batch = shard(batch, replica, replicas)
            x = input_of(batch)
            acts: dict[str, Tensor] = {INPUT: x}
            tic = time.perf_counter()
            if ahead is not None:
                acts.update(_collect(ahead))
            else:
                for name in plan.receives[rank]:
                    acts[name] = _recv(x, rank - 1, group, name)
                known[tuple(x.shape)] = {name: tuple(acts[name].shape) for name in plan.receives[rank]}
            ahead = None
            if upcoming is not None and plan.receives[rank]:  # the next batch's boundaries arrive as this one runs
                following = as_batch(upcoming)
                following = following if data_group is None else shard(following, replica, replicas)
                ahead = _post_ahead(known.get(tuple(input_of(following).shape)), x, rank - 1, group,
                                    plan.receives[rank])
            wait += time.perf_counter() - tic
            tic = time.perf_counter()
            drawn = ts if data_group is None or ts.key is None else ts._replace(key=fold_in(ts.key, replica))
            with _step_randomness(drawn, x):
                g, acts = run_rank(drawn, batch, acts)
            grads, state = {k: v for k, v in g.grads.items() if k in owned}, g.state
            if data_group is not None:
                grads = {k: v / replicas for k, v in all_reduce_tree(grads, group=data_group).items()}
                floats = {k: v for k, v in state.items() if v.is_floating_point()}
                state = {**state, **{k: v / replicas for k, v in all_reduce_tree(floats, group=data_group).items()}}
            zeros = {k: torch.zeros_like(ts.params[k]) for k in untouched}
            ts, metrics = finish_step(ts, Gradients({**grads, **zeros}, {**ts.state, **state}, g.losses,
                                                    g.metrics, g.finite), optimizer, (),
                                      check_finite=False, untouched=untouched)
            steps.append((metrics, g.finite))
            busy += time.perf_counter() - tic
            for name in plan.sends[rank]:
                _send(acts[name], rank + 1, group, pending, depth, name)
        tic = time.perf_counter()
        while pending:
            req, _ = pending.popleft()
            _guard("waiting for a send", req.wait)
        return ts, steps, busy, wait + time.perf_counter() - tic

    def run(ts: TrainState, batches: Iterable[Any]) -> tuple[TrainState, list[dict]]:
        kept: list | None = [] if check_finite else None
        start = ts
        ts, steps, busy, wait = stream(ts, batches, kept)
        return _drained(ts, steps, rank_of_key, param_keys, group, data_group,
                        (lambda j: stream(start, kept[:j], None)[0]) if check_finite else None,
                        int(start.step), stats, busy, wait)

    return run


# ---------------------------------------------------------------- declared staleness (issue #22 item 3)
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

    source = {**law.param_owner, **law.state_writer}

    def run(ts: TrainState, batches: Iterable[Any], carry: StaleCarry | None = None
            ) -> tuple[TrainState, list[dict], StaleCarry]:
        carry = fresh_carry(ts, law, staleness) if carry is None else carry
        check_carry(carry, staleness)
        kept: list | None = [] if check_finite else None
        start, start_carry = ts, carry
        ts, steps, carry, busy, wait = stream(ts, batches, carry, kept)
        ts, history = _drained(ts, steps, source, param_keys, group, None,
                               (lambda j: stream(start, kept[:j], start_carry, None)[0]) if check_finite else None,
                               int(start.step), stats, busy, wait)
        return ts, history, carry

    def stream(ts: TrainState, batches: Iterable[Any], carry: StaleCarry, saved: list | None):
        """This rank's part of every batch: ``(ts, [(metrics, finite)] per step, carry, busy, wait)``."""
        due = collections.deque(carry.grads)
        twins = collections.deque([{k: t[k] for k in my_reads} for t in carry.twins] +
                                  [{k: ts.state[k] for k in my_reads}])
        counts = {"base": 0, "got": 0}  # twins[0] is the view of step base; twin messages received
        stash: collections.deque = collections.deque()
        forward_q, back_q = collections.deque(), collections.deque()
        twin_q = {c: collections.deque() for c in readers}
        steps, busy, wait = [], 0.0, 0.0

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
            if saved is not None:
                saved.append(batch)
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
                                       check_finite=False, untouched=untouched)  # the drain checks
            for c, keys in readers.items():
                _send(torch.cat([ts.state[k].reshape(-1) for k in keys]), c, group, twin_q[c], depth,
                      f"the EMA twins for rank {c}")
            busy += time.perf_counter() - tic
            steps.append((reported, g.finite))
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
        return ts, steps, StaleCarry(tuple(due), tuple(twins)[:staleness]), busy, wait + time.perf_counter() - tic

    return run
