"""Unlabeled images for calibrating and distilling the frozen backbone offline.

The photos that scikit-image bundles are the only natural colour images that
install offline here; random resized crops, flips and colour jitter of them
give as many distinct calibration inputs as needed, deterministically per seed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from core.backbones.preprocess import IMAGENET_MEAN, IMAGENET_STD
from core.errors import ResourceUnavailable

# Photos scikit-image bundles in its wheel (others need a download through pooch).
# The agreement photos are held out of calibration so the fidelity report is fair.
AGREEMENT_PHOTOS = ("chelsea", "coffee", "astronaut", "rocket", "horse", "clock")
CALIBRATION_PHOTOS = (
    "hubble_deep_field", "immunohistochemistry", "retina", "colorwheel", "logo",
    "motorcycle_left", "camera", "brick", "grass", "gravel", "coins", "moon", "page", "text",
)


def load_photo(name: str) -> Tensor:
    """One bundled photo as float RGB ``[3, H, W]`` in [0, 1]."""
    try:
        import skimage.data
    except ImportError as e:
        raise ResourceUnavailable(
            "calibration photos need scikit-image: pip install scikit-image"
        ) from e
    if name == "motorcycle_left":
        array = skimage.data.stereo_motorcycle()[0]
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


def calibration_images(
    count: int, size: int, seed: int = 0, photos: tuple[str, ...] = CALIBRATION_PHOTOS,
) -> Tensor:
    """``count`` augmented crops ``[count, 3, size, size]``, ImageNet-normalised."""
    generator = torch.Generator().manual_seed(seed)
    sources = [load_photo(p) for p in photos]
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
