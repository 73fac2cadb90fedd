"""ImageNet evaluation preprocessing, matching torchvision's Resize/CenterCrop/Normalize.

Implemented with PIL + numpy because torchvision is not a dependency; the pretrained
weights only reach their published accuracy with exactly this pipeline.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image, ImageOps
from torch import Tensor

from core.errors import ConfigError

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "normalise_image", "preprocess_fit",
           "preprocess_image"]

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
_RESIZE_RATIO = 256 / 224


def _resize_shorter(image: Image.Image, target: int) -> Image.Image:
    # Same rounding as torchvision: shorter side -> target, longer side truncated.
    w, h = image.size
    if w <= h:
        new_w, new_h = target, int(target * h / w)
    else:
        new_w, new_h = int(target * w / h), target
    if (new_w, new_h) == (w, h):
        return image
    # PIL's bilinear widens its kernel when shrinking, i.e. it is antialiased.
    return image.resize((new_w, new_h), Image.Resampling.BILINEAR)


def _center_crop(image: Image.Image, size: int) -> Image.Image:
    w, h = image.size
    if w < size or h < size:
        raise ConfigError(f"image {w}x{h} is smaller than the {size}px crop after resizing")
    left = round((w - size) / 2.0)
    top = round((h - size) / 2.0)
    return image.crop((left, top, left + size, top + size))


def preprocess_image(image: Image.Image, size: int = 224) -> Tensor:
    """PIL image -> normalised float32 tensor ``[3, size, size]`` for ImageNet backbones."""
    _check_size(size)
    rgb = image.convert("RGB")  # greyscale and palette images get replicated/expanded
    return _normalise(_center_crop(_resize_shorter(rgb, round(size * _RESIZE_RATIO)), size))


def preprocess_fit(image: Image.Image, size: int) -> Tensor:
    """Like :func:`preprocess_image` but the centre square is resized to ``size`` (no margin).

    This is how task datasets are read (image folders are fitted the same way, and the
    built-in datasets are square), so a task sees its images at inference as in training.
    """
    _check_size(size)
    fitted = ImageOps.fit(image.convert("RGB"), (size, size), Image.Resampling.BILINEAR)
    return _normalise(fitted)


def _check_size(size: int) -> None:
    if not isinstance(size, int) or isinstance(size, bool) or size <= 0:
        raise ConfigError(f"size must be a positive int, got {size!r}")


def normalise_image(rgb: Image.Image) -> Tensor:
    """An RGB image already at its final size -> normalised ``[3, H, W]`` (training crops)."""
    return _normalise(rgb)


def _normalise(rgb: Image.Image) -> Tensor:
    arr = np.asarray(rgb, dtype=np.float32) / 255.0
    mean = np.asarray(IMAGENET_MEAN, dtype=np.float32)
    std = np.asarray(IMAGENET_STD, dtype=np.float32)
    arr = (arr - mean) / std
    return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))
