"""Splits of near-equal cost for any backbone and any K.

A block's cost is its forward FLOPs for one input (counted on the meta device by
``torch.utils.flop_counter``: no memory, no compute), plus one so that free blocks still
count. ``equal_cost_split`` puts module ends where the running cost is closest to
``j · total / K``.

>>> import mlaan_func as mf
>>> vit = mf.from_module(mf.models.vit_micro(10, 1, 28))
>>> equal_cost_split(vit, 2, input_shape=(1, 28, 28))
['blocks.1']
"""

from __future__ import annotations

from typing import Sequence

from torch.utils.flop_counter import FlopCounterMode

from ..core.net import Net, output_shape

ENDS = ("stem", "classifier")
"""Blocks never cut after on their own: the stem joins the first module, the classifier the
last (as in ``published.split_for``)."""


def block_costs(net: Net, input_shape: Sequence[int]) -> list[float]:
    """Forward FLOPs (+1) of each block of ``net`` for one input of ``input_shape``."""
    x_shape, costs = (1, *input_shape), []
    for block in net.blocks:
        one = Net((block,))
        with FlopCounterMode(display=False) as counter:
            y_shape = output_shape(one, x_shape)
        costs.append(float(counter.get_total_flops()) + 1.0)
        x_shape = y_shape
    return costs


def equal_cost_split(net: Net, modules: int, *, input_shape: Sequence[int] | None = None,
                     costs: Sequence[float] | None = None) -> list[str]:
    """``modules - 1`` cut points giving modules of near-equal cost (``costs`` per block, or
    measured for ``input_shape``). The stem joins the first module and the classifier the
    last; K may be anything from 1 to the number of other blocks."""
    names = list(net.block_names)
    if costs is None:
        if input_shape is None:
            raise ValueError("equal_cost_split needs input_shape (C, H, W) or per-block costs")
        costs = block_costs(net, input_shape)
    if len(costs) != len(names):
        raise ValueError(f"{len(costs)} costs for {len(names)} blocks; give one cost per block")
    units = [i for i, n in enumerate(names) if n not in ENDS]
    if not 1 <= modules <= len(units):
        raise ValueError(f"the net cannot be split into {modules} modules: it has {len(units)} blocks "
                         f"besides {' and '.join(ENDS)}; choose K between 1 and {len(units)}")
    cumulative, running = [], 0.0
    for c in costs:
        running += float(c)
        cumulative.append(running)
    allowed = units[:-1]
    cuts: list[int] = []
    for j in range(1, modules):
        after_last = [i for i in allowed if not cuts or i > cuts[-1]]
        room = after_last[:len(after_last) - (modules - 1 - j)]  # leave a block for each later cut
        target = j * running / modules
        cuts.append(min(room, key=lambda i: (abs(cumulative[i] - target), i)))
    return [names[i] for i in cuts]


def default_split(arch: str | None, net: Net, modules: int, input_shape: Sequence[int]) -> list[str]:
    """The split the program and the benchmarks use: the published one for ``arch``/K when
    there is one; else, for an arch with published tables (the CIFAR ResNets, whose blocks
    cost about the same), near-equal block counts as ``published.split_for`` always gave;
    else near-equal cost.

    >>> import mlaan_func as mf
    >>> default_split("resnet32", mf.from_module(mf.models.resnet32()), 16, (3, 32, 32))[:2]
    ['stem', '1.0']
    """
    from .tables import split_for, tables

    if arch is not None and arch in tables()["splits"]:
        return split_for(arch, net.block_names, modules)
    return equal_cost_split(net, modules, input_shape=input_shape)
