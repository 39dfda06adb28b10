"""Published split points, leap-trunk tables and InfoPro loss weights, as shipped data.

>>> published_split("resnet32", 16)[:3]
['stem', '1.0', '1.1']
>>> leap_trunk_table("resnet32", 15)[0]
['2.0', '3.0', '3.2', '3.4']
"""

from __future__ import annotations

import functools
import json
from importlib import resources
from typing import Sequence

TABLE_FILES = ("released_tables.json", "imagenet_tables.json")
"""The data files under ``mlaan_func/resources``: CIFAR tables and ImageNet tables."""

SECTIONS = ("splits", "leap_trunks", "infopro_lambdas")


def _merge(into: dict, more: dict, where: str) -> None:
    for key, value in more.items():
        if key == "about":
            continue
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            _merge(into[key], value, f"{where}/{key}")
        elif key in into:
            raise ValueError(f"{where}/{key} is given twice in {TABLE_FILES}; keep each entry in one file")
        else:
            into[key] = value


@functools.cache
def tables() -> dict:
    """The released tables (``splits``, ``leap_trunks``, ``infopro_lambdas``) of every data
    file, merged; the ImageNet file also carries ``imagenet_heads``, ``recipes`` and ``notes``.

    >>> sorted(tables()["splits"])[:3]
    ['resnet101', 'resnet110', 'resnet152']
    """
    merged: dict = {}
    for name in TABLE_FILES:
        data = json.loads(resources.files("mlaan_func").joinpath(f"resources/{name}").read_text())
        for section in SECTIONS:
            _merge(merged.setdefault(section, {}), data.get(section, {}), section)
        for key, value in data.items():
            if key not in SECTIONS and key not in ("about", "notes"):
                merged[key] = value
        merged.setdefault("notes", {})[name] = data.get("notes", {})
    return merged


def _lookup(table: dict, what: str, arch: str, modules: int):
    archs = sorted(k for k in table if k != "about")
    if arch not in archs:
        raise ValueError(f"no published {what} for arch {arch!r}; known: {archs}")
    rows = table[arch]
    if str(modules) not in rows:
        raise ValueError(f"no published {what} for {arch} with {modules} modules; "
                         f"published K: {sorted(int(k) for k in rows)}. Pass the split yourself "
                         "(a list of block names) or use mlaan_func.published.split_for(arch, "
                         "block_names, K) for near-equal modules.")
    return rows[str(modules)]


def published_split(arch: str, modules: int) -> list[str]:
    """The blocks after which each module ends in the published ``arch``/K tables.

    InfoPro's ResNet-32 K=16 makes the stem a module of its own; MLAAN's "K=16" is 15
    modules, stem fused:

    >>> len(published_split("resnet32", 16)), published_split("resnet32", 16)[:2]
    (15, ['stem', '1.0'])
    >>> len(published_split("resnet32", 15)), published_split("resnet32", 15)[:2]
    (14, ['1.0', '1.1'])
    """
    return list(_lookup(tables()["splits"], "split", arch, modules))


def leap_trunk_table(arch: str, modules: int) -> list[list[str]]:
    """Released MLAAN trunks: row ``i`` is the trunk of the window ending at module ``i``.

    >>> table = leap_trunk_table("resnet32", 15)
    >>> len(table), table[1]
    (14, ['2.0', '3.0', '3.2', '3.4'])
    """
    return [list(r) for r in _lookup(tables()["leap_trunks"], "leap-trunk table", arch, modules)]


def infopro_lambda_table(scheme: str, arch: str, modules: int) -> tuple[float, float, float, float] | None:
    """``(ixx_1, ixy_1, ixx_2, ixy_2)`` published for ``scheme`` (``"infopro"`` or
    ``"infopro_mlaan"``), or ``None`` when no value was published.

    >>> infopro_lambda_table("infopro", "resnet32", 4)
    (6.0, 0.0, 1.0, 2.0)
    >>> infopro_lambda_table("infopro", "resnet32", 3) is None
    True
    """
    schemes = tables()["infopro_lambdas"]
    table = schemes.get(scheme, {}) if scheme != "about" else {}
    row = table.get(arch, {}).get(str(modules)) if arch != "about" else None
    return None if row is None else tuple(float(v) for v in row)


def split_for(arch: str | None, block_names: Sequence[str], modules: int) -> list[str]:
    """The published split of ``arch`` for ``modules`` when there is one, else ``modules``
    near-equal modules over the blocks after the stem (the stem joins the first module).

    >>> names = ["stem", "1.0", "1.1", "2.0", "2.1", "classifier"]
    >>> split_for(None, names, 2)
    ['1.1']
    """
    if arch is not None:
        try:
            return published_split(arch, modules)
        except ValueError:
            pass
    units = [n for n in block_names if n not in ("stem", "classifier")]
    if not 1 <= modules <= len(units):
        raise ValueError(f"{arch or 'the net'} cannot be split into {modules} modules: it has {len(units)} "
                         f"blocks after the stem; choose K between 1 and {len(units)}")
    return [units[round((j + 1) * len(units) / modules) - 1] for j in range(modules - 1)]
