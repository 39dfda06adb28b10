"""Throughput of the streamed pipeline (``mfd.pipeline_step``) against one process and the
synchronous module-parallel step, on gloo processes on 127.0.0.1; interleaved rounds in one
run, each rank's busy fraction, and the pipeline's predicted throughput from per-module
(per-objective) times.

    python bench/pipeline.py                                   # dgl, ResNet-32, K=16, batch 128
    python bench/pipeline.py --balance blocks --steps 8 --rounds 3 --json /tmp/p.json
    python bench/pipeline.py --method mlaan --modules 15 --staleness 0 1 --json bench/results/pipeline_mlaan.json

``--balance measured`` (the default) gives each rank a run of modules by the measured seconds
of its objectives (``mfd.objective_seconds``); ``blocks`` by the blocks they run.

``--staleness s ...`` runs the pipeline under declared staleness (``mfd.stale_pipeline_step``,
docs/design.md §5.1), one mode ``pipeline-s<s>`` each: the MLAAN family crosses ranks.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(__file__))
import common  # noqa: E402
from distributed import free_port, objective_times  # noqa: E402

import mlaan_func as mf  # noqa: E402
from mlaan_func import distributed as mfd  # noqa: E402


def batches(batch_size, steps):
    return [common.cifar_batch(batch_size, "cpu", seed=i) for i in range(steps)]


def one_process(method, arch, k, batch_size, steps, threads):
    """Images per second of ``mf.step`` over ``steps`` batches after one warm-up step."""
    torch.set_num_threads(threads)
    _, scheme = common.build(method, arch, k)
    opt = common.optimizer()
    step = mf.step(scheme, opt)
    ts = mf.init(scheme, opt, seed=0)
    data = batches(batch_size, steps)
    ts, _ = step(ts, data[0])
    t = time.perf_counter()
    for b in data:
        ts, _ = step(ts, b)
    return batch_size * steps / (time.perf_counter() - t)


def worker(rank, world, port, method, arch, k, batch_size, steps, mode, owner, out_dir, depth=2):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    backbone, scheme = common.build(method, arch, k)
    opt = common.optimizer()
    ts = mf.init(scheme, opt, seed=0)
    ends = [m.output_name for m in mf.split(backbone, common.split_for(arch, backbone, k))]
    data, stats = batches(batch_size, steps), {}
    if mode == "sync":
        step = mfd.module_parallel_step(scheme, opt, ends, micro_batches=4, owner=owner, stats=stats)
        ts, _ = step(ts, data[0])
        stats.clear()
        dist.barrier()
        t = time.perf_counter()
        for b in data:
            ts, _ = step(ts, b)
    elif mode == "pipeline":
        run = mfd.pipeline_step(scheme, opt, ends, owner=owner, depth=depth, stats=stats)
        ts, _ = run(ts, data[:1])
        stats.clear()
        dist.barrier()
        t = time.perf_counter()
        ts, _ = run(ts, data)
    else:  # pipeline-s<staleness>
        run = mfd.stale_pipeline_step(scheme, opt, ends, staleness=int(mode.split("-s")[1]), owner=owner,
                                      stats=stats)
        ts, _, carry = run(ts, data[:1])
        stats.clear()
        dist.barrier()
        t = time.perf_counter()
        ts, _, carry = run(ts, data, carry)
    dist.barrier()
    seconds = time.perf_counter() - t
    row = {"rank": rank, "images_per_s": batch_size * steps / seconds,
           "busy_fraction": stats["busy_s"] / max(stats["busy_s"] + stats["wait_s"], 1e-9)}
    with open(os.path.join(out_dir, f"{mode}-{rank}.json"), "w") as f:
        json.dump(row, f)
    dist.destroy_process_group()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--method", default="dgl")
    p.add_argument("--arch", default="resnet32")
    p.add_argument("--modules", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--steps", type=int, default=16, help="timed steps per run (the pipeline fills once per run)")
    p.add_argument("--balance", choices=("measured", "blocks"), default="measured")
    p.add_argument("--owner", type=int, nargs="+", default=None,
                   help="the rank of each module, instead of balancing (e.g. 0 0 0 0 0 0 0 1 1 1 1 1 1 1 1 1)")
    p.add_argument("--depth", type=int, default=2, help="outstanding sends per boundary of the pipeline")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--staleness", type=int, nargs="*", default=None,
                   help="declared staleness values to run (stale_pipeline_step) instead of pipeline_step")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    pipelines = ["pipeline"] if args.staleness is None else [f"pipeline-s{s}" for s in args.staleness]
    method, arch, k, n, world = common.method_name(args.method), args.arch, args.modules, args.batch_size, 2
    torch.set_num_threads(1)
    scheme, times = objective_times(method, arch, k, n)
    backbone, _ = common.build(method, arch, k)
    ends = [m.output_name for m in mf.split(backbone, common.split_for(arch, backbone, k))]
    owner = args.owner or mfd.balanced_owner(scheme, ends, world, times if args.balance == "measured" else None)
    plan = mfd.plan_modules(scheme, ends, owner, world)
    per_rank = [sum(t for t, r in zip(times, plan.rank_of_objective) if r == q) for q in range(world)]
    load_before = open("/proc/loadavg").read().split()[:3]
    rounds: dict[str, list] = {"1p1t": [], "1p2t": [], "sync": [], **{m: [] for m in pipelines}}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.rounds):
            rounds["1p1t"].append(one_process(method, arch, k, n, args.steps, 1))
            rounds["1p2t"].append(one_process(method, arch, k, n, args.steps, 2))
            for mode in ("sync", *pipelines):
                mp.spawn(worker, args=(world, free_port(), method, arch, k, n, args.steps, mode, owner, tmp,
                                       args.depth),
                         nprocs=world, join=True)
                rounds[mode].append([json.load(open(os.path.join(tmp, f"{mode}-{r}.json"))) for r in range(world)])
    median = lambda xs: sorted(xs)[len(xs) // 2]  # noqa: E731
    throughput = {"1p1t": median(rounds["1p1t"]), "1p2t": median(rounds["1p2t"]),
                  **{m: median([min(r["images_per_s"] for r in rows) for rows in rounds[m]])
                     for m in ("sync", *pipelines)}}
    result = {**common.environment(sys.argv), "method": method, "arch": arch, "modules": k, "batch_size": n,
              "steps": args.steps, "rounds": args.rounds, "balance": "given" if args.owner else args.balance,
              "depth": args.depth, "module_owner": owner,
              "load_before": load_before, "load_after": open("/proc/loadavg").read().split()[:3],
              "images_per_s": throughput, "ratio_to_1p1t": {m: v / throughput["1p1t"] for m, v in throughput.items()},
              "busy_fraction": {m: [[r["busy_fraction"] for r in rows] for rows in rounds[m]] for m in ("sync", *pipelines)},
              "rank_seconds_per_batch": per_rank,
              "predicted_pipeline_images_per_s": n / max(per_rank),
              "predicted_ratio_to_1p1t": sum(per_rank) / max(per_rank), "raw": rounds}
    for m, v in throughput.items():
        print(f"{m:9s} {v:8.1f} img/s  {v / throughput['1p1t']:.2f}x", file=sys.stderr)
    print(f"predicted pipeline {n / max(per_rank):.1f} img/s ({sum(per_rank) / max(per_rank):.2f}x)", file=sys.stderr)
    common.write_json(args.json or common.RESULTS / "pipeline.json", result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
