"""Publishing a version: everything is fsynced before it is renamed or replaced into place, the
version directory is in place before CURRENT names it, and a failure at any step of publishing
leaves CURRENT on a version that verifies."""

from __future__ import annotations

import errno
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from indexer.build import BuildConfig, run_build
from indexer.publish import CaptionRow, ImageRow, publish_vectors, publish_version
from indexer.store import (
    CURRENT_FILE,
    VERSIONS_DIR,
    IndexVersion,
    list_versions,
    read_current,
    verify_version,
    version_dir,
)

Identity = tuple[int, int]  # (st_dev, st_ino): one file or directory, whatever its name
State = tuple[int, int]  # (st_size, st_mtime_ns): changes with every write or directory entry


def _describe_fd(fd: int) -> str:
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:  # no /proc: the message names the descriptor only
        return f"fd {fd}"


def _tree(top: Path) -> dict[Identity, tuple[str, State]]:
    """Every file and directory under ``top`` (itself included): identity -> (path, state)."""
    paths = [top]
    if top.is_dir():
        paths += sorted(top.rglob("*"))
    found = {}
    for path in paths:
        try:
            info = path.lstat()
        except FileNotFoundError:
            continue
        found[(info.st_dev, info.st_ino)] = (str(path), (info.st_size, info.st_mtime_ns))
    return found


@dataclass(frozen=True)
class FsCall:
    """One ``os.fsync`` (of ``identity`` in ``state``), or one ``os.rename`` / ``os.replace``
    of ``source`` (whose whole tree is ``moved``) to ``target``."""

    kind: str  # "fsync", "rename" or "replace"
    name: str  # the file flushed, or the source -> target of a move
    identity: Identity | None = None
    state: State | None = None
    target: Path | None = None
    moved: dict[Identity, tuple[str, State]] = field(default_factory=dict)


class FsCalls:
    """Replaces ``os.fsync``, ``os.rename`` and ``os.replace`` for one test: records every call
    and, with ``fail_at=n``, makes the n-th one raise EIO instead of doing anything."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, fail_at: int | None = None) -> None:
        self.calls: list[FsCall] = []
        self.fail_at = fail_at
        self.failed: FsCall | None = None
        real_fsync, real_rename, real_replace = os.fsync, os.rename, os.replace

        def fsync(fd: int) -> None:
            info = os.fstat(fd)
            identity = (info.st_dev, info.st_ino)
            self._step(
                FsCall("fsync", _describe_fd(fd), identity, (info.st_size, info.st_mtime_ns))
            )
            real_fsync(fd)

        def mover(kind: str, real: Callable[..., None]) -> Callable[..., None]:
            def move(source: Any, target: Any, *args: Any, **kwargs: Any) -> None:
                name = f"{source} -> {target}"
                self._step(FsCall(kind, name, target=Path(target), moved=_tree(Path(source))))
                real(source, target, *args, **kwargs)

            return move

        monkeypatch.setattr(os, "fsync", fsync)
        monkeypatch.setattr(os, "rename", mover("rename", real_rename))
        monkeypatch.setattr(os, "replace", mover("replace", real_replace))

    def _step(self, call: FsCall) -> None:
        if len(self.calls) == self.fail_at:
            self.failed = call
            self.fail_at = None  # later calls (clean-up) go through
            raise OSError(errno.EIO, f"injected failure of {call.kind} {call.name}")
        self.calls.append(call)

    def position(self, kind: str, target: Path) -> int:
        """Index of the one ``kind`` call onto ``target``."""
        found = [i for i, c in enumerate(self.calls) if c.kind == kind and c.target == target]
        assert len(found) == 1, f"expected one {kind} onto {target}, got {len(found)}"
        return found[0]

    def fsynced(self, identity: Identity, state: State | None, start: int, stop: int) -> bool:
        """Was ``identity`` fsynced (in ``state``, if given) by one of calls[start:stop]?"""
        return any(
            c.kind == "fsync" and c.identity == identity and state in (None, c.state)
            for c in self.calls[start:stop]
        )


def durability_problems(calls: FsCalls, root: Path, version: str) -> list[str]:
    """What, in the recorded calls of publishing ``version`` under ``root``, a power cut could
    turn into a CURRENT that names a missing or incomplete version."""
    problems = []
    renamed = calls.position("rename", root / VERSIONS_DIR / version)
    switched = calls.position("replace", root / CURRENT_FILE)
    if not renamed < switched:
        problems.append("CURRENT was replaced before the version directory was renamed into place")
    for at, what in ((renamed, "renamed into versions/"), (switched, "replaced onto CURRENT")):
        for identity, (path, state) in calls.calls[at].moved.items():
            if not calls.fsynced(identity, state, 0, at):
                problems.append(f"{path} was not fsynced in its final state before it was {what}")
    versions = (root / VERSIONS_DIR).stat()
    if not calls.fsynced((versions.st_dev, versions.st_ino), None, renamed + 1, switched):
        problems.append("versions/ was not fsynced between the rename and the switch of CURRENT")
    top = root.stat()
    if not calls.fsynced((top.st_dev, top.st_ino), None, switched + 1, len(calls.calls)):
        problems.append("the index root was not fsynced after CURRENT was replaced")
    return problems


def _unit_rows(n: int, seed: int, dim: int = 8) -> np.ndarray:
    rows = np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)
    return np.ascontiguousarray(rows / np.linalg.norm(rows, axis=1, keepdims=True))


def publish_small(root: Path, seed: int) -> str:
    """Publish 5 images and 5 captions of random unit vectors; returns the version."""
    images = [ImageRow(i, f"img-{seed}-{i}", f"/gallery/{seed}/{i}.png", ()) for i in range(5)]
    captions = [CaptionRow(i, f"cap-{seed}-{i}", f"caption {i}", None, None) for i in range(5)]
    return publish_vectors(
        root,
        fingerprint="f" * 64,
        image_rows=images,
        image_vectors=_unit_rows(5, seed),
        caption_rows=captions,
        caption_vectors=_unit_rows(5, seed + 100),
        index="flat",
    )


# ---------------------------------------------------------------------------- ordering
def test_publishing_fsyncs_every_file_and_directory_before_renaming_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "root"
    for seed in (0, 1):  # onto an empty root (versions/ is created), then next to a version
        with monkeypatch.context() as patch:
            calls = FsCalls(patch)
            version = publish_small(root, seed)
        assert read_current(root) == version
        assert durability_problems(calls, root, version) == []
        staged = calls.calls[calls.position("rename", root / VERSIONS_DIR / version)].moved
        names = {Path(path).name for path, _ in staged.values()}
        assert {"images.faiss", "captions.faiss", "metadata.sqlite", "manifest.json"} <= names


def test_a_build_fsyncs_every_file_and_directory_before_renaming_it(
    tiny_vilt_dir: Path, captions_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "root"
    config = BuildConfig(
        model_dir=tiny_vilt_dir, out_root=root, captions=captions_path, device="cpu", threads=1
    )
    with monkeypatch.context() as patch:
        calls = FsCalls(patch)
        result = run_build(config)
    assert durability_problems(calls, root, result.version) == []


def test_the_durability_check_finds_a_missing_fsync(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The check above can fail: with the directory fsyncs skipped, it names what is missing."""
    import indexer.publish

    monkeypatch.setattr(indexer.publish, "fsync_dir", lambda path: None)
    with monkeypatch.context() as patch:
        calls = FsCalls(patch)
        version = publish_small(tmp_path, 0)
    problems = durability_problems(calls, tmp_path, version)
    assert len(problems) == 3, problems
    assert "versions/ was not fsynced between the rename and the switch of CURRENT" in problems
    assert "the index root was not fsynced after CURRENT was replaced" in problems
    assert any(
        p.startswith(str(tmp_path / ".tmp-")) and "renamed into versions/" in p for p in problems
    )


# ---------------------------------------------------------------------------- fault injection
def test_a_failure_at_any_step_of_publishing_leaves_current_on_a_version_that_verifies(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with monkeypatch.context() as patch:
        recorded = FsCalls(patch)
        publish_small(tmp_path / "dry-run", seed=0)
    steps = recorded.calls
    kinds = {call.kind for call in steps}
    assert kinds == {"fsync", "rename", "replace"}, kinds
    switch = next(
        i for i, c in enumerate(steps) if c.kind == "replace" and c.target.name == CURRENT_FILE
    )

    for step, call in enumerate(steps):
        where = f"step {step}: {call.kind} {call.name}"
        root = tmp_path / f"step-{step}"
        published = publish_small(root, seed=1)
        with monkeypatch.context() as patch:
            injected = FsCalls(patch, fail_at=step)
            with pytest.raises(OSError, match="injected failure"):
                publish_small(root, seed=2)
        assert injected.failed is not None and injected.failed.kind == call.kind, where

        current = read_current(root)
        if step <= switch:
            assert current == published, f"{where} failed, yet CURRENT moved"
        else:  # the switch was made; only its fsync failed
            assert current != published, where
        assert verify_version(root) == [], where
        for version in list_versions(root):  # nothing incomplete is ever in versions/
            assert verify_version(root, version) == [], f"{where}: {version}"
        with IndexVersion.open(root, verify=True) as served:
            assert served.version == current and served.image_count == 5, where

        # Nothing is wedged: the lock is free and the next publish goes through.
        retried = publish_small(root, seed=3)
        assert read_current(root) == retried and verify_version(root) == [], where


def test_publishing_never_replaces_an_existing_version_directory(tmp_path: Path) -> None:
    published = publish_small(tmp_path, seed=0)
    other = publish_small(tmp_path / "other", seed=1)
    staged = version_dir(tmp_path / "other", other)
    with pytest.raises(FileExistsError, match=published):
        publish_version(tmp_path, staged, published)
    assert staged.is_dir()  # nothing moved
    assert read_current(tmp_path) == published and verify_version(tmp_path) == []
    with IndexVersion.open(tmp_path) as served:
        assert served.image_records([0])[0].id == "img-0-0"  # still the first publish's rows
