"""Image-classification datasets read from their standard on-disk formats, checked downloads,
and seeded, batched augmentation that runs on the data's device.

Images stay ``uint8`` (N, C, H, W) until a batch is drawn; :func:`epoch_batches` derives the
order and the augmentation of every batch from ``(seed, epoch, batch index)``, so a run resumed
mid-epoch sees exactly the batches it would have seen.

>>> from mlaan_func import data
>>> ds = data.load("synthetic", "data", train_size=64, test_size=32)
>>> ds.train_x.shape, ds.train_x.dtype, ds.num_classes
(torch.Size([64, 3, 32, 32]), torch.uint8, 10)
>>> epoch = data.epoch_batches(ds, 16, epoch=0, seed=0)
>>> len(epoch)
4
>>> x, y = next(iter(epoch))
>>> x.dtype, tuple(x.shape), tuple(y.shape)
(torch.float32, (16, 3, 32, 32), (16,))
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import math
import os
import pickle
import sys
import tarfile
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Callable, Iterator, Sequence

import attrs
import numpy as np
import torch
from einops import rearrange
from torch import Tensor

from .errors import DatasetError
from .train.checkpoint import new_file

__all__ = [
    "AUGMENTATIONS", "Batches", "DOWNLOAD_TIMEOUT", "Dataset", "DatasetError", "FILES", "NAMES",
    "SYSTEM_DIRS", "URLS", "augment", "augmentation", "batches", "channel_stats",
    "download_file", "epoch_batches", "extract_tar", "load", "normalize", "num_batches",
    "read_cifar10", "read_fashion_mnist", "read_idx", "read_stl10", "read_svhn",
    "split_validation", "synthetic",
]

NAMES = ("cifar10", "svhn", "stl10", "fashion-mnist", "synthetic")
"""The names :func:`load` accepts (``_`` may stand for ``-``)."""

URLS = {
    "cifar10": "https://www.cs.toronto.edu/~kriz/",
    "svhn": "http://ufldl.stanford.edu/housenumbers/",
    "stl10": "http://ai.stanford.edu/~acoates/stl10/",
    "fashion-mnist": "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
}
"""Base URL each dataset's files are downloaded from; ``load(..., mirror=...)`` overrides it."""

FILES = {
    "cifar10": {"cifar-10-python.tar.gz": "c58f30108f718f92721af3b95e74349a"},
    "svhn": {"train_32x32.mat": "e26dedcc434d2e4c54c9b2d4a06d8373",
             "test_32x32.mat": "eb5a983be6a315427106f1b2a1d3c0c4"},
    "stl10": {"stl10_binary.tar.gz": "91f7769df0f17e558f3565bffb0c7dfb"},
    "fashion-mnist": {"train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
                      "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
                      "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
                      "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12e480ee83cd310"},
}
"""The files to download per dataset, with their md5 checksums."""

SYSTEM_DIRS = {"fashion-mnist": Path("/usr/share/datasets/fashion-mnist")}
"""Directories searched before the data dir (``apt-get install dataset-fashion-mnist``)."""

DOWNLOAD_TIMEOUT = 10.0
"""Seconds a download may wait on the network before it is given up."""

OFFLINE_HINT = ("or train offline with --dataset fashion-mnist (apt-get install "
                "dataset-fashion-mnist) or --dataset synthetic")

CLASSES = {
    "cifar10": ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
                "truck"),
    "svhn": tuple("0123456789"),
    "stl10": ("airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship", "truck"),
    "fashion-mnist": ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                      "Sneaker", "Bag", "Ankle boot"),
}

# Per-channel mean/std of the training images, in [0, 1] (CIFAR-10: the InfoPro/MLAAN values).
STATS = {
    "cifar10": ((125.3 / 255, 123.0 / 255, 113.9 / 255), (63.0 / 255, 62.1 / 255, 66.7 / 255)),
    "svhn": ((0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970)),
    "stl10": ((0.4467, 0.4398, 0.4066), (0.2603, 0.2566, 0.2713)),
    "fashion-mnist": ((0.2860,), (0.3530,)),
}

AUGMENTATIONS = {
    "cifar10": {"pad": 4, "crop": 32, "flip": True},
    "svhn": {"pad": 2, "crop": 32, "flip": False},
    "stl10": {"pad": 4, "crop": 96, "flip": True},
    "fashion-mnist": {"pad": 2, "crop": 28, "flip": True},
    "synthetic": {"pad": 4, "crop": None, "flip": True},
}
"""Keyword arguments of :func:`augment` per dataset (reflect padding throughout)."""


@attrs.frozen(eq=False)
class Dataset:
    """Train/test images as ``uint8`` (N, C, H, W) and ``int64`` labels, plus normalisation stats.

    ``val_x``/``val_y`` are ``None`` unless :func:`split_validation` held part of train out.
    ``files`` lists the files :func:`load` read.

    >>> ds = synthetic(8, 4, shape=(1, 5, 5), num_classes=3)
    >>> ds.channels, ds.image_size, len(ds.mean)
    (1, 5, 1)
    """

    name: str
    train_x: Tensor
    train_y: Tensor
    test_x: Tensor
    test_y: Tensor
    num_classes: int
    mean: tuple[float, ...] = attrs.field(converter=lambda v: tuple(float(a) for a in v))
    std: tuple[float, ...] = attrs.field(converter=lambda v: tuple(float(a) for a in v))
    classes: tuple[str, ...] = attrs.field(default=(), converter=tuple)
    val_x: Tensor | None = None
    val_y: Tensor | None = None
    files: tuple[str, ...] = attrs.field(default=(), converter=tuple)
    """The files the images were read from (set by :func:`load`; empty for synthetic data)."""

    def __attrs_post_init__(self):
        parts = [("train", self.train_x, self.train_y), ("test", self.test_x, self.test_y)]
        if self.val_x is not None or self.val_y is not None:
            parts.append(("val", self.val_x, self.val_y))
        shape = self.train_x.shape[1:]
        for part, x, y in parts:
            if x is None or y is None or x.dtype != torch.uint8 or x.ndim != 4 or y.dtype != torch.int64:
                raise ValueError(f"{self.name}: {part} needs uint8 (N, C, H, W) images and int64 labels")
            if x.shape[1:] != shape or len(x) != len(y) or y.ndim != 1:
                raise ValueError(f"{self.name}: {part} images {tuple(x.shape)} and labels "
                                 f"{tuple(y.shape)} do not match train images {tuple(shape)}")
            if len(y) and (int(y.min()) < 0 or int(y.max()) >= self.num_classes):
                raise ValueError(f"{self.name}: {part} labels outside 0..{self.num_classes - 1}")
        if len(self.mean) != shape[0] or len(self.std) != shape[0]:
            raise ValueError(f"{self.name}: mean/std need one value per channel ({shape[0]})")

    @property
    def channels(self) -> int:
        return self.train_x.shape[1]

    @property
    def image_size(self) -> int:
        """Height of the (square) images."""
        return self.train_x.shape[2]

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.train_x.shape[1:])

    def to(self, device) -> "Dataset":
        """The same dataset with every tensor on ``device``."""
        moved = {k: getattr(self, k).to(device) for k in
                 ("train_x", "train_y", "test_x", "test_y", "val_x", "val_y")
                 if getattr(self, k) is not None}
        return attrs.evolve(self, **moved)


def split_validation(dataset: Dataset, fraction: float, seed: int) -> Dataset:
    """Hold out a random ``fraction`` of train (seeded) as ``val_x``/``val_y``.

    Returns a new :class:`Dataset` whose train part is the rest; test is unchanged.

    >>> ds = split_validation(synthetic(100, 10), 0.2, seed=0)
    >>> len(ds.train_y), len(ds.val_y)
    (80, 20)
    """
    if not 0 < fraction < 1:
        raise ValueError(f"validation fraction must be in (0, 1), got {fraction}")
    n = len(dataset.train_y)
    n_val = max(1, round(n * fraction))
    if n_val >= n:
        raise ValueError(f"fraction {fraction} of {n} training images leaves none to train on")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    order = order.to(dataset.train_y.device)
    val, train = order[:n_val], order[n_val:]
    return attrs.evolve(dataset, train_x=dataset.train_x[train], train_y=dataset.train_y[train],
                        val_x=dataset.train_x[val], val_y=dataset.train_y[val])


def channel_stats(x: Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of ``uint8`` images, in [0, 1] units.

    >>> channel_stats(torch.full((2, 1, 3, 3), 255, dtype=torch.uint8))
    ((1.0,), (0.0,))
    """
    v = rearrange(x, "n c h w -> c (n h w)").double() / 255
    return tuple(v.mean(1).tolist()), tuple(v.std(1, correction=0).tolist())


# ----------------------------------------------------------------------------------- readers

def _tensor(a: np.ndarray, dtype=None) -> Tensor:
    return torch.from_numpy(np.array(a, dtype=dtype, copy=True, order="C"))


def _cannot_read(path: str | os.PathLike) -> DatasetError:
    """The error for a file or folder this user may not read (``PermissionError``)."""
    return DatasetError(f"cannot read {path}: permission denied; give this user read access "
                        "(chmod u+r for a file, u+rx for a folder) or run as the owner")


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except PermissionError:
        raise _cannot_read(path) from None


def _pixel_bytes(a, path: str | os.PathLike, fmt: str) -> np.ndarray:
    """``a`` as ``uint8`` when it holds what ``fmt``'s format promises, integers in 0..255 (of
    any integer dtype); floats, NaN/Inf and values out of range raise ``DatasetError`` naming
    ``path``, instead of being cast into wrong images.

    >>> _pixel_bytes(np.array([0, 255], dtype=np.int64), "f", "CIFAR-10")
    array([  0, 255], dtype=uint8)
    >>> _pixel_bytes(np.array([0, 300]), "f", "CIFAR-10")
    Traceback (most recent call last):
    ...
    mlaan_func.errors.DatasetError: f holds int64 pixels (values 0..300), but CIFAR-10 images are uint8 0..255: ...
    """
    a = np.asarray(a)
    if a.dtype == np.uint8:
        return a
    integers = a.dtype.kind in "iu"
    if integers and (a.size == 0 or (a.min() >= 0 and a.max() <= 255)):
        return a.astype(np.uint8)
    if integers:
        found = f" (values {a.min()}..{a.max()})"
    elif a.dtype.kind == "f" and a.size:
        finite = a[np.isfinite(a)]
        found = f" ({a.size - finite.size} of {a.size} NaN or Inf" + (
            f", finite values {finite.min():g}..{finite.max():g})" if finite.size else ")")
    else:
        found = ""
    raise DatasetError(f"{path} holds {a.dtype} pixels{found}, but {fmt} images are uint8 0..255: the "
                       "file is not what its format promises; replace it with the official file")


def _need(root: Path, names: Sequence[str]) -> None:
    missing = [n for n in names if not (root / n).is_file()]
    if missing:
        raise DatasetError(f"missing {', '.join(missing)} in {root}")


_PICKLE_GLOBALS = {("_codecs", "encode"), ("numpy", "ndarray"), ("numpy", "dtype"),
                   ("numpy._core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "scalar"),
                   ("numpy._core.numeric", "_frombuffer")}


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles dicts of numpy arrays and lists, and nothing that could run code."""

    def find_class(self, module, name):
        module = module.replace("numpy.core.", "numpy._core.")
        if (module, name) not in _PICKLE_GLOBALS:
            raise pickle.UnpicklingError(f"{module}.{name} is not allowed in a dataset pickle")
        return super().find_class(module, name)


# what unpickling a damaged or crafted file can raise (find_class refusals are UnpicklingErrors;
# LookupError covers a bad index or key and an unknown text encoding). MemoryError is left to
# propagate: it may be a real shortage, not the file's fault.
_UNPICKLE_ERRORS = (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, LookupError,
                    ImportError, OverflowError)


def _cifar_batch(path: Path) -> tuple[Tensor, Tensor]:
    def broken(why) -> DatasetError:
        return DatasetError(f"{path} is not a CIFAR-10 python batch ({why}); delete it and download again")

    try:
        with open(path, "rb") as f:
            batch = _ArrayUnpickler(f, encoding="bytes").load()
    except PermissionError:
        raise _cannot_read(path) from None
    except (*_UNPICKLE_ERRORS, OSError) as err:
        raise broken(err) from None
    if not isinstance(batch, dict):
        raise broken(f"it holds a {type(batch).__name__}, not a dict")
    data, labels = batch.get(b"data", batch.get("data")), batch.get(b"labels", batch.get("labels"))
    if data is None or labels is None:
        raise broken("no data or no labels")
    try:
        data, labels = np.asarray(data), np.asarray(labels)
    except ValueError as err:  # ragged nested lists
        raise broken(err) from None
    if labels.ndim != 1 or labels.dtype.kind not in "iu":
        raise broken(f"its labels are {labels.dtype} {labels.shape}, not a list of integers")
    data = _pixel_bytes(data, path, "CIFAR-10")
    if data.size != len(labels) * 3 * 32 * 32:
        raise broken(f"{data.size} pixel values for {len(labels)} labels, not 3072 per image")
    data = data.reshape(len(labels), 3 * 32 * 32)
    return rearrange(_tensor(data), "n (c h w) -> n c h w", c=3, h=32), _tensor(labels, np.int64)


def read_cifar10(root: str | os.PathLike) -> Dataset:
    """CIFAR-10 from the ``cifar-10-batches-py`` directory (``data_batch_1..5``, ``test_batch``)."""
    root = Path(root)
    names = [f"data_batch_{i}" for i in range(1, 6)]
    _need(root, names + ["test_batch"])
    train = [_cifar_batch(root / n) for n in names]
    test_x, test_y = _cifar_batch(root / "test_batch")
    return Dataset("cifar10", torch.cat([x for x, _ in train]), torch.cat([y for _, y in train]),
                   test_x, test_y, 10, *STATS["cifar10"], CLASSES["cifar10"])


def read_svhn(root: str | os.PathLike) -> Dataset:
    """SVHN cropped digits from ``train_32x32.mat`` and ``test_32x32.mat`` (label 10 is digit 0)."""
    try:
        from scipy.io import loadmat
        from scipy.io.matlab import MatReadError
    except ImportError:
        raise DatasetError("reading SVHN needs scipy: pip install scipy (or pip install "
                           "'mlaan_func[examples]')") from None
    root = Path(root)
    _need(root, ["train_32x32.mat", "test_32x32.mat"])

    def part(name):
        try:
            mat = loadmat(root / name)
            x, y = np.asarray(mat["X"]), np.asarray(mat["y"]).reshape(-1)
        except PermissionError:
            raise _cannot_read(root / name) from None
        except (MatReadError, OSError, ValueError, TypeError, KeyError, IndexError, EOFError,
                NotImplementedError) as err:
            raise DatasetError(f"{root / name} is not an SVHN .mat file ({err}); delete it and "
                               "download again") from None
        x = _pixel_bytes(x, root / name, "SVHN")
        if x.shape[:3] != (32, 32, 3) or x.shape[3] != len(y) or not np.isin(y, range(1, 11)).all():
            raise DatasetError(f"{root / name}: unexpected SVHN contents X{x.shape}, y{y.shape}")
        return rearrange(_tensor(x), "h w c n -> n c h w").contiguous(), _tensor(y % 10, np.int64)

    return Dataset("svhn", *part("train_32x32.mat"), *part("test_32x32.mat"), 10, *STATS["svhn"],
                   CLASSES["svhn"])


def read_stl10(root: str | os.PathLike) -> Dataset:
    """STL-10 labelled splits from the ``stl10_binary`` directory (``{train,test}_{X,y}.bin``).

    Each image is stored as 3×96×96 bytes in column-major order, hence the H/W transpose.
    """
    root = Path(root)
    _need(root, ["train_X.bin", "train_y.bin", "test_X.bin", "test_y.bin"])

    def part(split):
        # raw bytes: uint8 0..255 by construction, so only sizes and labels can be wrong
        x = np.frombuffer(_read_bytes(root / f"{split}_X.bin"), dtype=np.uint8)
        y = np.frombuffer(_read_bytes(root / f"{split}_y.bin"), dtype=np.uint8).astype(np.int64)
        if x.size != len(y) * 3 * 96 * 96 or not np.isin(y, range(1, 11)).all():
            raise DatasetError(f"{root}/{split}_X.bin ({x.size} bytes) and {split}_y.bin "
                               f"({len(y)} labels) are not STL-10 binaries; delete and re-download")
        x = rearrange(_tensor(x).view(len(y), 3, 96, 96), "n c w h -> n c h w").contiguous()
        return x, _tensor(y - 1)

    return Dataset("stl10", *part("train"), *part("test"), 10, *STATS["stl10"], CLASSES["stl10"])


_IDX_TYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str | os.PathLike) -> Tensor:
    """An IDX file (the MNIST format), gzipped or not, as a tensor of its stored shape.

    >>> import tempfile, pathlib
    >>> p = pathlib.Path(tempfile.mkdtemp()) / "x-idx1-ubyte"
    >>> _ = p.write_bytes(bytes([0, 0, 8, 1, 0, 0, 0, 3, 7, 8, 9]))
    >>> read_idx(p)
    tensor([7, 8, 9], dtype=torch.uint8)
    """
    path = Path(path)
    raw = _read_bytes(path)
    try:
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
    except (OSError, EOFError) as err:
        raise DatasetError(f"{path} is a truncated or corrupted gzip file ({err}); delete it and "
                           "download again") from None
    if len(raw) < 4 or raw[:2] != b"\0\0" or raw[2] not in _IDX_TYPES:
        raise DatasetError(f"{path} is not an IDX file (bad magic {raw[:4].hex()})")
    ndim, dtype = raw[3], np.dtype(_IDX_TYPES[raw[2]])
    dims = np.frombuffer(raw, ">u4", ndim, 4).astype(np.int64)
    count = int(np.prod(dims))
    if len(raw) != 4 + 4 * ndim + count * dtype.itemsize:
        raise DatasetError(f"{path}: header says {tuple(dims)} {dtype} but the file holds "
                           f"{len(raw)} bytes; delete it and download again")
    values = np.frombuffer(raw, dtype, count, 4 + 4 * ndim)
    return _tensor(values.astype(dtype.newbyteorder("="))).reshape(tuple(dims))


_FASHION = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
            "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}


def _idx_path(root: Path, name: str) -> Path | None:
    for candidate in (root / name, root / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    return None


def read_fashion_mnist(root: str | os.PathLike) -> Dataset:
    """Fashion-MNIST (or MNIST) from the four IDX files in ``root``, each gzipped or not."""
    root = Path(root)
    names = [n for pair in _FASHION.values() for n in pair]
    missing = [n for n in names if _idx_path(root, n) is None]
    if missing:
        raise DatasetError(f"missing {', '.join(missing)} (or .gz) in {root}")

    def part(split):
        image_path, label_path = (_idx_path(root, n) for n in _FASHION[split])
        images, labels = read_idx(image_path), read_idx(label_path)
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise DatasetError(f"{root}: {split} images {tuple(images.shape)} and labels "
                               f"{tuple(labels.shape)} do not pair up")
        if labels.is_floating_point():
            raise DatasetError(f"{label_path} holds {labels.dtype} labels; MNIST labels are integers")
        images = torch.from_numpy(_pixel_bytes(images.numpy(), image_path, "Fashion-MNIST"))
        return rearrange(images, "n h w -> n 1 h w"), labels.long()

    return Dataset("fashion-mnist", *part("train"), *part("test"), 10, *STATS["fashion-mnist"],
                   CLASSES["fashion-mnist"])


def synthetic(train_size: int = 512, test_size: int = 256, *, shape: Sequence[int] = (3, 32, 32),
              num_classes: int = 10, seed: int = 0) -> Dataset:
    """Random ``uint8`` images, deterministic from ``seed``, for runs without any dataset.

    Each class has a smooth random prototype that its images mix with noise, so a net can learn.

    >>> a, b = synthetic(16, 8, seed=3), synthetic(16, 8, seed=3)
    >>> bool((a.train_x == b.train_x).all()), tuple(a.test_x.shape)
    (True, (8, 3, 32, 32))
    """
    c, h, w = shape
    g = torch.Generator().manual_seed(seed)
    prototypes = torch.rand(num_classes, c, 4, 4, generator=g)
    prototypes = torch.nn.functional.interpolate(prototypes, size=(h, w), mode="bilinear",
                                                 align_corners=False)
    n = train_size + test_size
    y = torch.randint(0, num_classes, (n,), generator=g)
    noise = torch.rand(n, c, h, w, generator=g)
    x = ((0.6 * prototypes[y] + 0.4 * noise) * 255).round().to(torch.uint8)
    mean, std = channel_stats(x[:train_size]) if train_size else ((0.5,) * c, (0.25,) * c)
    return Dataset("synthetic", x[:train_size], y[:train_size], x[train_size:], y[train_size:],
                   num_classes, mean, std, tuple(str(i) for i in range(num_classes)))


# ---------------------------------------------------------------------------------- download

def _md5(path: Path) -> str:
    digest = hashlib.md5()
    try:
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
    except PermissionError:
        raise _cannot_read(path) from None
    return digest.hexdigest()


class _Unreachable(DatasetError):
    """The network or server failed (as opposed to a corrupted file)."""


def download_file(url: str, dest: str | os.PathLike, md5: str | None = None, *,
                  timeout: float = DOWNLOAD_TIMEOUT, progress: bool = True) -> Path:
    """Download ``url`` to ``dest`` through a temporary file beside it, check its md5, then
    rename it into place; a failed or corrupted download leaves nothing behind.

    Raises :class:`DatasetError` naming the URL and what went wrong.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = new_file(str(dest.parent), f".{dest.name}.", ".part")
    tmp = Path(tmp_name)
    try:
        digest, done = hashlib.md5(), 0
        try:
            with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as resp:
                total = int(resp.headers.get("Content-Length") or 0)
                last = 0.0
                while chunk := resp.read(1 << 20):
                    out.write(chunk)
                    digest.update(chunk)
                    done += len(chunk)
                    if progress and time.monotonic() - last > 0.5:
                        last = time.monotonic()
                        share = f"{100 * done / total:5.1f}% of {total / 1e6:,.1f} MB" if total else ""
                        sys.stderr.write(f"\rdownloading {url}: {done / 1e6:,.1f} MB {share}")
                        sys.stderr.flush()
        except (urllib.error.URLError, OSError, ValueError) as err:
            reason = getattr(err, "reason", None) or err
            raise _Unreachable(f"downloading {url} failed ({reason})") from None
        if progress:
            sys.stderr.write(f"\rdownloaded {url}: {done / 1e6:,.1f} MB\n")
        got = digest.hexdigest()
        if md5 is not None and got != md5.lower() or total and done != total:
            raise DatasetError(
                f"{url} arrived corrupted or partial ({done} bytes, md5 {got}, expected {md5}); "
                f"removed it: try again, or put a good copy at {dest} (see --data-dir)")
        os.replace(tmp, dest)
        return dest
    finally:
        tmp.unlink(missing_ok=True)


def extract_tar(archive: str | os.PathLike, dest: str | os.PathLike) -> None:
    """Extract a tarball into ``dest``, refusing links, devices and paths that leave ``dest``.

    Extraction goes to a temporary directory first and is moved into place when complete.
    """
    archive, dest = Path(archive), Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest, prefix=".extract-") as tmp:
        try:
            with tarfile.open(archive) as tar:
                members = tar.getmembers()
                for m in members:
                    target = (Path(tmp) / m.name).resolve()
                    if (os.path.isabs(m.name) or ".." in Path(m.name).parts
                            or not target.is_relative_to(Path(tmp).resolve())):
                        raise DatasetError(f"{archive}: member {m.name!r} would land outside "
                                           f"{dest}; refusing to extract it")
                    if not (m.isfile() or m.isdir()):
                        raise DatasetError(f"{archive}: member {m.name!r} is not a plain file "
                                           "or directory; refusing to extract it")
                safe = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
                tar.extractall(tmp, members=members, **safe)
        except (tarfile.TarError, EOFError, OSError) as err:
            raise DatasetError(f"{archive} is not a valid tarball ({err}); delete it and "
                               "download again") from None
        _merge(Path(tmp), dest)


def _merge(src: Path, dst: Path) -> None:
    for entry in src.iterdir():
        target = dst / entry.name
        if entry.is_dir() and target.is_dir():
            _merge(entry, target)
        else:
            os.replace(entry, target)


# -------------------------------------------------------------------------------------- load

def _canonical(name: str) -> str:
    key = name.lower().replace("_", "-")
    key = {"cifar-10": "cifar10", "stl-10": "stl10", "fashionmnist": "fashion-mnist"}.get(key, key)
    if key not in NAMES:
        raise DatasetError(f"unknown dataset {name!r}; choose one of {', '.join(NAMES)}")
    return key


def _find(dirs: Sequence[Path], complete: Callable[[Path], bool]) -> Path | None:
    return next((d for d in dirs if complete(d)), None)


def _has(names: Sequence[str]) -> Callable[[Path], bool]:
    return lambda d: all((d / n).is_file() for n in names)


# name -> (extracted directory, files that must be in it, shown as)
_LAYOUT = {
    "cifar10": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"],
                "data_batch_1..5 and test_batch"),
    "stl10": ("stl10_binary", ["train_X.bin", "train_y.bin", "test_X.bin", "test_y.bin"],
              "train_X.bin, train_y.bin, test_X.bin and test_y.bin"),
    "svhn": ("svhn", ["train_32x32.mat", "test_32x32.mat"], "train_32x32.mat and test_32x32.mat"),
    "fashion-mnist": ("fashion-mnist", [n for p in _FASHION.values() for n in p],
                      "train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte "
                      "and t10k-labels-idx1-ubyte (each may be .gz)"),
}

_READERS = {"cifar10": read_cifar10, "svhn": read_svhn, "stl10": read_stl10,
            "fashion-mnist": read_fashion_mnist}


def load(name: str, data_dir: str | os.PathLike = "data", *, download: bool = True,
         mirror: str | None = None, timeout: float = DOWNLOAD_TIMEOUT, **options) -> Dataset:
    """Load dataset ``name`` (see :data:`NAMES`) from ``data_dir``, downloading it if missing.

    Looks in ``data_dir/<dir>`` then ``data_dir`` itself, where ``<dir>`` is
    ``cifar-10-batches-py``, ``stl10_binary``, ``svhn`` or ``fashion-mnist``, and only then in
    :data:`SYSTEM_DIRS` (Fashion-MNIST): files in ``data_dir`` always win. ``files`` of the
    result names what was read. Downloads come from ``mirror`` (a base URL) or :data:`URLS`,
    are md5-checked against :data:`FILES`, and tarballs are kept after extraction. A file
    already on disk whose md5 does not match is reported, never deleted.
    ``options`` go to :func:`synthetic` and are only accepted for ``"synthetic"``.
    Raises :class:`DatasetError` with a one-line message on any failure.

    >>> load("synthetic", train_size=4, test_size=2, shape=(1, 8, 8), num_classes=2).image_shape
    (1, 8, 8)
    """
    key = _canonical(name)
    if key == "synthetic":
        return synthetic(**options)
    if options:
        raise TypeError(f"load({name!r}) takes no options {sorted(options)} (only synthetic does)")
    data_dir = Path(data_dir)
    sub, names, shown = _LAYOUT[key]
    home = data_dir / sub
    if data_dir.exists() and not data_dir.is_dir():
        raise DatasetError(f"data directory {data_dir} is a file; pass --data-dir a directory")
    dirs = [home, data_dir]
    if key in SYSTEM_DIRS:
        dirs.append(Path(SYSTEM_DIRS[key]))
    if key == "fashion-mnist":
        complete = lambda d: all(_idx_path(d, n) is not None for n in names)  # noqa: E731
        files = lambda d: [_idx_path(d, n) for n in names]  # noqa: E731
    else:
        complete = _has(names)
        files = lambda d: [d / n for n in names]  # noqa: E731
    found = _find(dirs, complete)
    if found is None:
        _fetch(key, data_dir, home, shown, download, mirror, timeout)
        found = _find(dirs, complete)
        if found is None:
            raise DatasetError(f"{key}: the downloaded files did not provide {shown} in {home}")
    try:
        dataset = _READERS[key](found)
    except ValueError as err:
        raise DatasetError(f"{found}: {err}; fix or replace the files") from None
    return attrs.evolve(dataset, files=[str(f) for f in files(found)])


def _fetch(key: str, data_dir: Path, home: Path, shown: str, download: bool, mirror: str | None,
           timeout: float) -> None:
    """Download (and extract) ``key``'s files, or raise the one-line 'missing' error."""
    archive = key in ("cifar10", "stl10")
    target = data_dir if archive else home
    base = (mirror or URLS[key]).rstrip("/") + "/"
    where = f"{home} (or {Path(SYSTEM_DIRS[key])})" if key in SYSTEM_DIRS else str(home)
    if archive:
        where += f", or {', '.join(FILES[key])} in {data_dir}"

    def missing(reason: str) -> DatasetError:
        return DatasetError(f"{key}: expected {shown} in {where}, but {reason}; put the files there "
                            f"or pass --data-dir pointing at them, {OFFLINE_HINT}")

    for file, md5 in FILES[key].items():
        path = target / file
        if path.is_file() and (got := _md5(path)) != md5:
            raise DatasetError(
                f"{path} is not the official {file}: its md5 is {got}, expected {md5} (a partial "
                "or altered copy); it was left untouched: move it away or delete it so the "
                "program downloads a fresh one, or put the official file there")
        if not path.is_file():
            if not download:
                raise missing("they are not there and downloading is off")
            try:
                download_file(base + file, path, md5, timeout=timeout)
            except _Unreachable as err:
                raise missing(f"{err}") from None
        if archive:
            extract_tar(path, data_dir)


# ------------------------------------------------------------------------------ augmentation

def _generator(generator: torch.Generator | int) -> torch.Generator:
    if isinstance(generator, torch.Generator):
        return generator
    return torch.Generator().manual_seed(int(generator))


def _pair(v: int | Sequence[int]) -> tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[1]))


def augment(x: Tensor, generator: torch.Generator | int, *, pad: int = 0,
            crop: int | Sequence[int] | None = None, flip: bool = False,
            reflect: bool = True) -> Tensor:
    """Random crop of the ``pad``-padded images plus random horizontal flip, per sample.

    ``x`` is ``uint8`` (N, C, H, W) on any device; ``crop`` defaults to (H, W); padding reflects
    (edge excluded, like ``F.pad(mode="reflect")``) or is zero. Offsets and flips are drawn from
    ``generator`` (a ``torch.Generator`` on any device, or an int seed for a CPU one); the result
    is a new tensor on ``x``'s device, gathered in one vectorised indexing step.

    >>> x = torch.arange(16, dtype=torch.uint8).view(1, 1, 4, 4)
    >>> bool((augment(x, 0) == x).all())
    True
    >>> augment(x, 0, pad=1, crop=2).shape
    torch.Size([1, 1, 2, 2])
    """
    if x.dtype != torch.uint8 or x.ndim != 4:
        raise ValueError(f"augment needs uint8 (N, C, H, W) images, got {x.dtype} {tuple(x.shape)}")
    n, _, h, w = x.shape
    ch, cw = (h, w) if crop is None else _pair(crop)
    if not (0 < ch <= h + 2 * pad and 0 < cw <= w + 2 * pad):
        raise ValueError(f"crop {(ch, cw)} does not fit {h}x{w} images padded by {pad}")
    if reflect and pad >= min(h, w):
        raise ValueError(f"reflect padding {pad} needs images larger than {pad}, got {h}x{w}")
    g = _generator(generator)
    draw = functools.partial(torch.randint, size=(n,), generator=g, device=g.device)
    dy = draw(0, h + 2 * pad - ch + 1).to(x.device)
    dx = draw(0, w + 2 * pad - cw + 1).to(x.device)
    flips = draw(0, 2 if flip else 1).to(x.device).bool()
    rows = dy[:, None] + torch.arange(ch, device=x.device) - pad
    cols = dx[:, None] + torch.arange(cw, device=x.device) - pad
    cols = torch.where(flips[:, None], cols.flip(-1), cols)
    if reflect:
        rows, cols = rows.abs(), cols.abs()
        rows = torch.where(rows >= h, 2 * (h - 1) - rows, rows)
        cols = torch.where(cols >= w, 2 * (w - 1) - cols, cols)
        out = x[torch.arange(n, device=x.device)[:, None, None], :, rows[:, :, None], cols[:, None]]
    else:
        inside = ((rows >= 0) & (rows < h))[:, :, None] & ((cols >= 0) & (cols < w))[:, None]
        out = x[torch.arange(n, device=x.device)[:, None, None], :,
                rows.clamp(0, h - 1)[:, :, None], cols.clamp(0, w - 1)[:, None]]
        out = out * inside[..., None]
    return rearrange(out, "n h w c -> n c h w").contiguous()


def augmentation(name: str) -> Callable[[Tensor, torch.Generator | int], Tensor]:
    """The preset training augmentation of a dataset, as ``f(x_uint8, generator) -> x_uint8``.

    >>> f = augmentation("cifar10")
    >>> f(torch.zeros(2, 3, 32, 32, dtype=torch.uint8), 0).shape
    torch.Size([2, 3, 32, 32])
    """
    return functools.partial(augment, **AUGMENTATIONS[_canonical(name)])


def normalize(x: Tensor, mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
              *, dtype: torch.dtype = torch.float32) -> Tensor:
    """``uint8`` images to floats: ``(x / 255 - mean) / std`` per channel (just ``x / 255`` when
    ``mean``/``std`` are None), on ``x``'s device.

    >>> normalize(torch.full((1, 2, 1, 1), 255, dtype=torch.uint8), (0.5, 0.0), (0.5, 2.0)).flatten()
    tensor([1.0000, 0.5000])
    """
    out = x.to(dtype) / 255
    if mean is not None:
        out = out - rearrange(torch.tensor(mean, dtype=dtype, device=x.device), "c -> c 1 1")
    if std is not None:
        out = out / rearrange(torch.tensor(std, dtype=dtype, device=x.device), "c -> c 1 1")
    return out


# ----------------------------------------------------------------------------------- batches

def _mix(*ints: int) -> int:
    """A 63-bit seed from integers, stable across processes and platforms."""
    return int.from_bytes(hashlib.blake2b(repr(ints).encode(), digest_size=8).digest(), "big") >> 1


def num_batches(n: int, batch_size: int, drop_last: bool = True) -> int:
    """Batches per epoch of ``n`` examples.

    >>> num_batches(10, 4), num_batches(10, 4, drop_last=False)
    (2, 3)
    """
    return n // batch_size if drop_last else math.ceil(n / batch_size)


@attrs.frozen(eq=False)
class Batches:
    """One epoch of batches, fixed at construction; iterating (any number of times) yields the
    same ``(float images, int64 labels)`` pairs. ``len`` is the number yielded: ``total - start``.
    """

    x: Tensor
    y: Tensor
    batch_size: int
    order: Tensor
    seed: int
    total: int
    start: int
    augment: Callable | None
    mean: Sequence[float] | None
    std: Sequence[float] | None

    def __len__(self) -> int:
        return max(self.total - self.start, 0)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        for b in range(self.start, self.total):
            idx = self.order[b * self.batch_size:(b + 1) * self.batch_size]
            x = self.x[idx]
            if self.augment is not None:
                x = self.augment(x, torch.Generator().manual_seed(_mix(self.seed, b)))
            yield normalize(x, self.mean, self.std), self.y[idx]


def batches(x: Tensor, y: Tensor, batch_size: int, generator: torch.Generator | int, *,
            shuffle: bool = True, drop_last: bool = True, augment: Callable | None = None,
            mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
            start: int = 0) -> Batches:
    """An epoch of normalised batches of ``x`` (``uint8``) and ``y``, on their device.

    The order and one augmentation seed are drawn from ``generator`` now; batch ``b`` is then
    augmented with a CPU generator seeded from (that seed, b), so ``start=b`` resumes mid-epoch
    with exactly the batches a full pass would have yielded from there, on any device.

    >>> x, y = torch.zeros(10, 1, 4, 4, dtype=torch.uint8), torch.arange(10)
    >>> [len(lab) for _, lab in batches(x, y, 4, 0, drop_last=False)]
    [4, 4, 2]
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    g = _generator(generator)
    n = len(y)
    if shuffle:
        order = torch.randperm(n, generator=g, device=g.device).to(y.device)
    else:
        order = torch.arange(n, device=y.device)
    seed = int(torch.randint(0, 2**62, (1,), generator=g, device=g.device))
    return Batches(x, y, batch_size, order, seed, num_batches(n, batch_size, drop_last), start,
                   augment, mean, std)


def epoch_batches(dataset: Dataset, batch_size: int, epoch: int, seed: int, start: int = 0, *,
                  augment: bool | Callable | None = True, shuffle: bool = True,
                  drop_last: bool = True) -> Batches:
    """Epoch ``epoch`` of ``dataset``'s training set, from batch ``start`` on.

    Order and augmentation derive only from ``(seed, epoch)``, so a resumed run sees the same
    batches. ``augment=True`` uses the dataset's preset (:func:`augmentation`), ``None``/``False``
    none, or pass a callable ``f(x_uint8, generator)``. Images are normalised with the dataset's
    mean/std.

    >>> ds = synthetic(40, 8)
    >>> full = list(epoch_batches(ds, 8, epoch=2, seed=1))
    >>> tail = list(epoch_batches(ds, 8, epoch=2, seed=1, start=3))
    >>> len(full), all(bool((a[0] == b[0]).all()) for a, b in zip(full[3:], tail))
    (5, True)
    """
    if augment is True:
        augment = augmentation(dataset.name)
    return batches(dataset.train_x, dataset.train_y, batch_size,
                   torch.Generator().manual_seed(_mix(seed, epoch)), shuffle=shuffle,
                   drop_last=drop_last, augment=augment or None, mean=dataset.mean,
                   std=dataset.std, start=start)
