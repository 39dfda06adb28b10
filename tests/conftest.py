"""Test-session settings: one intra-op thread per process.

Tiny tensors gain nothing from a second thread, and on a busy 2-core machine OpenMP threads
that spin waiting for each other made single steps up to 60x slower; subprocesses inherit
the setting through OMP_NUM_THREADS.

Under ``CI=true`` hypothesis draws the same examples on every run (``derandomize``), so a
landing is judged on the code, not on which examples one run happened to draw; elsewhere
each run draws anew and keeps its failures in the example database.
"""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402
from hypothesis import settings  # noqa: E402

torch.set_num_threads(1)

if os.environ.get("CI", "").lower() in ("1", "true"):
    settings.register_profile("ci", derandomize=True, database=None)
    settings.load_profile("ci")
