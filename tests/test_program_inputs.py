"""The program's answers to issues #27 and #25: --compile compiles, fresh starts start afresh,
and wrong data or flags are refused before the first step, in one line."""

import json
import os
import signal
import subprocess
import sys

import pytest
import torch
from torch import nn

import mlaan_func as mf
from mlaan_func.memory import track_memory
from test_program import PROGRAM, QUICK, one_line_error, program, run

TINY = [*QUICK, "--method", "dgl", "--modules", "2", "--epochs", "1", "--max-steps", "1"]


# ----------------------------------------------------------------- issue 27: --compile, threads, logs

def test_a_step_first_called_under_track_memory_still_compiles():
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    net = mf.from_module(nn.Sequential(nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 3)))
    scheme = mf.schemes.build("dgl", net, ["1"], input_shape=(6,))
    opt = mf.optim.sgd(0.1)
    ts = mf.init(scheme, opt, seed=0)
    train_step = mf.step(scheme, opt, compile=True, backend="aot_eager")
    batch = (torch.randn(4, 6), torch.randint(0, 3, (4,)))
    with track_memory() as meter:
        ts, _ = train_step(ts, batch)
    assert meter.peak_bytes > 0 and counters["stats"]["unique_graphs"] == 0  # eager inside the tracker
    train_step(ts, batch)
    assert counters["stats"]["unique_graphs"] > 0


@pytest.mark.slow
def test_compile_on_a_fresh_inductor_cache_compiles_and_counts_its_graphs(tmp_path):
    cache = tmp_path / "inductor"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TORCHINDUCTOR_CACHE_DIR": str(cache)}
    out = tmp_path / "run"
    r = subprocess.run([sys.executable, PROGRAM, *TINY, "--compile", "--out", str(out)], capture_output=True,
                       text=True, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["compile"] is True and summary["compiled_graphs"] > 0
    assert summary["peak_step_bytes"] > 0
    assert any(cache.iterdir())


def test_compile_that_cannot_compile_exits_2_in_one_line(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CXX": str(tmp_path / "no-such-compiler"),
           "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor")}
    r = subprocess.run([sys.executable, PROGRAM, *TINY, "--compile", "--out", str(tmp_path / "run")],
                       capture_output=True, text=True, env=env)
    one_line_error(r, 2, "--compile", "without --compile", started=True)


def test_a_fresh_start_after_a_kill_before_the_first_checkpoint_logs_each_step_once(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.json").write_text("{}")  # what a run killed -9 at step 2 leaves
    (out / "train_log.jsonl").write_text("".join(json.dumps({"step": s, "epoch": 1, "loss": {}}) + "\n"
                                                 for s in (1, 2)))
    r = run([*QUICK, "--method", "dgl", "--modules", "2", "--epochs", "1", "--out", str(out)])
    assert r.returncode == 0, r.stderr[-3000:]
    steps = [json.loads(line)["step"] for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["threads"] == 1 and "1 CPU threads ($OMP_NUM_THREADS)" in r.stderr
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert {"step_images_per_second", "wall_images_per_second"} <= set(rows[0])
    assert "images_per_second_note" in summary


def test_threads_default_to_the_cpus_this_process_may_use(monkeypatch):
    prog = program()
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert prog.parse_args(["--dataset", "synthetic"]).threads == len(os.sched_getaffinity(0))
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert prog.parse_args(["--dataset", "synthetic"]).threads == 3
    assert prog.parse_args(["--dataset", "synthetic", "--threads", "2"]).threads == 2
    with pytest.raises(prog.UsageError, match="--threads"):
        prog.parse_args(["--dataset", "synthetic", "--threads", "0"])
