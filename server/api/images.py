"""Input images: uploaded bytes to the model's channels and size, refused with a 422 naming the
field when they cannot be.

The rule, documented in the README: PNG, JPEG or WebP, at most MAX_UPLOAD_BYTES and
MAX_PIXELS (Pillow reads the size from the header first, so a decompression bomb is refused
before it is decoded); converted to grayscale ("L") for a 1-channel model or RGB for a
3-channel one (transparency dropped); a picture of another size is scaled to cover the model's
size and centre-cropped (Lanczos). A mask is a PNG of the image's size whose fully transparent
pixels (alpha = 0) are the area to regenerate, OpenAI's convention; it takes the same crop.
"""

from __future__ import annotations

import io
import warnings

from PIL import Image, ImageOps, UnidentifiedImageError

from server.api.errors import ApiError
from server.contract.sources import Picture

FORMATS = ("PNG", "JPEG", "WEBP")
MAX_UPLOAD_BYTES = 4 * 1024 * 1024  # OpenAI's limit for image edits and variations
MAX_PIXELS = 4096 * 4096
MODES = {1: "L", 3: "RGB"}


def invalid(field: str, message: str) -> ApiError:
    return ApiError(422, "invalid_request", f"{field}: {message}")


def open_image(field: str, data: bytes) -> Image.Image:
    if not data:
        raise invalid(field, "an image file is required")
    if len(data) > MAX_UPLOAD_BYTES:
        raise invalid(field, f"the file is {len(data)} bytes; the limit is {MAX_UPLOAD_BYTES}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=FORMATS)
            width, height = image.size
            if width * height > MAX_PIXELS:
                raise invalid(field, f"{width}x{height} pixels; the limit is {MAX_PIXELS} pixels")
            image.load()
    except (UnidentifiedImageError, Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise invalid(field, f"not a readable {', '.join(FORMATS)} image ({exc})") from exc
    except (OSError, ValueError, SyntaxError) as exc:  # truncated or corrupt data
        raise invalid(field, f"the image cannot be decoded ({exc})") from exc
    return image


def fit(image: Image.Image, size: tuple[int, int], resample: Image.Resampling) -> Image.Image:
    return image if image.size == size else ImageOps.fit(image, size, method=resample)


def picture(field: str, data: bytes, shape: tuple[int, int, int]) -> Picture:
    """`data` (an upload) as a Picture of `shape` = (C, H, W)."""
    return as_picture(open_image(field, data), shape)


def as_picture(image: Image.Image, shape: tuple[int, int, int]) -> Picture:
    """An opened image as a Picture of `shape` = (C, H, W); for callers that also need its size or alpha."""
    channels, height, width = shape
    image = fit(image.convert(MODES[channels]), (width, height), Image.Resampling.LANCZOS)
    if channels == 1:
        return Picture(image.tobytes(), shape)
    planes = b"".join(band.tobytes() for band in image.split())  # HWC -> CHW
    return Picture(planes, shape)


def keep_mask(field: str, data: bytes, image_size: tuple[int, int], shape: tuple[int, int, int]) -> bytes:
    """One byte per model pixel: 1 where the input is kept, 0 where the mask is fully transparent.
    `image_size` is the input image's own (width, height), before it is fitted to the model."""
    mask = open_image(field, data)
    if mask.size != image_size:
        raise invalid(field, f"the mask is {mask.size[0]}x{mask.size[1]}, the image {image_size[0]}x{image_size[1]}; "
                             "they must be the same size")
    return alpha_keep(mask, shape)


def own_alpha_keep(field: str, image: Image.Image, shape: tuple[int, int, int]) -> bytes:
    """OpenAI's rule without a mask: the image's own transparent pixels are the area to edit."""
    if "A" not in image.getbands() and "transparency" not in image.info:
        raise invalid(field, "without a mask the image must have transparent pixels to regenerate")
    return alpha_keep(image, shape)


def alpha_keep(image: Image.Image, shape: tuple[int, int, int]) -> bytes:
    _, height, width = shape
    alpha = fit(image.convert("RGBA").getchannel("A"), (width, height), Image.Resampling.NEAREST)
    return bytes(0 if a == 0 else 1 for a in alpha.tobytes())
