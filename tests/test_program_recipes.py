"""The program takes every recipe of the scheme zoo by --method (docs/schemes.md)."""

from __future__ import annotations

import json

import pytest

import mlaan_func as mf
from test_program import run


@pytest.mark.parametrize("method", mf.schemes.RECIPES)
def test_the_program_trains_each_recipe(tmp_path, method):
    out = tmp_path / method
    r = run(["--dataset", "synthetic", "--synthetic-size", "64", "--epochs", "1", "--max-steps", "2",
             "--batch-size", "16", "--modules", "4", "--method", method.replace("_", "-"), "--threads", "1",
             "--no-progress", "--out", str(out)])
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["method"] == method and summary["modules"] == 4


def test_the_program_takes_man_plus_plus_by_its_name(tmp_path):
    out = tmp_path / "manpp"
    r = run(["--dataset", "synthetic", "--synthetic-size", "32", "--epochs", "1", "--max-steps", "1",
             "--batch-size", "16", "--modules", "3", "--method", "man++", "--threads", "1",
             "--no-progress", "--out", str(out)])
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads((out / "summary.json").read_text())["method"] == "man_pp"
