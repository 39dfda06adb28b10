"""The shared step against the per-objective engine on the same scheme: step time (interleaved
in one run, median ratio with its spread) and peak step bytes (docs/design.md §6), with and
without remat, for the summed-cotangent form (``share="sum"``) and the default
(bit-identical) one.

    python bench/shared.py                              # MLAAN family, ResNet-32, K = 15, batch 128
    python bench/shared.py --batch-size 32 --repeats 5 --json /tmp/s.json
    python bench/shared.py --what memory --remat both

Schemes with nothing to share (E2E, DGL, InfoPro) run the per-objective engine either way.
With remat the shared step rematerialises its pieces (``mlaan_func.train.execute``).
"""

from __future__ import annotations

import argparse
import sys

sys.path.insert(0, __import__("os").path.dirname(__file__))
import common  # noqa: E402
from flops import build_released  # noqa: E402
from memory import step_peak  # noqa: E402
from speed import ratio  # noqa: E402

import mlaan_func as mf  # noqa: E402
from mlaan_func.train.execute import use_shared  # noqa: E402


def runner(scheme, opt, batch, device, share):
    step = mf.step(scheme, opt, share=share)
    holder = {"ts": mf.init(scheme, opt, seed=0, device=device)}

    def run():
        holder["ts"], _ = step(holder["ts"], batch)
    return run


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    common.add_common_flags(p)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--what", choices=("time", "memory", "both"), default="both")
    args = p.parse_args(argv)
    common.set_threads(args.threads)
    common.quick_defaults(args)
    methods = [common.method_name(m) for m in (args.method or ["mlaan", "dgl_mlaan", "infopro_mlaan"])]
    arch = (args.arch or ["resnet32"])[0]
    batch_size = (args.batch_size or [128])[0]
    ks = args.modules or [16]
    remats = {"off": [False], "on": [True], "both": [False, True], None: [False]}[args.remat]
    batch = common.cifar_batch(batch_size, args.device)
    opt = common.optimizer()
    rows = []
    for method in methods:
        for k in ([1] if method == "e2e" else ks):
            kk = common.mlaan_k(method, k)
            for remat in remats:
                scheme, released = build_released(method, arch, kk)
                if remat:
                    scheme = [mf.remat(o) for o in scheme]
                shares = use_shared(scheme, share=None, compile=False)
                row = {"method": method, "arch": arch, "modules": kk, "batch_size": batch_size,
                       "remat": remat, "released_trunks": released, "shared_by_default": shares}
                if args.what in ("time", "both"):
                    r = ratio(runner(scheme, opt, batch, args.device, "sum"),
                              runner(scheme, opt, batch, args.device, False), args.repeats, args.warmup)
                    row.update(repeats=args.repeats, shared_step_s=r["a_median_s"],
                               per_objective_step_s=r["b_median_s"], time_ratio=r["ratio"],
                               time_ratio_min=r["ratio_min"], time_ratio_max=r["ratio_max"])
                    if shares:  # the default (bit-identical) shared step
                        r = ratio(runner(scheme, opt, batch, args.device, None),
                                  runner(scheme, opt, batch, args.device, False), args.repeats, args.warmup)
                        row.update(exact_step_s=r["a_median_s"], exact_time_ratio=r["ratio"],
                                   exact_time_ratio_min=r["ratio_min"], exact_time_ratio_max=r["ratio_max"])
                if args.what in ("memory", "both"):
                    ts = mf.init(scheme, opt, seed=0, device=args.device)
                    row["shared_peak_step_bytes"] = step_peak(mf.step(scheme, opt, share="sum" if shares else None),
                                                              ts, batch)
                    row["exact_peak_step_bytes"] = step_peak(mf.step(scheme, opt), ts, batch)
                    row["per_objective_peak_step_bytes"] = step_peak(mf.step(scheme, opt, share=False), ts, batch)
                    row["memory_ratio"] = row["shared_peak_step_bytes"] / row["per_objective_peak_step_bytes"]
                    row["exact_memory_ratio"] = row["exact_peak_step_bytes"] / row["per_objective_peak_step_bytes"]
                rows.append(row)
                print(f"{method:14s} K={kk:<3d} B={batch_size} remat={remat!s:5s} shared={shares!s:5s}"
                      + (f" time {row['time_ratio']:.3f} [{row['time_ratio_min']:.3f}, {row['time_ratio_max']:.3f}]"
                         f" ({row['shared_step_s']:.2f}s vs {row['per_objective_step_s']:.2f}s)"
                         if "time_ratio" in row else "")
                      + (f" exact time {row['exact_time_ratio']:.3f}" if "exact_time_ratio" in row else "")
                      + (f" memory {row['memory_ratio']:.3f} exact {row['exact_memory_ratio']:.3f} "
                         f"({row['shared_peak_step_bytes'] / 2**20:.1f} vs "
                         f"{row['per_objective_peak_step_bytes'] / 2**20:.1f} MiB)" if "memory_ratio" in row else ""),
                      file=sys.stderr, flush=True)
    payload = {**common.environment(sys.argv), "rows": rows}
    common.write_json(args.json or common.RESULTS / "shared.json", payload)
    return 0


if __name__ == "__main__":
    sys.exit(main())
