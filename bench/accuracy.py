"""Test accuracy on real data, offline: Fashion-MNIST (Debian package ``dataset-fashion-mnist``,
files in /usr/share/datasets/fashion-mnist), per scheme, K and seed, with the spread over seeds.

    python bench/accuracy.py                        # 6 schemes, K = 2 4, seeds 0 1, 5000 images x 2 epochs
    python bench/accuracy.py --quick --json /tmp/a.json    # CI smoke run (< 60 s on 2 cores)
    python bench/accuracy.py --method dgl-mlaan --modules 4 --seeds 0 1 2 --epochs 5
    python bench/accuracy.py --full                 # 60k train images, 10 epochs, K = 2 4 8, 3 seeds (hours)
    python bench/accuracy.py --method e2e dgl hpff man man++ auglocal neuron-groups pgl --modules 4 \
        --json bench/results/accuracy_recipes.json  # the field's recipes (mlaan_func.schemes.RECIPES)
    python bench/accuracy.py --papers               # the papers' configuration (below; hours on 2 cores)
    python bench/accuracy.py --papers --method mlaan --staleness 0 1 \
        --json bench/results/accuracy_staleness.json  # MLAAN as a 2-rank pipeline streams it (below)

``--staleness S ...``: one run per S, trained by ``simulate_staleness`` (the declared-staleness
law of docs/design.md §5.1, bitwise what ``stale_pipeline_step`` computes) with the modules
of two ranks balanced by blocks (``balanced_owner``): the accuracy the streamed pipeline
would reach, measured in one process.

``--papers``: ResNet-32 on 3-channel 32×32 Fashion-MNIST (zero-padded by 2, grey copied to
three channels; augmentation pad 2 + crop 32 + flip); E2E; DGL (the released baseline's
``infopro_1c2f`` head) and InfoPro (published λ) at K = 16, InfoPro's split (stem alone);
MLAAN, DGL+MLAAN (DGL-paper head: the released wide head is beyond a CPU budget) and
InfoPro+MLAAN (λ by stage) at K = 15 with the released trunk tables; the InfoPro schemes with
both SupCon averagings (``--supcon-anchors``); first 10 000 training images, 2 epochs, seed 0.

Recipe (docs/design.md §2, Fashion-MNIST): SGD, Nesterov momentum 0.9, weight decay 1e-4, lr 0.1
with linear warm-up over a tenth of the steps then cosine to 0; pad 2 + crop 28 + flip;
normalised with the dataset's mean/std; the order of each epoch is drawn from (seed, epoch).
Every scheme is built by ``mf.schemes.build`` (the program's builder, with its defaults:
``neuron_groups`` with 2 groups, the data's mean/std for the heads that restore the image);
the recipes (``mf.schemes.RECIPES``) run at their defaults, outside the default preset.
A run reports the final test accuracy of the backbone's own classifier (objective "final"),
its training seconds and training images/s. Writes JSON (``--json``) and a Markdown table
next to it (same path, ``.md``), rewritten after every run.
"""

from __future__ import annotations

import argparse
import functools
import math
import statistics
import sys
import time
from pathlib import Path

import attrs
import einops
import torch
import torch.nn.functional as F

sys.path.insert(0, __import__("os").path.dirname(__file__))
import common  # noqa: E402

import mlaan_func as mf  # noqa: E402
from mlaan_func import data  # noqa: E402
from mlaan_func import distributed as mfd  # noqa: E402
from mlaan_func.parallel.staleness import simulate_staleness  # noqa: E402

DATASET = "fashion-mnist"
METHODS = common.METHODS + mf.schemes.RECIPES
"""The published schemes (the presets' rows), then the field's recipes (by --method)."""
ARCHS = {
    "resnet20-narrow": lambda n, c: mf.models.CifarResNet(20, num_classes=n, in_channels=c, widths=(8, 16, 32)),
    "resnet20": lambda n, c: mf.models.CifarResNet(20, num_classes=n, in_channels=c),
    "resnet32": lambda n, c: mf.models.resnet32(num_classes=n, in_channels=c),
    "resnet110": lambda n, c: mf.models.resnet110(num_classes=n, in_channels=c),
}

# Budgets: explicit flags override the preset.
DEFAULT = {"method": list(common.METHODS), "arch": ["resnet20-narrow"], "modules": [2, 4], "seeds": [0, 1],
           "epochs": 2, "train_size": 5000, "test_size": 10000}
QUICK = {"method": ["e2e", "mlaan"], "arch": ["resnet20-narrow"], "modules": [2], "seeds": [0],
         "epochs": 1, "train_size": 512, "test_size": 1000}
FULL = {"method": list(common.METHODS), "arch": ["resnet20-narrow"], "modules": [2, 4, 8], "seeds": [0, 1, 2],
        "epochs": 10, "train_size": 60000, "test_size": 10000}
PAPERS = {"method": ["e2e", "dgl", "mlaan", "infopro", "dgl_mlaan", "infopro_mlaan"], "arch": ["resnet32"],
          "modules": [], "seeds": [0], "epochs": 2, "train_size": 10000, "test_size": 10000,
          "supcon_anchors": ["all", "with_positive"], "dgl_head": "infopro_1c2f", "trunks": "released",
          "lambda_by": "stage", "rgb32": True}
PAPERS_K = {"dgl": 16, "infopro": 16, "mlaan": 15, "dgl_mlaan": 15, "infopro_mlaan": 15}
"""K per scheme in the papers' ResNet-32 tables (InfoPro's 16 with the stem alone, MLAAN's 15)."""
OPTION_DEFAULTS = {"supcon_anchors": ["all"], "dgl_head": "dgl", "trunks": "rule",
                   "lambda_by": "module", "rgb32": False}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--method", nargs="+", action="extend",
                   help=f"schemes ({', '.join(METHODS)}; - or _, man++); default: the six published ones")
    p.add_argument("--arch", nargs="+", action="extend", choices=list(ARCHS), help="default resnet20-narrow")
    p.add_argument("--modules", nargs="+", type=int, action="extend",
                   help="K values (e2e is always 1); default 2 4")
    p.add_argument("--seeds", nargs="+", type=int, action="extend", help="default 0 1")
    p.add_argument("--epochs", type=int)
    p.add_argument("--train-size", type=int, help="the first N of the 60k training images")
    p.add_argument("--test-size", type=int, help="the first N of the 10k test images")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--remat", action="store_true", help="apply mf.remat to each objective")
    p.add_argument("--staleness", nargs="+", type=int, action="extend",
                   help="train under the declared-staleness law of a 2-rank pipeline, one run per value")
    p.add_argument("--data-dir", default="data", help="looked in after /usr/share/datasets/fashion-mnist")
    p.add_argument("--json", default=str(common.RESULTS / "accuracy.json"))
    p.add_argument("--note", default="", help="a remark stored in the JSON and the table")
    p.add_argument("--supcon-anchors", nargs="+", choices=["all", "with_positive"], action="extend",
                   help="SupCon averaging(s) for infopro / infopro_mlaan, one run each (all: released)")
    p.add_argument("--dgl-head", choices=["dgl", "infopro_1c2f"], help="DGL's head (default dgl)")
    p.add_argument("--trunks", choices=["rule", "released"], help="MLAAN leap trunks (default rule)")
    p.add_argument("--lambda-by", choices=["module", "stage"], help="infopro_mlaan's λ interpolation")
    p.add_argument("--rgb32", action="store_true", default=None,
                   help="3-channel 32x32 input (zero-pad 2, copy grey to 3 channels)")
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--quick", action="store_true", help="tiny CI run: 512 images, 1 epoch, 2 schemes, 1 seed")
    budget.add_argument("--full", action="store_true", help="larger budget (hours on 2 CPU cores)")
    budget.add_argument("--papers", action="store_true", help="the papers' configuration (see above)")
    args = p.parse_args(argv)
    preset = QUICK if args.quick else FULL if args.full else PAPERS if args.papers else DEFAULT
    for key, value in {**OPTION_DEFAULTS, **preset}.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.method = list(dict.fromkeys(common.method_name(m) for m in args.method))
    bad = [m for m in args.method if m not in METHODS]
    if bad:
        p.error(f"unknown --method {bad}; choose from {', '.join(METHODS)}")
    unpublished = [m for m in args.method if m != "e2e" and m not in PAPERS_K]
    if not args.modules and unpublished:
        p.error(f"{unpublished} have no K of the papers' tables; give --modules")
    if min(args.modules, default=1) < 1 or args.epochs < 1 or args.batch_size < 1:
        p.error("--modules, --epochs and --batch-size must be positive")
    if args.train_size < args.batch_size:
        p.error(f"--train-size {args.train_size} is smaller than one batch ({args.batch_size})")
    return args


def split_points(arch: str, backbone: mf.Net, k: int) -> list[str]:
    """The published split for resnet32/110 when there is one, else K near-equal modules."""
    return mf.published.split_for(arch if arch in ("resnet32", "resnet110") else None, backbone.block_names, k)


def build(method: str, arch: str, k: int, dataset: data.Dataset, remat: bool, variant: dict | None = None,
          args=None):
    backbone = mf.from_module(ARCHS[arch](dataset.num_classes, dataset.channels))
    at = [] if method == "e2e" else split_points(arch, backbone, k)
    scheme_options = {k: v for k, v in (variant or {}).items() if k != "staleness"}  # staleness: how it trains
    options = {**scheme_options, "mean": dataset.mean, "std": dataset.std}   # build routes them (RESTORES_IMAGE)
    if method in ("infopro", "infopro_mlaan"):
        published = mf.infopro_lambda_table(method, arch, k) if arch in ("resnet32", "resnet110") else None
        options.update(lambdas=published or mf.schemes.DEFAULT_LAMBDAS)
    if args is not None and method == "dgl":
        options["head"] = args.dgl_head
    if args is not None and method == "infopro_mlaan":
        options["lambda_by"] = args.lambda_by
    if args is not None and method.endswith("mlaan") and args.trunks == "released":
        options["trunks"] = mf.published.leap_trunk_table(arch, k)
    scheme = mf.schemes.build(method, backbone, at, input_shape=dataset.image_shape, **options)
    return [mf.remat(o) for o in scheme] if remat else scheme, options.get("lambdas")


def rgb32(dataset: data.Dataset) -> data.Dataset:
    """28×28 grey images as 3-channel 32×32 ones (zero border of 2, grey copied), with the
    mean/std of the new training images."""
    def convert(x):
        return einops.repeat(F.pad(x, (2, 2, 2, 2)), "n 1 h w -> n c h w", c=3).contiguous()
    train_x = convert(dataset.train_x)
    mean, std = data.channel_stats(train_x)
    return attrs.evolve(dataset, train_x=train_x, test_x=convert(dataset.test_x), mean=mean, std=std)


RGB32_AUGMENT = functools.partial(data.augment, pad=2, crop=32, flip=True)


def test_batches(dataset: data.Dataset, batch_size: int):
    for i in range(0, len(dataset.test_y), batch_size):
        x = data.normalize(dataset.test_x[i:i + batch_size], dataset.mean, dataset.std)
        yield x, dataset.test_y[i:i + batch_size]


def train_and_test(method: str, arch: str, k: int, seed: int, dataset: data.Dataset, args,
                   variant: dict | None = None) -> dict:
    torch.manual_seed(seed)
    scheme, lambdas = build(method, arch, k, dataset, args.remat, variant, args)
    steps_per_epoch = data.num_batches(len(dataset.train_y), args.batch_size)
    total = steps_per_epoch * args.epochs
    warmup = max(1, total // 10)
    opt = mf.optim.sgd(mf.optim.warmup_cosine(args.lr, warmup, total), momentum=0.9, nesterov=True,
                       weight_decay=1e-4)
    ts = mf.init(scheme, opt, seed=seed, device=args.device)
    staleness = (variant or {}).get("staleness")
    if staleness is None:
        train_step = mf.step(scheme, opt)
    else:
        train_step = stale_step(scheme, opt, arch, k, dataset, staleness)
    start, loss = time.perf_counter(), float("nan")
    for epoch in range(args.epochs):
        for x, y in data.epoch_batches(dataset, args.batch_size, epoch, seed,
                                       augment=RGB32_AUGMENT if args.rgb32 else True):
            ts, metrics = train_step(ts, (x, y))
        loss = float(metrics["final"]["loss"])
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    start = time.perf_counter()
    accs = mf.evaluate(scheme, ts, test_batches(dataset, 512))
    return {"method": method, "arch": arch, "modules": 1 if method == "e2e" else k, "seed": seed,
            "variant": variant_label(method, variant, args), "objectives": len(scheme), "steps": total,
            **({"infopro_lambdas": list(lambdas)} if lambdas else {}),
            "test_accuracy": accs["final"], "final_train_loss": loss,
            "aux_test_accuracy": {n: a for n, a in accs.items() if n != "final"},
            "train_seconds": seconds, "eval_seconds": time.perf_counter() - start,
            "images_per_second": total * args.batch_size / seconds}


def stale_step(scheme, opt, arch: str, k: int, dataset: data.Dataset, staleness: int):
    """``(ts, batch) -> (ts, metrics)`` under the declared-staleness law of a 2-rank pipeline;
    the carry of what is in flight passes from step to step (chunking changes nothing)."""
    backbone = mf.from_module(ARCHS[arch](dataset.num_classes, dataset.channels))
    ends = [m.output_name for m in mf.split(backbone, split_points(arch, backbone, k))]
    owner = mfd.balanced_owner(scheme, ends, 2)
    run = simulate_staleness(scheme, opt, ends, owner, staleness)
    carry = {"carry": None}

    def train_step(ts, batch):
        ts, history, carry["carry"] = run(ts, [batch], carry["carry"])
        return ts, history[-1]

    return train_step


def variant_label(method: str, variant: dict | None, args) -> str:
    """What sets a run apart beyond (method, arch, K): head, trunks, λ, SupCon averaging."""
    parts = []
    if method == "dgl" and args.dgl_head != "dgl":
        parts.append(f"head {args.dgl_head}")
    if method.endswith("mlaan") and args.trunks != "rule":
        parts.append(f"{args.trunks} trunks")
    if method == "infopro_mlaan" and args.lambda_by != "module":
        parts.append(f"λ by {args.lambda_by}")
    if variant and "supcon_anchors" in variant:
        parts.append({"all": "SupCon: all anchors (released)",
                      "with_positive": "SupCon: anchors with a positive"}[variant["supcon_anchors"]])
    if variant and "staleness" in variant:
        parts.append(f"2-rank pipeline law, staleness {variant['staleness']}")
    return ", ".join(parts)


def summarise(runs: list[dict]) -> list[dict]:
    """Mean and spread over seeds per (method, arch, K, variant); std is the sample std (0 for
    one seed)."""
    groups: dict[tuple, list[dict]] = {}
    for r in runs:
        groups.setdefault((r["method"], r["arch"], r["modules"], r.get("variant", "")), []).append(r)
    rows = []
    order = lambda key: (key[1], METHODS.index(key[0]), key[2], key[3])  # noqa: E731
    for (method, arch, k, variant), rs in sorted(groups.items(), key=lambda kv: order(kv[0])):
        acc = [r["test_accuracy"] for r in rs]
        rows.append({"method": method, "arch": arch, "modules": k, "variant": variant,
                     "seeds": [r["seed"] for r in rs],
                     "mean_accuracy": statistics.fmean(acc),
                     "std_accuracy": statistics.stdev(acc) if len(acc) > 1 else 0.0,
                     "min_accuracy": min(acc), "max_accuracy": max(acc),
                     "images_per_second": statistics.fmean(r["images_per_second"] for r in rs),
                     "train_seconds": statistics.fmean(r["train_seconds"] for r in rs)})
    return rows


def markdown(payload: dict) -> str:
    c = payload["config"]
    lines = [f"# Fashion-MNIST test accuracy ({', '.join(c['arch'])}, {c['train_size']} train / "
             f"{c['test_size']} test images, {c['epochs']} epoch(s), batch {c['batch_size']})", "",
             f"`{payload['command']}` — {payload['machine']}, torch {payload['torch']}, {payload['date']}; "
             "accuracy of the backbone's final classifier after the last epoch, std over seeds "
             "(sample), images/s of training.", ""]
    if payload.get("note"):
        lines += [payload["note"], ""]
    multi_arch = len(c["arch"]) > 1
    variants = any(s.get("variant") for s in payload["summary"])
    head = (["arch"] if multi_arch else []) + ["method", "K"] + (["variant"] if variants else []) + [
        "seeds", "mean acc", "std", "min", "max", "images/s"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for s in payload["summary"]:
        cells = ([s["arch"]] if multi_arch else []) + [s["method"], str(s["modules"])] + (
            [s.get("variant", "")] if variants else []) + [
            " ".join(map(str, s["seeds"])), f"{s['mean_accuracy']:.4f}",
            f"{s['std_accuracy']:.4f}", f"{s['min_accuracy']:.4f}", f"{s['max_accuracy']:.4f}",
            f"{s['images_per_second']:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def write(path: str, payload: dict) -> None:
    common.write_json(path, payload)
    Path(path).with_suffix(".md").write_text(markdown(payload))


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        dataset = data.load(DATASET, args.data_dir, download=False)
    except data.DatasetError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    n, m = args.train_size, args.test_size
    dataset = attrs.evolve(dataset, train_x=dataset.train_x[:n], train_y=dataset.train_y[:n],
                           test_x=dataset.test_x[:m], test_y=dataset.test_y[:m])
    if args.rgb32:
        dataset = rgb32(dataset)
    dataset = dataset.to(args.device)
    args.train_size, args.test_size = len(dataset.train_y), len(dataset.test_y)
    config = {"dataset": DATASET, "method": args.method, "arch": args.arch, "modules": args.modules,
              "seeds": args.seeds, "epochs": args.epochs, "train_size": args.train_size,
              "test_size": args.test_size, "batch_size": args.batch_size, "lr": args.lr,
              "warmup": "a tenth of the steps", "momentum": 0.9, "nesterov": True, "weight_decay": 1e-4,
              "augmentation": data.AUGMENTATIONS[DATASET], "mean": dataset.mean, "std": dataset.std,
              "device": args.device, "remat": args.remat, "threads": torch.get_num_threads(),
              "supcon_anchors": args.supcon_anchors, "dgl_head": args.dgl_head, "trunks": args.trunks,
              "lambda_by": args.lambda_by, "rgb32": args.rgb32, "staleness": args.staleness,
              "preset": "quick" if args.quick else "full" if args.full else "papers" if args.papers else "default"}
    if args.rgb32:
        config["augmentation"] = {"pad": 2, "crop": 32, "flip": True}
    env = common.environment(sys.argv)
    env["machine"] = f"{env['machine']} {cpu_model()}".strip()
    payload = {**env, "config": config, "note": args.note, "runs": [], "summary": []}
    # Seed-major, so that a run cut short still covers every scheme.
    grid = [(m, a, k, s, v) for s in args.seeds for a in args.arch for m in args.method
            for k in ([1] if m == "e2e" else args.modules or [PAPERS_K[m]])
            for v in ([{"supcon_anchors": x} for x in args.supcon_anchors]
                      if m in ("infopro", "infopro_mlaan") else
                      [{"staleness": x} for x in args.staleness] if args.staleness else [None])]
    began = time.perf_counter()
    for i, (method, arch, k, seed, variant) in enumerate(grid, 1):
        run = train_and_test(method, arch, k, seed, dataset, args, variant)
        payload["runs"].append(run)
        payload["summary"] = summarise(payload["runs"])
        payload["wall_seconds"] = time.perf_counter() - began
        write(args.json, payload)
        print(f"[{i}/{len(grid)}] {method:14s} {arch} K={run['modules']} seed={seed} {run['variant']} "
              f"acc {run['test_accuracy']:.4f} loss {run['final_train_loss']:.3f} "
              f"{run['train_seconds']:.1f}s {run['images_per_second']:.0f} img/s "
              f"(eval {run['eval_seconds']:.1f}s)", file=sys.stderr, flush=True)
    bad = [r for r in payload["runs"] if not math.isfinite(r["final_train_loss"])]
    if bad:
        print(f"warning: {len(bad)} run(s) ended with a non-finite loss", file=sys.stderr)
    print(markdown(payload))
    return 0


if __name__ == "__main__":
    sys.exit(main())
