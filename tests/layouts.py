"""Tiny datasets written in the exact layouts Flowers-102, CUB-200-2011, Stanford Cars and
piggyback's packaged sets are published in (JPEGs, ``.mat`` files written with scipy)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image
from scipy.io import savemat

__all__ = ["PHOTOS", "cub200_tree", "flowers102_tree", "jpeg", "split_folders_tree",
           "stanford_cars_tree"]

PHOTOS = ("chelsea", "coffee", "astronaut")
"""scikit-image photos the classes are cut from (so a pretrained backbone tells them apart)."""


def _photo(name: str) -> np.ndarray:
    from skimage import data

    image = getattr(data, name)()
    return np.stack([image] * 3, axis=-1) if image.ndim == 2 else image[..., :3]


def jpeg(path: Path, photo: str, rng: np.random.Generator, size: tuple[int, int]) -> None:
    """A random crop of ``photo`` resized to ``size`` (width, height), saved as a JPEG."""
    image = _photo(photo)
    h, w = image.shape[:2]
    side = int(rng.integers(min(h, w) // 2, min(h, w) + 1))
    y, x = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image[y:y + side, x:x + side]).resize(size).save(path, quality=85)


def flowers102_tree(root: Path, *, per_split: tuple[int, int, int] = (4, 2, 2),
                    photos: tuple[str, ...] = PHOTOS, size: tuple[int, int] = (40, 32),
                    seed: int = 0) -> Path:
    """``jpg/image_NNNNN.jpg``, ``imagelabels.mat`` (labels 1..K) and ``setid.mat``; class k
    (1-based) is cut from ``photos[k-1]``; ids are interleaved across classes and splits."""
    rng = np.random.default_rng(seed)
    labels: list[int] = []
    ids: dict[str, list[int]] = {"trnid": [], "valid": [], "tstid": []}
    for key, count in zip(ids, per_split, strict=True):
        for _ in range(count):
            for label, photo in enumerate(photos, 1):
                labels.append(label)
                ids[key].append(len(labels))
                jpeg(root / "jpg" / f"image_{len(labels):05d}.jpg", photo, rng, size)
    savemat(root / "imagelabels.mat", {"labels": np.asarray(labels, dtype=np.float64)[None]})
    savemat(root / "setid.mat", {k: np.asarray(v, dtype=np.float64)[None]
                                 for k, v in ids.items()})
    return root


def cub200_tree(root: Path, *, per_split: tuple[int, int] = (4, 2),
                photos: tuple[str, ...] = PHOTOS, size: tuple[int, int] = (40, 32),
                seed: int = 0) -> Path:
    """``CUB_200_2011/`` as the archive unpacks: images/, the four id tables and
    bounding_boxes.txt (the left half of each image)."""
    rng = np.random.default_rng(seed)
    base = root / "CUB_200_2011"
    names = [f"{k:03d}.{photo.title()}_Bird" for k, photo in enumerate(photos, 1)]
    tables: dict[str, list[str]] = {n: [] for n in (
        "images", "image_class_labels", "train_test_split", "bounding_boxes")}
    image_id = 0
    for is_train, count in ((1, per_split[0]), (0, per_split[1])):
        for i in range(count):
            for label, (photo, folder) in enumerate(zip(photos, names, strict=True), 1):
                image_id += 1
                relative = f"{folder}/{folder.split('.')[1]}_{i:04d}_{image_id}.jpg"
                jpeg(base / "images" / relative, photo, rng, size)
                tables["images"].append(f"{image_id} {relative}")
                tables["image_class_labels"].append(f"{image_id} {label}")
                tables["train_test_split"].append(f"{image_id} {is_train}")
                tables["bounding_boxes"].append(f"{image_id} 0.0 0.0 {size[0] / 2:.1f} "
                                                f"{size[1]:.1f}")
    for name, lines in tables.items():
        (base / f"{name}.txt").write_text("\n".join(lines) + "\n")
    (base / "classes.txt").write_text("".join(f"{k} {n}\n" for k, n in enumerate(names, 1)))
    return base


def _annotations(rows: list[tuple[int, int, int, int, int, str]]) -> np.ndarray:
    fields = ("bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2", "class", "fname")
    record = np.empty((1, len(rows)), dtype=[(f, object) for f in fields])
    for i, row in enumerate(rows):
        record[0, i] = tuple(np.array([[v]], dtype=np.uint16) if k < 5 else v
                             for k, v in enumerate(row))
    return record


def stanford_cars_tree(root: Path, *, per_split: tuple[int, int] = (4, 2),
                       photos: tuple[str, ...] = PHOTOS, size: tuple[int, int] = (40, 32),
                       seed: int = 0) -> Path:
    """cars_train/, cars_test/, devkit/cars_train_annos.mat and cars_meta.mat, and
    cars_test_annos_withlabels.mat beside devkit/ (where its separate download lands)."""
    rng = np.random.default_rng(seed)
    class_names = np.array([f"{p.title()} Coupe 2012" for p in photos], dtype=object)
    (root / "devkit").mkdir(parents=True, exist_ok=True)
    savemat(root / "devkit" / "cars_meta.mat", {"class_names": class_names[None]})
    for folder, count, mat in (
            ("cars_train", per_split[0], root / "devkit" / "cars_train_annos.mat"),
            ("cars_test", per_split[1], root / "cars_test_annos_withlabels.mat")):
        rows = []
        for _ in range(count):
            for label, photo in enumerate(photos, 1):
                fname = f"{len(rows) + 1:05d}.jpg"
                jpeg(root / folder / fname, photo, rng, size)
                rows.append((1, 1, size[0] // 2, size[1], label, fname))
        savemat(mat, {"annotations": _annotations(rows)})
    return root


def split_folders_tree(root: Path, *, per_split: tuple[int, int, int] = (4, 2, 2),
                       photos: tuple[str, ...] = PHOTOS, size: tuple[int, int] = (40, 32),
                       seed: int = 0) -> Path:
    """piggyback's packaging: train/<class>/, val/<class>/ (when per_split[1]) and
    test/<class>/."""
    rng = np.random.default_rng(seed)
    for split, count in zip(("train", "val", "test"), per_split, strict=True):
        for photo in photos:
            for i in range(count):
                jpeg(root / split / photo / f"{i:03d}.jpg", photo, rng, size)
    return root
