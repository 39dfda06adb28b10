"""A scheme no paper ships, composed in user code from the public combinators only.

*Growing windows with leap blocks.* The backbone is split into K modules. Module i < K-1
trains through a window whose width grows with depth — W_i = 1 + i // 2, so the first
modules learn locally like DGL and deeper ones receive gradient from further along, as in
MLAAN — and scores the window's output through a one-block leap trunk (a trainable copy of
the next backbone block plus its EMA twin, `leap_ema` + `copy`) and a linear head. The last
module trains the backbone's classifier through a window of width W_{K-1} as well.

Nothing here comes from `mlaan_func.schemes`: only `split`, `cascade`, `copy`, `leap_ema`,
`local_loss`, heads, losses, the optimizer and the engine. Before training, the scheme is
property-checked with `mlaan_func.testing` (cascade ∘ split is the identity; every loss
reaches exactly what it owns; a step is pure).

    python examples/custom_scheme.py            # about 30 s on 2 CPU cores
"""

from __future__ import annotations

import argparse
import time

import torch

import mlaan_func as mf
from mlaan_func import data, testing

SHAPE = (3, 16, 16)
AT = ["1.0", "1.1", "2.0", "2.1"]  # K = 5 modules of a CIFAR ResNet-14 (2 blocks per stage)


def width(i: int, modules: int) -> int:
    """The window width of module i: 1, 1, 2, 2, 3, … (never more modules than exist)."""
    return min(1 + i // 2, i + 1, modules)


def leap_block(backbone: mf.Net, name: str, prefix: str, decay: float) -> mf.Net:
    """A trainable copy of backbone block ``name`` plus its EMA twin: z ↦ copy(z) + twin(z)."""
    block = mf.Net(tuple(b for b in backbone.blocks if b.name == name))
    return mf.leap_ema(mf.copy(block, prefix), source=block, decay=decay)


def growing_windows(backbone: mf.Net, at: list[str], input_shape=SHAPE, decay: float = 0.99):
    """The scheme: one objective per module, each through a window of width W_i."""
    modules = mf.split(backbone, at)
    k = len(modules)
    names = list(backbone.block_names)
    classes = mf.output_shape(backbone, (2, *input_shape))[-1]
    objectives = []
    for i in range(k - 1):
        window = mf.cascade(*modules[i - width(i, k) + 1:i + 1])
        following = names[names.index(modules[i].output_name) + 1]   # the next backbone block
        trunk = leap_block(backbone, following, f"trunk{i}", decay)
        channels = mf.output_shape(mf.cascade(*modules[:i + 1], trunk), (2, *input_shape))[1]
        head = mf.from_module(mf.heads.linear(channels, classes), name=f"head{i}")
        objectives.append(mf.local_loss(window, mf.cascade(trunk, head), mf.losses.cross_entropy,
                                        name=f"m{i}"))
    last = mf.cascade(*modules[k - width(k - 1, k):])
    objectives.append(mf.local_loss(last, None, mf.losses.cross_entropy, name="final"))
    return modules, objectives


def check_scheme(backbone, modules, scheme, opt, ts, batch, params, state) -> None:
    """Property checks from mlaan_func.testing, plus the scheme's own reach."""
    testing.check_split_identity(backbone, AT, params, state, batch[0])
    testing.check_isolation(scheme, ts, batch)          # zero gradient outside each objective
    owner = {k: j for j, m in enumerate(modules) for k in m.param_names}
    for i, o in enumerate(scheme):
        reached = sorted({owner[k] for k in o.param_names if k in owner})
        w = width(i if o.name != "final" else len(modules) - 1, len(modules))
        end = i if o.name != "final" else len(modules) - 1
        assert reached == list(range(end - w + 1, end + 1)), (o.name, reached)
        assert not any(k.startswith("twin") for k in o.param_names), "twins must not be trained"
    testing.check_purity(mf.step(scheme, opt), ts, batch)               # a step never mutates its inputs


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    torch.manual_seed(args.seed)

    backbone = mf.from_module(mf.models.CifarResNet(14, num_classes=10, in_channels=3, widths=(8, 16, 32)))
    modules, scheme = growing_windows(backbone, AT)
    for o in scheme:
        print(f"{o.name:6s} reads {o.input_name!r:8s} params {len(o.param_names):3d} "
              f"after-steps {[a.key for a in o.after_steps]}")

    ds = data.synthetic(1024, 256, shape=SHAPE, seed=args.seed)
    x_train, x_test = data.normalize(ds.train_x, ds.mean, ds.std), data.normalize(ds.test_x, ds.mean, ds.std)
    opt = mf.optim.sgd(mf.optim.warmup_cosine(args.lr, 5, args.steps), momentum=0.9, nesterov=True,
                       weight_decay=1e-4)
    ts = mf.init(scheme, opt, seed=args.seed)

    params, state = mf.init_params(backbone, seed=args.seed)
    probe = (x_train[:8], ds.train_y[:8])
    tic = time.perf_counter()
    check_scheme(backbone, modules, scheme, opt, ts, probe, params, state)
    print(f"property checks passed ({time.perf_counter() - tic:.1f} s)")

    train_step = mf.step(scheme, opt)
    twin_key = next(k for k in ts.state if k.startswith("twin."))
    twin_before = ts.state[twin_key].clone()
    g = torch.Generator().manual_seed(args.seed)
    first = last = None
    tic = time.perf_counter()
    for s in range(args.steps):
        idx = torch.randint(0, len(ds.train_y), (args.batch_size,), generator=g)
        ts, metrics = train_step(ts, (x_train[idx], ds.train_y[idx]))
        losses = {n: float(m["loss"]) for n, m in metrics.items()}
        first = first or losses
        last = losses
        if s % 10 == 0 or s == args.steps - 1:
            print(f"step {s:3d} " + " ".join(f"{n}={v:.3f}" for n, v in losses.items()), flush=True)
    accuracy = mf.evaluate(scheme, ts, [(x_test, ds.test_y)])
    print(f"{args.steps} steps in {time.perf_counter() - tic:.1f} s; test accuracy "
          + " ".join(f"{n}={a:.3f}" for n, a in accuracy.items()))
    moved = float((ts.state[twin_key] - twin_before).abs().max())
    print(f"EMA twin {twin_key} moved by up to {moved:.2e}")
    print(f"final-classifier loss {first['final']:.3f} -> {last['final']:.3f}")
    return 0 if last["final"] < first["final"] and moved > 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
