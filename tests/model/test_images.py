"""Decoding untrusted image bytes: formats by content, pixel limits before decoding, RGB out."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from model.backbone import image_processor_class
from model.images import (
    CorruptImageError,
    ImageError,
    NotAnImageError,
    TooManyPixelsError,
    UnsupportedFormatError,
    collate_pixels,
    open_image,
    preprocess_image,
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


# (shortest_edge, size_divisor): the demo checkpoints' config and ViLT-B/32's.
PROCESSOR_CONFIGS = [(64, 16), (384, 32)]


def _processor(shortest_edge: int, size_divisor: int) -> object:
    return image_processor_class()(size={"shortest_edge": shortest_edge}, size_divisor=size_divisor)


def _random_image(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def _processor_output(processor: object, image: Image.Image) -> np.ndarray:
    """What transformers' ViLT processor gives for one image alone (no batch padding)."""
    encoded = processor(images=[image], return_tensors="np")  # type: ignore[operator]
    assert encoded["pixel_mask"].all()
    return np.asarray(encoded["pixel_values"][0])


@pytest.mark.parametrize(("shortest_edge", "size_divisor"), PROCESSOR_CONFIGS)
@pytest.mark.parametrize(
    "size", [(640, 480), (480, 640), (500, 333), (64, 64), (1, 1), (3, 2), (17, 101), (106, 16)]
)
def test_ordinary_images_preprocess_bit_identical_to_the_processor(
    shortest_edge: int, size_divisor: int, size: tuple[int, int]
) -> None:
    """Recall figures of committed models depend on these pixels: they must not move."""
    processor = _processor(shortest_edge, size_divisor)
    image = _random_image(*size)
    pixels = preprocess_image(processor, image)
    expected = _processor_output(processor, image)
    assert pixels.dtype == np.float32 and pixels.flags.c_contiguous
    assert pixels.shape == expected.shape and np.array_equal(pixels, expected)


def test_only_images_the_processor_cannot_resize_are_letterboxed() -> None:
    """Around the limiting aspect ratio (~6.8:1 here) every size either matches the processor
    bit for bit or is one the processor refuses (its short side rounds down to 0)."""
    processor = _processor(64, 16)
    landscapes = [(106, short) for short in range(12, 18)] + [(n, 1) for n in range(1, 10)]
    letterboxed = 0
    for width, height in landscapes + [(h, w) for w, h in landscapes]:
        image = _random_image(width, height, seed=width + height)
        pixels = preprocess_image(processor, image)
        try:
            expected = _processor_output(processor, image)
        except ValueError:  # "Size must contain 'height' and 'width'": a side of 0
            letterboxed += 1
            assert sorted(pixels.shape[1:]) == [16, 96], (width, height, pixels.shape)
        else:
            assert np.array_equal(pixels, expected), (width, height)
    assert 0 < letterboxed < 2 * len(landscapes)


_EXTREME = [(700, 100), (256, 10), (1, 50), (50, 1), (1, 4000), (40_000, 1), (2000, 3)]


@pytest.mark.parametrize(
    ("shortest_edge", "size_divisor", "width", "height"),
    # ViLT-B/32's processor itself handles up to ~20:1, so 700x100 only fails the demo's.
    [(64, 16, w, h) for w, h in _EXTREME] + [(384, 32, w, h) for w, h in _EXTREME[1:]],
)
def test_any_aspect_ratio_becomes_a_letterboxed_band_of_one_patch(
    shortest_edge: int, size_divisor: int, width: int, height: int
) -> None:
    processor = _processor(shortest_edge, size_divisor)
    colour = (250, 10, 128)
    image = Image.new("RGB", (width, height), colour)
    with pytest.raises(ValueError):  # what happened before: a side of 0 pixels
        _processor_output(processor, image)
    pixels = preprocess_image(processor, image)
    if width < height:
        pixels = pixels.transpose(0, 2, 1)  # compare as a landscape band
    longest = int(1333 / 800 * shortest_edge) // size_divisor * size_divisor  # 96 or 608
    assert pixels.dtype == np.float32 and pixels.shape == (3, size_divisor, longest)
    content_rows = np.flatnonzero(np.abs(pixels).sum(axis=(0, 2)) > 0)
    # The content is centred and is the processor's normalisation of the colour...
    top, bottom = content_rows[0], size_divisor - 1 - content_rows[-1]
    assert len(content_rows) >= 1 and abs(top - bottom) <= 1
    normalised = (np.array(colour, dtype=np.float32) / 255.0 - 0.5) / 0.5
    content = pixels[:, content_rows, :]
    np.testing.assert_allclose(
        content, np.broadcast_to(normalised[:, None, None], content.shape), atol=0.02
    )
    # ...and the rest of the band is 0, the mean colour (what ViLT pads batches with).
    assert not np.abs(np.delete(pixels, content_rows, axis=1)).any()


def test_letterbox_keeps_the_aspect_ratio_of_the_content() -> None:
    processor = _processor(64, 16)
    pixels = preprocess_image(processor, Image.new("RGB", (700, 100), "white"))
    content_rows = np.flatnonzero(np.abs(pixels).sum(axis=(0, 2)) > 0)
    assert pixels.shape == (3, 16, 96) and len(content_rows) == round(100 * 96 / 700)  # 14
    thin = preprocess_image(processor, Image.new("RGB", (1, 1000), "white"))
    assert thin.shape == (3, 96, 16)
    assert len(np.flatnonzero(np.abs(thin).sum(axis=(0, 1)) > 0)) == 1  # one column, not 16


def test_an_image_without_pixels_is_refused() -> None:
    with pytest.raises(ImageError, match="0x5"):
        preprocess_image(_processor(64, 16), Image.new("RGB", (0, 5)))
