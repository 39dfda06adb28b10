"""mlaan_func: supervised local learning (MLAAN, DGL, InfoPro, E2E) as pure functions.

>>> import mlaan_func as mf
>>> net = mf.from_module(mf.models.resnet32(num_classes=10))
>>> len(mf.split(net, at=mf.published_split("resnet32", 16)))
16

The package shows its layers (docs/design.md §4): ``errors``; ``core`` (nets, objectives,
batches, identity, tracing, randomness, hyper-parameters); ``combinators``; ``train`` (the
plan, the executor, the step, checkpoints); ``optim``; the scheme zoo (``schemes``: the
published schemes and recipes with their heads, losses, trunks, splits and released tables);
``parallel``; ``data`` and
``imagefolder``; ``models``; ``testing``; ``memory``.
"""

import sys as _sys

from . import errors, host_memory, models, optim, schemes
from .schemes import heads, labels, losses, splits, trunks
from .schemes import tables as published
from .combinators import FrozenBlock, LeapBlock, StackBlock, cascade, frozen, leap_ema, local_loss, split, stack
from .core import (AfterStep, Batch, Block, DeviceMismatchError, LossContext, Net, Objective, Params, ShapeError, State, copy,
                   from_module, hyper, identity, init_params, output_shape, randomness, to_module, trace)
from .errors import NonFiniteLossError
from .schemes.tables import infopro_lambda_table, leap_trunk_table, published_split
from .train import routing
from .train.remat import remat
from .train.state import TrainState
from .train.step import evaluate, gradients, init, load, save, step

__all__ = [
    "AfterStep", "Batch", "Block", "DeviceMismatchError", "FrozenBlock", "LeapBlock", "LossContext", "Net", "NonFiniteLossError",
    "Objective", "Params", "ShapeError", "StackBlock", "State", "TrainState", "cascade", "copy", "errors", "evaluate", "from_module", "frozen",
    "gradients", "heads", "host_memory", "hyper", "identity", "infopro_lambda_table", "init", "init_params", "labels",
    "leap_ema", "leap_trunk_table", "load", "local_loss", "losses", "models", "optim", "output_shape",
    "published", "published_split", "randomness", "remat", "routing", "save", "schemes", "split", "splits",
    "stack", "step", "to_module", "trace", "trunks",
]

# Modules that moved into the layers keep their old import paths (mlaan_func.engine, ...).
from .core import batch as _batch  # noqa: E402
from .schemes import recipes as _recipes  # noqa: E402
from .parallel import distributed as _distributed  # noqa: E402
from .train import (checkpoint as _checkpoint, execute as _execute, kernels as _kernels,  # noqa: E402
                    plan as _plan, remat as _remat, shared_step as _shared_step, state as _state,
                    step as _engine, vjp as _vjp)

MOVED = {"engine": _engine, "train_state": _state, "vjp": _vjp, "plan": _plan, "kernels": _kernels,
         "execute": _execute, "remat": _remat, "routing": routing, "checkpoint": _checkpoint,
         "shared_step": _shared_step, "distributed": _distributed, "batch": _batch, "hyper": hyper,
         "identity": identity, "randomness": randomness, "trace": trace, "heads": heads, "losses": losses,
         "trunks": trunks, "splits": splits, "published": published, "labels": labels,
         "imagenet_heads": schemes.imagenet_heads, "recipes": _recipes}
"""Old module name -> the module now: ``import mlaan_func.engine`` still works."""
for _old, _module in MOVED.items():
    _sys.modules[f"{__name__}.{_old}"] = _module
    globals().setdefault(_old, _module)
del _old, _module
