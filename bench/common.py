"""Shared pieces of the benchmarks: flags, schemes by name, a plain nn.Module baseline."""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import platform
import sys
from pathlib import Path

import torch
from torch import nn

import mlaan_func as mf
from mlaan_func.combinators import LeapBlock

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
METHODS = ("e2e", "dgl", "infopro", "mlaan", "dgl_mlaan", "infopro_mlaan")
ARCHS = tuple(mf.models.arch_names())  # every backbone factory in mf.models
IMAGENET_ARCHS = tuple(mf.models.imagenet_resnet.LAYOUTS)
LR = 0.01
"""Learning rate of the timed steps: time and memory do not depend on it, and repeated steps on
one random batch diverged on ViT-Tiny at 0.05."""


def image_shape(arch: str) -> tuple[int, int, int]:
    """Input of the benchmarks: 3×224×224 for the ImageNet ResNets, 3×32×32 for the others."""
    return (3, 224, 224) if arch in IMAGENET_ARCHS else (3, 32, 32)


def num_classes(arch: str) -> int:
    return 1000 if arch in IMAGENET_ARCHS else 10


def model_for(arch: str) -> nn.Module:
    """The backbone ``arch`` for the benchmark's images (``image_shape``) and classes."""
    return mf.models.create(arch, num_classes=num_classes(arch), in_channels=3, image_size=image_shape(arch)[-1])


def default_modules(arch: str) -> list[int]:
    """K when --modules is not given: 16 on the ResNets (the published tables), 4 else."""
    return [16] if arch.startswith("resnet") else [4]


def set_threads(n: int) -> None:
    """Intra-op threads for CPU runs (recorded in the JSON)."""
    torch.set_num_threads(n)


def add_common_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--threads", type=int, default=1,
                   help="CPU intra-op threads (1: stable ratios on a shared machine)")
    p.add_argument("--method", action="append", help="scheme (repeatable); default: all six")
    p.add_argument("--arch", action="append", help=f"one of {', '.join(ARCHS)} (repeatable)")
    p.add_argument("--modules", type=int, action="append", help="K (repeatable)")
    p.add_argument("--batch-size", type=int, action="append", help="batch size (repeatable)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--remat", choices=("off", "on", "both"), default=None, help="rematerialised objectives")
    p.add_argument("--head", default=None, help="override the auxiliary head (e.g. dgl_wide)")
    p.add_argument("--json", default=None, help="where to write the JSON results")
    p.add_argument("--full", action="store_true", help="the full grid (slow)")
    p.add_argument("--quick", action="store_true", help="a tiny configuration for CI (seconds)")


def quick_defaults(args: argparse.Namespace) -> None:
    """--quick: a tiny configuration for CI (seconds)."""
    if args.quick:
        args.method = args.method or ["e2e", "dgl", "mlaan"]
        args.modules, args.batch_size = args.modules or [4], args.batch_size or [8]
        args.remat = args.remat or "both"


def method_name(m: str) -> str:
    return mf.schemes.method_name(m)


def split_for(arch: str, backbone: mf.Net, k: int) -> list[str]:
    return mf.splits.default_split(arch, backbone, k, (3, 32, 32))


def mlaan_k(method: str, k: int, arch: str = "resnet32") -> int:
    """MLAAN's published CIFAR '16 modules' is really 15: use 15 for the MLAAN family at 16
    (the ImageNet ResNet-34's 16 is real)."""
    if method == "e2e":
        return 1
    return 15 if method.endswith("mlaan") and k == 16 and arch not in IMAGENET_ARCHS else k


def build(method: str, arch: str, k: int, *, remat: bool | str = False, head: str | None = None):
    """``(backbone, scheme)`` of ``method`` on ``arch`` in ``k`` modules; ``remat``: ``False``,
    ``True`` (every objective ``mf.remat``) or an ``inside=`` rule (``"conv_inputs"``,
    ``"block_input"``: rematerialised and cut inside its blocks)."""
    backbone = mf.from_module(model_for(arch))
    at = [] if method == "e2e" else split_for(arch, backbone, k)
    options = {}
    if method.endswith("mlaan") and arch in IMAGENET_ARCHS:
        options["width"] = min(3, k)  # the released ImageNet MLAAN windows
    if head is None and method == "mlaan" and arch in IMAGENET_ARCHS:
        head = "imagenet"  # the released ImageNet MLAAN heads
    if head is not None and method in ("dgl", "mlaan", "dgl_mlaan"):
        options["head"] = head
    if method == "infopro" and arch in IMAGENET_ARCHS:  # the released ImageNet InfoPro heads, CE task
        options.update(head=head or "imagenet", contrastive=False)
    scheme = mf.schemes.build(method, backbone, at, input_shape=image_shape(arch), **options)
    if remat:
        inside = None if remat is True else remat
        scheme = [mf.remat(o, inside=inside) for o in scheme]
    return backbone, scheme


def cifar_batch(n: int, device: str, seed: int = 0, *, shape=(3, 32, 32), classes: int = 10):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, *shape, generator=g).to(device), torch.randint(0, classes, (n,), generator=g).to(device))


def arch_batch(arch: str, n: int, device: str, seed: int = 0):
    """A random batch of ``arch``'s input size and classes."""
    return cifar_batch(n, device, seed, shape=image_shape(arch), classes=num_classes(arch))


def optimizer():
    return mf.optim.sgd(LR, momentum=0.9, nesterov=True, weight_decay=1e-4)


def environment(argv: list[str]) -> dict:
    return {
        "machine": f"{platform.machine()} {platform.processor() or ''} {os.cpu_count()} cores".strip(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": " ".join(["python", *argv]),
        "cuda_device": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }


def write_json(path: str | os.PathLike, payload: dict) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(payload, indent=1))
    os.replace(tmp, path)
    print(f"wrote {path}", file=sys.stderr)


class PlainScheme:
    """The same scheme written as ordinary nn.Modules, per-objective ``.backward()`` and
    ``torch.optim.SGD`` (in place): the baseline for the framework's overhead.

    Modules are deep copies of the scheme's block templates, loaded with the train state;
    BatchNorm statistics update every time a module runs, as in the released code.
    """

    def __init__(self, objectives, ts: mf.TrainState, device: str):
        self.objectives, self.modules, self.twins = objectives, {}, []
        self.routes = mf.engine.plan_routes(objectives)
        for o in objectives:
            for net in o.nets:
                for block in net.blocks:
                    self._add(block, ts)
        params = [p for m in self.modules.values() for p in m.parameters() if p.requires_grad]
        self.opt = torch.optim.SGD(params, lr=LR, momentum=0.9, nesterov=True, weight_decay=1e-4)
        for m in self.modules.values():
            m.to(device).train()

    def _load(self, block, ts, params_from_state=False):
        m = copy.deepcopy(block.module)
        source = ts.state if params_from_state else ts.params
        for k, v in m.named_parameters():
            v.data.copy_(source[f"{block.prefix}.{k}"])
            v.requires_grad_(not params_from_state)
        for k, v in m.named_buffers():
            v.data.copy_(ts.state[f"{block.prefix}.{k}"])
        return m

    def _add(self, block, ts):
        if isinstance(block, LeapBlock):
            for inner in block.copy.blocks:
                self._add(inner, ts)
            for twin, src in zip(block.twin.blocks, block.source.blocks):
                if twin.prefix not in self.modules:
                    self.modules[twin.prefix] = self._load(twin, ts, params_from_state=True)
                    self.twins.append((twin.prefix, src.prefix, float(block.decay)))
        elif block.prefix not in self.modules:
            self.modules[block.prefix] = self._load(block, ts)

    def _run(self, block, x):
        if isinstance(block, LeapBlock):
            y = x
            for inner in block.copy.blocks:
                y = self._run(inner, y)
            t = x
            for twin in block.twin.blocks:
                t = self.modules[twin.prefix](t)
            return y + t
        return self.modules[block.prefix](x)

    def step(self, batch):
        x, y = batch
        b = mf.Batch(x, y)
        self.opt.zero_grad(set_to_none=True)
        acts = {"input": x}
        for o, route in zip(self.objectives, self.routes):
            h = acts[o.input_name].detach()
            for block in o.net.blocks:
                h = self._run(block, h)
                if block.name in route.taps:
                    acts.setdefault(block.name, h.detach())
            acts.setdefault(o.output_name, h.detach())
            z = h
            if o.head is not None:
                for block in o.head.blocks:
                    z = self._run(block, z)
            loss, _ = o.loss(z, b)
            (o.weight * loss).backward()
            for name in route.free_after:
                acts.pop(name, None)
        self.opt.step()
        with torch.no_grad():
            for twin, src, m in self.twins:
                for pt, ps in zip(self.modules[twin].parameters(), self.modules[src].parameters()):
                    pt.mul_(m).add_(ps, alpha=1 - m)


def checkpointed_e2e_step(arch: str, device: str):
    """E2E with ``torch.utils.checkpoint`` around every block, as plain nn.Module code."""
    from torch.utils.checkpoint import checkpoint

    model = model_for(arch).to(device).train()
    blocks = [b for _, b in model.named_blocks()]
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9, nesterov=True, weight_decay=1e-4)

    def step(batch):
        x, y = batch
        opt.zero_grad(set_to_none=True)
        h = x
        for block in blocks[:-1]:
            h = checkpoint(block, h, use_reentrant=False)
        nn.functional.cross_entropy(blocks[-1](h), y).backward()
        opt.step()

    return step


def plain_e2e_step(arch: str, device: str):
    """E2E as plain nn.Module code, without checkpointing."""
    model = model_for(arch).to(device).train()
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9, nesterov=True, weight_decay=1e-4)

    def step(batch):
        x, y = batch
        opt.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()

    return step
