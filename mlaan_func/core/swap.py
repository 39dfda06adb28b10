"""A module called on given tensors, as ``torch.func.functional_call(module, (params,
buffers), x, strict=True)`` does it (each tensor put in its owner's ``_parameters`` or
``_buffers`` for the call, the originals put back after), with the owners looked up once per
module instead of on every call (design.md §4, "host reads" and overhead).

>>> import torch
>>> from torch import nn
>>> lin = nn.Linear(2, 1)
>>> call = swapped_call(lin)
>>> w = {"weight": torch.ones(1, 2), "bias": torch.zeros(1)}
>>> call(w, {}, torch.tensor([[1.0, 2.0]]))
tensor([[3.]])
>>> torch.equal(lin.weight, w["weight"])  # the module keeps its own tensors
False
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn


def _slots(module: nn.Module, kind: str) -> dict[str, list[tuple[dict, str]]]:
    """For each local name (as ``named_parameters``/``named_buffers`` give it), every
    ``(owner's dict, attribute)`` that holds the tensor, tied aliases included."""
    members = module.named_parameters if kind == "_parameters" else module.named_buffers
    canonical = {id(t): n for n, t in members()}
    slots: dict[str, list[tuple[dict, str]]] = {n: [] for n in canonical.values()}
    for full, tensor in members(remove_duplicate=False):
        owner_path, _, attr = full.rpartition(".")
        owner = module.get_submodule(owner_path) if owner_path else module
        slots[canonical[id(tensor)]].append((getattr(owner, kind), attr))
    return slots


class swapped_call:
    """``call(params, buffers, *inputs) -> module(*inputs)`` run on the given tensors; ``params`` and
    ``buffers`` hold exactly the module's local names (the caller builds them from them).
    Copied or pickled, it looks its owners up again in the copied module."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self._slots = (tuple(_slots(module, "_parameters").items()), tuple(_slots(module, "_buffers").items()))

    def __getstate__(self) -> dict:
        return {"module": self.module}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["module"])

    def __call__(self, params: dict[str, Tensor], buffers: dict[str, Tensor], *inputs: Any) -> Any:
        saved = []
        try:
            for given, slots in zip((params, buffers), self._slots):
                for name, places in slots:
                    for table, attr in places:
                        saved.append((table, attr, table[attr]))
                        table[attr] = given[name]
            return self.module(*inputs)
        finally:
            for table, attr, original in reversed(saved):
                table[attr] = original
