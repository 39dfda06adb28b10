"""Test-session settings: one intra-op thread per process.

Tiny tensors gain nothing from a second thread, and on a busy 2-core machine OpenMP threads
that spin waiting for each other made single steps up to 60x slower; subprocesses inherit
the setting through OMP_NUM_THREADS.
"""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

torch.set_num_threads(1)
