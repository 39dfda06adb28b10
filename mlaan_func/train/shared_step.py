"""The shared step's old import path: sharing is now the executor's default form
(``mlaan_func.execute``); these names keep code written against it working.

>>> import torch
>>> import mlaan_func as mf
>>> backbone = mf.from_module(mf.models.CifarResNet(8, num_classes=5, widths=(4, 8, 8)))
>>> scheme = mf.schemes.mlaan(backbone, ["1.0", "2.0"], input_shape=(3, 8, 8))
>>> ts = mf.init(scheme, mf.optim.sgd(0.1))
>>> batch = (torch.randn(4, 3, 8, 8), torch.tensor([0, 1, 2, 3]))
>>> shared = shared_gradients(scheme)(ts, batch)
>>> alone = mf.gradients(scheme, share=False)(ts, batch)
>>> all(torch.equal(shared.grads[k], alone.grads[k]) for k in alone.grads)
True
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Sequence

from ..combinators import Objective
from .execute import Executor, executor, remat_every, use_shared
from .state import Gradients, TrainState

__all__ = ["remat_every", "shared_gradients", "shared_gradients_from", "use_shared"]


def shared_gradients(objectives: Sequence[Objective], *, compile: bool = False, backend: str = "inductor",
                     sum_cotangents: bool = False) -> Callable[[TrainState, Any], Gradients]:
    """``mf.gradients`` with sharing asked for (``share=True``, or ``"sum"``)."""
    run = executor(objectives, share="sum" if sum_cotangents else True, compile=compile, backend=backend)
    return lambda ts, batch: run(ts, batch, {})[0]


def shared_gradients_from(objectives: Sequence[Objective], given: Iterable[str] = (), keep: Iterable[str] = (),
                          *, compile: bool = False, backend: str = "inductor",
                          sum_cotangents: bool = False) -> Executor:
    """``mlaan_func.execute.executor`` with sharing asked for, from ``given`` boundaries."""
    return executor(objectives, share="sum" if sum_cotangents else True, compile=compile, backend=backend,
                    given=given, keep=keep)
