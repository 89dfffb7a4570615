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
from service.errors import (
    EMPTY_IMAGE,
    IMAGE_TOO_LARGE,
    UNDECODABLE_IMAGE,
    UNSUPPORTED_IMAGE_FORMAT,
    ServiceError,
)

ACCEPTED_FORMATS = ("PNG", "JPEG", "GIF", "BMP", "TIFF", "WEBP")


def open_image(data: bytes, max_pixels: int) -> Image.Image:
    """Identify `data` and check its size from the header alone; no pixel is decoded yet.

    Raises ServiceError: undecodable_image (400), image_too_large (413), unsupported_image_format (415).
    """
    if not data:
        raise ServiceError("the image is empty (0 bytes)", EMPTY_IMAGE)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data), formats=ACCEPTED_FORMATS)
    except UnidentifiedImageError:
        raise _unidentified(data) from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ServiceError(f"the image has more than {max_pixels} pixels", IMAGE_TOO_LARGE) from None
    except Exception as exc:  # a malformed header can raise nearly anything in a decoder
        raise ServiceError(f"the image header cannot be read: {exc}", UNDECODABLE_IMAGE) from None
    if im.width * im.height > max_pixels:
        raise ServiceError(f"the image is {im.width}x{im.height}; the limit is {max_pixels} pixels", IMAGE_TOO_LARGE)
    return im


def _load(im: Image.Image, max_pixels: int) -> Image.Image:
    """Decode the pixels of an opened image (its first frame) and apply its EXIF orientation."""
    try:
        im.seek(0)
        im.load()
        return upright(im)
    except Image.DecompressionBombError:
        raise ServiceError(f"the image has more than {max_pixels} pixels", IMAGE_TOO_LARGE) from None
    except Exception as exc:  # untrusted bytes: any decoder error is the client's
        raise ServiceError(f"the {im.format} image cannot be decoded: {exc}", UNDECODABLE_IMAGE) from None


def _unidentified(data: bytes) -> ServiceError:
    """400 for bytes that are no image at all; 415 for an image format we do not accept."""
    try:
        other = Image.open(io.BytesIO(data))  # identifies only; decodes nothing
        fmt = other.format
    except Exception:  # any failure here means "not an image we know"
        fmt = None
    if fmt:
        accepted = ", ".join(ACCEPTED_FORMATS)
        return ServiceError(f"{fmt} images are not accepted; use one of {accepted}", UNSUPPORTED_IMAGE_FORMAT)
    return ServiceError("the body is not a decodable image", UNDECODABLE_IMAGE)


def finish_image(im: Image.Image, spec: InputSpec, transform: Preprocess, max_pixels: int) -> torch.Tensor:
    """An image from `open_image` → normalised C×H×W float tensor for the model described by `spec`."""
    im = _load(im, max_pixels)
    try:
        return transform(im)
    except Exception as exc:  # e.g. a mode Pillow can open but not convert
        raise ServiceError(f"the {im.format} {im.mode} image cannot be converted: {exc}", UNDECODABLE_IMAGE) from None


def decode_image(data: bytes, spec: InputSpec, transform: Preprocess, max_pixels: int) -> torch.Tensor:
    """Bytes → normalised C×H×W float tensor for the model described by `spec`."""
    return finish_image(open_image(data, max_pixels), spec, transform, max_pixels)
