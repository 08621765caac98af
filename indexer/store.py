"""The on-disk index format, and the read-only view of one published version.

Layout of an index root::

    INDEX_ROOT/
      CURRENT                      the published version's name (replaced atomically)
      versions/<version>/          one immutable directory per build
        images.faiss               inner-product index over unit image vectors (if any image)
        captions.faiss             the same over caption vectors (if any caption)
        images.ivfdata             the inverted lists of an on-disk IVF-PQ images.faiss, mapped
        captions.ivfdata           at search time (layout "ondisk", see indexer/ondisk.py)
        metadata.sqlite            row <-> id, image path, image captions, caption -> image link,
                                   image metadata fields (typed, indexed; see indexer/metadata.py)
        manifest.json              everything about the build, with the sha256 of every file
                                   (layout and record: indexer/manifest.py)
        manifest.json.sha256       ``sha256sum -c`` line for the manifest itself
      .tmp-<version>/              a build in progress (removed by the next build)
      .build.lock                  held (flock) by the one running build

Version names sort by creation time: ``20261127T061500Z-1a2b3c``. A version directory is
written completely, fsynced and renamed into ``versions/`` before ``CURRENT`` names it, so
whatever ``CURRENT`` names is complete. This module reads; :mod:`indexer.publish` writes.

Format 1 gained the metadata tables (:data:`indexer.metadata.METADATA_FIELDS_SCHEMA`) as an
addition: a version written before them opens and serves with no metadata fields, and an
older reader of format 1 ignores them. Searches can be restricted to the rows a metadata
filter selects (:meth:`IndexVersion.select`, :mod:`indexer.selection`).

Each modality's vectors are reached through :class:`indexer.vector_index.VectorIndex` (search,
filtered search, stored vectors, self-check), so the search library stays behind one seam.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import sqlite3
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from indexer.errors import StoreError as StoreError
from indexer.manifest import DEFAULT_RUNTIME as DEFAULT_RUNTIME
from indexer.manifest import FORMAT_VERSION as FORMAT_VERSION
from indexer.manifest import IndexEntry, Manifest, ManifestError
from indexer.metadata import FilterError as FilterError
from indexer.metadata import MetadataField as MetadataField
from indexer.metadata import filter_sql, read_fields
from indexer.selection import FilterPolicy, SelectionCache
from indexer.selection import RowSelection as RowSelection
from indexer.vector_index import VectorIndex, VectorIndexError, open_vector_index
from model.files import file_sha256

logger = logging.getLogger(__name__)

VERSIONS_DIR = "versions"
CURRENT_FILE = "CURRENT"
MANIFEST_FILE = "manifest.json"
MANIFEST_CHECKSUM_FILE = "manifest.json.sha256"
METADATA_FILE = "metadata.sqlite"
INDEX_FILES: dict[str, str] = {"images": "images.faiss", "captions": "captions.faiss"}
VERSION_PATTERN = re.compile(r"^\d{8}T\d{6}Z-[0-9a-f]{6}$")

Modality = Literal["images", "captions"]
# StoreError, FilterError, MetadataField, RowSelection, FORMAT_VERSION and DEFAULT_RUNTIME
# (imported above) are part of this module's API: the service and the writer import them
# from here.

# The sqlite schema, shared with the writer. Rows are faiss ids (0..n-1 in build order).
METADATA_SCHEMA = """
CREATE TABLE images (row INTEGER PRIMARY KEY, id TEXT NOT NULL UNIQUE, path TEXT NOT NULL);
CREATE TABLE image_captions (
    image_row INTEGER NOT NULL, position INTEGER NOT NULL, caption TEXT NOT NULL,
    PRIMARY KEY (image_row, position)
) WITHOUT ROWID;
CREATE TABLE captions (
    row INTEGER PRIMARY KEY, id TEXT NOT NULL UNIQUE, caption TEXT NOT NULL,
    image_id TEXT, image_ref TEXT
);
CREATE INDEX captions_by_image ON captions (image_id);
"""
_SQL_CHUNK = 500  # rows per "IN (...)" query, well under sqlite's parameter limit


class VersionNotFoundError(StoreError):
    """The requested version (or any published version) does not exist."""


class CorruptVersionError(StoreError):
    """A version whose files are missing, altered or inconsistent with its manifest."""


class ModalityMissingError(StoreError):
    """A search in a modality the version has no index for (e.g. an images-only build)."""


@dataclass(frozen=True)
class ImageRecord:
    """A gallery image: its faiss row, id, absolute resolved path, linked captions and
    metadata fields as the manifest wrote them (str, int / float, bool, list[str])."""

    row: int
    id: str
    path: str
    captions: tuple[str, ...]
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class CaptionRecord:
    """A caption: its faiss row, id, text and the id of the gallery image it describes."""

    row: int
    id: str
    caption: str
    image_id: str | None


def check_version_name(version: str) -> str:
    """Return ``version`` if it is a well-formed version name, else raise VersionNotFoundError."""
    if not VERSION_PATTERN.match(version):
        raise VersionNotFoundError(
            f"{version!r} is not a version name (expected e.g. 20261127T061500Z-1a2b3c)"
        )
    return version


def version_dir(root: Path, version: str) -> Path:
    """``root/versions/<version>`` (not checked for existence)."""
    return Path(root) / VERSIONS_DIR / check_version_name(version)


def read_current(root: Path) -> str | None:
    """The published version's name, or None if nothing was ever published under ``root``."""
    current = Path(root) / CURRENT_FILE
    try:
        name = current.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise StoreError(f"cannot read {current}: {exc}") from exc
    if not VERSION_PATTERN.match(name):
        raise CorruptVersionError(f"{current} holds {name[:80]!r}, which is not a version name")
    return name


def list_versions(root: Path) -> list[str]:
    """Names of the complete versions under ``root``, oldest first."""
    versions = Path(root) / VERSIONS_DIR
    if not versions.is_dir():
        return []
    return sorted(p.name for p in versions.iterdir() if VERSION_PATTERN.match(p.name))


def _resolve_version(root: Path, version: str | None) -> tuple[str, Path]:
    if version is None:
        version = read_current(root)
        if version is None:
            raise VersionNotFoundError(
                f"no version is published under {root} ({Path(root) / CURRENT_FILE} is missing)"
            )
    directory = version_dir(root, version)
    if not directory.is_dir():
        known = list_versions(root)
        raise VersionNotFoundError(
            f"version {version} does not exist under {Path(root) / VERSIONS_DIR}; "
            f"known versions: {known[-5:] or 'none'}"
        )
    return version, directory


def read_manifest(directory: Path) -> Manifest:
    """Load ``manifest.json`` after checking it against ``manifest.json.sha256``.

    Raises :class:`CorruptVersionError` naming the file (and the key, when one is missing or
    of the wrong type) for an unreadable, altered or invalid manifest or another format.
    """
    manifest_file = Path(directory) / MANIFEST_FILE
    checksum_file = Path(directory) / MANIFEST_CHECKSUM_FILE
    try:
        raw = manifest_file.read_bytes()
        recorded = checksum_file.read_text(encoding="ascii").split()[0]
    except (OSError, UnicodeDecodeError, IndexError) as exc:
        raise CorruptVersionError(f"cannot read the manifest of {directory}: {exc}") from exc
    if hashlib.sha256(raw).hexdigest() != recorded:
        raise CorruptVersionError(f"{manifest_file} does not match its checksum in {checksum_file}")
    try:
        manifest = Manifest.from_dict(json.loads(raw))
    except ManifestError as exc:
        raise CorruptVersionError(f"{manifest_file} is not a valid manifest: {exc}") from exc
    except ValueError as exc:  # not JSON
        raise CorruptVersionError(f"{manifest_file} is not a valid manifest: {exc!r}") from exc
    if manifest.format_version != FORMAT_VERSION:
        raise CorruptVersionError(
            f"{manifest_file} has format_version {manifest.format_version!r}; "
            f"this indexer reads {FORMAT_VERSION}"
        )
    return manifest


def _check_query(xq: np.ndarray, dim: int, k: int) -> None:
    if not isinstance(xq, np.ndarray) or xq.dtype != np.float32 or xq.ndim != 2:
        raise ValueError(
            f"xq must be a float32 array of shape (nq, {dim}); got "
            f"{type(xq).__name__} {getattr(xq, 'dtype', None)} {getattr(xq, 'shape', None)}"
        )
    if xq.shape[1] != dim or not xq.flags.c_contiguous:
        raise ValueError(
            f"xq must be C-contiguous with shape (nq, {dim}); got shape {xq.shape}, "
            f"C-contiguous={xq.flags.c_contiguous}"
        )
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")


def _load_index(
    directory: Path,
    manifest: Manifest,
    modality: str,
    filter_policy: FilterPolicy | None = None,
) -> VectorIndex | None:
    count = manifest.counts.of(modality)
    entry: IndexEntry | None = manifest.indexes.get(modality)
    if count == 0 or entry is None:
        return None
    path = directory / INDEX_FILES[modality]
    try:
        # The vector-index seam takes the entry as JSON: each backend reads its own keys.
        index = open_vector_index(path, entry.to_dict(), modality, filter_policy or FilterPolicy())
    except VectorIndexError as exc:
        raise CorruptVersionError(str(exc)) from exc
    if index.count != count or index.dim != manifest.dim:
        raise CorruptVersionError(
            f"{path} holds {index.count} vectors of dimension {index.dim}; the manifest says "
            f"{count} of dimension {manifest.dim}"
        )
    return index


class IndexVersion:
    """One published version, loaded read-only. Safe to share between threads.

    Searches take L2-normalised float32 queries ``xq (nq, dim)`` and return ``(D, I)``:
    inner products (cosine) ``(nq, k)`` float32 and faiss rows ``(nq, k)`` int64, best first,
    ``I == -1`` (and ``D == -FLT_MAX``) where the index holds fewer than ``k`` results. Rows map
    to records with :meth:`image_records` / :meth:`caption_records`. A ``selection`` from
    :meth:`select` restricts a search to the rows a metadata filter matches, inside faiss.
    """

    def __init__(
        self,
        root: Path,
        version: str,
        directory: Path,
        manifest: Manifest,
        indexes: dict[str, VectorIndex | None],
        connection: sqlite3.Connection,
        filter_policy: FilterPolicy | None = None,
    ) -> None:
        self.root = root
        self.version = version
        self.directory = directory
        self.manifest: Manifest = manifest
        self.fingerprint: str = manifest.model.fingerprint
        self.runtime: str = manifest.runtime
        self.dim: int = manifest.dim
        self.image_count: int = manifest.counts.images
        self.caption_count: int = manifest.counts.captions
        self._indexes = indexes
        self._connection: sqlite3.Connection | None = connection
        self._lock = threading.Lock()
        try:
            self._fields = read_fields(connection)
        except sqlite3.DatabaseError as exc:
            raise CorruptVersionError(
                f"cannot read the metadata fields of {version}: {exc}"
            ) from exc
        self.filter_policy = filter_policy or FilterPolicy()
        self._selections = SelectionCache(self.filter_policy.selection_cache_bytes)

    @classmethod
    def open(
        cls,
        root: Path,
        version: str | None = None,
        *,
        verify: bool = False,
        filter_policy: FilterPolicy | None = None,
    ) -> IndexVersion:
        """Load ``version`` (None = the one ``CURRENT`` names).

        ``filter_policy`` tunes filtered searches (:class:`indexer.selection.FilterPolicy`).

        ``verify=True`` first runs :func:`verify_version` (checksums, counts, self-query) and
        raises :class:`CorruptVersionError` listing its problems. Raises
        :class:`VersionNotFoundError` when there is no such version.
        """
        root = Path(root)
        version, directory = _resolve_version(root, version)
        if verify:
            problems = verify_version(root, version)
            if problems:
                raise CorruptVersionError(
                    f"version {version} failed verification: " + "; ".join(problems)
                )
        manifest = read_manifest(directory)
        if manifest.version != version:
            raise CorruptVersionError(
                f"{directory / MANIFEST_FILE} describes version {manifest.version!r}, "
                f"not {version!r}"
            )
        indexes = {
            name: _load_index(directory, manifest, name, filter_policy) for name in INDEX_FILES
        }
        connection = _connect_read_only(directory / METADATA_FILE)
        logger.info(
            "opened index version %s (%d images, %d captions, dim %d)",
            version,
            manifest.counts.images,
            manifest.counts.captions,
            manifest.dim,
        )
        return cls(root, version, directory, manifest, indexes, connection, filter_policy)

    # ------------------------------------------------------------------ search
    def _index(self, modality: str) -> VectorIndex:
        index = self._indexes.get(modality)
        if index is None:
            raise ModalityMissingError(
                f"index version {self.version} has no {modality} (it was built without them)"
            )
        return index

    def search(
        self,
        modality: Modality,
        xq: np.ndarray,
        k: int,
        *,
        selection: RowSelection | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Search the ``modality`` index; see the class docstring for shapes.

        With ``selection`` (from :meth:`select` on this version and modality) only selected
        rows come back; fewer than ``k`` matches are padded as above.
        """
        index = self._index(modality)
        _check_query(xq, self.dim, k)
        if selection is not None and (
            selection.version != self.version or selection.modality != modality
        ):
            raise ValueError(
                f"a selection of {selection.modality} of version {selection.version} cannot "
                f"restrict a search of {modality} of version {self.version}"
            )
        return index.search(xq, int(k), selection)

    def search_images(
        self, xq: np.ndarray, k: int, *, selection: RowSelection | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Nearest gallery images of each query vector: ``(D, I)``, each ``(nq, k)``."""
        return self.search("images", xq, k, selection=selection)

    def search_captions(
        self, xq: np.ndarray, k: int, *, selection: RowSelection | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Nearest captions of each query vector: ``(D, I)``, each ``(nq, k)``."""
        return self.search("captions", xq, k, selection=selection)

    @property
    def metadata_fields(self) -> dict[str, MetadataField]:
        """The gallery's metadata fields by name (sorted); ``{}`` for a version without any."""
        return dict(self._fields)

    def select(self, modality: Modality, filter: Mapping[str, Any]) -> RowSelection:
        """The ``modality`` rows that ``filter`` (see :mod:`indexer.metadata`) selects.

        An image matches when its metadata meets every condition; a caption when the gallery
        image it describes does (captions without an image match no non-empty filter). ``{}``
        selects every row. Blocking (one sqlite query over indexes; recent selections are
        reused, see :attr:`FilterPolicy.selection_cache_bytes`); raises :class:`FilterError`
        for a filter this version cannot apply.
        """
        index = self._index(modality)
        parameters: list[Any] = []
        if isinstance(filter, Mapping) and not filter:
            sql = ""
        else:
            sql, parameters = filter_sql(filter, self._fields)
        key = (modality, sql, *parameters)
        selection = self._selections.get(key)
        if selection is not None:
            return selection
        if not sql:
            rows = np.arange(index.count, dtype=np.int64)
        else:
            if modality == "captions":
                sql = (
                    "SELECT c.row FROM captions AS c JOIN images AS i ON i.id = c.image_id "
                    f"WHERE i.row IN ({sql})"
                )
            # One comma-separated string instead of a Python tuple per row: 3-4x faster for
            # the half a million rows of a broad filter on a 1M gallery.
            ((joined,),) = self._query(f"SELECT group_concat(row) FROM ({sql})", parameters)
            rows = np.unique(np.fromstring(joined or "", dtype=np.int64, sep=","))
        selection = RowSelection(self.version, modality, rows, index.count)
        self._selections.put(key, selection)
        return selection

    def index_settings(self, modality: Modality) -> dict[str, Any]:
        """The manifest's description of one index: type, parameters, measured recall@10."""
        self._index(modality)
        return self.manifest.indexes[modality].to_dict()

    # ------------------------------------------------------------------ metadata
    def _query(self, sql: str, parameters: Sequence[Any]) -> list[tuple[Any, ...]]:
        with self._lock:
            if self._connection is None:
                raise StoreError(f"index version {self.version} is closed")
            return self._connection.execute(sql, tuple(parameters)).fetchall()

    def _check_rows(self, rows: Sequence[int], count: int, modality: str) -> list[int]:
        checked = [int(row) for row in rows]
        for row in checked:
            if not 0 <= row < count:
                raise ValueError(
                    f"row {row} is not a {modality} row of version {self.version} "
                    f"(0..{count - 1}); drop the -1 entries of a search result first"
                )
        return checked

    def image_records(self, rows: Sequence[int]) -> list[ImageRecord]:
        """Records of image ``rows`` (faiss ids), in the order given. Raises ValueError on a bad row."""
        wanted = self._check_rows(rows, self.image_count, "image")
        found: dict[int, tuple[str, str]] = {}
        captions: dict[int, list[str]] = {}
        metadata: dict[int, dict[str, Any]] = {}
        unique = sorted(set(wanted))
        for start in range(0, len(unique), _SQL_CHUNK):
            chunk = unique[start : start + _SQL_CHUNK]
            marks = ",".join("?" * len(chunk))
            for row, image_id, path in self._query(
                f"SELECT row, id, path FROM images WHERE row IN ({marks})", chunk
            ):
                found[row] = (image_id, path)
            for row, caption in self._query(
                f"SELECT image_row, caption FROM image_captions WHERE image_row IN ({marks}) "
                "ORDER BY image_row, position",
                chunk,
            ):
                captions.setdefault(row, []).append(caption)
            if self._fields:
                for row, fields in self._query(
                    f"SELECT row, fields FROM image_metadata WHERE row IN ({marks})", chunk
                ):
                    metadata[row] = json.loads(fields)
        missing = [row for row in unique if row not in found]
        if missing:
            raise CorruptVersionError(
                f"{METADATA_FILE} of {self.version} lacks image rows {missing[:5]}"
            )
        return [
            ImageRecord(
                row,
                found[row][0],
                found[row][1],
                tuple(captions.get(row, ())),
                dict(metadata.get(row, {})),
            )
            for row in wanted
        ]

    def caption_records(self, rows: Sequence[int]) -> list[CaptionRecord]:
        """Records of caption ``rows`` (faiss ids), in the order given. Raises ValueError on a bad row."""
        wanted = self._check_rows(rows, self.caption_count, "caption")
        found: dict[int, CaptionRecord] = {}
        unique = sorted(set(wanted))
        for start in range(0, len(unique), _SQL_CHUNK):
            chunk = unique[start : start + _SQL_CHUNK]
            marks = ",".join("?" * len(chunk))
            for row, caption_id, caption, image_id in self._query(
                f"SELECT row, id, caption, image_id FROM captions WHERE row IN ({marks})", chunk
            ):
                found[row] = CaptionRecord(row, caption_id, caption, image_id)
        missing = [row for row in unique if row not in found]
        if missing:
            raise CorruptVersionError(
                f"{METADATA_FILE} of {self.version} lacks caption rows {missing[:5]}"
            )
        return [found[row] for row in wanted]

    def image_row(self, image_id: str) -> int | None:
        """The faiss row of the gallery image with this id, or None."""
        rows = self._query("SELECT row FROM images WHERE id = ?", (image_id,))
        return int(rows[0][0]) if rows else None

    def image_by_id(self, image_id: str) -> ImageRecord | None:
        """The gallery image with this id, or None."""
        row = self.image_row(image_id)
        return None if row is None else self.image_records([row])[0]

    def reconstruct(self, modality: Modality, rows: Sequence[int]) -> np.ndarray:
        """Stored vectors of ``rows``, float32 ``(len(rows), dim)`` (approximate for IVF-PQ)."""
        index = self._index(modality)
        count = self.image_count if modality == "images" else self.caption_count
        wanted = self._check_rows(rows, count, modality)
        return index.reconstruct(wanted)

    def close(self) -> None:
        """Release the sqlite connection and the indexes; searches then raise StoreError."""
        with self._lock:
            if self._connection is not None:
                self._connection.close()
                self._connection = None
        self._indexes = {name: None for name in self._indexes}

    def __enter__(self) -> IndexVersion:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"IndexVersion({self.version!r}, images={self.image_count}, "
            f"captions={self.caption_count}, dim={self.dim})"
        )


def read_metadata_fields(directory: Path) -> dict[str, MetadataField]:
    """The metadata fields of the version in ``directory`` (``{}`` for one without any)."""
    connection = _connect_read_only(Path(directory) / METADATA_FILE)
    try:
        return read_fields(connection)
    except sqlite3.DatabaseError as exc:
        raise CorruptVersionError(f"cannot read {directory / METADATA_FILE}: {exc}") from exc
    finally:
        connection.close()


def _connect_read_only(path: Path) -> sqlite3.Connection:
    if not path.is_file():
        raise CorruptVersionError(f"{path} is missing")
    # immutable=1: a published version never changes, so sqlite needs no locks or journal.
    uri = path.resolve().as_uri() + "?mode=ro&immutable=1"
    try:
        connection = sqlite3.connect(uri, uri=True, check_same_thread=False)
        connection.execute("SELECT count(*) FROM images").fetchone()
    except sqlite3.DatabaseError as exc:
        raise CorruptVersionError(f"cannot read {path}: {exc}") from exc
    return connection


# ---------------------------------------------------------------------- verification
def verify_version(
    root: Path,
    version: str | None = None,
    *,
    fingerprint: str | None = None,
    self_query: bool = True,
) -> list[str]:
    """Check one version (None = ``CURRENT``); returns the problems found, ``[]`` when sound.

    Checks: the manifest against its checksum, every file's sha256 and size against the
    manifest, no unexpected files, vector and row counts, the embedding dimension, the model
    ``fingerprint`` when given, and (``self_query``) that sample stored vectors find their own
    row first (within ties; within the top 10 for lossy IVF-PQ codes).
    """
    root = Path(root)
    try:
        version, directory = _resolve_version(root, version)
        manifest = read_manifest(directory)
    except StoreError as exc:
        return [str(exc)]
    problems: list[str] = []
    if manifest.version != version:
        problems.append(f"manifest names version {manifest.version!r}, directory is {version}")
    if fingerprint is not None and manifest.model.fingerprint != fingerprint:
        problems.append(
            f"model fingerprint mismatch: version {version} was built with "
            f"{manifest.model.fingerprint[:16]}…, the model has {fingerprint[:16]}…"
        )
    expected_files = {MANIFEST_FILE, MANIFEST_CHECKSUM_FILE, *manifest.files}
    for name in sorted(p.name for p in directory.iterdir() if p.name not in expected_files):
        problems.append(f"unexpected file {directory / name}")
    for name, entry in sorted(manifest.files.items()):
        path = directory / name
        if not path.is_file():
            problems.append(f"missing file {path}")
        elif path.stat().st_size != entry.bytes:
            problems.append(f"{path} has {path.stat().st_size} bytes, manifest says {entry.bytes}")
        elif file_sha256(path) != entry.sha256:
            problems.append(f"{path} does not match its sha256 in the manifest")
    if problems:
        return problems  # counts and searches would only fail less clearly on altered files
    problems += _check_contents(directory, manifest, self_query)
    return problems


def _check_contents(directory: Path, manifest: Manifest, self_query: bool) -> list[str]:
    problems: list[str] = []
    try:
        connection = _connect_read_only(directory / METADATA_FILE)
        try:
            for table, modality in (("images", "images"), ("captions", "captions")):
                (rows,) = connection.execute(f"SELECT count(*) FROM {table}").fetchone()
                if rows != manifest.counts.of(modality):
                    problems.append(
                        f"{METADATA_FILE} has {rows} {table} rows, the manifest says "
                        f"{manifest.counts.of(modality)}"
                    )
        finally:
            connection.close()
        for modality in INDEX_FILES:
            index = _load_index(directory, manifest, modality)
            if index is None and manifest.counts.of(modality) > 0:
                problems.append(f"the manifest counts {modality} but describes no {modality} index")
            if index is not None and self_query:
                problems += index.verify()
    except (StoreError, sqlite3.DatabaseError) as exc:
        problems.append(str(exc))
    return problems
