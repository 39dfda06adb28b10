"""``mlaan_func.host_memory``: glibc keeps what a step frees, so repeated steps touch far
fewer fresh pages (docs/design.md §4, "Host memory"). Page faults are counted, not timed."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import mlaan_func as mf

GLIBC = sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"
ROOT = Path(__file__).resolve().parents[1]

# A conv step at batch 32: each activation is 2 MiB, above glibc's first mmap threshold.
STEPS = textwrap.dedent("""
    import sys
    import torch
    from torch import nn
    import mlaan_func as mf
    torch.set_num_threads(1)
    kept = mf.host_memory.keep_freed_memory() if sys.argv[1] == "kept" else False
    body = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                         nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))
    scheme = mf.schemes.e2e(mf.from_module(body))
    opt = mf.optim.sgd(0.1, momentum=0.9)
    ts = mf.init(scheme, opt)
    step = mf.step(scheme, opt)
    batch = (torch.randn(32, 3, 32, 32), torch.randint(0, 10, (32,)))
    for _ in range(3):
        ts, _ = step(ts, batch)
    first = mf.host_memory.minor_page_faults()
    for _ in range(5):
        ts, _ = step(ts, batch)
    print(kept, (mf.host_memory.minor_page_faults() - first) / 5)
""")


def faults_per_step(mode: str) -> tuple[bool, float]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    for name in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_"):
        env.pop(name, None)  # glibc's own defaults for the "default" run
    out = subprocess.run([sys.executable, "-c", STEPS, mode], env=env, capture_output=True, text=True, check=True)
    kept, faults = out.stdout.split()
    return kept == "True", float(faults)


@pytest.mark.skipif(not GLIBC, reason="glibc's mallopt is what keep_freed_memory sets")
def test_kept_memory_means_far_fewer_fresh_pages_per_step():
    kept_default, default = faults_per_step("default")
    kept, tuned = faults_per_step("kept")
    assert kept and not kept_default
    # default glibc unmaps the 2 MiB activations each step (thousands of faults); kept, only
    # the interpreter's own small arenas come and go
    assert default > 1000 and tuned < default / 5, (default, tuned)


@pytest.mark.skipif(not GLIBC, reason="glibc's mallopt is what keep_freed_memory sets")
def test_keep_freed_memory_is_taken_on_glibc_and_can_be_called_again():
    # in a process of its own: the setting is process-wide, and the test session keeps glibc's defaults
    code = "import mlaan_func as mf; print(mf.host_memory.keep_freed_memory(), mf.host_memory.keep_freed_memory())"
    out = subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": str(ROOT)},
                         capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["True", "True"]


@pytest.mark.parametrize("kwargs", [{"max_block_bytes": 0}, {"max_block_bytes": 64 << 20}, {"keep_bytes": 0},
                                    {"keep_bytes": 2 ** 31}])
def test_out_of_range_settings_are_refused_with_the_limit(kwargs):
    with pytest.raises(ValueError, match="must be in"):
        mf.host_memory.keep_freed_memory(**kwargs)


def test_minor_page_faults_counts_up():
    a = mf.host_memory.minor_page_faults()
    assert mf.host_memory.minor_page_faults() >= a >= 0
