"""A worker process for tests/test_pipeline.py: one rank of a streamed pipeline (argv: rank,
world, store, out, and a JSON config with method, at, owner, steps, ragged, chunks (batches per run call),
nan_at, replicas (a data x pipeline mesh), data_parallel (data_parallel_step instead), die_at (the
last rank exits there))."""

import datetime
import json
import os
import sys

import torch
import torch.distributed as dist

import mlaan_func as mf
from mlaan_func import distributed as mfd
from mlaan_func.models.resnet import CifarResNet

SHAPE = (3, 8, 8)


def scheme(method, at):
    net = mf.from_module(CifarResNet(14, num_classes=5, widths=(4, 8, 8)))
    return net, mf.schemes.build(method, net, at, input_shape=SHAPE)


def batches(steps, ragged=False, n=8):
    g = torch.Generator().manual_seed(0)
    data = [(torch.randn(n, *SHAPE, generator=g), torch.randint(0, 5, (n,), generator=g)) for _ in range(steps)]
    if ragged:  # a smaller last batch, as at the end of an epoch
        data[-1] = (data[-1][0][:3], data[-1][1][:3])
    return data


def optimizer():
    return mf.optim.sgd(0.1, momentum=0.9, nesterov=True, weight_decay=1e-4)


def poisoned(data, nan_at):
    """``data`` with NaN inputs at batch ``nan_at`` (``None``: as it is)."""
    if nan_at is not None:
        x, y = data[nan_at]
        data[nan_at] = (torch.full_like(x, float("nan")), y)
    return data


class dying(list):
    """The batches, but the process exits when it takes batch ``at`` (a rank that dies mid-stream)."""

    def __init__(self, data, at):
        super().__init__(data)
        self.at = at

    def __getitem__(self, index):
        part = super().__getitem__(index)
        if not isinstance(index, slice):
            return part
        start = index.start or 0

        def batches():
            for i, b in enumerate(part, start):
                if i == self.at:
                    os._exit(3)
                yield b
        return batches()


def run(rank, world, store, out, config):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(minutes=10))
    net, objectives = scheme(config["method"], config["at"])
    opt = optimizer()
    ts = mf.init(objectives, opt, seed=0)
    ends = [m.output_name for m in mf.split(net, config["at"])]
    data = poisoned(batches(config["steps"], config.get("ragged", False)), config.get("nan_at"))
    if config.get("data_parallel"):  # the reference of a data x pipeline mesh: data parallel alone
        step = mfd.data_parallel_step(objectives, opt)
        for b in data:
            ts, _ = step(ts, b)
        with open(f"{out}.rank{rank}.json", "w") as f:
            json.dump({"losses": [], "raised": None}, f)
        if rank == 0:
            mf.save(out, ts)
        dist.barrier()
        dist.destroy_process_group()
        return
    groups = {}
    if config.get("replicas"):
        groups["group"], groups["data_group"] = mfd.mesh_groups(config["replicas"])
    run_pipeline = mfd.pipeline_step(objectives, opt, ends, owner=config["owner"], **groups)
    if config.get("die_at") is not None and rank == world - 1:
        data = dying(data, config["die_at"])
    history, raised, start = [], None, 0
    try:
        for size in config.get("chunks") or [config["steps"]]:
            ts, part = run_pipeline(ts, data[start:start + size])
            history += part
            start += size
    except mf.NonFiniteLossError as err:
        ts, raised = err.train_state, str(err)
    except mfd.DistributedError as err:  # a rank died: report it, save nothing
        with open(f"{out}.rank{rank}.json", "w") as f:
            json.dump({"losses": [], "raised": str(err)}, f)
        return
    finish(rank, out, ts, history, raised)


def finish(rank, out, ts, history, raised):
    """Write this rank's report (each step's losses, what it raised), rank 0 the state; leave the group."""
    losses = [{o: float(m["loss"]) for o, m in row.items() if o != "optimizer"} for row in history]
    with open(f"{out}.rank{rank}.json", "w") as f:
        json.dump({"losses": losses, "raised": raised}, f)
    if rank == 0:
        mf.save(out, ts)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    rank, world, store, out, config = sys.argv[1:]
    run(int(rank), int(world), store, out, json.loads(config))
