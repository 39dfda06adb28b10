"""Names are identities: one name, one block, checked rather than assumed.

A block's *fingerprint* says what function it computes, without its names: the classes of
its modules, their configuration (every non-tensor attribute that can change what
``forward`` computes, through every submodule) and its tensors' local names, shapes and
dtypes. Composite blocks (a leap block) are fingerprinted through their ``children()``.
The same fingerprint is what the identity check, the planner of a shared step (which runs
two applications of one block once) and the compiled kernels (one per kind of block) use.

Every parameter and state key of a scheme is claimed by the block that holds it. Two
claims on one key must come from the same block: the same root (the block it was first
made from, kept by ``copy``) and the same fingerprint. Anything else (a 5-class head named
like a 4-class one, two heads that differ in a plain attribute, a head called ``"2"``
beside backbone block ``"2"``) would silently share or drop tensors, so it is an
``IdentityError`` (a ``ValueError``) naming both users and what differs. EMA twins of one
source under one prefix are one twin, so they must agree on the decay.

>>> from torch import nn
>>> from mlaan_func.core import from_module
>>> backbone = from_module(nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4)))
>>> head = from_module(nn.Linear(4, 5), name="2")
>>> try:
...     check_identity(backbone, head)
... except IdentityError as err:
...     print(str(err).split(":")[0])
two different blocks use the name '2.weight'
"""

from __future__ import annotations

from typing import Any, Hashable, Iterator

import torch
from torch import fx, nn

from ..errors import IdentityError

_MODULE_INTERNALS = frozenset(vars(nn.Module())) | {"_compiled_call_impl"}
_HOOKS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")


def _key(value: Any) -> Hashable:
    """``value`` as a comparable key: containers by content, tensors by dtype, shape and
    values, other hashable values as they are; anything else by identity (it cannot be
    compared from the outside, so only the same object counts as the same)."""
    if isinstance(value, torch.Tensor):
        return ("tensor", value.dtype, tuple(value.shape), tuple(value.detach().cpu().flatten().tolist())
                if value.numel() <= 64 and value.device.type != "meta" else id(value))
    if isinstance(value, (list, tuple)):
        return (type(value).__name__, *(_key(v) for v in value))
    if isinstance(value, dict):
        return ("dict", *sorted(((repr(k), _key(v)) for k, v in value.items()), key=lambda kv: kv[0]))
    if isinstance(value, (set, frozenset)):
        return ("set", frozenset(_key(v) for v in value))
    if isinstance(value, fx.Graph):
        return ("graph", str(value))
    try:
        hash(value)
    except TypeError:
        return ("object", type(value).__qualname__, id(value))
    return value


def _configuration(module: nn.Module) -> tuple:
    """The attributes of one module (not its children, parameters or buffers) that can
    change what its ``forward`` computes, plus its hooks, by name."""
    items = [(k, _key(v)) for k, v in vars(module).items() if k not in _MODULE_INTERNALS]
    items += [(h, tuple(id(f) for f in getattr(module, h).values())) for h in _HOOKS if getattr(module, h)]
    return tuple(sorted(items, key=lambda kv: kv[0]))


def module_fingerprint(module: nn.Module) -> tuple:
    """What ``module`` computes, without names: per submodule its path, class and
    configuration, then every tensor's local name, shape and dtype.

    >>> module_fingerprint(nn.Linear(3, 2)) == module_fingerprint(nn.Linear(3, 2))
    True
    >>> module_fingerprint(nn.Linear(3, 2)) == module_fingerprint(nn.Linear(3, 2, bias=False))
    False
    """
    parts = tuple((path, f"{type(m).__module__}.{type(m).__qualname__}", _configuration(m))
                  for path, m in module.named_modules())
    tensors = tuple((n, tuple(t.shape), t.dtype)
                    for n, t in [*module.named_parameters(), *module.named_buffers()])
    return ("module", parts, tensors)


def fingerprint(block: Any) -> tuple:
    """A block's fingerprint: ``module_fingerprint`` of a module block; for a composite, its
    own configuration (``block.configuration()``) and its children's fingerprints.

    >>> from mlaan_func.core import Block
    >>> fingerprint(Block.of("a", nn.Linear(3, 2))) == fingerprint(Block.of("b", nn.Linear(3, 2)))
    True
    """
    module = getattr(block, "module", None)
    if isinstance(module, nn.Module):
        return module_fingerprint(module)
    own = block.configuration() if hasattr(block, "configuration") else ()
    return (type(block).__qualname__, own, tuple(fingerprint(c) for c in block.children()))


def identity_key(block: Any) -> tuple:
    """What makes two blocks one block: their names (where their tensors live), the root
    they were made from, and their fingerprint."""
    return (block.name, getattr(block, "prefix", None), getattr(block, "root", None),
            tuple(block.param_names), tuple(block.state_names), fingerprint(block))


def same_block(a: Any, b: Any) -> bool:
    """Whether two blocks are one block: the same object, or equal ``identity_key``s."""
    return a is b or identity_key(a) == identity_key(b)


def describe_difference(a: tuple, b: tuple) -> str:
    """The first thing two fingerprints disagree on, in words.

    >>> describe_difference(module_fingerprint(nn.Linear(3, 2)), module_fingerprint(nn.Linear(3, 4)))
    "attribute 'out_features' of the module (Linear): 2 against 4"
    """
    if a[0] != b[0] or a[0] != "module":
        if a[0] != b[0]:
            return f"kind of block: {a[0]} against {b[0]}"
        if a[1] != b[1]:
            return f"configuration of the {a[0]}: {a[1]!r} against {b[1]!r}"
        for i, (x, y) in enumerate(zip(a[2], b[2])):
            if x != y:
                return f"child {i} of the {a[0]}: " + describe_difference(x, y)
        return f"number of children of the {a[0]}: {len(a[2])} against {len(b[2])}"
    (_, parts_a, tensors_a), (_, parts_b, tensors_b) = a, b
    for (path, cls_a, conf_a), (path_b, cls_b, conf_b) in zip(parts_a, parts_b):
        where = f"submodule {path!r}" if path else "the module"
        short = cls_a.rsplit(".", 1)[-1]
        if path != path_b:
            return f"submodules: {path!r} against {path_b!r}"
        if cls_a != cls_b:
            return f"class of {where}: {cls_a} against {cls_b}"
        if conf_a != conf_b:
            da, db = dict(conf_a), dict(conf_b)
            for k in sorted(set(da) | set(db)):
                if da.get(k, "<absent>") != db.get(k, "<absent>"):
                    return (f"attribute {k!r} of {where} ({short}): {_show(da.get(k, '<absent>'))} against "
                            f"{_show(db.get(k, '<absent>'))}")
    if len(parts_a) != len(parts_b):
        return f"number of submodules: {len(parts_a)} against {len(parts_b)}"
    for (n, sa, ta), (m, sb, tb) in zip(tensors_a, tensors_b):
        if (n, sa, ta) != (m, sb, tb):
            return f"tensor {n!r}: shape {sa} {ta} against {m!r} shape {sb} {tb}"
    return f"tensors: {[t[0] for t in tensors_a]} against {[t[0] for t in tensors_b]}"


def _show(value: Any) -> str:
    if isinstance(value, tuple) and value[:1] == ("object",):
        return f"a {value[1]} object (compared by identity)"
    return repr(value)


def _describe(block: Any, user: str) -> str:
    root = f", copied from '{block.root}'" if block.root != block.name else ""
    return f"block '{block.name}' ({type(block.module).__name__}{root}) in {user}"


def module_blocks(block: Any) -> Iterator[Any]:
    """The module blocks a block is made of: itself, or its children's, recursively.

    >>> import mlaan_func as mf
    >>> b = mf.from_module(nn.Linear(3, 3), name="b")
    >>> [m.name for m in module_blocks(mf.leap_ema(mf.copy(b, "t"), source=b).blocks[0])]
    ['t.b', 'twin.b']
    """
    if isinstance(getattr(block, "module", None), nn.Module) and hasattr(block, "local_params"):
        yield block
        return
    for child in block.children():
        yield from module_blocks(child)


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


def _walk(block: Any) -> Iterator[Any]:
    yield block
    for child in block.children():
        yield from _walk(child)


def check_identity(*items: Any) -> None:
    """Raise ``IdentityError`` if two different blocks (root or fingerprint) share a name
    anywhere in ``items`` (nets, objectives, schemes), or two EMA twins of one source
    disagree on their decay.

    >>> from torch import nn
    >>> from mlaan_func.core import copy, from_module
    >>> fc = from_module(nn.Linear(2, 2), name="fc")
    >>> check_identity(fc, copy(fc, "trunk"), from_module(nn.Linear(2, 2), name="fc"))
    """
    owner: dict[str, tuple[tuple, str, Any]] = {}
    fingerprints: dict[int, tuple] = {}
    decays: dict[tuple[str, ...], tuple[torch.Tensor, str]] = {}
    for user, top in _users(items):
        for block in module_blocks(top):
            fp = fingerprints.get(id(block.module))
            if fp is None:
                fp = fingerprints[id(block.module)] = module_fingerprint(block.module)
            sig = (block.root, fp)
            local = dict([*block.module.named_parameters(), *block.module.named_buffers()])
            names = (*block.local_params, *block.local_state)
            text = _describe(block, user)
            for key, name in zip((*block.param_names, *block.state_names), names):
                seen = owner.setdefault(key, (sig, f"{text}, where it has shape {tuple(local[name].shape)}", block))
                if seen[0] != sig:
                    what = (f"root: '{seen[2].root}' against '{block.root}'" if seen[0][0] != sig[0]
                            else describe_difference(seen[0][1], sig[1]))
                    raise IdentityError(
                        f"two different blocks use the name {key!r}: {seen[1]} and {text}, "
                        f"which differ in {what}. A name is an identity (tensors under one name are "
                        "one tensor); give one of them another name (from_module(module, name=...)) "
                        "or make it a renamed copy (mlaan_func.copy(net, prefix)).")
        for block in _walk(top):
            twin = getattr(block, "twin", None)
            decay = getattr(block, "decay", None)
            if twin is None or decay is None:
                continue
            names = twin.param_names + twin.state_names
            seen_decay = decays.setdefault(names, (decay, f"{block.name!r} in {user}"))
            if not _same_decay(seen_decay[0], decay):
                raise IdentityError(
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
