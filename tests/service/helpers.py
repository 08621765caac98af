"""Test doubles and builders for the service tests: a deterministic fake encoder, published
index versions written through the indexer's own writer, and test images of every kind."""

from __future__ import annotations

import hashlib
import io
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from indexer import publish
from indexer.publish import CaptionRow, ImageRow


def assert_error(response: Any, status: int, code: str | None = None) -> dict[str, Any]:
    """``response`` has ``status`` and the service's one error shape; returns its ``error``."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"error"} and {"code", "message"} <= set(body["error"]), body
    if code is not None:
        assert body["error"]["code"] == code, body
    return dict(body["error"])


def unit_rows(matrix: np.ndarray) -> np.ndarray:
    matrix = np.asarray(matrix, dtype=np.float32)
    return np.ascontiguousarray(matrix / np.linalg.norm(matrix, axis=1, keepdims=True))


class FakeEncoder:
    """Deterministic stand-in for VLDeformer: a text's vector is a hash of its text; an image's
    vector is its 4x4 thumbnail (so different pictures get different vectors)."""

    runtime = "torch"  # model.runtime's encoder interface
    check = None

    def __init__(self, dim: int = 48, fingerprint: str = "f" * 64, delay_s: float = 0.0) -> None:
        assert dim >= 48
        self.embedding_dim = dim
        self.fingerprint = fingerprint
        self.delay_s = delay_s
        self.text_batches: list[int] = []
        self.image_batches: list[int] = []

    def text_vector(self, text: str) -> np.ndarray:
        seed = int.from_bytes(hashlib.sha256(text.encode("utf-8", "replace")).digest()[:8], "big")
        return unit_rows(np.random.default_rng(seed).standard_normal((1, self.embedding_dim)))[0]

    def image_vector(self, image: Image.Image) -> np.ndarray:
        thumb = np.asarray(image.convert("RGB").resize((4, 4), Image.Resampling.BILINEAR))
        vector = np.zeros(self.embedding_dim, dtype=np.float32)
        vector[:48] = thumb.reshape(-1).astype(np.float32) / 255.0 + 0.01
        return unit_rows(vector[None])[0]

    def encode_text(self, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
        self.text_batches.append(len(texts))
        if self.delay_s:
            time.sleep(self.delay_s)
        return np.stack([self.text_vector(t) for t in texts]).astype(np.float32)

    def encode_images(self, images: Sequence[Image.Image], batch_size: int = 32) -> np.ndarray:
        self.image_batches.append(len(images))
        if self.delay_s:
            time.sleep(self.delay_s)
        return np.stack([self.image_vector(i) for i in images]).astype(np.float32)


@dataclass(frozen=True)
class Gallery:
    """A published version's content, for assertions."""

    version: str
    image_ids: list[str]
    image_paths: list[Path]
    captions: list[tuple[str, str, str | None]]  # (id, text, image id)
    metadata: list[dict[str, Any]] = field(default_factory=list)  # per image, in id order


def publish_vectors(
    root: Path,
    *,
    fingerprint: str,
    image_ids: Sequence[str],
    image_paths: Sequence[Path],
    image_vectors: np.ndarray,
    captions: Sequence[tuple[str, str, str | None]],
    caption_vectors: np.ndarray,
    image_metadata: Sequence[dict[str, Any]] | None = None,
    runtime: str = "torch",
) -> str:
    """Publish a flat-index version with :func:`indexer.publish.publish_vectors` (build lock,
    staging, checksums, atomic switch), recorded as built by the encoder ``runtime``; returns
    its name."""
    linked: dict[str, list[str]] = {}
    for _, text, image_id in captions:
        if image_id is not None:
            linked.setdefault(image_id, []).append(text)
    metadata = image_metadata or [{} for _ in image_ids]
    image_rows = [
        ImageRow(row, image_id, str(Path(path).resolve()), tuple(linked.get(image_id, ())), fields)
        for row, (image_id, path, fields) in enumerate(
            zip(image_ids, image_paths, metadata, strict=True)
        )
    ]
    caption_rows = [
        CaptionRow(row, caption_id, text, image_id, image_id)
        for row, (caption_id, text, image_id) in enumerate(captions)
    ]
    return publish.publish_vectors(
        root,
        fingerprint=fingerprint,
        image_rows=image_rows,
        image_vectors=np.ascontiguousarray(image_vectors, dtype=np.float32),
        caption_rows=caption_rows,
        caption_vectors=np.ascontiguousarray(caption_vectors, dtype=np.float32),
        index="flat",
        runtime=runtime,
    )


GALLERY_COLOURS = ("red", "green", "blue")


def gallery_metadata(i: int) -> dict[str, Any]:
    """Image ``i``'s metadata fields: one of each type a filter can test."""
    return {
        "colour": GALLERY_COLOURS[i % 3],  # string
        "number": i,  # number
        "even": i % 2 == 0,  # boolean
        "tags": ["first"] if i == 0 else ["odd"] if i % 2 else ["even", "pair"],  # string list
    }


def make_gallery(
    root: Path,
    images_dir: Path,
    encoder: FakeEncoder,
    *,
    n: int = 6,
    prefix: str = "img",
    fingerprint: str | None = None,
    dim: int | None = None,
    runtime: str = "torch",
) -> Gallery:
    """``n`` coloured PNGs with two captions each, indexed with ``encoder``'s vectors (recorded
    as made by the encoder ``runtime``)."""
    images_dir.mkdir(parents=True, exist_ok=True)
    ids, paths, pictures = [], [], []
    for i in range(n):
        colour = ((i * 67) % 256, (i * 131 + 40) % 256, (255 - i * 41) % 256)
        picture = Image.new("RGB", (24, 16), colour)
        picture.paste((255 - colour[0], colour[2], colour[1]), (0, 0, 8 + i % 10, 8))
        path = images_dir / f"{prefix}{i}.png"
        picture.save(path)
        ids.append(f"{prefix}{i}.png")
        paths.append(path)
        pictures.append(picture)
    captions = [
        (f"{prefix}-cap-{i}-{j}", f"{prefix} caption {j} of picture {i}", ids[i])
        for i in range(n)
        for j in range(2)
    ]
    # A caption's vector is its image's vector, so an image query finds its own captions...
    caption_vectors = unit_rows(
        np.stack([encoder.image_vector(pictures[i]) for i in range(n) for _ in range(2)])
    )
    # ...and an image's vector is its first caption's text vector, so that text finds it.
    image_vectors = unit_rows(np.stack([encoder.text_vector(captions[2 * i][1]) for i in range(n)]))
    if dim is not None and dim != encoder.embedding_dim:
        rng = np.random.default_rng(1)
        image_vectors = unit_rows(rng.standard_normal((n, dim)))
        caption_vectors = unit_rows(rng.standard_normal((2 * n, dim)))
    metadata = [gallery_metadata(i) for i in range(n)]
    version = publish_vectors(
        root,
        fingerprint=fingerprint or encoder.fingerprint,
        image_ids=ids,
        image_paths=paths,
        image_vectors=image_vectors,
        captions=captions,
        caption_vectors=caption_vectors,
        image_metadata=metadata,
        runtime=runtime,
    )
    return Gallery(version, ids, paths, captions, metadata)


def png_bytes(image: Image.Image, **save: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", **save)
    return buffer.getvalue()


def jpeg_bytes(image: Image.Image, **save: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", **save)
    return buffer.getvalue()


def synthetic_gallery(
    out_dir: Path, *, n: int, seed: int = 0, prefix: str = ""
) -> tuple[Path, Path]:
    """``n`` generated captioned scenes (model.synthetic): ``(images folder, captions JSONL)``.

    With a ``prefix`` the images are renamed ``<prefix>test_000000.png`` (and the captions'
    links follow), so two galleries have disjoint ids.
    """
    import json

    from model.synthetic import SyntheticConfig, write_dataset

    write_dataset(out_dir, SyntheticConfig(seed=seed, n_train=0, n_val=0, n_test=n))
    images = out_dir / "images"
    captions_file = out_dir / "captions.jsonl"
    if prefix:
        for path in sorted(images.iterdir()):
            path.rename(images / f"{prefix}{path.name}")
        rows = [json.loads(line) for line in captions_file.read_text().splitlines() if line]
        captions_file = out_dir / f"{prefix}captions.jsonl"
        captions_file.write_text(
            "".join(
                json.dumps(
                    {**row, "id": f"{prefix}{row['id']}", "image": f"{prefix}{row['image']}"}
                )
                + "\n"
                for row in rows
            )
        )
    return images, captions_file


def build_index(model_dir: Path, root: Path, images: Path, captions: Path) -> str:
    """Run the indexer CLI in-process; returns the version it published."""
    from indexer.cli import main as indexer_main
    from indexer.store import read_current

    code = indexer_main(
        [
            "--quiet", "build", "--model", str(model_dir), "--out", str(root),
            "--images", str(images), "--captions", str(captions),
            "--workers", "0", "--device", "cpu",
        ]
    )  # fmt: skip
    assert code == 0, f"indexer build failed with exit code {code}"
    version = read_current(root)
    assert version is not None
    return version
