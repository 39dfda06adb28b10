"""bench/accuracy.py --quick trains on real Fashion-MNIST and writes its JSON and Markdown."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FASHION = Path("/usr/share/datasets/fashion-mnist")


@pytest.mark.slow
@pytest.mark.skipif(not FASHION.is_dir(), reason="needs the Debian package dataset-fashion-mnist")
def test_quick_accuracy_run(tmp_path):
    out = tmp_path / "accuracy.json"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "accuracy.py"), "--quick", "--json", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    for key in ("machine", "torch", "date", "command", "config"):
        assert key in result
    assert "--quick" in result["command"]
    runs, summary = result["runs"], result["summary"]
    assert len(runs) >= 2 and summary
    assert {r["method"] for r in runs} == {s["method"] for s in summary}
    for r in runs:
        assert 0.0 <= r["test_accuracy"] <= 1.0
        assert r["train_seconds"] > 0 and r["images_per_second"] > 0
    for s in summary:
        assert 0.0 <= s["min_accuracy"] <= s["mean_accuracy"] <= s["max_accuracy"] <= 1.0
        assert s["std_accuracy"] >= 0.0
    table = out.with_suffix(".md").read_text()
    assert "| method | K | seeds | mean acc | std | min | max | images/s |" in table
    assert all(f"| {s['method']} |" in table for s in summary)


def test_the_recipes_by_method_through_the_programs_builder(monkeypatch):
    """--method takes every recipe (man++ spelt as the program does), built by mf.schemes.build
    with its defaults; the presets keep the six published schemes."""
    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    import accuracy
    import mlaan_func as mf
    from mlaan_func import data

    args = accuracy.parse_args(["--method", "man++", "neuron-groups", "pgl", "--modules", "4"])
    assert args.method == ["man_pp", "neuron_groups", "pgl"]
    assert accuracy.parse_args([]).method == list(accuracy.common.METHODS)
    assert set(mf.schemes.RECIPES) <= set(accuracy.METHODS)
    with pytest.raises(SystemExit):
        accuracy.parse_args(["--papers", "--method", "hpff"])   # no K of the papers' tables
    dataset = data.load("synthetic", "data", train_size=8, seed=0)
    scheme, _ = accuracy.build("neuron_groups", "resnet20-narrow", 4, dataset, False, None, args)
    assert [o.name for o in scheme][:2] == ["m0.g0", "m0.g1"]
    scheme, _ = accuracy.build("man_pp", "resnet20-narrow", 4, dataset, False, None, args)
    assert sum(k.endswith(".scale") for o in scheme for k in o.param_names) == 3
