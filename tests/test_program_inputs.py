"""The program's answers to issues #27 and #25: --compile compiles, fresh starts start afresh,
and wrong data or flags are refused before the first step, in one line."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import mlaan_func as mf
from mlaan_func.memory import track_memory
from test_program import PROGRAM, QUICK, one_line_error, program, run

TINY = [*QUICK, "--method", "dgl", "--modules", "2", "--epochs", "1", "--max-steps", "1"]


def last_line_error(r, code, *needles):
    """Exit ``code``, no traceback, and the one error line last (after whatever the run printed)."""
    assert r.returncode == code, (r.returncode, r.stderr[-2000:])
    lines = [line for line in r.stderr.strip().splitlines() if line.strip()]
    assert "Traceback" not in r.stderr and [x for x in lines if x.startswith("error:")] == lines[-1:], r.stderr
    for needle in needles:
        assert needle in lines[-1], (needle, lines[-1])


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
    assert summary["threads"] == 1 and "1 CPU threads ($OMP_NUM_THREADS, OMP_WAIT_POLICY=PASSIVE)" in r.stderr
    assert summary["omp_wait_policy"] == "PASSIVE"
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


# ----------------------------------------------------------------- issue 25: refused before the first step

@pytest.fixture
def folder(tmp_path):
    from mlaan_func import imagefolder

    return imagefolder.write_example_folder(tmp_path / "images", classes=("a", "b"), per_class=4, size=12)


def folder_run(data_dir, out, *more):
    return ["--dataset", "folder", "--data-dir", str(data_dir), "--arch", "resnet18", "--image-size", "16",
            "--batch-size", "4", "--epochs", "1", "--max-steps", "2", "--lr", "0.05", "--warmup-epochs", "0",
            "--workers", "0", "--method", "dgl", "--modules", "2", "--no-progress", "--out", str(out), *more]


@pytest.mark.parametrize("split, workers", [("val", "0"), ("val", "2"), ("train", "2")])
def test_item3_a_split_without_a_readable_image_exits_3_before_the_first_step(folder, tmp_path, split, workers):
    files = sorted((folder / split).rglob("*.jpg"))
    for f in files:
        f.write_bytes(b"not an image")
    out = tmp_path / "run"
    r = run(folder_run(folder, out, "--workers", workers))
    one_line_error(r, 3, f"{split}: {len(files)} of {len(files)} images")
    assert not (out / "checkpoint.pt").exists()


def test_item4_a_folder_with_one_class_is_refused(tmp_path):
    from mlaan_func import imagefolder

    data = imagefolder.write_example_folder(tmp_path / "one", classes=("only",), per_class=4, size=12)
    one_line_error(run(folder_run(data, tmp_path / "run")), 3, "at least two classes")


def test_item5_resume_on_changed_data_is_refused_naming_what_changed(folder, tmp_path):
    out = tmp_path / "run"
    r = run(folder_run(folder, out, "--stop-after-steps", "1"))
    assert r.returncode == 130, r.stderr[-3000:]
    (folder / "train" / "b" / "3.jpg").unlink()
    last_line_error(run(folder_run(folder, out, "--resume")), 3, "data changed", "train/b: 3 files now, 4 files at the checkpoint")


@pytest.mark.parametrize("flag", [["--share", "sum"], ["--channels-last"], ["--compile"], ["--threads", "2"]])
def test_item6_resume_compares_every_flag_that_changes_the_numbers(tmp_path, flag):
    out = tmp_path / "run"
    from test_program import program_checkpoint

    program_checkpoint(out)
    name = flag[0]
    one_line_error(run([*QUICK, "--method", "dgl", "--out", str(out), "--resume", *flag]), 2,
                   "different configuration", name)


def test_item6_help_lists_the_flags_resume_does_not_compare():
    text = " ".join(run(["--help"]).stdout.split())
    assert "--resume refuses a checkpoint written with other flags, except these" in text
    for name in ("--workers", "--no-progress", "--checkpoint-minutes", "--device"):
        assert name in text.split("except these")[1].split("exit codes")[0], name


def test_item10_ranks_started_with_different_flags_exit_2_in_one_line_each(tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for rank, lr in ((0, "0.05"), (1, "0.1")):
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
               "WORLD_SIZE": "2", "RANK": str(rank), "LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": "2"}
        procs.append(subprocess.Popen([sys.executable, PROGRAM, *QUICK, "--lr", lr, "--out", str(tmp_path / "run")],
                                      env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    for proc in procs:
        stdout, stderr = proc.communicate()
        one_line_error(subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr), 2,
                       "another configuration", "lr")


def test_item11_micro_batches_that_do_not_divide_the_batch_are_refused_at_start(tmp_path):
    one_line_error(run([*QUICK, "--parallel", "modules", "--micro-batches", "3", "--out", str(tmp_path / "x")]), 2,
                   "--micro-batches 3", "--batch-size 16")


@pytest.mark.parametrize("sig", ["INT", "TERM"])
def test_item13_a_signal_while_the_summary_is_written_exits_130_and_keeps_the_checkpoint(tmp_path, sig):
    out = tmp_path / "run"
    args = [*QUICK, "--method", "dgl", "--modules", "2", "--epochs", "1", "--max-steps", "2", "--out", str(out)]
    r = run([*args, "--interrupt-summary", sig])
    last_line_error(r, 130, "interrupted after training; the final checkpoint is kept")
    assert int(mf.load(out / "checkpoint.pt").step) == 2 and not (out / "summary.json").exists()
    r = run([*args, "--resume"])
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads((out / "summary.json").read_text())["steps"] == 2


def test_item14_eval_only_after_a_killed_overwrite_says_where_the_previous_run_is(tmp_path):
    out = tmp_path / "run"
    (out / ".replaced-run").mkdir(parents=True)
    (out / ".replaced-run" / "checkpoint.pt").write_bytes(b"the previous run")
    one_line_error(run([*QUICK, "--out", str(out), "--eval-only"]), 2, str(out / ".replaced-run"), "--resume")


@pytest.mark.parametrize("flags, needle", [
    (["--image-size", "4"], "--image-size"), (["--image-size", "0"], "--image-size"),
    (["--method", "dgl", "--window", "3"], "--window"),
])
def test_item15_bad_sizes_and_windows_exit_2_naming_the_flag(tmp_path, flags, needle):
    one_line_error(run([*QUICK, *flags, "--out", str(tmp_path / "x")]), 2, needle)


def test_item15_a_vit_image_size_its_patches_do_not_tile_is_refused(folder, tmp_path):
    r = run(folder_run(folder, tmp_path / "run", "--arch", "vit_micro", "--image-size", "31"))
    last_line_error(r, 2, "--arch vit_micro", "31x31", "--image-size")


def test_item15_a_lock_that_is_a_directory_is_named(tmp_path):
    out = tmp_path / "run"
    (out / ".lock").mkdir(parents=True)
    one_line_error(run([*QUICK, "--out", str(out)]), 2, f"{out / '.lock'} is a directory")


def test_item15_the_checkpoint_follows_the_umask_like_every_other_output(tmp_path):
    out = tmp_path / "run"
    r = run([*QUICK, "--method", "dgl", "--modules", "2", "--epochs", "1", "--max-steps", "1", "--out", str(out)],
            preexec_fn=lambda: os.umask(0o027))
    assert r.returncode == 0, r.stderr[-3000:]
    modes = {p.name: p.stat().st_mode & 0o777 for p in out.iterdir() if p.is_file() and p.name != ".lock"}
    assert set(modes.values()) == {0o640}, modes


def test_item7_channels_last_is_the_same_math_rounded_by_another_kernel():
    """In float64 the NHWC step equals the contiguous one to the last bits, so --channels-last's
    float32 drift is its convolutions' rounding: it lies as close to float64 as contiguous float32."""
    from torch.utils import _pytree as pytree

    prog = program()
    args = prog.parse_args([*QUICK, "--method", "dgl", "--modules", "2"])
    data = prog.load_data(args)
    _, scheme = prog.build_scheme(args, data)
    opt = mf.optim.sgd(0.05, momentum=0.9, nesterov=True, weight_decay=1e-4)
    train_step = mf.step(scheme, opt)
    x, y = prog.datasets.normalize(data.train_x[:16], data.mean, data.std), data.train_y[:16]

    def tree(t, dtype, nhwc):
        def leaf(v):
            if not isinstance(v, torch.Tensor) or not v.is_floating_point():
                return v
            v = v.to(dtype)
            return v.contiguous(memory_format=torch.channels_last) if nhwc and v.ndim == 4 else v
        return pytree.tree_map(leaf, t)

    ts = mf.init(scheme, opt, seed=0)
    params = {(dtype, nhwc): train_step(tree(ts, dtype, nhwc), (tree(x, dtype, nhwc), y))[0].params
              for dtype in (torch.float32, torch.float64) for nhwc in (False, True)}

    def distance(a, b):
        return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)

    assert distance(params[torch.float64, False], params[torch.float64, True]) < 1e-12
    for nhwc in (False, True):
        assert distance(params[torch.float32, nhwc], params[torch.float64, False]) < 1e-3


@pytest.mark.slow
def test_the_vit_example_refuses_to_overwrite_silently_and_resumes(tmp_path):
    example = str(Path(PROGRAM).with_name("vit_mlaan.py"))
    args = [sys.executable, example, "--dataset", "synthetic", "--arch", "vit_micro", "--steps", "2",
            "--batch-size", "16", "--method", "dgl", "--out", str(tmp_path / "vit")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    first = subprocess.run(args, capture_output=True, text=True, env=env)
    assert first.returncode == 0, first.stderr[-3000:]
    again = subprocess.run(args, capture_output=True, text=True, env=env)
    assert again.returncode == 2 and "--resume" in again.stderr and "Traceback" not in again.stderr
    resumed = subprocess.run([*args, "--resume"], capture_output=True, text=True, env=env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    line = [x for x in first.stdout.splitlines() if "test accuracy" in x][-1].split("(")[0]
    assert line == [x for x in resumed.stdout.splitlines() if "test accuracy" in x][-1].split("(")[0]


def test_every_readme_python_block_runs_alone_and_prints_the_same_twice(tmp_path):
    import re

    readme = Path(PROGRAM).parents[1] / "README.md"
    blocks = re.findall(r"```python\n(.*?)```", readme.read_text(), flags=re.S)
    assert len(blocks) >= 2
    for i, block in enumerate(blocks):
        script = tmp_path / f"block{i}.py"
        script.write_text(block)
        outputs = []
        for _ in range(2 if "print(" in block else 1):
            r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, cwd=tmp_path,
                               env={**os.environ, "OMP_NUM_THREADS": "1"})
            assert r.returncode == 0, (i, r.stderr[-2000:])
            outputs.append(r.stdout)
        assert len(set(outputs)) == 1, (i, outputs)


def test_modules_out_of_range_names_every_k_that_works(tmp_path):
    one_line_error(run([*QUICK, "--modules", "99", "--out", str(tmp_path / "x")]), 2,
                   "choose K between 1 and 15, or 16 (the published split)")


@pytest.mark.parametrize("epochs, width", [(1, 660), (2, 1320)])
def test_curves_show_accuracy_by_epoch_only_once_there_are_two_epochs(tmp_path, epochs, width):
    import matplotlib.image

    prog = program()
    rows = [{"epoch": e, "step": 3 * e, "test_accuracy": {"m0": 0.3, "final": 0.2}} for e in range(1, epochs + 1)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "train_log.jsonl").write_text("".join(
        json.dumps({"step": s, "epoch": 1, "loss": {"m0": 2.0 / s, "final": 2.3 / s}}) + "\n" for s in (1, 2, 3)))
    prog.plot_curves(tmp_path, {"m0": "aux, weight 1", "final": "final classifier"})
    assert matplotlib.image.imread(tmp_path / "curves.png").shape[1] == width


def test_item3_a_loader_worker_giving_up_mid_evaluation_is_one_line_and_keeps_the_epoch(folder, tmp_path):
    from mlaan_func.imagefolder import MAX_SKIPS

    # truncated copies keep a readable header, so they pass the check before the first step and
    # fail only when a loader worker decodes them: more in a row than a loader skips
    whole = sorted((folder / "val" / "b").glob("*.jpg"))[0].read_bytes()
    for i in range(MAX_SKIPS + 8):
        (folder / "val" / "b" / f"x{i:03d}.jpg").write_bytes(whole[:len(whole) - 40])
    out = tmp_path / "run"
    r = run(folder_run(folder, out, "--workers", "2"))
    last_line_error(r, 3, "unreadable images in a row", "--resume")
    assert "Original Traceback" not in r.stderr
    assert int(mf.load(out / "checkpoint.pt").step) == 2
