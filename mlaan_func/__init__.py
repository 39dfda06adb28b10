"""mlaan_func: supervised local learning (MLAAN, DGL, InfoPro, E2E) as pure functions.

>>> import mlaan_func as mf
>>> net = mf.from_module(mf.models.resnet32(num_classes=10))
>>> len(mf.split(net, at=mf.published_split("resnet32", 16)))
16
"""

from . import heads, losses, models, optim, published, schemes, splits, trace, trunks
from .combinators import LeapBlock, Objective, cascade, leap_ema, local_loss, split
from .core import (AfterStep, Block, Net, Params, ShapeError, State, copy, from_module,
                   init_params, output_shape, to_module)
from .engine import (NonFiniteLossError, TrainState, evaluate, gradients, init, load, save,
                     step)
from .losses import Batch
from .published import infopro_lambda_table, leap_trunk_table, published_split
from .remat import remat
from . import hyper, labels

__all__ = [
    "AfterStep", "Batch", "Block", "LeapBlock", "Net", "NonFiniteLossError", "Objective",
    "Params", "ShapeError", "State", "TrainState", "cascade", "copy", "evaluate", "from_module",
    "gradients", "heads", "infopro_lambda_table", "init", "init_params", "leap_ema",
    "leap_trunk_table", "load", "local_loss", "losses", "models", "optim", "output_shape",
    "published", "published_split", "remat", "save", "schemes", "split", "splits", "step", "to_module", "trace",
    "trunks",
]
__all__ += ["hyper", "labels"]

from . import identity, randomness, routing  # noqa: E402
from .core import DeviceMismatchError  # noqa: E402

__all__ += ["DeviceMismatchError", "identity", "randomness", "routing"]
