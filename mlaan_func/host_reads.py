"""Counting device-to-host reads: each ``.item()``, ``int()``, ``float()`` or ``bool()`` of a
tensor is one ``aten._local_scalar_dense``; on CUDA each is a stream synchronisation, so the
GPU idles until the host has the value (design.md §4, "host reads").

>>> import torch
>>> with count_host_reads() as reads:
...     t = torch.ones(3)
...     _ = float(t.sum()) + bool(t.any())
>>> reads.count
2
"""

from __future__ import annotations

import collections
import traceback

import torch
from torch.utils._python_dispatch import TorchDispatchMode

_READ = torch.ops.aten._local_scalar_dense.default


class count_host_reads(TorchDispatchMode):
    """A dispatch mode counting host reads (``count``) and where in ``mlaan_func`` each was
    made (``where``: ``{"path:line": count}``, the innermost library frame; ``"user"`` for a
    read outside the library). It sees through ``torch.func`` transforms."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0
        self.where: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is _READ:
            self.count += 1
            frames = [f for f in traceback.extract_stack()[:-1]
                      if "mlaan_func" in f.filename and not f.filename.endswith("host_reads.py")]
            self.where[f"{frames[-1].filename.split('mlaan_func/')[-1]}:{frames[-1].lineno}" if frames else "user"] += 1
        return func(*args, **(kwargs or {}))
