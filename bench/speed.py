"""Step time as ratios taken in one run: each scheme vs E2E on the same batch, the library vs a
plain nn.Module + .backward() implementation of the same scheme (framework overhead),
rematerialised vs plain, and compiled vs eager.

    python bench/speed.py                          # ResNet-32, batch 128, K = 16 (15 for MLAAN), eager
    python bench/speed.py --method dgl --modules 8 --repeats 9 --json /tmp/s.json
    python bench/speed.py --method e2e --compile   # adds compiled vs eager (inductor)

Timings are interleaved (A, B, A, B, ...) after warm-up, so a ratio is taken on neighbouring
steps of a shared, noisy machine; each row gives the median ratio and its spread (min, max
over repeats).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

sys.path.insert(0, __import__("os").path.dirname(__file__))
import common  # noqa: E402

import mlaan_func as mf  # noqa: E402


def timed(fn) -> float:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t = time.perf_counter()
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - t


def library_runner(scheme, device, batch, compile=False):
    opt = common.optimizer()
    step = mf.step(scheme, opt, compile=compile)
    holder = {"ts": mf.init(scheme, opt, seed=0, device=device)}

    def run():
        holder["ts"], _ = step(holder["ts"], batch)
    return run, holder


def plain_runner(scheme, device, batch):
    ts = mf.init(scheme, common.optimizer(), seed=0, device=device)
    plain = common.PlainScheme(scheme, ts, device)
    return lambda: plain.step(batch)


def ratio(a, b, repeats: int, warmup: int) -> dict:
    """Interleaved timings of ``a`` and ``b``; the ratio a/b per repeat, summarised."""
    for _ in range(warmup):
        a()
        b()
    ta, tb = [], []
    for _ in range(repeats):
        ta.append(timed(a))
        tb.append(timed(b))
    ratios = [x / y for x, y in zip(ta, tb)]
    return {"ratio": statistics.median(ratios), "ratio_min": min(ratios), "ratio_max": max(ratios),
            "a_median_s": statistics.median(ta), "b_median_s": statistics.median(tb)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    common.add_common_flags(p)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--compile", action="store_true", help="also time torch.compile (inductor) vs eager")
    p.add_argument("--no-plain", action="store_true", help="skip the plain nn.Module baseline")
    args = p.parse_args(argv)
    common.set_threads(args.threads)
    common.quick_defaults(args)
    if args.quick:
        args.repeats = 2
    methods = [common.method_name(m) for m in (args.method or common.METHODS)]
    arch = (args.arch or ["resnet32"])[0]
    batch_size = (args.batch_size or [128])[0]
    ks = args.modules or common.default_modules(arch)
    batch = common.cifar_batch(batch_size, args.device)
    rows = []
    _, e2e = common.build("e2e", arch, 1)
    e2e_run, _ = library_runner(e2e, args.device, batch)
    for method in methods:
        for k in ([1] if method == "e2e" else ks):
            kk = common.mlaan_k(method, k)
            _, scheme = common.build(method, arch, kk, head=args.head)
            row = {"method": method, "arch": arch, "modules": kk, "batch_size": batch_size,
                   "device": args.device, "repeats": args.repeats}
            lib, _ = library_runner(scheme, args.device, batch)
            r = ratio(lib, e2e_run, args.repeats, args.warmup)
            row.update(step_s=r["a_median_s"], e2e_step_s=r["b_median_s"], vs_e2e=r["ratio"],
                       vs_e2e_min=r["ratio_min"], vs_e2e_max=r["ratio_max"])
            if not args.no_plain:
                r = ratio(lib, plain_runner(scheme, args.device, batch), args.repeats, args.warmup)
                row.update(plain_step_s=r["b_median_s"], overhead=r["ratio"], overhead_min=r["ratio_min"],
                           overhead_max=r["ratio_max"])
            if args.remat in ("on", "both") or (args.remat is None and method != "e2e"):
                _, rscheme = common.build(method, arch, kk, remat=True, head=args.head)
                rlib, _ = library_runner(rscheme, args.device, batch)
                r = ratio(rlib, lib, args.repeats, args.warmup)
                row.update(remat_step_s=r["a_median_s"], remat_vs_plain=r["ratio"],
                           remat_vs_plain_min=r["ratio_min"], remat_vs_plain_max=r["ratio_max"])
            if args.compile:
                t0 = time.perf_counter()
                clib, _ = library_runner(scheme, args.device, batch, compile=True)
                clib()
                row["compile_seconds"] = time.perf_counter() - t0
                r = ratio(lib, clib, args.repeats, args.warmup)
                row.update(compiled_step_s=r["b_median_s"], compiled_speedup=r["ratio"],
                           compiled_speedup_min=r["ratio_min"], compiled_speedup_max=r["ratio_max"])
            row["images_per_second"] = batch_size / row["step_s"]
            rows.append(row)
            print(f"{method:14s} K={kk:<3d} {row['step_s']:.3f}s/step = {row['vs_e2e']:.2f}x E2E "
                  f"[{row['vs_e2e_min']:.2f}, {row['vs_e2e_max']:.2f}]"
                  + (f", overhead {row['overhead']:.3f}x" if "overhead" in row else "")
                  + (f", remat {row['remat_vs_plain']:.2f}x" if "remat_vs_plain" in row else "")
                  + (f", compiled {row['compiled_speedup']:.2f}x" if "compiled_speedup" in row else ""),
                  file=sys.stderr)
    payload = {**common.environment(sys.argv), "rows": rows}
    common.write_json(args.json or common.RESULTS / "speed.json", payload)
    return 0


if __name__ == "__main__":
    sys.exit(main())
