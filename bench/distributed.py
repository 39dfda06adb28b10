"""Scale-out on one machine: gloo processes on 127.0.0.1 running the data- and module-parallel
steps; each rank's busy fraction and peak step bytes, and the speedup module parallelism
would give from the measured per-objective step times (this 2-core machine cannot show a
real one).

    python bench/distributed.py                         # dgl_mlaan, ResNet-32, K=8, 2 ranks
    python bench/distributed.py --method dgl --modules 4 --ranks 3 --json /tmp/d.json
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(__file__))
import common  # noqa: E402

import mlaan_func as mf  # noqa: E402
from mlaan_func import distributed as mfd  # noqa: E402
from mlaan_func.memory import track_memory  # noqa: E402


def worker(rank, world, port, method, arch, k, batch_size, micro, steps, mode, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    backbone, scheme = common.build(method, arch, k)
    opt = common.optimizer()
    ts = mf.init(scheme, opt, seed=0)
    stats: dict = {}
    if mode == "modules":
        ends = [m.output_name for m in mf.split(backbone, common.split_for(arch, backbone, k))]
        step = mfd.module_parallel_step(scheme, opt, ends, micro_batches=micro, stats=stats)
    else:
        step = mfd.data_parallel_step(scheme, opt)
    batch = common.cifar_batch(batch_size, "cpu")
    ts, _ = step(ts, batch)
    stats.clear()
    times = []
    for _ in range(steps):
        dist.barrier()
        t = time.perf_counter()
        ts, _ = step(ts, batch)
        times.append(time.perf_counter() - t)
    timed_stats = dict(stats)
    with track_memory() as meter:
        ts, _ = step(ts, batch)
    stats = timed_stats
    total = sum(times)
    row = {"rank": rank, "step_s": statistics.median(times), "peak_step_bytes": meter.peak_bytes}
    if mode == "modules":
        row["busy_fraction"] = stats["busy_s"] / max(stats["busy_s"] + stats["wait_s"], 1e-9)
        row["busy_s_per_step"] = stats["busy_s"] / steps
        row["measured_total_s_per_step"] = total / steps
    with open(os.path.join(out_dir, f"{mode}-{rank}.json"), "w") as f:
        json.dump(row, f)
    dist.destroy_process_group()


def objective_times(method, arch, k, micro_batch, repeats=3):
    """Median seconds of each objective's gradient function on one micro-batch, alone."""
    _, scheme = common.build(method, arch, k)
    ts = mf.init(scheme, common.optimizer(), seed=0)
    return scheme, mfd.objective_seconds(scheme, ts, common.cifar_batch(micro_batch, "cpu"), repeats=repeats)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    common.add_common_flags(p)
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--micro-batches", type=int, default=4)
    p.add_argument("--steps", type=int, default=3)
    args = p.parse_args(argv)
    common.set_threads(args.threads)
    method = common.method_name((args.method or ["dgl_mlaan"])[0])
    arch = (args.arch or ["resnet32"])[0]
    k = common.mlaan_k(method, (args.modules or [8])[0])
    batch_size = (args.batch_size or [64])[0]
    torch.set_num_threads(1)
    scheme, times = objective_times(method, arch, k, batch_size // args.micro_batches)
    backbone, _ = common.build(method, arch, k)
    ends = [m.output_name for m in mf.split(backbone, common.split_for(arch, backbone, k))]
    owner = mfd.balanced_owner(scheme, ends, args.ranks)
    plan = mfd.plan_modules(scheme, ends, owner, args.ranks)
    per_rank = [sum(t for t, r in zip(times, plan.rank_of_objective) if r == q) for q in range(args.ranks)]
    m = args.micro_batches
    predicted = m * sum(per_rank) / (sum(per_rank) + (m - 1) * max(per_rank))
    result = {**common.environment(sys.argv), "method": method, "arch": arch, "modules": k,
              "batch_size": batch_size, "ranks": args.ranks, "micro_batches": m, "module_owner": owner,
              "objective_seconds_per_micro_batch": dict(zip([o.name for o in scheme], times)),
              "rank_seconds_per_micro_batch": per_rank, "predicted_module_parallel_speedup": predicted}
    opt = common.optimizer()
    single = mf.step(scheme, opt)
    ts = mf.init(scheme, opt, seed=0)
    batch = common.cifar_batch(batch_size, "cpu")
    ts, _ = single(ts, batch)
    with track_memory() as meter:
        single(ts, batch)
    result["single_process_peak_step_bytes"] = meter.peak_bytes
    with tempfile.TemporaryDirectory() as tmp:
        for mode in ("modules", "data"):
            mp.spawn(worker, args=(args.ranks, free_port(), method, arch, k, batch_size, m, args.steps, mode, tmp),
                     nprocs=args.ranks, join=True)
            result[f"{mode}_parallel"] = [json.load(open(os.path.join(tmp, f"{mode}-{r}.json")))
                                          for r in range(args.ranks)]
    for mode in ("modules", "data"):
        for row in result[f"{mode}_parallel"]:
            print(f"{mode:8s} rank {row['rank']}: {row['step_s']:.2f} s/step, peak "
                  f"{row['peak_step_bytes'] / 2**20:.1f} MiB"
                  + (f", busy {row['busy_fraction']:.2f}" if "busy_fraction" in row else ""), file=sys.stderr)
    print(f"predicted module-parallel speedup on {args.ranks} devices: {predicted:.2f}x", file=sys.stderr)
    common.write_json(args.json or common.RESULTS / "distributed.json", result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
