"""Dataset readers on small files in the real formats, checked downloads from a local server,
and the laws of the seeded augmentation and batch iterator."""

import doctest
import functools
import gzip
import hashlib
import http.server
import io
import os
import pickle
import stat
import tarfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from denied import deny
from mlaan_func import data

SYSTEM_FASHION = Path("/usr/share/datasets/fashion-mnist")


def md5(path):
    return hashlib.md5(Path(path).read_bytes()).hexdigest()


# ------------------------------------------------------------------------- format writers

def write_cifar(root, sizes=(2, 1, 3, 1, 2), test=3, seed=0):
    """A cifar-10-batches-py directory; returns (train images, train labels, test ...)."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    parts = []
    for name, n in [(f"data_batch_{i + 1}", k) for i, k in enumerate(sizes)] + [("test_batch", test)]:
        x = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        y = [int(v) for v in rng.integers(0, 10, n)]
        with open(root / name, "wb") as f:
            pickle.dump({b"batch_label": b"x", b"labels": y, b"data": x, b"filenames": [b"a"] * n}, f,
                        protocol=2)
        parts.append((x.reshape(n, 3, 32, 32), np.array(y)))
    train = parts[:-1]
    return (np.concatenate([x for x, _ in train]), np.concatenate([y for _, y in train]), *parts[-1])


def write_svhn(root, n_train=5, n_test=3, seed=0):
    from scipy.io import savemat
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    out = []
    for name, n in (("train_32x32.mat", n_train), ("test_32x32.mat", n_test)):
        x = rng.integers(0, 256, (32, 32, 3, n), dtype=np.uint8)
        y = np.array([10, 1, 5, 9, 10, 3, 2][:n], dtype=np.uint8).reshape(n, 1)
        savemat(root / name, {"X": x, "y": y})
        out += [x, y]
    return out


def write_stl(root, n_train=3, n_test=2, seed=0):
    """Images given as (N, 3, H, W); written column-major per image like the real binaries."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    out = []
    for split, n in (("train", n_train), ("test", n_test)):
        x = rng.integers(0, 256, (n, 3, 96, 96), dtype=np.uint8)
        y = rng.integers(1, 11, n).astype(np.uint8)
        (root / f"{split}_X.bin").write_bytes(np.ascontiguousarray(x.transpose(0, 1, 3, 2)).tobytes())
        (root / f"{split}_y.bin").write_bytes(y.tobytes())
        out += [x, y]
    return out


def idx_bytes(a, code=0x08, dtype=">u1"):
    head = bytes([0, 0, code, a.ndim]) + np.array(a.shape, ">u4").tobytes()
    return head + np.asarray(a).astype(dtype).tobytes()


def write_fashion(root, gz, n_train=5, n_test=3, seed=0):
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    arrays = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        arrays[f"{prefix}-images-idx3-ubyte"] = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        arrays[f"{prefix}-labels-idx1-ubyte"] = rng.integers(0, 10, n, dtype=np.uint8)
    for name, a in arrays.items():
        raw = idx_bytes(a)
        if gz:
            (root / f"{name}.gz").write_bytes(gzip.compress(raw))
        else:
            (root / name).write_bytes(raw)
    return arrays


def tarball(path, root_dir, arcname):
    with tarfile.open(path, "w:gz") as tar:
        tar.add(root_dir, arcname=arcname)
    return path


# ---------------------------------------------------------------------------------- readers

def test_cifar_reader(tmp_path):
    tx, ty, vx, vy = write_cifar(tmp_path / "cifar-10-batches-py")
    ds = data.read_cifar10(tmp_path / "cifar-10-batches-py")
    assert ds.train_x.shape == (9, 3, 32, 32) and ds.train_x.dtype == torch.uint8
    assert ds.train_y.dtype == torch.int64
    assert np.array_equal(ds.train_x.numpy(), tx) and np.array_equal(ds.train_y.numpy(), ty)
    assert np.array_equal(ds.test_x.numpy(), vx) and np.array_equal(ds.test_y.numpy(), vy)
    assert (ds.name, ds.num_classes, ds.channels, ds.image_size, len(ds.mean)) == ("cifar10", 10, 3, 32, 3)


def test_cifar_pickle_cannot_run_code(tmp_path):
    root = tmp_path / "c"
    write_cifar(root)

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    (root / "test_batch").write_bytes(pickle.dumps({b"data": Evil(), b"labels": []}))
    with pytest.raises(data.DatasetError, match="test_batch"):
        data.read_cifar10(root)


def test_svhn_reader_maps_label_10_to_0(tmp_path):
    x, y, tx, ty = write_svhn(tmp_path)
    ds = data.read_svhn(tmp_path)
    assert ds.train_x.shape == (5, 3, 32, 32) and ds.test_x.shape == (3, 3, 32, 32)
    assert np.array_equal(ds.train_x.numpy(), x.transpose(3, 2, 0, 1))
    assert ds.train_y.tolist() == [0, 1, 5, 9, 0]
    assert ds.test_y.tolist() == [0, 1, 5]


def test_stl_reader_transposes_column_major_images(tmp_path):
    x, y, tx, ty = write_stl(tmp_path / "stl10_binary")
    ds = data.read_stl10(tmp_path / "stl10_binary")
    assert ds.train_x.shape == (3, 3, 96, 96) and ds.test_x.shape == (2, 3, 96, 96)
    assert np.array_equal(ds.train_x.numpy(), x) and np.array_equal(ds.test_x.numpy(), tx)
    assert not np.array_equal(ds.train_x.numpy(), x.transpose(0, 1, 3, 2))
    assert ds.train_y.tolist() == (y.astype(int) - 1).tolist()


def test_stl_reader_rejects_wrong_sizes(tmp_path):
    write_stl(tmp_path)
    (tmp_path / "test_X.bin").write_bytes(b"\0" * 100)
    with pytest.raises(data.DatasetError, match="test_X.bin"):
        data.read_stl10(tmp_path)


@pytest.mark.parametrize("gz", [False, True])
def test_fashion_reader_raw_and_gz(tmp_path, gz):
    arrays = write_fashion(tmp_path, gz)
    ds = data.read_fashion_mnist(tmp_path)
    assert ds.train_x.shape == (5, 1, 28, 28) and ds.test_x.shape == (3, 1, 28, 28)
    assert np.array_equal(ds.train_x[:, 0].numpy(), arrays["train-images-idx3-ubyte"])
    assert ds.test_y.tolist() == arrays["t10k-labels-idx1-ubyte"].tolist()
    assert ds.channels == 1 and len(ds.mean) == 1


def test_idx_other_types_and_errors(tmp_path):
    a = np.arange(-6, 6, dtype=np.int32).reshape(3, 4)
    (tmp_path / "i").write_bytes(idx_bytes(a, 0x0C, ">i4"))
    assert torch.equal(data.read_idx(tmp_path / "i"), torch.from_numpy(a))
    (tmp_path / "bad").write_bytes(b"\x00\x01\x08\x01" + b"\0" * 8)
    with pytest.raises(data.DatasetError, match="not an IDX"):
        data.read_idx(tmp_path / "bad")
    (tmp_path / "short").write_bytes(idx_bytes(np.zeros((4, 2), np.uint8))[:-1])
    with pytest.raises(data.DatasetError, match="header says"):
        data.read_idx(tmp_path / "short")
    (tmp_path / "trunc.gz").write_bytes(gzip.compress(idx_bytes(np.zeros(50, np.uint8)))[:-10])
    with pytest.raises(data.DatasetError, match="truncated"):
        data.read_idx(tmp_path / "trunc.gz")


@pytest.mark.skipif(not SYSTEM_FASHION.is_dir(), reason="dataset-fashion-mnist is not installed")
def test_fashion_system_path_is_used(tmp_path):
    ds = data.load("fashion_mnist", tmp_path / "nothing-here", download=False)
    assert ds.name == "fashion-mnist"
    assert ds.train_x.shape == (60000, 1, 28, 28) and ds.test_x.shape == (10000, 1, 28, 28)
    assert sorted(ds.train_y.unique().tolist()) == list(range(10))
    assert not (tmp_path / "nothing-here").exists()


def test_fashion_found_in_data_dir_without_system_copy(tmp_path, monkeypatch):
    monkeypatch.setitem(data.SYSTEM_DIRS, "fashion-mnist", tmp_path / "no-system")
    write_fashion(tmp_path / "data" / "fashion-mnist", gz=False)
    assert data.load("fashion-mnist", tmp_path / "data", download=False).train_x.shape[0] == 5


def test_load_finds_each_layout(tmp_path):
    write_cifar(tmp_path / "cifar-10-batches-py")
    write_svhn(tmp_path / "svhn")
    write_stl(tmp_path / "stl10_binary")
    assert data.load("cifar10", tmp_path, download=False).train_x.shape[0] == 9
    assert data.load("SVHN", tmp_path, download=False).test_x.shape[0] == 3
    assert data.load("stl10", tmp_path, download=False).image_size == 96
    write_svhn(tmp_path / "flat")
    assert data.load("svhn", tmp_path / "flat", download=False).name == "svhn"


def test_load_names_and_errors(tmp_path, monkeypatch):
    with pytest.raises(data.DatasetError, match="unknown dataset"):
        data.load("imagenet", tmp_path)
    with pytest.raises(TypeError):
        data.load("cifar10", tmp_path, train_size=3)
    monkeypatch.setitem(data.SYSTEM_DIRS, "fashion-mnist", tmp_path / "no-system")
    for name in ("cifar10", "svhn", "stl10", "fashion-mnist"):
        with pytest.raises(data.DatasetError) as err:
            data.load(name, tmp_path, download=False)
        msg = str(err.value)
        assert "\n" not in msg and "--data-dir" in msg and "--dataset synthetic" in msg
        assert "apt-get install dataset-fashion-mnist" in msg and str(tmp_path) in msg


def test_synthetic_is_deterministic_and_learnable_shape():
    a = data.load("synthetic", train_size=20, test_size=10, shape=(1, 8, 8), num_classes=4, seed=5)
    b = data.synthetic(20, 10, shape=(1, 8, 8), num_classes=4, seed=5)
    c = data.synthetic(20, 10, shape=(1, 8, 8), num_classes=4, seed=6)
    assert torch.equal(a.train_x, b.train_x) and torch.equal(a.test_y, b.test_y)
    assert not torch.equal(a.train_x, c.train_x)
    assert a.image_shape == (1, 8, 8) and a.num_classes == 4 and int(a.train_y.max()) < 4
    d = data.synthetic()
    assert d.train_x.shape == (512, 3, 32, 32) and d.test_x.shape == (256, 3, 32, 32)
    assert d.num_classes == 10


def test_dataset_validates():
    ds = data.synthetic(8, 4)
    with pytest.raises(ValueError):
        data.Dataset("x", ds.train_x.float(), ds.train_y, ds.test_x, ds.test_y, 10, ds.mean, ds.std)
    with pytest.raises(ValueError):
        data.Dataset("x", ds.train_x, ds.train_y, ds.test_x, ds.test_y, 10, (0.5,), (0.2,))
    with pytest.raises(ValueError):
        data.Dataset("x", ds.train_x, ds.train_y + 100, ds.test_x, ds.test_y, 10, ds.mean, ds.std)


def test_split_validation():
    ds = data.synthetic(50, 10)
    a, b = data.split_validation(ds, 0.2, seed=1), data.split_validation(ds, 0.2, seed=1)
    assert len(a.train_y) == 40 and len(a.val_y) == 10 and a.val_x.shape == (10, 3, 32, 32)
    assert torch.equal(a.val_x, b.val_x) and torch.equal(a.test_x, ds.test_x)
    rows = {bytes(r.numpy()) for r in torch.cat([a.train_x, a.val_x]).flatten(1)}
    assert rows == {bytes(r.numpy()) for r in ds.train_x.flatten(1)}
    with pytest.raises(ValueError):
        data.split_validation(ds, 1.0, seed=0)


# --------------------------------------------------------------------------------- download

class Server:
    """A static file server on 127.0.0.1 in a thread."""

    def __init__(self, root):
        handler = functools.partial(Quiet, directory=str(root))
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join()


class Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture
def server(tmp_path):
    root = tmp_path / "served"
    root.mkdir()
    s = Server(root)
    s.root = root
    yield s
    s.close()


def no_leftovers(directory):
    return not [p for p in Path(directory).rglob("*") if p.name.endswith(".part") or ".extract-" in p.name]


def test_download_cifar_tarball(tmp_path, server, monkeypatch, capsys):
    tx, ty, *_ = write_cifar(tmp_path / "build" / "cifar-10-batches-py")
    archive = tarball(server.root / "cifar-10-python.tar.gz", tmp_path / "build" / "cifar-10-batches-py",
                      "cifar-10-batches-py")
    monkeypatch.setitem(data.FILES, "cifar10", {"cifar-10-python.tar.gz": md5(archive)})
    ds = data.load("cifar_10", tmp_path / "data", mirror=server.url)
    assert np.array_equal(ds.train_x.numpy(), tx) and ds.train_y.tolist() == ty.tolist()
    assert (tmp_path / "data" / "cifar-10-python.tar.gz").is_file()
    assert no_leftovers(tmp_path / "data")
    assert "cifar-10-python.tar.gz" in capsys.readouterr().err
    (server.root / "cifar-10-python.tar.gz").unlink()  # already on disk: no second download
    assert data.load("cifar10", tmp_path / "data", mirror=server.url).train_x.shape[0] == 9


def test_download_via_module_mapping_fashion(tmp_path, server, monkeypatch):
    monkeypatch.setitem(data.SYSTEM_DIRS, "fashion-mnist", tmp_path / "no-system")
    arrays = write_fashion(server.root / "fm", gz=True)
    monkeypatch.setitem(data.URLS, "fashion-mnist", server.url + "fm/")
    monkeypatch.setitem(data.FILES, "fashion-mnist",
                        {p.name: md5(p) for p in (server.root / "fm").iterdir()})
    ds = data.load("fashion-mnist", tmp_path / "data")
    assert np.array_equal(ds.train_x[:, 0].numpy(), arrays["train-images-idx3-ubyte"])
    assert sorted(p.name for p in (tmp_path / "data" / "fashion-mnist").iterdir()) == sorted(
        f"{n}.gz" for n in arrays)


def test_download_svhn(tmp_path, server, monkeypatch):
    x, *_ = write_svhn(server.root)
    monkeypatch.setitem(data.FILES, "svhn", {n: md5(server.root / n)
                                             for n in ("train_32x32.mat", "test_32x32.mat")})
    ds = data.load("svhn", tmp_path / "data", mirror=server.url)
    assert np.array_equal(ds.train_x.numpy(), x.transpose(3, 2, 0, 1))


def test_corrupted_download_is_removed_and_reported(tmp_path, server, monkeypatch):
    write_stl(tmp_path / "build" / "stl10_binary")
    tarball(server.root / "stl10_binary.tar.gz", tmp_path / "build" / "stl10_binary", "stl10_binary")
    monkeypatch.setitem(data.FILES, "stl10", {"stl10_binary.tar.gz": "0" * 32})
    with pytest.raises(data.DatasetError, match="corrupted or partial") as err:
        data.load("stl10", tmp_path / "data", mirror=server.url)
    assert "removed" in str(err.value)
    assert not (tmp_path / "data" / "stl10_binary.tar.gz").exists()
    assert no_leftovers(tmp_path / "data") and not list((tmp_path / "data").iterdir())


def test_a_users_file_with_a_wrong_md5_is_reported_and_never_deleted(tmp_path, server, monkeypatch):
    write_stl(tmp_path / "build" / "stl10_binary")
    good = tarball(server.root / "stl10_binary.tar.gz", tmp_path / "build" / "stl10_binary",
                   "stl10_binary")
    monkeypatch.setitem(data.FILES, "stl10", {"stl10_binary.tar.gz": md5(good)})
    (tmp_path / "data").mkdir()
    local = tmp_path / "data" / "stl10_binary.tar.gz"
    mine = good.read_bytes()[:100]
    local.write_bytes(mine)
    for download in (False, True):
        with pytest.raises(data.DatasetError, match="md5 is .*left untouched") as err:
            data.load("stl10", tmp_path / "data", download=download, mirror=server.url)
        assert "\n" not in str(err.value) and str(local) in str(err.value)
        assert local.read_bytes() == mine
    local.unlink()  # the user's own decision
    assert data.load("stl10", tmp_path / "data", mirror=server.url).train_x.shape == (3, 3, 96, 96)


def test_an_explicit_data_dir_wins_over_the_system_copy(tmp_path, monkeypatch):
    system = tmp_path / "system"
    write_fashion(system, gz=False)
    monkeypatch.setitem(data.SYSTEM_DIRS, "fashion-mnist", system)
    assert data.load("fashion-mnist", tmp_path / "empty", download=False).files[0].startswith(str(system))
    mine = tmp_path / "mine"
    write_fashion(mine, gz=True)
    ds = data.load("fashion-mnist", mine, download=False)
    assert all(f.startswith(str(mine)) for f in ds.files) and len(ds.files) == 4


def test_labels_out_of_range_and_a_file_as_data_dir_are_dataset_errors(tmp_path, monkeypatch):
    monkeypatch.setitem(data.SYSTEM_DIRS, "fashion-mnist", tmp_path / "no-system")
    arrays = write_fashion(tmp_path / "fm", gz=False)
    labels = arrays["train-labels-idx1-ubyte"].copy()
    labels[0] = 12
    (tmp_path / "fm" / "train-labels-idx1-ubyte").write_bytes(idx_bytes(labels))
    with pytest.raises(data.DatasetError, match="labels outside"):
        data.load("fashion-mnist", tmp_path / "fm", download=False)
    (tmp_path / "file").write_text("")
    with pytest.raises(data.DatasetError, match="is a file"):
        data.load("cifar10", tmp_path / "file", download=False)


def test_unreachable_server_fails_fast_with_advice(tmp_path, server, monkeypatch):
    url = server.url
    server.close()
    server.close = lambda: None
    t0 = time.monotonic()
    with pytest.raises(data.DatasetError) as err:
        data.load("cifar10", tmp_path / "data", mirror=url, timeout=2)
    assert time.monotonic() - t0 < 5
    msg = str(err.value)
    assert "\n" not in msg
    for needle in ("data_batch_1", "test_batch", "cifar-10-python.tar.gz", str(tmp_path / "data"),
                   "--data-dir", "--dataset fashion-mnist", "--dataset synthetic", url):
        assert needle in msg, needle
    assert no_leftovers(tmp_path / "data")


def test_missing_file_on_server_is_reported(tmp_path, server, monkeypatch):
    monkeypatch.setitem(data.SYSTEM_DIRS, "fashion-mnist", tmp_path / "no-system")
    with pytest.raises(data.DatasetError, match="train-images-idx3-ubyte.*--data-dir"):
        data.load("fashion-mnist", tmp_path / "data", mirror=server.url)


def test_extract_refuses_path_traversal_and_links(tmp_path):
    for name, kind in (("../evil.txt", tarfile.REGTYPE), ("/abs.txt", tarfile.REGTYPE),
                       ("ok/link", tarfile.SYMTYPE)):
        archive = tmp_path / "bad.tar"
        with tarfile.open(archive, "w") as tar:
            info = tarfile.TarInfo(name)
            info.type = kind
            if kind == tarfile.SYMTYPE:
                info.linkname = "/etc/passwd"
                tar.addfile(info)
            else:
                info.size = 4
                tar.addfile(info, io.BytesIO(b"evil"))
        dest = tmp_path / "dest"
        with pytest.raises(data.DatasetError, match="refusing"):
            data.extract_tar(archive, dest)
        assert not (tmp_path / "evil.txt").exists() and not list(dest.iterdir())


# ----------------------------------------------------------------------------- augmentation

def images(n=6, c=3, h=8, w=8, seed=0):
    return torch.randint(0, 256, (n, c, h, w), generator=torch.Generator().manual_seed(seed),
                         dtype=torch.uint8)


def reference_augment(x, seed, pad, crop, flip, reflect):
    """A per-sample loop over F.pad, drawing offsets in augment's documented order."""
    g = torch.Generator().manual_seed(seed)
    n, _, h, w = x.shape
    dy = torch.randint(0, h + 2 * pad - crop + 1, (n,), generator=g)
    dx = torch.randint(0, w + 2 * pad - crop + 1, (n,), generator=g)
    fl = torch.randint(0, 2 if flip else 1, (n,), generator=g)
    padded = F.pad(x.float(), (pad,) * 4, mode="reflect" if reflect else "constant")
    out = []
    for i in range(n):
        img = padded[i, :, dy[i]:dy[i] + crop, dx[i]:dx[i] + crop]
        out.append(img.flip(-1) if fl[i] else img)
    return torch.stack(out).to(torch.uint8)


@pytest.mark.parametrize("pad,crop,flip,reflect", [(4, 8, True, True), (2, 6, False, True),
                                                   (3, 8, True, False), (1, 10, True, True)])
def test_augment_matches_per_sample_reference(pad, crop, flip, reflect):
    x = images(n=16)
    got = data.augment(x, 7, pad=pad, crop=crop, flip=flip, reflect=reflect)
    assert got.shape == (16, 3, crop, crop) and got.dtype == torch.uint8
    assert torch.equal(got, reference_augment(x, 7, pad, crop, flip, reflect))


def test_augment_is_deterministic_and_pure():
    x = images(n=32)
    before = x.clone()
    a = data.augment(x, torch.Generator().manual_seed(3), pad=4, crop=8, flip=True)
    b = data.augment(x, torch.Generator().manual_seed(3), pad=4, crop=8, flip=True)
    c = data.augment(x, torch.Generator().manual_seed(4), pad=4, crop=8, flip=True)
    assert torch.equal(a, b) and not torch.equal(a, c) and torch.equal(x, before)


def test_augment_identity_and_flip():
    x = images(n=64)
    assert torch.equal(data.augment(x, 0, pad=0, flip=False), x)
    flipped = data.augment(x, 0, pad=0, flip=True)
    same = (flipped == x).flatten(1).all(1)
    mirrored = (flipped == x.flip(-1)).flatten(1).all(1)
    assert bool((same | mirrored).all()) and 10 < int(mirrored.sum()) < 54
    shifted = data.augment(x, 0, pad=2, flip=False)
    assert not torch.equal(shifted, x)


def test_augment_rejects_bad_arguments():
    with pytest.raises(ValueError):
        data.augment(images().float(), 0)
    with pytest.raises(ValueError):
        data.augment(images(), 0, pad=1, crop=11)
    with pytest.raises(ValueError):
        data.augment(images(h=4, w=4), 0, pad=4)


def test_presets():
    assert data.AUGMENTATIONS["cifar10"] == {"pad": 4, "crop": 32, "flip": True}
    assert data.AUGMENTATIONS["svhn"]["flip"] is False
    for name, shape in (("cifar10", (3, 32, 32)), ("svhn", (3, 32, 32)), ("stl10", (3, 96, 96)),
                        ("fashion_mnist", (1, 28, 28)), ("synthetic", (3, 16, 16))):
        x = torch.zeros(2, *shape, dtype=torch.uint8)
        assert data.augmentation(name)(x, torch.Generator().manual_seed(0)).shape == x.shape


def test_normalize():
    x = torch.tensor([0, 51, 255], dtype=torch.uint8).view(1, 3, 1, 1)
    out = data.normalize(x, (0.0, 0.2, 0.5), (1.0, 0.1, 0.25))
    assert out.dtype == torch.float32
    assert torch.allclose(out.flatten(), torch.tensor([0.0, 0.0, 2.0]))
    assert torch.allclose(data.normalize(x).flatten(), torch.tensor([0.0, 0.2, 1.0]))


# ---------------------------------------------------------------------------------- batches

def test_batches_cover_the_data_and_keep_pairs():
    x = torch.arange(10, dtype=torch.uint8).view(10, 1, 1, 1).expand(10, 1, 2, 2).contiguous()
    y = torch.arange(10)
    it = data.batches(x, y, 3, torch.Generator().manual_seed(0))
    assert len(it) == 3 == data.num_batches(10, 3)
    seen = []
    for xb, yb in it:
        assert xb.dtype == torch.float32 and xb.shape == (3, 1, 2, 2)
        assert torch.equal((xb[:, 0, 0, 0] * 255).round().long(), yb)
        seen += yb.tolist()
    assert len(set(seen)) == 9 and seen != sorted(seen)
    everything = data.batches(x, y, 3, 0, shuffle=False, drop_last=False)
    assert len(everything) == 4 and [b.tolist() for _, b in everything][-1] == [9]


def test_epoch_batches_resume_exactly():
    ds = data.synthetic(64, 8, shape=(3, 8, 8))
    full = list(data.epoch_batches(ds, 8, epoch=3, seed=11))
    again = list(data.epoch_batches(ds, 8, epoch=3, seed=11))
    resumed = data.epoch_batches(ds, 8, epoch=3, seed=11, start=5)
    assert len(full) == 8 and len(resumed) == 3
    for (a, ya), (b, yb) in zip(full, again):
        assert torch.equal(a, b) and torch.equal(ya, yb)
    for (a, ya), (b, yb) in zip(full[5:], resumed):
        assert torch.equal(a, b) and torch.equal(ya, yb)
    other = list(data.epoch_batches(ds, 8, epoch=4, seed=11))
    assert not torch.equal(full[0][1], other[0][1])


def test_epoch_batches_augment_and_normalise():
    ds = data.synthetic(32, 8, shape=(3, 8, 8))
    plain = next(iter(data.epoch_batches(ds, 8, 0, 0, augment=None)))
    augmented = next(iter(data.epoch_batches(ds, 8, 0, 0)))
    assert torch.equal(plain[1], augmented[1]) and not torch.equal(plain[0], augmented[0])
    idx = torch.randperm(32, generator=torch.Generator().manual_seed(data._mix(0, 0)))[:8]
    assert torch.equal(plain[1], ds.train_y[idx])
    assert torch.allclose(plain[0], data.normalize(ds.train_x[idx], ds.mean, ds.std))


def test_docstring_examples_run():
    assert doctest.testmod(data, optionflags=doctest.ELLIPSIS).failed == 0


# ------------------------------------------------------- values outside what the format promises

def rewrite_cifar_data(path, data):
    with open(path, "rb") as f:
        batch = pickle.load(f, encoding="bytes")
    batch[b"data"] = data
    with open(path, "wb") as f:
        pickle.dump(batch, f, protocol=2)


@pytest.mark.parametrize("bad", ["nan", "inf", "int64 300..1000", "float in range", "negative"])
def test_cifar_pixels_must_be_bytes(tmp_path, bad):
    root = tmp_path / "cifar-10-batches-py"
    write_cifar(root)
    n = 2  # data_batch_1 holds 2 images
    data_ = {"nan": np.full((n, 3072), np.nan), "inf": np.full((n, 3072), np.inf, dtype=np.float32),
             "int64 300..1000": np.random.default_rng(0).integers(300, 1001, (n, 3072)),
             "float in range": np.full((n, 3072), 7.0), "negative": np.full((n, 3072), -1, dtype=np.int16)}[bad]
    rewrite_cifar_data(root / "data_batch_1", data_)
    with pytest.raises(data.DatasetError, match=r"data_batch_1 .*uint8 0\.\.255") as err:
        data.load("cifar10", tmp_path, download=False)
    assert "\n" not in str(err.value)


def test_cifar_pixels_as_other_integers_in_range_are_read(tmp_path):
    root = tmp_path / "cifar-10-batches-py"
    tx, *_ = write_cifar(root)
    rewrite_cifar_data(root / "data_batch_1", tx[:2].reshape(2, 3072).astype(np.int64))
    assert np.array_equal(data.read_cifar10(root).train_x.numpy(), tx)


def test_svhn_pixels_must_be_bytes(tmp_path):
    from scipy.io import loadmat, savemat
    write_svhn(tmp_path)
    mat = loadmat(tmp_path / "train_32x32.mat")
    savemat(tmp_path / "train_32x32.mat", {"X": mat["X"].astype(np.float64) * np.nan, "y": mat["y"]})
    with pytest.raises(data.DatasetError, match=r"train_32x32.mat .*uint8 0\.\.255"):
        data.read_svhn(tmp_path)


@pytest.mark.parametrize("code, dtype, values", [(0x0B, ">i2", (300, 1000)), (0x0D, ">f4", (np.nan, np.nan))])
def test_fashion_pixels_must_be_bytes(tmp_path, code, dtype, values):
    write_fashion(tmp_path, gz=False)
    images = np.linspace(*values, 5 * 28 * 28).reshape(5, 28, 28)
    (tmp_path / "train-images-idx3-ubyte").write_bytes(idx_bytes(images, code, dtype))
    with pytest.raises(data.DatasetError, match=r"train-images-idx3-ubyte .*uint8 0\.\.255"):
        data.read_fashion_mnist(tmp_path)


def test_stl_pixels_are_bytes_by_construction(tmp_path):
    write_stl(tmp_path)  # raw bytes cannot be out of range; sizes and labels are checked
    assert data.read_stl10(tmp_path).train_x.dtype == torch.uint8


def test_a_cifar_file_without_read_permission_says_so(tmp_path, monkeypatch):
    root = tmp_path / "cifar-10-batches-py"
    write_cifar(root)
    deny(root / "data_batch_3", monkeypatch)
    with pytest.raises(data.DatasetError, match="cannot read .*data_batch_3: permission denied") as err:
        data.load("cifar10", tmp_path, download=False)
    assert "download again" not in str(err.value)


def test_downloaded_files_follow_the_umask(tmp_path, server):
    (server.root / "f.bin").write_bytes(b"payload")
    old = os.umask(0o022)
    try:
        data.download_file(server.url + "f.bin", tmp_path / "f.bin", progress=False)
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "f.bin").stat().st_mode) == 0o644


@pytest.mark.parametrize("cut", ["empty", "half", "garbage"])
def test_a_damaged_svhn_file_is_a_dataset_error(tmp_path, cut):
    write_svhn(tmp_path)
    raw = (tmp_path / "test_32x32.mat").read_bytes()
    (tmp_path / "test_32x32.mat").write_bytes({"empty": b"", "half": raw[:len(raw) // 2], "garbage": b"x" * 300}[cut])
    with pytest.raises(data.DatasetError, match="test_32x32.mat is not an SVHN .mat file"):
        data.read_svhn(tmp_path)


def test_randomly_damaged_cifar_batches_are_dataset_errors(tmp_path):
    """Flipped bytes in a pickle raise many exception types inside the unpickler: each is a
    DatasetError naming the file (a MemoryError, from a length byte grown huge, is left alone)."""
    path = tmp_path / "data_batch_1"
    good = pickle.dumps({b"labels": [1, 2], b"data": np.zeros((2, 3072), np.uint8)}, protocol=2)
    rng = np.random.default_rng(0)
    for _ in range(300):
        bad = bytearray(good)
        bad[int(rng.integers(len(bad)))] = int(rng.integers(256))
        path.write_bytes(bytes(bad))
        try:
            data._cifar_batch(path)
        except data.DatasetError as err:
            assert "data_batch_1" in str(err)
        except MemoryError:
            pass
