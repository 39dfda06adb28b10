"""A worker process for the distributed tests (spawned by tests/test_distributed.py)."""

import sys

import torch
import torch.distributed as dist

import mlaan_func as mf
from mlaan_func import distributed as mfd
from mlaan_func.models.resnet import CifarResNet

SHAPE = (3, 8, 8)
AT = ["1.0", "1.1", "2.0", "2.1"]


def scheme(method):
    net = mf.from_module(CifarResNet(14, num_classes=5, widths=(4, 8, 8)))
    return net, mf.schemes.build(method, net, AT, input_shape=SHAPE)


def batches(steps, n=12):
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(n, *SHAPE, generator=g), torch.randint(0, 5, (n,), generator=g)) for _ in range(steps)]


def optimizer():
    return mf.optim.sgd(0.1, momentum=0.9, nesterov=True, weight_decay=1e-4)


def run(rank, world, port, mode, method, out, steps, die):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=__import__("datetime").timedelta(seconds=10))
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
    rank, world, port, mode, method, out, steps, die = sys.argv[1:]
    run(int(rank), int(world), int(port), mode, method, out, int(steps), die == "1")
