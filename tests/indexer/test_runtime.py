"""Builds through the encoder runtimes (--runtime): vectors, the manifest's record, refusals."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from indexer import publish
from indexer.build import RUNTIME_OPTIONS
from indexer.cli import build_parser, main
from indexer.store import IndexVersion, read_manifest, version_dir
from tests.indexer.conftest import BuiltIndex


def _vectors_by_id(version: IndexVersion) -> dict[tuple[str, str], np.ndarray]:
    out: dict[tuple[str, str], np.ndarray] = {}
    for modality, count in (("images", version.image_count), ("captions", version.caption_count)):
        rows = list(range(count))
        stored = version.reconstruct(modality, rows)  # type: ignore[arg-type]
        records = (
            version.image_records(rows) if modality == "images" else version.caption_records(rows)
        )
        for record, vector in zip(records, stored, strict=True):
            out[(modality, record.id)] = vector
    return out


def test_an_onnx_build_matches_the_torch_build_and_records_its_runtime(
    built: BuiltIndex, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("onnxruntime")
    root = tmp_path / "root"
    code = main(
        [
            "-q", "build", "--runtime", "onnx", "--model", str(built.model_dir),
            "--out", str(root), "--images", str(built.gallery.folder),
            "--captions", str(built.gallery.folder.parent / "captions.jsonl"),
            "--workers", "1", "--batch-size", "4", "--shard-size", "8",
        ]
    )  # fmt: skip
    assert code == 0
    with IndexVersion.open(built.root) as torch_version, IndexVersion.open(root) as onnx_version:
        assert torch_version.runtime == "torch" and onnx_version.runtime == "onnx"
        torch_vectors, onnx_vectors = _vectors_by_id(torch_version), _vectors_by_id(onnx_version)
        manifest = onnx_version.manifest.to_dict()
    # The same files indexed and skipped (the bad-file rules do not depend on the runtime).
    assert sorted(onnx_vectors) == sorted(torch_vectors)
    assert (
        manifest["skipped_by_reason"]
        == read_manifest(version_dir(built.root, built.version)).to_dict()["skipped_by_reason"]
    )
    cosines = [float(onnx_vectors[key] @ torch_vectors[key]) for key in torch_vectors]
    assert min(cosines) >= 0.99, cosines
    assert manifest["model"]["runtime"] == manifest["build"]["runtime"] == "onnx"
    assert manifest["model"]["runtime_check"]["min_cosine"] >= 0.99
    assert main(["info", str(root)]) == 0
    assert "runtime      onnx (checked against torch fp32: min cosine" in capsys.readouterr().out


def test_a_torch_build_records_torch_and_an_old_manifest_reads_as_torch(
    built: BuiltIndex, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    manifest = read_manifest(version_dir(built.root, built.version)).to_dict()
    assert manifest["model"]["runtime"] == "torch" and manifest["model"]["runtime_check"] is None
    # A manifest from before runtimes: "model" has no runtime keys.
    root = tmp_path / "old"
    vectors = np.eye(4, dtype=np.float32)
    rows = [publish.CaptionRow(i, f"c{i}", f"caption {i}", None, None) for i in range(4)]
    publish.publish_vectors(
        root,
        fingerprint="a" * 64,
        caption_rows=rows,
        caption_vectors=vectors,
        extra={"model": {"fingerprint": "a" * 64, "embedding_dim": 4}},
    )
    with IndexVersion.open(root) as version:
        assert "runtime" not in version.manifest.to_dict()["model"]
        assert version.runtime == version.manifest.runtime == "torch"
    assert main(["info", str(root)]) == 0
    assert "runtime      torch (not recorded: an older build)" in capsys.readouterr().out


def test_an_unavailable_runtime_is_a_usage_error_before_any_encoding(
    built: BuiltIndex,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    import model.runtime

    def refuse(*args: object, **kwargs: object) -> object:
        raise model.runtime.RuntimeUnavailable("refused by its check: min cosine 0.42")

    monkeypatch.setattr(model.runtime, "load_encoder", refuse)
    root = tmp_path / "root"
    base = ["build", "--model", str(built.model_dir), "--out", str(root)]
    code = main([*base, "--captions", str(built.gallery.folder.parent / "captions.jsonl"),
                 "--runtime", "onnx-int8"])  # fmt: skip
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --runtime onnx-int8: refused by its check: min cosine 0.42")
    assert not (root / "CURRENT").exists()
    assert main([*base, "--images", str(built.gallery.folder), "--runtime", "tpu"]) == 2
    assert "--runtime" in capsys.readouterr().err
    code = main([*base, "--images", str(built.gallery.folder), "--runtime", "onnx",
                 "--dtype", "bfloat16"])  # fmt: skip
    assert code == 2
    assert "--dtype bfloat16 applies to --runtime torch only" in capsys.readouterr().err


def test_the_cli_offers_every_runtime_the_model_has() -> None:
    parser = build_parser()
    build = next(
        action.choices["build"]
        for action in parser._actions
        if getattr(action, "choices", None) and "build" in action.choices  # type: ignore[operator]
    )
    runtime = next(action for action in build._actions if action.dest == "runtime")
    assert set(runtime.choices or ()) == set(RUNTIME_OPTIONS)
    assert runtime.default == "torch"
