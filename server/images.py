"""Request bodies to images: decoded with limits, so a hostile image costs nothing."""

from __future__ import annotations

import base64
import binascii
import io
import warnings

from PIL import Image, UnidentifiedImageError

from server.errors import ApiError

ACCEPTED_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF", "PPM")


def decode_base64(data: str) -> bytes:
    if data.startswith("data:") and "," in data:  # a data URL
        data = data.split(",", 1)[1]
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as e:
        raise ApiError(422, f"image_base64 is not valid base64: {e}") from e


INLINE_DECODE_PIXELS = 256 * 256
"""Images of at most this many pixels (after a JPEG's reduced-scale decode) are decoded and
preprocessed on the event loop: well under a millisecond, cheaper than handing them to a
worker thread and back. Larger ones go to a thread so they never stall other requests."""

DRAFT_GAP = 4
"""A JPEG is decoded at 1/2, 1/4 or 1/8 scale only while its shorter side stays at least
this many times what preprocessing resizes it to, so the antialiased resize that follows
still does most of the shrinking (a gap of 2, PIL's ``thumbnail`` default, moved the
chip's ImageNet probabilities up to 0.21 on camera-sized photos; 4 keeps them within
0.16, docs/performance.md#request-path). A 12-megapixel photo decodes at 1/2 scale for
a 224-px task and at 1/8 for a 64-px one."""


def decode_image(data: bytes, *, max_pixels: int) -> Image.Image:
    """Bytes of a JPEG/PNG/WebP/BMP/GIF/TIFF/PPM file -> a fully decoded PIL image.

    Raises ApiError 415 (not an image in an accepted format), 413 (more than
    ``max_pixels`` pixels, checked from the header before decoding) or 422 (a truncated or
    corrupt file).
    """
    return load_image(open_image(data, max_pixels=max_pixels))


def open_image(data: bytes, *, max_pixels: int, shorter_side: int | None = None
               ) -> Image.Image:
    """Bytes of an image file -> a PIL image whose header is read and checked, its pixels
    not yet decoded (:func:`load_image` does that).

    ``shorter_side``: the size preprocessing will resize the shorter side to; a JPEG is
    then set to decode at the smallest DCT scale that keeps :data:`DRAFT_GAP` times that
    (PNG and the other formats always decode in full). Raises like :func:`decode_image`.
    """
    if not data:
        raise ApiError(422, "the request holds no image: send the file as the body, as a "
                            "multipart field 'file', or as JSON {\"image_base64\": ...}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=ACCEPTED_FORMATS)
    except UnidentifiedImageError as e:
        raise ApiError(415, "the body is not an image in a supported format "
                            f"({', '.join(ACCEPTED_FORMATS)})") from e
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ApiError(413, f"image too large to decode: {e}") from e
    except OSError as e:
        raise ApiError(422, f"cannot read the image: {e}") from e
    width, height = image.size
    if width * height > max_pixels:
        raise ApiError(413, f"image of {width}x{height} pixels exceeds the limit of "
                            f"{max_pixels:,} pixels; send a smaller image")
    if width < 1 or height < 1:
        raise ApiError(422, f"image of {width}x{height} pixels is empty")
    if shorter_side is not None and image.format == "JPEG":
        keep = DRAFT_GAP * shorter_side
        image.draft(image.mode, (keep, keep))  # a no-op unless both sides allow a scale
    return image


def decodes_inline(image: Image.Image) -> bool:
    """Whether ``image`` (opened, not loaded) is small enough to decode on the event loop."""
    width, height = image.size
    return width * height <= INLINE_DECODE_PIXELS


def load_image(image: Image.Image) -> Image.Image:
    """Decode the pixels of an opened image; 422 when the file is truncated or corrupt."""
    try:
        image.load()
    except (OSError, SyntaxError, ValueError) as e:
        raise ApiError(422, f"the image is truncated or corrupt: {e}") from e
    return image
