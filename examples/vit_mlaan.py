"""Train a small vision transformer on Fashion-MNIST with E2E, DGL and MLAAN at one budget.

    python examples/vit_mlaan.py --out runs/vit

Each scheme is one run of the main program (examples/cifar_mlaan.py) with ``--arch vit_mini``
(patch embedding, cls token, 6 pre-norm blocks of width 64), so every run writes the main
program's outputs under OUT/<method>/ (metrics.jsonl, summary.json, curves.png, checkpoint);
the same data, steps, batch size, learning rate and seed for all three. Fashion-MNIST is read
offline from /usr/share/datasets/fashion-mnist (``apt-get install dataset-fashion-mnist``).
Prints the test accuracy of each and writes OUT/summary.json.

Run time: about 12 minutes on a shared 2-core CPU (150 s, 147 s and 388 s of training for
e2e, dgl and mlaan, see docs/benchmarks.md), plus loading and evaluation. A stopped run
(Ctrl-C saves a checkpoint) continues with ``--resume``: finished schemes are re-read, the
stopped one continues from its checkpoint. ``--overwrite`` replaces an earlier run in OUT.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import cifar_mlaan  # noqa: E402  (the main program: its loop, outputs and flags)

METHODS = ("e2e", "dgl", "mlaan")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--arch", default="vit_mini", help="a ViT in mlaan_func.models")
    p.add_argument("--modules", type=int, default=3, help="K for DGL and MLAAN (near-equal cost)")
    p.add_argument("--steps", type=int, default=100, help="training steps per scheme")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dataset", default="fashion-mnist", help="fashion-mnist, or synthetic for a smoke run")
    p.add_argument("--method", action="append", choices=METHODS, help="default: all three")
    p.add_argument("--out", default="runs/vit")
    p.add_argument("--json", default=None, help="also write the summary to this path")
    p.add_argument("--resume", action="store_true", help="continue a stopped run in OUT, scheme by scheme")
    p.add_argument("--overwrite", action="store_true", help="replace a run already in OUT")
    args = p.parse_args(argv)
    if args.resume and args.overwrite:
        p.error("--resume continues the run in --out and --overwrite replaces it: pass one of them")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    results = {}
    for method in args.method or METHODS:
        run = out / method
        if args.resume and (run / cifar_mlaan.CHECKPOINT).exists():
            again = ["--resume"]  # a finished scheme only rewrites its summary
        else:
            again = ["--overwrite"] if args.overwrite else []
        flags = [
            "--dataset", args.dataset, "--arch", args.arch, "--method", method,
            "--modules", str(args.modules), "--epochs", "1", "--max-steps", str(args.steps),
            "--subset", str(args.steps * args.batch_size), "--batch-size", str(args.batch_size),
            "--lr", str(args.lr), "--warmup-epochs", "0.2", "--seed", str(args.seed),
            "--out", str(run), "--no-progress", *again]
        try:
            code = cifar_mlaan.main(flags)
        except cifar_mlaan.ProgramError as err:
            print(f"error: {method}: {err}", file=sys.stderr)
            return err.code
        if code != 0:
            return code
        summary = json.loads((run / cifar_mlaan.SUMMARY).read_text())
        results[method] = {k: summary[k] for k in ("modules", "test_accuracy", "seconds", "peak_step_bytes")}
    for method, r in results.items():
        print(f"{method:6s} K={r['modules']}: test accuracy {r['test_accuracy']:.4f} "
              f"({r['seconds']:.0f} s, peak step {r['peak_step_bytes'] / 2**20:.1f} MiB)")
    summary = {"arch": args.arch, "dataset": args.dataset, "modules": args.modules, "steps": args.steps,
               "batch_size": args.batch_size, "lr": args.lr, "seed": args.seed,
               "command": " ".join(["python", "examples/vit_mlaan.py", *(sys.argv[1:] if argv is None else argv)]),
               "results": results}
    for path in [out / "summary.json"] + ([Path(args.json)] if args.json else []):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
