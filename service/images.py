"""Decoding client images into the tensor the model expects, safely.

Pillow is restricted to a few well-known formats; the pixel count is checked from the header
before any pixel is decoded (Pillow's own decompression-bomb guard stays on as well); EXIF
orientation is applied; the first frame of animations and multi-page files is used; the image
is converted to the manifest's colour mode and size and normalised with its mean/std.
"""

from __future__ import annotations

import io
import warnings

import torch
from PIL import Image, UnidentifiedImageError

from models.artifact import InputSpec
from models.preprocess import Preprocess, upright

ACCEPTED_FORMATS = ("PNG", "JPEG", "GIF", "BMP", "TIFF", "WEBP")


class ImageRejected(Exception):
    """An image that cannot be classified; `status` and `code` go into the HTTP error."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


def open_image(data: bytes, max_pixels: int) -> Image.Image:
    """Identify `data` and check its size from the header alone; no pixel is decoded yet.

    Raises ImageRejected with the right status (400 not an image, 413 too large, 415 a format we
    do not accept).
    """
    if not data:
        raise ImageRejected(400, "empty_image", "the image is empty (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data), formats=ACCEPTED_FORMATS)
    except UnidentifiedImageError:
        raise ImageRejected(*_unidentified(data)) from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageRejected(413, "image_too_large", f"the image has more than {max_pixels} pixels") from None
    except Exception as exc:  # noqa: BLE001 - a malformed header can raise nearly anything in a decoder
        raise ImageRejected(400, "undecodable_image", f"the image header cannot be read: {exc}") from None
    if im.width * im.height > max_pixels:
        raise ImageRejected(
            413, "image_too_large", f"the image is {im.width}x{im.height}; the limit is {max_pixels} pixels"
        )
    return im


def _load(im: Image.Image, max_pixels: int) -> Image.Image:
    """Decode the pixels of an opened image (its first frame) and apply its EXIF orientation."""
    try:
        im.seek(0)
        im.load()
        return upright(im)
    except Image.DecompressionBombError:
        raise ImageRejected(413, "image_too_large", f"the image has more than {max_pixels} pixels") from None
    except Exception as exc:  # noqa: BLE001 - see above: untrusted bytes, any decoder error is the client's
        raise ImageRejected(400, "undecodable_image", f"the {im.format} image cannot be decoded: {exc}") from None


def _unidentified(data: bytes) -> tuple[int, str, str]:
    """400 for bytes that are no image at all; 415 for an image format we do not accept."""
    try:
        other = Image.open(io.BytesIO(data))  # identifies only; decodes nothing
        fmt = other.format
    except Exception:  # noqa: BLE001 - any failure here means "not an image we know"
        fmt = None
    if fmt:
        accepted = ", ".join(ACCEPTED_FORMATS)
        return 415, "unsupported_image_format", f"{fmt} images are not accepted; use one of {accepted}"
    return 400, "undecodable_image", "the body is not a decodable image"


def finish_image(im: Image.Image, spec: InputSpec, transform: Preprocess, max_pixels: int) -> torch.Tensor:
    """An image from `open_image` → normalised C×H×W float tensor for the model described by `spec`."""
    im = _load(im, max_pixels)
    try:
        return transform(im)
    except Exception as exc:  # noqa: BLE001 - e.g. a mode Pillow can open but not convert
        raise ImageRejected(
            400, "undecodable_image", f"the {im.format} {im.mode} image cannot be converted: {exc}"
        ) from None


def decode_image(data: bytes, spec: InputSpec, transform: Preprocess, max_pixels: int) -> torch.Tensor:
    """Bytes → normalised C×H×W float tensor for the model described by `spec`."""
    return finish_image(open_image(data, max_pixels), spec, transform, max_pixels)
