"""Leap trunks (MLAAN's LAM): which deeper blocks a trunk copies, and the trunk net itself.

>>> names = ["stem"] + [f"{s}.{b}" for s in (1, 2, 3) for b in range(5)] + ["classifier"]
>>> leap_trunk_rule(names, after="1.0")
['2.0', '3.0', '3.2', '3.4']
>>> leap_trunk_rule(names, after="3.1")
['3.2', '3.3', '3.4']
"""

from __future__ import annotations

import functools
import math
from typing import Sequence

from torch import Tensor

from ..combinators import cascade, leap_ema
from ..core.net import Net, ShapeError, copy, output_shape


def _stage_of(name: str) -> int | None:
    head, _, tail = name.partition(".")
    return int(head) if head.isdigit() and tail.isdigit() else None


def _spread(candidates: list, places: int) -> list:
    """``places`` of ``candidates`` spread evenly, at positions ceil((j+1)·L/n) − 1 (all of
    them when there are places for all)."""
    if places >= len(candidates):
        return candidates
    if places <= 0:
        return []
    return [candidates[math.ceil((j + 1) * len(candidates) / places) - 1] for j in range(places)]


def leap_trunk_rule(block_names: Sequence[str], after: str, depth: int = 4) -> list[str]:
    """The blocks a trunk copies after module-ending block ``after`` (docs/design.md §2): the first
    block of every later stage, then up to ``depth`` blocks in all from the remaining blocks
    of the last stage after ``after``, spread evenly (positions ceil((j+1)·L/n) − 1)."""
    staged = [n for n in block_names if _stage_of(n) is not None]
    if after not in block_names:
        raise ValueError(f"unknown block {after!r}; blocks are {list(block_names)}")
    if not staged:
        raise ValueError("the leap-trunk rule needs blocks named 'stage.block'; pass a trunk table")
    later = staged[staged.index(after) + 1:] if after in staged else staged
    last_stage = _stage_of(staged[-1])
    firsts = [n for i, n in enumerate(later)
              if (i == 0 or _stage_of(later[i - 1]) != _stage_of(n)) and
              (i > 0 or after == "stem" or _stage_of(n) != _stage_of(after))]
    candidates = [n for n in later if _stage_of(n) == last_stage and n not in firsts]
    chosen = _spread(candidates, depth - len(firsts))
    return [n for n in later if n in set(firsts) | set(chosen)]


def block_shapes(backbone: Net, input_shape: Sequence[int]) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    """``(input shape, output shape)`` of each block of ``backbone`` (batch excluded) for one
    input of ``input_shape``, worked out on the meta device."""
    shape, shapes = (2, *input_shape), []
    for block in backbone.blocks:
        out = output_shape(Net((block,)), shape)
        shapes.append((tuple(shape[1:]), tuple(out[1:])))
        shape = out
    return shapes


@functools.lru_cache(maxsize=8)
def _stages(backbone: Net, input_shape: tuple[int, ...]) -> tuple[int, ...]:
    """Each block's stage: the first block alone, then a new stage at the second block and
    at every block that changes the feature shape (nets are immutable, so this is cached)."""
    shapes = block_shapes(backbone, input_shape)
    stage = [0]
    for j in range(1, len(shapes)):
        stage.append(stage[-1] + (1 if j == 1 or shapes[j][0] != shapes[j][1] else 0))
    return tuple(stage)


def leap_trunk_blocks(backbone: Net, after: str, depth: int = 4, *, input_shape: Sequence[int],
                      exact: bool = False) -> list[str]:
    """The leap-trunk rule for any backbone: the blocks a trunk copies after module-ending
    block ``after``.

    Stages are read from shapes: the first block is a stage of its own (the stem), and a new
    stage opens at the next block and at every later block whose output shape differs from
    its input (a stride or width change). The final block (the classifier) is never copied.
    The trunk takes every later block that opens a stage (shape-changing blocks first), then
    fills up to ``depth`` blocks from the remaining blocks of the last stage after ``after``,
    spread evenly (positions ceil((j+1)·L/n) − 1). On the CIFAR ResNets this is exactly
    ``leap_trunk_rule``. With ``exact=True``, asking for more blocks than remain is an error
    instead of a shorter trunk.

    >>> from mlaan_func import models
    >>> from mlaan_func.core import from_module
    >>> vit = from_module(models.vit_micro(10, 1, 28))
    >>> leap_trunk_blocks(vit, "blocks.0", 2, input_shape=(1, 28, 28))
    ['blocks.2', 'blocks.3']
    """
    names = list(backbone.block_names)
    if isinstance(depth, bool) or not isinstance(depth, int) or depth < 1:
        raise ValueError(f"trunk depth must be a positive int, got {depth!r}")
    if after not in names:
        raise ValueError(f"unknown block {after!r}; blocks are {names}")
    stage = _stages(backbone, tuple(input_shape))
    index = names.index(after)
    later = list(range(index + 1, len(names) - 1))
    if exact and len(later) < depth:
        raise ValueError(f"a trunk of {depth} blocks after {after!r} was asked for, but only {len(later)} "
                         f"blocks remain before the classifier ({[names[j] for j in later]}); lower the "
                         "trunk depth, end the window earlier, or pass exact=False for a shorter trunk")
    firsts = [j for j in later if stage[j] != stage[j - 1]]
    last_stage = stage[len(names) - 2] if len(names) > 1 else 0
    candidates = [j for j in later if stage[j] == last_stage and j not in firsts]
    chosen = _spread(candidates, depth - len(firsts))
    return [names[j] for j in later if j in set(firsts) | set(chosen)]


def leap_trunk(backbone: Net, blocks: Sequence[str], prefix: str, decay: float | Tensor,
               *, twin: str = "twin", input_shape: Sequence[int] | None = None, scale: str | None = None) -> Net:
    """``cascade(leap_ema(copy(b0), b0), copy(b1), …)`` over the named backbone blocks: the
    copies are named ``<prefix>.<block>``, the EMA twin of ``b0`` ``<twin>.<b0>`` (twins of one
    source under one ``twin`` prefix are one twin). ``scale`` (a key) blends the first copy
    and its twin by a learnable scalar, ``s·copy(z) + (2 − s)·twin(z)`` (``leap_ema``).

    With ``input_shape`` (batch included), checks that the blocks chain (channels, stride).

    >>> from mlaan_func import models
    >>> from mlaan_func.core import from_module
    >>> net = from_module(models.CifarResNet(14, num_classes=10, widths=(4, 8, 8)))
    >>> trunk = leap_trunk(net, ["2.0", "3.0"], "trunk1", 0.995, input_shape=(2, 4, 8, 8))
    >>> trunk.block_names, output_shape(trunk, (2, 4, 8, 8)), "twin.2.0.conv1.weight" in trunk.state_names
    (('trunk1.2.0', 'trunk1.3.0'), (2, 8, 2, 2), True)
    """
    by_name = {b.name: b for b in backbone.blocks}
    unknown = [b for b in blocks if b not in by_name]
    if not blocks or unknown:
        raise ValueError(f"a leap trunk needs known backbone blocks, got {list(blocks)}"
                         + (f" (unknown: {unknown})" if unknown else ""))
    repeated = sorted({b for b in blocks if list(blocks).count(b) > 1})
    if repeated:
        raise ValueError(f"the leap trunk {list(blocks)} copies {repeated} more than once; copies share "
                         "their source's name under one prefix, so they would share parameters. "
                         "List each block once.")
    first = Net((by_name[blocks[0]],))
    trunk = cascade(leap_ema(copy(first, prefix), first, decay, twin=twin, scale=scale),
                    *(copy(Net((by_name[b],)), prefix) for b in blocks[1:]))
    if input_shape is not None:
        try:
            output_shape(trunk, input_shape)
        except ShapeError as err:
            raise ValueError(f"the leap trunk {list(blocks)} does not chain on an input of shape "
                             f"{tuple(input_shape)}: {err}. Each block must take the previous one's "
                             "channels and size; fix the trunk table.") from err
    return trunk
