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

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "imagenet_resize_size", "normalise_image",
           "preprocess_fit", "preprocess_image"]

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
_RESIZE_RATIO = 256 / 224


def imagenet_resize_size(size: int) -> int:
    """What :func:`preprocess_image` resizes the shorter side to before its ``size`` crop."""
    return round(size * _RESIZE_RATIO)


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
    # greyscale and palette images get replicated/expanded; L stays one band until
    # normalised (PIL resamples each band alike, so this is the same as converting first)
    rgb = _rgb_or_grey(image)
    return _normalise(_center_crop(_resize_shorter(rgb, imagenet_resize_size(size)), size))


def preprocess_fit(image: Image.Image, size: int) -> Tensor:
    """Like :func:`preprocess_image` but the centre square is resized to ``size`` (no margin).

    This is how task datasets are read (image folders are fitted the same way, and the
    built-in datasets are square), so a task sees its images at inference as in training.
    """
    _check_size(size)
    fitted = ImageOps.fit(_rgb_or_grey(image), (size, size), Image.Resampling.BILINEAR)
    return _normalise(fitted)


def _check_size(size: int) -> None:
    if not isinstance(size, int) or isinstance(size, bool) or size <= 0:
        raise ConfigError(f"size must be a positive int, got {size!r}")


def normalise_image(rgb: Image.Image) -> Tensor:
    """An RGB image already at its final size -> normalised ``[3, H, W]`` (training crops)."""
    return _normalise(_rgb_or_grey(rgb))


def _rgb_or_grey(image: Image.Image) -> Image.Image:
    """``image`` itself when it is RGB or greyscale (L), else converted to RGB."""
    return image if image.mode in ("RGB", "L") else image.convert("RGB")


def _levels() -> np.ndarray:
    """``[3, 256]``: each channel's normalised value of every 8-bit level, computed with the
    same float32 operations, in the same order, as normalising an image element-wise, so a
    lookup gives bit-equal results."""
    levels = np.arange(256, dtype=np.float32)[:, None] / 255.0
    mean = np.asarray(IMAGENET_MEAN, dtype=np.float32)
    std = np.asarray(IMAGENET_STD, dtype=np.float32)
    return np.ascontiguousarray(((levels - mean) / std).T)


_LEVELS = _levels()


def _normalise(image: Image.Image) -> Tensor:
    """An RGB or L image -> ``[3, H, W]`` float32 by table lookup (one pass, no float
    image in between; an L image gives the three channels of its one band)."""
    arr = np.asarray(image)
    out = np.empty((3, *arr.shape[:2]), dtype=np.float32)
    for c in range(3):
        np.take(_LEVELS[c], arr if arr.ndim == 2 else arr[..., c], out=out[c])
    return torch.from_numpy(out)
