"""The benchmark scripts' quick modes run and write the JSON rows the report reads."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run(script, *args, timeout=600):
    r = subprocess.run([sys.executable, str(ROOT / "bench" / script), *args], capture_output=True, text=True,
                       timeout=timeout)
    assert r.returncode == 0, r.stderr[-3000:]


@pytest.mark.slow
def test_memory_quick(tmp_path):
    out = tmp_path / "memory.json"
    run("memory.py", "--quick", "--json", str(out))
    rows = json.loads(out.read_text())["rows"]
    keys = {"method", "arch", "modules", "batch_size", "remat", "peak_step_bytes", "e2e_peak_step_bytes",
            "checkpointed_e2e_peak_step_bytes", "persistent_bytes"}
    assert rows and all(keys <= set(r) for r in rows)
    dgl = [r for r in rows if r["method"] == "dgl" and not r["remat"]][0]
    assert dgl["peak_step_bytes"] < dgl["e2e_peak_step_bytes"]


@pytest.mark.slow
def test_speed_quick(tmp_path):
    out = tmp_path / "speed.json"
    run("speed.py", "--quick", "--json", str(out))
    rows = json.loads(out.read_text())["rows"]
    assert rows and all(r["vs_e2e"] > 0 and r["overhead"] > 0 for r in rows)
