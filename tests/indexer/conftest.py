"""Fixtures shared by the indexer tests: a generated gallery, captions and one real build."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest

from indexer.cli import main
from indexer.store import read_current
from tests.indexer.gallery import GallerySpec, write_captions, write_gallery


@dataclass(frozen=True)
class BuiltIndex:
    """A published build over :func:`gallery` and :func:`captions_file` with the tiny model."""

    root: Path
    version: str
    gallery: GallerySpec
    captions: list[dict[str, str]]
    model_dir: Path


@pytest.fixture(scope="session")
def gallery(tmp_path_factory: pytest.TempPathFactory) -> GallerySpec:
    return write_gallery(tmp_path_factory.mktemp("gallery") / "images")


@pytest.fixture(scope="session")
def captions_path(gallery: GallerySpec) -> Path:
    path = gallery.folder.parent / "captions.jsonl"
    write_captions(path, list(gallery.good[:6]))
    return path


@pytest.fixture(scope="session")
def built(
    tmp_path_factory: pytest.TempPathFactory,
    tiny_vilt_dir: Path,
    gallery: GallerySpec,
    captions_path: Path,
) -> BuiltIndex:
    """One build through the CLI with a decoding worker process and several shards."""
    root = tmp_path_factory.mktemp("index") / "root"
    code = main(
        [
            "build", "--model", str(tiny_vilt_dir), "--out", str(root),
            "--images", str(gallery.folder), "--captions", str(captions_path),
            "--workers", "1", "--batch-size", "4", "--shard-size", "8",
        ]
    )  # fmt: skip
    assert code == 0
    version = read_current(root)
    assert version is not None
    records = [json.loads(line) for line in captions_path.read_text().splitlines()]
    return BuiltIndex(root, version, gallery, records, tiny_vilt_dir)


@pytest.fixture()
def built_copy(built: BuiltIndex, tmp_path: Path) -> Path:
    """A private copy of the built index root, for tests that alter it."""
    copy = tmp_path / "root"
    shutil.copytree(built.root, copy, symlinks=True)
    return copy
