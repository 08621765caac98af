"""On-disk IVF-PQ: vector blocks, the train/fill/merge build, reading it back after the
version directory moved, and a whole version built from blocks through the store."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import pytest

from indexer.faiss_index import IndexPolicy, exact_neighbours, recall_at_k
from indexer.ondisk import (
    READ_FLAGS,
    VectorBlocks,
    build_ondisk_ivfpq,
    fill_blocks,
    ivfdata_path,
    merge_blocks,
    read_ondisk_index,
    train_ivfpq,
    uses_ondisk,
)
from indexer.publish import (
    ImageRow,
    base_manifest,
    publish_version,
    stage_version,
    write_manifest,
)
from indexer.selection import FilterPolicy
from indexer.store import IndexVersion, verify_version

DIM = 64
N = 6000
REPO = Path(__file__).resolve().parents[2]


def low_rank_rows(n: int, seed: int, d: int = DIM) -> np.ndarray:
    """Unit vectors near an 8-d subspace, float32 ``(n, d)``: like real embeddings, of low
    intrinsic dimension, so PQ codes keep neighbourhoods (isotropic noise would not)."""
    basis = np.random.default_rng(99).standard_normal((8, d)).astype(np.float32)
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, 8)).astype(np.float32) @ basis
    x += 0.05 * rng.standard_normal((n, d)).astype(np.float32)
    return np.ascontiguousarray(x / np.linalg.norm(x, axis=1, keepdims=True))


XB = low_rank_rows(N, seed=0)
XQ = low_rank_rows(40, seed=1)
POLICY = IndexPolicy(
    ivf_nlist=32, tuning_queries=100, ondisk_min_vectors=0, ondisk_fill_vectors=2500
)


def memmap_blocks(directory: Path, xb: np.ndarray, sizes: list[int]) -> list[np.ndarray]:
    """``xb`` saved as .npy blocks of ``sizes`` rows and loaded back read-only (np.memmap)."""
    blocks, start = [], 0
    for position, size in enumerate(sizes):
        path = directory / f"block-{position}.npy"
        np.save(path, xb[start : start + size])
        blocks.append(np.load(path, mmap_mode="r"))
        start += size
    assert start == len(xb)
    return blocks


# ---------------------------------------------------------------------- vector blocks
def test_vector_blocks_read_memmaps_in_row_order(tmp_path: Path) -> None:
    blocks = VectorBlocks(memmap_blocks(tmp_path, XB, [1000, 0, 2500, 2500]), "images")
    assert len(blocks) == N and blocks.shape == (N, DIM)
    rows = np.array([5999, 0, 3500, 999, 1000, 3499])
    np.testing.assert_array_equal(blocks.take(rows), XB[rows])
    np.testing.assert_array_equal(blocks.concatenate(), XB)
    chunks = list(blocks.chunks(rows=700))
    assert [start for start, _ in chunks][:3] == [0, 700, 1000]
    assert all(chunk.flags.c_contiguous and chunk.dtype == np.float32 for _, chunk in chunks)
    np.testing.assert_array_equal(np.concatenate([chunk for _, chunk in chunks]), XB)


def test_vector_blocks_name_the_bad_block() -> None:
    with pytest.raises(ValueError, match=r"images: block 1 must be a float32.*float64"):
        VectorBlocks([XB[:10], XB[10:20].astype(np.float64)], "images")
    with pytest.raises(ValueError, match=r"several dimensions \[32, 64\]"):
        VectorBlocks([XB[:10], np.ascontiguousarray(XB[:10, :32])], "images")
    with pytest.raises(ValueError, match=r"rows must be in 0\.\.9"):
        VectorBlocks(XB[:10]).take([10])


def test_ondisk_is_used_for_ivfpq_from_the_policy_threshold() -> None:
    policy = IndexPolicy(ondisk_min_vectors=1000)
    assert uses_ondisk("ivfpq", 1000, policy) and not uses_ondisk("ivfpq", 999, policy)
    assert not uses_ondisk("ivf", 10**9, policy)
    with pytest.raises(ValueError, match="ondisk_min_vectors"):
        IndexPolicy(ondisk_min_vectors=-1)


# ---------------------------------------------------------------------- build
def test_merged_ondisk_index_equals_one_filled_in_memory(tmp_path: Path) -> None:
    trained = train_ivfpq(XB[::3].copy(), nlist=32, m=16, nbits=8, policy=POLICY)
    reference = faiss.clone_index(trained)
    reference.add_with_ids(XB, np.arange(N, dtype=np.int64))
    files = fill_blocks(trained, VectorBlocks([XB[:2000], XB[2000:]]), tmp_path, block_rows=1500)
    assert len(files) == 2  # written once holding >= block_rows rows: whole chunks of input
    merge_blocks(trained, files, tmp_path / "images.faiss")
    ondisk = read_ondisk_index(tmp_path / "images.faiss")
    assert ondisk.ntotal == N
    for index in (reference, ondisk):
        faiss.extract_index_ivf(index).nprobe = 8
    reference_d, reference_i = reference.search(XQ, 10)
    ondisk_d, ondisk_i = ondisk.search(XQ, 10)
    np.testing.assert_array_equal(ondisk_i, reference_i)
    np.testing.assert_allclose(ondisk_d, reference_d, rtol=1e-5)


def test_ondisk_index_survives_a_rename_of_its_directory(tmp_path: Path) -> None:
    staging = tmp_path / ".tmp-v" / "version"
    staging.mkdir(parents=True)
    built, timings = build_ondisk_ivfpq(VectorBlocks(XB), staging / "images.faiss", POLICY)
    assert built.layout == "ondisk" and built.files == ("images.faiss", "images.ivfdata")
    assert sorted(p.name for p in staging.iterdir()) == ["images.faiss", "images.ivfdata"]
    assert min(timings.train, timings.fill, timings.merge) >= 0
    # Only the base name is recorded, never the staging path.
    assert str(staging).encode() not in (staging / "images.faiss").read_bytes()
    published = tmp_path / "versions" / "v"
    published.parent.mkdir()
    os.rename(staging, published)
    index = read_ondisk_index(published / "images.faiss")
    index.nprobe = int(built.params["nprobe"])
    _, found = index.search(XQ, 10)
    assert recall_at_k(found, exact_neighbours(XQ, XB, 10)) >= 0.6
    assert built.describe().to_dict()["layout"] == "ondisk"


def run_isolated(code: str) -> subprocess.CompletedProcess[str]:
    """Run ``code`` in a fresh interpreter: a faiss segfault fails the test, not pytest."""
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )


@pytest.fixture(scope="module")
def published_index(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An on-disk IVF-PQ written in a staging directory that was then renamed."""
    root = tmp_path_factory.mktemp("ondisk-read")
    staging = root / "staging"
    staging.mkdir()
    build_ondisk_ivfpq(VectorBlocks(XB), staging / "images.faiss", POLICY)
    os.rename(staging, root / "published")
    return root / "published" / "images.faiss"


def test_the_store_read_flags_search_after_a_rename(published_index: Path) -> None:
    """What the store does (read with READ_FLAGS, direct map, search with a selector,
    reconstruct) survives, in a separate process."""
    assert READ_FLAGS & faiss.IO_FLAG_MMAP != faiss.IO_FLAG_MMAP
    result = run_isolated(
        f"""
        import faiss, numpy as np
        from indexer.ondisk import read_ondisk_index
        from indexer.selection import prepare_for_selection
        index = read_ondisk_index({str(published_index)!r})
        prepare_for_selection(index)
        xq = np.ones((1, index.d), dtype=np.float32) / index.d ** 0.5
        index.search(xq, 10)
        bitmap = np.packbits(np.arange(index.ntotal) % 2 == 0, bitorder="little")
        selector = faiss.IDSelectorBitmap(index.ntotal, faiss.swig_ptr(bitmap))
        _, rows = index.search(xq, 10, params=faiss.SearchParametersIVF(sel=selector, nprobe=8))
        assert (rows % 2 == 0).all(), rows
        assert index.reconstruct(3).shape == (index.d,)
        print("ok")
        """
    )
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-2000:]


@pytest.mark.skipif(not faiss.__version__.startswith("1.15."), reason="pinned for faiss 1.15")
def test_mmap_read_flag_crashes_searches_on_faiss_1_15(published_index: Path) -> None:
    """Why READ_FLAGS avoid IO_FLAG_MMAP: on faiss-cpu 1.15 an on-disk IVF-PQ read with it
    segfaults on its first search. If this starts passing searches, IO_FLAG_MMAP is worth
    another look (it would also map the index file itself)."""
    result = run_isolated(
        f"""
        import faiss, numpy as np
        flags = faiss.IO_FLAG_MMAP | faiss.IO_FLAG_ONDISK_SAME_DIR
        index = faiss.read_index({str(published_index)!r}, flags)
        index.search(np.ones((1, index.d), dtype=np.float32), 10)
        print("searched")
        """
    )
    assert result.returncode == -signal.SIGSEGV, (result.returncode, result.stderr[-500:])
    assert "searched" not in result.stdout


# ---------------------------------------------------------------------- a whole version
def album_of(row: int) -> str:
    return "holiday" if row % 4 == 0 else "work"


@pytest.fixture(scope="module")
def ondisk_root(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """A version staged from memmap blocks with an on-disk IVF-PQ, then published."""
    root = tmp_path_factory.mktemp("ondisk-version")
    blocks = memmap_blocks(root, XB, [2000, 2000, 2000])
    version = "20261130T000000Z-abc123"
    staged = root / f".tmp-{version}" / "version"
    staged.mkdir(parents=True)
    images = [ImageRow(i, f"img-{i}", f"/g/{i}.png", (), {"album": album_of(i)}) for i in range(N)]
    indexes = stage_version(
        staged, image_rows=images, image_vectors=blocks, index="ivfpq", policy=POLICY
    )
    write_manifest(staged, base_manifest(version, "f" * 64, DIM, indexes, images, []))
    publish_version(root, staged, version)
    return root, version


def test_a_version_built_from_blocks_is_on_disk_and_listed(ondisk_root: tuple[Path, str]) -> None:
    root, _ = ondisk_root
    with IndexVersion.open(root, verify=True) as opened:
        settings = opened.index_settings("images")
        assert settings["layout"] == "ondisk" and settings["files"] == [
            "images.faiss",
            "images.ivfdata",
        ]
        assert {"images.faiss", "images.ivfdata"} <= set(opened.manifest.files)
        assert opened.image_count == N


def test_an_ondisk_version_searches_reconstructs_and_filters(
    ondisk_root: tuple[Path, str],
) -> None:
    root, _ = ondisk_root
    exact = exact_neighbours(XQ, XB, 10)
    holiday = [row for row in range(N) if album_of(row) == "holiday"]
    # Small selections are searched over reconstructed codes; large ones with the selector.
    for policy in (FilterPolicy(), FilterPolicy(exact_max_rows=0)):
        with IndexVersion.open(root, filter_policy=policy) as opened:
            _, rows = opened.search_images(XQ, 10)
            assert rows.shape == (len(XQ), 10) and (rows >= 0).all()
            assert recall_at_k(rows, exact) >= 0.6
            vectors = opened.reconstruct("images", [0, 17, 5999])
            cosines = (vectors * XB[[0, 17, 5999]]).sum(axis=1)
            assert vectors.shape == (3, DIM) and (cosines > 0.8).all()  # PQ: approximate
            selection = opened.select("images", {"album": "holiday"})
            assert selection.rows.tolist() == holiday
            _, selected = opened.search_images(XQ, 10, selection=selection)
            assert (selected >= 0).all() and set(selected.ravel().tolist()) <= set(holiday)
            scores = XQ @ XB[holiday].T
            truth = np.asarray(holiday)[np.argsort(-scores, axis=1)[:, :10]]
            assert recall_at_k(selected, truth) >= 0.6


def test_a_tampered_ivfdata_fails_verification(
    ondisk_root: tuple[Path, str], tmp_path: Path
) -> None:
    root, version = ondisk_root
    assert verify_version(root, version) == []
    ivfdata = root / "versions" / version / "images.ivfdata"
    original = ivfdata.read_bytes()
    try:
        tampered = bytearray(original)
        tampered[len(tampered) // 2] ^= 0xFF
        ivfdata.write_bytes(bytes(tampered))
        problems = verify_version(root, version)
        assert problems and "images.ivfdata does not match its sha256" in problems[0]
        ivfdata.unlink()
        assert any("missing file" in p and "images.ivfdata" in p for p in verify_version(root))
    finally:
        ivfdata.write_bytes(original)
    assert verify_version(root, version) == []


def test_stage_version_concatenates_blocks_for_in_memory_kinds(tmp_path: Path) -> None:
    images = [ImageRow(i, f"img-{i}", f"/g/{i}.png", ()) for i in range(N)]
    indexes: dict[str, Any] = stage_version(
        tmp_path, image_rows=images, image_vectors=[XB[:100], XB[100:]], index="flat"
    )
    assert indexes["images"].layout == "in_memory"
    assert not ivfdata_path(tmp_path / "images.faiss").exists()
    index = faiss.read_index(str(tmp_path / "images.faiss"))
    np.testing.assert_array_equal(index.reconstruct_n(0, N), XB)
    with pytest.raises(ValueError, match="images: 5999 vectors for 6000 rows"):
        stage_version(tmp_path, image_rows=images, image_vectors=[XB[:100], XB[101:]])


def test_concurrent_searches_of_an_ondisk_version_agree_with_serial_ones(
    ondisk_root: tuple[Path, str],
) -> None:
    root, _ = ondisk_root
    with IndexVersion.open(root) as opened:
        selection = opened.select("images", {"album": "work"})
        serial = [opened.search_images(XQ[i : i + 1], 10, selection=selection)[1] for i in range(8)]
        with ThreadPoolExecutor(max_workers=4) as pool:
            parallel = list(
                pool.map(
                    lambda i: opened.search_images(XQ[i : i + 1], 10, selection=selection)[1],
                    range(8),
                )
            )
    for one, other in zip(serial, parallel, strict=True):
        np.testing.assert_array_equal(one, other)


def test_a_truncated_ivfdata_is_refused_not_a_crash(
    ondisk_root: tuple[Path, str], tmp_path: Path
) -> None:
    """Mapped, a short ivfdata would kill the process with SIGBUS on first access; opening it
    without verify (the service's --no-verify-on-start) must refuse it with a message."""
    root, version = ondisk_root
    copy = tmp_path / "copy"
    shutil.copytree(root, copy)
    data = copy / "versions" / version / "images.ivfdata"
    os.truncate(data, data.stat().st_size // 2)
    result = run_isolated(
        f"""
        from pathlib import Path
        from indexer.store import CorruptVersionError, IndexVersion
        try:
            IndexVersion.open(Path({str(copy)!r}), {version!r})
        except CorruptVersionError as exc:
            print("refused:", exc)
        """
    )
    assert result.returncode == 0, (result.returncode, result.stderr[-500:])
    assert "refused:" in result.stdout and "truncated" in result.stdout


def test_faiss_messages_stay_off_the_cli_stdout(
    ondisk_root: tuple[Path, str], capfd: pytest.CaptureFixture[str]
) -> None:
    """FAISS printf()s on every on-disk read; `vldeformer-index verify` prints only its verdict."""
    from indexer.cli import main

    root, _ = ondisk_root
    assert main(["verify", str(root)]) == 0
    out, err = capfd.readouterr()
    assert out.startswith("OK: version") and "IO_FLAG" not in out
    assert "IO_FLAG_ONDISK_SAME_DIR" in err
