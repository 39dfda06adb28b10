"""Schemes by name: the published ones and the recipes that take a backbone and cut points.

>>> import mlaan_func as mf
>>> net = mf.from_module(mf.models.CifarResNet(14, num_classes=10, widths=(4, 8, 8)))
>>> [o.name for o in build("dgl", net, ["2.1"], input_shape=(3, 8, 8))]
['m0', 'final']
"""

from __future__ import annotations

from typing import Sequence

from ..core import Net, Objective
from .catalog import dgl, dgl_mlaan, e2e, infopro, infopro_mlaan, mlaan
from .recipes import auglocal, hpff, man, neuron_groups, pgl, sgr

SCHEMES = ("e2e", "dgl", "infopro", "mlaan", "dgl_mlaan", "infopro_mlaan")

RECIPES = ("hpff", "auglocal", "man", "neuron_groups", "pgl", "sgr")
"""The recipes of ``mlaan_func.schemes.recipes`` that ``build`` also takes (``neuron_groups``
needs ``groups=``; ``pgl`` is DGL with an end-to-end step every ``every=`` steps, default 4)."""


def _pgl(backbone: Net, at: Sequence[str], *, input_shape: Sequence[int], every: int = 4) -> list[Objective]:
    return pgl(dgl(backbone, at, input_shape=input_shape), e2e(backbone), every=every)


def build(method: str, backbone: Net, at: Sequence[str], *, input_shape: Sequence[int] = (3, 32, 32),
          **options) -> list[Objective]:
    """A published scheme by name (``-`` or ``_``): e2e, dgl, infopro, mlaan, dgl_mlaan,
    infopro_mlaan, or one of the ``RECIPES``. ``e2e`` ignores ``at`` (it is always one module).

    >>> import mlaan_func as mf
    >>> net = mf.from_module(mf.models.CifarResNet(14, num_classes=10, widths=(4, 8, 8)))
    >>> [o.name for o in build("neuron-groups", net, ["2.1"], input_shape=(3, 8, 8), groups=2)]
    ['m0.g0', 'm0.g1', 'final']
    """
    name = method.replace("-", "_").lower()
    if name not in SCHEMES + RECIPES:
        raise ValueError(f"unknown scheme {method!r}; choose one of {', '.join(SCHEMES + RECIPES)}")
    if name == "e2e":
        return e2e(backbone)
    return {"dgl": dgl, "infopro": infopro, "mlaan": mlaan, "dgl_mlaan": dgl_mlaan, "infopro_mlaan": infopro_mlaan,
            "hpff": hpff, "auglocal": auglocal, "man": man,
            "neuron_groups": neuron_groups, "pgl": _pgl, "sgr": sgr}[name](backbone, at, input_shape=input_shape, **options)
