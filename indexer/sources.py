"""Readers for the build's inputs: the image gallery and the caption corpus.

Gallery (``--images``):
  - a folder, scanned recursively (hidden entries skipped). Files with an image extension
    (:data:`IMAGE_EXTENSIONS`) or a known unsupported one (:data:`REFUSED_EXTENSIONS`: SVG,
    EPS, PDF…, so they are reported, not silently dropped) are candidates; the decoder then
    judges the content. The id is the path relative to the folder, with ``/``.
  - a JSONL manifest: ``{"path": ..., "id"?: ..., "captions"?: [...] | "caption"?: ...}``
  - a CSV manifest with a header: ``path``, optional ``id``, ``captions`` (``|``-separated)
    and ``caption``. Relative paths are relative to the manifest's folder; ids default to
    the path as written.

  A manifest's other keys (JSONL) or columns (CSV) are the images' metadata fields
  (:mod:`indexer.metadata`): strings, numbers, booleans or lists of strings, one type per
  field. CSV cells are strings, unless every non-empty cell of the column is a number
  (``12``, ``-3.5``, ``1e3``): then the column is a number field. An empty CSV cell, like a
  JSON ``null`` or a missing key, means no value.

Captions (``--captions``), by extension:
  - ``.jsonl`` / ``.ndjson``: ``{"caption": ..., "id"?: ..., "image"?: <gallery id>}``
  - ``.txt``: one caption per non-blank line; the id is the line number;
  - ``.json``: Karpathy splits (``images[].sentences[].raw``, optional ``--split``) or COCO
    captions (``images[].file_name`` + ``annotations[].caption``; integer or string ids),
    parsed by :mod:`model.captions`, the parser the trainer uses too.

Malformed input raises :class:`indexer.errors.UsageError` naming the file and line (or JSON
path); duplicate ids do too. Empty captions are skipped and reported, not fatal.
"""

from __future__ import annotations

import csv
import json
import os
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path, PurePosixPath
from typing import Any

from indexer.errors import UsageError
from indexer.metadata import RESERVED_KEYS, infer_field_types
from model.captions import (
    CaptionFormatError,
    detect_json_format,
    parse_coco,
    parse_karpathy,
    select_splits,
)

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif"})
REFUSED_EXTENSIONS = frozenset(
    {".svg", ".svgz", ".eps", ".ps", ".pdf", ".psd", ".ai", ".heic", ".heif", ".avif", ".ico"}
)
CAPTION_FORMATS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".txt": "text", ".json": "json"}


@dataclass(frozen=True)
class GalleryImage:
    """A candidate gallery image: its id, absolute resolved path, and the captions and
    metadata fields (name -> value, as written) a manifest gives it."""

    id: str
    path: Path
    captions: tuple[str, ...] = ()
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Gallery:
    """The candidate images of ``--images`` in build order."""

    source: Path
    format: str  # "folder" | "jsonl" | "csv"
    images: tuple[GalleryImage, ...]
    ignored_files: int = 0  # folder entries without an image extension (README.txt…)


@dataclass(frozen=True)
class CaptionInput:
    """A caption to index; ``image_ref`` names the image it describes as the file did."""

    id: str
    caption: str
    image_ref: str | None
    origin: str  # "file:line" or "file:images[3].sentences[1]", for messages


@dataclass(frozen=True)
class SkippedItem:
    """An input left out of the index, with a short ``reason`` slug and a human ``detail``."""

    modality: str  # "images" | "captions"
    id: str
    path: str | None
    reason: str
    detail: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "modality": self.modality,
            "id": self.id,
            "path": self.path,
            "reason": self.reason,
            "detail": self.detail,
        }


@dataclass(frozen=True)
class CaptionCorpus:
    """The captions of ``--captions`` in build order, and the ones skipped while reading."""

    source: Path
    format: str  # "jsonl" | "text" | "karpathy" | "coco"
    captions: tuple[CaptionInput, ...]
    skipped: tuple[SkippedItem, ...] = ()


# ---------------------------------------------------------------------- gallery
def read_gallery(path: Path) -> Gallery:
    """Read ``--images``: a folder, a ``.jsonl`` or a ``.csv`` manifest (see module docstring)."""
    path = Path(path)
    if path.is_dir():
        return _scan_folder(path)
    if not path.is_file():
        raise UsageError(f"--images {path}: no such folder or manifest file")
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".ndjson"):
        rows = _gallery_jsonl_rows(path)
        kind = "jsonl"
    elif suffix == ".csv":
        rows = _gallery_csv_rows(path)
        kind = "csv"
    else:
        raise UsageError(
            f"--images {path}: expected a folder, a .jsonl or a .csv manifest, got {suffix or 'no extension'!r}"
        )
    images: list[GalleryImage] = []
    first_seen: dict[str, str] = {}
    base = path.resolve().parent
    entries = list(rows)
    if kind == "csv":
        entries = _typed_csv_columns(entries)
    infer_field_types((entry.origin, entry.metadata) for entry in entries)  # one type per field
    for entry in entries:
        _check_unique("image", entry.image_id, entry.origin, first_seen)
        images.append(
            GalleryImage(
                entry.image_id, (base / entry.raw_path).resolve(), entry.captions, entry.metadata
            )
        )
    return Gallery(path, kind, tuple(images))


@dataclass(frozen=True)
class _ManifestEntry:
    """One manifest line as read, before paths are resolved."""

    origin: str  # "file:line", for messages
    image_id: str
    raw_path: str
    captions: tuple[str, ...]
    metadata: dict[str, Any]


def _scan_folder(folder: Path) -> Gallery:
    images: list[GalleryImage] = []
    ignored = 0
    for directory, subdirs, files in os.walk(folder):
        subdirs[:] = sorted(d for d in subdirs if not d.startswith("."))
        for name in sorted(files):
            if name.startswith("."):
                continue
            suffix = os.path.splitext(name)[1].lower()
            if suffix not in IMAGE_EXTENSIONS and suffix not in REFUSED_EXTENSIONS:
                ignored += 1
                continue
            full = Path(directory) / name
            image_id = full.relative_to(folder).as_posix()
            images.append(GalleryImage(image_id, full.resolve()))
    return Gallery(folder, "folder", tuple(images), ignored)


def _gallery_jsonl_rows(path: Path) -> Iterator[_ManifestEntry]:
    for line_number, record in _jsonl_objects(path):
        origin = f"{path}:{line_number}"
        raw_path = record.get("path")
        if not isinstance(raw_path, str) or not raw_path.strip():
            raise UsageError(f"{origin}: expected a non-empty string 'path', got {raw_path!r}")
        image_id = _id_text(record.get("id", raw_path), origin)
        captions = _caption_list(record.get("captions"), record.get("caption"), origin)
        metadata = {
            name: value
            for name, value in record.items()
            if name not in RESERVED_KEYS and value is not None
        }
        yield _ManifestEntry(origin, image_id, raw_path, captions, metadata)


def _gallery_csv_rows(path: Path) -> Iterator[_ManifestEntry]:
    lines_read = 0  # csv's line_num lags behind a failing record: count lines for errors

    def counted(stream: Iterable[str]) -> Iterator[str]:
        nonlocal lines_read
        for line in stream:
            lines_read += 1
            yield line

    with open(path, newline="", encoding="utf-8-sig") as stream:
        reader = csv.DictReader(counted(stream))
        try:
            if reader.fieldnames is None or "path" not in reader.fieldnames:
                raise UsageError(
                    f"{path}:1: the CSV header must have a 'path' column, found {reader.fieldnames}"
                )
            for record in reader:
                origin = f"{path}:{reader.line_num}"
                raw_path = (record.get("path") or "").strip()
                if not raw_path:
                    raise UsageError(f"{origin}: empty 'path'")
                image_id = (record.get("id") or "").strip() or raw_path
                joined = record.get("captions") or ""
                captions = [c.strip() for c in joined.split("|")] + [record.get("caption") or ""]
                metadata = {
                    name: value.strip()
                    for name, value in record.items()
                    if isinstance(name, str)
                    and name not in RESERVED_KEYS
                    and isinstance(value, str)
                    and value.strip()
                }
                yield _ManifestEntry(
                    origin,
                    image_id,
                    raw_path,
                    tuple(c.strip() for c in captions if c.strip()),
                    metadata,
                )
        except UnicodeDecodeError as exc:
            raise _not_utf8(path, exc) from exc
        except csv.Error as exc:
            raise UsageError(f"{path}:{lines_read}: malformed CSV ({exc})") from exc


_CSV_NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")
_CSV_INTEGER = re.compile(r"[+-]?\d+")


def _typed_csv_columns(entries: list[_ManifestEntry]) -> list[_ManifestEntry]:
    """CSV metadata cells as numbers in the columns where every non-empty cell is one."""
    columns = {name for entry in entries for name in entry.metadata}
    numeric = {
        name
        for name in columns
        if all(
            _CSV_NUMBER.fullmatch(entry.metadata[name])
            for entry in entries
            if name in entry.metadata
        )
    }
    if not numeric:
        return entries
    return [
        replace(
            entry,
            metadata={
                name: _csv_number(value, entry.origin, name) if name in numeric else value
                for name, value in entry.metadata.items()
            },
        )
        for entry in entries
    ]


def _csv_number(text: str, origin: str, name: str) -> int | float:
    """A numeric cell's number; a :class:`UsageError` naming ``origin`` for one too long for
    Python to convert (over 4300 digits); :func:`infer_field_types` refuses one beyond the
    range of a float."""
    try:
        return int(text) if _CSV_INTEGER.fullmatch(text) else float(text)
    except ValueError as exc:
        raise UsageError(
            f"{origin}: metadata field {name!r}: a number of {len(text)} characters "
            f"({text[:20]}…) is beyond the range of a number"
        ) from exc


def _caption_list(captions: Any, caption: Any, origin: str) -> tuple[str, ...]:
    found: list[str] = []
    if captions is not None:
        if not isinstance(captions, list) or not all(isinstance(c, str) for c in captions):
            raise UsageError(f"{origin}: 'captions' must be a list of strings, got {captions!r}")
        found += captions
    if caption is not None:
        if not isinstance(caption, str):
            raise UsageError(f"{origin}: 'caption' must be a string, got {caption!r}")
        found.append(caption)
    return tuple(c.strip() for c in found if c.strip())


# ---------------------------------------------------------------------- captions
def read_captions(path: Path, *, split: str | None = None) -> CaptionCorpus:
    """Read ``--captions`` (format from the extension; see module docstring).

    ``split`` keeps only the images of that Karpathy split (``train``, ``val``, ``test``…);
    one the file does not have is an error listing those it has.
    """
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"--captions {path}: no such file")
    kind = CAPTION_FORMATS.get(path.suffix.lower())
    if kind is None:
        raise UsageError(
            f"--captions {path}: unknown format {path.suffix or 'no extension'!r}; "
            f"expected one of {sorted(CAPTION_FORMATS)}"
        )
    if split is not None and kind != "json":
        raise UsageError(f"--split {split} only applies to a Karpathy .json file, not {path}")
    if kind == "jsonl":
        entries = list(_captions_jsonl(path))
    elif kind == "text":
        entries = list(_captions_text(path))
    else:
        kind, entries = _captions_json(path, split)
    captions: list[CaptionInput] = []
    skipped: list[SkippedItem] = []
    first_seen: dict[str, str] = {}
    for entry in entries:
        _check_unique("caption", entry.id, entry.origin, first_seen)
        if entry.caption.strip():
            captions.append(entry)
        else:
            skipped.append(
                SkippedItem("captions", entry.id, None, "empty_caption", f"{entry.origin}: empty")
            )
    return CaptionCorpus(path, kind, tuple(captions), tuple(skipped))


def _captions_jsonl(path: Path) -> Iterator[CaptionInput]:
    for line_number, record in _jsonl_objects(path):
        origin = f"{path}:{line_number}"
        caption = record.get("caption")
        if not isinstance(caption, str):
            raise UsageError(f"{origin}: expected a string 'caption', got {caption!r}")
        image = record.get("image")
        if image is not None and not isinstance(image, (str, int)):
            raise UsageError(f"{origin}: 'image' must be a gallery id (string), got {image!r}")
        caption_id = _id_text(record.get("id", str(line_number)), origin)
        yield CaptionInput(caption_id, caption.strip(), _ref(image), origin)


def _captions_text(path: Path) -> Iterator[CaptionInput]:
    for line_number, line in _lines(path):
        if line.strip():
            yield CaptionInput(str(line_number), line.strip(), None, f"{path}:{line_number}")


def _captions_json(path: Path, split: str | None) -> tuple[str, list[CaptionInput]]:
    """A Karpathy or COCO captions file, through the parser the trainer uses; blank captions
    come through as ``""`` (skipped and reported by the caller)."""
    document = _load_json(path)
    try:
        kind = detect_json_format(path, document)
        if kind == "coco":
            if split is not None:
                raise UsageError(
                    f"--split {split} only applies to a Karpathy .json file, not the COCO "
                    f"captions file {path}"
                )
            records = parse_coco(path, document, keep_blank=True, string_ids=True)
        else:
            records = select_splits(path, parse_karpathy(path, document, keep_blank=True), split)
    except CaptionFormatError as exc:
        location = f"{exc.path}:{exc.where}" if exc.where else f"{exc.path}"
        raise UsageError(f"{location}: {exc.problem}") from exc
    entries = [
        CaptionInput(
            record.caption_id, record.caption, _ref(record.image_file), f"{path}:{record.where}"
        )
        for record in records
    ]
    return kind, entries


def link_captions(captions: Sequence[CaptionInput], gallery_ids: Iterable[str]) -> list[str | None]:
    """The gallery id each caption describes, or None.

    A reference matches an id exactly, or else by file name when exactly one gallery image
    has that name (``images/test_1.png`` and Karpathy's ``filepath/filename`` both find
    ``test_1.png`` in a folder gallery).
    """
    ids = set(gallery_ids)
    by_name: dict[str, list[str]] = {}
    for image_id in ids:
        by_name.setdefault(PurePosixPath(image_id).name, []).append(image_id)
    links: list[str | None] = []
    for caption in captions:
        ref = caption.image_ref
        if ref is None:
            links.append(None)
        elif ref in ids:
            links.append(ref)
        else:
            candidates = by_name.get(PurePosixPath(ref).name, [])
            links.append(candidates[0] if len(candidates) == 1 else None)
    return links


# ---------------------------------------------------------------------- helpers
def _lines(path: Path) -> Iterator[tuple[int, str]]:
    try:
        with open(path, encoding="utf-8-sig") as stream:
            yield from enumerate(stream, start=1)
    except UnicodeDecodeError as exc:
        raise _not_utf8(path, exc) from exc


def _not_utf8(path: Path, exc: UnicodeDecodeError) -> UsageError:
    """The error for a file that does not decode, naming its first undecodable line."""
    with open(path, "rb") as stream:  # the decoder reads ahead in blocks: find the line
        for line_number, raw in enumerate(stream, start=1):
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError as line_error:
                return UsageError(f"{path}:{line_number}: not UTF-8 text ({line_error.reason})")
    return UsageError(f"{path}: not UTF-8 text ({exc})")


def _jsonl_objects(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    for line_number, line in _lines(path):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UsageError(f"{path}:{line_number}: invalid JSON ({exc.msg})") from exc
        except ValueError as exc:  # an integer of over 4300 digits
            raise UsageError(f"{path}:{line_number}: invalid JSON ({exc})") from exc
        except RecursionError as exc:
            raise UsageError(f"{path}:{line_number}: invalid JSON (nested too deeply)") from exc
        if not isinstance(record, dict):
            raise UsageError(
                f"{path}:{line_number}: expected a JSON object, got {line.strip()[:80]}"
            )
        yield line_number, record


def _load_json(path: Path) -> Any:
    try:
        with open(path, encoding="utf-8-sig") as stream:
            return json.load(stream)
    except json.JSONDecodeError as exc:
        raise UsageError(f"{path}:{exc.lineno}: invalid JSON ({exc.msg})") from exc
    except UnicodeDecodeError as exc:
        raise _not_utf8(path, exc) from exc


def _id_text(value: Any, origin: str) -> str:
    if isinstance(value, bool) or not isinstance(value, (str, int)) or not str(value).strip():
        raise UsageError(f"{origin}: an id must be a non-empty string or integer, got {value!r}")
    return str(value).strip()


def _ref(value: str | int | None) -> str | None:
    if value is None:
        return None
    text = str(value).strip().replace("\\", "/")
    while text.startswith("./"):
        text = text[2:]
    return text or None


def _check_unique(kind: str, item_id: str, origin: str, first_seen: dict[str, str]) -> None:
    if item_id in first_seen:
        raise UsageError(
            f"{origin}: duplicate {kind} id {item_id!r} (first at {first_seen[item_id]})"
        )
    first_seen[item_id] = origin
