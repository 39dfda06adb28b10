"""Memory of one training step: peak live tensor bytes (docs/design.md §6), per scheme, next to
E2E's and E2E with per-block gradient checkpointing, plus persistent bytes.

    python bench/memory.py                          # ResNet-32, batch 128, K = 16 (15 for MLAAN)
    python bench/memory.py --method dgl --modules 8 --batch-size 1024 --json /tmp/m.json
    python bench/memory.py --full                   # the whole grid (ResNet-32/110, K, batch 128/1024)
    python bench/memory.py --arch resnet101 --modules 4 --batch-size 2 --remat off   # ImageNet, 224×224

The peak counts every storage created during the step (activations, gradients, temporaries,
the new parameters and optimizer state of the pure update) and frees it when it dies; what
existed before (parameters, inputs) is not counted. Each scheme is measured on its second
step, after a warm-up step. ``largest_objective_peak_bytes`` is the peak of the largest single
objective measured alone on the same input (plus that input's bytes, which a step allocates),
to check that the engine holds no more than the largest objective needs.
"""

from __future__ import annotations

import argparse
import sys

import torch

sys.path.insert(0, __import__("os").path.dirname(__file__))
import common  # noqa: E402

import mlaan_func as mf  # noqa: E402
from mlaan_func.memory import persistent_bytes, track_memory  # noqa: E402


def step_peak(step, ts, batch) -> int:
    ts, _ = step(ts, batch)  # warm-up
    with track_memory() as meter:
        new, _ = step(ts, batch)
    del new
    return meter.peak_bytes


def objective_peaks(scheme, ts, batch) -> list[int]:
    """Each objective's gradient function alone, on the input the engine would give it."""
    routes = mf.engine.plan_routes(scheme)
    fns = mf.engine.gradient_fns(scheme, routes)
    b = mf.Batch(*batch)
    acts, peaks = {"input": b.x}, []
    for o, route, fn in zip(scheme, routes, fns):
        p = {k: ts.params[k] for k in o.param_names}
        x = acts[o.input_name]
        with track_memory() as meter:
            out = fn(p, ts.state, x, b)
        # In a step the input is itself an allocation of the step (except the batch).
        peaks.append(meter.peak_bytes + (0 if o.input_name == "input" else x.numel() * x.element_size()))
        for name, t in out[1][1][1].items():
            acts.setdefault(name, t)
        del out
    return peaks


def plain_peak(step_fn, batch) -> int:
    step_fn(batch)  # warm-up: allocates momentum buffers
    with track_memory() as meter:
        step_fn(batch)
    return meter.peak_bytes


def measure(method, arch, k, batch_size, remat, head, device, baselines) -> dict:
    backbone, scheme = common.build(method, arch, k, remat=remat, head=head)
    opt = common.optimizer()
    ts = mf.init(scheme, opt, seed=0, device=device)
    batch = common.arch_batch(arch, batch_size, device)
    row = {"method": method, "arch": arch, "modules": len(scheme) if method == "e2e" else k,
           "batch_size": batch_size, "remat": remat, "head": head or "default", "objectives": len(scheme)}
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    row["peak_step_bytes"] = step_peak(mf.step(scheme, opt), ts, batch)
    if device.startswith("cuda"):
        ts2, _ = mf.step(scheme, opt)(ts, batch)
        del ts2
        row["peak_cuda_bytes"] = torch.cuda.max_memory_allocated() - base
    row["largest_objective_peak_bytes"] = max(objective_peaks(scheme, ts, batch))
    row["persistent_bytes"] = persistent_bytes(ts)
    row["parameters"] = sum(v.numel() for v in ts.params.values())
    key = (arch, batch_size)
    if key not in baselines:
        _, e2e = common.build("e2e", arch, 1)
        ts_e2e = mf.init(e2e, opt, seed=0, device=device)
        baselines[key] = {
            "e2e_peak_step_bytes": step_peak(mf.step(e2e, opt), ts_e2e, batch),
            "checkpointed_e2e_peak_step_bytes": plain_peak(common.checkpointed_e2e_step(arch, device), batch),
            "plain_e2e_peak_step_bytes": plain_peak(common.plain_e2e_step(arch, device), batch),
        }
    row.update(baselines[key])
    row["ratio_to_e2e"] = row["peak_step_bytes"] / row["e2e_peak_step_bytes"]
    row["engine_over_largest_objective"] = row["peak_step_bytes"] / row["largest_objective_peak_bytes"]
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    common.add_common_flags(p)
    args = p.parse_args(argv)
    common.set_threads(args.threads)
    common.quick_defaults(args)
    methods = [common.method_name(m) for m in (args.method or common.METHODS)]
    archs = args.arch or (["resnet32", "resnet110"] if args.full else ["resnet32"])
    batches = args.batch_size or ([128, 1024] if args.full else [128])
    remats = {"off": [False], "on": [True], "both": [False, True], None: [False, True]}[args.remat]
    rows, baselines = [], {}
    for arch in archs:
        ks = args.modules or ({"resnet32": [2, 4, 8, 16], "resnet110": [8, 16, 32, 54]}.get(arch, [2, 4, 8])
                              if args.full else common.default_modules(arch))
        for batch_size in batches:
            for method in methods:
                for k in ([1] if method == "e2e" else ks):
                    kk = common.mlaan_k(method, k, arch)
                    heads = [args.head] if args.head else ([None, "dgl_wide"] if method == "dgl_mlaan" and
                                                          arch not in common.IMAGENET_ARCHS else [None])
                    for head in heads:
                        for remat in remats:
                            if head == "dgl_wide" and remat:
                                continue
                            row = measure(method, arch, kk, batch_size, remat, head, args.device, baselines)
                            rows.append(row)
                            print(f"{method:14s} {arch} K={kk:<3d} B={batch_size:<5d} remat={remat!s:5s} "
                                  f"head={row['head']:8s} peak {row['peak_step_bytes'] / 2**20:8.1f} MiB "
                                  f"= {row['ratio_to_e2e']:.3f} x E2E, engine/largest objective "
                                  f"{row['engine_over_largest_objective']:.3f}", file=sys.stderr)
    payload = {**common.environment(sys.argv), "rows": rows}
    common.write_json(args.json or common.RESULTS / "memory.json", payload)
    return 0


if __name__ == "__main__":
    sys.exit(main())
