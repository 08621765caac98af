"""The store without a model: publishing vectors, CURRENT, versions, gc, reading, concurrency."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from indexer.cli import main
from indexer.errors import UsageError
from indexer.publish import (
    BuildLock,
    CaptionRow,
    ImageRow,
    new_version_name,
    publish_vectors,
    write_current,
    write_manifest,
)
from indexer.store import (
    CorruptVersionError,
    IndexVersion,
    ModalityMissingError,
    RowSelection,
    StoreError,
    VersionNotFoundError,
    list_versions,
    read_current,
    read_manifest,
    verify_version,
    version_dir,
)
from indexer.vector_index import BACKENDS, VectorIndex

DIM = 16


def unit_rows(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, DIM)).astype(np.float32)
    return np.ascontiguousarray(x / np.linalg.norm(x, axis=1, keepdims=True))


def publish_images(root: Path, n: int = 30, seed: int = 0) -> tuple[str, np.ndarray]:
    vectors = unit_rows(n, seed)
    rows = [
        ImageRow(i, f"img-{seed}-{i}", f"/gallery/{i}.png", (f"caption {i}",) * (i % 2))
        for i in range(n)
    ]
    return publish_vectors(
        root, fingerprint="f" * 64, image_rows=rows, image_vectors=vectors
    ), vectors


def test_an_empty_root_has_no_version(tmp_path: Path) -> None:
    assert read_current(tmp_path) is None
    assert list_versions(tmp_path) == []
    with pytest.raises(VersionNotFoundError, match="no version is published"):
        IndexVersion.open(tmp_path)
    assert "no version is published" in verify_version(tmp_path)[0]
    with pytest.raises(VersionNotFoundError, match="not a version name"):
        IndexVersion.open(tmp_path, "../etc")


def test_images_only_version_searches_like_numpy_and_refuses_captions(tmp_path: Path) -> None:
    version, xb = publish_images(tmp_path)
    assert read_current(tmp_path) == version
    assert verify_version(tmp_path) == []
    xq = unit_rows(4, seed=9)
    with IndexVersion.open(tmp_path, verify=True) as opened:
        assert (opened.image_count, opened.caption_count, opened.dim) == (30, 0, DIM)
        assert opened.fingerprint == "f" * 64
        distances, rows = opened.search_images(xq, 40)
        expected = np.argsort(-(xq @ xb.T), axis=1)
        np.testing.assert_array_equal(rows[:, :30], expected)
        assert (rows[:, 30:] == -1).all()
        np.testing.assert_allclose(distances[:, :30], -np.sort(-(xq @ xb.T), axis=1), atol=1e-5)
        with pytest.raises(ModalityMissingError, match="no captions"):
            opened.search_captions(xq, 3)
        records = opened.image_records([3, 0, 3])
        assert [r.id for r in records] == ["img-0-3", "img-0-0", "img-0-3"]
        assert records[0].captions == ("caption 3",) and records[1].captions == ()
        assert opened.image_by_id("img-0-7").row == 7  # type: ignore[union-attr]
        assert opened.image_by_id("nope") is None
        with pytest.raises(ValueError, match="row 30"):
            opened.image_records([30])
    with pytest.raises(StoreError, match="closed"):
        opened.image_records([0])


def test_caption_records_keep_their_image_link(tmp_path: Path) -> None:
    rows = [
        CaptionRow(0, "c0", "a dog", "img-1", "img-1"),
        CaptionRow(1, "c1", "a cat", None, None),
    ]
    publish_vectors(
        tmp_path, fingerprint="a" * 64, caption_rows=rows, caption_vectors=unit_rows(2, 1)
    )
    with IndexVersion.open(tmp_path) as opened:
        assert [(r.id, r.caption, r.image_id) for r in opened.caption_records([1, 0])] == [
            ("c1", "a cat", None), ("c0", "a dog", "img-1"),
        ]  # fmt: skip
        with pytest.raises(ModalityMissingError):
            opened.search_images(unit_rows(1, 2), 1)


def test_version_names_sort_in_creation_order_and_match_the_pattern() -> None:
    names = [new_version_name(1_800_000_000 + t / 1000) for t in range(0, 3000, 7)]
    assert names == sorted(names) and len(set(names)) == len(names)


def test_versions_gc_and_current(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    versions = [publish_images(tmp_path, n=12, seed=s)[0] for s in range(4)]
    assert list_versions(tmp_path) == versions
    assert read_current(tmp_path) == versions[-1]
    write_current(tmp_path, versions[0])  # an operator rolled back
    assert read_current(tmp_path) == versions[0]
    assert sorted(os.listdir(tmp_path)) == [".build.lock", "CURRENT", "versions"]
    assert main(["versions", str(tmp_path)]) == 0
    listing = capsys.readouterr().out.splitlines()
    assert listing[0].startswith(f"* {versions[0]}") and len(listing) == 4
    assert main(["gc", str(tmp_path), "--keep", "1"]) == 0
    assert list_versions(tmp_path) == [versions[0], versions[-1]]  # CURRENT always survives
    assert verify_version(tmp_path) == []
    assert main(["gc", str(tmp_path), "--keep", "0"]) == 2


def test_a_corrupt_current_or_manifest_is_reported(tmp_path: Path) -> None:
    version, _ = publish_images(tmp_path)
    manifest = version_dir(tmp_path, version) / "manifest.json"
    manifest.write_text(manifest.read_text().replace('"images": 30', '"images": 31', 1))
    with pytest.raises(CorruptVersionError, match="checksum"):
        IndexVersion.open(tmp_path)
    (tmp_path / "CURRENT").write_text("garbage\n")
    with pytest.raises(CorruptVersionError, match="not a version name"):
        read_current(tmp_path)


def test_open_with_verify_refuses_an_altered_index(tmp_path: Path) -> None:
    version, _ = publish_images(tmp_path)
    index_file = version_dir(tmp_path, version) / "images.faiss"
    data = bytearray(index_file.read_bytes())
    data[-5] ^= 0xFF
    index_file.write_bytes(bytes(data))
    with pytest.raises(CorruptVersionError, match=r"images\.faiss does not match its sha256"):
        IndexVersion.open(tmp_path, verify=True)


def test_verify_reports_a_missing_file_and_an_unexpected_one(tmp_path: Path) -> None:
    version, _ = publish_images(tmp_path)
    directory = version_dir(tmp_path, version)
    (directory / "stray.bin").write_bytes(b"left behind")
    assert verify_version(tmp_path) == [f"unexpected file {directory / 'stray.bin'}"]
    (directory / "stray.bin").unlink()
    (directory / "metadata.sqlite").unlink()
    assert verify_version(tmp_path) == [f"missing file {directory / 'metadata.sqlite'}"]
    with pytest.raises(CorruptVersionError, match=r"metadata\.sqlite is missing"):
        IndexVersion.open(tmp_path)


def test_concurrent_searches_and_lookups_agree_with_serial_ones(tmp_path: Path) -> None:
    publish_images(tmp_path, n=200)
    queries = [unit_rows(3, seed) for seed in range(32)]
    with IndexVersion.open(tmp_path) as opened:

        def work(xq: np.ndarray) -> tuple[list[list[int]], list[str]]:
            _, rows = opened.search_images(xq, 5)
            return rows.tolist(), [r.id for r in opened.image_records(rows[0].tolist())]

        serial = [work(xq) for xq in queries]
        with ThreadPoolExecutor(max_workers=8) as pool:
            parallel = list(pool.map(work, queries))
    assert parallel == serial


def test_one_build_at_a_time(tmp_path: Path) -> None:
    with (
        BuildLock(tmp_path),
        pytest.raises(UsageError, match=f"another build \\(pid {os.getpid()}\\)"),
    ):
        BuildLock(tmp_path).__enter__()
    with BuildLock(tmp_path):  # released: it can be taken again
        pass


class NumpyIndex:
    """A second :class:`VectorIndex` backend: exact search over the vectors in a .npy file."""

    kind = "numpy"

    def __init__(self, xb: np.ndarray) -> None:
        self.xb = xb

    @property
    def count(self) -> int:
        return len(self.xb)

    @property
    def dim(self) -> int:
        return int(self.xb.shape[1])

    def search(
        self, xq: np.ndarray, k: int, selection: RowSelection | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        rows = np.arange(self.count) if selection is None else selection.rows
        scores = xq @ self.xb[rows].T
        order = np.argsort(-scores, axis=1)[:, :k]
        return np.take_along_axis(scores, order, axis=1), rows[order]

    def reconstruct(self, rows: Sequence[int]) -> np.ndarray:
        return self.xb[list(rows)]

    def verify(self) -> list[str]:
        return []


def test_a_version_reads_its_vectors_through_the_backend_its_manifest_names(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The VectorIndex seam: another backend serves search, filter and reconstruct."""
    version, xb = publish_images(tmp_path)
    directory = version_dir(tmp_path, version)
    np.save(directory / "images.npy", xb)
    manifest = read_manifest(directory)
    images = dataclasses.replace(manifest.indexes["images"], backend="numpy")
    write_manifest(
        directory, dataclasses.replace(manifest, indexes={**manifest.indexes, "images": images})
    )
    with pytest.raises(
        CorruptVersionError, match="backend 'numpy'; this store reads \\['faiss'\\]"
    ):
        IndexVersion.open(tmp_path)

    def open_numpy(path: Path, info: Any, name: str, policy: Any) -> VectorIndex:
        return NumpyIndex(np.load(path.with_suffix(".npy")))

    monkeypatch.setitem(BACKENDS, "numpy", open_numpy)
    xq = unit_rows(3, seed=5)
    with IndexVersion.open(tmp_path, verify=True) as opened:
        _, rows = opened.search_images(xq, 5)
        np.testing.assert_array_equal(rows, np.argsort(-(xq @ xb.T), axis=1)[:, :5])
        selection = opened.select("images", {})
        _, selected = opened.search_images(xq, 5, selection=selection)
        np.testing.assert_array_equal(selected, rows)
        np.testing.assert_array_equal(opened.reconstruct("images", [2, 7]), xb[[2, 7]])
