"""A batch: what a step is given, and the checks every step makes of it.

A batch is a ``Batch(x, y)``, a plain ``(x, y)`` pair (made a ``Batch``), or any pytree whose
first leaf is the input tensor (``{"x": ..., "y": ..., "x2": ...}``, ``(x, y, mask)``).

>>> import torch
>>> b = as_batch((torch.zeros(2, 3), torch.tensor([0, 1])))
>>> type(b).__name__, tuple(input_of(b).shape)
('Batch', (2, 3))
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import Tensor
from torch.utils._pytree import tree_leaves, tree_structure, tree_unflatten

from ..errors import BatchError, DeviceMismatchError


class Batch(NamedTuple):
    """One batch: normalised images ``x`` (N, C, H, W) and int64 labels ``y`` (N,).

    The engine accepts a plain ``(x, y)`` pair wherever it takes a batch.

    >>> b = Batch(torch.zeros(2, 3, 4, 4), torch.tensor([0, 1]))
    >>> tuple(b.x.shape), b.y.tolist()
    ((2, 3, 4, 4), [0, 1])
    """

    x: Tensor
    y: Tensor


def input_of(batch: Any) -> Tensor:
    """A batch's input: its first leaf (``x`` of a ``Batch`` or ``(x, y, ...)``, the first
    value of a dict).

    >>> input_of({"x": torch.zeros(2, 3), "y": torch.tensor([0, 1])}).shape
    torch.Size([2, 3])
    """
    leaves = tree_leaves(batch)
    if not leaves or not isinstance(leaves[0], Tensor):
        raise TypeError(f"a batch is (inputs, labels, ...), a Batch, or any pytree whose first leaf is the "
                        f"input tensor; got {type(batch).__name__} whose first leaf is "
                        f"{type(leaves[0]).__name__ if leaves else 'missing'}")
    return leaves[0]


def as_batch(batch: Any) -> Any:
    """A ``Batch`` for ``Batch`` and ``(x, y)`` pairs; any other pytree whose first leaf is the
    input tensor as it is (``{"x", "y", "x2"}``, ``(x, y, mask)``). Checks the lengths of
    inputs and labels where it can tell them apart."""
    if isinstance(batch, (tuple, list)) and len(batch) == 2 and all(isinstance(t, Tensor) for t in batch):
        batch = Batch(*batch)
    x = input_of(batch)
    if x.dim() == 0:
        raise BatchError("the batch's input is a 0-d tensor; its first dimension must be the samples")
    if x.shape[0] == 0:
        raise BatchError(f"the batch is empty (input of shape {tuple(x.shape)}); give every step at least "
                         "one sample (drop_last=True in a DataLoader avoids a short last batch)")
    if x.dtype == torch.uint8:
        raise BatchError("the batch's input is uint8 (raw pixels); convert and normalise it first, e.g. "
                         "x.float() / 255 (mlaan_func.data.normalize does both)")
    y = batch.y if isinstance(batch, Batch) else batch.get("y") if isinstance(batch, dict) else \
        batch[1] if isinstance(batch, (tuple, list)) and len(batch) > 1 else None
    if isinstance(y, Tensor) and y.dim() > 0 and x.shape[0] != y.shape[0]:
        raise BatchError(f"the batch has {x.shape[0]} inputs but {y.shape[0]} labels; pass one label per input")
    if isinstance(y, Tensor) and y.device != x.device:
        raise DeviceMismatchError(f"the batch's labels are on {y.device} but its inputs on {x.device}; move "
                                  f"both to one device (y.to({str(x.device)!r}))")
    return batch


def check_structure(batch: Any, first: Any) -> Any:
    """The batch's pytree structure, checked against the first one a step function saw."""
    spec = tree_structure(batch)
    if first is not None and spec != first:
        shape = lambda s: tree_unflatten(["T"] * s.num_leaves, s)  # noqa: E731
        raise BatchError(f"the batch's structure changed between steps: the first batch was {shape(first)!r}, "
                         f"this one is {shape(spec)!r} (T: a tensor); give every step the same kind of batch "
                         "(e.g. always (x, y) or always the same dict keys), or build a new step function")
    return spec


def check_device(x: Tensor, params: dict[str, Tensor]) -> None:
    device = next(iter(params.values())).device if params else x.device
    if x.device != device:
        raise DeviceMismatchError(f"the batch is on {x.device} but the parameters are on {device}; move the batch "
                         f"with .to({str(device)!r}) (or build the train state with init(..., device=))")
