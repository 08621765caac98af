"""Real builds with the tiny ViLT: bad files, search equality, verify, failures, fingerprints."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from indexer.cli import main
from indexer.store import (
    IndexVersion,
    list_versions,
    read_current,
    read_manifest,
    verify_version,
    version_dir,
)
from model import VLDeformer
from model.images import open_image
from model.testing import make_tiny_vilt
from tests.indexer.conftest import BuiltIndex
from tests.indexer.gallery import GallerySpec


@pytest.fixture(scope="module")
def tiny_model(tiny_vilt_dir: Path) -> VLDeformer:
    return VLDeformer.from_pretrained(tiny_vilt_dir, device="cpu")


def test_build_skips_each_kind_of_bad_file_and_counts_are_right(built: BuiltIndex) -> None:
    manifest = read_manifest(version_dir(built.root, built.version)).to_dict()
    spec = built.gallery
    assert manifest["counts"]["images"] == len(spec.good)
    assert manifest["counts"]["ignored_files"] == spec.ignored
    skipped_images = {s["id"]: s for s in manifest["skipped"] if s["modality"] == "images"}
    assert {image_id: s["reason"] for image_id, s in skipped_images.items()} == spec.bad
    assert all(s["detail"] for s in skipped_images.values())
    assert manifest["skipped_by_reason"]["unsupported_format"] == 3
    assert manifest["counts"]["captions"] == len(built.captions)
    assert manifest["counts"]["captions_linked_to_images"] == 12  # 6 images x 2; 2 unlinked
    assert (
        manifest["model"]["fingerprint"] == VLDeformer.from_pretrained(built.model_dir).fingerprint
    )
    assert manifest["build"]["images"]["encoded"] == len(spec.good)
    for name in ("images", "captions"):
        assert manifest["indexes"][name]["type"] == "flat"  # auto: a small collection
        assert manifest["indexes"][name]["recall_at_10"] == 1.0
    assert set(manifest["files"]) == {"images.faiss", "captions.faiss", "metadata.sqlite"}

    with IndexVersion.open(built.root, verify=True) as version:
        assert version.version == built.version
        assert (version.image_count, version.caption_count) == (len(spec.good), len(built.captions))
        for image_id in spec.good:
            record = version.image_by_id(image_id)
            assert record is not None
            assert Path(record.path).is_absolute() and Path(record.path).is_file()
            assert Path(record.path) == (spec.folder / image_id).resolve()
        assert version.image_by_id("bomb.png") is None
        linked = version.image_by_id(spec.good[0])
        assert linked is not None
        assert linked.captions == tuple(
            c["caption"] for c in built.captions if c.get("image") == spec.good[0]
        )
        captions = version.caption_records(range(version.caption_count))
        by_id = {c.id: c for c in captions}
        assert by_id["cap-0-0"].image_id == spec.good[0]
        assert by_id["free-1"].image_id is None
        assert by_id["free-2"].image_id is None  # names an image that is not in the gallery


def test_flat_search_equals_brute_force_numpy(built: BuiltIndex, tiny_model: VLDeformer) -> None:
    with IndexVersion.open(built.root) as version:
        records = version.image_records(range(version.image_count))
        xb = tiny_model.encode_images([open_image(r.path) for r in records])
        np.testing.assert_allclose(
            version.reconstruct("images", range(version.image_count)), xb, atol=1e-5
        )
        texts = [c["caption"] for c in built.captions]
        xq = tiny_model.encode_text(texts)
        k = version.image_count + 3  # more than there are: the tail must be -1
        distances, rows = version.search_images(xq, k)
        _assert_same_as_brute_force(xq, xb, distances, rows)

        caption_vectors = tiny_model.encode_text(
            [c.caption for c in version.caption_records(range(version.caption_count))]
        )
        distances, rows = version.search_captions(xb, 5)
        _assert_same_as_brute_force(xb, caption_vectors, distances, rows)


def _assert_same_as_brute_force(
    xq: np.ndarray, xb: np.ndarray, distances: np.ndarray, rows: np.ndarray
) -> None:
    scores = xq @ xb.T  # (nq, nb)
    n = xb.shape[0]
    k = rows.shape[1]
    assert (rows[:, n:] == -1).all()
    found = min(k, n)
    expected = -np.sort(-scores, axis=1)[:, :found]
    np.testing.assert_allclose(distances[:, :found], expected, atol=1e-5)
    # The rows returned really have those scores (equal order up to exact ties).
    np.testing.assert_allclose(
        np.take_along_axis(scores, rows[:, :found], axis=1), distances[:, :found], atol=1e-5
    )
    assert all(len(set(r[:found])) == found for r in rows)


def test_search_checks_its_inputs(built: BuiltIndex) -> None:
    with IndexVersion.open(built.root) as version:
        good = np.zeros((2, version.dim), dtype=np.float32)
        with pytest.raises(ValueError, match="float64"):
            version.search_images(good.astype(np.float64), 3)
        with pytest.raises(ValueError, match=r"\(2, 5\)"):
            version.search_images(np.zeros((2, 5), dtype=np.float32), 3)
        with pytest.raises(ValueError, match="C-contiguous"):
            version.search_images(np.asfortranarray(np.ones((2, version.dim), np.float32)), 3)
        with pytest.raises(ValueError, match="k must be"):
            version.search_captions(good, 0)
        with pytest.raises(ValueError, match="row -1"):
            version.image_records([0, -1])


def test_verify_detects_one_flipped_byte_in_any_file(built: BuiltIndex, tmp_path: Path) -> None:
    assert verify_version(built.root) == []
    files = sorted(p.name for p in version_dir(built.root, built.version).iterdir())
    assert {"manifest.json", "manifest.json.sha256", "metadata.sqlite"} <= set(files)
    for name in files:
        root = tmp_path / name
        shutil.copytree(built.root, root, symlinks=True)
        path = version_dir(root, built.version) / name
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0x01
        path.write_bytes(bytes(data))
        problems = verify_version(root)
        assert problems, f"a flipped byte in {name} went unnoticed"
        assert main(["verify", str(root)]) == 1


def test_failed_build_leaves_the_published_version(
    built_copy: Path, tiny_vilt_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    before = read_current(built_copy)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "a.jpg").write_bytes(b"")
    (broken / "b.png").write_bytes(b"not a png")
    code = main(["build", "--model", str(tiny_vilt_dir), "--out", str(built_copy),
                 "--images", str(broken), "--workers", "0"])  # fmt: skip
    assert code == 1
    assert "no usable image" in capsys.readouterr().err
    assert read_current(built_copy) == before
    assert list_versions(built_copy) == [before]
    assert verify_version(built_copy) == []


def test_fingerprint_mismatch_is_detected_by_verify(built: BuiltIndex, tmp_path: Path) -> None:
    other_dir = make_tiny_vilt(tmp_path / "other", seed=1)
    other = VLDeformer.from_pretrained(other_dir, device="cpu").fingerprint
    problems = verify_version(built.root, fingerprint=other)
    assert any("fingerprint mismatch" in p for p in problems)
    assert main(["verify", str(built.root), "--model", str(other_dir)]) == 1
    assert main(["verify", str(built.root), "--model", str(built.model_dir)]) == 0
    own = read_manifest(version_dir(built.root, built.version)).model.fingerprint
    assert main(["verify", str(built.root), "--fingerprint", own, "--no-self-query"]) == 0


def test_build_from_a_manifest_with_captions_prints_a_summary(
    tiny_vilt_dir: Path, built: BuiltIndex, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    spec = built.gallery
    manifest = tmp_path / "gallery.jsonl"
    lines = [
        {"id": "first", "path": str(spec.folder / spec.good[0]), "captions": ["a red circle"]},
        {"id": "second", "path": str(spec.folder / spec.good[1])},
        {"id": "broken", "path": str(spec.folder / "truncated.png")},
    ]
    manifest.write_text("".join(json.dumps(line) + "\n" for line in lines))
    root = tmp_path / "root"
    threads = torch.get_num_threads()
    code = main(["-q", "build", "--model", str(tiny_vilt_dir), "--out", str(root),
                 "--images", str(manifest), "--workers", "0", "--index", "ivf",
                 "--threads", "1"])  # fmt: skip
    assert code == 0
    assert torch.get_num_threads() == threads  # the build restores the thread count
    out = capsys.readouterr().out
    assert "2 images, 0 captions, 1 skipped (corrupt_image: 1)" in out
    assert "truncated.png: corrupt_image" in out
    with IndexVersion.open(root, verify=True) as version:
        assert version.image_by_id("first").captions == ("a red circle",)  # type: ignore[union-attr]
        assert version.index_settings("images")["type"] == "ivf"
        assert "nprobe" in version.index_settings("images")["params"]


@pytest.mark.parametrize("workers", [0, 1])
def test_max_pixels_is_honoured_at_its_boundary(
    tiny_vilt_dir: Path, tmp_path: Path, workers: int
) -> None:
    folder = tmp_path / "images"
    folder.mkdir()
    Image.new("RGB", (32, 32), "red").save(folder / "at_limit.png")  # 1024 pixels
    Image.new("RGB", (41, 25), "blue").save(folder / "one_over.png")  # 1025 pixels
    root = tmp_path / "root"
    code = main(["-q", "build", "--model", str(tiny_vilt_dir), "--out", str(root),
                 "--images", str(folder), "--workers", str(workers), "--threads", "1",
                 "--max-pixels", "1024"])  # fmt: skip
    assert code == 0
    manifest = read_manifest(version_dir(root, read_current(root) or "")).to_dict()
    assert manifest["build"]["config"]["max_pixels"] == 1024
    assert manifest["counts"]["images"] == 1
    assert [(s["id"], s["reason"]) for s in manifest["skipped"]] == [
        ("one_over.png", "too_many_pixels")
    ]
    with IndexVersion.open(root) as version:
        assert version.image_by_id("at_limit.png") is not None


def test_images_of_any_aspect_ratio_are_indexed_not_skipped(
    tiny_vilt_dir: Path, tmp_path: Path
) -> None:
    """Banners and 1-pixel lines used to be skipped as decode_failed (issue 10)."""
    folder = tmp_path / "images"
    folder.mkdir()
    sizes = {"banner.png": (700, 100), "gradient.png": (256, 10), "column.png": (1, 40),
             "row.png": (40, 1), "dot.png": (1, 1), "square.png": (32, 32)}  # fmt: skip
    for name, size in sizes.items():
        Image.new("RGB", size, (30, 160, 90)).save(folder / name)
    root = tmp_path / "root"
    code = main(["-q", "build", "--model", str(tiny_vilt_dir), "--out", str(root),
                 "--images", str(folder), "--workers", "0", "--threads", "1"])  # fmt: skip
    assert code == 0
    manifest = read_manifest(version_dir(root, read_current(root) or "")).to_dict()
    assert manifest["skipped"] == [] and manifest["counts"]["images"] == len(sizes)
    with IndexVersion.open(root) as version:
        assert all(version.image_by_id(name) is not None for name in sizes)
        stored = version.reconstruct("images", range(version.image_count))
        np.testing.assert_allclose(np.linalg.norm(stored, axis=1), 1.0, atol=1e-5)


CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
# Every way the indexer can run the model: today torch, on the CPU in float32 or bfloat16 and
# on a GPU. A new runtime (e.g. ONNX) gets a row here.
RUNTIMES = [
    pytest.param("cpu", "float32", id="torch-cpu-float32"),
    pytest.param("cpu", "bfloat16", id="torch-cpu-bfloat16"),
    pytest.param("cuda", "auto", id="torch-cuda", marks=[pytest.mark.gpu, CUDA]),
]


@pytest.mark.parametrize(("device", "dtype"), RUNTIMES)
def test_stored_vectors_are_unit_norm(
    tiny_vilt_dir: Path, gallery: GallerySpec, captions_path: Path, tmp_path: Path,
    device: str, dtype: str,
) -> None:  # fmt: skip
    """Inner product is cosine only over unit vectors: every stored row has norm 1."""
    root = tmp_path / "root"
    code = main(["-q", "build", "--model", str(tiny_vilt_dir), "--out", str(root),
                 "--images", str(gallery.folder), "--captions", str(captions_path),
                 "--workers", "0", "--threads", "1",
                 "--device", device, "--dtype", dtype])  # fmt: skip
    assert code == 0
    with IndexVersion.open(root) as version:
        assert version.manifest.normalized is True
        for modality, count in (
            ("images", version.image_count),
            ("captions", version.caption_count),
        ):
            stored = version.reconstruct(modality, range(count))  # type: ignore[arg-type]
            assert stored.dtype == np.float32 and len(stored) == count > 0
            np.testing.assert_allclose(np.linalg.norm(stored, axis=1), 1.0, atol=1e-5)
