"""The example program end to end: runs, resumes exactly, and refuses bad input cleanly."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import mlaan_func as mf
from mlaan_func import testing as mt

PROGRAM = str(Path(__file__).resolve().parents[1] / "examples" / "cifar_mlaan.py")
QUICK = ["--dataset", "synthetic", "--synthetic-size", "96", "--batch-size", "16", "--epochs", "2",
         "--max-steps", "3", "--modules", "4", "--lr", "0.05", "--warmup-epochs", "0.5", "--no-progress"]


def run(args, timeout=300, **kwargs):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, PROGRAM, *args], capture_output=True, text=True, timeout=timeout,
                          env=env, **kwargs)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["e2e", "dgl", "infopro", "mlaan", "dgl-mlaan", "infopro_mlaan"])
def test_every_method_runs_end_to_end_on_synthetic(tmp_path, method):
    out = tmp_path / "run"
    r = run([*QUICK, "--method", method, "--out", str(out)])
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    for key in ("method", "arch", "modules", "dataset", "epochs", "test_accuracy", "best_test_accuracy",
                "images_per_second", "peak_step_bytes", "persistent_bytes", "parameters", "seconds"):
        assert key in summary, key
    assert summary["peak_step_bytes"] > 0 and summary["epochs"] == 2
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2] and "final" in rows[-1]["test_accuracy"]
    assert (out / "checkpoint.pt").exists() and (out / "curves.png").exists()


@pytest.mark.slow
@pytest.mark.skipif(not Path("/usr/share/datasets/fashion-mnist").exists(),
                    reason="needs the Debian package dataset-fashion-mnist (CI installs it)")
def test_fashion_mnist_subset_with_validation(tmp_path):
    out = tmp_path / "fm"
    r = run(["--dataset", "fashion-mnist", "--subset", "256", "--batch-size", "32", "--epochs", "1",
             "--max-steps", "4", "--method", "dgl-mlaan", "--modules", "4", "--val-fraction", "0.25",
             "--lr", "0.05", "--no-progress", "--out", str(out)])
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["dataset"] == "fashion-mnist" and "val_accuracy" in summary


def final_params(out):
    return mf.load(out / "checkpoint.pt").params


@pytest.mark.slow
def test_interrupted_and_resumed_run_equals_an_uninterrupted_one(tmp_path):
    args = [*QUICK, "--method", "dgl-mlaan"]
    straight = tmp_path / "straight"
    assert run([*args, "--out", str(straight)]).returncode == 0
    cut = tmp_path / "cut"
    r = run([*args, "--out", str(cut), "--stop-after-steps", "4"])
    assert r.returncode == 130 and "--resume" in r.stderr
    assert int(mf.load(cut / "checkpoint.pt").step) == 4
    r = run([*args, "--out", str(cut), "--resume"])
    assert r.returncode == 0, r.stderr[-3000:]
    mt.assert_identical(final_params(cut), final_params(straight))


@pytest.mark.slow
def test_sigterm_mid_epoch_saves_a_checkpoint_that_resumes_exactly(tmp_path):
    args = [*QUICK, "--method", "dgl", "--epochs", "3", "--max-steps", "6", "--checkpoint-minutes", "0"]
    straight = tmp_path / "straight"
    assert run([*args, "--out", str(straight)]).returncode == 0
    cut = tmp_path / "cut"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, PROGRAM, *args, "--out", str(cut)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (cut / "checkpoint.pt").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=120)
    assert proc.returncode in (0, 130)
    mf.load(cut / "checkpoint.pt")  # never a broken file
    if proc.returncode == 130:
        assert run([*args, "--out", str(cut), "--resume"]).returncode == 0
    mt.assert_identical(final_params(cut), final_params(straight))


@pytest.mark.parametrize("args, message", [
    (["--method", "backprop"], "unknown --method"),
    (["--arch", "resnet7"], "unknown --arch"),
    (["--dataset", "imagenet-21k"], "unknown --dataset"),
    (["--modules", "40"], "cannot be split into 40 modules"),
    (["--method", "mlaan", "--window", "9"], "window width"),
])
def test_bad_flags_give_one_line_errors(tmp_path, args, message):
    r = run([*QUICK, *args, "--out", str(tmp_path / "x")])
    assert r.returncode == 2 and message in r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_missing_dataset_names_the_files_and_the_offline_route(tmp_path):
    r = run(["--dataset", "cifar10", "--data-dir", str(tmp_path / "empty"), "--out", str(tmp_path / "x"),
             "--max-steps", "1", "--epochs", "1"], timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "--data-dir" in r.stderr and "fashion-mnist" in r.stderr


def test_out_with_a_run_is_refused_and_left_intact(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "summary.json").write_text('{"keep": 1}')
    r = run([*QUICK, "--out", str(out)])
    assert r.returncode == 2 and "--resume" in r.stderr and "--overwrite" in r.stderr
    assert (out / "summary.json").read_text() == '{"keep": 1}'


def test_resume_without_checkpoint_and_unwritable_out(tmp_path):
    r = run([*QUICK, "--out", str(tmp_path / "nothing"), "--resume"])
    assert r.returncode == 2 and "no checkpoint" in r.stderr
    blocker = tmp_path / "file"
    blocker.write_text("")
    r = run([*QUICK, "--out", str(blocker / "sub")])
    assert r.returncode == 2 and "cannot write" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.slow
def test_resume_with_another_configuration_is_refused(tmp_path):
    out = tmp_path / "run"
    assert run([*QUICK, "--method", "dgl", "--out", str(out), "--epochs", "1"]).returncode == 0
    before = (out / "checkpoint.pt").read_bytes()
    r = run([*QUICK, "--method", "dgl", "--out", str(out), "--epochs", "1", "--lr", "0.3", "--resume"])
    assert r.returncode == 2 and "different configuration" in r.stderr and "--lr" in r.stderr
    assert (out / "checkpoint.pt").read_bytes() == before


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["data", "modules"])
def test_torchrun_two_processes(tmp_path, mode):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / mode
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(port), PROGRAM, *QUICK, "--epochs", "1", "--method", "dgl-mlaan",
           "--parallel", mode, "--micro-batches", "2", "--out", str(out)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["processes"] == 2 and summary["parallel"] == mode


def test_parallel_without_torchrun_is_refused(tmp_path):
    r = run([*QUICK, "--parallel", "modules", "--out", str(tmp_path / "x")])
    assert r.returncode == 2 and "torchrun" in r.stderr
