"""Names are identities: one name, one block, checked rather than assumed.

Every parameter and state key of a scheme is claimed by the block that holds it. Two
claims on one key must come from the same block: the same root (the block it was first
made from, kept by ``copy``), the same module type and the same tensor shapes. Anything
else (a 5-class head named like a 4-class one, a head called ``"2"`` beside backbone block
``"2"``) would silently share or drop tensors, so it is a ``ValueError`` naming both users.
EMA twins of one source under one prefix are one twin, so they must agree on the decay.

>>> from torch import nn
>>> from mlaan_func.core import from_module
>>> backbone = from_module(nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4)))
>>> head = from_module(nn.Linear(4, 5), name="2")
>>> try:
...     check_identity(backbone, head)
... except ValueError as err:
...     print(str(err).split(":")[0])
two different blocks use the name '2.weight'
"""

from __future__ import annotations

from typing import Any, Iterator

import torch


def _signature(block: Any) -> tuple:
    module = block.module
    shapes = tuple((n, tuple(t.shape)) for n, t in [*module.named_parameters(), *module.named_buffers()])
    return block.root, type(module).__qualname__, shapes


def _describe(block: Any, user: str) -> str:
    root = f", copied from '{block.root}'" if block.root != block.name else ""
    return f"block '{block.name}' ({type(block.module).__name__}{root}) in {user}"


def _claims(block: Any, user: str) -> Iterator[tuple[str, tuple, str]]:
    """``(key, signature, description)`` for every key a block (or composite) holds."""
    if hasattr(block, "module") and hasattr(block, "local_params"):
        sig, text = _signature(block), _describe(block, user)
        local = dict([*block.module.named_parameters(), *block.module.named_buffers()])
        names = (*block.local_params, *block.local_state)
        for key, name in zip((*block.param_names, *block.state_names), names):
            yield key, sig, f"{text}, where it has shape {tuple(local[name].shape)}"
        return
    for part in ("copy", "twin", "source"):
        net = getattr(block, part, None)
        for inner in getattr(net, "blocks", ()):
            yield from _claims(inner, user)


def _users(items: tuple) -> Iterator[tuple[str, Any]]:
    for item in items:
        if isinstance(item, (list, tuple)):
            yield from _users(tuple(item))
        elif item is None:
            continue
        elif hasattr(item, "nets") and hasattr(item, "name"):
            for net in item.nets:
                for block in net.blocks:
                    yield f"objective {item.name!r}", block
        elif hasattr(item, "blocks"):
            for block in item.blocks:
                yield "a net", block
        else:
            yield "a net", item


def check_identity(*items: Any) -> None:
    """Raise ``ValueError`` if two different blocks (root, module type, shapes) share a
    name anywhere in ``items`` (nets, objectives, schemes), or two EMA twins of one source
    disagree on their decay.

    >>> from torch import nn
    >>> from mlaan_func.core import copy, from_module
    >>> fc = from_module(nn.Linear(2, 2), name="fc")
    >>> check_identity(fc, copy(fc, "trunk"), from_module(nn.Linear(2, 2), name="fc"))
    """
    owner: dict[str, tuple[tuple, str]] = {}
    decays: dict[tuple[str, ...], tuple[torch.Tensor, str]] = {}
    for user, block in _users(items):
        for key, sig, text in _claims(block, user):
            seen = owner.setdefault(key, (sig, text))
            if seen[0] != sig:
                raise ValueError(
                    f"two different blocks use the name {key!r}: {seen[1]} and {text}. A name is "
                    "an identity (tensors under one name are one tensor); give one of them another "
                    "name (from_module(module, name=...)) or make it a renamed copy "
                    "(mlaan_func.copy(net, prefix)).")
        twin = getattr(block, "twin", None)
        decay = getattr(block, "decay", None)
        if twin is not None and decay is not None:
            names = twin.param_names + twin.state_names
            seen_decay = decays.setdefault(names, (decay, f"{block.name!r} in {user}"))
            if not _same_decay(seen_decay[0], decay):
                raise ValueError(
                    f"the EMA twin {twin.block_names} is one twin shared by {seen_decay[1]} "
                    f"(decay {_decay_text(seen_decay[0])}) and {block.name!r} in {user} (decay "
                    f"{_decay_text(decay)}); use one decay, or give one leap_ema its own twin prefix "
                    "(leap_ema(..., twin='twin_b')).")


def _same_decay(a, b) -> bool:
    """Numbers compare by value; a schedule or a held decay is the same only as itself (a
    held decay is keyed by its twin, so two held decays of one twin are one value)."""
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return torch.equal(a, b)
    if type(a).__name__ == "Held" and type(b).__name__ == "Held":
        return a.key == b.key
    return a is b


def _decay_text(decay) -> str:
    return f"{float(decay)}" if isinstance(decay, torch.Tensor) else type(decay).__name__
