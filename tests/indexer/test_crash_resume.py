"""A build killed with SIGKILL mid-encode or mid-publish leaves CURRENT on a sound version, and
--resume finishes it."""

from __future__ import annotations

import dataclasses
import math
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from indexer.build import BuildConfig, run_build
from indexer.cli import main
from indexer.shards import Shard
from indexer.store import (
    CURRENT_FILE,
    IndexVersion,
    list_versions,
    read_current,
    read_manifest,
    verify_version,
    version_dir,
)
from tests.indexer.conftest import BuiltIndex

REPO = Path(__file__).resolve().parents[2]


class _Interrupted(Exception):
    """Raised by the test hook to stop a build after some shards, leaving its .tmp dir."""


def _interrupt_after(shards: int) -> Callable[[Shard], None]:
    written = 0

    def hook(shard: Shard) -> None:
        nonlocal written
        written += 1
        if written >= shards:
            raise _Interrupted(f"stopped after shard {shard.index}")

    return hook


def _caption_config(
    built: BuiltIndex, root: Path, captions_path: Path, **changes: Any
) -> BuildConfig:
    """A captions-only build in shards of 2 captions."""
    settings: dict[str, Any] = {
        "model_dir": built.model_dir,
        "out_root": root,
        "captions": captions_path,
        "device": "cpu",
        "shard_size": 2,
        **changes,
    }
    return BuildConfig(**settings)


def _child_env() -> dict[str, str]:
    return {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
    }


def _kill_when(command: list[str], ready: Callable[[], bool], waiting_for: str) -> None:
    """Run ``command`` in a child process and SIGKILL it as soon as ``ready()`` holds."""
    process = subprocess.Popen(
        command, cwd=REPO, env=_child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and process.poll() is None and not ready():
            time.sleep(0.05)
        assert process.poll() is None, process.communicate()[1].decode()[-2000:]
        assert ready(), f"the build never reached {waiting_for}"
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == -signal.SIGKILL


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
    paused = [sys.executable, "-m", "tests.indexer.paused_build", "--after-shards", "2", "--"]
    _kill_when(
        [*paused, "-q", *args],
        lambda: len(list(root.glob(".tmp-*/shards/images/*.json"))) >= 2,
        "its first two shards",
    )

    # The killed build published nothing; the previous version is untouched and sound.
    assert read_current(root) == published
    assert list_versions(root) == [published]
    assert verify_version(root) == []
    assert len(list(root.glob(".tmp-*"))) == 1

    assert main(["-q", *args, "--resume"]) == 0
    resumed = read_current(root)
    assert resumed != published
    manifest = read_manifest(version_dir(root, resumed)).to_dict()
    assert manifest["build"]["resumed_items"] == 16  # the two finished shards of 8 images
    assert manifest["build"]["images"]["resumed"] == 16
    assert not list(root.glob(".tmp-*"))
    assert verify_version(root) == []

    full = _vectors(built.root, built.version)
    again = _vectors(root, resumed)
    assert again[0] == full[0] and again[2] == full[2]
    np.testing.assert_allclose(again[1], full[1], atol=1e-6)
    np.testing.assert_allclose(again[3], full[3], atol=1e-6)


@pytest.mark.slow
def test_sigkill_while_publishing_leaves_current_on_the_old_version(
    built: BuiltIndex, built_copy: Path, captions_path: Path, tmp_path: Path
) -> None:
    """Killed after the version directory is in place, just before CURRENT moves."""
    root = built_copy
    published = read_current(root)
    marker = tmp_path / "paused-at-current"
    args = ["-q", "build", "--model", str(built.model_dir), "--out", str(root),
            "--captions", str(captions_path), "--device", "cpu", "--threads", "1"]  # fmt: skip
    _kill_when(
        [sys.executable, "-m", "tests.indexer.paused_build", str(marker), "--", *args],
        lambda: marker.is_file() and marker.read_text().endswith("\n"),
        "the switch of CURRENT",
    )

    # CURRENT still names the old version, which verifies and opens.
    assert read_current(root) == published
    assert verify_version(root) == []
    with IndexVersion.open(root, verify=True) as served:
        assert served.version == published
    # The killed build's version was complete and in place before CURRENT was to name it.
    current_temp = Path(marker.read_text().strip())
    assert current_temp.parent == root and current_temp.is_file()
    killed = current_temp.read_text().strip()
    assert list_versions(root) == sorted([published, killed])
    assert verify_version(root, killed) == []

    # The next build clears what the killed one left and publishes.
    assert main(args) == 0
    latest = read_current(root)
    assert latest not in (published, killed)
    assert verify_version(root) == []
    assert not list(root.glob(f"{CURRENT_FILE}.*.tmp")) and not list(root.glob(".tmp-*"))


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
    manifest = read_manifest(version_dir(built_copy, read_current(built_copy) or "")).to_dict()
    assert manifest["build"]["resumed_items"] == 0
    assert manifest["counts"]["images"] == 0


def test_resume_with_another_dtype_starts_afresh(
    built: BuiltIndex, built_copy: Path, captions_path: Path
) -> None:
    float32 = _caption_config(built, built_copy, captions_path, dtype="float32")
    with pytest.raises(_Interrupted):
        run_build(float32, after_shard=_interrupt_after(2))
    resumed = run_build(dataclasses.replace(float32, dtype="bfloat16", resume=True))
    assert resumed.manifest.to_dict()["build"]["dtype"] == "bfloat16"
    assert resumed.manifest.to_dict()["build"]["resumed_items"] == 0  # no float32 shard mixed in

    # The same interruption resumed with the same dtype does reuse its shards.
    with pytest.raises(_Interrupted):
        run_build(float32, after_shard=_interrupt_after(2))
    resumed = run_build(dataclasses.replace(float32, resume=True))
    assert resumed.manifest.to_dict()["build"]["resumed_items"] == 4


def test_a_shard_record_without_its_full_vectors_is_encoded_again(
    built: BuiltIndex, built_copy: Path, captions_path: Path
) -> None:
    config = _caption_config(built, built_copy, captions_path)
    count = len(built.captions)
    with pytest.raises(_Interrupted):  # every shard written, nothing published
        run_build(config, after_shard=_interrupt_after(math.ceil(count / 2)))
    (shards,) = built_copy.glob(".tmp-*/shards/captions")
    (shards / "000000.npy").unlink()  # a record whose vectors never reached the disk
    dim = np.load(shards / "000001.npy").shape[1]
    np.save(shards / "000001.npy", np.zeros((1, dim), dtype=np.float32))  # one row of two

    result = run_build(dataclasses.replace(config, resume=True))
    assert (
        result.manifest.to_dict()["build"]["resumed_items"] == count - 4
    )  # all but the two broken
    assert verify_version(built_copy) == []
    with IndexVersion.open(built.root, built.version) as full:
        expected = full.reconstruct("captions", range(full.caption_count))
    with IndexVersion.open(built_copy, result.version) as opened:
        assert opened.caption_count == count
        np.testing.assert_allclose(
            opened.reconstruct("captions", range(count)), expected, atol=1e-6
        )
