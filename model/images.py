"""Safe image decoding shared by the indexer (gallery files) and the service (uploads).

Every image that reaches the model goes through :func:`open_image`: the format is checked
from the content (never the file name), the pixel count from the header *before* decoding
(decompression bombs), EXIF orientation is applied and every mode is converted to RGB.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

# Formats we decode. MPO is what Pillow calls multi-picture JPEGs from phone cameras.
ALLOWED_FORMATS: frozenset[str] = frozenset({"JPEG", "MPO", "PNG", "WEBP", "GIF", "BMP", "TIFF"})
DEFAULT_MAX_PIXELS = 40_000_000

# Signatures of formats Pillow cannot (or must not) decode, so they are reported as
# "unsupported" (HTTP 415) rather than "not an image" (HTTP 400).
_UNSUPPORTED_SIGNATURES: tuple[tuple[bytes, str], ...] = (
    (b"%PDF", "PDF"),
    (b"%!PS", "EPS"),
    (b"\xc5\xd0\xd3\xc6", "EPS"),
    (b"8BPS", "PSD"),
)


class ImageError(ValueError):
    """Base class: an input that cannot be used as an image. ``reason`` is a short slug."""

    reason = "invalid_image"


class NotAnImageError(ImageError):
    reason = "not_an_image"


class CorruptImageError(ImageError):
    reason = "corrupt_image"


class UnsupportedFormatError(ImageError):
    reason = "unsupported_format"


class TooManyPixelsError(ImageError):
    reason = "too_many_pixels"


def sniff_unsupported(head: bytes) -> str | None:
    """Name of a known-but-unsupported format from the first bytes of a file, else None."""
    for signature, name in _UNSUPPORTED_SIGNATURES:
        if head.startswith(signature):
            return name
    text = head[:1024].lstrip().lower()
    if text.startswith((b"<?xml", b"<svg", b"<!doctype svg")) and b"<svg" in text:
        return "SVG"
    return None


def open_image(
    source: bytes | str | Path | BinaryIO,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_side: int | None = None,
) -> Image.Image:
    """Decode ``source`` into a fully loaded RGB image, upright per its EXIF orientation.

    Raises a subclass of :class:`ImageError` naming the problem: not an image, corrupt or
    truncated, a format outside :data:`ALLOWED_FORMATS`, or more than ``max_pixels`` pixels
    (checked from the header, before any pixel is decoded). Animated GIFs give their first frame.
    ``max_side`` lets a JPEG decode at a reduced scale (DCT scaling, at least that many pixels a
    side), so a large photo never exists in memory at full size; other formats are unaffected.
    """
    if isinstance(source, bytes):
        stream: BinaryIO = io.BytesIO(source)
    elif isinstance(source, (str, Path)):
        stream = open(source, "rb")  # noqa: SIM115 - closed in finally
    else:
        stream = source
    try:
        head = stream.read(2048)
        if not head:
            raise NotAnImageError("empty file (0 bytes)")
        stream.seek(0)
        unsupported = sniff_unsupported(head)
        if unsupported:
            raise UnsupportedFormatError(
                f"unsupported image format {unsupported}; allowed: {sorted(ALLOWED_FORMATS)}"
            )
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            try:
                image: Image.Image = Image.open(stream, formats=None)
            except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
                raise TooManyPixelsError(f"image exceeds the pixel limit: {exc}") from exc
            except UnidentifiedImageError as exc:
                raise NotAnImageError("content is not a recognised image") from exc
            if image.format not in ALLOWED_FORMATS:
                raise UnsupportedFormatError(
                    f"unsupported image format {image.format}; allowed: {sorted(ALLOWED_FORMATS)}"
                )
            width, height = image.size
            if width * height > max_pixels:
                raise TooManyPixelsError(
                    f"image is {width}x{height} = {width * height} pixels; "
                    f"the limit is {max_pixels}"
                )
            try:
                image.seek(0)  # first frame of animations
                if max_side is not None and image.format in ("JPEG", "MPO"):
                    image.draft("RGB", (max_side, max_side))
                image.load()
                image = ImageOps.exif_transpose(image) or image
                return to_rgb(image)
            except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
                raise TooManyPixelsError(f"image exceeds the pixel limit: {exc}") from exc
            except (OSError, SyntaxError, ValueError, EOFError) as exc:
                raise CorruptImageError(
                    f"corrupt or truncated {image.format} image: {exc}"
                ) from exc
    finally:
        if isinstance(source, (str, Path)):
            stream.close()


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any Pillow mode (1, L, P with transparency, RGBA, CMYK, I;16, I, F…) to RGB.

    Transparent pixels are composited on white, which is how a browser shows them.
    """
    if image.mode == "RGB":
        return image
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        array = np.asarray(image, dtype=np.float64)
        low, high = float(array.min()), float(array.max())
        scaled = (array - low) / (high - low) * 255.0 if high > low else np.zeros_like(array)
        return Image.fromarray(scaled.astype(np.uint8), mode="L").convert("RGB")
    if image.mode == "P" or image.mode == "LA" or image.mode == "PA":
        image = image.convert("RGBA")
    if image.mode == "RGBA":
        background = Image.new("RGB", image.size, (255, 255, 255))
        background.paste(image, mask=image.getchannel("A"))
        return background
    return image.convert("RGB")


def preprocess_image(processor: object, image: Image.Image) -> np.ndarray:
    """Run a checkpoint's image processor on one RGB image: float32 ``(3, H, W)``.

    Picklable inputs and output, so the indexer runs it in decoding worker processes;
    :func:`collate_pixels` pads a list of these into a batch.
    """
    encoded = processor(images=[image], return_tensors="np")  # type: ignore[operator]
    pixel_values: np.ndarray = encoded["pixel_values"][0]
    mask = encoded.get("pixel_mask")
    if mask is not None:  # the processor pads to a multiple of its size divisor; crop that off
        rows = np.flatnonzero(mask[0].any(axis=1))
        cols = np.flatnonzero(mask[0].any(axis=0))
        pixel_values = pixel_values[:, : rows[-1] + 1, : cols[-1] + 1]
    return np.ascontiguousarray(pixel_values, dtype=np.float32)


def collate_pixels(images: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad ``(3, H_i, W_i)`` arrays to one batch.

    Returns ``pixel_values`` float32 ``(B, 3, H, W)`` and ``pixel_mask`` int64 ``(B, H, W)``
    with 1 on real pixels, 0 on padding (bottom and right), the layout ViLT expects.
    """
    if not images:
        raise ValueError("collate_pixels needs at least one image")
    height = max(image.shape[1] for image in images)
    width = max(image.shape[2] for image in images)
    pixel_values = torch.zeros(len(images), 3, height, width, dtype=torch.float32)
    pixel_mask = torch.zeros(len(images), height, width, dtype=torch.long)
    for i, image in enumerate(images):
        _, h, w = image.shape
        pixel_values[i, :, :h, :w] = torch.from_numpy(image)
        pixel_mask[i, :h, :w] = 1
    return pixel_values, pixel_mask
