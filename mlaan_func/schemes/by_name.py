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
from .recipes import auglocal, hpff, man, man_pp, neuron_groups, pgl, sgr

SCHEMES = ("e2e", "dgl", "infopro", "mlaan", "dgl_mlaan", "infopro_mlaan")

RECIPES = ("hpff", "auglocal", "man", "man_pp", "neuron_groups", "pgl", "sgr")
"""The recipes of ``mlaan_func.schemes.recipes`` that ``build`` also takes (``neuron_groups``
with ``groups=2`` unless given; ``pgl`` is DGL with an end-to-end step every ``every=`` steps,
default 4; ``man_pp`` is also spelt ``man++``)."""

RESTORES_IMAGE = ("infopro", "infopro_mlaan", "hpff", "man", "man_pp")
"""The schemes that take the data's ``mean`` and ``std`` (their heads may reconstruct the
de-normalised image); ``build`` passes ``mean=``/``std=`` to these and drops them for the others."""

DEFAULTS = {"neuron_groups": {"groups": 2}}
"""Options ``build`` fills in when not given (the program and ``bench/accuracy.py`` build
through it)."""


def method_name(method: str) -> str:
    """The canonical name of a scheme: lower case, ``-`` as ``_``, ``++`` as ``_pp``.

    >>> method_name("DGL-MLAAN"), method_name("man++"), method_name("neuron-groups")
    ('dgl_mlaan', 'man_pp', 'neuron_groups')
    """
    return method.replace("++", "_pp").replace("-", "_").lower()


def _pgl(backbone: Net, at: Sequence[str], *, input_shape: Sequence[int], every: int = 4) -> list[Objective]:
    return pgl(dgl(backbone, at, input_shape=input_shape), e2e(backbone), every=every)


def build(method: str, backbone: Net, at: Sequence[str], *, input_shape: Sequence[int] = (3, 32, 32),
          mean: Sequence[float] | None = None, std: Sequence[float] | None = None, **options) -> list[Objective]:
    """A published scheme by name (``-`` or ``_``, :func:`method_name`): e2e, dgl, infopro,
    mlaan, dgl_mlaan, infopro_mlaan, or one of the ``RECIPES``, with ``DEFAULTS`` for options
    not given. ``e2e`` ignores ``at`` (it is always one module). ``mean``/``std`` (the data's
    normalisation) reach the schemes in ``RESTORES_IMAGE`` and no others.

    >>> import mlaan_func as mf
    >>> net = mf.from_module(mf.models.CifarResNet(14, num_classes=10, widths=(4, 8, 8)))
    >>> [o.name for o in build("neuron-groups", net, ["2.1"], input_shape=(3, 8, 8))]
    ['m0.g0', 'm0.g1', 'final']
    >>> [o.name for o in build("man++", net, ["2.1"], input_shape=(3, 8, 8), mean=[0.5] * 3, std=[0.25] * 3)]
    ['m0', 'final']
    """
    name = method_name(method)
    if name not in SCHEMES + RECIPES:
        raise ValueError(f"unknown scheme {method!r}; choose one of {', '.join(SCHEMES + RECIPES)}")
    if name == "e2e":
        return e2e(backbone)
    options = {**DEFAULTS.get(name, {}), **options}
    if name in RESTORES_IMAGE:
        options.update({k: v for k, v in (("mean", mean), ("std", std)) if v is not None})
    return {"dgl": dgl, "infopro": infopro, "mlaan": mlaan, "dgl_mlaan": dgl_mlaan, "infopro_mlaan": infopro_mlaan,
            "hpff": hpff, "auglocal": auglocal, "man": man, "man_pp": man_pp,
            "neuron_groups": neuron_groups, "pgl": _pgl, "sgr": sgr}[name](backbone, at, input_shape=input_shape, **options)
