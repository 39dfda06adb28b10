"""Parameter labels for ``optim.partition`` and ``optim.masked``: functions ``params -> dict``.

``by_objective(scheme)`` labels each parameter by the role it plays in a scheme;
``by_name(patterns, default)`` by glob patterns on its name. Both take any subset of the
scheme's parameters, so they serve nested partitions too.

>>> from torch import nn
>>> import mlaan_func as mf
>>> net = mf.from_module(nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 3)))
>>> first, last = mf.split(net, at=["1"])
>>> head = mf.from_module(nn.Linear(4, 3), name="head")
>>> scheme = [mf.local_loss(first, head, mf.losses.cross_entropy, name="m0"),
...           mf.local_loss(last, None, mf.losses.cross_entropy, name="final")]
>>> params, _ = mf.init_params(*scheme)
>>> by_objective(scheme)(params)
{'0.weight': 'backbone', '0.bias': 'backbone', 'head.weight': 'heads', 'head.bias': 'heads', '2.weight': 'backbone', '2.bias': 'backbone'}
"""

from __future__ import annotations

import fnmatch
from typing import Any, Callable, Sequence

from ..combinators import LeapBlock, Objective
from ..core.net import Params

LabelFn = Callable[[Params], dict[str, Any]]

BACKBONE, HEADS, TRUNKS, COPIES = "backbone", "heads", "trunks", "copies"


def _is_copy(block: Any) -> bool:
    return getattr(block, "prefix", None) != getattr(block, "root", None)


def _roles(objective: Objective) -> list[tuple[str, str]]:
    """``(parameter name, role)`` for every parameter an objective trains."""
    out: list[tuple[str, str]] = []
    for block in objective.net.blocks:
        role = TRUNKS if isinstance(block, LeapBlock) else COPIES if _is_copy(block) else BACKBONE
        out += [(k, role) for k in block.param_names]
    in_trunk = False
    for block in objective.head.blocks if objective.head is not None else ():
        if isinstance(block, LeapBlock):
            in_trunk, role = True, TRUNKS
        elif _is_copy(block):
            role = TRUNKS if in_trunk else COPIES
        else:
            in_trunk, role = False, HEADS
        out += [(k, role) for k in block.param_names]
    return out


def by_objective(scheme: Sequence[Objective]) -> LabelFn:
    """Label each parameter of ``scheme`` by its role: ``"backbone"`` (the blocks objectives
    read as their net), ``"heads"`` (auxiliary heads), ``"trunks"`` (the trainable copies
    of a leap trunk, from its ``leap_ema`` block on) or ``"copies"`` (other copies of
    backbone blocks, e.g. heads made of later blocks).

    >>> import mlaan_func as mf
    >>> net = mf.from_module(mf.models.resnet32(num_classes=10))
    >>> scheme = mf.schemes.mlaan(net, mf.published_split("resnet32", 4))
    >>> params, _ = mf.init_params(*scheme)
    >>> sorted(set(by_objective(scheme)(params).values()))
    ['backbone', 'heads', 'trunks']
    """
    roles: dict[str, str] = {}
    for objective in scheme:
        if not isinstance(objective, Objective):
            raise TypeError(f"by_objective takes a scheme (a list of objectives), got a "
                            f"{type(objective).__name__} in it")
        for name, role in _roles(objective):
            if roles.setdefault(name, role) != role:
                raise ValueError(f"parameter {name!r} is both {roles[name]!r} and {role!r} (objective "
                                 f"{objective.name!r}); label it with by_name(..., default=by_objective(scheme))")

    def labels(params: Params) -> dict[str, str]:
        unknown = [k for k in params if k not in roles]
        if unknown:
            raise ValueError(f"parameters {unknown[:5]} belong to no objective of the scheme given to "
                             "by_objective; pass the same scheme that mlaan_func.init was given")
        return {k: roles[k] for k in params}

    return labels


def by_name(patterns: dict[Any, "str | Sequence[str]"], default: Any = None) -> LabelFn:
    """Label each parameter with the first label whose glob pattern(s) match its name
    (``fnmatch``: ``*``, ``?``, ``[seq]``); names no pattern matches get ``default``, which
    may itself be a label function (e.g. ``by_objective(scheme)``).

    >>> import torch
    >>> labels = by_name({"frozen": ["stem.*", "1.*"]}, default="trainable")
    >>> labels({"stem.weight": torch.ones(1), "1.0.w": torch.ones(1), "head.w": torch.ones(1)})
    {'stem.weight': 'frozen', '1.0.w': 'frozen', 'head.w': 'trainable'}
    """
    if not isinstance(patterns, dict):
        raise ValueError("by_name takes a dict {label: glob pattern or list of patterns}")
    rules = [(label, (p,) if isinstance(p, str) else tuple(p)) for label, p in patterns.items()]

    def labels(params: Params) -> dict[str, Any]:
        out: dict[str, Any] = {}
        rest: list[str] = []
        for k in params:
            matched = [lab for lab, pats in rules if any(fnmatch.fnmatchcase(k, p) for p in pats)]
            if matched:
                out[k] = matched[0]
            else:
                rest.append(k)
        if rest:
            if default is None:
                raise ValueError(f"parameters {rest[:5]} match none of the patterns {dict(rules)}; add a "
                                 "pattern for them or pass default= (a label or a label function)")
            extra = default({k: params[k] for k in rest}) if callable(default) else dict.fromkeys(rest, default)
            out.update(extra)
        return {k: out[k] for k in params}

    return labels


__all__ = ["BACKBONE", "COPIES", "HEADS", "TRUNKS", "by_name", "by_objective"]
