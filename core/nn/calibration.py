"""Unlabeled images for calibrating and distilling the frozen backbone offline.

The photos that scikit-image bundles are the only natural colour images that
install offline here; random resized crops, flips and colour jitter of them
give as many distinct calibration inputs as needed, deterministically per seed.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from core.backbones.preprocess import IMAGENET_MEAN, IMAGENET_STD
from core.errors import ResourceUnavailable

# Photos scikit-image bundles in its wheel (others need a download through pooch).
# The agreement photos are held out of calibration (and of every training on photo crops)
# so the fidelity report is fair.
AGREEMENT_PHOTOS = ("chelsea", "coffee", "astronaut", "rocket", "horse", "clock")
CALIBRATION_PHOTOS = (
    "hubble_deep_field", "immunohistochemistry", "retina", "colorwheel", "logo",
    "motorcycle_left", "camera", "brick", "grass", "gravel", "coins", "moon", "page", "text",
)
NATURAL_PHOTOS = ("china", "flower", "grace_hopper")
"""Natural photos that other installed packages bundle (scikit-learn's two sample images,
matplotlib's portrait of Grace Hopper). The backbone is not calibrated on them (its
calibration set stays as it was); the ImageNet task's distillation adds them to the
calibration photos, whose microscopy, texture and text crops are far from the agreement
photos' objects."""


def load_photo(name: str) -> Tensor:
    """One bundled photo (:data:`CALIBRATION_PHOTOS`, :data:`AGREEMENT_PHOTOS`,
    :data:`NATURAL_PHOTOS`) as float RGB ``[3, H, W]`` in [0, 1]."""
    try:
        import skimage.data
    except ImportError as e:
        raise ResourceUnavailable(
            "calibration photos need scikit-image: pip install scikit-image"
        ) from e
    if name == "motorcycle_left":
        array = skimage.data.stereo_motorcycle()[0]
    elif name in ("china", "flower"):
        from sklearn.datasets import load_sample_image

        array = np.array(load_sample_image(f"{name}.jpg"))  # a writable copy
    elif name == "grace_hopper":
        import matplotlib
        from PIL import Image

        path = Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"
        with Image.open(path) as photo:
            array = np.array(photo.convert("RGB"))
    else:
        array = getattr(skimage.data, name)()
    image = torch.as_tensor(array)
    if image.dim() == 2:
        image = image[..., None].expand(-1, -1, 3)
    image = image[..., :3].permute(2, 0, 1).float()
    image = image / 255.0 if image.max() > 1.0 else image
    scale = 512 / max(image.shape[1:])
    if scale < 1:  # crops never need more than 512 px of source
        size = (round(image.shape[1] * scale), round(image.shape[2] * scale))
        image = F.interpolate(image[None], size=size, mode="bilinear", antialias=True)[0]
    return image


def normalize(images: Tensor) -> Tensor:
    mean = torch.tensor(IMAGENET_MEAN).reshape(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).reshape(1, 3, 1, 1)
    return (images - mean) / std


def augmented_crops(sources: Sequence[Tensor], count: int, size: int,
                    generator: torch.Generator) -> Tensor:
    """``count`` random resized crops of ``sources`` (photos from :func:`load_photo`),
    flipped, colour-jittered and sometimes greyed, ``[count, 3, size, size]``,
    ImageNet-normalised; the draws come from ``generator`` alone."""
    out = torch.empty(count, 3, size, size)
    for i in range(count):
        image = sources[int(torch.randint(len(sources), (1,), generator=generator))]
        _, h, w = image.shape
        area = float(torch.empty(1).uniform_(0.08, 1.0, generator=generator)) * h * w
        aspect = float(torch.exp(torch.empty(1).uniform_(-0.29, 0.29, generator=generator)))
        ch = max(8, min(h, round((area / aspect) ** 0.5)))
        cw = max(8, min(w, round((area * aspect) ** 0.5)))
        top = int(torch.randint(h - ch + 1, (1,), generator=generator))
        left = int(torch.randint(w - cw + 1, (1,), generator=generator))
        crop = image[:, top : top + ch, left : left + cw].unsqueeze(0)
        crop = F.interpolate(crop, size=(size, size), mode="bilinear", antialias=True,
                             align_corners=False)[0]
        if bool(torch.rand(1, generator=generator) < 0.5):
            crop = crop.flip(-1)
        jitter = 1 + 0.4 * (torch.rand(3, 1, 1, generator=generator) - 0.5)
        if bool(torch.rand(1, generator=generator) < 0.2):
            crop = crop.mean(0, keepdim=True).expand(3, -1, -1)
        out[i] = (crop * jitter).clamp(0, 1)
    return normalize(out)


def calibration_images(
    count: int, size: int, seed: int = 0, photos: tuple[str, ...] = CALIBRATION_PHOTOS,
) -> Tensor:
    """``count`` augmented crops ``[count, 3, size, size]``, ImageNet-normalised."""
    generator = torch.Generator().manual_seed(seed)
    return augmented_crops([load_photo(p) for p in photos], count, size, generator)


AGREEMENT_CROPS = 200
"""Held-out crops of :data:`AGREEMENT_PHOTOS` that ``xma2 fidelity`` scores agreement on."""
AGREEMENT_SEED_OFFSET = 1000
"""Their seed is the run's seed plus this (so no calibration draw of a run repeats them)."""


def agreement_crops(count: int = AGREEMENT_CROPS, size: int = 224, seed: int = 0) -> Tensor:
    """The held-out crops top-1 agreement with fp32 is measured on (never trained on)."""
    return calibration_images(count, size, seed=seed + AGREEMENT_SEED_OFFSET,
                              photos=AGREEMENT_PHOTOS)
