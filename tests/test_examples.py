"""The example programs run as documented."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_custom_scheme_checks_itself_and_its_loss_falls():
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    r = subprocess.run([sys.executable, str(ROOT / "examples" / "custom_scheme.py")], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert "property checks passed" in r.stdout
    first, last = map(float, re.search(r"final-classifier loss ([\d.]+) -> ([\d.]+)", r.stdout).groups())
    assert last < first
    assert re.search(r"EMA twin \S+ moved by up to [1-9]", r.stdout)
