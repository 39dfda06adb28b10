"""Randomness as an input: every random draw in a step derives from (key, step, block).

A ``TrainState`` carries a ``key`` (an int64 0-d tensor made from the ``init`` seed). The
engine turns ``(key, step)`` into one integer per step, outside any compiled code, and
holds it while the step runs (``seeded``). Each block, before it runs in training mode,
seeds the generator of its input's device with ``block_seed(step_seed, block name)``; an
objective's loss function is seeded with its objective's name. So

* ``step(ts, batch)`` is a function of its inputs: the same ``(ts, batch)`` draws the same
  dropout masks, bit for bit, whatever the global generator holds;
* a block draws the same values in every objective that runs it on the same step, so an
  engine that computes a block once for several objectives draws what each would;
* the global generator is saved before and restored after the step, untouched.

Compiled steps (``mlaan_func.kernels``) call each block's compiled kernel eagerly, so the
block is seeded by its name as in eager mode. Only the per-objective compiled engine
(``compile=True, share=False``) cannot reseed inside its one graph per objective: there the
stream is seeded once per objective (from its name), still a function of ``(key, step)``.

>>> import torch
>>> from torch.nn import functional as F
>>> key = key_from_seed(0)
>>> with seeded(key, torch.tensor(3)):
...     seed_block("encoder.0")
...     a = F.dropout(torch.ones(8), 0.5)
>>> with seeded(key, torch.tensor(3)):
...     seed_block("encoder.0")
...     b = F.dropout(torch.ones(8), 0.5)
>>> torch.equal(a, b)
True
"""

from __future__ import annotations

import contextlib
import contextvars
import zlib
from typing import Callable, Iterator, TypeVar

import torch
from torch import Tensor

_MASK = 2**63 - 1
T = TypeVar("T")
_STEP_SEED: contextvars.ContextVar[tuple[int, torch.device] | None] = contextvars.ContextVar(
    "mlaan_func_step_seed", default=None)


def key_from_seed(seed: int, device: torch.device | str | None = None) -> Tensor:
    """The train state's key for ``seed``: an int64 0-d tensor.

    >>> key_from_seed(7)
    tensor(7)
    """
    return torch.tensor(int(seed) & _MASK, dtype=torch.int64, device=device)


def _mix(a: int, b: int) -> int:
    """A 64-bit mix (splitmix64) of two integers, kept non-negative for ``manual_seed``."""
    z = (a * 0x9E3779B97F4A7C15 + b + 0x632BE59BD9B4E019) & (2**64 - 1)
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & (2**64 - 1)
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & (2**64 - 1)
    return (z ^ (z >> 31)) & _MASK


def fold_in(key: Tensor, data: int) -> Tensor:
    """A new key from ``key`` and an integer (a rank, a replica index).

    >>> k = key_from_seed(0)
    >>> bool(fold_in(k, 1) != fold_in(k, 2)), bool(fold_in(k, 1) == fold_in(k, 1))
    (True, True)
    """
    return torch.tensor(_mix(int(key), int(data)), dtype=torch.int64, device=key.device)


def step_seed(key: Tensor | int, step: Tensor | int) -> int:
    """One integer for (key, step); computed eagerly, once per step.

    >>> step_seed(0, 1) != step_seed(0, 2) != step_seed(1, 1)
    True
    """
    return _mix(int(key), int(step))


def block_seed(seed: int, name: str) -> int:
    """The seed of the block (or objective) ``name`` within the step whose seed is ``seed``.

    >>> block_seed(5, "1.0") == block_seed(5, "1.0") != block_seed(5, "1.1")
    True
    """
    return _mix(seed, zlib.crc32(name.encode()))


def _generators(device: torch.device) -> list[torch.Generator]:
    gens = [torch.default_generator]
    if device.type == "cuda":
        gens.append(torch.cuda.default_generators[device.index if device.index is not None
                                                  else torch.cuda.current_device()])
    return gens


@contextlib.contextmanager
def seeded(key: Tensor | int, step: Tensor | int, device: torch.device | str | None = None
           ) -> Iterator[int]:
    """Run a step's body with ``step_seed(key, step)``; the generators of the CPU and of
    ``device`` are restored afterwards. Yields the step seed."""
    device = torch.device(device) if device is not None else torch.device("cpu")
    seed = step_seed(key, step)
    gens = _generators(device)
    saved = [g.get_state() for g in gens]
    token = _STEP_SEED.set((seed, device))
    try:
        yield seed
    finally:
        _STEP_SEED.reset(token)
        for g, s in zip(gens, saved):
            g.set_state(s)


def keyed(fn: Callable[[], T], key: Tensor, step: Tensor, device: torch.device | str | None,
          memo: dict[str, bool]) -> T:
    """``fn()`` with its random draws derived from ``(key, step)``, as under ``seeded``,
    reading ``key`` and ``step`` (two host reads) only for a computation that draws.

    ``fn`` first runs unseeded while the generators' states are compared before and after
    (host memory, no device read); if it drew, the states are restored and it runs again
    under ``seeded``, and ``memo["draws"]`` makes every later call seeded at once. For a
    pure ``fn`` the result is the seeded one either way.

    >>> from torch.nn import functional as F
    >>> memo = {}
    >>> a = keyed(lambda: F.dropout(torch.ones(8), 0.5), key_from_seed(0), torch.tensor(3), None, memo)
    >>> with seeded(key_from_seed(0), torch.tensor(3)):
    ...     b = F.dropout(torch.ones(8), 0.5)
    >>> torch.equal(a, b), memo
    (True, {'draws': True})
    """
    if not memo.get("draws"):
        gens = _generators(torch.device(device) if device is not None else torch.device("cpu"))
        before = [g.get_state() for g in gens]
        out = fn()
        if all(torch.equal(b, g.get_state()) for b, g in zip(before, gens)):
            return out
        for g, b in zip(gens, before):
            g.set_state(b)
        memo["draws"] = True
    with seeded(key, step, device):
        return fn()


def seed_block(name: str) -> None:
    """Seed the generators with ``block_seed(step seed, name)`` when a step is running
    (``seeded``); outside a step, or while compiling, do nothing."""
    if torch.compiler.is_compiling():
        return
    current = _STEP_SEED.get()
    if current is None:
        return
    seed, device = current
    s = block_seed(seed, name)
    for g in _generators(device):
        g.manual_seed(s)


def generator_devices(x: Tensor) -> list[int]:
    """The CUDA devices whose generators a computation on ``x`` draws from (none on CPU)."""
    return [x.device.index or 0] if x.is_cuda else []


def generator_state(devices: list[int]) -> tuple:
    """The CPU generator's state and those of ``devices``, to replay a recomputation."""
    return torch.get_rng_state(), [torch.cuda.get_rng_state(d) for d in devices]


def set_generator_state(state: tuple, devices: list[int]) -> None:
    """Put back what ``generator_state`` saved."""
    cpu, cuda = state
    torch.set_rng_state(cpu)
    for d, s in zip(devices, cuda):
        torch.cuda.set_rng_state(s, d)
