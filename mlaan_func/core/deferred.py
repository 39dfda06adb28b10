"""Checks that would read a device value, deferred inside a training step (design.md §4,
"host reads").

A check of *values* (labels in range) needs the value on the host: on CUDA one
synchronisation per check, so the GPU idles between blocks. Called on its own, a loss
checks eagerly and raises at once. Inside ``mf.step`` (``deferred_checks()``) it instead
returns a *poison*: a 0-d factor, 1.0 when the check holds and NaN when it fails, that the
loss multiplies in. ``x * 1.0`` is ``x`` exactly, so good batches get bit-identical losses
and gradients; a bad one gets a NaN loss and NaN gradients, which the step's one finite
read catches; the step then runs the gradients again with eager checks, so the error names
the cause (``ValueError: labels must lie in [0, 10) ...``).

>>> import torch
>>> bad = torch.tensor([0, 12])
>>> checks_deferred()
False
>>> with deferred_checks():
...     float(poison((bad < 0) | (bad >= 10)))
nan
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Iterator

import torch
from torch import Tensor

_DEFERRED: contextvars.ContextVar[bool] = contextvars.ContextVar("mlaan_func_deferred_checks", default=False)


@contextlib.contextmanager
def deferred_checks(deferred: bool = True) -> Iterator[None]:
    """Within the block, value checks poison the loss instead of reading the device."""
    token = _DEFERRED.set(deferred)
    try:
        yield
    finally:
        _DEFERRED.reset(token)


def checks_deferred() -> bool:
    """Whether value checks are deferred: inside ``deferred_checks()``, or while compiling
    (a compiled graph cannot read a value without breaking)."""
    return torch.compiler.is_compiling() or _DEFERRED.get()  # compiling first: dynamo never reads the variable


def poison(bad: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """A 0-d factor of ``dtype``: NaN where any entry of ``bad`` is true, else exactly 1.0."""
    return torch.where(bad.any(), torch.nan, 1.0).to(dtype)
