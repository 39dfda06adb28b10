"""Checkpoints: any pytree of tensors round-trips; a crafted file runs nothing; a corrupted
tensor, a truncated file and a foreign type are refused with a clear error."""

import json
import os
import stat
import zipfile
from typing import NamedTuple

import pytest
import torch
from torch import nn

import mlaan_func as mf
from mlaan_func import checkpoint
from mlaan_func import testing as mt


class UserState(NamedTuple):
    count: torch.Tensor
    inner: dict


def small_state():
    scheme = [mf.local_loss(mf.from_module(nn.Linear(3, 4), name="fc"), None, mf.losses.cross_entropy,
                            name="final")]
    opt = mf.optim.chain(mf.optim.clip_by_global_norm(1.0), mf.optim.adamw(0.01))
    ts = mf.init(scheme, opt)
    return mf.step(scheme, opt)(ts, (torch.randn(4, 3), torch.tensor([0, 1, 2, 3])))[0]


def test_any_tree_round_trips(tmp_path):
    ts = small_state()
    extra = {"epoch": 2, "best": 0.5, "nan": float("nan"), "args": {"lr": None, "remat": False},
             "rows": [1, (2, "x")], 3: "int key", "t": torch.arange(3, dtype=torch.int16)}
    mf.save(tmp_path / "c.pt", ts, extra=extra)
    back, got = mf.load(tmp_path / "c.pt", with_extra=True)
    mt.assert_identical(tuple(back), tuple(ts))
    assert type(back.opt_state) is type(ts.opt_state) and isinstance(back, mf.TrainState)
    assert got["rows"] == [1, (2, "x")] and got[3] == "int key" and got["args"] == {"lr": None, "remat": False}
    assert got["nan"] != got["nan"] and torch.equal(got["t"], extra["t"])


def test_user_namedtuple_needs_types(tmp_path):
    tree = {"s": UserState(torch.ones(2), {"k": torch.zeros(())})}
    checkpoint.write(tmp_path / "u.pt", tree)
    with pytest.raises(checkpoint.CheckpointError, match="types="):
        checkpoint.read(tmp_path / "u.pt")
    back = checkpoint.read(tmp_path / "u.pt", types=[UserState])
    assert isinstance(back["s"], UserState) and torch.equal(back["s"].count, torch.ones(2))


def test_unsupported_objects_are_refused_at_save(tmp_path):
    with pytest.raises(TypeError, match="not tensor data"):
        checkpoint.write(tmp_path / "x.pt", {"f": lambda: 0})
    assert list(tmp_path.iterdir()) == []


class Evil:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_crafted_checkpoint_runs_nothing(tmp_path):
    marker = tmp_path / "marker"
    torch.save({"train_state": Evil(marker), "extra": {}}, tmp_path / "evil.pt")
    with pytest.raises(checkpoint.CheckpointError, match="nothing in it was run"):
        mf.load(tmp_path / "evil.pt")
    assert not marker.exists()


def tensor_offset(path, data):
    """Byte offset of ``data`` (a tensor's raw bytes) inside the zip file at ``path``."""
    raw = path.read_bytes()
    at = raw.find(data)
    assert at >= 0
    return at


def test_flipped_bytes_inside_a_tensor_are_detected(tmp_path):
    ts = small_state()
    path = tmp_path / "c.pt"
    mf.save(path, ts)
    weight = ts.params["fc.weight"]
    at = tensor_offset(path, weight.numpy().tobytes())
    raw = bytearray(path.read_bytes())
    raw[at + 4:at + 8] = bytes(b ^ 0xFF for b in raw[at + 4:at + 8])
    path.write_bytes(bytes(raw))
    with pytest.raises(checkpoint.CheckpointError, match="corrupted"):
        mf.load(path)


def test_truncated_and_garbage_files_are_refused(tmp_path):
    mf.save(tmp_path / "c.pt", small_state())
    raw = (tmp_path / "c.pt").read_bytes()
    (tmp_path / "t.pt").write_bytes(raw[:len(raw) // 2])
    (tmp_path / "g.pt").write_bytes(b"garbage")
    for name in ("t.pt", "g.pt"):
        with pytest.raises(checkpoint.CheckpointError):
            mf.load(tmp_path / name)
    with zipfile.ZipFile(tmp_path / "c.pt") as z:
        assert z.namelist()  # still a torch zip file underneath


def test_old_pickled_format_is_refused(tmp_path):
    ts = small_state()
    torch.save({"train_state": ts._asdict(), "extra": {}}, tmp_path / "old.pt")
    with pytest.raises(checkpoint.CheckpointError, match="not a checkpoint written by mlaan_func.save"):
        mf.load(tmp_path / "old.pt")


def forge(path, tree, tensors=()):
    """A checkpoint file holding ``tree`` (the JSON description) as written, checksum included:
    what a crafted or buggy writer could produce."""
    text = tree if isinstance(tree, str) else json.dumps(tree)
    torch.save({"format": checkpoint.FORMAT, "tree": text, "tensors": list(tensors),
                "sha256": checkpoint._checksum(text, list(tensors))}, path)
    return path


@pytest.mark.parametrize("name", [
    "mlaan_func:engine.torch.nn.utils.rnn.PackedSequence",   # an attribute chain out of the library
    "mlaan_func.engine:torch.nn.utils.rnn.PackedSequence",
    "mlaan_func.engine:Tensor",                              # reachable from mlaan_func, defined in torch
])
def test_only_namedtuples_defined_in_mlaan_func_are_built(tmp_path, name):
    leaf = {"value": 1}
    node = {"namedtuple": name, "fields": ["data", "batch_sizes", "sorted_indices", "unsorted_indices"],
            "items": [leaf, leaf, leaf, leaf]}
    path = forge(tmp_path / "f.pt", {"dict": [["x", node]]})
    with pytest.raises(checkpoint.CheckpointError, match="neither a NamedTuple of mlaan_func"):
        checkpoint.read(path)


def test_a_namedtuple_of_mlaan_func_still_resolves_by_its_defining_module(tmp_path):
    state = mf.optim.TraceState(torch.ones(2))
    checkpoint.write(tmp_path / "t.pt", {"s": state})
    assert type(checkpoint.read(tmp_path / "t.pt")["s"]) is mf.optim.TraceState


def nested(depth):
    """The JSON text of a list nested ``depth`` deep (too deep for ``json.dumps`` to write)."""
    return '{"list": [' * depth + '{"value": 0}' + "]}" * depth


@pytest.mark.parametrize("tree, message", [
    (nested(100_000), "nested deeper"),
    (nested(checkpoint.MAX_DEPTH + 5), "nested deeper"),
    ({"tensor": 3, "dtype": "float32", "shape": [2]}, "tensor 3"),
    ({"tensor": -1, "dtype": "float32", "shape": [2]}, "tensor -1"),
    ({"dict": [["a"]]}, "malformed"),
    ({"namedtuple": "mlaan_func.optim:TraceState", "fields": ["trace"], "items": []}, "malformed"),
    ({"tensor": "0", "dtype": "float32", "shape": [2]}, "malformed"),
], ids=["100000 deep", "just too deep", "no tensor 3", "negative index", "dict entry", "fields", "index type"])
def test_a_malformed_tree_is_a_checkpoint_error(tmp_path, tree, message):
    path = forge(tmp_path / "m.pt", tree, [torch.ones(2)])
    with pytest.raises(checkpoint.CheckpointError, match=message):
        checkpoint.read(path)


def test_a_tree_too_deep_to_read_is_refused_at_write(tmp_path):
    tree = [0]
    for _ in range(checkpoint.MAX_DEPTH + 5):
        tree = [tree]
    with pytest.raises(ValueError, match="nested deeper"):
        checkpoint.write(tmp_path / "d.pt", tree)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_written_files_follow_the_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        checkpoint.write(tmp_path / "c.pt", {"w": torch.ones(1)})
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "c.pt").stat().st_mode) == 0o666 & ~umask
