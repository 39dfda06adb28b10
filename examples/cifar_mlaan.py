"""Train a CIFAR ResNet with any local-learning scheme: the main job of mlaan_func.

    python examples/cifar_mlaan.py --dataset fashion-mnist --method dgl-mlaan --modules 4 \\
        --epochs 1 --max-steps 100 --batch-size 128 --out runs/quick

Defaults reproduce the paper's CIFAR-10 recipe (SGD + Nesterov, lr 0.8 at batch 1024 scaled
linearly with --batch-size, warm-up then cosine, 400 epochs). Writes OUT/metrics.jsonl every
epoch, OUT/checkpoint.pt atomically every epoch, every few minutes and on SIGINT/SIGTERM, and
OUT/summary.json + OUT/curves.png at the end.
"""

from __future__ import annotations

import argparse
import fcntl
import functools
import hashlib
import json
import math
import os
import shutil
import signal
import sys
import textwrap
import time
from pathlib import Path

# OpenMP threads that spin while they wait take the cores that other jobs need: on a shared
# 2-core machine a step with 2 spinning threads took 8.8 s, with 2 sleeping ones 1.1 s. Read
# when torch loads OpenMP, so set before the import; a policy of the caller's own wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

import mlaan_func as mf  # noqa: E402
from mlaan_func import data as datasets  # noqa: E402
from mlaan_func import imagefolder  # noqa: E402
from mlaan_func.checkpoint import TEMP_PREFIX, CheckpointError  # noqa: E402
from mlaan_func.memory import persistent_bytes, track_memory  # noqa: E402

METHODS = mf.schemes.SCHEMES + mf.schemes.RECIPES  # the published schemes, then the field's recipes
WINDOWED = ("mlaan", "dgl_mlaan", "infopro_mlaan")  # the schemes with an MLAAN window (--window)
ARCHS = tuple(mf.models.arch_names())  # every backbone factory in mf.models
IMAGENET_ARCHS = tuple(mf.models.imagenet_resnet.LAYOUTS)
DATASETS = ("cifar10", "svhn", "stl10", "fashion-mnist", "synthetic")
FOLDER_DATASETS = ("folder", "imagenet")  # read from DATA_DIR/train and DATA_DIR/val by a DataLoader
DATASETS += FOLDER_DATASETS
CHECKPOINT, SUMMARY, METRICS, CONFIG = "checkpoint.pt", "summary.json", "metrics.jsonl", "config.json"
TRAIN_LOG = "train_log.jsonl"
RUN_FILES = (CHECKPOINT, SUMMARY, METRICS, CONFIG, TRAIN_LOG, "curves.png")
LOCK, REPLACED = ".lock", ".replaced-run"
# The flags that define a run: a checkpoint from another configuration cannot be resumed.
IDENTITY = ("method", "arch", "modules", "dataset", "batch_size", "lr", "seed", "epochs", "max_steps",
            "val_fraction", "window", "ema_update", "remat", "precision", "subset", "synthetic_size",
            "warmup_epochs", "weight_decay", "parallel", "micro_batches", "data_replicas",
            "staleness")
BASE_LR, BASE_BATCH = 0.8, 1024  # the papers' recipe; the default lr follows the linear rule
WARMUP_EPOCHS, WARMUP_SHARE = 10, 0.05  # the recipe's warm-up, at most this share of a short run
IDENTITY += ("image_size", "share", "channels_last", "compile", "threads")  # threads: CPU float rounding
# The flags that leave the numbers as they are, or move a run to other hardware; --help lists them.
NOT_COMPARED = ("out", "data_dir", "workers", "no_progress", "checkpoint_minutes", "dist_timeout", "json",
                "device", "memory_budget", "no_keep_host_memory")  # a budget changes memory and time, never the numbers (bit for bit)


class ProgramError(Exception):
    """A failure reported as one line on stderr; ``code`` is the exit status (see EXIT_CODES)."""

    code = 1


class UsageError(ProgramError):
    """A bad command line or --out/--resume/--overwrite conflict."""

    code = 2


class DataError(ProgramError):
    code = 3


class CheckpointUnusable(ProgramError):
    code = 4


class Diverged(ProgramError):
    code = 5


class OutputError(ProgramError):
    code = 6


class Busy(ProgramError):
    code = 7


class InterruptedAfterTraining(ProgramError):
    code = 130


INTERRUPTED = 130
EXIT_CODES = {
    0: "the run finished (or --eval-only evaluated)",
    1: "internal error: a bug, reported with a traceback",
    UsageError.code: "bad command line, or --out/--resume/--overwrite conflict (nothing was changed)",
    DataError.code: "dataset missing, corrupted or invalid",
    CheckpointUnusable.code: "checkpoint unreadable, truncated, corrupted or unsafe (nothing in it was run)",
    Diverged.code: "training diverged (non-finite loss); the last good checkpoint is kept",
    OutputError.code: "an output could not be written (disk full, permissions); the last good checkpoint is kept",
    Busy.code: "another run is using --out",
    INTERRUPTED: "stopped by SIGINT/SIGTERM; a checkpoint was saved, continue with --resume",
}


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Shows every default; flags whose default depends on others say so in their help."""

    def _get_help_string(self, action):
        if action.default is None or action.default is argparse.SUPPRESS or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


class Parser(argparse.ArgumentParser):
    def error(self, message):
        raise UsageError(message)


def _finite(name: str, value: float, low: float, *, strict: bool = False) -> None:
    if not math.isfinite(value) or value < low or strict and value == low:
        bound = f"> {low:g}" if strict else f">= {low:g}"
        raise UsageError(f"--{name} must be a finite number {bound}, got {value}")


UNITS = {"B": 1, "KB": 10 ** 3, "MB": 10 ** 6, "GB": 10 ** 9, "KIB": 2 ** 10, "MIB": 2 ** 20, "GIB": 2 ** 30}


def memory_budget(text: str) -> int | float:
    """``--memory-budget``: a fraction (a number with a point, ``0.5``), bytes (``200000000``) or
    bytes with a unit (``200MiB``, ``1.5GiB``); what ``mf.step(memory_budget=)`` takes."""
    number = text.strip().upper().rstrip("BIGMK")
    unit = text.strip().upper()[len(number):] or None
    try:
        value = float(number) if unit or any(c in number for c in ".E") else int(number)
    except ValueError:
        value = None
    if value is None or unit not in (None, *UNITS) or not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive fraction (0.5), bytes (200000000) or bytes with a "
                                         f"unit ({', '.join(UNITS)}: 200MiB), got {text!r}")
    return int(value * UNITS[unit]) if unit else value


def parse_args(argv=None) -> argparse.Namespace:
    epilog = (textwrap.fill("--resume refuses a checkpoint written with other flags, except these, which change "
                            "no number (--device moves a run to other hardware, where float rounding differs "
                            "and --data-dir is checked by the data's fingerprint): "
                            + ", ".join(f"--{k.replace('_', '-')}" for k in NOT_COMPARED), 88, break_on_hyphens=False)
              + "\n\nexit codes:\n" + "\n".join(f"  {code:>3}  {what}" for code, what in EXIT_CODES.items()))
    p = Parser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter, epilog=epilog)
    p.add_argument("--method", default="dgl_mlaan", help=f"scheme: {', '.join(METHODS)} (- or _; man++ for man_pp)")
    p.add_argument("--arch", default="resnet32", help=f"backbone: {', '.join(ARCHS)}")
    p.add_argument("--modules", type=int, default=15, help="K, the real number of modules")
    p.add_argument("--dataset", default="cifar10", help=f"one of {', '.join(DATASETS)}")
    p.add_argument("--data-dir", default="data",
                   help="where datasets live or are downloaded to; files here win over system copies")
    p.add_argument("--epochs", type=int, default=400, help="epochs to train")
    p.add_argument("--max-steps", type=int, default=None, help="cap on steps per epoch (quick runs); default none")
    p.add_argument("--batch-size", type=int, default=None, help="default 1024 (STL-10: 128)")
    p.add_argument("--lr", type=float, default=None,
                   help=f"peak learning rate; default {BASE_LR} x batch size / {BASE_BATCH} (linear rule: "
                        "0.8 at 1024, 0.1 at 128)")
    p.add_argument("--warmup-epochs", type=float, default=None,
                   help=f"linear warm-up from lr/100; default {WARMUP_EPOCHS} epochs, or "
                        f"{WARMUP_SHARE:.0%}% of the run when that is shorter")
    p.add_argument("--weight-decay", type=float, default=1e-4, help="L2 weight decay on all trainable parameters")
    p.add_argument("--window", type=int, default=None, help="MLAAN window width W; default per scheme")
    p.add_argument("--ema-update", default="all", choices=("all", "last"), help="which EMA twins follow their source")
    p.add_argument("--seed", type=int, default=0, help="seed of init, data order and augmentation")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the step: one graph per kind of run of blocks (summary.json counts the graphs)")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads of torch; default $OMP_NUM_THREADS when set, else the CPUs this process "
                        "may run on (os.sched_getaffinity). Waiting threads sleep (OMP_WAIT_POLICY=PASSIVE "
                        "unless set) so that other jobs on the machine keep their cores; compared at --resume")
    p.add_argument("--no-keep-host-memory", action="store_true",
                   help="let glibc return freed host memory to the system between steps (the default keeps it, "
                        "mlaan_func.host_memory.keep_freed_memory: fewer page faults, resident memory stays at its peak)")
    p.add_argument("--share", default="auto", choices=("auto", "off", "sum"),
                   help="run each block once per step for all objectives that share it: auto (bit-identical "
                        "gradients), sum (also sum their cotangents: fewer FLOPs, float32-rounding equal), "
                        "off (one objective at a time)")
    p.add_argument("--precision", default="fp32", choices=("fp32", "bf16"), help="compute precision")
    p.add_argument("--remat", action="store_true", help="rematerialise every objective (less memory)")
    p.add_argument("--memory-budget", type=memory_budget, default=None, metavar="BUDGET",
                   help="fit each step's peak tensor bytes under BUDGET: a fraction of the scheme's no-remat peak "
                        "(0.5), bytes (200000000) or with a unit (200MiB, 1.5GiB); the planner picks plain or "
                        "remat per objective at the least recomputation, with the same numbers bit for bit, and "
                        "names the smallest reachable budget when it cannot")
    p.add_argument("--val-fraction", type=float, default=0.0, help="hold out this much of train")
    p.add_argument("--out", default="runs/latest", help="output directory")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a run already in OUT (kept until the new run's first checkpoint)")
    p.add_argument("--eval-only", action="store_true", help="evaluate the checkpoint in OUT")
    p.add_argument("--checkpoint-minutes", type=float, default=5.0, help="also checkpoint this often within an epoch")
    p.add_argument("--synthetic-size", type=int, default=2048, help="train images of --dataset synthetic")
    p.add_argument("--subset", type=int, default=None,
                   help="use only the first N train (N/5 test) images; default all")
    p.add_argument("--stop-after-steps", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--interrupt-evaluation", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--interrupt-summary", choices=("INT", "TERM"), help=argparse.SUPPRESS)
    p.add_argument("--parallel", default=None, choices=("data", "modules", "pipeline"),
                   help="under torchrun: split each batch over ranks (data, the default), give each rank a run "
                        "of modules (modules: synchronous micro-batches), or stream batches through ranks that "
                        "own runs of modules (pipeline: exact for dgl and infopro; the MLAAN family with --staleness)")
    p.add_argument("--micro-batches", type=int, default=4, help="micro-batches per step with --parallel modules")
    p.add_argument("--data-replicas", type=int, default=1,
                   help="with --parallel pipeline: a (replicas x stages) mesh of the processes; each replica "
                        "streams its share of every batch and a stage averages its gradients over the replicas")
    p.add_argument("--staleness", type=int, default=0,
                   help="with --parallel pipeline: run the MLAAN family across ranks under declared staleness: "
                        "gradients a window sends into an earlier rank, and the EMA twins that follow a later "
                        "rank's blocks, arrive this many steps late (docs/design.md 5.1); 0: exact schemes only")
    p.add_argument("--pipeline-chunk", type=int, default=16,
                   help="steps streamed between drains with --parallel pipeline: the stop, checkpoint and log "
                        "points; a chunk's batches are kept until it drains (a non-finite loss replays them)")
    p.add_argument("--dist-timeout", type=float, default=120.0, help="seconds before a silent rank is an error")
    p.add_argument("--json", default=None, help="also write the summary to this path; default none")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--image-size", type=int, default=224, help="crop size of --dataset folder/imagenet")
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1),
                   help="loader processes of --dataset folder/imagenet (0: load in the main process)")
    p.add_argument("--channels-last", action="store_true",
                   help="NHWC images and conv weights (faster on GPUs). The same math: equal to contiguous in "
                        "float64, but other convolution kernels round float32 differently, so parameters "
                        "drift ~1e-4 apart in a few steps (as far as either lies from float64); compared at "
                        "--resume")
    args = p.parse_args(argv)
    args.method = mf.schemes.method_name(args.method)
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
    if args.epochs < 1 or args.batch_size < 1 or (args.max_steps is not None and args.max_steps < 1):
        raise UsageError("--epochs, --batch-size and --max-steps must be positive")
    args.lr_rule = args.lr is None
    if args.lr is None:
        args.lr = BASE_LR * args.batch_size / BASE_BATCH
    _finite("lr", args.lr, 0.0, strict=True)
    _finite("weight-decay", args.weight_decay, 0.0)
    if args.warmup_epochs is not None:
        _finite("warmup-epochs", args.warmup_epochs, 0.0)
    _finite("checkpoint-minutes", args.checkpoint_minutes, 0.0)
    _finite("dist-timeout", args.dist_timeout, 0.0, strict=True)
    if not (math.isfinite(args.val_fraction) and 0 <= args.val_fraction < 1):
        raise UsageError(f"--val-fraction must be in [0, 1), got {args.val_fraction}")
    for name in ("subset", "synthetic_size", "micro_batches", "window", "pipeline_chunk", "data_replicas"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
    if args.resume and args.overwrite:
        raise UsageError("--resume continues the run in --out and --overwrite replaces it: pass one of them")
    check_device(args.device)
    if Path(args.data_dir).exists() and not Path(args.data_dir).is_dir():
        raise UsageError(f"--data-dir {args.data_dir} is a file; pass the directory that holds the dataset")
    if args.json is not None:
        check_json_path(Path(args.json))
    if args.dataset in FOLDER_DATASETS and (args.val_fraction or args.subset):
        raise UsageError(f"--val-fraction and --subset are not supported with --dataset {args.dataset}: "
                         "its val/ folder is the held-out set; make a smaller folder instead")
    if args.workers < 0:
        raise UsageError(f"--workers must be 0 or more, got {args.workers}")
    if args.image_size < 8:
        raise UsageError(f"--image-size must be at least 8 pixels, got {args.image_size}")
    if args.window is not None and args.method not in WINDOWED:
        raise UsageError(f"--window is the MLAAN window width: --method {args.method} has no windows; "
                         f"drop --window or choose one of {', '.join(WINDOWED)}")
    if args.parallel == "modules" and args.batch_size % args.micro_batches:
        raise UsageError(f"--micro-batches {args.micro_batches} does not divide --batch-size {args.batch_size}; "
                         "choose a batch size that is a multiple of the micro-batches")
    if args.staleness < 0:
        raise UsageError(f"--staleness must be 0 or more steps, got {args.staleness}")
    if args.staleness and args.parallel != "pipeline":
        raise UsageError("--staleness is the delay of a streamed pipeline: it needs --parallel pipeline")
    if args.staleness and args.data_replicas > 1:
        raise UsageError("--staleness with --data-replicas is not supported yet: drop one of them")
    if args.data_replicas > 1 and args.parallel != "pipeline":
        raise UsageError("--data-replicas builds a data x pipeline mesh: it needs --parallel pipeline "
                         "(plain data parallelism is --parallel data)")
    if args.batch_size % args.data_replicas:
        raise UsageError(f"--batch-size {args.batch_size} does not split over --data-replicas {args.data_replicas}")
    if args.compile and args.parallel in ("modules", "pipeline"):
        raise UsageError(f"--compile is not supported with --parallel {args.parallel} (its step runs eagerly); "
                         "drop one of them")
    if args.memory_budget is not None:
        clash = [f for f, on in (("--remat", args.remat), ("--compile", args.compile),
                                 (f"--parallel {args.parallel}", args.parallel)) if on]
        if clash:
            raise UsageError(f"--memory-budget plans its own remat on one process's eager step: it cannot be "
                             f"used with {', '.join(clash)}; drop one of them")
    args.threads, args.threads_why = default_threads(args.threads)
    return args


def default_threads(threads: int | None) -> tuple[int, str]:
    """The CPU thread count and why: --threads, else $OMP_NUM_THREADS, else the CPUs this process
    may run on (all of a machine's cores oversubscribe it when other jobs run beside this one)."""
    if threads is not None:
        if threads < 1:
            raise UsageError(f"--threads must be at least 1, got {threads}")
        return threads, "--threads"
    env = os.environ.get("OMP_NUM_THREADS", "")
    if env.isdigit() and int(env) >= 1:
        return int(env), "$OMP_NUM_THREADS"
    return len(os.sched_getaffinity(0)), "the CPUs available to this process; --threads overrides"


def check_device(name: str) -> None:
    """One line for a device this machine cannot use."""
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"unknown --device {name!r}; use cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"--device {name} but no CUDA device is available; use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UsageError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA devices")
    elif device.type != "cpu":
        raise UsageError(f"--device {name} is not supported by this program; use cpu, cuda or cuda:N")


def check_json_path(path: Path) -> None:
    """``--json`` must be writable before training starts, not after it."""
    parent = path.parent
    if path.is_dir():
        raise UsageError(f"--json {path} is a directory; give a file path")
    if not parent.is_dir():
        raise UsageError(f"--json {path}: directory {parent} does not exist; create it or choose another path")
    if not os.access(parent, os.W_OK) or path.exists() and not os.access(path, os.W_OK):
        raise UsageError(f"--json {path} is not writable; choose another path")


def split_points(arch: str, backbone: mf.Net, modules: int, shape) -> list[str]:
    """The published split for ``arch``/K when there is one, else modules of near-equal cost."""
    try:
        return mf.splits.default_split(arch, backbone, modules, shape)
    except ValueError as err:
        message = str(err)
    from mlaan_func.published import tables

    published = sorted(int(k) for k in tables()["splits"].get(arch, {}))
    units = sum(1 for n in backbone.block_names if n not in ("stem", "classifier"))
    beyond = [k for k in published if k > units]
    if beyond:  # the published splits that also cut after the stem reach further than the range said
        message += f", or {' or '.join(map(str, beyond))} (the published split{'s' * (len(beyond) > 1)})"
    raise UsageError(message)


def check_patches(arch: str, image_size: int) -> None:
    """A ViT cuts its images into patches of ``default_patch_size``: refuse sizes it cannot cut
    into several whole patches (a prime size would be one patch of the whole image)."""
    from mlaan_func.models.vit import default_patch_size

    patch = default_patch_size(image_size)
    if image_size % patch or image_size // patch < 2:
        raise UsageError(f"--arch {arch} cuts images into {patch}x{patch} patches, which do not tile "
                         f"{image_size}x{image_size} images into at least 2x2 patches; choose another --image-size "
                         "(from 128 on a multiple of 16; below 128 one with a small divisor, e.g. 32 or 64)")


def build_scheme(args, dataset) -> tuple[mf.Net, list]:
    shape = (dataset.channels, dataset.image_size, dataset.image_size)
    if args.arch.startswith("vit"):
        check_patches(args.arch, dataset.image_size)
    backbone = mf.from_module(mf.models.create(args.arch, num_classes=dataset.num_classes,
                                               in_channels=dataset.channels, image_size=dataset.image_size))
    at = [] if args.method == "e2e" else split_points(args.arch, backbone, args.modules, shape)
    options = {}
    if args.method in WINDOWED:
        options = {"width": args.window, "ema_update": args.ema_update}
        if args.arch == "resnet32" and args.modules in (8, 15) or args.arch == "resnet110" and args.modules in (32, 54):
            options["trunks"] = mf.leap_trunk_table(args.arch, args.modules)
        if args.arch in IMAGENET_ARCHS:
            options.update(imagenet_mlaan_options(args))
    options.update(mean=dataset.mean, std=dataset.std)  # build passes them to the schemes that restore the image
    if args.method in ("infopro", "infopro_mlaan"):
        options.update(lambdas=mf.infopro_lambda_table(args.method, args.arch, args.modules))
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
        raise data_error(err) from None
    if args.dataset in FOLDER_DATASETS:
        check_folder(dataset)
    return dataset


def data_error(err: datasets.DatasetError) -> DataError:
    """One line for a ``DatasetError``, also one re-raised from a loader worker (whose message
    is the worker's traceback, ending in the original error)."""
    last = str(err).strip().splitlines()[-1]
    prefix = f"{type(err).__module__}.{type(err).__name__}: "
    return DataError(last[len(prefix):] if last.startswith(prefix) else last)


def check_folder(dataset) -> None:
    """Before the first step: at least two classes (``load_folder`` has already checked that
    each split's images can be read, ``imagefolder.check_readable``)."""
    if dataset.num_classes < 2:
        raise DataError(f"{dataset.train.root} has {dataset.num_classes} class folder "
                        f"({', '.join(dataset.classes)}): a classifier needs at least two classes; add "
                        "class folders")


def lock_out(out: Path):
    """Hold OUT/.lock for the life of this process, so a second run into OUT is refused. The
    kernel drops a flock when its process dies, however it dies: a killed run blocks nothing."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        handle = open(out / LOCK, "a+")
    except IsADirectoryError:
        raise UsageError(f"{out / LOCK} is a directory, where this program keeps its lock file; remove it "
                         f"(rmdir {out / LOCK}) or choose another --out") from None
    except OSError as err:
        raise UsageError(f"cannot write to --out {out}: {err.strerror}; choose a writable directory") from None
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "?"
        handle.close()
        raise Busy(f"another run (pid {holder}) is writing to {out}; wait for it to finish or choose "
                   "another --out") from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"{os.getpid()}\n")
    handle.flush()
    return handle


def tidy_out(out: Path) -> None:
    """Under the lock: remove the temporary files of checkpoint writes that a killed run left,
    and finish (new checkpoint written) or undo (none yet) an --overwrite it left half done."""
    for tmp in out.glob(f"{TEMP_PREFIX}*.pt"):
        tmp.unlink()
    if (out / REPLACED).is_dir():
        if (out / CHECKPOINT).exists():
            shutil.rmtree(out / REPLACED)
        else:
            restore_replaced(out)
            print(f"restored the previous run in {out}, which an interrupted --overwrite had set aside",
                  file=sys.stderr)


def set_aside(out: Path) -> bool:
    """--overwrite, once everything is validated: move the previous run into OUT/.replaced-run,
    where it stays until the new run's first checkpoint (or comes back if the new run fails)."""
    files = [n for n in RUN_FILES if (out / n).exists()]
    if not files:
        return False
    (out / REPLACED).mkdir()
    for name in files:
        os.replace(out / name, out / REPLACED / name)
    return True


def restore_replaced(out: Path) -> None:
    for name in RUN_FILES:
        (out / name).unlink(missing_ok=True)
    for entry in (out / REPLACED).iterdir():
        os.replace(entry, out / entry.name)
    (out / REPLACED).rmdir()


def prepare_out(args) -> object:
    """Check OUT for this run, under its lock (returned; None for --eval-only, which writes nothing)."""
    out = Path(args.out)
    if args.eval_only:
        if not (out / CHECKPOINT).exists() and (out / REPLACED / CHECKPOINT).exists():
            raise UsageError(f"no checkpoint in {out}: an --overwrite run stopped before its first checkpoint, and "
                             f"the previous run is set aside in {out / REPLACED}; any run into {out} without "
                             f"--eval-only puts it back first (e.g. --resume, which continues it), then "
                             "--eval-only evaluates it")
        if not (out / CHECKPOINT).exists():
            raise UsageError(f"no checkpoint in {out}: run without --eval-only first, or point --out at the "
                             "run's directory")
        return None
    lock = lock_out(out)
    tidy_out(out)
    has_run = (out / CHECKPOINT).exists() or (out / SUMMARY).exists() or (out / METRICS).exists()
    if args.resume:
        if not (out / CHECKPOINT).exists():
            raise UsageError(f"no checkpoint in {out}: run without --resume first, or point --out at the "
                             "run's directory")
    elif has_run and not args.overwrite:
        raise UsageError(f"{out} already holds a run; pass --resume to continue it, --overwrite to "
                         "replace it, or choose another --out")
    try:
        probe = out / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as err:
        raise UsageError(f"cannot write to --out {out}: {err.strerror}; choose a writable directory") from None
    return lock


def check_config(out: Path, args, saved_args: dict | None) -> None:
    """A checkpoint resumes or evaluates only under the flags it was written with: those saved
    inside it, and config.json when it is there (--eval-only on any number of threads)."""
    mine = {k: getattr(args, k) for k in IDENTITY if not (args.eval_only and k in ("threads", "compile"))}
    saved = dict(saved_args or {})
    if (out / CONFIG).exists():
        saved = {**json.loads((out / CONFIG).read_text()), **saved}
    diff = {k: (saved[k], v) for k, v in mine.items() if k in saved and saved[k] != v}
    if diff:
        first = ", ".join(f"--{k.replace('_', '-')} {a} (checkpoint) vs {b}" for k, (a, b) in diff.items())
        raise UsageError(f"the checkpoint in {out} is from a different configuration: {first}; "
                         "resume with the same flags or start a new --out")


def follow_umask(path: Path) -> None:
    """Give ``path`` the mode every other output gets from the umask (``mf.save`` writes through
    a private temporary file, mode 0600)."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(path, 0o666 & ~mask)


def data_fingerprint(args, dataset) -> dict[str, list]:
    """What the run reads, as ``{group: [count, ...]}``: per split/class folder its number of
    files and a digest of their names (folder datasets), per dataset file its size in bytes
    (the others, whose files are checksummed when read; synthetic data is defined by its flags)."""
    def digest(names) -> str:
        return hashlib.sha256("\0".join(sorted(names)).encode()).hexdigest()[:16]

    if args.dataset not in FOLDER_DATASETS:
        return {Path(f).name: [os.path.getsize(f)] for f in dataset.files}
    groups: dict[str, list[str]] = {}
    for split in ("train", "val"):
        part = getattr(dataset, split)
        for file, label in zip(part.files, part.labels):
            groups.setdefault(f"{split}/{part.classes[label]}", []).append(file)
    return {group: [len(files), digest(files)] for group, files in groups.items()}


def check_data(out: Path, saved: dict | None, now: dict) -> None:
    """--resume reads the data the checkpoint was trained on (a checkpoint from before
    fingerprints were recorded is not checked)."""
    if saved is None or saved == now:
        return
    unit = "files" if any("/" in k for k in now) else "bytes"
    changed = [k for k in sorted(set(saved) | set(now)) if saved.get(k) != now.get(k)]

    def count(entry) -> str:
        return "absent" if entry is None else f"{entry[0]} {unit}"

    shown = "; ".join(f"{k}: {count(now.get(k))} now, {count(saved.get(k))} at the checkpoint"
                      + (" (other names)" if k in now and k in saved and now[k][0] == saved[k][0] else "")
                      for k in changed[:5])
    more = f"; and {len(changed) - 5} more" if len(changed) > 5 else ""
    raise DataError(f"the data changed since the checkpoint in {out} was written ({shown}{more}); resume on "
                    "the same data, or start a new --out")


def trim_log(path: Path, keep) -> None:
    """Drop the rows a killed run wrote after its last checkpoint (and a torn last line), so a
    resumed run writes each row exactly once."""
    if not path.exists():
        return
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    kept = []
    for line in lines:
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if keep(row):
            kept.append(line)
    if len(kept) != len(lines):
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(f"{line}\n" for line in kept))
        os.replace(tmp, path)


def warmup_steps(args, steps_per_epoch: int, total: int) -> tuple[int, str]:
    """Warm-up steps and why: --warmup-epochs when given, else the recipe's 10 epochs or 5% of
    the run, whichever is shorter (10 of 400 epochs in the recipe; 5 of a 100-step run)."""
    if args.warmup_epochs is not None:
        steps, why = int(args.warmup_epochs * steps_per_epoch), f"--warmup-epochs {args.warmup_epochs:g}"
    else:
        recipe, share = WARMUP_EPOCHS * steps_per_epoch, round(WARMUP_SHARE * total)
        if recipe <= share:
            steps, why = recipe, f"the recipe's {WARMUP_EPOCHS} epochs"
        else:
            steps, why = share, (f"{WARMUP_SHARE:.0%} of this {total}-step run; the recipe's {WARMUP_EPOCHS} "
                                 "epochs are for long runs")
    if steps > total - 1:
        steps, why = max(total - 1, 0), why + f", capped at the run's {total} steps"
    return steps, why


class EvaluationInterrupted(Exception):
    """SIGINT/SIGTERM arrived while evaluating: stop now, resume at this evaluation."""


def evaluate_sets(scheme, ts, sets, batch_size, device, mean, std, *, progress=False, stop=None):
    """Accuracy of every head on each set, with a progress bar; stops when ``stop`` is signalled."""
    results = {}
    for name, part in sets.items():
        if callable(part):  # a folder dataset: a function giving the batches
            source, count = part(), None
        else:
            x, y = part
            source = ((datasets.normalize(x[i:i + batch_size].to(device), mean, std), y[i:i + batch_size].to(device))
                      for i in range(0, len(y), batch_size))
            count = math.ceil(len(y) / batch_size)
        bar = tqdm(total=count, desc=f"evaluating {name}", unit="batch", disable=not progress,
                   leave=False, file=sys.stderr, dynamic_ncols=True)

        def batches(source=source, bar=bar):
            for batch in source:
                if stop is not None and stop["signal"] is not None:
                    raise EvaluationInterrupted
                bar.update(1)
                yield batch

        try:
            results[name] = mf.evaluate(scheme, ts, batches())
        finally:
            bar.close()
    return results


def head_labels(scheme) -> dict[str, str]:
    """What each reported accuracy is: the final classifier, or an auxiliary head and its weight
    (a head at weight 0.001 trains its module only weakly and may sit near chance)."""
    return {o.name: "final classifier" if o.name == "final" else f"aux, weight {float(o.weight):g}"
            for o in scheme}


def compiled_graphs() -> int:
    """The graphs torch.compile has compiled in this process, as dynamo counts them."""
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


def plot_curves(out: Path, labels: dict[str, str]) -> None:
    """Train loss per objective by step; test accuracy per head by epoch once there are two
    epochs (one epoch would be a dot per head). Legends name each head's weight."""
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
    panels = 2 if len(rows) > 1 else 1
    fig, axes = plt.subplots(1, panels, figsize=(5.5 * panels, 4), squeeze=False)
    ax_loss = axes[0][0]

    def label(name: str) -> str:
        return f"{name} ({labels[name]})" if labels.get(name) else name

    steps = [r["step"] for r in log]
    for name in (log[-1]["loss"] if log else {}):
        ax_loss.plot(steps, [r["loss"].get(name, math.nan) for r in log], label=label(name), lw=1)
    ax_loss.set(xlabel="step", ylabel="train loss (per objective)", yscale="log")
    if panels == 2:
        ax_acc = axes[0][1]
        epochs = [r["epoch"] for r in rows]
        for name in rows[-1]["test_accuracy"]:
            ax_acc.plot(epochs, [r["test_accuracy"].get(name, math.nan) for r in rows], "o-", label=label(name))
        ax_acc.set(xlabel="epoch", ylabel="test accuracy (per head)", ylim=(0, 1))
    else:
        ax_loss.set_title(f"test accuracy after epoch 1: {rows[0]['test_accuracy'].get('final', math.nan):.3f} "
                          "(final classifier; summary.json has every head)", fontsize=8)
    for ax in axes[0]:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6, ncol=2)
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
    try:
        mfd.check_same_config({k: getattr(args, k) for k in IDENTITY})
    except mfd.DistributedError as err:
        raise UsageError(str(err)) from None
    if args.parallel == "data" and args.batch_size % world:
        raise UsageError(f"--batch-size {args.batch_size} does not split over {world} processes")
    if args.parallel == "pipeline" and world % args.data_replicas:
        raise UsageError(f"--data-replicas {args.data_replicas} does not divide the {world} processes; choose "
                         "a number of replicas that does")
    stages = world // args.data_replicas if args.parallel == "pipeline" else world
    if args.parallel in ("modules", "pipeline") and stages > args.modules:
        raise UsageError(f"{stages} processes per pipeline but only {args.modules} modules; use fewer processes"
                         + (" or more --data-replicas" if args.parallel == "pipeline" else ""))
    return rank, world


def on_rank0(rank: int, world: int, fn):
    """Run ``fn`` on rank 0; every rank raises the same ProgramError (same exit code) if it failed."""
    error, result = None, None
    if rank == 0:
        try:
            result = fn()
        except ProgramError as err:
            error = (err.code, str(err))
    if world > 1:
        import torch.distributed as dist

        box = [error]
        dist.broadcast_object_list(box, src=0)
        error = box[0]
    if error is not None:
        kinds = {c.code: c for c in (UsageError, DataError, CheckpointUnusable, Diverged, OutputError, Busy)}
        raise kinds.get(error[0], ProgramError)(error[1])
    return result


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    if not args.no_keep_host_memory:
        mf.host_memory.keep_freed_memory()
    rank, world = start_distributed(args)
    device = torch.device(args.device)
    out = Path(args.out)
    folder = args.dataset in FOLDER_DATASETS
    if folder:  # check the folder layout before anything is written
        dataset = load_data(args)
        if rank == 0:
            ignored = len(dataset.train.ignored) + len(dataset.val.ignored)
            print(f"{args.dataset} {args.data_dir}: {len(dataset.train.files)} train and {len(dataset.val.files)} val "
                  f"images in {dataset.num_classes} classes" + (f"; ignored {ignored} non-image files" if ignored else ""),
                  file=sys.stderr)
    writer = rank == 0
    lock = on_rank0(rank, world, lambda: prepare_out(args))  # noqa: F841 (held until the process ends)
    val, train_x, train_y = None, None, None
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
    fingerprint = data_fingerprint(args, dataset)
    backbone, scheme = build_scheme(args, dataset)

    steps_per_epoch = n_train // args.batch_size
    if steps_per_epoch == 0:
        size = len(dataset.train.files) if folder else n_train
        raise UsageError(f"--batch-size {args.batch_size} is larger than the {size} training images")
    if args.max_steps:
        steps_per_epoch = min(steps_per_epoch, args.max_steps)
    total = steps_per_epoch * args.epochs
    warmup, warmup_why = warmup_steps(args, steps_per_epoch, total)
    optimizer = mf.optim.sgd(mf.optim.warmup_cosine(args.lr, warmup, total), momentum=0.9, nesterov=True,
                             weight_decay=args.weight_decay)
    share = {"auto": None, "off": False, "sum": "sum"}[args.share]
    if args.parallel == "data":
        from mlaan_func import distributed as mfd
        train_step = mfd.data_parallel_step(scheme, optimizer, compile=args.compile, share=share)
        if folder:  # the loader already gave this rank its shard
            train_step = functools.partial(train_step, sharded=True)
    elif args.parallel in ("modules", "pipeline"):
        from mlaan_func import distributed as mfd
        ends = [m.output_name for m in mf.split(backbone, split_points(args.arch, backbone, args.modules,
                                                                       (dataset.channels, dataset.image_size, dataset.image_size)))]
        if args.parallel == "modules":
            train_step = mfd.module_parallel_step(scheme, optimizer, ends, micro_batches=args.micro_batches,
                                                  share=share)
        else:
            groups = {}
            if args.data_replicas > 1:
                groups["group"], groups["data_group"] = mfd.mesh_groups(args.data_replicas)
            try:
                train_step = mfd.pipeline_step(scheme, optimizer, ends, share=share, staleness=args.staleness,
                                               **groups)
            except mf.errors.SchemeError as err:
                hint = "" if args.staleness else "; or declare a delay with --staleness 1 (docs/design.md 5.1)"
                raise UsageError(f"--parallel pipeline --method {args.method}: {err}{hint}") from None
    else:
        train_step = mf.step(scheme, optimizer, compile=args.compile, share=share, memory_budget=args.memory_budget)
    augment = None if folder else datasets.augmentation(dataset.name)
    progress = writer and not args.no_progress
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
        try:
            ts, extra = mf.load(out / CHECKPOINT, map_location=device, with_extra=True)
        except (CheckpointError, OSError) as err:
            raise CheckpointUnusable(str(err)) from None
        if not isinstance(extra.get("epoch"), int) or not isinstance(extra.get("batch"), int):
            raise CheckpointUnusable(f"{out / CHECKPOINT} was not written by this program (it records no epoch "
                                     "and batch); --resume and --eval-only take this program's checkpoints")
        check_config(out, args, extra.get("args"))
        if args.resume:
            check_data(out, extra.get("data"), fingerprint)
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
        results = evaluate_sets(scheme, ts, sets, args.batch_size, device, mean, std, progress=progress)
        print(json.dumps(results, indent=1))
        return 0
    if writer:
        lr_why = f"{BASE_LR} x batch {args.batch_size} / {BASE_BATCH}, the linear rule; --lr overrides" \
            if args.lr_rule else "--lr"
        files = getattr(dataset, "files", None)
        print(f"{args.method} on {args.dataset} ({n_train} training images"
              f"{', read from ' + os.path.dirname(files[0]) if files else ''}), "
              f"{args.modules} modules: {args.epochs} epoch(s) of {steps_per_epoch} steps, batch {args.batch_size}\n"
              f"learning rate {args.lr:g} ({lr_why}); warm-up {warmup} steps ({warmup_why}), then cosine to 0 "
              f"at step {total}; {args.threads} CPU threads ({args.threads_why}, "
              f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')})", file=sys.stderr)

    # Everything is validated: only now does this run take the place of a previous one.
    replaced = writer and args.overwrite and set_aside(out)
    if writer and not args.resume:
        for name in (TRAIN_LOG, "curves.png"):  # what a run killed before its first checkpoint left
            (out / name).unlink(missing_ok=True)
        (out / CONFIG).write_text(json.dumps({k: getattr(args, k) for k in IDENTITY}, indent=1))
    if writer and args.resume:
        trim_log(out / TRAIN_LOG, lambda row: row["step"] <= int(ts.step))
        trim_log(out / METRICS, lambda row: row["epoch"] <= start_epoch)
    try:
        return train(args, out, scheme, backbone, ts, extra, train_step, dataset, train_batches, skipped, sets,
                     device, steps_per_epoch, start_epoch, start_batch, best, rank, world, progress, fingerprint)
    except BaseException:
        if replaced and (out / REPLACED).is_dir():
            restore_replaced(out)
            print(f"the new run failed before its first checkpoint: the previous run in {out} is restored",
                  file=sys.stderr)
        raise


def train(args, out, scheme, backbone, ts, extra, train_step, dataset, train_batches, skipped, sets, device,
          steps_per_epoch, start_epoch, start_batch, best, rank, world, progress, fingerprint) -> int:
    """The epochs: train, evaluate, log, checkpoint; then the summary. Returns the exit code."""
    writer, folder = rank == 0, args.dataset in FOLDER_DATASETS
    mean, std = dataset.mean, dataset.std
    stop = {"signal": None}
    pipeline = args.parallel == "pipeline"  # train_step runs a chunk of batches: (ts, batches) -> (ts, history)
    # under staleness each rank carries what is in flight from chunk to chunk; rank 0 keeps every
    # rank's carry (gathered at each drain) for the checkpoint
    carries = extra.get("carries") if args.resume else None
    if args.staleness and carries is not None and len(carries) != world:
        raise CheckpointUnusable(f"the checkpoint in {out} holds the in-flight gradients of {len(carries)} pipeline "
                                 f"ranks, not {world}: resume with --nproc-per-node {len(carries)}")
    carry = {"mine": carries[rank] if args.staleness and carries is not None else None, "all": carries}

    def run_chunk(ts, chunk):
        if not args.staleness:
            return train_step(ts, chunk)
        ts, history, carry["mine"] = train_step(ts, chunk, carry["mine"])
        import torch.distributed as dist

        gathered = [None] * world if rank == 0 else None
        dist.gather_object(carry["mine"], gathered, dst=0)
        carry["all"] = gathered
        return ts, history

    def fed_batches(source, count: int, fed: dict):
        """The next ``count`` batches of ``source``, their sizes and the time spent waiting for them in ``fed``."""
        for _ in range(count):
            tic = time.time()
            try:
                x, y = next(source)
            except datasets.DatasetError as err:
                raise data_error(err) from None
            if args.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            fed["wait"] += time.time() - tic
            fed["sizes"].append(len(y))
            yield x, y

    def on_signal(signum, _frame):
        stop["signal"] = signum

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.precision == "bf16")
    peak_step, images, train_seconds = extra.get("peak_step_bytes", 0), extra.get("images", 0), extra.get("seconds", 0.0)
    sums, counted = dict(extra.get("sums", {})), extra.get("counted", 0)
    saved = {"step": int(ts.step) if args.resume else None}
    last_save = time.time()

    def kept() -> str:
        if saved["step"] is None:
            return "no checkpoint of this run had been written yet"
        return f"the last good checkpoint, {out / CHECKPOINT} (step {saved['step']}), is kept"

    def output(path: Path, write) -> None:
        try:
            write()
        except OSError as err:
            then = "start the run again" if saved["step"] is None else "continue with --resume"
            raise OutputError(f"cannot write {path} ({err.strerror or err}); {kept()}: free space or fix the "
                              f"permissions, then {then}") from None

    def append(path: Path, row: dict) -> None:
        def write():
            with open(path, "a") as f:
                f.write(json.dumps(row) + "\n")
        output(path, write)

    def checkpoint(epoch, batch):
        if not writer:
            return

        def write():
            mf.save(out / CHECKPOINT, ts, extra={
                "epoch": epoch, "batch": batch, "best": best, "images": images, "seconds": train_seconds,
                "peak_step_bytes": peak_step, "sums": sums, "counted": counted, "args": vars(args),
                "data": fingerprint, **({"carries": carry["all"]} if args.staleness else {})})
            follow_umask(out / CHECKPOINT)
        output(out / CHECKPOINT, write)
        saved["step"] = int(ts.step)
        if (out / REPLACED).is_dir():
            shutil.rmtree(out / REPLACED)

    def stopped(epoch, batch) -> int:
        checkpoint(epoch, batch)
        print(f"\nstopped by signal {stop['signal']}: checkpoint saved at epoch {epoch + 1}, step {batch}; "
              "continue with --resume", file=sys.stderr)
        return INTERRUPTED

    try:
        for epoch in range(start_epoch, args.epochs):
            bar = tqdm(total=steps_per_epoch, initial=start_batch, desc=f"epoch {epoch + 1}/{args.epochs}",
                       unit="step", disable=not progress, file=sys.stderr, dynamic_ncols=True)
            epoch_images, t0 = 0, time.time()
            batches, data_wait, step_time = train_batches(epoch, start_batch), 0.0, 0.0
            skipped.clear()
            try:
                b = start_batch
                while b < steps_per_epoch:
                    tic = time.time()
                    fed = {"wait": 0.0, "sizes": []}
                    if pipeline:
                        count = min(args.pipeline_chunk, steps_per_epoch - b)
                        if args.stop_after_steps is not None:
                            count = max(1, min(count, args.stop_after_steps - int(ts.step)))
                        chunk = fed_batches(batches, count, fed)
                    else:
                        x, y = next(fed_batches(batches, 1, fed))
                    try:
                        with autocast:
                            if pipeline and peak_step == 0:  # this rank's peak over its first chunk
                                with track_memory() as meter:
                                    ts, history = run_chunk(ts, chunk)
                                peak_step = meter.peak_bytes
                            elif pipeline:
                                ts, history = run_chunk(ts, chunk)
                            else:
                                if peak_step == 0 and args.compile:  # measured eagerly, the result dropped
                                    with track_memory() as meter:
                                        train_step(ts, (x, y))
                                    peak_step = meter.peak_bytes
                                if peak_step == 0 and args.memory_budget is not None:  # plans; the result dropped
                                    train_step(ts, (x, y))
                                    if writer:
                                        print(train_step.plan, file=sys.stderr)
                                if peak_step == 0:
                                    with track_memory() as meter:
                                        ts, metrics = train_step(ts, (x, y))
                                    peak_step = meter.peak_bytes
                                else:
                                    ts, metrics = train_step(ts, (x, y))
                                history = [metrics]
                    except mf.errors.MemoryBudgetError as err:
                        raise UsageError(f"--memory-budget: {err}") from None
                    except mf.NonFiniteLossError as err:
                        raise Diverged(f"training diverged: {err} {kept()[0].upper() + kept()[1:]}.") from None
                    except torch._dynamo.exc.BackendCompilerFailed as err:
                        reason = str(err).strip().splitlines()[0]
                        raise UsageError(f"--compile: torch.compile cannot compile the step here ({reason}); "
                                         "fix that or run without --compile") from None
                    if args.compile and compiled_graphs() == 0:
                        raise UsageError("--compile: torch.compile compiled no graph of the step, so it would "
                                         "run eagerly; run without --compile")
                    if device.type == "cuda":  # the step's own time, not the next batch's wait
                        torch.cuda.synchronize(device)
                    data_wait += fed["wait"]  # a pipeline reads its chunk's batches as it goes
                    step_seconds = time.time() - tic - fed["wait"]
                    train_seconds += step_seconds
                    step_time += step_seconds
                    first_step = int(ts.step) - len(history)
                    for i, (metrics, size) in enumerate(zip(history, fed["sizes"])):
                        epoch_images += size
                        images += size
                        for name, m in metrics.items():
                            sums[name] = sums.get(name, 0.0) + float(m["loss"])
                        counted += 1
                        if writer and ((b + i) % max(1, steps_per_epoch // 25) == 0 or b + i == steps_per_epoch - 1):
                            append(out / TRAIN_LOG, {"step": first_step + i + 1, "epoch": epoch + 1,
                                                     "loss": {k: float(m["loss"]) for k, m in metrics.items()}})
                    b += len(history)
                    final = history[-1]["final"]
                    bar.set_postfix(loss=f"{float(final['loss']):.3f}",
                                    acc=f"{float(final.get('accuracy', math.nan)):.3f}",
                                    img_s=f"{epoch_images / max(time.time() - t0, 1e-9):,.0f}", refresh=False)
                    bar.update(len(history))
                    if args.stop_after_steps is not None and int(ts.step) >= args.stop_after_steps:
                        stop["signal"] = signal.SIGTERM
                    if world > 1:
                        stop["signal"] = agree_on_stop(stop["signal"])
                    if stop["signal"] is not None:
                        bar.close()
                        return stopped(epoch, b)
                    if time.time() - last_save > args.checkpoint_minutes * 60:
                        checkpoint(epoch, b)
                        last_save = time.time()
            finally:
                bar.close()
                batches.close()
            start_batch = 0
            train_skipped = sum(skipped)
            if args.interrupt_evaluation and epoch == start_epoch:
                os.kill(os.getpid(), signal.SIGINT)
            try:
                results = evaluate_sets(scheme, ts, sets, args.batch_size, device, mean, std, progress=progress,
                                        stop=stop if world == 1 else None)
            except EvaluationInterrupted:
                return stopped(epoch, steps_per_epoch)
            except datasets.DatasetError as err:
                checkpoint(epoch, steps_per_epoch)  # the epoch's training is kept; --resume evaluates it
                raise DataError(f"{data_error(err)}; the epoch's training is saved in {out / CHECKPOINT}: "
                                "continue with --resume once the files are fixed") from None
            best = max(best, results["test"]["final"])
            row = {"epoch": epoch + 1, "step": int(ts.step),
                   "train_loss": {k: v / max(counted, 1) for k, v in sums.items()},
                   "test_accuracy": results["test"],
                   "step_images_per_second": epoch_images / max(step_time, 1e-9),
                   "wall_images_per_second": epoch_images / max(time.time() - t0, 1e-9),
                   "data_wait_seconds": data_wait, "step_seconds": step_time}
            if folder:
                row["skipped_images"] = {"train": train_skipped, "test": sum(skipped) - train_skipped}
            if "val" in results:
                row["val_accuracy"] = results["val"]
            if writer:
                append(out / METRICS, row)
            sums, counted = {}, 0
            checkpoint(epoch + 1, 0)
            last_save = time.time()
            if writer:
                print(f"epoch {epoch + 1}: test accuracy {results['test']['final']:.4f} (best {best:.4f}); "
                      f"data wait {data_wait:.1f}s, step {step_time:.1f}s"
                      + (f"; skipped {sum(skipped)} unreadable images" if sum(skipped) else ""), file=sys.stderr)
            if world > 1:
                stop["signal"] = agree_on_stop(stop["signal"])
            if stop["signal"] is not None and epoch + 1 < args.epochs:
                print(f"\nstopped by signal {stop['signal']} after epoch {epoch + 1}: checkpoint saved; "
                      "continue with --resume", file=sys.stderr)
                return INTERRUPTED
        if not writer:
            return 0

        def after_training(signum, _frame):
            raise InterruptedAfterTraining(f"interrupted after training; the final checkpoint is kept "
                                           f"({out / CHECKPOINT}): signal {signum} arrived while the summary was "
                                           "written, --resume writes it")

        for s in previous:
            signal.signal(s, after_training)
        if args.interrupt_summary:
            os.kill(os.getpid(), getattr(signal, f"SIG{args.interrupt_summary}"))
        rows = [json.loads(line) for line in (out / METRICS).read_text().splitlines() if line.strip()]
        labels = head_labels(scheme)
        summary = {
            "method": args.method, "arch": args.arch, "modules": len(scheme) if args.method == "e2e" else args.modules,
            "dataset": args.dataset, "epochs": args.epochs, "steps": int(ts.step),
            "test_accuracy": rows[-1]["test_accuracy"]["final"],
            "best_test_accuracy": best,
            "best_test_accuracy_note": "best epoch chosen on the test set, as the released code reports",
            "head_test_accuracy": rows[-1]["test_accuracy"],
            "head_labels": {k: labels.get(k, "") for k in rows[-1]["test_accuracy"]},
            "images_per_second": images / max(train_seconds, 1e-9),
            "images_per_second_note": "training images per second of step time over the whole run (data loading "
                                      "and evaluation excluded, like metrics.jsonl's step_images_per_second; its "
                                      "wall_images_per_second includes the data wait)",
            "peak_step_bytes": peak_step,
            "peak_step_bytes_note": "most tensor bytes allocated at once by one step, measured eagerly by "
                                    "mlaan_func.memory.track_memory (with --compile too)",
            "persistent_bytes": persistent_bytes(ts),
            "parameters": sum(v.numel() for k, v in ts.params.items()),
            "backbone_parameters": sum(ts.params[k].numel() for k in backbone.param_names),
            "seconds": train_seconds, "device": str(device), "precision": args.precision, "threads": args.threads,
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "unset"),
            "kept_host_memory": not args.no_keep_host_memory and mf.host_memory.keep_freed_memory(),
            "compile": args.compile, "compiled_graphs": compiled_graphs(),
            "memory_plan": str(train_step.plan) if args.memory_budget is not None and train_step.plan else None,
            "processes": world, "parallel": args.parallel or "none",
            "lr": args.lr, "data_files": [str(Path(args.data_dir).resolve())] if folder else list(dataset.files),
            "torch": torch.__version__,
        }
        if "val_accuracy" in rows[-1]:
            summary["val_accuracy"] = rows[-1]["val_accuracy"]["final"]
        if device.type == "cuda":
            summary["peak_cuda_bytes"] = torch.cuda.max_memory_allocated(device)
        text = json.dumps(summary, indent=1)
        output(out / SUMMARY, lambda: (out / SUMMARY).write_text(text))
        if args.json:
            output(Path(args.json), lambda: Path(args.json).write_text(text))
        output(out / "curves.png", lambda: plot_curves(out, labels))
        print("test accuracy per head:\n" + "\n".join(
            f"  {name:<24} {acc:.4f}  ({summary['head_labels'][name]})" for name, acc in rows[-1]["test_accuracy"].items()),
            file=sys.stderr)
        print(json.dumps({k: summary[k] for k in ("method", "modules", "test_accuracy", "images_per_second")}))
        return 0
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


if __name__ == "__main__":
    try:
        code = main()
    except ProgramError as err:
        print(f"error: {err}", file=sys.stderr)
        code = err.code
    except KeyboardInterrupt:
        print("interrupted before training started: nothing of a run was changed", file=sys.stderr)
        code = INTERRUPTED
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    sys.exit(code)
