"""Memory layout of a step's image tensors: the same values, stored channels-last or not.

CPU convolutions (oneDNN) run 1.13-1.17x faster on channels-last (NHWC) tensors in an eager
ResNet-32 step (``bench/compile.py``, docs/design.md §4 "Layout"). A step asked for it
(``memory_format=torch.channels_last``) converts its 4-d tensors (input, convolution weights,
EMA twins in the state) before it runs; only strides change, never values, but convolutions
and BatchNorm sum in another order, so the gradients are equal to float32 rounding, not bit
for bit, and further from float64 than the contiguous ones. The default keeps the layout a
step is given: the published schemes' gradients stay bit-identical to the released code, and
a compiled CPU step gains nothing from it (CPU inductor lays convolutions out channels-last
inside its graphs already).

One fault of torch's CPU convolutions keeps a net out of channels-last: the weight gradient of
a strided 1×1 convolution with 2 to 6 input channels corrupts the heap in that layout (torch
2.13 CPU, one thread; ``bench/layout_fault.py`` reproduces it), so asking for channels-last on
the CPU for a net with such a convolution raises.

>>> import torch
>>> resolve(None, x=torch.zeros(2, 3, 4, 4)) == torch.preserve_format
True
>>> t = convert({"w": torch.zeros(2, 3, 4, 4), "b": torch.zeros(2)}, torch.channels_last)
>>> t["w"].is_contiguous(memory_format=torch.channels_last), t["b"].shape
(True, torch.Size([2]))
"""

from __future__ import annotations

from typing import Any, Iterable, Sequence

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten, tree_unflatten

FORMATS = (torch.preserve_format, torch.contiguous_format, torch.channels_last)


def resolve(memory_format: torch.memory_format | None, *, x: Tensor,
            faulty: Sequence[str] = ()) -> torch.memory_format:
    """The layout a step runs in: ``memory_format``; ``None`` (the default): as given.
    ``faulty``: the net's convolutions that channels-last breaks on the CPU (``faulty_convolutions``)."""
    if memory_format is None:
        return torch.preserve_format
    if memory_format not in FORMATS:
        raise ValueError(f"memory_format must be None, torch.preserve_format, torch.contiguous_format or "
                         f"torch.channels_last; got {memory_format!r}")
    if memory_format == torch.channels_last and x.device.type == "cpu" and faulty:
        raise ValueError(f"channels-last on the CPU corrupts memory in the weight gradient of a strided 1x1 "
                         f"convolution with 2 to 6 input channels, and this net has {len(faulty)} "
                         f"({', '.join(faulty[:3])}); leave memory_format=None (the layout as given) or widen them")
    return memory_format


def faulty_convolutions(modules: Iterable[tuple[str, nn.Module]]) -> list[str]:
    """The names of the 2-d convolutions among ``modules`` (name, module) whose weight gradient
    channels-last corrupts on the CPU: 1×1 kernel, a stride above 1, 2 to 6 input channels."""
    return [name for name, m in modules if isinstance(m, nn.Conv2d) and tuple(m.kernel_size) == (1, 1)
            and max(m.stride) > 1 and 2 <= m.in_channels // m.groups <= 6]


def convert(tensors: dict[str, Tensor], memory_format: torch.memory_format) -> dict[str, Tensor]:
    """``tensors`` with every 4-d floating tensor in ``memory_format`` (those already in it,
    and all others, as they are)."""
    if memory_format == torch.preserve_format:
        return tensors
    return {k: _to(v, memory_format) for k, v in tensors.items()}


def convert_batch(batch: Any, memory_format: torch.memory_format) -> Any:
    """``batch`` with its input (first leaf) in ``memory_format``."""
    if memory_format == torch.preserve_format:
        return batch
    leaves, spec = tree_flatten(batch)
    x = _to(leaves[0], memory_format)
    return batch if x is leaves[0] else tree_unflatten([x, *leaves[1:]], spec)


def _to(t: Tensor, memory_format: torch.memory_format) -> Tensor:
    if t.dim() != 4 or not t.is_floating_point() or t.is_contiguous(memory_format=memory_format):
        return t
    return t.contiguous(memory_format=memory_format)
