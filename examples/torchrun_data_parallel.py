"""Data-parallel or module-parallel training of a DGL+MLAAN scheme under torchrun.

    torchrun --nproc-per-node 2 examples/torchrun_data_parallel.py                  # data parallel
    torchrun --nproc-per-node 2 examples/torchrun_data_parallel.py --parallel modules

Every rank builds the same scheme and the same initial TrainState (same seed) and calls the
step with the same global batch; the step keeps every rank's TrainState identical, so rank 0
alone prints and saves. CPU ranks use gloo, GPU ranks NCCL (one GPU per rank).
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist

import mlaan_func as mf
from mlaan_func import data as datasets
from mlaan_func import distributed as mfd

SHAPE = (3, 16, 16)
AT = ["1.1", "2.0", "2.1"]  # K = 4 modules of a small CIFAR ResNet-14


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--parallel", default="data", choices=("data", "modules"))
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=64, help="global batch, divisible by the ranks")
    p.add_argument("--micro-batches", type=int, default=4)
    p.add_argument("--out", default=None, help="rank 0 saves the final TrainState here")
    args = p.parse_args()

    torch.set_num_threads(1)
    rank, world = mfd.init_from_env(timeout_s=60)         # reads torchrun's environment
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    mfd.check_same_config(vars(args))                      # every rank must run the same thing

    net = mf.from_module(mf.models.CifarResNet(14, num_classes=10, in_channels=3, widths=(8, 16, 32)))
    scheme = mf.schemes.dgl_mlaan(net, AT, input_shape=SHAPE)
    opt = mf.optim.sgd(0.05, momentum=0.9, nesterov=True, weight_decay=1e-4)
    ts = mf.init(scheme, opt, seed=0, device=device)
    if args.parallel == "data":
        step = mfd.data_parallel_step(scheme, opt)         # each rank takes its shard of the batch
    else:
        ends = [m.output_name for m in mf.split(net, AT)]  # each rank owns a run of modules
        step = mfd.module_parallel_step(scheme, opt, ends, micro_batches=args.micro_batches)

    data = datasets.synthetic(args.batch_size * 4, 8, shape=SHAPE, seed=0)
    x = datasets.normalize(data.train_x.to(device), data.mean, data.std)
    y = data.train_y.to(device)
    for i in range(args.steps):
        j = (i % 4) * args.batch_size
        ts, metrics = step(ts, (x[j:j + args.batch_size], y[j:j + args.batch_size]))
        if rank == 0 and (i == 0 or (i + 1) % 5 == 0):
            print(f"step {i + 1}: final loss {float(metrics['final']['loss']):.4f} "
                  f"({args.parallel} parallel over {world} ranks)", flush=True)
    if rank == 0 and args.out:
        mf.save(args.out, ts)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
