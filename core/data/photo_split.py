"""Image splits that stay on disk: each batch is decoded when asked for.

Training batches get a random resized crop and a flip; evaluation batches are resized and
centre-cropped exactly as ``/predict`` prepares an image, so a task is scored on what it
will be served. Only file names and labels are held, so memory does not grow with the
dataset.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from core.backbones.preprocess import normalise_image, preprocess_image
from core.data.datasets import ImageSplit
from core.errors import ConfigError

__all__ = ["Augmentation", "PhotoSplit", "open_image"]


@dataclass(frozen=True)
class Augmentation:
    """Training-time augmentation of fine-grained photos (torchvision's RandomResizedCrop
    defaults and a horizontal flip, as piggyback trained); recorded with the task."""

    scale: tuple[float, float] = (0.08, 1.0)
    """Share of the image area a crop covers, drawn uniformly."""
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    """Aspect ratio of a crop, drawn log-uniformly."""
    flip: bool = True
    """Mirror half of the crops left-right."""

    def __post_init__(self) -> None:
        lo, hi = self.scale
        if not 0 < lo <= hi <= 1:
            raise ConfigError(f"scale must satisfy 0 < min <= max <= 1, got {self.scale}")
        if not 0 < self.ratio[0] <= self.ratio[1]:
            raise ConfigError(f"ratio must satisfy 0 < min <= max, got {self.ratio}")

    def crop_box(self, width: int, height: int, rng: np.random.Generator
                 ) -> tuple[int, int, int, int]:
        """(left, top, right, bottom) of one random crop, torchvision's algorithm."""
        area = width * height
        log_ratio = (math.log(self.ratio[0]), math.log(self.ratio[1]))
        for _ in range(10):
            target = area * rng.uniform(*self.scale)
            aspect = math.exp(rng.uniform(*log_ratio))
            w = round(math.sqrt(target * aspect))
            h = round(math.sqrt(target / aspect))
            if 0 < w <= width and 0 < h <= height:
                left = int(rng.integers(0, width - w + 1))
                top = int(rng.integers(0, height - h + 1))
                return left, top, left + w, top + h
        aspect = width / height  # fallback: the largest centred crop within the ratio range
        if aspect < self.ratio[0]:
            w, h = width, round(width / self.ratio[0])
        elif aspect > self.ratio[1]:
            w, h = round(height * self.ratio[1]), height
        else:
            w, h = width, height
        left, top = (width - w) // 2, (height - h) // 2
        return left, top, left + w, top + h

    def apply(self, image: Image.Image, size: int, rng: np.random.Generator) -> Image.Image:
        box = self.crop_box(*image.size, rng)
        out = image.resize((size, size), Image.Resampling.BILINEAR, box=box)
        return ImageOps.mirror(out) if self.flip and rng.random() < 0.5 else out


def open_image(path: Path) -> Image.Image:
    try:
        image = Image.open(path)
        image.size  # noqa: B018 - the header is parsed here, pixels later
        return image
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError) as e:
        raise ConfigError(f"cannot read image {path}: {e}") from e


class PhotoSplit(ImageSplit):
    """One split whose images stay on disk until a batch asks for them.

    Args:
        files: resolved image paths.
        labels: class index per image.
        classes: class names.
        image_size: side of the square the backbone sees.
        augment: training augmentation; None decodes for evaluation (resize, centre crop).
        boxes: optional crop box per image, applied before either transform.
        seed: with the indices of a batch, seeds its augmentation, so a resumed run
            draws the crops an uninterrupted one would.
    """

    def __init__(self, files: Sequence[Path], labels: torch.Tensor, classes: Sequence[str],
                 image_size: int, *, augment: Augmentation | None = None,
                 boxes: np.ndarray | None = None, seed: int = 0) -> None:
        if len(files) != len(labels):
            raise ConfigError(f"{len(files)} files but {len(labels)} labels")
        self.files = tuple(files)
        self.labels = labels.to(torch.int64)
        self.classes = list(classes)
        self._side = image_size
        self.augment = augment
        self.boxes = boxes
        self.seed = seed

    def __len__(self) -> int:
        return len(self.files)

    @property
    def image_size(self) -> int:
        return self._side

    def _load(self, i: int, rng: np.random.Generator | None) -> torch.Tensor:
        if self.files[i].resolve() != self.files[i]:  # checked paths must stay link-free
            raise ConfigError(f"{self.files[i]} became a link after the dataset was checked; "
                              "load the dataset again")
        with open_image(self.files[i]) as raw:
            try:
                image = raw.convert("RGB")
            except OSError as e:  # truncated or corrupt pixel data
                raise ConfigError(f"cannot decode image {self.files[i]}: {e}") from e
        if self.boxes is not None:
            left, top, right, bottom = self.boxes[i]
            w, h = image.size
            box = (max(0, int(left)), max(0, int(top)), min(w, math.ceil(right)),
                   min(h, math.ceil(bottom)))
            if box[2] - box[0] >= 2 and box[3] - box[1] >= 2:
                image = image.crop(box)
        if self.augment is None or rng is None:
            return preprocess_image(image, self.image_size)
        return normalise_image(self.augment.apply(image, self.image_size, rng))

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = self.batch([int(index)])
        return x[0], y[0]

    def batch(self, index: slice | torch.Tensor | Sequence[int]
              ) -> tuple[torch.Tensor, torch.Tensor]:
        rows = (list(range(len(self)))[index] if isinstance(index, slice)
                else [int(i) for i in torch.as_tensor(index, dtype=torch.int64).reshape(-1)])
        rng = None
        if self.augment is not None:
            digest = zlib.crc32(np.asarray(rows, dtype=np.int64).tobytes())
            rng = np.random.default_rng([self.seed, digest, len(rows)])
        if not rows:
            empty = torch.empty(0, 3, self.image_size, self.image_size)
            return empty, self.labels[:0]
        x = torch.stack([self._load(i, rng) for i in rows])
        return x, self.labels[torch.as_tensor(rows, dtype=torch.int64)]

    def class_counts(self) -> list[int]:
        return torch.bincount(self.labels, minlength=len(self.classes)).tolist()
