"""The example program end to end: runs, resumes exactly, and refuses bad input cleanly."""

import fcntl
import functools
import importlib.util
import json
import os
import resource
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
def test_share_flag_keeps_the_run_bit_for_bit_and_sum_to_rounding(tmp_path):
    """--share auto (the default) computes each shared block once with the per-objective
    engine's gradients, bit for bit; --share sum equals them to float32 rounding."""
    runs = {}
    for share in ("off", "auto", "sum"):
        out = tmp_path / share
        r = run([*QUICK, "--method", "mlaan", "--epochs", "1", "--share", share, "--out", str(out)])
        assert r.returncode == 0, r.stderr[-3000:]
        runs[share] = mf.load(out / "checkpoint.pt")
    mt.assert_identical(runs["auto"].params, runs["off"].params)
    # float32 rounding grown over three steps: judged on the whole parameter vector and per
    # entry in absolute terms (a BatchNorm bias near 0 can differ by 1e-2 of itself, 1e-6 in all)
    flat = lambda p: torch.cat([v.flatten() for v in p.values()])  # noqa: E731
    mt.assert_close(flat(runs["sum"].params), flat(runs["off"].params), 1e-3)   # measured 7e-5
    assert all(float((runs["sum"].params[k] - v).abs().max()) <= 1e-3 for k, v in runs["off"].params.items())


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
    assert r.returncode == 3 and "Traceback" not in r.stderr
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


def torchrun(args, nproc=2):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-addr",
           "127.0.0.1", "--master-port", str(port), PROGRAM, *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})


@pytest.mark.slow
def test_torchrun_pipeline_stopped_and_resumed_equals_one_process_bitwise(tmp_path):
    """`--parallel pipeline --method dgl` on 2 ranks, streamed in chunks of 2 steps, stopped
    at step 4 (mid-epoch, mid-chunk of the uninterrupted run) and resumed, ends with the
    parameters, state and optimizer state of the same run in one process, bit for bit."""
    one = tmp_path / "one"
    assert run([*QUICK, "--method", "dgl", "--out", str(one)]).returncode == 0
    out = tmp_path / "pipe"
    args = [*QUICK, "--method", "dgl", "--parallel", "pipeline", "--pipeline-chunk", "2", "--out", str(out)]
    r = torchrun([*args, "--stop-after-steps", "4"])
    assert "continue with --resume" in r.stderr, r.stderr[-3000:]
    assert int(mf.load(out / "checkpoint.pt").step) == 4
    r = torchrun([*args, "--resume"])
    assert r.returncode == 0, r.stderr[-3000:]
    got, want = mf.load(out / "checkpoint.pt"), mf.load(one / "checkpoint.pt")
    mt.assert_identical(got.params, want.params)
    mt.assert_identical(got.state, want.state)
    mt.assert_identical(got.opt_state, want.opt_state)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["processes"] == 2 and summary["parallel"] == "pipeline"
    logged = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [row["step"] for row in logged] == [1, 2, 3, 4, 5, 6] and "final" in logged[-1]["loss"]


@pytest.mark.slow
def test_torchrun_data_by_pipeline_mesh_equals_data_parallel_bitwise(tmp_path):
    """4 processes as 2 data replicas x 2 pipeline stages train as 2 data-parallel processes do."""
    runs = {}
    for name, extra, n in [("mesh", ["--parallel", "pipeline", "--data-replicas", "2"], 4),
                           ("data", ["--parallel", "data"], 2)]:
        r = torchrun([*QUICK, "--epochs", "1", "--method", "dgl", *extra, "--out", str(tmp_path / name)], nproc=n)
        assert r.returncode == 0, r.stderr[-3000:]
        runs[name] = mf.load(tmp_path / name / "checkpoint.pt")
    mt.assert_identical(runs["mesh"].params, runs["data"].params)
    mt.assert_identical(runs["mesh"].opt_state, runs["data"].opt_state)


def test_data_replicas_need_the_pipeline(tmp_path):
    r = run([*QUICK, "--data-replicas", "2", "--out", str(tmp_path / "x")])
    assert r.returncode == 2 and "--parallel pipeline" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.slow
def test_torchrun_pipeline_refuses_a_crossing_scheme(tmp_path):
    r = torchrun([*QUICK, "--method", "mlaan", "--parallel", "pipeline", "--out", str(tmp_path / "x")])
    assert r.returncode != 0 and "--parallel pipeline --method mlaan" in r.stderr and "crosses ranks" in r.stderr
    assert "--staleness 1" in r.stderr


@pytest.mark.slow
def test_torchrun_mlaan_pipeline_under_staleness_resumes_bitwise(tmp_path):
    """MLAAN streamed under --staleness 1: stopped at step 4 and resumed (each rank's in-flight
    gradients kept in the checkpoint), it ends as the uninterrupted run does, bit for bit."""
    args = [*QUICK, "--method", "mlaan", "--parallel", "pipeline", "--staleness", "1", "--pipeline-chunk", "2"]
    r = torchrun([*args, "--out", str(tmp_path / "whole")])
    assert r.returncode == 0, r.stderr[-3000:]
    r = torchrun([*args, "--out", str(tmp_path / "cut"), "--stop-after-steps", "4"])
    assert "continue with --resume" in r.stderr, r.stderr[-3000:]
    r = torchrun([*args, "--out", str(tmp_path / "cut"), "--resume"])
    assert r.returncode == 0, r.stderr[-3000:]
    got, want = mf.load(tmp_path / "cut" / "checkpoint.pt"), mf.load(tmp_path / "whole" / "checkpoint.pt")
    mt.assert_identical(got.params, want.params)
    mt.assert_identical(got.state, want.state)
    mt.assert_identical(got.opt_state, want.opt_state)


def test_staleness_needs_the_pipeline(tmp_path):
    r = run([*QUICK, "--staleness", "1", "--out", str(tmp_path / "x")])
    assert r.returncode == 2 and "--parallel pipeline" in r.stderr and "Traceback" not in r.stderr


def test_parallel_without_torchrun_is_refused(tmp_path):
    r = run([*QUICK, "--parallel", "modules", "--out", str(tmp_path / "x")])
    assert r.returncode == 2 and "torchrun" in r.stderr


def test_published_tables_reject_the_about_entry_and_never_recommend_even_split():
    for lookup in (mf.published_split, mf.leap_trunk_table):
        with pytest.raises(ValueError, match="no published") as err:
            lookup("about", 2)
        assert "about" not in str(err.value).split("known:")[1]
    with pytest.raises(ValueError) as err:
        mf.published_split("resnet32", 7)
    assert "even_split" not in str(err.value) and "split_for" in str(err.value)
    assert mf.infopro_lambda_table("about", "resnet32", 4) is None
    assert mf.infopro_lambda_table("infopro", "about", 4) is None


# ----------------------------------------------------------------- issue 17: nothing lost, nothing silent

@functools.cache
def program():
    """The program as a module (its main() is not run on import)."""
    spec = importlib.util.spec_from_file_location("cifar_mlaan_program", PROGRAM)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def program_checkpoint(out, *flags):
    """A checkpoint with the program's scheme for QUICK + flags, as the program would write it."""
    prog = program()
    args = prog.parse_args([*QUICK, "--method", "dgl", "--out", str(out), *flags])
    _, scheme = prog.build_scheme(args, prog.load_data(args))
    ts = mf.init(scheme, mf.optim.sgd(0.1, momentum=0.9, nesterov=True), seed=0)
    out.mkdir(parents=True, exist_ok=True)
    mf.save(out / "checkpoint.pt", ts, extra={"epoch": 1, "batch": 0, "best": 0.0, "args": vars(args)})
    return ts


def one_line_error(r, code, *needles, started=False):
    """Exit ``code`` and one error line (after the two-line banner of a run that had ``started``)."""
    assert r.returncode == code, (r.returncode, r.stderr[-2000:])
    lines = [line for line in r.stderr.strip().splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    assert "Traceback" not in r.stderr and len(errors) == 1 and lines[-1] == errors[0], r.stderr[-2000:]
    assert len(lines) == (3 if started else 1), r.stderr[-2000:]
    for needle in needles:
        assert needle in r.stderr, (needle, r.stderr)


OLD_RUN = {"checkpoint.pt": b"old weights", "summary.json": b'{"old": 1}', "metrics.jsonl": b'{"epoch": 1}\n',
           "config.json": b"{}", "train_log.jsonl": b'{"step": 1}\n', "curves.png": b"png"}


def write_old_run(out):
    out.mkdir(parents=True)
    for name, raw in OLD_RUN.items():
        (out / name).write_bytes(raw)


def assert_old_run_intact(out):
    for name, raw in OLD_RUN.items():
        assert (out / name).read_bytes() == raw, name
    assert not (out / ".replaced-run").exists()


def test_item1_refused_overwrite_loses_nothing(tmp_path):
    out = tmp_path / "run"
    write_old_run(out)
    one_line_error(run([*QUICK, "--overwrite", "--modules", "99", "--out", str(out)]), 2, "99 modules")
    assert_old_run_intact(out)
    r = run(["--dataset", "cifar10", "--data-dir", str(tmp_path / "empty"), "--overwrite", "--out", str(out),
             "--epochs", "1"])
    one_line_error(r, 3, "--data-dir")
    assert_old_run_intact(out)


def test_item2_a_users_archive_with_a_wrong_md5_is_kept(tmp_path):
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    archive = data_dir / "cifar-10-python.tar.gz"
    archive.write_bytes(b"my own partial copy")
    r = run(["--dataset", "cifar10", "--data-dir", str(data_dir), "--out", str(tmp_path / "x"), "--epochs", "1"])
    one_line_error(r, 3, "md5", str(archive))
    assert archive.read_bytes() == b"my own partial copy"


def test_item3_flipped_bytes_in_a_tensor_are_detected_on_eval_only_and_resume(tmp_path):
    out = tmp_path / "run"
    ts = program_checkpoint(out)
    raw = bytearray((out / "checkpoint.pt").read_bytes())
    weight = next(v for k, v in ts.params.items() if v.numel() > 64)
    at = bytes(raw).find(weight.numpy().tobytes())
    assert at > 0
    raw[at + 8:at + 12] = b"\x7c\x7c\x7c\x7c"
    (out / "checkpoint.pt").write_bytes(bytes(raw))
    for mode in ("--eval-only", "--resume"):
        one_line_error(run([*QUICK, "--method", "dgl", "--out", str(out), mode]), 4, "corrupted")


def test_item4_a_second_run_into_one_out_is_refused_and_a_killed_runs_lock_blocks_nothing(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, os, sys, time\n"
        f"f = open({str(out / '.lock')!r}, 'a+'); fcntl.flock(f, fcntl.LOCK_EX)\n"
        "f.write(f'{os.getpid()}\\n'); f.flush(); print('locked', flush=True); time.sleep(600)")],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        one_line_error(run([*QUICK, "--out", str(out)]), 7, "another run", str(holder.pid))
    finally:
        holder.kill()  # kill -9: the kernel releases its lock
        holder.wait()
    one_line_error(run([*QUICK, "--out", str(out), "--resume"]), 2, "no checkpoint")
    with open(out / ".lock", "a+") as f:  # and nobody holds it after the refused run either
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)


def test_item5_resume_without_config_json_compares_the_flags_saved_in_the_checkpoint(tmp_path):
    out = tmp_path / "run"
    program_checkpoint(out, "--lr", "0.3")
    assert not (out / "config.json").exists()
    one_line_error(run([*QUICK, "--method", "dgl", "--out", str(out), "--resume"]), 2,
                   "different configuration", "--lr 0.3 (checkpoint) vs 0.05")


@pytest.mark.slow
def test_item6_logs_resume_exactly_and_stale_temp_files_are_removed(tmp_path):
    out = tmp_path / "run"
    args = [*QUICK, "--method", "dgl"]
    assert run([*args, "--out", str(out), "--stop-after-steps", "2"]).returncode == 130
    with open(out / "train_log.jsonl", "a") as f:  # what a run killed after step 4 had logged
        f.write(json.dumps({"step": 3, "epoch": 1, "loss": {}}) + "\n")
        f.write(json.dumps({"step": 4, "epoch": 2, "loss": {}}) + "\n" + '{"step": 5, "ep')
    with open(out / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"epoch": 1, "step": 3}) + "\n")
    (out / ".tmp-killed.pt").write_bytes(b"x" * 1000)
    r = run([*args, "--out", str(out), "--resume"])
    assert r.returncode == 0, r.stderr[-3000:]
    steps = [json.loads(line)["step"] for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [row["epoch"] for row in rows] == [1, 2] and "test_accuracy" in rows[0]
    assert not list(out.glob(".tmp-*"))


@pytest.mark.slow
def test_item7_an_explicit_data_dir_wins_and_the_summary_names_the_files(tmp_path):
    import gzip

    import numpy as np

    data_dir = tmp_path / "fm"
    data_dir.mkdir()
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 60), ("t10k", 20)):
        for kind, shape in (("images-idx3", (n, 28, 28)), ("labels-idx1", (n,))):
            a = rng.integers(0, 256 if kind.startswith("images") else 10, shape).astype(np.uint8)
            head = bytes([0, 0, 8, a.ndim]) + np.array(a.shape, ">u4").tobytes()
            (data_dir / f"{prefix}-{kind}-ubyte.gz").write_bytes(gzip.compress(head + a.tobytes()))
    out = tmp_path / "run"
    r = run(["--dataset", "fashion-mnist", "--data-dir", str(data_dir), "--batch-size", "16", "--epochs", "1",
             "--max-steps", "1", "--method", "dgl", "--modules", "2", "--no-progress", "--out", str(out)])
    assert r.returncode == 0, r.stderr[-3000:]
    assert "60 training images" in r.stderr
    files = json.loads((out / "summary.json").read_text())["data_files"]
    assert len(files) == 4 and all(f.startswith(str(data_dir)) for f in files)


@pytest.mark.parametrize("flags, needle", [
    (["--lr", "nan"], "--lr"), (["--lr", "inf"], "--lr"), (["--lr", "-1"], "--lr"),
    (["--weight-decay", "nan"], "--weight-decay"), (["--warmup-epochs", "-5"], "--warmup-epochs"),
    (["--device", "tpu"], "--device"), (["--subset", "0"], "--subset"), (["--subset", "-5"], "--subset"),
    (["--lr", "abc"], "--lr"), (["--resume", "--overwrite"], "--overwrite"),
])
def test_bad_flags_exit_2_with_one_line(tmp_path, flags, needle):
    one_line_error(run([*QUICK, *flags, "--out", str(tmp_path / "x")]), 2, needle)
    assert not (tmp_path / "x").exists()


def test_data_dir_that_is_a_file_and_json_into_a_missing_directory_exit_2_before_training(tmp_path):
    (tmp_path / "file").write_text("")
    one_line_error(run([*QUICK, "--data-dir", str(tmp_path / "file"), "--out", str(tmp_path / "x")]), 2,
                   "--data-dir")
    one_line_error(run([*QUICK, "--json", str(tmp_path / "missing" / "s.json"), "--out", str(tmp_path / "y")]),
                   2, "--json", "does not exist")
    assert not (tmp_path / "y").exists()


def test_labels_out_of_range_exit_3(tmp_path):
    import numpy as np

    data_dir = tmp_path / "fm"
    data_dir.mkdir()
    for prefix, n in (("train", 8), ("t10k", 4)):
        for kind, a in (("images-idx3", np.zeros((n, 28, 28), np.uint8)), ("labels-idx1", np.full(n, 11, np.uint8))):
            head = bytes([0, 0, 8, a.ndim]) + np.array(a.shape, ">u4").tobytes()
            (data_dir / f"{prefix}-{kind}-ubyte").write_bytes(head + a.tobytes())
    r = run(["--dataset", "fashion-mnist", "--data-dir", str(data_dir), "--out", str(tmp_path / "x")])
    one_line_error(r, 3, "labels outside")


class Evil:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("mode", ["--resume", "--eval-only"])
def test_unreadable_truncated_or_crafted_checkpoints_exit_4_and_run_nothing(tmp_path, mode):
    out = tmp_path / "run"
    program_checkpoint(out)
    raw = (out / "checkpoint.pt").read_bytes()
    marker = tmp_path / "marker"
    cases = {"truncated": raw[:len(raw) // 2], "garbage": b"not a checkpoint"}
    torch.save({"train_state": Evil(marker), "extra": {}}, tmp_path / "evil.pt")
    cases["crafted"] = (tmp_path / "evil.pt").read_bytes()
    for name, content in cases.items():
        (out / "checkpoint.pt").write_bytes(content)
        one_line_error(run([*QUICK, "--method", "dgl", "--out", str(out), mode]), 4, str(out / "checkpoint.pt"))
        assert not marker.exists(), name


@pytest.mark.slow
def test_a_diverging_run_exits_5_and_says_where_the_last_good_checkpoint_is(tmp_path):
    out = tmp_path / "run"
    r = run([*QUICK, "--method", "dgl", "--lr", "1e12", "--warmup-epochs", "0", "--checkpoint-minutes", "0",
             "--out", str(out)])
    one_line_error(r, 5, "diverged", started=True)
    assert str(out / "checkpoint.pt") in r.stderr or "no checkpoint" in r.stderr
    if (out / "checkpoint.pt").exists():
        ts = mf.load(out / "checkpoint.pt")
        assert all(bool(torch.isfinite(v).all()) for v in ts.params.values())


def limit_file_size(limit):
    def pre():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG, like ENOSPC
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return pre


@pytest.mark.slow
def test_a_full_disk_exits_6_with_one_line_and_leaves_no_partial_file(tmp_path):
    out = tmp_path / "run"
    r = run([*QUICK, "--method", "dgl", "--epochs", "1", "--out", str(out)], preexec_fn=limit_file_size(1 << 20))
    one_line_error(r, 6, "cannot write", "checkpoint.pt", "start the run again", started=True)
    assert not list(out.glob(".tmp-*")) and not (out / "checkpoint.pt").exists()


@pytest.mark.slow
def test_ctrl_c_during_evaluation_stops_the_run_and_resumes_exactly(tmp_path):
    args = [*QUICK, "--method", "dgl"]
    straight = tmp_path / "straight"
    assert run([*args, "--out", str(straight)]).returncode == 0
    cut = tmp_path / "cut"
    r = run([*args, "--out", str(cut), "--interrupt-evaluation"])
    assert r.returncode == 130 and "--resume" in r.stderr, r.stderr[-2000:]
    assert not (cut / "metrics.jsonl").exists()
    r = run([*args, "--out", str(cut), "--resume"])
    assert r.returncode == 0, r.stderr[-3000:]
    mt.assert_identical(final_params(cut), final_params(straight))
    rows = [json.loads(line) for line in (cut / "metrics.jsonl").read_text().splitlines()]
    want = [json.loads(line) for line in (straight / "metrics.jsonl").read_text().splitlines()]
    assert [r["test_accuracy"] for r in rows] == [r["test_accuracy"] for r in want]
    assert [r["train_loss"] for r in rows] == [r["train_loss"] for r in want]


@pytest.mark.slow
def test_overwrite_replaces_the_old_run_only_after_the_first_checkpoint(tmp_path):
    out = tmp_path / "run"
    write_old_run(out)
    r = run([*QUICK, "--method", "dgl", "--lr", "1e12", "--warmup-epochs", "0", "--overwrite", "--out", str(out)])
    assert r.returncode == 5 and "restored" in r.stderr, r.stderr[-2000:]
    assert_old_run_intact(out)
    r = run([*QUICK, "--method", "dgl", "--epochs", "1", "--overwrite", "--out", str(out)])
    assert r.returncode == 0, r.stderr[-2000:]
    assert (out / "summary.json").read_bytes() != OLD_RUN["summary.json"] and not (out / ".replaced-run").exists()
    mf.load(out / "checkpoint.pt")


def test_help_shows_every_default_and_the_exit_codes():
    r = run(["--help"])
    assert r.returncode == 0
    text = " ".join(r.stdout.split())
    for needle in ("--epochs EPOCHS epochs to train (default: 400)", "linear rule", "5% of the run",
                   "exit codes:", "130", "another run is using --out"):
        assert needle in text, needle


def test_default_lr_follows_the_linear_rule_and_short_runs_warm_up_briefly():
    prog = program()
    args = prog.parse_args(["--batch-size", "128", "--dataset", "synthetic"])
    assert args.lr == pytest.approx(0.1)
    assert prog.parse_args(["--dataset", "synthetic"]).lr == pytest.approx(0.8)
    assert prog.warmup_steps(args, 100, 100)[0] == 5
    assert prog.warmup_steps(prog.parse_args(["--dataset", "synthetic"]), 48, 48 * 400)[0] == 480
    args = prog.parse_args(["--warmup-epochs", "0.5", "--dataset", "synthetic"])
    assert prog.warmup_steps(args, 10, 20)[0] == 5
