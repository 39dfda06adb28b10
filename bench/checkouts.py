"""The same training step on two checkouts of mlaan_func, in one run: step time (ratio of
medians, rounds interleaved A B A B ...) and peak live step bytes (exact), per scheme.

    python bench/checkouts.py --base /path/to/old/checkout            # this checkout against it
    python bench/checkouts.py --base ../old --method mlaan --modules 15 --batch-size 128 --json /tmp/c.json

Schemes are ``bench/common.build`` of each checkout (ResNet-32, the rule's leap trunks).
Each measurement runs in a fresh process with ``PYTHONPATH`` set to one checkout, so the two
engines never share a process; the ratio ``this / base`` below 1 means this checkout is
faster or smaller. The gradients of both are written by each process and compared bitwise.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

WORKER = r'''
import json, os, sys, time
import torch
import mlaan_func as mf
from mlaan_func.memory import track_memory
sys.path.insert(0, os.path.join(os.getcwd(), "bench"))
import common
method, k, batch_size, steps, out, grads_path = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5], sys.argv[6]
torch.set_num_threads(1)
_, scheme = common.build(method, "resnet32", k)
opt = common.optimizer()
ts = mf.init(scheme, opt, seed=0)
g = torch.Generator().manual_seed(0)
batch = (torch.randn(batch_size, 3, 32, 32, generator=g), torch.randint(0, 10, (batch_size,), generator=g))
step = mf.step(scheme, opt)
ts1, _ = step(ts, batch)  # warm-up
times = []
for _ in range(steps):
    t = time.perf_counter()
    step(ts1, batch)
    times.append(time.perf_counter() - t)
with track_memory() as meter:
    step(ts1, batch)
from torch.utils._python_dispatch import TorchDispatchMode
class Reads(TorchDispatchMode):  # inline: an earlier checkout has no mlaan_func.host_reads
    count = 0
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        Reads.count += func is torch.ops.aten._local_scalar_dense.default
        return func(*args, **(kwargs or {}))
with Reads():
    step(ts1, batch)
torch.save(mf.gradients(scheme)(ts, batch).grads, grads_path)
json.dump({"median_s": sorted(times)[len(times) // 2], "peak_step_bytes": meter.peak_bytes,
           "host_reads": Reads.count}, open(out, "w"))
'''


def measure(checkout: Path, method: str, k: int, batch_size: int, steps: int, grads: Path) -> dict:
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as f:
        f.write(WORKER)
    out = grads.with_suffix(".json")
    env = {**os.environ, "PYTHONPATH": str(checkout), "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, f.name, method, str(k), str(batch_size), str(steps), str(out), str(grads)],
                   env=env, check=True, cwd=str(checkout))
    return json.loads(out.read_text())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base", required=True, help="the other checkout (its root folder)")
    p.add_argument("--method", action="append", help="scheme (repeatable); default mlaan, dgl")
    p.add_argument("--modules", type=int, default=16, help="K (16: 15 for the MLAAN family, as published)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--steps", type=int, default=5, help="timed steps per round")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds per checkout")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    import torch

    base, this = Path(args.base).resolve(), ROOT
    rows = []
    with tempfile.TemporaryDirectory() as d:
        for method in args.method or ["mlaan", "dgl"]:
            k = 1 if method == "e2e" else (15 if method.endswith("mlaan") and args.modules == 16 else args.modules)
            runs = {"base": [], "this": []}
            for r in range(args.rounds):
                for name, checkout in (("base", base), ("this", this)):
                    runs[name].append(measure(checkout, method, k, args.batch_size, args.steps,
                                              Path(d) / f"{name}-{method}-{r}.pt"))
            a = torch.load(Path(d) / f"this-{method}-0.pt")
            b = torch.load(Path(d) / f"base-{method}-0.pt")
            row = {"method": method, "modules": k, "batch_size": args.batch_size,
                   "this_median_s": statistics.median(x["median_s"] for x in runs["this"]),
                   "base_median_s": statistics.median(x["median_s"] for x in runs["base"]),
                   "this_peak_step_bytes": runs["this"][0]["peak_step_bytes"],
                   "base_peak_step_bytes": runs["base"][0]["peak_step_bytes"],
                   "this_host_reads": runs["this"][0]["host_reads"], "base_host_reads": runs["base"][0]["host_reads"],
                   "gradients_bitwise_equal": set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)}
            row["time_ratio"] = row["this_median_s"] / row["base_median_s"]
            row["time_ratios_per_round"] = [t["median_s"] / s["median_s"] for t, s in zip(runs["this"], runs["base"])]
            row["peak_ratio"] = row["this_peak_step_bytes"] / row["base_peak_step_bytes"]
            rows.append(row)
            print(json.dumps(row))
    if args.json:
        label = lambda path: subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=path,  # noqa: E731
                                            capture_output=True, text=True).stdout.strip() or str(path)
        Path(args.json).write_text(json.dumps({"base": str(base), "base_label": label(base), "this_label": label(this),
                                               "load_before": os.getloadavg()[0], "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
