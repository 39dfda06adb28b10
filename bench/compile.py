"""Compiled steps: first-step seconds (compile included), the number of compiled graphs, the
compiled/eager speed-up (interleaved in one run) and the compiled gradients' distance from
eager, for the shared step's block kernels (``compile=True``, the default engine) and,
with ``--engine per_objective``, the per-objective engine (one graph per objective).

    python bench/compile.py                                  # dgl K=16 and mlaan K=15, inductor, batch 128
    python bench/compile.py --count-only --modules 4 --modules 8 --modules 15   # graphs vs K (no inductor)
    python bench/compile.py --method dgl --modules 16 --engine per_objective
    python bench/compile.py --layout channels_last --layout contiguous   # both layouts of the compiled step

``--layout channels_last`` runs the compiled step with ``memory_format=torch.channels_last``
(``mlaan_func.core.layout``; the default, ``contiguous``, is the layout eager uses), and every
row also times the eager step in channels-last against eager (``eager_channels_last_speedup``),
so the table shows what the layout gives and what compiling gives.

Graphs are dynamo's (one per compiled frame variant); inductor compiles a forward and a
backward for each.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

if "--warm-cache" not in sys.argv:  # a cold start: inductor's on-disk caches in a fresh folder
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="mlaan_func_inductor_")

import torch

sys.path.insert(0, __import__("os").path.dirname(__file__))
import common  # noqa: E402
from flops import build_released  # noqa: E402
from speed import ratio  # noqa: E402

import mlaan_func as mf  # noqa: E402

DEFAULT_CASES = [("dgl", 16), ("mlaan", 15)]


def counting(backend: str):
    """A dynamo backend that counts the graphs it is given, then hands them to ``backend``."""
    inner = torch._dynamo.lookup_backend(backend)
    count = {"graphs": 0}

    def compiler(gm, example_inputs):
        count["graphs"] += 1
        return inner(gm, example_inputs)

    return compiler, count


def relative_error(got: dict, want: dict) -> float:
    """The largest per-tensor relative distance (docs/design.md §5)."""
    return max(float((got[k].double() - want[k].double()).norm() / want[k].double().norm().clamp_min(1e-12))
               for k in want)


LAYOUTS = {"contiguous": None, "channels_last": torch.channels_last}


def measure(method: str, k: int, engine: str, backend: str, batch_size: int, repeats: int,
            count_only: bool, device: str, layout: str = "contiguous") -> dict:
    torch._dynamo.reset()
    scheme, released = build_released(method, "resnet32", k)
    compiler, count = counting("eager" if count_only else backend)
    share = None if engine == "shared" else False
    compiled = mf.gradients(scheme, compile=True, backend=compiler, share=share, memory_format=LAYOUTS[layout])
    eager = mf.gradients(scheme)
    ts = mf.init(scheme, common.optimizer(), seed=0, device=device)
    batch = common.cifar_batch(batch_size, device)
    tic = time.perf_counter()
    got = compiled(ts, batch)
    first = time.perf_counter() - tic
    graphs_first = count["graphs"]
    want = eager(ts, batch)
    row = {"method": method, "modules": k, "engine": engine, "backend": "eager (count only)" if count_only else backend,
           "layout": layout,
           "batch_size": batch_size, "released_trunks": released, "objectives": len(scheme),
           "graphs": graphs_first, "first_step_s": first,
           "gradient_rel_error": relative_error(got.grads, want.grads)}
    if not count_only:  # float32 rounding distance: both against float64
        ts64 = mf.init(scheme, common.optimizer(), seed=0, device=device, dtype=torch.float64)
        exact = mf.gradients(scheme)(ts64, (batch[0].double(), batch[1])).grads
        row.update(compiled_vs_float64=relative_error(got.grads, exact),
                   eager_vs_float64=relative_error(want.grads, exact))
    if not count_only:
        r = ratio(lambda: compiled(ts, batch), lambda: eager(ts, batch), repeats, 1)
        row.update(repeats=repeats, compiled_step_s=r["a_median_s"], eager_step_s=r["b_median_s"],
                   speedup=1 / r["ratio"], speedup_min=1 / r["ratio_max"], speedup_max=1 / r["ratio_min"])
        eager_cl = mf.gradients(scheme, memory_format=torch.channels_last)
        r = ratio(lambda: eager_cl(ts, batch), lambda: eager(ts, batch), repeats, 1)
        row.update(eager_channels_last_speedup=1 / r["ratio"])
    row["graphs_after_all_steps"] = count["graphs"]
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    common.add_common_flags(p)
    p.add_argument("--engine", action="append", choices=("shared", "per_objective"))
    p.add_argument("--backend", default="inductor")
    p.add_argument("--layout", action="append", choices=tuple(LAYOUTS),
                   help="the compiled step's layout (repeatable; default: contiguous, the library's default)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--count-only", action="store_true", help="count graphs with the eager backend (seconds)")
    p.add_argument("--warm-cache", action="store_true", help="keep inductor's usual on-disk caches (default: cold)")
    args = p.parse_args(argv)
    common.set_threads(args.threads)
    batch_size = (args.batch_size or [128])[0]
    methods = [common.method_name(m) for m in args.method] if args.method else None
    if methods or args.modules:
        cases = [(m, common.mlaan_k(m, k)) for m in (methods or ["dgl", "mlaan"]) for k in (args.modules or [16])]
    else:
        cases = DEFAULT_CASES
    rows = []
    for method, k in cases:
        for engine, layout in ((e, lay) for e in args.engine or ["shared"] for lay in args.layout or ["contiguous"]):
            row = measure(method, k, engine, args.backend, batch_size, args.repeats, args.count_only, args.device,
                          layout)
            rows.append(row)
            print(f"{method:14s} K={k:<3d} {engine:13s} {row['layout']:13s} graphs {row['graphs']:3d} "
                  f"first step {row['first_step_s']:7.1f}s"
                  + (f" speed-up {row['speedup']:.2f} [{row['speedup_min']:.2f}, {row['speedup_max']:.2f}]"
                     f" (eager channels-last {row['eager_channels_last_speedup']:.2f})"
                     if "speedup" in row else "")
                  + f" rel. error {row['gradient_rel_error']:.1e}"
                  + (f" (vs float64: compiled {row['compiled_vs_float64']:.1e}, eager {row['eager_vs_float64']:.1e})"
                     if "eager_vs_float64" in row else ""), file=sys.stderr, flush=True)
    payload = {**common.environment(sys.argv), "rows": rows}
    common.write_json(args.json or common.RESULTS / "compile.json", payload)
    return 0


if __name__ == "__main__":
    sys.exit(main())
