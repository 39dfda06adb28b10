"""The checkpoint file format: tensors plus a JSON description of the tree that holds them,
with a checksum of both. Reading one never unpickles an object: ``torch.load`` runs with
``weights_only=True`` over a payload of plain dicts, lists, strings and tensors, and every
NamedTuple in the tree is rebuilt from a class that the reader allows.

A tree is any nesting of tensors, NamedTuples, dicts (str/int/float/bool/None keys), tuples,
lists, ints, floats, bools, strings and None — a ``TrainState`` with any optimizer state.
NamedTuples defined in ``mlaan_func`` are allowed by default; pass your own with ``types=``.

>>> import os, tempfile, torch
>>> from typing import NamedTuple
>>> class Scale(NamedTuple):
...     factor: torch.Tensor
>>> tree = {"opt": Scale(torch.tensor(2.0)), "steps": [1, 2], "name": "run", "none": None}
>>> with tempfile.TemporaryDirectory() as d:
...     write(os.path.join(d, "c.pt"), tree)
...     back = read(os.path.join(d, "c.pt"), types=[Scale])
>>> back["opt"], back["steps"], back["name"]
(Scale(factor=tensor(2.)), [1, 2], 'run')
"""

from __future__ import annotations

import hashlib
import importlib
import io
import json
import math
import os
import pickle
import secrets
import zipfile
from typing import Any, Iterable

import torch
from torch import Tensor

from ..errors import CheckpointError

FORMAT = "mlaan_func.checkpoint/2"
"""The ``format`` entry of every file :func:`write` produces."""

TEMP_PREFIX = ".tmp-"
"""Name prefix of the temporary file a write goes through (left behind only by a killed writer)."""

MAX_DEPTH = 100
"""How deep a tree may nest (a ``TrainState`` needs about 5): deeper ones are refused by
:func:`write` and :func:`read` alike, before Python's recursion limit is near."""

_SCALARS = (type(None), bool, int, float, str)


def _name(cls: type) -> str:
    return f"{cls.__module__}:{cls.__qualname__}"


def _is_namedtuple(obj: Any) -> bool:
    return isinstance(obj, tuple) and hasattr(type(obj), "_fields")


def _too_deep(where: str) -> str:
    return f"{where} is nested deeper than MAX_DEPTH = {MAX_DEPTH} levels"


def _encode(obj: Any, tensors: list[Tensor], where: str, depth: int = 0) -> Any:
    if depth > MAX_DEPTH:
        raise ValueError(f"cannot save: {_too_deep(where)}; flatten the tree (a dict of "
                         "'a.b.c' keys holds any depth)")
    if isinstance(obj, Tensor):
        tensors.append(obj.detach())
        return {"tensor": len(tensors) - 1, "dtype": str(obj.dtype).removeprefix("torch."),
                "shape": list(obj.shape)}
    if isinstance(obj, _SCALARS):
        if isinstance(obj, float) and not math.isfinite(obj):
            return {"float": repr(obj)}
        return {"value": obj}
    if _is_namedtuple(obj):
        return {"namedtuple": _name(type(obj)), "fields": list(obj._fields),
                "items": [_encode(v, tensors, f"{where}.{f}", depth + 1) for f, v in zip(obj._fields, obj)]}
    if isinstance(obj, (list, tuple)):
        kind = "list" if isinstance(obj, list) else "tuple"
        return {kind: [_encode(v, tensors, f"{where}[{i}]", depth + 1) for i, v in enumerate(obj)]}
    if isinstance(obj, dict):
        for k in obj:
            if not isinstance(k, _SCALARS) or isinstance(k, float) and not math.isfinite(k):
                raise TypeError(f"cannot save {where}: dict key {k!r} is a {type(k).__name__}; "
                                "keys must be strings, numbers, bools or None")
        return {"dict": [[k, _encode(v, tensors, f"{where}[{k!r}]", depth + 1)] for k, v in obj.items()]}
    raise TypeError(f"cannot save {where}: a {type(obj).__name__} is not tensor data; a checkpoint "
                    "holds tensors, NamedTuples, dicts, lists, tuples, numbers, strings and None")


def _tensor_bytes(t: Tensor) -> memoryview:
    flat = t.detach().to("cpu").contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy()) if flat.numel() else memoryview(b"")


def _checksum(tree_text: str, tensors: list[Tensor]) -> str:
    digest = hashlib.sha256(tree_text.encode())
    for t in tensors:
        digest.update(f"{t.dtype}{tuple(t.shape)}".encode())
        digest.update(_tensor_bytes(t))
    return digest.hexdigest()


def write(path: str | os.PathLike, tree: Any) -> None:
    """Write ``tree`` to ``path`` atomically: a reader sees the old file or the new one, never
    a partial one. The file is serialised in memory first, so a full disk raises ``OSError``
    (``ENOSPC``) and leaves the old file untouched.

    >>> import os, tempfile, torch
    >>> with tempfile.TemporaryDirectory() as d:
    ...     write(os.path.join(d, "c.pt"), {"w": torch.ones(2)})
    ...     sorted(os.listdir(d))
    ['c.pt']
    """
    tensors: list[Tensor] = []
    tree_text = json.dumps(_encode(tree, tensors, "the checkpoint"))
    buffer = io.BytesIO()
    torch.save({"format": FORMAT, "tree": tree_text, "tensors": tensors,
                "sha256": _checksum(tree_text, tensors)}, buffer)
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = new_file(directory, TEMP_PREFIX, ".pt")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(buffer.getbuffer())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def new_file(directory: str, prefix: str, suffix: str) -> tuple[int, str]:
    """Create a new, empty file in ``directory`` and open it for writing: ``(fd, path)``. Its
    mode is ``0o666`` less the umask, as for any file the process creates (``tempfile.mkstemp``
    makes ``0o600``); a name that exists is never reused.

    >>> import os, stat, tempfile
    >>> with tempfile.TemporaryDirectory() as d:
    ...     old = os.umask(0o022)
    ...     fd, path = new_file(d, ".tmp-", ".pt")
    ...     _ = os.umask(old); os.close(fd)
    ...     oct(stat.S_IMODE(os.stat(path).st_mode))
    '0o644'
    """
    for _ in range(100):
        path = os.path.join(directory, f"{prefix}{secrets.token_hex(8)}{suffix}")
        try:
            return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), path
        except FileExistsError:
            continue
    raise FileExistsError(f"no free temporary name {prefix}*{suffix} in {directory} after 100 tries")


def _library_class(module: str, qualname: str) -> type | None:
    """The NamedTuple ``module:qualname`` if it is defined in mlaan_func, else None. Every step
    of ``qualname`` must be a class (a nested class), never a module or another object, so no
    attribute chain leads out of the library."""
    if not (module == "mlaan_func" or module.startswith("mlaan_func.")):
        return None
    try:
        obj: Any = importlib.import_module(module)
    except ImportError:
        return None
    for part in qualname.split("."):
        obj = getattr(obj, part, None)
        if not isinstance(obj, type):
            return None
    defined_in = obj.__module__
    if (defined_in == "mlaan_func" or defined_in.startswith("mlaan_func.")) \
            and issubclass(obj, tuple) and hasattr(obj, "_fields"):
        return obj
    return None


def _resolve(name: str, allowed: dict[str, type], path: str) -> type:
    if name in allowed:
        return allowed[name]
    module, _, qualname = name.partition(":")
    cls = _library_class(module, qualname)
    if cls is not None:
        return cls
    raise CheckpointError(
        f"{path} holds a {name}, which is neither a NamedTuple of mlaan_func nor one of the types "
        "passed to load; if you trust the file, pass that class: load(path, types=[TheClass])")


def _unreadably_deep(path: str) -> CheckpointError:
    return CheckpointError(f"{path}: {_too_deep('its tree')}, which mlaan_func.save never writes; "
                           "restore the file from a copy or start a new run")


def _malformed(path: str, node: Any) -> CheckpointError:
    return CheckpointError(f"{path} has a malformed tree entry {str(node)[:80]}; it was not written "
                           "by mlaan_func.save: restore the file from a copy or start a new run")


def _items(node: dict, key: str, path: str) -> list:
    items = node[key]
    if not isinstance(items, list):
        raise _malformed(path, node)
    return items


def _decode(node: Any, tensors: list[Tensor], allowed: dict[str, type], path: str, depth: int = 0) -> Any:
    if depth > MAX_DEPTH:
        raise _unreadably_deep(path)
    if not isinstance(node, dict) or len(node) not in (1, 3):
        raise _malformed(path, node)
    below = depth + 1
    if "tensor" in node:
        i = node["tensor"]
        if type(i) is not int or "dtype" not in node or "shape" not in node:
            raise _malformed(path, node)
        if not 0 <= i < len(tensors):
            raise CheckpointError(f"{path}: its tree names tensor {i}, but the file holds {len(tensors)} "
                                  "tensors; restore the file from a copy or start a new run")
        t = tensors[i]
        if str(t.dtype).removeprefix("torch.") != node["dtype"] or list(t.shape) != node["shape"]:
            raise CheckpointError(f"{path}: tensor {i} is {t.dtype} {tuple(t.shape)}, "
                                  f"but the tree says {node['dtype']} {node['shape']}")
        return t
    if "value" in node:
        if not isinstance(node["value"], _SCALARS):
            raise _malformed(path, node)
        return node["value"]
    if "float" in node:
        if node["float"] not in ("nan", "inf", "-inf"):
            raise _malformed(path, node)
        return float(node["float"])
    if "list" in node:
        return [_decode(v, tensors, allowed, path, below) for v in _items(node, "list", path)]
    if "tuple" in node:
        return tuple(_decode(v, tensors, allowed, path, below) for v in _items(node, "tuple", path))
    if "dict" in node:
        entries = _items(node, "dict", path)
        if not all(isinstance(e, list) and len(e) == 2 and isinstance(e[0], _SCALARS) for e in entries):
            raise _malformed(path, node)
        return {k: _decode(v, tensors, allowed, path, below) for k, v in entries}
    if "namedtuple" in node:
        name, fields, values = node["namedtuple"], node.get("fields"), node.get("items")
        if not (isinstance(name, str) and isinstance(fields, list) and isinstance(values, list)
                and len(fields) == len(values) and all(isinstance(f, str) for f in fields)):
            raise _malformed(path, node)
        cls = _resolve(name, allowed, path)
        unknown = [f for f in fields if f not in cls._fields]
        missing = [f for f in cls._fields if f not in fields and f not in cls._field_defaults]
        if unknown or missing:
            raise CheckpointError(
                f"{path} holds a {name} with fields {fields}, but this version's has "
                f"{list(cls._fields)}; load it with the version of the code that wrote it")
        return cls(**dict(zip(fields, (_decode(v, tensors, allowed, path, below) for v in values))))
    raise CheckpointError(f"{path} has a tree entry of unknown kind {sorted(node)}")


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return text if len(text) <= 200 else text[:197] + "..."


def read(path: str | os.PathLike, map_location: str | torch.device | None = None,
         types: Iterable[type] = ()) -> Any:
    """The tree :func:`write` stored at ``path``, its checksum verified, tensors moved to
    ``map_location`` (a device) when given. NamedTuples of ``mlaan_func`` and of ``types`` are
    rebuilt; anything else raises :class:`CheckpointError` and runs nothing.

    >>> import os, tempfile, torch
    >>> with tempfile.TemporaryDirectory() as d:
    ...     p = os.path.join(d, "c.pt")
    ...     write(p, {"w": torch.ones(2)})
    ...     _ = open(p, "r+b").write(b"junk")
    ...     try:
    ...         read(p)
    ...     except CheckpointError:
    ...         print("refused")
    refused
    """
    path = os.fspath(path)
    if map_location is not None and not isinstance(map_location, (str, torch.device)):
        raise TypeError("map_location must be a device (a string or torch.device)")
    allowed = {_name(c): c for c in types}
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except (FileNotFoundError, torch.OutOfMemoryError):
        raise
    except pickle.UnpicklingError as err:
        raise CheckpointError(
            f"{path} is not a checkpoint written by mlaan_func.save (refused to unpickle it: "
            f"{_one_line(err)[:160]}); nothing in it was run. Use a checkpoint written by this "
            "version, or start a new run") from None
    except (OSError, RuntimeError, EOFError, zipfile.BadZipFile, ValueError, KeyError) as err:
        raise CheckpointError(f"{path} is unreadable or truncated ({_one_line(err)}); restore it "
                              "from a copy or start a new run") from None
    if not isinstance(blob, dict) or blob.get("format") != FORMAT:
        found = blob.get("format", "none") if isinstance(blob, dict) else type(blob).__name__
        raise CheckpointError(f"{path} is not a {FORMAT} checkpoint (format: {found}); it was not "
                              "written by this version of mlaan_func.save")
    tree_text, tensors = blob.get("tree"), blob.get("tensors")
    if not isinstance(tree_text, str) or not isinstance(tensors, list) \
            or not all(isinstance(t, Tensor) for t in tensors):
        raise CheckpointError(f"{path} is missing its tree or tensors")
    if _checksum(tree_text, tensors) != blob.get("sha256"):
        raise CheckpointError(f"{path} is corrupted: its contents do not match the checksum stored "
                              "when it was written; restore it from a copy or start a new run")
    try:
        tree = json.loads(tree_text)
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path} has an unreadable tree ({err})") from None
    except RecursionError:  # json nests one C call per level: a crafted tree can be 100 000 deep
        raise _unreadably_deep(path) from None
    if map_location is not None:
        tensors = [t.to(map_location) for t in tensors]
    return _decode(tree, tensors, allowed, path)
