"""The typed manifest: exact round trips of real manifests, old layouts, unknown keys, errors."""

from __future__ import annotations

import copy
import hashlib
import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from indexer.cli import main
from indexer.manifest import IndexEntry, Manifest
from indexer.publish import ImageRow, publish_vectors, write_manifest
from indexer.store import (
    CorruptVersionError,
    IndexVersion,
    read_manifest,
    verify_version,
    version_dir,
)
from tests.indexer.conftest import BuiltIndex

DIM = 8


def _publish(root: Path) -> Path:
    """A small published version (from given vectors); returns its directory."""
    xb = np.random.default_rng(0).standard_normal((12, DIM)).astype(np.float32)  # (N, D)
    xb /= np.linalg.norm(xb, axis=1, keepdims=True)
    rows = [ImageRow(i, f"img-{i}", f"/g/{i}.png", (f"caption {i}",)) for i in range(12)]
    version = publish_vectors(root, fingerprint="f" * 64, image_rows=rows, image_vectors=xb)
    return version_dir(root, version)


def _raw(directory: Path) -> str:
    return (directory / "manifest.json").read_text(encoding="utf-8")


def _rewrite(directory: Path, data: dict[str, Any]) -> None:
    """Replace ``manifest.json`` with ``data`` as JSON and re-sign it (as a writer would)."""
    raw = (json.dumps(data, indent=2) + "\n").encode("utf-8")
    (directory / "manifest.json").write_bytes(raw)
    (directory / "manifest.json.sha256").write_text(
        f"{hashlib.sha256(raw).hexdigest()}  manifest.json\n", encoding="ascii"
    )


def test_a_built_manifest_round_trips_byte_for_byte(
    built: BuiltIndex, capsys: pytest.CaptureFixture[str]
) -> None:
    directory = version_dir(built.root, built.version)
    raw = _raw(directory)
    data = json.loads(raw)
    manifest = Manifest.from_dict(data)
    assert manifest.to_dict() == data
    assert json.dumps(manifest.to_dict(), indent=2) + "\n" == raw  # same keys, same order
    assert read_manifest(directory) == manifest
    assert manifest.build is not None and manifest.build.engine is not None
    assert manifest.build.engine.name == "local"
    assert manifest.counts.images == len(built.gallery.good)
    assert manifest.skipped and manifest.skipped_by_reason
    assert main(["info", str(built.root), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == data


def test_a_published_manifest_round_trips_byte_for_byte(tmp_path: Path) -> None:
    directory = _publish(tmp_path)
    raw = _raw(directory)
    manifest = read_manifest(directory)
    assert json.dumps(manifest.to_dict(), indent=2) + "\n" == raw
    assert manifest.build is None and manifest.inputs is None and "build" not in json.loads(raw)
    assert manifest.runtime == manifest.model.runtime == "torch"
    assert isinstance(manifest.indexes["images"], IndexEntry)


def test_an_old_format_manifest_opens_verifies_and_round_trips(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    directory = _publish(tmp_path)
    current = json.loads(_raw(directory))
    image_index = current["indexes"]["images"]
    # An early format-1 manifest: no runtime, no layout / tuning, no library versions.
    old = {
        "format_version": 1,
        "version": current["version"],
        "created_at": current["created_at"],
        "model": {"fingerprint": "f" * 64, "embedding_dim": DIM},
        "dim": DIM,
        "metric": "inner_product",
        "normalized": True,
        "counts": {"images": 12, "captions": 0},
        "indexes": {"images": {"type": image_index["type"], "params": image_index["params"]}},
        "files": current["files"],
    }
    _rewrite(directory, old)
    manifest = read_manifest(directory)
    assert manifest.to_dict() == old
    assert manifest.model.runtime is None and manifest.runtime == "torch"
    assert verify_version(tmp_path) == []
    with IndexVersion.open(tmp_path) as version:
        assert version.runtime == "torch" and version.image_count == 12
        assert version.index_settings("images") == old["indexes"]["images"]
        _, rows = version.search("images", np.eye(1, DIM, dtype=np.float32), 3)
        assert rows.shape == (1, 3)
    assert main(["info", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "runtime      torch (not recorded: an older build)" in out
    assert "build        None s on None (None), local engine" in out


def test_unknown_keys_are_kept_through_a_round_trip_and_a_rewrite(tmp_path: Path) -> None:
    directory = _publish(tmp_path)
    data = json.loads(_raw(directory))
    data["future_section"] = {"anything": [1, 2]}
    data["model"]["tokenizer"] = "bert"
    data["counts"]["duplicates"] = 3
    data["indexes"]["images"]["quantizer"] = {"bits": 4}
    data["files"]["images.faiss"]["mtime"] = 12.5
    data["library_versions"]["future-lib"] = "1.0"
    data["build"] = {"device": "cpu", "images": None, "captions": None, "gpu_name": "none"}
    manifest = Manifest.from_dict(copy.deepcopy(data))
    assert manifest.to_dict() == data
    assert manifest.extra == {"future_section": {"anything": [1, 2]}}
    assert manifest.model.extra == {"tokenizer": "bert"}
    assert manifest.build is not None and manifest.build.extra == {"gpu_name": "none"}
    # Written back (files recomputed), the unknown keys survive except the recomputed files'.
    written = write_manifest(directory, manifest)
    reread = read_manifest(directory).to_dict()
    assert reread == written.to_dict()
    assert reread["future_section"] == {"anything": [1, 2]}
    assert reread["indexes"]["images"]["quantizer"] == {"bits": 4}
    assert list(reread)[-1] == "files"


@pytest.mark.parametrize(
    ("key", "damage"),
    [
        ("dim", lambda d: d.pop("dim")),
        ("version", lambda d: d.pop("version")),
        ("model.fingerprint", lambda d: d["model"].pop("fingerprint")),
        ("counts.images", lambda d: d["counts"].__setitem__("images", "12")),
        ("counts.captions", lambda d: d["counts"].pop("captions")),
        ("indexes.images.type", lambda d: d["indexes"]["images"].__setitem__("type", 3)),
        ("files", lambda d: d.pop("files")),
        ("files.images.faiss.bytes", lambda d: d["files"]["images.faiss"].pop("bytes")),
        ("dim", lambda d: d.__setitem__("dim", True)),
        ("model", lambda d: d.__setitem__("model", "f" * 64)),
        ("format_version", lambda d: d.pop("format_version")),
    ],
)
def test_a_missing_or_mistyped_key_is_a_corrupt_version_naming_file_and_key(
    tmp_path: Path, key: str, damage: Any
) -> None:
    directory = _publish(tmp_path)
    data = json.loads(_raw(directory))
    damage(data)
    _rewrite(directory, data)
    with pytest.raises(CorruptVersionError) as info:
        read_manifest(directory)
    message = str(info.value)
    assert str(directory / "manifest.json") in message
    assert re.search(rf"key '{re.escape(key)}'", message), message
    with pytest.raises(CorruptVersionError):
        IndexVersion.open(tmp_path)
    assert verify_version(tmp_path) != []


def test_another_format_version_is_refused(tmp_path: Path) -> None:
    directory = _publish(tmp_path)
    data = json.loads(_raw(directory))
    data["format_version"] = 2
    _rewrite(directory, data)
    with pytest.raises(CorruptVersionError, match="has format_version 2; this indexer reads 1"):
        read_manifest(directory)
