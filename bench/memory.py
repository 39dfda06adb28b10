"""Memory of one training step: peak live tensor bytes (docs/design.md §6), per scheme, next to
E2E's and E2E with per-block gradient checkpointing, plus persistent bytes.

    python bench/memory.py                          # ResNet-32, batch 128, K = 16 (15 for MLAAN)
    python bench/memory.py --method dgl --modules 8 --batch-size 1024 --json /tmp/m.json
    python bench/memory.py --full                   # the whole grid (ResNet-32/110, K, batch 128/1024)
    python bench/memory.py --arch resnet101 --modules 4 --batch-size 2 --remat off   # ImageNet, 224×224
    python bench/memory.py --budgets                # mf.step(memory_budget=): the budget table and targets

The peak counts every storage created during the step (activations, gradients, temporaries,
the new parameters and optimizer state of the pure update) and frees it when it dies; what
existed before (parameters, inputs) is not counted. Each scheme is measured on its second
step, after a warm-up step. ``largest_objective_peak_bytes`` is the peak of the largest single
objective measured alone on the same input (plus that input's bytes, which a step allocates),
to check that the engine holds no more than the largest objective needs.

``--budgets`` measures ``mf.step(..., memory_budget=)`` (``mlaan_func.train.budget``): for
MLAAN K = 15 a table of budgets (fractions of its no-remat peak, from 1.0 down to the smallest
reachable) against the measured peak, the planner's prediction and the step time over the
no-remat step's (interleaved rounds, ``speed.ratio``); for each scheme of the targets its
no-remat and smallest reachable peaks over E2E's, with that plan's step-time ratio. On CUDA
(``--device cuda``) each row also has ``peak_cuda_bytes`` (``memory.cuda_peak``, the caching
allocator's ``max_memory_allocated`` over the step) beside the live-tensor count.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

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


BUDGET_TARGETS = {("dgl", 16): 0.12, ("infopro", 16): 0.20, ("mlaan", 15): 0.22, ("dgl_mlaan", 15): 0.22,
                  ("infopro_mlaan", 15): 0.22}
"""Issue #24's targets: peak step bytes over E2E's (at <= 1.35x the no-remat step time)."""
BUDGET_FRACTIONS = (1.0, 0.8, 0.6, 0.5)


def cuda_step_peak(step, ts, batch) -> int | None:
    """``max_memory_allocated`` over one step (after the warm-up ``step_peak`` ran), or ``None`` off CUDA."""
    _, report = mf.memory.cuda_peak(step, ts, batch)
    return None if report is None else report.peak_bytes


def timed_runner(step, ts, batch):
    holder = {"ts": ts}

    def run():
        holder["ts"], _ = step(holder["ts"], batch)
    return run


def budget_row(scheme, opt, ts, batch, budget, plain, repeats: int) -> dict:
    """One budget: the plan it chose, its measured peak (live tensors; CUDA where there) and its
    step time over the no-remat step's."""
    from speed import ratio

    step = mf.step(scheme, opt, memory_budget=budget)
    step(ts, batch)  # plans on this batch
    plan = step.plan
    row = {"budget": budget, "budget_bytes": plan.budget_bytes, "form": plan.form, "modes": dict(plan.modes),
           "predicted_peak_bytes": plan.predicted_peak_bytes, "no_remat_peak_bytes": plan.no_remat_peak_bytes,
           "floor_bytes": plan.floor_bytes, "flops_ratio": plan.recompute, "plan": str(plan),
           "peak_set_by": plan.binding, "segment_peaks": dict(plan.segment_peaks),
           "peak_step_bytes": step_peak(step, ts, batch), "peak_cuda_bytes": cuda_step_peak(step, ts, batch)}
    r = ratio(timed_runner(step, ts, batch), timed_runner(plain, ts, batch), repeats, 1)
    row.update(time_ratio=r["ratio"], time_ratio_min=r["ratio_min"], time_ratio_max=r["ratio_max"],
               step_s=r["a_median_s"], no_remat_step_s=r["b_median_s"], repeats=repeats)
    return row


def budgets(args) -> int:
    """``--budgets``: the budget table (MLAAN K = 15) and the targets (see the module docstring)."""
    arch, batch_size, repeats = "resnet32", (args.batch_size or [128])[0], 2 if args.quick else 3
    loads = [Path("/proc/loadavg").read_text().split()[:3]] if Path("/proc/loadavg").exists() else []
    methods = [common.method_name(m) for m in (args.method or [m for m, _ in BUDGET_TARGETS])]
    batch = common.arch_batch(arch, batch_size, args.device)
    opt = common.optimizer()
    _, e2e = common.build("e2e", arch, 1)
    e2e_peak = step_peak(mf.step(e2e, opt), mf.init(e2e, opt, seed=0, device=args.device), batch)
    table, targets = [], []
    for method in methods:
        k = (args.modules or [dict(BUDGET_TARGETS).get(method, 16)])[0]
        k = common.mlaan_k(method, k, arch)
        _, scheme = common.build(method, arch, k)
        ts = mf.init(scheme, opt, seed=0, device=args.device)
        plain = mf.step(scheme, opt)
        no_remat = step_peak(plain, ts, batch)
        rows = []
        for fraction in BUDGET_FRACTIONS if method == "mlaan" else ():
            try:
                rows.append(budget_row(scheme, opt, ts, batch, fraction, plain, repeats))
            except mf.errors.MemoryBudgetError:
                break
        if rows:
            floor = rows[0]["floor_bytes"]
        else:
            probe = mf.step(scheme, opt, memory_budget=1.0)
            probe(ts, batch)
            floor = probe.plan.floor_bytes
        rows.append(budget_row(scheme, opt, ts, batch, floor, plain, repeats))
        for r in rows:
            r.update(method=method, arch=arch, modules=k, batch_size=batch_size,
                     ratio_to_e2e=r["peak_step_bytes"] / e2e_peak)
            print(f"{method:14s} K={k} budget {r['budget_bytes'] / 2**20:7.1f} MiB -> peak "
                  f"{r['peak_step_bytes'] / 2**20:7.1f} MiB (predicted {r['predicted_peak_bytes'] / 2**20:7.1f}) "
                  f"= {r['ratio_to_e2e']:.3f} x E2E, time x{r['time_ratio']:.2f} ({r['form']})", file=sys.stderr)
        if method == "mlaan":
            table = rows
        floor_row = rows[-1]
        targets.append({"method": method, "arch": arch, "modules": k, "batch_size": batch_size,
                        "no_remat_peak_step_bytes": no_remat, "no_remat_ratio_to_e2e": no_remat / e2e_peak,
                        "floor_peak_step_bytes": floor_row["peak_step_bytes"],
                        "floor_ratio_to_e2e": floor_row["ratio_to_e2e"], "floor_time_ratio": floor_row["time_ratio"],
                        "floor_time_ratio_min": floor_row["time_ratio_min"],
                        "floor_time_ratio_max": floor_row["time_ratio_max"], "floor_plan": floor_row["plan"],
                        "floor_peak_set_by": floor_row["peak_set_by"],
                        "peak_cuda_bytes": floor_row["peak_cuda_bytes"],
                        "target": BUDGET_TARGETS.get((method, k))})
    loads += [Path("/proc/loadavg").read_text().split()[:3]] if loads else []
    payload = {**common.environment(sys.argv), "loadavg": [" ".join(x) for x in loads], "e2e_peak_step_bytes": e2e_peak,
               "table": table, "targets": targets}
    common.write_json(args.json or common.RESULTS / "memory_budget.json", payload)
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    common.add_common_flags(p)
    p.add_argument("--budgets", action="store_true",
                   help="the memory-budget table and targets (mf.step(memory_budget=))")
    args = p.parse_args(argv)
    common.set_threads(args.threads)
    common.quick_defaults(args)
    if args.budgets:
        return budgets(args)
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
