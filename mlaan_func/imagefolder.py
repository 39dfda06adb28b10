"""Image-folder datasets (``train/<class>/*.jpg``, ``val/<class>/*.jpg``, ImageNet's layout)
decoded with Pillow (``pip install mlaan_func[imagenet]``) and fed by a ``DataLoader``.

Training images get a random-resized crop and a horizontal flip, evaluation images a resize
of the short side to ``size / 0.875`` and a centre crop; both come out ``uint8`` (N, C, H, W)
so that pinned host-to-device copies are small; :func:`device_batches` normalises them on the
device. Every random choice of a sample derives from ``(seed, epoch, index)``, and the order of
an epoch from ``(seed, epoch)`` through ``DistributedSampler``, so a run resumed at batch ``b``
sees the batches a full pass would have from ``b`` on, whatever the number of workers.
Every Pillow mode in :data:`MODES` decodes to the same scale (black 0, white 255), 16-bit and
float images included; other modes, and pixels outside their mode's range (NaN in a float TIFF),
are a :class:`~mlaan_func.errors.DatasetError` naming the file.
An unreadable or truncated image is replaced by the next readable file in folder order and
counted (``FolderBatch.skipped``), so batches keep their size and nothing is raised mid-epoch
(unless :data:`MAX_SKIPS` files in a row are unreadable); layout errors, files this user may not
read, and splits without readable images (:func:`check_readable`) are raised before anything
runs, as one-line :class:`~mlaan_func.errors.DatasetError`; so are failures inside loader workers.

>>> import tempfile, pathlib
>>> root = pathlib.Path(tempfile.mkdtemp())
>>> _ = write_example_folder(root, classes=("cat", "dog"), per_class=3, size=20)
>>> data = load_folder(root, image_size=16)
>>> data.classes, len(data.train.files), data.num_classes
(('cat', 'dog'), 6, 2)
>>> batch = next(iter(train_loader(data, batch_size=4, epoch=0, seed=0)))
>>> batch.x.shape, batch.x.dtype, batch.y.tolist() != [], batch.skipped
(torch.Size([4, 3, 16, 16]), torch.uint8, True, 0)
"""

from __future__ import annotations

import math
import os
import random
from pathlib import Path
from typing import Iterator, NamedTuple, Sequence

import attrs
import numpy as np
import torch
from einops import rearrange
from torch import Tensor
from torch.utils.data import DataLoader, DistributedSampler

from .data import DatasetError, _cannot_read, _mix, normalize

__all__ = [
    "EVAL_RESIZE", "FolderBatch", "FolderData", "IMAGENET_MEAN", "IMAGENET_STD", "IMAGE_SUFFIXES",
    "ImageFolder", "MODES", "batches_per_epoch", "check_readable", "decode", "device_batches",
    "eval_loader", "load_folder", "scan", "train_loader", "write_example_folder",
]

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
"""File name endings read as images (case-insensitive); other files are skipped and counted."""

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
"""Normalisation of the ImageNet recipes (the released InfoPro and MLAAN code)."""

EVAL_RESIZE = 0.875
"""Evaluation resizes the short side to ``size / EVAL_RESIZE`` (256 for 224), then centre-crops."""

MAX_SKIPS = 32
"""Consecutive unreadable files after which a loader gives up with ``DatasetError``."""

_RGB_MODES = ("1", "L", "LA", "P", "PA", "RGB", "RGBA", "RGBX", "RGBa", "CMYK", "YCbCr")
_WIDE_MODES = {"I;16": 65535, "I;16L": 65535, "I;16B": 65535, "I;16N": 65535, "I": 65535, "F": 1}
MODES = _RGB_MODES + tuple(_WIDE_MODES)
"""The Pillow modes read, all to ``uint8`` RGB with black 0 and white 255: 8-bit modes through
``convert("RGB")`` (alpha dropped), 16-bit ones (``I;16*``) and 32-bit integers (``I``, as
Pillow opens 16-bit PGM) on the 0..65535 scale, floats (``F``) on 0..1. Other modes (``LAB``,
``HSV``, ...) are refused by name."""

CROP_SCALE = (0.08, 1.0)
CROP_RATIO = (3 / 4, 4 / 3)


@attrs.frozen
class ImageFolder:
    """One split of an image folder: class names (sorted folder names) and the image files
    with their labels; ``ignored`` lists files that are not images (by suffix)."""

    root: str
    classes: tuple[str, ...]
    files: tuple[str, ...]
    labels: tuple[int, ...]
    ignored: tuple[str, ...] = ()


@attrs.frozen
class FolderData:
    """A train and a validation :class:`ImageFolder` with the same classes, read at
    ``image_size`` × ``image_size``; ``mean``/``std`` normalise on the device."""

    name: str
    train: ImageFolder
    val: ImageFolder
    image_size: int
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    channels: int = 3

    @property
    def classes(self) -> tuple[str, ...]:
        return self.train.classes

    @property
    def num_classes(self) -> int:
        return len(self.train.classes)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return (self.channels, self.image_size, self.image_size)


class FolderBatch(NamedTuple):
    """A batch from a folder loader: ``uint8`` images, ``int64`` labels, and how many files
    could not be read while filling it (each was replaced by the next readable file)."""

    x: Tensor
    y: Tensor
    skipped: int


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_SUFFIXES)


def _listdir(path: Path) -> list[str]:
    try:
        return sorted(os.listdir(path))
    except PermissionError:
        raise _cannot_read(path) from None


def scan(root: str | os.PathLike, classes: Sequence[str] | None = None) -> ImageFolder:
    """The classes (sub-folders) and image files of ``root``; raises ``DatasetError`` on a
    missing folder, no class folders, or a class without images. With ``classes``, the folder
    must hold exactly those.

    >>> scan("/nonexistent")
    Traceback (most recent call last):
    ...
    mlaan_func.errors.DatasetError: /nonexistent is not a directory: expected an image folder laid out as /nonexistent/<class>/<image>.jpg
    """
    root = Path(root)
    layout = f"{root}/<class>/<image>.jpg"
    if not root.is_dir():
        raise DatasetError(f"{root} is not a directory: expected an image folder laid out as {layout}")
    entries = _listdir(root)
    found = [e for e in entries if (root / e).is_dir() and not e.startswith(".")]
    if not found:
        loose = sum(1 for e in entries if (root / e).is_file() and _is_image(e))
        raise DatasetError(f"{root} has no class folders ({loose} loose images): lay it out as {layout}, "
                           "one folder per class")
    if classes is not None and tuple(found) != tuple(classes):
        only_here = sorted(set(found) - set(classes))
        missing = sorted(set(classes) - set(found))
        raise DatasetError(f"the classes of {root} differ from train's: {len(missing)} missing "
                           f"{missing[:5]}, {len(only_here)} extra {only_here[:5]}; train and val need "
                           "the same class folders")
    files, labels, ignored = [], [], []
    for label, name in enumerate(found):
        entries = _listdir(root / name)
        images = [f"{name}/{e}" for e in entries if _is_image(e) and (root / name / e).is_file()]
        ignored += [f"{name}/{e}" for e in entries if not _is_image(e) and not e.startswith(".")]
        if not images:
            raise DatasetError(f"class folder {root / name} has no images (files ending in "
                               f"{', '.join(IMAGE_SUFFIXES[:3])}, ...); add images or remove the folder")
        files += images
        labels += [label] * len(images)
    return ImageFolder(str(root), tuple(found), tuple(files), tuple(labels), tuple(ignored))


def load_folder(data_dir: str | os.PathLike, image_size: int = 224, *, name: str = "folder",
                train: str = "train", val: str = "val", num_classes: int | None = None,
                check: bool = True) -> FolderData:
    """``data_dir/train`` and ``data_dir/val`` as a :class:`FolderData` (checks the layout and
    that both have the same classes; ``num_classes``, when given, must match). With ``check``,
    :func:`check_readable` reads every image's header (0.13 ms a file here: about 3 minutes for
    ImageNet's 1.33 M files when cached, longer from a cold disk; ``check=False`` skips it), so a
    split the loader could not read is refused now rather than after an epoch of training.

    ImageNet's standard layout (``val`` sorted into class folders, as the usual ``valprep.sh``
    does) is read with ``load_folder(path, 224, name="imagenet", num_classes=1000)``.
    """
    data_dir = Path(data_dir)
    if image_size < 8:
        raise DatasetError(f"image_size must be at least 8, got {image_size}")
    if not data_dir.is_dir():
        raise DatasetError(f"{data_dir} is not a directory: expected {data_dir}/{train}/<class>/*.jpg and "
                           f"{data_dir}/{val}/<class>/*.jpg; pass --data-dir pointing at them")
    for part in (train, val):
        if not (data_dir / part).is_dir():
            raise DatasetError(f"{data_dir} has no {part}/ folder: expected {data_dir}/{train}/<class>/*.jpg "
                               f"and {data_dir}/{val}/<class>/*.jpg")
    tr = scan(data_dir / train)
    va = scan(data_dir / val, classes=tr.classes)
    if num_classes is not None and len(tr.classes) != num_classes:
        raise DatasetError(f"{name} needs {num_classes} class folders in {data_dir / train}, found "
                           f"{len(tr.classes)}; use --dataset folder for another number of classes")
    if check:
        check_readable(tr, train)
        check_readable(va, val)
    return FolderData(name, tr, va, int(image_size))


def _pillow():
    try:
        from PIL import Image
    except ImportError:
        raise DatasetError("reading image folders needs Pillow: pip install 'mlaan_func[imagenet]' "
                           "(or pip install pillow)") from None
    return Image


def _unreadable(Image) -> tuple[type[BaseException], ...]:
    """What Pillow raises for a file that is no image it can read (not an image, truncated,
    corrupted, too large); ``PermissionError``, also an ``OSError``, is caught before these."""
    return (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


def _check_mode(img, path) -> None:
    if img.mode not in MODES:
        raise DatasetError(f"{path} has Pillow mode {img.mode!r}, which is not read (MODES: "
                           f"{', '.join(MODES)}); convert it to RGB or 8/16-bit grayscale")


def _rgb(Image, img, path):
    """``img`` (any of :data:`MODES`) decoded to 8-bit RGB, black 0 and white 255."""
    _check_mode(img, path)
    if img.mode in _RGB_MODES:
        return img.convert("RGB")  # decodes the whole file: a truncated JPEG fails here
    top = _WIDE_MODES[img.mode]
    a = np.asarray(img)
    finite = np.isfinite(a)
    if not finite.all():
        raise DatasetError(f"{path} ({img.mode}) holds {a.size - int(finite.sum())} NaN or Inf of {a.size} "
                           "pixels; fix or remove the file")
    if a.min() < 0 or a.max() > top:
        raise DatasetError(f"{path} ({img.mode}) has pixels {a.min():g}..{a.max():g}, outside 0..{top}, "
                           f"the scale its mode is read on; rescale the file to 0..{top} or remove it")
    return Image.fromarray(np.rint(a * (255 / top)).astype(np.uint8)).convert("RGB")


def _random_resized_box(width: int, height: int, rng: random.Random) -> tuple[int, int, int, int]:
    """torchvision's RandomResizedCrop box: area in ``CROP_SCALE``, log-uniform aspect ratio in
    ``CROP_RATIO``, ten tries, then the centre crop at the nearest allowed ratio."""
    area = width * height
    log_ratio = (math.log(CROP_RATIO[0]), math.log(CROP_RATIO[1]))
    for _ in range(10):
        target = area * rng.uniform(*CROP_SCALE)
        ratio = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target * ratio)))
        h = int(round(math.sqrt(target / ratio)))
        if 0 < w <= width and 0 < h <= height:
            left, top = rng.randint(0, width - w), rng.randint(0, height - h)
            return left, top, left + w, top + h
    in_ratio = width / height
    if in_ratio < CROP_RATIO[0]:
        w, h = width, int(round(width / CROP_RATIO[0]))
    elif in_ratio > CROP_RATIO[1]:
        w, h = int(round(height * CROP_RATIO[1])), height
    else:
        w, h = width, height
    left, top = (width - w) // 2, (height - h) // 2
    return left, top, left + w, top + h


def _centre_box(width: int, height: int, size: int) -> tuple[tuple[int, int], tuple[int, int, int, int]]:
    short = int(round(size / EVAL_RESIZE))
    scale = short / min(width, height)
    w, h = max(size, int(round(width * scale))), max(size, int(round(height * scale)))
    left, top = (w - size) // 2, (h - size) // 2
    return (w, h), (left, top, left + size, top + size)


def decode(path: str | os.PathLike, size: int, seed: int | None) -> Tensor | None:
    """One image as ``uint8`` (3, size, size): random-resized crop + flip drawn from ``seed``,
    or resize + centre crop when ``seed`` is None. ``None`` when the file cannot be read
    (not an image, truncated, corrupted); ``DatasetError`` when this user may not read it, its
    mode is not in :data:`MODES`, or its pixels lie outside their mode's scale."""
    Image = _pillow()
    try:
        with Image.open(path) as img:
            img = _rgb(Image, img, path)
    except PermissionError:
        raise _cannot_read(path) from None
    except _unreadable(Image):
        return None
    if seed is None:
        resized, box = _centre_box(img.width, img.height, size)
        img = img.resize(resized, Image.BILINEAR).crop(box)
    else:
        rng = random.Random(seed)
        img = img.resize((size, size), Image.BILINEAR, box=_random_resized_box(img.width, img.height, rng))
        if rng.random() < 0.5:
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
    return rearrange(torch.from_numpy(np.asarray(img).copy()), "h w c -> c h w")


def check_readable(folder: ImageFolder, split: str) -> tuple[str, ...]:
    """The files of ``folder`` that Pillow cannot open (the loader skips them when drawn), once
    it is sure the loader can read the split: raises ``DatasetError`` naming ``split`` and the
    count when none of its images is readable or :data:`MAX_SKIPS` in a row are not (the loader
    would stop there mid-epoch), and naming the file when this user may not read it, its mode
    is not in :data:`MODES`, or its pixels lie outside their mode's scale.

    Only headers are read (``Image.open`` decodes no pixels), except for the rare 16-bit and
    float images whose pixels are checked, in the calling process, so it runs before any loader
    worker starts; a truncated 8-bit file passes and is skipped when drawn.
    :func:`load_folder` calls it for both splits (``check=True``): a program that loads with
    ``load_folder`` inside its ``except DatasetError`` (exit 3) needs no call of its own; one
    that builds :class:`ImageFolder` s with :func:`scan` calls it for each split before the
    first step, in the same ``try``.

    >>> import tempfile, pathlib
    >>> root = write_example_folder(pathlib.Path(tempfile.mkdtemp()), classes=("a", "b"), per_class=2)
    >>> for f in (root / "val").rglob("*.jpg"):
    ...     _ = f.write_bytes(b"junk")
    >>> check_readable(scan(root / "train"), "train")
    ()
    >>> check_readable(scan(root / "val"), "val")
    Traceback (most recent call last):
    ...
    mlaan_func.errors.DatasetError: val: 2 of 2 images in .../val cannot be read (first: a/0.jpg); ...
    """
    Image = _pillow()
    bad = []
    for name in folder.files:
        path = Path(folder.root) / name
        try:
            with Image.open(path) as img:
                _check_mode(img, path)
                if img.mode in _WIDE_MODES:  # rare, and only the pixels show NaN or values off scale
                    _rgb(Image, img, path)
        except PermissionError:
            raise _cannot_read(path) from None
        except _unreadable(Image):
            bad.append(name)
    n, unreadable = len(folder.files), set(bad)
    if len(bad) == n:
        raise DatasetError(f"{split}: {n} of {n} images in {folder.root} cannot be read (first: {bad[0]}); "
                           "fix or replace them (truncated copies?), or remove them")
    run, longest, first = 0, 0, None
    for i in range(2 * n):  # twice round: the loader's replacement wraps past the last file
        name = folder.files[i % n]
        run = run + 1 if name in unreadable else 0
        if run > longest:
            longest, first = run, folder.files[(i - run + 1) % n]
    if longest >= MAX_SKIPS:
        raise DatasetError(f"{split}: {longest} unreadable images in a row from {first} in {folder.root} "
                           f"({len(bad)} of {n} in all), and the loader gives up after {MAX_SKIPS} in a "
                           "row; fix or remove them")
    return tuple(bad)


class _Failure(NamedTuple):
    """A ``DatasetError`` met while reading, carried out of a loader worker as data: raised
    there, ``DataLoader`` would re-raise it wrapped in the worker's traceback."""

    message: str


class _Reader(torch.utils.data.Dataset):
    """Reads ``(index, seed)`` keys; a plain function of its key (no state changes). An
    unreadable file is replaced by the next one in folder order."""

    def __init__(self, folder: ImageFolder, size: int, train: bool):
        self.folder, self.size, self.train = folder, size, train

    def __len__(self) -> int:
        return len(self.folder.files)

    def __getitem__(self, key: tuple[int, int]) -> tuple[Tensor, int, int] | _Failure:
        try:
            return self._read(key)
        except DatasetError as err:
            return _Failure(str(err))

    def _read(self, key: tuple[int, int]) -> tuple[Tensor, int, int]:
        index, seed = key
        n = len(self.folder.files)
        for skipped in range(min(MAX_SKIPS, n)):
            i = (index + skipped) % n
            x = decode(Path(self.folder.root) / self.folder.files[i], self.size, seed if self.train else None)
            if x is not None:
                return x, self.folder.labels[i], skipped
        raise DatasetError(f"{min(MAX_SKIPS, n)} unreadable images in a row from {self.folder.files[index]} in "
                           f"{self.folder.root}; check the files (truncated copies?) or remove them")


def _collate(items: Sequence[tuple[Tensor, int, int] | _Failure]) -> FolderBatch | _Failure:
    failure = next((item for item in items if isinstance(item, _Failure)), None)
    if failure is not None:
        return failure
    return FolderBatch(torch.stack([x for x, _, _ in items]), torch.tensor([y for _, y, _ in items], dtype=torch.int64),
                       sum(s for _, _, s in items))


def _per_rank(batch_size: int, world: int) -> int:
    if batch_size < 1 or batch_size % world:
        raise ValueError(f"the batch of {batch_size} does not split evenly over {world} processes; "
                         "choose a batch size divisible by the number of processes")
    return batch_size // world


def _rank_indices(n: int, epoch: int, seed: int, rank: int, world: int, shuffle: bool) -> list[int]:
    sampler = DistributedSampler(range(n), num_replicas=world, rank=rank, shuffle=shuffle,
                                 seed=seed, drop_last=True)
    sampler.set_epoch(epoch)
    return list(sampler)


def batches_per_epoch(data: FolderData, batch_size: int, world: int = 1) -> int:
    """Full training batches per epoch (``batch_size`` is global, split over ``world`` ranks).

    >>> import tempfile, pathlib
    >>> root = pathlib.Path(tempfile.mkdtemp())
    >>> _ = write_example_folder(root, classes=("a", "b"), per_class=5, size=10)
    >>> batches_per_epoch(load_folder(root, 8), 4), batches_per_epoch(load_folder(root, 8), 4, world=2)
    (2, 2)
    """
    per = _per_rank(batch_size, world)
    return (len(data.train.files) // world) // per


class _FolderLoader(DataLoader):
    """A ``DataLoader`` that raises a reader's ``DatasetError`` (:class:`_Failure`) in the
    process iterating it, as the one-line error it was."""

    def __iter__(self) -> Iterator[FolderBatch]:
        for batch in super().__iter__():
            if isinstance(batch, _Failure):
                raise DatasetError(batch.message)
            yield batch


def _loader(reader, keys, per_rank: int, workers: int, pin_memory: bool, drop_last: bool):
    return _FolderLoader(reader, batch_size=per_rank, sampler=keys, num_workers=workers, pin_memory=pin_memory,
                      collate_fn=_collate, drop_last=drop_last,
                      prefetch_factor=4 if workers > 0 else None, persistent_workers=False)


def train_loader(data: FolderData, batch_size: int, epoch: int, seed: int, *, start: int = 0,
                 rank: int = 0, world: int = 1, workers: int = 0, pin_memory: bool = False) -> DataLoader:
    """Epoch ``epoch`` of the training images from batch ``start`` on: this rank's
    ``batch_size // world`` images per batch, augmented, as :class:`FolderBatch` es.

    The order is ``DistributedSampler(seed, epoch)``'s for this rank; sample ``i``'s crop and
    flip come from ``(seed, epoch, i)``. ``len`` is the number of batches left.
    """
    per = _per_rank(batch_size, world)
    order = _rank_indices(len(data.train.files), epoch, seed, rank, world, shuffle=True)
    order = order[:len(order) // per * per][start * per:]
    keys = [(i, _mix(seed, epoch, i)) for i in order]
    return _loader(_Reader(data.train, data.image_size, True), keys, per, workers, pin_memory, drop_last=True)


def eval_loader(data: FolderData, batch_size: int, *, workers: int = 0, pin_memory: bool = False,
                part: str = "val") -> DataLoader:
    """Every image of ``part`` (``"val"`` or ``"train"``) in order, resized and centre-cropped."""
    folder = getattr(data, part)
    keys = [(i, 0) for i in range(len(folder.files))]
    return _loader(_Reader(folder, data.image_size, False), keys, batch_size, workers, pin_memory, drop_last=False)


def device_batches(loader, device, mean: Sequence[float], std: Sequence[float], *,
                   skipped: list | None = None) -> Iterator[tuple[Tensor, Tensor]]:
    """The loader's batches on ``device``, normalised (non-blocking copies from pinned memory);
    each batch's count of unreadable files is appended to ``skipped``."""
    device = torch.device(device)
    for batch in loader:
        if skipped is not None:
            skipped.append(batch.skipped)
        x = batch.x.to(device, non_blocking=True)
        yield normalize(x, mean, std), batch.y.to(device, non_blocking=True)


def write_example_folder(root: str | os.PathLike, classes: Sequence[str] = ("a", "b", "c"), per_class: int = 4,
                         size: int = 24, *, val_per_class: int | None = None, seed: int = 0) -> Path:
    """Write a tiny ImageFolder of real JPEG files (``root/train``, ``root/val``) whose classes
    differ in colour, for examples and tests; returns ``root``."""
    Image = _pillow()
    root = Path(root)
    g = np.random.default_rng(seed)
    for part, n in (("train", per_class), ("val", val_per_class or max(1, per_class // 2))):
        for c, name in enumerate(classes):
            (root / part / name).mkdir(parents=True, exist_ok=True)
            base = np.array([(60 * c + 40) % 256, (90 * c + 120) % 256, (150 * c + 200) % 256])
            for i in range(n):
                h, w = size + int(g.integers(0, size // 2 + 1)), size + int(g.integers(0, size // 2 + 1))
                pixels = np.clip(base + g.normal(0, 30, (h, w, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(root / part / name / f"{i}.jpg", quality=90)
    return root
