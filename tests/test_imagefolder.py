"""Folder datasets: the readers and the loader on a tiny ImageFolder of real JPEG files (one
truncated, one not an image), bad layouts, deterministic resume, and the program end to end
(single process and under torchrun with 2 gloo processes)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from denied import deny

import mlaan_func as mf
from mlaan_func import imagefolder as imf
from mlaan_func import testing as mt
from mlaan_func.data import DatasetError

PROGRAM = str(Path(__file__).resolve().parents[1] / "examples" / "cifar_mlaan.py")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """3 classes × 6 train / 2 val JPEGs, plus a truncated JPEG and a text file in train."""
    root = imf.write_example_folder(tmp_path_factory.mktemp("tiny"), classes=("cat", "dog", "fox"),
                                    per_class=6, size=24, val_per_class=2)
    whole = (root / "train" / "cat" / "0.jpg").read_bytes()
    (root / "train" / "cat" / "9_truncated.jpg").write_bytes(whole[:len(whole) // 3])
    (root / "train" / "dog" / "README.txt").write_text("not an image")
    return root


def test_scan_reads_the_layout_and_counts_non_images(tiny):
    data = imf.load_folder(tiny, image_size=16)
    assert data.classes == ("cat", "dog", "fox") and data.num_classes == 3
    assert len(data.train.files) == 19 and len(data.val.files) == 6  # the truncated file is an image name
    assert data.train.ignored == ("dog/README.txt",)
    assert sorted(set(data.train.labels)) == [0, 1, 2]


def test_decode_train_is_seeded_eval_is_centre_crop_and_broken_files_give_none(tiny):
    path = tiny / "train" / "cat" / "1.jpg"
    a, b, c = (imf.decode(path, 16, s) for s in (1, 1, 2))
    assert a.shape == (3, 16, 16) and a.dtype == torch.uint8
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert imf.decode(path, 16, None).shape == (3, 16, 16)
    assert imf.decode(tiny / "train" / "cat" / "9_truncated.jpg", 16, 0) is None
    assert imf.decode(tiny / "train" / "dog" / "README.txt", 16, 0) is None


def epoch(data, start=0, workers=0, rank=0, world=1, batch_size=6):
    return list(imf.train_loader(data, batch_size, epoch=1, seed=5, start=start, rank=rank, world=world,
                                 workers=workers))


def test_loader_batches_resume_mid_epoch_identically_with_or_without_workers(tiny):
    data = imf.load_folder(tiny, image_size=16)
    full = epoch(data)
    assert len(full) == imf.batches_per_epoch(data, 6) == 3
    assert all(b.x.shape == (6, 3, 16, 16) for b in full)
    assert sum(b.skipped for b in full) <= 1  # the truncated file, replaced by the next one, at most once
    tail = epoch(data, start=1, workers=2)
    assert len(tail) == 2
    for a, b in zip(full[1:], tail):
        mt.assert_identical((a.x, a.y, a.skipped), (b.x, b.y, b.skipped))


def test_the_truncated_file_is_counted_once_per_epoch_when_drawn(tiny):
    data = imf.load_folder(tiny, image_size=16)
    bad = data.train.files.index("cat/9_truncated.jpg")
    batches = list(imf.eval_loader(data, 4, part="train"))
    assert sum(b.skipped for b in batches) == 1 and sum(len(b.y) for b in batches) == 19
    flat = torch.cat([b.y for b in batches])
    assert int(flat[bad]) == data.train.labels[bad + 1]  # replaced by the next file in folder order


def test_ranks_get_disjoint_shards_of_each_batch(tiny):
    data = imf.load_folder(tiny, image_size=8)
    r0, r1 = epoch(data, rank=0, world=2), epoch(data, rank=1, world=2)
    assert len(r0) == len(r1) == imf.batches_per_epoch(data, 6, world=2)
    assert all(b.x.shape[0] == 3 for b in r0 + r1)
    with pytest.raises(ValueError, match="divisible"):
        epoch(data, world=4)


def test_device_batches_normalise_and_report_skips(tiny):
    data = imf.load_folder(tiny, image_size=8)
    skipped = []
    out = list(imf.device_batches(imf.eval_loader(data, 4), "cpu", data.mean, data.std, skipped=skipped))
    assert len(out) == 2 and out[0][0].dtype == torch.float32 and skipped == [0, 0]


def write_bad(root, kind):
    imf.write_example_folder(root, classes=("a", "b"), per_class=2, size=12, val_per_class=1)
    if kind == "flat":
        for d in ("train/a", "train/b"):
            for f in (root / d).iterdir():
                f.rename(root / "train" / f"{d[-1]}{f.name}")
            (root / d).rmdir()
    elif kind == "empty class":
        (root / "train" / "c").mkdir()
        (root / "val" / "c").mkdir()
        (root / "val" / "c" / "x.jpg").write_bytes((root / "val" / "a" / "0.jpg").read_bytes())
    elif kind == "class sets differ":
        (root / "val" / "b").rename(root / "val" / "z")
    elif kind == "no val":
        for f in (root / "val").rglob("*.jpg"):
            f.unlink()
        for d in sorted((root / "val").iterdir()):
            d.rmdir()
        (root / "val").rmdir()
    return root


@pytest.mark.parametrize("kind, message", [
    ("flat", "no class folders"), ("empty class", "has no images"),
    ("class sets differ", "differ from train's"), ("no val", "no val/ folder"),
])
def test_bad_layouts_are_one_line_errors(tmp_path, kind, message):
    root = write_bad(tmp_path / "d", kind)
    with pytest.raises(DatasetError, match=message) as err:
        imf.load_folder(root, 16)
    assert "\n" not in str(err.value)
    with pytest.raises(DatasetError, match="not a directory"):
        imf.load_folder(tmp_path / "missing", 16)


def test_unreadable_run_of_files_is_a_clear_error(tmp_path):
    root = imf.write_example_folder(tmp_path / "d", classes=("a", "b"), per_class=2, size=12)
    for f in (root / "train").rglob("*.jpg"):
        f.write_bytes(b"garbage")
    data = imf.load_folder(root, 8, check=False)  # check=True refuses it at once
    with pytest.raises(DatasetError, match="unreadable images in a row"):
        list(imf.train_loader(data, 2, 0, 0))


# ------------------------------------------------------------------------------- the program

def program(args, timeout=600, torchrun=0):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, PROGRAM]
    if torchrun:  # --standalone binds its own free port: none is chosen here for another job to take
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(torchrun),
               PROGRAM]
    return subprocess.run([*cmd, *args], capture_output=True, text=True, timeout=timeout, env=env)


def quick(tiny, out, *more):
    return ["--dataset", "folder", "--data-dir", str(tiny), "--arch", "resnet18", "--image-size", "16",
            "--batch-size", "4", "--epochs", "1", "--max-steps", "2", "--lr", "0.05", "--warmup-epochs", "0",
            "--workers", "0", "--no-progress", "--device", "cpu", "--out", str(out), *more]


@pytest.mark.slow
def test_program_trains_dgl_mlaan_on_the_folder_and_resumes_mid_epoch_exactly(tiny, tmp_path):
    args = ["--method", "dgl-mlaan", "--modules", "4", "--max-steps", "3", "--channels-last"]
    straight = tmp_path / "straight"
    r = program(quick(tiny, straight, *args))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "data wait" in r.stderr and "ignored 1 non-image files" in r.stderr
    row = json.loads((straight / "metrics.jsonl").read_text().splitlines()[-1])
    assert {"data_wait_seconds", "step_seconds", "skipped_images"} <= set(row)
    summary = json.loads((straight / "summary.json").read_text())
    assert summary["dataset"] == "folder" and summary["arch"] == "resnet18"
    cut = tmp_path / "cut"
    r = program(quick(tiny, cut, *args, "--stop-after-steps", "1", "--workers", "2"))
    assert r.returncode == 130, r.stderr[-3000:]
    r = program(quick(tiny, cut, *args, "--resume", "--workers", "2"))
    assert r.returncode == 0, r.stderr[-3000:]
    mt.assert_identical(mf.load(cut / "checkpoint.pt").params, mf.load(straight / "checkpoint.pt").params)


@pytest.mark.slow
def test_program_under_torchrun_with_two_gloo_processes(tiny, tmp_path):
    out = tmp_path / "ddp"
    r = program(quick(tiny, out, "--method", "dgl", "--modules", "2"), torchrun=2)
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["processes"] == 2 and summary["parallel"] == "data"


@pytest.mark.parametrize("kind, more, message, code", [
    ("flat", [], "no class folders", 3),  # 3: the data is invalid (the program's exit codes)
    ("class sets differ", [], "differ from train's", 3),
    ("ok", ["--modules", "9"], "cannot be split into 9 modules", 2),  # 2: a bad command line
    ("ok", ["--dataset", "imagenet"], "needs 1000 class folders", 3),
])
def test_program_bad_input_is_one_line_and_writes_nothing(tmp_path, kind, more, message, code):
    root = write_bad(tmp_path / "d", kind)
    out = tmp_path / "out"
    r = program(quick(root, out, "--method", "dgl", "--modules", "2", *more), timeout=300)
    assert r.returncode == code, r.stderr[-2000:]
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert "Traceback" not in r.stderr and len(errors) == 1 and message in errors[0]
    if kind != "ok":
        assert not out.exists()


# ------------------------------------------------------- every Pillow mode on the same 0..1 scale

def gray_image(mode, level):
    """A constant 12×12 image of ``mode`` whose intensity is ``level`` (0..1) on that mode's scale."""
    Image = imf._pillow()
    if mode == "1":
        return Image.new("1", (12, 12), int(level >= 0.5))
    if mode == "P":
        img = Image.new("P", (12, 12), 3)
        img.putpalette([0, 0, 0] * 3 + [round(255 * level)] * 3)
        return img
    if mode in ("I;16", "I"):
        return Image.fromarray(np.full((12, 12), round(65535 * level), np.uint16 if mode == "I;16" else np.int32))
    if mode == "F":
        return Image.fromarray(np.full((12, 12), level, np.float32))
    v = round(255 * level)
    return Image.new(mode, (12, 12), {"L": v, "LA": (v, 255), "RGB": (v,) * 3, "RGBA": (v, v, v, 255),
                                      "CMYK": (0, 0, 0, 255 - v)}[mode])


@pytest.mark.parametrize("mode, suffix", [
    ("1", "png"), ("L", "png"), ("LA", "png"), ("P", "png"), ("RGB", "png"), ("RGBA", "png"),
    ("CMYK", "tif"), ("I;16", "png"), ("I;16", "tif"), ("I", "tif"), ("F", "tif"),
])
def test_every_mode_decodes_to_the_same_scale(tmp_path, mode, suffix):
    level = 1.0 if mode == "1" else 0.3
    path = tmp_path / f"x.{suffix}"
    gray_image(mode, level).save(path)
    with imf._pillow().open(path) as img:
        assert img.mode == mode  # the file opens in the mode under test
    for seed in (None, 0):
        x = imf.decode(path, 8, seed)
        assert x.shape == (3, 8, 8) and x.dtype == torch.uint8
        assert (x.int() - round(255 * level)).abs().max() <= 1, (mode, x.unique())


def test_16_bit_png_keeps_its_shades(tmp_path):
    Image = imf._pillow()
    ramp = np.linspace(0, 65535, 16 * 16).reshape(16, 16).astype(np.uint16)
    Image.fromarray(ramp).save(tmp_path / "ramp.png")
    x = imf.decode(tmp_path / "ramp.png", 16, None)
    assert len(x.unique()) > 100 and int(x.min()) < 20 and int(x.max()) > 235


def test_a_mode_that_is_not_read_is_refused_by_name(tmp_path):
    imf._pillow().new("LAB", (12, 12)).save(tmp_path / "lab.tif")
    with pytest.raises(DatasetError, match=r"lab.tif has Pillow mode 'LAB', which is not read"):
        imf.decode(tmp_path / "lab.tif", 8, None)


@pytest.mark.parametrize("pixels, message", [
    (np.full((12, 12), np.nan, np.float32), "144 NaN or Inf"),
    (np.full((12, 12), 200.0, np.float32), r"outside 0\.\.1"),
    (np.full((12, 12), 70000, np.int32), r"outside 0\.\.65535"),
])
def test_pixels_outside_their_scale_are_a_dataset_error_naming_the_file(tmp_path, pixels, message):
    root = imf.write_example_folder(tmp_path / "d", classes=("a", "b"), per_class=2, size=12)
    imf._pillow().fromarray(pixels).save(root / "train" / "a" / "bad.tif")
    with pytest.raises(DatasetError, match=rf"a/bad.tif .*{message}"):
        imf.load_folder(root, 8)  # before the first step
    with pytest.raises(DatasetError, match=rf"a/bad.tif .*{message}"):
        imf.decode(root / "train" / "a" / "bad.tif", 8, 0)
    data = imf.load_folder(root, 8, check=False)
    with pytest.raises(DatasetError, match="bad.tif"):
        list(imf.eval_loader(data, 2, part="train"))


# ------------------------------------------------------- unreadable splits before the first step

def test_a_split_without_readable_images_is_refused_at_load(tmp_path):
    root = imf.write_example_folder(tmp_path / "d", classes=("a", "b"), per_class=4, size=12, val_per_class=3)
    for f in (root / "val").rglob("*.jpg"):
        f.write_bytes(b"not a jpeg")
    with pytest.raises(DatasetError, match=r"val: 6 of 6 images in .*/val cannot be read \(first: a/0.jpg") as err:
        imf.load_folder(root, 8)
    assert "\n" not in str(err.value)
    data = imf.load_folder(root, 8, check=False)
    assert imf.check_readable(data.train, "train") == ()
    with pytest.raises(DatasetError, match="val: 6 of 6"):
        imf.check_readable(data.val, "val")


def test_a_run_the_loader_would_give_up_on_is_refused_and_single_bad_files_are_listed(tmp_path, monkeypatch):
    root = imf.write_example_folder(tmp_path / "d", classes=("a", "b"), per_class=4, size=12)
    (root / "train" / "b" / "2.jpg").write_bytes(b"junk")
    data = imf.load_folder(root, 8)
    assert imf.check_readable(data.train, "train") == ("b/2.jpg",)
    monkeypatch.setattr(imf, "MAX_SKIPS", 2)
    (root / "train" / "b" / "3.jpg").write_bytes(b"junk")
    with pytest.raises(DatasetError, match=r"train: 2 unreadable images in a row from b/2.jpg"):
        imf.check_readable(data.train, "train")


def test_a_worker_side_decoding_failure_is_one_clean_dataset_error(tmp_path):
    root = imf.write_example_folder(tmp_path / "d", classes=("a", "b"), per_class=2, size=12)
    imf._pillow().fromarray(np.full((12, 12), np.nan, np.float32)).save(root / "train" / "a" / "nan.tif")
    data = imf.load_folder(root, 8, check=False)  # check=True would refuse it before any worker starts
    with pytest.raises(DatasetError) as err:
        list(imf.eval_loader(data, 5, part="train", workers=2))
    assert "nan.tif" in str(err.value) and "\n" not in str(err.value) and "DataLoader worker" not in str(err.value)


# -------------------------------------------------------------------------- permission denied

def test_an_image_without_read_permission_says_so(tmp_path, monkeypatch):
    root = imf.write_example_folder(tmp_path / "d", classes=("a", "b"), per_class=2, size=12)
    deny(root / "train" / "b" / "1.jpg", monkeypatch)
    message = r"cannot read .*train/b/1.jpg: permission denied"
    with pytest.raises(DatasetError, match=message):
        imf.load_folder(root, 8)
    with pytest.raises(DatasetError, match=message):
        imf.decode(root / "train" / "b" / "1.jpg", 8, None)


def test_a_class_folder_without_read_permission_says_so(tmp_path, monkeypatch):
    root = imf.write_example_folder(tmp_path / "d", classes=("a", "b"), per_class=2, size=12)
    deny(root / "val" / "b", monkeypatch)
    with pytest.raises(DatasetError, match=r"cannot read .*val/b: permission denied"):
        imf.load_folder(root, 8)
