"""Uploads to input tensors: JPEGs decoded at reduced scale answer like full decodes."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data

from core.backbones.shipped import imagenet_task, load_backbone
from core.engine import CrossbarEngine
from server.errors import ApiError
from server.images import (
    DRAFT_GAP,
    INLINE_DECODE_PIXELS,
    decode_image,
    decodes_inline,
    load_image,
    open_image,
)
from server.runtime import PREPROCESS_IMAGENET, ServedTask, preprocess_for, resize_target

PHOTOS = ("astronaut", "camera", "chelsea", "coffee", "rocket", "hubble_deep_field",
          "immunohistochemistry", "moon", "brick", "grass", "gravel", "colorwheel")
"""scikit-image's bundled photographs (no download)."""
UPSCALE = 4
"""Photos are enlarged to camera size (1200-4000 px) first, so that the reduced decode
engages for a 224-px task as it would for a phone picture."""
PROBABILITY_TOLERANCE = 0.2
"""Largest change of any class probability, reduced against full decode: the size of
change that saving the same photo at JPEG quality 95 instead of 90 causes (up to 0.18)."""
TOP1_MARGIN = 0.1
"""Top-1 must not change where the full decode's top-1 leads the runner-up by this much
(the 4-bit chip flips near-ties on a 2-level pixel change)."""


def jpeg(image: Image.Image, quality: int = 90) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def camera_photo(name: str) -> Image.Image:
    image = Image.fromarray(getattr(data, name)())
    image = image if image.mode in ("RGB", "L") else image.convert("RGB")
    return image.resize((image.width * UPSCALE, image.height * UPSCALE),
                        Image.Resampling.LANCZOS)


def test_large_jpeg_is_decoded_at_reduced_scale_and_png_in_full() -> None:
    big = Image.fromarray(np.random.default_rng(0).integers(0, 256, (1536, 2048, 3),
                                                            dtype=np.uint8))
    reduced = load_image(open_image(jpeg(big), max_pixels=10**8, shorter_side=64))
    assert reduced.size == (512, 384)  # 1/4: the largest scale keeping 4 x 64 px
    assert min(reduced.size) >= DRAFT_GAP * 64
    full = load_image(open_image(jpeg(big), max_pixels=10**8))
    assert full.size == (2048, 1536)
    assert open_image(jpeg(big), max_pixels=10**8, shorter_side=512).size == (2048, 1536)
    buffer = io.BytesIO()
    big.save(buffer, format="PNG")
    assert open_image(buffer.getvalue(), max_pixels=10**8, shorter_side=64).size == big.size
    # the pixel limit is checked on the file's own size, before any reduced decode
    with pytest.raises(ApiError) as error:
        open_image(jpeg(big), max_pixels=2048 * 1536 - 1, shorter_side=64)
    assert error.value.status_code == 413


def test_small_images_decode_inline_and_large_ones_do_not() -> None:
    side = int(INLINE_DECODE_PIXELS ** 0.5)
    small = Image.new("L", (side, side))
    large = Image.new("L", (side + 1, side))
    for image, inline in ((small, True), (large, False)):
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        assert decodes_inline(open_image(buffer.getvalue(), max_pixels=10**8)) is inline


def test_truncated_small_jpeg_is_refused() -> None:
    body = jpeg(Image.fromarray(data.camera()[::8, ::8]))[:300]
    with pytest.raises(ApiError) as error:
        decode_image(body, max_pixels=10**8)
    assert error.value.status_code == 422


@pytest.fixture(scope="module")
def imagenet_chip() -> CrossbarEngine:
    model = load_backbone(None)
    engine = CrossbarEngine(model, max_prepared_tasks=1)
    engine.add_task(imagenet_task(model))
    return engine


def test_reduced_jpeg_decode_keeps_the_chips_imagenet_answers(
        imagenet_chip: CrossbarEngine) -> None:
    torch.manual_seed(0)
    served = ServedTask("imagenet", None, "builtin", 224, PREPROCESS_IMAGENET, ())
    full, reduced, engaged = [], [], 0
    for name in PHOTOS:
        body = jpeg(camera_photo(name))
        full.append(preprocess_for(served, load_image(open_image(body, max_pixels=10**8))))
        opened = open_image(body, max_pixels=10**8, shorter_side=resize_target(served))
        engaged += opened.size != Image.open(io.BytesIO(body)).size
        reduced.append(preprocess_for(served, load_image(opened)))
    assert engaged >= len(PHOTOS) // 2  # the test is about reduced decodes
    logits = imagenet_chip.forward_mixed(torch.stack(full + reduced),
                                         ["imagenet"] * 2 * len(PHOTOS))
    probs = torch.stack(logits).softmax(-1)
    p_full, p_reduced = probs[:len(PHOTOS)], probs[len(PHOTOS):]
    moved = (p_full - p_reduced).abs().amax(-1)
    top2 = p_full.topk(2, -1).values
    for i, name in enumerate(PHOTOS):
        assert float(moved[i]) <= PROBABILITY_TOLERANCE, (name, float(moved[i]))
        if float(top2[i, 0] - top2[i, 1]) >= TOP1_MARGIN:
            assert int(p_full[i].argmax()) == int(p_reduced[i].argmax()), name
