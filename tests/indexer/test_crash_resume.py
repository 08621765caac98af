"""A build killed with SIGKILL mid-encode leaves CURRENT alone, and --resume finishes it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from indexer.cli import main
from indexer.store import (
    IndexVersion,
    list_versions,
    read_current,
    read_manifest,
    verify_version,
    version_dir,
)
from tests.indexer.conftest import BuiltIndex

REPO = Path(__file__).resolve().parents[2]


def _vectors(root: Path, version: str) -> tuple[list[str], np.ndarray, list[str], np.ndarray]:
    with IndexVersion.open(root, version) as opened:
        image_ids = [r.id for r in opened.image_records(range(opened.image_count))]
        caption_ids = [r.id for r in opened.caption_records(range(opened.caption_count))]
        return (
            image_ids,
            opened.reconstruct("images", range(opened.image_count)),
            caption_ids,
            opened.reconstruct("captions", range(opened.caption_count)),
        )


@pytest.mark.slow
def test_sigkill_mid_encode_keeps_current_and_resume_matches_a_full_build(
    built: BuiltIndex, built_copy: Path, captions_path: Path
) -> None:
    root = built_copy
    published = read_current(root)
    args = [
        "build", "--model", str(built.model_dir), "--out", str(root),
        "--images", str(built.gallery.folder), "--captions", str(captions_path),
        "--workers", "0", "--batch-size", "4", "--shard-size", "8",
    ]  # fmt: skip
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
    }
    process = subprocess.Popen(
        [sys.executable, "-m", "indexer", "-q", *args, "--pause-after-shards", "2"],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        shards: list[Path] = []
        while time.monotonic() < deadline and process.poll() is None:
            shards = sorted(root.glob(".tmp-*/shards/images/*.json"))
            if len(shards) >= 2:
                break
            time.sleep(0.1)
        assert process.poll() is None, process.communicate()[1].decode()[-2000:]
        assert len(shards) >= 2, "the build never wrote its first shards"
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == -signal.SIGKILL

    # The killed build published nothing; the previous version is untouched and sound.
    assert read_current(root) == published
    assert list_versions(root) == [published]
    assert verify_version(root) == []
    assert len(list(root.glob(".tmp-*"))) == 1

    assert main(["-q", *args, "--resume"]) == 0
    resumed = read_current(root)
    assert resumed != published
    manifest = read_manifest(version_dir(root, resumed))
    assert manifest["build"]["resumed_items"] == 16  # the two finished shards of 8 images
    assert manifest["build"]["images"]["resumed"] == 16
    assert not list(root.glob(".tmp-*"))
    assert verify_version(root) == []

    full = _vectors(built.root, built.version)
    again = _vectors(root, resumed)
    assert again[0] == full[0] and again[2] == full[2]
    np.testing.assert_allclose(again[1], full[1], atol=1e-6)
    np.testing.assert_allclose(again[3], full[3], atol=1e-6)


def test_a_normal_build_removes_stale_temporary_directories(
    built: BuiltIndex, built_copy: Path, captions_path: Path
) -> None:
    stale = built_copy / ".tmp-20200101T000000Z-abcdef"
    (stale / "shards").mkdir(parents=True)
    code = main(["-q", "build", "--model", str(built.model_dir), "--out", str(built_copy),
                 "--captions", str(captions_path)])  # fmt: skip
    assert code == 0
    assert not stale.exists()
    assert len(list_versions(built_copy)) == 2


def test_resume_without_a_matching_build_starts_afresh(
    built: BuiltIndex, built_copy: Path, captions_path: Path
) -> None:
    code = main(["-q", "build", "--model", str(built.model_dir), "--out", str(built_copy),
                 "--captions", str(captions_path), "--resume"])  # fmt: skip
    assert code == 0
    manifest = read_manifest(version_dir(built_copy, read_current(built_copy) or ""))
    assert manifest["build"]["resumed_items"] == 0
    assert manifest["counts"]["images"] == 0
