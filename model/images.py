"""Safe image decoding shared by the indexer (gallery files) and the service (uploads).

Every image that reaches the model goes through :func:`open_image`: the format is checked
from the content (never the file name), the pixel count from the header *before* decoding
(decompression bombs), EXIF orientation is applied and every mode is converted to RGB.
:func:`preprocess_image` then turns any decoded image, whatever its aspect ratio, into the
model's pixels.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
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


# ViLT's image processors cap an image's long side at 1333/800 of its short side (COCO's
# typical aspect ratio); transformers hard-codes the pair in both backends.
_VILT_MAX_LONGER_EDGE = 1333
_VILT_MAX_SHORTER_EDGE = 800


@dataclass(frozen=True)
class _ViltResize:
    """The resize rule of ViLT's image processor, as both transformers backends apply it."""

    shorter: int  # size["shortest_edge"]
    divisor: int  # size_divisor (the patch size in our checkpoints); 1 = none

    @property
    def longer(self) -> int:
        return int(_VILT_MAX_LONGER_EDGE / _VILT_MAX_SHORTER_EDGE * self.shorter)

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        """``(height, width)`` after the processor's resize; a side may come out 0."""
        if height < width:
            new_height, new_width = float(self.shorter), width * (self.shorter / height)
        else:
            new_height, new_width = height * (self.shorter / width), float(self.shorter)
        if max(new_height, new_width) > self.longer:
            scale = self.longer / max(new_height, new_width)
            new_height, new_width = new_height * scale, new_width * scale
        rounded_height, rounded_width = int(new_height + 0.5), int(new_width + 0.5)
        return (
            rounded_height // self.divisor * self.divisor,
            rounded_width // self.divisor * self.divisor,
        )


def _vilt_resize(processor: object) -> _ViltResize | None:
    """The processor's resize rule, or None when it does not resize by a shortest edge."""
    if not getattr(processor, "do_resize", False):
        return None
    size = getattr(processor, "size", None)
    shorter = (
        size.get("shortest_edge")
        if isinstance(size, dict)
        else getattr(size, "shortest_edge", None)
    )
    if not shorter:
        return None
    return _ViltResize(int(shorter), int(getattr(processor, "size_divisor", None) or 1))


def _run_processor(processor: object, image: Image.Image, **overrides: object) -> np.ndarray:
    """The processor on one image, its batch padding cropped off: float32 ``(3, H, W)``."""
    encoded = processor(images=[image], return_tensors="np", **overrides)  # type: ignore[operator]
    pixel_values: np.ndarray = encoded["pixel_values"][0]
    mask = encoded.get("pixel_mask")
    if mask is not None:  # the processor pads to a multiple of its size divisor; crop that off
        rows = np.flatnonzero(mask[0].any(axis=1))
        cols = np.flatnonzero(mask[0].any(axis=0))
        pixel_values = pixel_values[:, : rows[-1] + 1, : cols[-1] + 1]
    return np.ascontiguousarray(pixel_values, dtype=np.float32)


def _letterboxed(processor: object, image: Image.Image, resize: _ViltResize) -> np.ndarray:
    """``image`` scaled (aspect ratio kept) to the processor's longest output side and centred
    in a band one patch across, padded with 0 (the mean colour once normalised)."""
    band = resize.divisor
    long_side = max(band, resize.longer // band * band)
    width, height = image.size
    short_side = min(band, max(1, round(min(width, height) * long_side / max(width, height))))
    landscape = width >= height
    content_size = (long_side, short_side) if landscape else (short_side, long_side)  # (w, h)
    resample = Image.Resampling(int(getattr(processor, "resample", Image.Resampling.BICUBIC)))
    content = _run_processor(processor, image.resize(content_size, resample), do_resize=False)
    pixels = np.zeros((3, band, long_side) if landscape else (3, long_side, band), np.float32)
    top = (pixels.shape[1] - content.shape[1]) // 2
    left = (pixels.shape[2] - content.shape[2]) // 2
    pixels[:, top : top + content.shape[1], left : left + content.shape[2]] = content
    return pixels


def preprocess_image(processor: object, image: Image.Image) -> np.ndarray:
    """Run a checkpoint's image processor on one RGB image: float32 ``(3, H, W)``.

    The one preprocessing function of the indexer, the service, training and evaluation; it
    takes an image of any size and aspect ratio, from 1x1 to 1xN and Nx1:

    - An image the processor can resize goes through it untouched, so the output is
      bit-identical to the processor's (its batch padding cropped off).
    - Beyond an aspect ratio of about ``longer / size_divisor`` (6.6:1 for a 64-pixel short
      edge and 16-pixel patches, 20:1 for ViLT-B/32's 384 and 32) the processor would round
      the short side down to 0 pixels and raise. Such an image is letterboxed instead: scaled,
      aspect ratio kept, so its long side is the processor's longest output side (``longer``
      floored to a multiple of ``size_divisor``), then centred in a band one ``size_divisor``
      (one ViLT patch) across. The padding is 0 after normalisation, the mean colour, which is
      also what ViLT pads batches with. Every image thus yields at least one full row (or
      column) of patches; nothing is cropped, and the content is distorted only by rounding
      its short side to whole pixels (at least 1).

    Raises :class:`ImageError` for an image without pixels. Picklable inputs and output, so
    the indexer runs it in decoding worker processes; :func:`collate_pixels` pads a list of
    these into a batch.
    """
    width, height = image.size
    if width < 1 or height < 1:
        raise ImageError(f"image is {width}x{height} pixels; both sides must be at least 1")
    resize = _vilt_resize(processor)
    if resize is not None and 0 in resize.output_size(height, width):
        return _letterboxed(processor, image, resize)
    return _run_processor(processor, image)


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
