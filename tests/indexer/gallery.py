"""A small generated gallery with usable images in many modes and broken files of every kind."""

from __future__ import annotations

import io
import json
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image


@dataclass(frozen=True)
class GallerySpec:
    """What the build should make of the folder: usable ids and the skip reason of the others."""

    folder: Path
    good: tuple[str, ...]
    bad: dict[str, str]  # id -> expected reason
    ignored: int  # files without an image extension


def _png_chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))


def bomb_png(width: int = 100_000, height: int = 100_000) -> bytes:
    """A tiny PNG whose header declares ``width x height`` pixels (a decompression bomb)."""
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", header)
        + _png_chunk(b"IDAT", zlib.compress(b"\x00" * 64))
        + _png_chunk(b"IEND", b"")
    )


def _random_rgb(rng: np.random.Generator, size: tuple[int, int] = (32, 32)) -> Image.Image:
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8), "RGB")


def write_gallery(folder: Path, *, n_plain: int = 8, seed: int = 0) -> GallerySpec:
    """Write the gallery into ``folder`` (created) and describe it."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    good: list[str] = []

    def keep(name: str, image: Image.Image, **save: object) -> None:
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        image.save(path, **save)
        good.append(name)

    for i in range(n_plain):
        keep(f"plain_{i:02d}.png", _random_rgb(rng))
    keep("gray.png", _random_rgb(rng).convert("L"))
    palette = _random_rgb(rng).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    palette.info["transparency"] = 0
    keep("palette.png", palette)
    keep("rgba.png", _random_rgb(rng).convert("RGBA"))
    keep("cmyk.jpg", _random_rgb(rng).convert("CMYK"), quality=95)
    deep = (rng.integers(0, 65535, (32, 32), dtype=np.uint16)).astype(np.uint16)
    keep("gray16.png", Image.fromarray(deep))  # mode I;16
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90° clockwise to display
    keep("rotated.jpg", _random_rgb(rng, (32, 16)), exif=exif.tobytes(), quality=95)
    frames = [_random_rgb(rng).convert("P"), _random_rgb(rng).convert("P")]
    keep("animated.gif", frames[0], save_all=True, append_images=frames[1:])
    keep("photo.bmp", _random_rgb(rng))
    keep("photo.tiff", _random_rgb(rng))
    keep("photo.webp", _random_rgb(rng), quality=90)
    keep("nested/deeper/photo.jpg", _random_rgb(rng), quality=90)

    bad: dict[str, str] = {}
    (folder / "zero.jpg").write_bytes(b"")
    bad["zero.jpg"] = "not_an_image"
    buffer = io.BytesIO()
    _random_rgb(rng, (64, 64)).save(buffer, format="PNG")
    (folder / "truncated.png").write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    bad["truncated.png"] = "corrupt_image"
    (folder / "random.jpg").write_bytes(rng.integers(0, 256, 3000, dtype=np.uint8).tobytes())
    bad["random.jpg"] = "not_an_image"
    (folder / "notes.png").write_text("these are notes, not pixels\n")
    bad["notes.png"] = "not_an_image"
    (folder / "drawing.svg").write_text(
        '<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"><rect width="10" height="10"/></svg>'
    )
    bad["drawing.svg"] = "unsupported_format"
    (folder / "figure.eps").write_bytes(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n")
    bad["figure.eps"] = "unsupported_format"
    (folder / "document.pdf").write_bytes(b"%PDF-1.4\n1 0 obj << >> endobj\ntrailer << >>\n%%EOF\n")
    bad["document.pdf"] = "unsupported_format"
    (folder / "bomb.png").write_bytes(bomb_png())
    bad["bomb.png"] = "too_many_pixels"
    (folder / "dangling.jpg").symlink_to(folder / "does-not-exist.jpg")
    bad["dangling.jpg"] = "missing_file"

    (folder / "README.txt").write_text("not part of the gallery\n")
    (folder / ".hidden.png").write_bytes(b"")  # hidden files are not gallery entries
    return GallerySpec(folder, tuple(good), bad, ignored=1)


def write_captions(path: Path, image_ids: list[str], *, per_image: int = 2) -> list[dict[str, str]]:
    """A JSONL caption file: ``per_image`` captions linked to each id, plus two unlinked ones."""
    words = ["red circle", "blue square", "green triangle", "small star", "large cross"]
    records = []
    for i, image_id in enumerate(image_ids):
        for j in range(per_image):
            text = (
                f"a {words[(i + j) % len(words)]} above a {words[(2 * i + j + 1) % len(words)]} {i}"
            )
            records.append({"id": f"cap-{i}-{j}", "caption": text, "image": image_id})
    records.append({"id": "free-1", "caption": "two shapes next to each other"})
    records.append(
        {"id": "free-2", "caption": "a picture of a tiny black circle", "image": "nowhere.png"}
    )
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return records
