"""Preprocessing by table lookup equals the element-wise float pipeline bit for bit."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from core.backbones.preprocess import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    imagenet_resize_size,
    normalise_image,
    preprocess_fit,
    preprocess_image,
)

MODES = ("L", "RGB", "RGBA", "P", "LA", "1", "I;16")


def _elementwise(rgb: Image.Image) -> torch.Tensor:
    """The reference: float32 image, divide, subtract the mean, divide by the std."""
    arr = np.asarray(rgb, dtype=np.float32) / 255.0
    arr = (arr - np.asarray(IMAGENET_MEAN, dtype=np.float32)) / np.asarray(
        IMAGENET_STD, dtype=np.float32)
    return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))


def _reference_imagenet(image: Image.Image, size: int) -> torch.Tensor:
    rgb = image.convert("RGB")
    w, h = rgb.size
    target = imagenet_resize_size(size)
    new = (target, int(target * h / w)) if w <= h else (int(target * w / h), target)
    if new != (w, h):
        rgb = rgb.resize(new, Image.Resampling.BILINEAR)
    left, top = round((new[0] - size) / 2.0), round((new[1] - size) / 2.0)
    return _elementwise(rgb.crop((left, top, left + size, top + size)))


def _reference_fit(image: Image.Image, size: int) -> torch.Tensor:
    rgb = image.convert("RGB")
    return _elementwise(ImageOps.fit(rgb, (size, size), Image.Resampling.BILINEAR))


def _png(mode: str, width: int, height: int, seed: int) -> Image.Image:
    """A decoded PNG of ``mode`` with noise and a gradient (every level in use)."""
    rng = np.random.default_rng(seed)
    ramp = np.linspace(0, 255, width)[None, :, None]
    rgb = (ramp * 0.5 + rng.random((height, width, 3)) * 128).clip(0, 255).astype(np.uint8)
    if mode == "I;16":
        image = Image.fromarray(rgb[..., 0].astype(np.uint16) * 257)
    elif mode == "P":
        image = Image.fromarray(rgb).quantize(64)
    else:
        image = Image.fromarray(rgb).convert(mode)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    decoded = Image.open(io.BytesIO(buffer.getvalue()))
    decoded.load()
    return decoded


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(("width", "height", "size"),
                         [(64, 64, 64), (65, 47, 32), (300, 200, 64), (28, 28, 64),
                          (17, 90, 16), (257, 300, 224)])
def test_png_preprocessing_is_bit_equal_to_the_elementwise_pipeline(
        mode: str, width: int, height: int, size: int) -> None:
    image = _png(mode, width, height, seed=width * 31 + height)
    fit = preprocess_fit(image, size)
    assert fit.dtype == torch.float32 and fit.is_contiguous()
    assert torch.equal(fit, _reference_fit(image, size))
    assert torch.equal(preprocess_image(image, size), _reference_imagenet(image, size))


def test_every_level_of_every_channel_normalises_like_the_float_pipeline() -> None:
    levels = np.arange(256, dtype=np.uint8)
    rgb = Image.fromarray(np.stack([levels, levels[::-1], np.roll(levels, 7)], -1)[None])
    assert torch.equal(normalise_image(rgb), _elementwise(rgb))
    grey = Image.fromarray(levels[None])
    assert torch.equal(normalise_image(grey), _elementwise(grey.convert("RGB")))
