"""Host memory between CPU steps: keep what a step frees for the next one (design.md §4,
"Host memory").

A training step frees and allocates the same large tensors every step. glibc, by default,
hands large freed blocks back to the kernel (``munmap`` of blocks above its mmap threshold,
trimming of the heap's top), so the next step's tensors start on fresh pages and pay one
page fault per 4 KiB touched. ``keep_freed_memory()`` asks glibc to keep them (``mallopt``:
blocks up to ``max_block_bytes`` come from the heap, and the heap is never trimmed below
``keep_bytes``), which is what the CUDA caching allocator does for device memory: the
process's resident memory stays at its peak instead of following each step. Measured in
``bench/overhead.py`` (minor page faults per step, ``resource.getrusage``).

It changes a process-wide setting, as ``torch.set_num_threads`` does: a program calls it
once at start (``examples/cifar_mlaan.py`` does, unless ``--no-keep-host-memory``); the
library never calls it by itself. Elsewhere than glibc (macOS, musl, Windows) it does
nothing and returns ``False``.

>>> before = minor_page_faults()            # the counter a caller compares around a step
>>> minor_page_faults() >= before >= 0
True
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools

__all__ = ["keep_freed_memory", "minor_page_faults"]

# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
# glibc refuses an mmap threshold above HEAP_MAX_SIZE / 2 (32 MiB on 64-bit)
_MAX_MMAP_THRESHOLD = 32 << 20


@functools.cache
def _glibc_mallopt():
    """glibc's ``mallopt``, or ``None`` where the C library is not glibc."""
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    libc = ctypes.CDLL(name)
    if not hasattr(libc, "gnu_get_libc_version") or not hasattr(libc, "mallopt"):
        return None
    mallopt = libc.mallopt
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return mallopt


def keep_freed_memory(max_block_bytes: int = _MAX_MMAP_THRESHOLD, keep_bytes: int = 1 << 30) -> bool:
    """Make glibc serve blocks up to ``max_block_bytes`` from its heap and keep up to
    ``keep_bytes`` of freed heap for reuse; ``True`` when glibc took both settings.

    ``max_block_bytes`` is at most 32 MiB (glibc's limit); larger blocks are still mapped
    and unmapped one by one.
    """
    if not 0 < max_block_bytes <= _MAX_MMAP_THRESHOLD:
        raise ValueError(f"max_block_bytes must be in (0, {_MAX_MMAP_THRESHOLD}] (glibc's limit), got {max_block_bytes}")
    if not 0 < keep_bytes < 2 ** 31:
        raise ValueError(f"keep_bytes must be in (0, 2**31), got {keep_bytes}")
    mallopt = _glibc_mallopt()
    if mallopt is None:
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, max_block_bytes)) and bool(mallopt(_M_TRIM_THRESHOLD, keep_bytes))


def minor_page_faults() -> int:
    """The process's minor page faults so far (``getrusage``; 0 where it is not available):
    the difference over a step counts the fresh pages the step touched."""
    try:
        import resource
    except ImportError:  # Windows
        return 0
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
