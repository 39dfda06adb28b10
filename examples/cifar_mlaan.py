"""Train a CIFAR ResNet with any local-learning scheme: the main job of mlaan_func.

    python examples/cifar_mlaan.py --dataset fashion-mnist --method dgl-mlaan --modules 4 \\
        --epochs 1 --max-steps 100 --out runs/quick

Defaults reproduce the paper's CIFAR-10 recipe (SGD + Nesterov, lr 0.8, batch 1024, warm-up then
cosine, 400 epochs). Writes OUT/metrics.jsonl every epoch, OUT/checkpoint.pt atomically every
epoch, every few minutes and on SIGINT/SIGTERM, and OUT/summary.json + OUT/curves.png at the end.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import signal
import sys
import time
from pathlib import Path

import torch

import mlaan_func as mf
from mlaan_func import data as datasets
from mlaan_func import imagefolder
from mlaan_func.memory import persistent_bytes, track_memory

METHODS = ("e2e", "dgl", "infopro", "mlaan", "dgl_mlaan", "infopro_mlaan")
ARCHS = {"resnet32": mf.models.resnet32, "resnet110": mf.models.resnet110}
IMAGENET_ARCHS = {name: getattr(mf.models, name) for name in mf.models.imagenet_resnet.LAYOUTS}
ARCHS.update(IMAGENET_ARCHS)
DATASETS = ("cifar10", "svhn", "stl10", "fashion-mnist", "synthetic")
FOLDER_DATASETS = ("folder", "imagenet")  # read from DATA_DIR/train and DATA_DIR/val by a DataLoader
DATASETS += FOLDER_DATASETS
CHECKPOINT, SUMMARY, METRICS, CONFIG = "checkpoint.pt", "summary.json", "metrics.jsonl", "config.json"
TRAIN_LOG = "train_log.jsonl"
# The flags that define a run: a checkpoint from another configuration cannot be resumed.
IDENTITY = ("method", "arch", "modules", "dataset", "batch_size", "lr", "seed", "epochs", "max_steps",
            "val_fraction", "window", "ema_update", "remat", "precision", "subset", "synthetic_size",
            "warmup_epochs", "weight_decay", "parallel", "micro_batches")
IDENTITY += ("image_size",)


class UsageError(Exception):
    """A bad command line or environment: reported as one line, exit code 2."""


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--method", default="dgl_mlaan", help=f"scheme: {', '.join(METHODS)} (- or _)")
    p.add_argument("--arch", default="resnet32", help="resnet32, resnet110 (CIFAR) or resnet18 … resnet152 (ImageNet)")
    p.add_argument("--modules", type=int, default=15, help="K, the real number of modules")
    p.add_argument("--dataset", default="cifar10", help=f"one of {', '.join(DATASETS)}")
    p.add_argument("--data-dir", default="data", help="where datasets live or are downloaded to")
    p.add_argument("--epochs", type=int, default=400)
    p.add_argument("--max-steps", type=int, default=None, help="cap on steps per epoch (quick runs)")
    p.add_argument("--batch-size", type=int, default=None, help="default 1024 (STL-10: 128)")
    p.add_argument("--lr", type=float, default=None, help="peak learning rate, default 0.8 (STL-10: 0.1)")
    p.add_argument("--warmup-epochs", type=float, default=10)
    p.add_argument("--weight-decay", type=float, default=1e-4)
    p.add_argument("--window", type=int, default=None, help="MLAAN window width W (default per scheme)")
    p.add_argument("--ema-update", default="all", choices=("all", "last"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--compile", action="store_true", help="torch.compile each objective")
    p.add_argument("--precision", default="fp32", choices=("fp32", "bf16"))
    p.add_argument("--remat", action="store_true", help="rematerialise every objective (less memory)")
    p.add_argument("--val-fraction", type=float, default=0.0, help="hold out this much of train")
    p.add_argument("--out", default="runs/latest", help="output directory")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    p.add_argument("--overwrite", action="store_true", help="replace a run already in OUT")
    p.add_argument("--eval-only", action="store_true", help="evaluate the checkpoint in OUT")
    p.add_argument("--checkpoint-minutes", type=float, default=5.0)
    p.add_argument("--synthetic-size", type=int, default=2048, help="train images of --dataset synthetic")
    p.add_argument("--subset", type=int, default=None, help="use only the first N train (N/5 test) images")
    p.add_argument("--stop-after-steps", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--parallel", default=None, choices=("data", "modules"),
                   help="under torchrun: split each batch over ranks (data, the default) or give each "
                        "rank a run of modules (modules)")
    p.add_argument("--micro-batches", type=int, default=4, help="micro-batches per step with --parallel modules")
    p.add_argument("--dist-timeout", type=float, default=120.0, help="seconds before a silent rank is an error")
    p.add_argument("--json", default=None, help="also write the summary to this path")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--image-size", type=int, default=224, help="crop size of --dataset folder/imagenet")
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1),
                   help="loader processes of --dataset folder/imagenet (0: load in the main process)")
    p.add_argument("--channels-last", action="store_true", help="NHWC images and conv weights (faster on GPUs)")
    args = p.parse_args(argv)
    args.method = args.method.replace("-", "_").lower()
    args.dataset = args.dataset.replace("_", "-").lower()
    if args.method not in METHODS:
        raise UsageError(f"unknown --method {args.method!r}; choose one of {', '.join(METHODS)}")
    if args.arch not in ARCHS:
        raise UsageError(f"unknown --arch {args.arch!r}; choose one of {', '.join(ARCHS)}")
    if args.dataset not in DATASETS:
        raise UsageError(f"unknown --dataset {args.dataset!r}; choose one of {', '.join(DATASETS)}")
    if args.method == "e2e":
        args.modules = 1
    if args.modules < 1:
        raise UsageError(f"--modules must be at least 1, got {args.modules}")
    if args.batch_size is None:
        args.batch_size = 128 if args.dataset == "stl10" else 1024
    if args.lr is None:
        args.lr = 0.1 if args.dataset == "stl10" else 0.8
    if not 0 <= args.val_fraction < 1:
        raise UsageError(f"--val-fraction must be in [0, 1), got {args.val_fraction}")
    if args.epochs < 1 or args.batch_size < 1 or (args.max_steps is not None and args.max_steps < 1):
        raise UsageError("--epochs, --batch-size and --max-steps must be positive")
    if args.dataset in FOLDER_DATASETS and (args.val_fraction or args.subset):
        raise UsageError(f"--val-fraction and --subset are not supported with --dataset {args.dataset}: "
                         "its val/ folder is the held-out set; make a smaller folder instead")
    if args.workers < 0:
        raise UsageError(f"--workers must be 0 or more, got {args.workers}")
    return args


def split_points(arch: str, backbone: mf.Net, modules: int) -> list[str]:
    """The published split for ``arch``/K when there is one, else modules of near-equal size."""
    try:
        return mf.published.split_for(arch, backbone.block_names, modules)
    except ValueError as err:
        raise UsageError(str(err)) from None


def build_scheme(args, dataset) -> tuple[mf.Net, list]:
    shape = (dataset.channels, dataset.image_size, dataset.image_size)
    backbone = mf.from_module(ARCHS[args.arch](num_classes=dataset.num_classes, in_channels=dataset.channels))
    at = [] if args.method == "e2e" else split_points(args.arch, backbone, args.modules)
    options = {}
    if args.method in ("mlaan", "dgl_mlaan", "infopro_mlaan"):
        options = {"width": args.window, "ema_update": args.ema_update}
        if args.arch == "resnet32" and args.modules in (8, 15) or args.arch == "resnet110" and args.modules in (32, 54):
            options["trunks"] = mf.leap_trunk_table(args.arch, args.modules)
        if args.arch in IMAGENET_ARCHS:
            options.update(imagenet_mlaan_options(args))
    if args.method in ("infopro", "infopro_mlaan"):
        options.update(mean=dataset.mean, std=dataset.std,
                       lambdas=mf.infopro_lambda_table(args.method, args.arch, args.modules))
        if args.method == "infopro" and args.arch in IMAGENET_ARCHS:  # the released ImageNet heads, CE task
            options.update(head="imagenet", contrastive=False)
    try:
        scheme = mf.schemes.build(args.method, backbone, at, input_shape=shape, **options)
    except ValueError as err:
        raise UsageError(str(err)) from None
    if args.remat:
        scheme = [mf.remat(o) for o in scheme]
    return backbone, scheme


def imagenet_mlaan_options(args) -> dict:
    """The released MLAAN ImageNet configuration: windows of 3 modules, the released heads
    (``mlaan`` only) and the released leap-trunk table where one exists with distinct blocks."""
    options = {"width": args.window or min(3, args.modules)}
    if args.method == "mlaan":
        options["head"] = "imagenet"
    try:
        table = mf.leap_trunk_table(args.arch, args.modules)
    except ValueError:
        return options
    if all(len(set(row)) == len(row) for row in table):
        options["trunks"] = table
    return options


def batch_seed(seed: int, epoch: int, index: int) -> int:
    return (seed * 1_000_003 + epoch) * 1_000_033 + index


def epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    return torch.randperm(n, generator=torch.Generator().manual_seed(batch_seed(seed, epoch, -1)))


class Progress:
    """A one-line progress bar on stderr: loss, accuracy, images/s, ETA."""

    def __init__(self, total: int, label: str, enabled: bool):
        self.total, self.label, self.enabled = total, label, enabled and total > 0
        self.start, self.last = time.time(), 0.0

    def update(self, done: int, images: int, loss: float, acc: float) -> None:
        now = time.time()
        if not self.enabled or (now - self.last < 0.5 and done < self.total):
            return
        self.last = now
        elapsed = max(now - self.start, 1e-9)
        eta = elapsed / max(done, 1) * (self.total - done)
        width = 24
        bar = "#" * int(width * done / self.total)
        sys.stderr.write(f"\r{self.label} [{bar:<{width}}] {done}/{self.total} loss {loss:.3f} "
                         f"acc {acc:.3f} {images / elapsed:,.0f} img/s ETA {eta:,.0f}s ")
        if done >= self.total:
            sys.stderr.write("\n")
        sys.stderr.flush()


def agree_on_stop(signum):
    """All ranks stop at the same step when any of them was signalled."""
    import torch.distributed as dist

    flag = torch.tensor([0 if signum is None else int(signum)])
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return None if int(flag) == 0 else int(flag)


def load_data(args):
    try:
        if args.dataset in FOLDER_DATASETS:
            dataset = imagefolder.load_folder(args.data_dir, args.image_size, name=args.dataset,
                                              num_classes=1000 if args.dataset == "imagenet" else None)
        elif args.dataset == "synthetic":
            dataset = datasets.load("synthetic", args.data_dir, train_size=args.synthetic_size, seed=args.seed)
        else:
            dataset = datasets.load(args.dataset, args.data_dir)
    except datasets.DatasetError as err:
        raise UsageError(str(err)) from None
    return dataset


def prepare_out(args) -> Path:
    out = Path(args.out)
    has_run = (out / CHECKPOINT).exists() or (out / SUMMARY).exists() or (out / METRICS).exists()
    if args.eval_only or args.resume:
        if not (out / CHECKPOINT).exists():
            raise UsageError(f"no checkpoint in {out}: run without --resume/--eval-only first, "
                             "or point --out at the run's directory")
    elif has_run and not args.overwrite:
        raise UsageError(f"{out} already holds a run; pass --resume to continue it, --overwrite to "
                         "replace it, or choose another --out")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as err:
        raise UsageError(f"cannot write to --out {out}: {err.strerror}; choose a writable directory") from None
    if args.overwrite and not (args.resume or args.eval_only):
        for name in (CHECKPOINT, SUMMARY, METRICS, CONFIG, TRAIN_LOG, "curves.png"):
            if (out / name).exists():
                (out / name).unlink()
    return out


def check_config(out: Path, args) -> None:
    path = out / CONFIG
    mine = {k: getattr(args, k) for k in IDENTITY}
    if path.exists():
        saved = json.loads(path.read_text())
        diff = {k: (saved.get(k), v) for k, v in mine.items() if saved.get(k) != v}
        if diff and (args.resume or args.eval_only):
            first = ", ".join(f"--{k.replace('_', '-')} {a} (checkpoint) vs {b}" for k, (a, b) in diff.items())
            raise UsageError(f"the checkpoint in {out} is from a different configuration: {first}; "
                             "resume with the same flags or start a new --out")
    if not (args.resume or args.eval_only):
        path.write_text(json.dumps(mine, indent=1))


def evaluate_sets(scheme, ts, sets, batch_size, device, mean, std):
    results = {}
    for name, part in sets.items():
        if callable(part):  # a folder dataset: a function giving the batches
            results[name] = mf.evaluate(scheme, ts, part())
            continue
        x, y = part
        batches = ((datasets.normalize(x[i:i + batch_size].to(device), mean, std), y[i:i + batch_size].to(device))
                   for i in range(0, len(y), batch_size))
        results[name] = mf.evaluate(scheme, ts, batches)
    return results


def plot_curves(out: Path) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no curves.png (pip install matplotlib)", file=sys.stderr)
        return
    rows = [json.loads(line) for line in (out / METRICS).read_text().splitlines() if line.strip()]
    log = [json.loads(line) for line in (out / TRAIN_LOG).read_text().splitlines() if line.strip()] \
        if (out / TRAIN_LOG).exists() else []
    if not rows:
        return
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
    epochs = [r["epoch"] for r in rows]
    steps = [r["step"] for r in log]
    for name in (log[-1]["loss"] if log else {}):
        ax_loss.plot(steps, [r["loss"].get(name, math.nan) for r in log], label=name, lw=1)
    for name in rows[-1]["test_accuracy"]:
        ax_acc.plot(epochs, [r["test_accuracy"].get(name, math.nan) for r in rows], "o-", label=name)
    ax_loss.set(xlabel="step", ylabel="train loss (per objective)", yscale="log")
    ax_acc.set(xlabel="epoch", ylabel="test accuracy (per head)", ylim=(0, 1))
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
    ax_acc.legend(fontsize=6, ncol=2)
    ax_loss.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(out / "curves.png", dpi=120)
    plt.close(fig)


def start_distributed(args):
    """Join torchrun's process group when there is one; returns (rank, world)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        if args.parallel is not None:
            raise UsageError(f"--parallel {args.parallel} needs several processes: launch with "
                             "torchrun --nproc-per-node N examples/cifar_mlaan.py ...")
        return 0, 1
    from mlaan_func import distributed as mfd

    args.parallel = args.parallel or "data"
    if args.device == "cuda":
        args.device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
        torch.cuda.set_device(torch.device(args.device))
    rank, world = mfd.init_from_env(timeout_s=args.dist_timeout)
    mfd.check_same_config({k: getattr(args, k) for k in IDENTITY})
    if args.parallel == "data" and args.batch_size % world:
        raise UsageError(f"--batch-size {args.batch_size} does not split over {world} processes")
    if args.parallel == "modules" and world > args.modules:
        raise UsageError(f"{world} processes but only {args.modules} modules; use fewer processes")
    return rank, world


def on_rank0(rank: int, world: int, fn):
    """Run ``fn`` on rank 0; every rank raises the same UsageError if it failed."""
    error, result = None, None
    if rank == 0:
        try:
            result = fn()
        except UsageError as err:
            error = str(err)
    if world > 1:
        import torch.distributed as dist

        box = [error]
        dist.broadcast_object_list(box, src=0)
        error = box[0]
    if error is not None:
        raise UsageError(error)
    return result


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    rank, world = start_distributed(args)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda but no CUDA device is available; use --device cpu")
    out = Path(args.out)
    folder = args.dataset in FOLDER_DATASETS
    if folder:  # check the folder layout before anything is written
        dataset = load_data(args)
        if rank == 0:
            ignored = len(dataset.train.ignored) + len(dataset.val.ignored)
            print(f"{args.dataset} {args.data_dir}: {len(dataset.train.files)} train and {len(dataset.val.files)} val "
                  f"images in {dataset.num_classes} classes" + (f"; ignored {ignored} non-image files" if ignored else ""),
                  file=sys.stderr)
    on_rank0(rank, world, lambda: (prepare_out(args), check_config(out, args)))
    val = None
    if folder:
        # data parallel: each rank reads its own shard; module parallel: every rank the whole batch
        data_rank, data_world = (rank, world) if args.parallel == "data" else (0, 1)
        n_train = imagefolder.batches_per_epoch(dataset, args.batch_size, data_world) * args.batch_size
        loader_options = {"workers": args.workers, "pin_memory": device.type == "cuda"}
    else:
        dataset = load_data(args)
        train_x, train_y = dataset.train_x, dataset.train_y
        test_x, test_y = dataset.test_x, dataset.test_y
        if args.subset:
            train_x, train_y = train_x[:args.subset], train_y[:args.subset]
            test_x, test_y = test_x[:max(1, args.subset // 5)], test_y[:max(1, args.subset // 5)]
        if args.val_fraction > 0:
            order = torch.randperm(len(train_y), generator=torch.Generator().manual_seed(args.seed))
            n_val = max(1, int(len(train_y) * args.val_fraction))
            val = (train_x[order[:n_val]], train_y[order[:n_val]])
            train_x, train_y = train_x[order[n_val:]], train_y[order[n_val:]]
        train_x, train_y = train_x.to(device), train_y.to(device)
        n_train = len(train_y)
    mean, std = dataset.mean, dataset.std
    backbone, scheme = build_scheme(args, dataset)

    steps_per_epoch = n_train // args.batch_size
    if steps_per_epoch == 0:
        size = len(dataset.train.files) if folder else n_train
        raise UsageError(f"--batch-size {args.batch_size} is larger than the {size} training images")
    if args.max_steps:
        steps_per_epoch = min(steps_per_epoch, args.max_steps)
    total = steps_per_epoch * args.epochs
    warmup = min(int(args.warmup_epochs * steps_per_epoch), total - 1)
    optimizer = mf.optim.sgd(mf.optim.warmup_cosine(args.lr, warmup, total), momentum=0.9, nesterov=True,
                             weight_decay=args.weight_decay)
    if args.parallel == "data":
        from mlaan_func import distributed as mfd
        train_step = mfd.data_parallel_step(scheme, optimizer, compile=args.compile)
        if folder:  # the loader already gave this rank its shard
            train_step = functools.partial(train_step, sharded=True)
    elif args.parallel == "modules":
        from mlaan_func import distributed as mfd
        ends = [m.output_name for m in mf.split(backbone, split_points(args.arch, backbone, args.modules))]
        train_step = mfd.module_parallel_step(scheme, optimizer, ends, micro_batches=args.micro_batches)
    else:
        train_step = mf.step(scheme, optimizer, compile=args.compile)
    writer = rank == 0
    augment = None if folder else datasets.augmentation(dataset.name)
    skipped: list[int] = []

    def train_batches(epoch: int, start: int):
        """Epoch ``epoch``'s normalised training batches on the device, from batch ``start``."""
        if folder:
            loader = imagefolder.train_loader(dataset, args.batch_size, epoch, args.seed, start=start,
                                              rank=data_rank, world=data_world, **loader_options)
            yield from imagefolder.device_batches(loader, device, mean, std, skipped=skipped)
            return
        order = epoch_order(len(train_y), args.seed, epoch)
        for b in range(start, steps_per_epoch):
            idx = order[b * args.batch_size:(b + 1) * args.batch_size].to(device)
            g = torch.Generator(device=device).manual_seed(batch_seed(args.seed, epoch, b))
            yield datasets.normalize(augment(train_x[idx], g), mean, std), train_y[idx]

    start_epoch, start_batch, best, extra = 0, 0, 0.0, {}
    if args.resume or args.eval_only:
        ts, extra = mf.load(out / CHECKPOINT, map_location=device, with_extra=True)
        start_epoch, start_batch, best = extra["epoch"], extra["batch"], extra.get("best", 0.0)
    else:
        ts = mf.init(scheme, optimizer, seed=args.seed, device=device)
    if args.channels_last:
        ts = ts._replace(params={k: v.contiguous(memory_format=torch.channels_last) if v.ndim == 4 else v
                                 for k, v in ts.params.items()})
    if folder:  # the val/ folder is the test set of the ImageNet papers
        sets = {"test": lambda: imagefolder.device_batches(imagefolder.eval_loader(
            dataset, args.batch_size, **loader_options), device, mean, std, skipped=skipped)}
    else:
        sets = {"test": (test_x, test_y)}
    if val is not None:
        sets["val"] = val
    if args.eval_only:
        results = evaluate_sets(scheme, ts, sets, args.batch_size, device, mean, std)
        print(json.dumps(results, indent=1))
        return 0

    stop = {"signal": None}

    def on_signal(signum, _frame):
        stop["signal"] = signum

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.precision == "bf16")
    peak_step, images, train_seconds = extra.get("peak_step_bytes", 0), extra.get("images", 0), extra.get("seconds", 0.0)
    last_save = time.time()

    def checkpoint(epoch, batch):
        if not writer:
            return
        mf.save(out / CHECKPOINT, ts, extra={"epoch": epoch, "batch": batch, "best": best, "images": images,
                                             "seconds": train_seconds, "peak_step_bytes": peak_step,
                                             "args": vars(args)})

    try:
        for epoch in range(start_epoch, args.epochs):
            progress = Progress(steps_per_epoch, f"epoch {epoch + 1}/{args.epochs}", writer and not args.no_progress)
            sums: dict[str, float] = {}
            counted = 0
            epoch_images, t0 = 0, time.time()
            batches, data_wait, step_time = train_batches(epoch, start_batch), 0.0, 0.0
            skipped.clear()
            for b in range(start_batch, steps_per_epoch):
                tic = time.time()
                x, y = next(batches)
                if args.channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                data_wait += time.time() - tic
                tic = time.time()
                with autocast:
                    if b == start_batch and epoch == start_epoch and peak_step == 0:
                        with track_memory() as meter:
                            ts, metrics = train_step(ts, (x, y))
                        peak_step = meter.peak_bytes
                    else:
                        ts, metrics = train_step(ts, (x, y))
                if device.type == "cuda":  # the step's own time, not the next batch's wait
                    torch.cuda.synchronize(device)
                train_seconds += time.time() - tic
                step_time += time.time() - tic
                epoch_images += len(y)
                images += len(y)
                for name, m in metrics.items():
                    sums[name] = sums.get(name, 0.0) + float(m["loss"])
                counted += 1
                if writer and (b % max(1, steps_per_epoch // 25) == 0 or b == steps_per_epoch - 1):
                    with open(out / TRAIN_LOG, "a") as f:
                        f.write(json.dumps({"step": int(ts.step), "epoch": epoch + 1,
                                            "loss": {k: float(m["loss"]) for k, m in metrics.items()}}) + "\n")
                final = metrics["final"]
                progress.update(b + 1, epoch_images, float(final["loss"]), float(final.get("accuracy", math.nan)))
                if args.stop_after_steps is not None and int(ts.step) >= args.stop_after_steps:
                    stop["signal"] = signal.SIGTERM
                if world > 1:
                    stop["signal"] = agree_on_stop(stop["signal"])
                if stop["signal"] is not None:
                    checkpoint(epoch, b + 1)
                    print(f"\nstopped by signal {stop['signal']}: checkpoint saved at epoch {epoch + 1}, "
                          f"step {b + 1}; continue with --resume", file=sys.stderr)
                    return 130
                if time.time() - last_save > args.checkpoint_minutes * 60:
                    checkpoint(epoch, b + 1)
                    last_save = time.time()
            start_batch = 0
            batches.close()
            train_skipped = sum(skipped)
            results = evaluate_sets(scheme, ts, sets, args.batch_size, device, mean, std)
            best = max(best, results["test"]["final"])
            row = {"epoch": epoch + 1, "step": int(ts.step),
                   "train_loss": {k: v / max(counted, 1) for k, v in sums.items()},
                   "test_accuracy": results["test"], "images_per_second": epoch_images / max(time.time() - t0, 1e-9),
                   "data_wait_seconds": data_wait, "step_seconds": step_time}
            if folder:
                row["skipped_images"] = {"train": train_skipped, "test": sum(skipped) - train_skipped}
            if "val" in results:
                row["val_accuracy"] = results["val"]
            if writer:
                with open(out / METRICS, "a") as f:
                    f.write(json.dumps(row) + "\n")
            checkpoint(epoch + 1, 0)
            last_save = time.time()
            if writer:
                print(f"epoch {epoch + 1}: test accuracy {results['test']['final']:.4f} (best {best:.4f}); "
                      f"data wait {data_wait:.1f}s, step {step_time:.1f}s"
                      + (f"; skipped {sum(skipped)} unreadable images" if sum(skipped) else ""), file=sys.stderr)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)

    if not writer:
        return 0
    rows = [json.loads(line) for line in (out / METRICS).read_text().splitlines() if line.strip()]
    summary = {
        "method": args.method, "arch": args.arch, "modules": len(scheme) if args.method == "e2e" else args.modules,
        "dataset": args.dataset, "epochs": args.epochs, "steps": int(ts.step),
        "test_accuracy": rows[-1]["test_accuracy"]["final"],
        "best_test_accuracy": best,
        "best_test_accuracy_note": "best epoch chosen on the test set, as the released code reports",
        "head_test_accuracy": rows[-1]["test_accuracy"],
        "images_per_second": images / max(train_seconds, 1e-9),
        "peak_step_bytes": peak_step,
        "persistent_bytes": persistent_bytes(ts),
        "parameters": sum(v.numel() for k, v in ts.params.items()),
        "backbone_parameters": sum(ts.params[k].numel() for k in backbone.param_names),
        "seconds": train_seconds, "device": str(device), "precision": args.precision,
        "processes": world, "parallel": args.parallel or "none",
        "torch": torch.__version__,
    }
    if "val_accuracy" in rows[-1]:
        summary["val_accuracy"] = rows[-1]["val_accuracy"]["final"]
    if device.type == "cuda":
        summary["peak_cuda_bytes"] = torch.cuda.max_memory_allocated(device)
    (out / SUMMARY).write_text(json.dumps(summary, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=1))
    plot_curves(out)
    print(json.dumps({k: summary[k] for k in ("method", "modules", "test_accuracy", "images_per_second")}))
    return 0


if __name__ == "__main__":
    try:
        code = main()
    except UsageError as err:
        print(f"error: {err}", file=sys.stderr)
        code = 2
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    sys.exit(code)
