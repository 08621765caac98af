"""Writing versions crash-safely: staging, fsync, rename into place, atomic ``CURRENT``.

The order that makes a crash at any moment harmless:

1. every file of the version is written inside ``INDEX_ROOT/.tmp-<version>/version/`` and
   fsynced; the manifest (with every file's sha256) is written last;
2. that directory is renamed to ``INDEX_ROOT/versions/<version>`` and ``versions/`` fsynced;
3. ``CURRENT`` is replaced atomically: temp file, fsync, ``os.replace``, fsync of the root.

Before step 3 the service keeps serving the old version; after it, the new one is complete.
Only one build writes an index root at a time (:class:`BuildLock`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import hashlib
import json
import logging
import os
import platform
import secrets
import shutil
import sqlite3
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, TextIO

import faiss
import numpy as np

from indexer.errors import UsageError
from indexer.faiss_index import IndexPolicy, build_index, choose_kind
from indexer.manifest import Counts, FileEntry, IndexEntry, Manifest, ModelInfo, RuntimeCheckFigures
from indexer.metadata import METADATA_FIELDS_SCHEMA, infer_field_types, write_field_values
from indexer.ondisk import VectorBlocks, build_ondisk_ivfpq, uses_ondisk
from indexer.store import (
    CURRENT_FILE,
    DEFAULT_RUNTIME,
    FORMAT_VERSION,
    INDEX_FILES,
    MANIFEST_CHECKSUM_FILE,
    MANIFEST_FILE,
    METADATA_FILE,
    METADATA_SCHEMA,
    VERSIONS_DIR,
    ImageRecord,
    list_versions,
    read_current,
)
from model.atomic import fsync_dir, fsync_file, replace_file
from model.files import file_sha256

logger = logging.getLogger(__name__)

TEMP_PREFIX = ".tmp-"
LOCK_FILE = ".build.lock"


# A row to write is exactly the record the store reads back: (row, id, path, captions,
# metadata).
ImageRow = ImageRecord
# One modality's vectors: one float32 (n, D) array, or blocks of one in row order (each may be
# a read-only np.memmap), so that a collection larger than RAM is never concatenated.
Vectors = np.ndarray | Sequence[np.ndarray]


@dataclass(frozen=True)
class CaptionRow:
    """One indexed caption; ``image_id`` is set when it describes an indexed gallery image."""

    row: int
    id: str
    caption: str
    image_id: str | None
    image_ref: str | None


def new_version_name(now: float | None = None) -> str:
    """A sortable, unique version name for time ``now`` (epoch seconds, default: now).

    ``YYYYmmddTHHMMSSZ-mmmrrr``: the UTC second, then 3 hex digits of milliseconds (so names
    made within one second still sort in creation order) and 3 random hex digits.
    """
    now = time.time() if now is None else now
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(now))
    milliseconds = int(now * 1000) % 1000
    return f"{stamp}-{milliseconds:03x}{secrets.token_hex(2)[:3]}"


def write_metadata(path: Path, images: Sequence[ImageRow], captions: Sequence[CaptionRow]) -> None:
    """Write ``metadata.sqlite`` (schema in :data:`indexer.store.METADATA_SCHEMA` and
    :data:`indexer.metadata.METADATA_FIELDS_SCHEMA`) and fsync it.

    The images' metadata fields are typed over all ``images``; a value of another type than
    its field's raises :class:`UsageError` naming the image.
    """
    types = infer_field_types((f"image {image.id!r}", image.metadata) for image in images)
    if path.exists():
        path.unlink()
    connection = sqlite3.connect(path)
    try:
        connection.execute("PRAGMA journal_mode = OFF")
        connection.executescript(METADATA_SCHEMA + METADATA_FIELDS_SCHEMA)
        with connection:
            connection.executemany(
                "INSERT INTO images (row, id, path) VALUES (?, ?, ?)",
                ((image.row, image.id, image.path) for image in images),
            )
            connection.executemany(
                "INSERT INTO image_captions (image_row, position, caption) VALUES (?, ?, ?)",
                (
                    (image.row, position, caption)
                    for image in images
                    for position, caption in enumerate(image.captions)
                ),
            )
            connection.executemany(
                "INSERT INTO captions (row, id, caption, image_id, image_ref) "
                "VALUES (?, ?, ?, ?, ?)",
                ((c.row, c.id, c.caption, c.image_id, c.image_ref) for c in captions),
            )
            write_field_values(connection, [(image.row, image.metadata) for image in images], types)
    finally:
        connection.close()
    fsync_file(path)


def stage_version(
    staged: Path,
    *,
    image_rows: Sequence[ImageRow] = (),
    image_vectors: Vectors | None = None,
    caption_rows: Sequence[CaptionRow] = (),
    caption_vectors: Vectors | None = None,
    index: str = "auto",
    policy: IndexPolicy | None = None,
    device: str = "cpu",
) -> dict[str, IndexEntry]:
    """Build, tune and write the faiss index of each modality given, and ``metadata.sqlite``,
    into ``staged``. ``*_vectors`` are float32 ``(len(rows), D)`` unit rows in row order: one
    array or a sequence of blocks (:data:`Vectors`).

    Flat, IVF and HNSW indexes live in RAM, so their blocks are concatenated. An IVF-PQ over
    at least :attr:`IndexPolicy.ondisk_min_vectors` is built from the blocks as they come,
    its inverted lists in ``<modality>.ivfdata`` beside the index (:mod:`indexer.ondisk`),
    recorded as ``"layout": "ondisk"`` in its manifest entry. Returns the manifest's
    ``indexes`` section.
    """
    policy = policy or IndexPolicy()
    indexes: dict[str, IndexEntry] = {}
    blocks = {
        name: VectorBlocks(vectors, f"{name} vectors") if vectors is not None else None
        for name, vectors in (("images", image_vectors), ("captions", caption_vectors))
    }
    modalities = (
        ("images", image_rows, blocks["images"], blocks["captions"]),
        ("captions", caption_rows, blocks["captions"], blocks["images"]),
    )
    for name, rows, vectors, other in modalities:
        if vectors is None:
            continue
        if len(vectors) != len(rows) or len(vectors) == 0:
            raise ValueError(f"{name}: {len(vectors)} vectors for {len(rows)} rows")
        kind = choose_kind(len(vectors), vectors.d, index, policy)
        path = staged / INDEX_FILES[name]
        if uses_ondisk(kind, len(vectors), policy):
            built, _ = build_ondisk_ivfpq(vectors, path, policy, other=other)
        else:
            built = build_index(vectors.concatenate(), kind, policy, other=other, device=device)
            faiss.write_index(built.index, str(path))
        indexes[name] = built.describe()
    write_metadata(staged / METADATA_FILE, image_rows, caption_rows)
    return indexes


def base_manifest(
    version: str,
    fingerprint: str,
    dim: int,
    indexes: Mapping[str, IndexEntry],
    image_rows: Sequence[ImageRow],
    caption_rows: Sequence[CaptionRow],
    *,
    runtime: str = DEFAULT_RUNTIME,
    runtime_check: RuntimeCheckFigures | None = None,
) -> Manifest:
    """The manifest fields every version has (``files`` is added by :func:`write_manifest`).

    ``runtime`` is the encoder runtime the vectors came from and ``runtime_check`` the figures
    of its export-time check against torch fp32 (None for torch itself).
    """
    return Manifest(
        format_version=FORMAT_VERSION,
        version=version,
        created_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        model=ModelInfo(fingerprint, dim, runtime, runtime_check),
        dim=dim,
        metric="inner_product",
        normalized=True,
        counts=Counts(images=len(image_rows), captions=len(caption_rows)),
        indexes=dict(indexes),
        library_versions=library_versions(),
    )


def library_versions() -> dict[str, str]:
    """Versions of Python and the libraries that shape an index, for the manifest."""
    versions = {"python": platform.python_version(), "faiss": faiss.__version__}
    for package in ("vldeformer", "torch", "transformers", "numpy", "pillow", "tokenizers"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = "not installed"
    return versions


def publish_vectors(
    root: Path,
    *,
    fingerprint: str,
    image_rows: Sequence[ImageRow] = (),
    image_vectors: Vectors | None = None,
    caption_rows: Sequence[CaptionRow] = (),
    caption_vectors: Vectors | None = None,
    index: str = "auto",
    policy: IndexPolicy | None = None,
    extra: Mapping[str, Any] | None = None,
    runtime: str = DEFAULT_RUNTIME,
) -> str:
    """Publish a version from vectors already computed (tests, benchmarks, imports), recorded
    as made by the encoder ``runtime``. ``extra`` replaces or adds top-level manifest keys, as
    JSON (e.g. an older layout, for tests).

    The same staging, checksums and atomic switch as a build; returns the version name.
    """
    dims = {VectorBlocks(v).d for v in (image_vectors, caption_vectors) if v is not None}
    if len(dims) != 1:
        raise ValueError(f"give image and/or caption vectors of one dimension, got dims {dims}")
    root = Path(root)
    with BuildLock(root):
        version = new_version_name()
        build_dir = root / f"{TEMP_PREFIX}{version}"
        staged = build_dir / "version"
        staged.mkdir(parents=True)
        indexes = stage_version(
            staged,
            image_rows=image_rows,
            image_vectors=image_vectors,
            caption_rows=caption_rows,
            caption_vectors=caption_vectors,
            index=index,
            policy=policy,
        )
        manifest = base_manifest(
            version, fingerprint, dims.pop(), indexes, image_rows, caption_rows, runtime=runtime
        )
        if extra:
            manifest = Manifest.from_dict({**manifest.to_dict(), **extra})
        write_manifest(staged, manifest)
        publish_version(root, staged, version)
        shutil.rmtree(build_dir, ignore_errors=True)
    return version


def write_manifest(directory: Path, manifest: Manifest) -> Manifest:
    """Record the sha256 and size of every file in ``directory`` into ``manifest.files``,
    then write ``manifest.json`` and its checksum file, fsynced. Returns the manifest written."""
    files = {}
    for path in sorted(directory.iterdir()):
        if path.name in (MANIFEST_FILE, MANIFEST_CHECKSUM_FILE):
            continue
        fsync_file(path)
        files[path.name] = FileEntry(sha256=file_sha256(path), bytes=path.stat().st_size)
    manifest = dataclasses.replace(manifest, files=files)
    raw = (json.dumps(manifest.to_dict(), indent=2, sort_keys=False) + "\n").encode("utf-8")
    (directory / MANIFEST_FILE).write_bytes(raw)
    (directory / MANIFEST_CHECKSUM_FILE).write_text(
        f"{hashlib.sha256(raw).hexdigest()}  {MANIFEST_FILE}\n", encoding="ascii"
    )
    fsync_file(directory / MANIFEST_FILE)
    fsync_file(directory / MANIFEST_CHECKSUM_FILE)
    fsync_dir(directory)
    return manifest


def write_current(root: Path, version: str) -> None:
    """Point ``root/CURRENT`` at ``version`` atomically (readers see the old or the new name)."""
    staging = root / f"{CURRENT_FILE}.{os.getpid()}.tmp"
    with replace_file(root / CURRENT_FILE, temporary=staging) as stream:
        stream.write(version + "\n")
    fsync_dir(root)


def publish_version(root: Path, staged: Path, version: str) -> Path:
    """Move a complete, fsynced staging directory into ``versions/`` and switch ``CURRENT``."""
    versions = root / VERSIONS_DIR
    versions.mkdir(exist_ok=True)
    target = versions / version
    if target.exists():
        raise FileExistsError(f"version directory {target} already exists")
    os.rename(staged, target)
    fsync_dir(versions)
    fsync_dir(root)
    write_current(root, version)
    logger.info("published version %s at %s", version, target)
    return target


def remove_stale_builds(root: Path, keep: Path | None = None) -> list[Path]:
    """Delete the ``.tmp-*`` directories of earlier builds (call only while holding the lock)."""
    removed = []
    for path in sorted(root.glob(f"{TEMP_PREFIX}*")):
        if path.is_dir() and (keep is None or path.resolve() != keep.resolve()):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
            logger.info("removed the stale build directory %s", path)
    for leftover in root.glob(f"{CURRENT_FILE}.*.tmp"):  # a CURRENT switch cut short
        leftover.unlink(missing_ok=True)
    return removed


def collect_garbage(root: Path, keep: int) -> list[str]:
    """Delete all but the newest ``keep`` versions; never the one ``CURRENT`` names.

    Returns the removed version names. Takes the build lock, so it never races a build.
    """
    if keep < 1:
        raise UsageError(f"--keep must be at least 1, got {keep}")
    if not root.is_dir():  # the lock would create it
        raise UsageError(f"INDEX_ROOT {root}: no such directory")
    with BuildLock(root):
        current = read_current(root)
        versions = list_versions(root)
        survivors = set(versions[-keep:]) | ({current} if current else set())
        removed = []
        for version in versions:
            if version not in survivors:
                # Rename first so a half-deleted directory never looks like a version.
                doomed = root / f"{TEMP_PREFIX}gc-{version}"
                os.rename(root / VERSIONS_DIR / version, doomed)
                shutil.rmtree(doomed)
                removed.append(version)
        remove_stale_builds(root)
    return removed


class BuildLock:
    """An exclusive ``flock`` on ``root/.build.lock`` holding the owner's PID.

    The kernel releases it when the process dies, even on SIGKILL, so a crashed build never
    blocks the next one. Raises :class:`UsageError` if another process holds it or the root
    is not writable.
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        self._stream: TextIO | None = None

    def __enter__(self) -> BuildLock:
        path = self.root / LOCK_FILE
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            stream = open(path, "a+", encoding="utf-8")  # closed in __exit__
        except OSError as exc:
            raise UsageError(f"the output root {self.root} is not writable: {exc}") from exc
        try:
            fcntl.flock(stream.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            stream.seek(0)
            owner = stream.read().strip() or "unknown"
            stream.close()
            if exc.errno in (errno.EAGAIN, errno.EACCES):
                raise UsageError(
                    f"another build (pid {owner}) is writing {self.root}; wait for it to finish"
                ) from exc
            raise UsageError(f"cannot lock {path}: {exc}") from exc
        stream.seek(0)
        stream.truncate()
        stream.write(f"{os.getpid()}\n")
        stream.flush()
        self._stream = stream
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._stream is not None:
            with contextlib.suppress(OSError):
                self._stream.seek(0)
                self._stream.truncate()
            self._stream.close()  # closing releases the flock
            self._stream = None
