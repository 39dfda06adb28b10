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


@pytest.mark.slow
def test_flops_and_shared_quick(tmp_path):
    run("flops.py", "--quick", "--json", str(tmp_path / "flops.json"))
    rows = json.loads((tmp_path / "flops.json").read_text())["rows"]
    mlaan = [r for r in rows if r["method"] == "mlaan"][0]
    assert mlaan["shared_flops_per_image"] < mlaan["per_objective_flops_per_image"]
    assert all(r["shared_over_per_objective"] == 1.0 for r in rows if r["method"] in ("e2e", "dgl"))
    run("shared.py", "--quick", "--repeats", "1", "--json", str(tmp_path / "shared.json"))
    rows = json.loads((tmp_path / "shared.json").read_text())["rows"]
    assert {r["remat"] for r in rows} == {False, True}
    assert all(r["time_ratio"] > 0 and r["memory_ratio"] > 0 for r in rows)
