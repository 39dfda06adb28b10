"""The functional core: nets as pure functions over parameter dicts; knows no scheme and no
training. Everything a scheme is made of lives here: blocks and nets (``net``), objectives
(``objective``), batches (``batch``), block identity (``identity``), ``torch.fx`` splits
(``trace``), randomness as an input (``randomness``) and moving hyper-parameters (``hyper``).

>>> import torch
>>> from torch import nn
>>> from mlaan_func import core
>>> net = core.from_module(nn.Sequential(nn.Linear(4, 8), nn.ReLU()))
>>> params, state = core.init_params(net, seed=0)
>>> tuple(net(params, state, torch.randn(2, 4))[0].shape)
(2, 8)
"""

from ..errors import DeviceMismatchError, ShapeError
from .batch import Batch, as_batch, input_of
from .net import (INPUT, AfterStep, Block, BlockLike, ExportedNet, Net, Params, State, blocks_of, check_keys, copy,
                  from_module, init_params, output_shape, reinitialise, to_module)
from .objective import LossContext, LossFn, Objective

__all__ = ["INPUT", "AfterStep", "Batch", "Block", "BlockLike", "DeviceMismatchError", "ExportedNet", "LossContext", "LossFn",
           "Net", "Objective", "Params", "ShapeError", "State", "as_batch", "blocks_of", "check_keys", "copy",
           "from_module", "init_params", "input_of", "output_shape", "reinitialise", "to_module"]
