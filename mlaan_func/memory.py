"""Memory of a training step: peak live tensor bytes on any device, persistent bytes, CUDA peak.

``track_memory`` is the CPU analogue of ``torch.cuda.max_memory_allocated`` (DESIGN §6): a
``TorchDispatchMode`` sees every ATen op that runs while it is active, adds the bytes of each
storage an op creates, and subtracts them when that storage dies, keeping the peak. It counts
only what is allocated *inside* the block (activations, gradients, temporaries, outputs):
parameters, inputs and any other tensor that existed before the block count zero, even while
they stay alive. Add ``persistent_bytes`` of the parameters, optimizer state and buffers to
get a figure comparable to a device's total.

>>> import torch
>>> x = torch.randn(256, 64)                       # made before: not counted
>>> with track_memory() as meter:
...     h = (x @ x.T).relu()                       # 256*256*4 bytes twice, the first freed
...     y = h.sum()
>>> meter.peak_bytes, meter.live_bytes             # peak: mm output + relu output
(524288, 262148)

It works where ``saved_tensors_hooks`` do not: dispatch modes run below ``torch.func``
transforms, so ``grad``/``grad_and_value``/``vjp`` over ``functional_call`` are seen as the
plain ops they execute; ``torch.utils.checkpoint`` and ``.backward()`` are seen too.

The figure is taken between ops: memory a kernel allocates and frees internally (its
scratch space), memory not owned by a tensor storage (allocator or library caches) and
tensors without a storage (sparse, nested) are not seen. ``torch.compile`` cannot trace
while a dispatch mode is active, and a compiled function first called under one would be
marked never to compile; so the block runs under ``torch.compiler.set_stance("force_eager")``:
a compiled function runs eagerly inside it (the figure is the eager step's) and compiles on
its first call after it. Measure compiled steps with ``cuda_peak`` on a GPU. On CUDA the
caching allocator rounds each block up (to 512 bytes at least), so ``cuda_peak`` reads a
little higher than ``track_memory`` for the same step.
"""

from __future__ import annotations

import contextlib
import functools
import threading
import weakref
from typing import Any, Callable, Iterator, NamedTuple, TypeVar

import torch
from torch import Tensor, nn
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["MemoryMeter", "MemoryReport", "cuda_peak", "peak_live_bytes", "persistent_bytes",
           "track_memory"]

R = TypeVar("R")


class MemoryReport(NamedTuple):
    """What one measured block allocated, in bytes.

    ``peak_bytes``: the most bytes allocated inside the block and alive at once.
    ``live_bytes``: of those, the bytes still alive when the block ended (its outputs).
    ``allocated_bytes``: the sum over every storage created (no frees subtracted).
    ``allocations``: how many storages were created.
    """

    peak_bytes: int
    live_bytes: int
    allocated_bytes: int
    allocations: int


def _storage_of(t: Tensor) -> torch.UntypedStorage | None:
    try:
        return t.untyped_storage()
    except (RuntimeError, NotImplementedError):  # sparse, nested, storage-less subclasses
        return None


class MemoryMeter(TorchDispatchMode):
    """The dispatch mode behind ``track_memory``; make one through that, read it after.

    Storages are identified by their ``StorageImpl`` (``UntypedStorage._cdata``), so views,
    ``detach`` and in-place results of one storage count once. An op output whose storage
    was among the op's inputs (a view, an in-place or ``out=`` op) is not new; any other
    storage not seen before is. PyTorch keeps one Python ``UntypedStorage`` object per live
    storage (the same object on every ``untyped_storage()`` call, kept while any tensor uses
    the storage), so a weak reference to it is called back exactly when the memory is freed.
    """

    def __init__(self, device: str | torch.device | None = None) -> None:
        super().__init__()
        self._device_type = None if device is None else torch.device(device).type
        self._lock = threading.RLock()
        self._tracked: dict[int, tuple[weakref.ref, int]] = {}
        self._live = self._peak = self._allocated = self._allocations = 0
        self._active = False
        self._done = False

    # ---- reading ---------------------------------------------------------------------------

    @property
    def peak_bytes(self) -> int:
        """The most bytes allocated inside the block and alive at the same time."""
        return self._peak

    @property
    def live_bytes(self) -> int:
        """Bytes allocated inside the block and still alive (at its end, once it has ended)."""
        return self._live

    def report(self) -> MemoryReport:
        """The figures as one ``MemoryReport``."""
        return MemoryReport(self._peak, self._live, self._allocated, self._allocations)

    def reset_peak(self) -> int:
        """Start a new peak from the bytes alive now (as ``torch.cuda.reset_peak_memory_stats``);
        returns the peak that ended, so a block can be measured in segments.

        >>> import torch
        >>> with track_memory() as meter:
        ...     a = torch.zeros(1000)
        ...     del a
        ...     first = meter.reset_peak()
        ...     b = torch.zeros(10)
        >>> first, meter.peak_bytes
        (4000, 40)
        """
        with self._lock:
            ended, self._peak = self._peak, self._live
        return ended

    # ---- the mode ------------------------------------------------------------------------

    def __enter__(self) -> "MemoryMeter":
        if self._active or self._done:
            raise RuntimeError("a MemoryMeter measures one block; use a fresh track_memory()")
        self._active = True
        return super().__enter__()

    def __exit__(self, *exc: Any) -> None:
        try:
            super().__exit__(*exc)
        finally:
            with self._lock:
                self._active, self._done = False, True
                self._tracked.clear()  # drops the weak references: figures freeze here

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        outputs = [t for t in pytree.tree_leaves(out) if isinstance(t, Tensor)]
        if outputs:
            self._count(func, outputs, args, kwargs)
        return out

    def _count(self, func, outputs: list[Tensor], args, kwargs) -> None:
        inputs: set[int] | None = None
        with self._lock:
            if not self._active:
                return
            for t in outputs:
                storage = _storage_of(t)
                if storage is None:
                    continue
                key = storage._cdata
                nbytes = storage.nbytes()
                seen = self._tracked.get(key)
                if seen is not None:
                    if seen[1] != nbytes:  # resized in place (resize_, out= of another size)
                        self._tracked[key] = (seen[0], nbytes)
                        self._add(nbytes - seen[1], 0)
                    continue
                if self._device_type is not None and t.device.type != self._device_type:
                    continue
                if inputs is None:
                    inputs = _input_storages(func, args, kwargs)
                if key in inputs:
                    continue
                ref = weakref.ref(storage, functools.partial(self._free, key))
                self._tracked[key] = (ref, nbytes)
                self._add(nbytes, 1)

    def _add(self, nbytes: int, count: int) -> None:
        self._live += nbytes
        if nbytes > 0:
            self._allocated += nbytes
        self._allocations += count
        if self._live > self._peak:
            self._peak = self._live

    def _free(self, key: int, _ref: weakref.ref) -> None:
        with self._lock:
            seen = self._tracked.pop(key, None)
            if seen is not None and seen[0] is _ref:
                self._live -= seen[1]
            elif seen is not None:  # a newer storage at the same address: keep it
                self._tracked[key] = seen


# ``lift_fresh`` receives a constant just built outside the dispatcher (``torch.tensor``):
# its output storage is new although it is the input's.
_FRESH = {torch.ops.aten.lift_fresh.default}


def _input_storages(func, args, kwargs) -> set[int]:
    if func in _FRESH:
        return set()
    keys = set()
    for a in pytree.tree_leaves((args, kwargs)):
        if isinstance(a, Tensor):
            s = _storage_of(a)
            if s is not None:
                keys.add(s._cdata)
        elif isinstance(a, torch.UntypedStorage):  # set_(source=storage)
            keys.add(a._cdata)
        elif isinstance(a, torch.TypedStorage):
            keys.add(a._untyped_storage._cdata)
    return keys


@contextlib.contextmanager
def track_memory(device: str | torch.device | None = None) -> Iterator[MemoryMeter]:
    """Measure the tensor bytes allocated inside a ``with`` block; read the meter after it.

    ``device`` (e.g. ``"cpu"``) counts only storages on that device type; by default all.
    Tensors made before the block are never counted, even if the block frees them.

    >>> import torch
    >>> with track_memory() as meter:
    ...     a = torch.zeros(1000)          # 4000 bytes
    ...     b = a[10:].view(-1, 10)        # a view: nothing new
    ...     del a, b                       # freed
    ...     c = torch.ones(500)            # 2000 bytes: the peak stays the max, not the sum
    >>> meter.report()
    MemoryReport(peak_bytes=4000, live_bytes=2000, allocated_bytes=6000, allocations=2)
    """
    meter = MemoryMeter(device)
    with torch.compiler.set_stance("force_eager"), meter:
        yield meter


def peak_live_bytes(fn: Callable[..., R], *args: Any, **kwargs: Any) -> tuple[R, MemoryReport]:
    """Call ``fn(*args, **kwargs)`` under ``track_memory``; return its result and the report.

    The report's ``peak_bytes`` is the step's peak (``peak_step_bytes`` in DESIGN §6): the
    arguments, parameters among them, are not counted; the result is (in ``live_bytes``).

    >>> import torch
    >>> w, x = torch.randn(32, 128), torch.randn(64, 32)
    >>> loss = lambda w, x: (x @ w).relu().sum()
    >>> g, report = peak_live_bytes(torch.func.grad(loss), w, x)
    >>> report.live_bytes == g.nbytes == 32 * 128 * 4
    True
    """
    with track_memory() as meter:
        result = fn(*args, **kwargs)
    return result, meter.report()


def _storage_key_and_bytes(t: Tensor) -> tuple[Any, int]:
    s = _storage_of(t)
    if s is None:  # no single storage: count its elements under its own identity
        return ("tensor", id(t)), t.numel() * t.element_size()
    return s._cdata, s.nbytes()


def _tensors(tree: Any) -> Iterator[Tensor]:
    for leaf in pytree.tree_leaves(tree):
        if isinstance(leaf, Tensor):
            yield leaf
        elif isinstance(leaf, nn.Module):
            yield from leaf.parameters()
            yield from leaf.buffers()
        elif isinstance(leaf, torch.optim.Optimizer):
            yield from _tensors(list(leaf.state.values()))


def persistent_bytes(*trees: Any) -> int:
    """Total bytes of the tensors in nested dicts, lists, tuples and NamedTuples.

    Each storage counts once and whole, however many tensors or views share it. An
    ``nn.Module`` leaf counts its parameters and buffers (not their ``.grad``), a
    ``torch.optim.Optimizer`` its state; other leaves count nothing.

    >>> import torch
    >>> w = torch.zeros(10, 10)
    >>> persistent_bytes({"w": w, "same": w, "row": w[0]}, [torch.zeros(5)])
    420
    """
    seen: dict[Any, int] = {}
    for tree in trees:
        for t in _tensors(tree):
            key, nbytes = _storage_key_and_bytes(t)
            seen[key] = nbytes
    return sum(seen.values())


def _cuda_device(args: Any, kwargs: Any) -> torch.device | None:
    if not torch.cuda.is_available():
        return None
    tensors = [t for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, Tensor)]
    if not tensors:
        return torch.device("cuda", torch.cuda.current_device())
    return next((t.device for t in tensors if t.is_cuda), None)


def cuda_peak(fn: Callable[..., R], *args: Any, **kwargs: Any) -> tuple[R, MemoryReport | None]:
    """Call ``fn(*args, **kwargs)`` and read the CUDA caching allocator's figures for it.

    The device is that of the first CUDA tensor among the arguments (the current CUDA device
    when there are no tensor arguments); the report is ``None`` when CUDA is unavailable or
    the arguments are all on the CPU. Peak statistics are reset first, so afterwards
    ``torch.cuda.max_memory_allocated(device)`` is the absolute peak of this call. The report
    is relative to what was allocated before the call, like ``track_memory``'s: ``peak_bytes``
    is ``max_memory_allocated`` minus ``memory_allocated`` at the start.

    >>> import torch
    >>> _, report = cuda_peak(torch.ones, 3)
    >>> report is None or report.peak_bytes >= 12
    True
    """
    device = _cuda_device(args, kwargs)
    if device is None:
        return fn(*args, **kwargs), None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_stats(device)
    result = fn(*args, **kwargs)
    torch.cuda.synchronize(device)
    after = torch.cuda.memory_stats(device)
    base = before.get("allocated_bytes.all.current", 0)

    def delta(name: str) -> int:
        return after.get(name, 0) - before.get(name, 0)

    return result, MemoryReport(
        peak_bytes=after.get("allocated_bytes.all.peak", 0) - base,
        live_bytes=delta("allocated_bytes.all.current"),
        allocated_bytes=delta("allocated_bytes.all.allocated"),
        allocations=delta("allocation.all.allocated"),
    )
