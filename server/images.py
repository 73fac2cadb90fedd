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


def decode_image(data: bytes, *, max_pixels: int) -> Image.Image:
    """Bytes of a JPEG/PNG/WebP/BMP/GIF/TIFF/PPM file -> a fully decoded PIL image.

    Raises ApiError 415 (not an image in an accepted format), 413 (more than
    ``max_pixels`` pixels, checked from the header before decoding) or 422 (a truncated or
    corrupt file).
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
    try:
        image.load()
    except (OSError, SyntaxError, ValueError) as e:
        raise ApiError(422, f"the image is truncated or corrupt: {e}") from e
    return image
