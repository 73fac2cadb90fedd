"""The paper's datasets read from the layouts their publishers ship, with their official splits.

Flowers-102, CUB-200-2011 and Stanford Cars are parsed from their own metadata files
(``.mat`` and ``.txt``); piggyback-style ``train/`` + ``test/`` (+ ``val/``) class-per-folder
trees (Sketch, WikiArt) keep their folders as splits. Only file names and labels are held in
memory: each batch is decoded on demand (:mod:`core.data.photo_split`), so a 200-class set at
224 px costs megabytes, not gigabytes. Every file is resolved (symlinks followed) and, when
a confinement root is given (the server's data root), refused if it lands outside it.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from core.data.datasets import (
    IMAGE_EXTENSIONS,
    DatasetSpec,
    TaskDataset,
    _stratified_pick,
    split_indices,
)
from core.data.photo_split import Augmentation, PhotoSplit, open_image
from core.errors import ConfigError, ResourceUnavailable

__all__ = ["DEFAULT_BATCH_SIZE", "DEFAULT_IMAGE_SIZE", "FLOWERS102_CLASSES", "LAYOUTS",
           "PREPROCESS", "LayoutIndex", "OutsideDataRoot", "is_layout_name", "layout_name",
           "load_layout_dataset", "parse_layout_name", "photo_method_config", "scan_layout",
           "split_rows", "training_record"]

DEFAULT_IMAGE_SIZE = 224
"""The resolution the paper (and piggyback, CPG) adapts these photos at."""
DEFAULT_BATCH_SIZE = 32
"""piggyback's batch; a 224-px XMA2 step at 64 needs about twice the memory of one at 32."""
PREPROCESS = "imagenet"
"""How evaluation images (and so ``/predict`` inputs) are resized: the served task records it."""

TRAIN, VAL, TEST = 0, 1, 2
_MISSING_SHOWN = 5  # missing files named in an error before "and N more"

# Label order of imagelabels.mat (1..102), as torchvision's Flowers102.classes lists them.
FLOWERS102_CLASSES: tuple[str, ...] = (
    "pink primrose", "hard-leaved pocket orchid", "canterbury bells", "sweet pea",
    "english marigold", "tiger lily", "moon orchid", "bird of paradise", "monkshood",
    "globe thistle", "snapdragon", "colt's foot", "king protea", "spear thistle",
    "yellow iris", "globe-flower", "purple coneflower", "peruvian lily", "balloon flower",
    "giant white arum lily", "fire lily", "pincushion flower", "fritillary", "red ginger",
    "grape hyacinth", "corn poppy", "prince of wales feathers", "stemless gentian",
    "artichoke", "sweet william", "carnation", "garden phlox", "love in the mist",
    "mexican aster", "alpine sea holly", "ruby-lipped cattleya", "cape flower",
    "great masterwort", "siam tulip", "lenten rose", "barbeton daisy", "daffodil",
    "sword lily", "poinsettia", "bolero deep blue", "wallflower", "marigold", "buttercup",
    "oxeye daisy", "common dandelion", "petunia", "wild pansy", "primula", "sunflower",
    "pelargonium", "bishop of llandaff", "gaura", "geranium", "orange dahlia",
    "pink-yellow dahlia", "cautleya spicata", "japanese anemone", "black-eyed susan",
    "silverbush", "californian poppy", "osteospermum", "spring crocus", "bearded iris",
    "windflower", "tree poppy", "gazania", "azalea", "water lily", "rose", "thorn apple",
    "morning glory", "passion flower", "lotus", "toad lily", "anthurium", "frangipani",
    "clematis", "hibiscus", "columbine", "desert-rose", "tree mallow", "magnolia",
    "cyclamen", "watercress", "canna lily", "hippeastrum", "bee balm", "ball moss",
    "foxglove", "bougainvillea", "camellia", "mallow", "mexican petunia", "bromelia",
    "blanket flower", "trumpet creeper", "blackberry lily",
)  # fmt: skip


class OutsideDataRoot(ConfigError):
    """A dataset file resolves (through a symlink or ``..``) outside the allowed root."""


@dataclass(frozen=True, eq=False)
class LayoutIndex:
    """What a layout's metadata says: one resolved file, label and split per image."""

    layout: str
    root: Path
    classes: tuple[str, ...]
    files: tuple[Path, ...]
    labels: np.ndarray
    """int64 class index per image."""
    splits: np.ndarray
    """uint8 TRAIN/VAL/TEST per image (VAL absent: carved from train by the spec)."""
    boxes: np.ndarray | None = None
    """float [N, 4] left, top, right, bottom of the object to crop to, or None."""

    def sizes(self) -> dict[str, int]:
        counts = np.bincount(self.splits, minlength=3)
        return {"train": int(counts[TRAIN]), "val": int(counts[VAL]), "test": int(counts[TEST])}


# -- path confinement ------------------------------------------------------------------------


class _Tree:
    """Resolves names below a dataset folder, refusing any that escape ``confine``."""

    def __init__(self, root: Path, confine: Path | None, layout: str) -> None:
        self.layout = layout
        self.confine = confine.resolve() if confine is not None else None
        self.root = self._checked(Path(root).expanduser(), str(root))
        if not self.root.is_dir():
            raise ResourceUnavailable(f"{layout}: dataset folder {root} does not exist")

    def _checked(self, path: Path, shown: str) -> Path:
        resolved = path.resolve()
        if self.confine is not None and not resolved.is_relative_to(self.confine):
            raise OutsideDataRoot(f"{self.layout}: {shown} resolves to {resolved}, outside the "
                                  f"data root {self.confine}; copy the file below it instead "
                                  "of linking to it")
        return resolved

    def path(self, relative: str) -> Path:
        return self._checked(self.root / relative, relative)

    def file(self, relative: str, what: str) -> Path:
        path = self.path(relative)
        if not path.is_file():
            raise ResourceUnavailable(f"{self.layout}: {relative} ({what}) is missing from "
                                      f"{self.root}")
        return path

    def folder(self, relative: str, what: str) -> Path:
        path = self.path(relative)
        if not path.is_dir():
            raise ResourceUnavailable(f"{self.layout}: folder {relative}/ ({what}) is missing "
                                      f"from {self.root}")
        return path

    def images(self, names: Sequence[str], listed_in: str) -> tuple[Path, ...]:
        """Resolve and check every image, naming the missing ones in one error."""
        found: list[Path] = []
        missing: list[Path] = []
        for name in names:
            path = self.path(name)
            (found if path.is_file() else missing).append(path)
        if missing:
            shown = ", ".join(str(p.relative_to(self.root)) if p.is_relative_to(self.root)
                              else str(p) for p in missing[:_MISSING_SHOWN])
            more = (f" and {len(missing) - _MISSING_SHOWN} more"
                    if len(missing) > _MISSING_SHOWN else "")
            raise ResourceUnavailable(f"{self.layout}: {len(missing)} of {len(names)} images "
                                      f"listed in {listed_in} are missing from {self.root}: "
                                      f"{shown}{more}")
        return tuple(found)


# -- metadata readers ------------------------------------------------------------------------


def _loadmat(path: Path, layout: str) -> dict[str, Any]:
    """A MATLAB v5 file (scipy reads data only: no code runs while loading)."""
    from scipy.io import loadmat
    from scipy.io.matlab import MatReadError

    try:
        contents: dict[str, Any] = loadmat(str(path), squeeze_me=True)
        return contents
    except NotImplementedError as e:  # v7.3 is HDF5
        raise ConfigError(f"{layout}: {path.name} is a MATLAB v7.3 file; the published file "
                          "is v5, download it again") from e
    except (MatReadError, ValueError, TypeError, OSError) as e:
        raise ConfigError(f"{layout}: {path.name} is not a readable .mat file: {e}") from e


def _mat_field(mat: dict[str, Any], key: str, path: Path, layout: str) -> np.ndarray:
    if key not in mat:
        keys = sorted(k for k in mat if not k.startswith("__"))
        raise ConfigError(f"{layout}: {path.name} has no variable {key!r} (it has {keys})")
    return np.atleast_1d(mat[key])


def _int_array(values: Any, what: str, layout: str) -> np.ndarray:
    try:
        array = np.asarray(np.atleast_1d(values), dtype=np.float64).reshape(-1)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{layout}: {what} must be integers: {e}") from e
    if not np.all(np.isfinite(array)) or not np.all(array == np.round(array)):
        raise ConfigError(f"{layout}: {what} must be integers")
    return array.astype(np.int64)


def _read_table(tree: _Tree, name: str, columns: int, what: str) -> dict[int, list[str]]:
    """``id value...`` lines of a CUB text file -> {id: values}; malformed lines named."""
    path = tree.file(name, what)
    rows: dict[int, list[str]] = {}
    text = path.read_text(encoding="utf-8", errors="replace")
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split(maxsplit=columns - 1) if columns == 2 else line.split()
        if len(parts) != columns or not parts[0].isdigit():
            raise ConfigError(f"{tree.layout}: {name} line {number} should be {what}, got "
                              f"{line.strip()[:80]!r}")
        key = int(parts[0])
        if key in rows:
            raise ConfigError(f"{tree.layout}: {name} line {number} repeats id {key}")
        rows[key] = parts[1:]
    if not rows:
        raise ConfigError(f"{tree.layout}: {name} is empty")
    return rows


def _remap(labels: np.ndarray, names: Sequence[str], layout: str, where: str
           ) -> tuple[np.ndarray, tuple[str, ...]]:
    """1-based labels -> 0..K-1 over the classes present (a subset keeps its names)."""
    if labels.size and (labels.min() < 1 or labels.max() > len(names)):
        raise ConfigError(f"{layout}: labels in {where} must be 1..{len(names)}, found "
                          f"{int(labels.min())}..{int(labels.max())}")
    present = np.unique(labels)
    lookup = np.zeros(len(names) + 1, dtype=np.int64)
    lookup[present] = np.arange(len(present))
    return lookup[labels], tuple(names[i - 1] for i in present)


# -- the layouts -----------------------------------------------------------------------------


def _scan_flowers102(tree: _Tree) -> LayoutIndex:
    tree.folder("jpg", "the images, jpg/image_00001.jpg ...")
    labels_path = tree.file("imagelabels.mat", "labels 1..102 of every image")
    setid_path = tree.file("setid.mat", "trnid, valid and tstid: the official split")
    labels = _int_array(_mat_field(_loadmat(labels_path, "flowers102"), "labels", labels_path,
                                   "flowers102"), "imagelabels.mat labels", "flowers102")
    setid = _loadmat(setid_path, "flowers102")
    ids, splits = [], []
    for key, split in (("trnid", TRAIN), ("valid", VAL), ("tstid", TEST)):
        part = _int_array(_mat_field(setid, key, setid_path, "flowers102"),
                          f"setid.mat {key}", "flowers102")
        if part.size and (part.min() < 1 or part.max() > len(labels)):
            raise ConfigError(f"flowers102: setid.mat {key} holds image ids outside "
                              f"1..{len(labels)} (imagelabels.mat labels {len(labels)} images)")
        ids.append(part)
        splits.append(np.full(len(part), split, dtype=np.uint8))
    all_ids = np.concatenate(ids)
    if len(np.unique(all_ids)) != len(all_ids):
        raise ConfigError("flowers102: setid.mat lists an image id in more than one split "
                          "(or twice)")
    mapped, classes = _remap(labels[all_ids - 1], FLOWERS102_CLASSES, "flowers102",
                             "imagelabels.mat")
    files = tree.images([f"jpg/image_{i:05d}.jpg" for i in all_ids], "setid.mat")
    return LayoutIndex("flowers102", tree.root, classes, files, mapped, np.concatenate(splits))


def _cub_root(tree: _Tree) -> _Tree:
    """The archive unpacks to CUB_200_2011/; accept its parent too."""
    if not (tree.root / "images.txt").exists() and (tree.root / "CUB_200_2011").is_dir():
        return _Tree(tree.path("CUB_200_2011"), tree.confine, tree.layout)
    return tree


def _scan_cub200(tree: _Tree, crop: bool) -> LayoutIndex:
    tree = _cub_root(tree)
    tree.folder("images", "the images, one folder per class")
    images = _read_table(tree, "images.txt", 2, "'<image id> <path below images/>'")
    labels = _read_table(tree, "image_class_labels.txt", 2, "'<image id> <class id>'")
    split = _read_table(tree, "train_test_split.txt", 2, "'<image id> <1 train | 0 test>'")
    classes = _read_table(tree, "classes.txt", 2, "'<class id> <class name>'")
    ids = sorted(images)
    for name, table in (("image_class_labels.txt", labels), ("train_test_split.txt", split)):
        if set(table) != set(ids):
            odd = sorted(set(table) ^ set(ids))
            raise ConfigError(f"cub200: {name} and images.txt list different image ids "
                              f"({len(odd)} differ, e.g. {odd[:5]})")
    if sorted(classes) != list(range(1, len(classes) + 1)):
        raise ConfigError("cub200: classes.txt must number its classes 1..N")
    names = [classes[k][0].split(".", 1)[-1].replace("_", " ") for k in sorted(classes)]
    raw = _int_array([labels[i][0] for i in ids], "image_class_labels.txt class ids", "cub200")
    is_train = [split[i][0] for i in ids]
    if not set(is_train) <= {"0", "1"}:
        raise ConfigError("cub200: train_test_split.txt must give 1 (train) or 0 (test)")
    mapped, present = _remap(raw, names, "cub200", "image_class_labels.txt")
    boxes = None
    if crop:
        table = _read_table(tree, "bounding_boxes.txt", 5, "'<image id> <x> <y> <width> "
                            "<height>'")
        if set(table) != set(ids):
            raise ConfigError("cub200: bounding_boxes.txt and images.txt list different ids")
        try:
            xywh = np.array([[float(v) for v in table[i]] for i in ids], dtype=np.float64)
        except ValueError as e:
            raise ConfigError(f"cub200: bounding_boxes.txt holds a non-number: {e}") from e
        if (xywh[:, 2:] <= 0).any():
            raise ConfigError("cub200: bounding_boxes.txt has a box of zero width or height")
        boxes = np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], axis=1)
    files = tree.images([f"images/{images[i][0]}" for i in ids], "images.txt")
    splits = np.array([TRAIN if s == "1" else TEST for s in is_train], dtype=np.uint8)
    layout = "cub200_cropped" if crop else "cub200"
    return LayoutIndex(layout, tree.root, present, files, mapped, splits, boxes)


_CARS_FIELDS = ("bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2", "class", "fname")


def _cars_mat(tree: _Tree, name: str, what: str) -> Path:
    """devkit/ is where the devkit puts them; the labelled test file often sits beside it."""
    for candidate in (f"devkit/{name}", name):
        path = tree.path(candidate)
        if path.is_file():
            return path
    raise ResourceUnavailable(f"stanford_cars: {name} ({what}) is missing: looked for "
                              f"devkit/{name} and {name} in {tree.root}")


def _cars_annotations(path: Path, folder: str) -> tuple[list[str], np.ndarray, np.ndarray]:
    layout = "stanford_cars"
    records = _mat_field(_loadmat(path, layout), "annotations", path, layout)
    names = records.dtype.names or ()
    missing = [f for f in _CARS_FIELDS if f not in names]
    if missing:
        hint = (" (cars_test_annos.mat has no labels: use cars_test_annos_withlabels.mat)"
                if missing == ["class"] else "")
        raise ConfigError(f"stanford_cars: {path.name} annotations lack fields {missing}{hint}")
    files = [f"{folder}/{str(n).strip()}" for n in records["fname"]]
    labels = _int_array(list(records["class"]), f"{path.name} class", layout)
    boxes = np.stack([_int_array(list(records[f]), f"{path.name} {f}", layout)
                      for f in _CARS_FIELDS[:4]], axis=1).astype(np.float64)
    boxes[:, :2] -= 1  # the devkit counts pixels from 1, inclusive at both ends
    return files, labels, boxes


def _scan_stanford_cars(tree: _Tree, crop: bool) -> LayoutIndex:
    tree.folder("cars_train", "the training images")
    tree.folder("cars_test", "the test images")
    meta = _cars_mat(tree, "cars_meta.mat", "the 196 class names, from the devkit")
    names = [str(n).strip() for n in _mat_field(_loadmat(meta, "stanford_cars"),
                                                 "class_names", meta, "stanford_cars")]
    train = _cars_annotations(_cars_mat(tree, "cars_train_annos.mat", "training labels"),
                              "cars_train")
    test = _cars_annotations(_cars_mat(tree, "cars_test_annos_withlabels.mat",
                                       "test labels, published apart from the devkit"),
                             "cars_test")
    labels, classes = _remap(np.concatenate([train[1], test[1]]), names, "stanford_cars",
                             "the annotation files")
    files = tree.images(train[0] + test[0], "the annotation files")
    splits = np.array([TRAIN] * len(train[0]) + [TEST] * len(test[0]), dtype=np.uint8)
    boxes = np.concatenate([train[2], test[2]]) if crop else None
    layout = "stanford_cars_cropped" if crop else "stanford_cars"
    return LayoutIndex(layout, tree.root, classes, files, labels, splits, boxes)


def _folder_images(tree: _Tree, folder: Path) -> list[Path]:
    """Image files below a class folder (linked sub-folders are not followed)."""
    found: list[Path] = []
    for parent, dirs, files in os.walk(folder):
        dirs.sort()
        for name in sorted(files):
            if Path(name).suffix.lower() in IMAGE_EXTENSIONS and not name.startswith("."):
                found.append(Path(parent, name))
    return found


def _scan_split_folders(tree: _Tree) -> LayoutIndex:
    parts = [(name, split) for name, split in (("train", TRAIN), ("val", VAL), ("test", TEST))
             if (tree.root / name).exists()]
    if [n for n, _ in parts if n != "val"] != ["train", "test"]:
        raise ResourceUnavailable(f"split_folders: {tree.root} needs train/ and test/ folders "
                                  "(and optionally val/), each with one sub-folder of images "
                                  "per class")
    folders = {name: tree.folder(name, "one sub-folder per class") for name, _ in parts}
    classes = sorted(p.name for p in folders["train"].iterdir()
                     if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise ConfigError(f"split_folders: {folders['train']} has no class sub-folders")
    files: list[Path] = []
    labels: list[int] = []
    splits: list[int] = []
    for name, split in parts:
        present = sorted(p.name for p in folders[name].iterdir()
                         if p.is_dir() and not p.name.startswith("."))
        unknown = sorted(set(present) - set(classes))
        if unknown:
            raise ConfigError(f"split_folders: {name}/ has classes that train/ lacks: "
                              f"{unknown[:5]}")
        for label, cls in enumerate(classes):
            if cls not in present:
                continue
            folder = tree.path(f"{name}/{cls}")
            images = _folder_images(tree, folder)
            if not images and name == "train":
                raise ConfigError(f"split_folders: train/{cls}/ holds no images "
                                  f"({', '.join(sorted(IMAGE_EXTENSIONS))})")
            relative = [str(p.relative_to(tree.root)) if p.is_relative_to(tree.root) else
                        str(p) for p in images]
            files += tree.images(relative, f"{name}/{cls}/")
            labels += [label] * len(images)
            splits += [split] * len(images)
    if TEST not in splits:
        raise ConfigError("split_folders: test/ holds no images")
    return LayoutIndex("split_folders", tree.root, tuple(classes), tuple(files),
                       np.asarray(labels, dtype=np.int64), np.asarray(splits, dtype=np.uint8))


LAYOUTS: dict[str, Callable[[_Tree], LayoutIndex]] = {
    "flowers102": _scan_flowers102,
    "cub200": lambda tree: _scan_cub200(tree, crop=False),
    "cub200_cropped": lambda tree: _scan_cub200(tree, crop=True),
    "stanford_cars": lambda tree: _scan_stanford_cars(tree, crop=False),
    "stanford_cars_cropped": lambda tree: _scan_stanford_cars(tree, crop=True),
    "split_folders": _scan_split_folders,
}
"""Layout name -> reader; ``*_cropped`` crops every image to its published bounding box."""


def layout_name(layout: str, path: str | os.PathLike[str]) -> str:
    """The dataset name the rest of xma2 passes around: ``flowers102:/data/flowers``."""
    return f"{layout}:{path}"


def parse_layout_name(name: str) -> tuple[str, str] | None:
    """``flowers102:/data/flowers`` -> ("flowers102", "/data/flowers"); None if not a layout."""
    layout, sep, path = name.partition(":")
    if not sep or layout not in LAYOUTS:
        return None
    if not path:
        raise ConfigError(f"{layout} needs the folder it was unpacked to: {layout}:PATH")
    return layout, path


def is_layout_name(name: str) -> bool:
    return name.partition(":")[0] in LAYOUTS and ":" in name


def scan_layout(layout: str, path: str | os.PathLike[str], *,
                data_root: str | os.PathLike[str] | None = None,
                check_headers: bool = False) -> LayoutIndex:
    """Validate a downloaded dataset and index it without decoding any image.

    Args:
        layout: one of :data:`LAYOUTS`.
        path: the folder the download was unpacked to.
        data_root: refuse any file that resolves outside this folder (the server's).
        check_headers: also open every image's header (catches non-images early).
    """
    if layout not in LAYOUTS:
        raise ConfigError(f"unknown dataset layout {layout!r}; choose one of "
                          f"{', '.join(LAYOUTS)}")
    confine = Path(data_root).expanduser() if data_root is not None else None
    index = LAYOUTS[layout](_Tree(Path(path), confine, layout))
    if len(index.classes) < 2:
        raise ConfigError(f"{layout}: {path} holds {len(index.classes)} class; a task needs 2+")
    for split, count in index.sizes().items():
        if split != "val" and count == 0:
            raise ConfigError(f"{layout}: the official {split} split of {path} is empty")
    if check_headers:
        for file in index.files:
            open_image(file).close()
    return index


# -- splits ------------------------------------------------------------------------------------


def _limit(rows: np.ndarray, labels: np.ndarray, n: int | None, rng_stage: int,
           seed: int) -> np.ndarray:
    if n is None or n >= len(rows):
        return rows
    picked, _ = _stratified_pick(labels[rows], n, np.random.default_rng([seed, rng_stage]))
    limited: np.ndarray = rows[picked]
    return limited


def split_rows(index: LayoutIndex, spec: DatasetSpec) -> dict[str, np.ndarray]:
    """Rows of train/val/test: the official splits, limits drawn stratified and seeded.

    Without an official validation split, ``spec.val_fraction`` of train becomes one
    (as for the built-in datasets). With one, ``train_limit`` shrinks it in proportion.
    """
    official = {name: np.flatnonzero(index.splits == code)
                for name, code in (("train", TRAIN), ("val", VAL), ("test", TEST))}
    if len(official["val"]) == 0:
        order = np.concatenate([official["train"], official["test"]])
        local = split_indices(index.labels[order], spec, test_start=len(official["train"]))
        return {k: order[v] for k, v in local.items()}
    train, val, test = official["train"], official["val"], official["test"]
    n_val = None
    if spec.train_limit is not None and spec.train_limit < len(train):
        n_val = max(1, round(len(val) * spec.train_limit / len(train)))
    return {"train": _limit(train, index.labels, spec.train_limit, 2, spec.seed),
            "val": _limit(val, index.labels, n_val, 1, spec.seed),
            "test": _limit(test, index.labels, spec.test_limit, 3, spec.seed)}


def load_layout_dataset(spec: DatasetSpec, *, data_root: str | os.PathLike[str] | None = None,
                        augment: Augmentation | None = None,
                        check_headers: bool = True) -> TaskDataset:
    """A :class:`TaskDataset` for ``spec.name`` = ``LAYOUT:PATH`` whose splits decode lazily."""
    parsed = parse_layout_name(spec.name)
    if parsed is None:
        raise ConfigError(f"{spec.name!r} is not LAYOUT:PATH with a layout of "
                          f"{', '.join(LAYOUTS)}")
    index = scan_layout(*parsed, data_root=data_root, check_headers=check_headers)
    augment = augment or Augmentation()
    splits = {}
    for name, rows in split_rows(index, spec).items():
        splits[name] = PhotoSplit(
            [index.files[i] for i in rows], torch.from_numpy(index.labels[rows].copy()),
            index.classes, spec.image_size, augment=augment if name == "train" else None,
            boxes=index.boxes[rows] if index.boxes is not None else None, seed=spec.seed)
    return TaskDataset(spec=spec, classes=list(index.classes), **splits)


def photo_method_config(config: Any) -> Any:
    """A method config fitted to 224-px photos: the training batch defaults to
    :data:`DEFAULT_BATCH_SIZE` unless given, and XMA2's one ranking mini-batch (which keeps
    gradients) is no larger than a training batch, so ranking is not the memory peak."""
    if getattr(config, "ranking_batch_size", 0) > config.train.batch_size:
        config = replace(config, ranking_batch_size=config.train.batch_size)
    return config


def training_record(data: TaskDataset) -> dict[str, Any]:
    """How a task's images were prepared, for its hyperparameters (and ``/predict``)."""
    train = data.train
    if not isinstance(train, PhotoSplit):
        return {"preprocess": "fit"}
    return {"preprocess": PREPROCESS,
            "augmentation": asdict(train.augment) if train.augment else None,
            "crop_to_boxes": train.boxes is not None}
