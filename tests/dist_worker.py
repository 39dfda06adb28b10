"""A worker process for the distributed tests (spawned by tests/test_distributed.py)."""

import datetime
import sys
import time

import torch
import torch.distributed as dist

import mlaan_func as mf
from mlaan_func import distributed as mfd
from mlaan_func.models.resnet import CifarResNet

SHAPE = (3, 8, 8)
AT = ["1.0", "1.1", "2.0", "2.1"]

COLLECTIVE_TIMEOUT = datetime.timedelta(minutes=10)
"""Bounds the rendezvous and each collective: ranks start seconds apart on a loaded machine and
trace their first step at different speeds, so a short timeout fails healthy runs (10 s did).
A dead rank is noticed when its connections close, long before this."""

LATE = 15
"""Seconds rank 0 of mode "data_late" waits before its first step: longer than the 10 s
collective timeout these tests once had, much shorter than COLLECTIVE_TIMEOUT."""


def scheme(method):
    net = mf.from_module(CifarResNet(14, num_classes=5, widths=(4, 8, 8)))
    return net, mf.schemes.build(method, net, AT, input_shape=SHAPE)


def batches(steps, n=12):
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(n, *SHAPE, generator=g), torch.randint(0, 5, (n,), generator=g)) for _ in range(steps)]


def optimizer():
    return mf.optim.sgd(0.1, momentum=0.9, nesterov=True, weight_decay=1e-4)


def run(rank, world, store, mode, method, out, steps, die):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                            timeout=COLLECTIVE_TIMEOUT)
    net, objectives = scheme(method)
    opt = optimizer()
    # "data_seeded": every rank seeds differently, as in the usual seed + rank idiom
    seed = rank if mode == "data_seeded" else 0
    torch.manual_seed(100 + seed)
    ts = mf.init(objectives, opt, seed=seed)
    data = batches(steps)
    if mode.startswith("data"):
        step = mfd.data_parallel_step(objectives, opt, check_every=1)
    else:
        ends = [m.output_name for m in mf.split(net, AT)]
        step = mfd.module_parallel_step(objectives, opt, ends, micro_batches=3)
        if mode == "modules_ragged":  # a smaller last batch, as at the end of an epoch
            data[-1] = (data[-1][0][:6], data[-1][1][:6])
    if mode == "data_late" and rank == 0:  # as when one rank traces its first step on a busy core
        time.sleep(LATE)
    try:
        for i, b in enumerate(data):
            if die and rank == world - 1 and i == 1:
                sys.exit(3)
            if mode == "data_diverge" and rank == 1 and i == 1:
                ts = ts._replace(params={**ts.params, "2.0.bn1.weight": ts.params["2.0.bn1.weight"] + 1})
            ts, _ = step(ts, b)
    except mfd.DistributedError as err:
        with open(out + f".error{rank}", "w") as f:
            f.write(str(err))
        return
    if rank == 0 or mode == "data_seeded":
        mf.save(out + (f".rank{rank}" if mode == "data_seeded" else ""), ts)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    rank, world, store, mode, method, out, steps, die = sys.argv[1:]
    run(int(rank), int(world), store, mode, method, out, int(steps), die == "1")
