"""Decoding untrusted image bytes: formats by content, pixel limits before decoding, RGB out."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from model.images import (
    CorruptImageError,
    NotAnImageError,
    TooManyPixelsError,
    UnsupportedFormatError,
    collate_pixels,
    open_image,
)


def _encode(image: Image.Image, fmt: str, **params: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **params)
    return buffer.getvalue()


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header declares width x height but whose data is tiny (a decompression bomb)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\x00" * 64))
        + chunk(b"IEND", b"")
    )


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF"])
def test_allowed_formats_decode_to_rgb(fmt: str) -> None:
    image = Image.new("RGB", (20, 10), (200, 30, 40))
    decoded = open_image(_encode(image, fmt))
    assert decoded.mode == "RGB" and decoded.size == (20, 10)


@pytest.mark.parametrize(
    ("mode", "colour"),
    [
        ("1", 1),
        ("L", 128),
        ("P", 3),
        ("RGBA", (255, 0, 0, 128)),
        ("CMYK", (0, 255, 255, 0)),
        ("I;16", 40000),
    ],
)
def test_modes_are_converted_to_rgb(mode: str, colour: object) -> None:
    fmt = "JPEG" if mode == "CMYK" else "TIFF" if mode == "I;16" else "PNG"
    image = Image.new(mode, (8, 8), colour)  # type: ignore[arg-type]
    decoded = open_image(_encode(image, fmt))
    assert decoded.mode == "RGB" and decoded.size == (8, 8)


def test_sixteen_bit_png_keeps_its_contrast() -> None:
    gradient = np.tile(np.linspace(0, 65535, 16, dtype=np.uint16), (4, 1))
    decoded = np.asarray(open_image(_encode(Image.fromarray(gradient), "PNG")))
    assert decoded[0, 0, 0] < 10 and decoded[0, -1, 0] > 245


def test_exif_orientation_is_applied() -> None:
    image = Image.new("RGB", (30, 10), (0, 0, 255))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise to display
    decoded = open_image(_encode(image, "JPEG", exif=exif.tobytes()))
    assert decoded.size == (10, 30)


def test_bad_inputs_raise_named_errors() -> None:
    with pytest.raises(NotAnImageError, match="empty"):
        open_image(b"")
    with pytest.raises(NotAnImageError):
        open_image(np.random.default_rng(0).bytes(4096))
    with pytest.raises(UnsupportedFormatError, match="SVG"):
        open_image(b'<?xml version="1.0"?><svg xmlns="http://www.w3.org/2000/svg"></svg>')
    with pytest.raises(UnsupportedFormatError, match="PDF"):
        open_image(b"%PDF-1.7\n1 0 obj\n")
    with pytest.raises(UnsupportedFormatError, match="EPS"):
        open_image(b"%!PS-Adobe-3.0 EPSF-3.0\n")
    with pytest.raises(UnsupportedFormatError, match="ICO"):
        open_image(_encode(Image.new("RGB", (16, 16)), "ICO"))
    png = _encode(Image.new("RGB", (64, 64), (1, 2, 3)), "PNG")
    with pytest.raises(CorruptImageError):
        open_image(png[: len(png) // 2])
    with pytest.raises(TooManyPixelsError, match="limit"):
        open_image(_png_header_only(50_000, 50_000))
    with pytest.raises(TooManyPixelsError, match="200 pixels; the limit is 100"):
        open_image(_encode(Image.new("RGB", (20, 10)), "PNG"), max_pixels=100)


def test_collate_pads_bottom_right_and_masks() -> None:
    a = np.ones((3, 2, 3), dtype=np.float32)
    b = np.full((3, 4, 2), 2.0, dtype=np.float32)
    pixel_values, pixel_mask = collate_pixels([a, b])
    assert pixel_values.shape == (2, 3, 4, 3) and pixel_mask.shape == (2, 4, 3)
    assert pixel_mask[0].sum() == 6 and pixel_mask[1].sum() == 8
    assert float(pixel_values[0, :, 2:, :].abs().sum()) == 0.0


def test_large_jpeg_decodes_at_reduced_scale_when_asked() -> None:
    photo = _encode(Image.new("RGB", (4000, 3000), (10, 120, 200)), "JPEG")
    reduced = open_image(photo, max_side=1024)
    assert min(reduced.size) >= 1024 and max(reduced.size) < 4000  # DCT-scaled, not full size
    assert open_image(photo).size == (4000, 3000)
