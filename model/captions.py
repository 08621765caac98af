"""Caption files parsed into typed records: the one parser of the model and the indexer.

- :func:`parse_karpathy`: Karpathy split files (``dataset_coco.json``, ``dataset_flickr30k.json``)
- :func:`parse_coco`: COCO captions files (``annotations/captions_train2014.json``)
- :func:`detect_json_format`: which of the two a loaded JSON document is
- :func:`parse_pair_jsonl`: the trainer's JSONL of ``{"image": path, "caption": text}`` lines
  (the indexer's own JSONL names gallery ids, not image files: :mod:`indexer.sources`)
- :func:`select_splits`: the records of some splits

Each caption becomes a :class:`CaptionRecord` that says where in the file it was found. What a
caller makes of the records is its own policy, set by small parameters: whether a blank
caption is an error (training) or kept as ``""`` to be skipped and reported (indexing),
whether COCO ids may be strings, and whether COCO captions come in file or image order.
Malformed input raises :class:`CaptionFormatError` with the file, the line or JSON path and
what was expected and found; callers map it to their own error type (``DatasetFormatError``
in :mod:`model.data`, ``UsageError`` in :mod:`indexer.sources`).

Loading the JSON document is left to the caller, whose messages for a file that does not
decode follow its own conventions.
"""

from __future__ import annotations

import json
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Literal


class CaptionFormatError(ValueError):
    """A caption file that does not hold what its format promises.

    ``where`` is the line (``"line 7"``) or JSON path (``"images[3] (filename 'x.jpg')"``),
    ``""`` for the whole file; ``problem`` says what was expected and found.
    """

    def __init__(self, path: Path, where: str, problem: str) -> None:
        self.path = path
        self.where = where
        self.problem = problem
        super().__init__(f"{path}, {where}: {problem}" if where else f"{path}: {problem}")


@dataclass(frozen=True)
class CaptionRecord:
    """One caption of a caption file.

    ``caption`` is stripped (``""`` only where the parser was told to keep blank captions);
    ``caption_id`` is the file's id for the caption (Karpathy ``sentid``, COCO annotation
    ``id``, else its position: ``"3.1"`` for ``images[3].sentences[1]``, the annotation index,
    the line number); ``image_id`` is the image's (Karpathy ``cocoid`` or the file name's stem,
    COCO ``images[].id``); ``image_file`` is the image's path as written (Karpathy
    ``filepath/filename``), relative to a folder the caller knows; ``split`` is ``""`` where
    the format or record carries none; ``where`` locates the caption for messages.
    """

    caption: str
    caption_id: str
    image_id: str
    image_file: str
    split: str
    where: str


JsonFormat = Literal["karpathy", "coco"]


def detect_json_format(path: Path, document: Any) -> JsonFormat:
    """``"coco"`` for an object with ``images`` and ``annotations``, ``"karpathy"`` for any
    other object with an ``images`` list; :class:`CaptionFormatError` otherwise."""
    if isinstance(document, dict) and "annotations" in document and "images" in document:
        return "coco"
    if isinstance(document, dict) and isinstance(document.get("images"), list):
        return "karpathy"
    found = sorted(document)[:10] if isinstance(document, dict) else type(document).__name__
    raise CaptionFormatError(
        path,
        "",
        "expected a Karpathy split file (an object with 'images') or a COCO captions file "
        f"('images' and 'annotations'), found {found}",
    )


def parse_karpathy(path: Path, document: Any, *, keep_blank: bool = False) -> list[CaptionRecord]:
    """The captions of a Karpathy split file, image by image in file order.

    Each ``images[]`` record gives ``filename``, optional ``filepath`` (COCO: ``train2014``),
    ``split``, ``cocoid`` and ``sentences[]`` of ``{"raw": text, "sentid"?: id}``; the image
    file is ``filepath/filename``. With ``keep_blank`` a blank ``raw`` comes through as ``""``
    and an image with no sentences is allowed; otherwise both are errors.
    """
    records: list[CaptionRecord] = []
    for index, image in enumerate(_top_level_list(path, document, "images")):
        where = f"images[{index}]"
        if not isinstance(image, dict):
            raise CaptionFormatError(path, where, f"expected an object, found {_short(image)}")
        filename = _field(path, where, image, "filename", str)
        where = f"images[{index}] (filename {filename!r})"
        filepath = _field(path, where, image, "filepath", str, default="")
        split = _field(path, where, image, "split", str, default="")
        sentences = image.get("sentences")
        if not isinstance(sentences, list) or not (sentences or keep_blank):
            expected = "a list" if keep_blank else "a non-empty list"
            raise CaptionFormatError(
                path, where, f"expected 'sentences' to be {expected}, found {_short(sentences)}"
            )
        cocoid = image.get("cocoid")
        image_id = str(cocoid) if cocoid is not None else PurePosixPath(filename).stem
        image_file = f"{filepath}/{filename}" if filepath else filename
        for number, sentence in enumerate(sentences):
            sentence_where = f"{where}.sentences[{number}]"
            if not isinstance(sentence, dict):
                raise CaptionFormatError(
                    path,
                    sentence_where,
                    f"expected an object with 'raw', found {_short(sentence)}",
                )
            caption = _caption(path, sentence_where, sentence, "raw", keep_blank)
            caption_id = _id(path, sentence_where, sentence, "sentid", f"{index}.{number}")
            records.append(
                CaptionRecord(caption, caption_id, image_id, image_file, split, sentence_where)
            )
    return records


def parse_coco(
    path: Path,
    document: Any,
    *,
    keep_blank: bool = False,
    string_ids: bool = False,
    image_order: bool = False,
) -> list[CaptionRecord]:
    """The captions of a COCO captions file (its records have no split: ``""``).

    ``images[]`` map ``id`` to ``file_name``; ``annotations[]`` give ``image_id``,
    ``caption`` and an optional ``id``. Image ids are integers, as in the COCO release, or
    with ``string_ids`` integers or strings. Records come in annotation order, or with
    ``image_order`` image by image in the order of ``images[]`` (annotation order within an
    image). With ``keep_blank`` a blank caption comes through as ``""``, otherwise it is an
    error.
    """
    images = _top_level_list(path, document, "images")
    annotations = _top_level_list(path, document, "annotations")
    id_kind: type | tuple[type, ...] = (str, int) if string_ids else int
    file_names: dict[str | int, tuple[str, str]] = {}  # id -> (file_name, where)
    for index, image in enumerate(images):
        where = f"images[{index}]"
        if not isinstance(image, dict):
            raise CaptionFormatError(path, where, f"expected an object, found {_short(image)}")
        image_id = _field(path, where, image, "id", id_kind)
        file_name = _field(path, where, image, "file_name", str)
        if image_id in file_names:
            raise CaptionFormatError(
                path, where, f"image id {image_id!r} already used by {file_names[image_id][1]}"
            )
        file_names[image_id] = (file_name, where)
    by_image: dict[str | int, list[CaptionRecord]] = {image_id: [] for image_id in file_names}
    records: list[CaptionRecord] = []
    for index, annotation in enumerate(annotations):
        where = f"annotations[{index}]"
        if not isinstance(annotation, dict):
            raise CaptionFormatError(path, where, f"expected an object, found {_short(annotation)}")
        image_id = _field(path, where, annotation, "image_id", id_kind)
        where = f"annotations[{index}] (image_id {image_id!r})"
        caption = _caption(path, where, annotation, "caption", keep_blank)
        if image_id not in file_names:
            raise CaptionFormatError(
                path, where, f"expected an image_id listed in 'images', found {image_id!r}"
            )
        caption_id = _id(path, where, annotation, "id", str(index))
        record = CaptionRecord(
            caption, caption_id, str(image_id), file_names[image_id][0], "", where
        )
        records.append(record)
        by_image[image_id].append(record)
    if image_order:
        return [record for image_records in by_image.values() for record in image_records]
    return records


def parse_pair_jsonl(path: Path) -> list[CaptionRecord]:
    """The captions of a JSONL file of ``{"image": path, "caption": text}`` objects.

    Optional keys: ``"image_id"`` (defaults to the ``"image"`` string) and ``"split"``
    (``""``). ``image_file`` is the ``"image"`` string; ``caption_id`` the line number. Blank
    lines are skipped, blank captions are errors; line numbers count from 1.
    """
    records: list[CaptionRecord] = []
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            where = f"line {number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise CaptionFormatError(
                    path,
                    where,
                    f"expected a JSON object, found invalid JSON ({exc.msg} at column "
                    f"{exc.colno}): {_short(line.strip())}",
                ) from exc
            if not isinstance(record, dict):
                raise CaptionFormatError(
                    path, where, f"expected a JSON object, found {_short(record)}"
                )
            image = _field(path, where, record, "image", str)
            caption = _caption(path, where, record, "caption", keep_blank=False)
            image_id = _field(path, where, record, "image_id", (str, int), default=image)
            split = _field(path, where, record, "split", str, default="")
            records.append(CaptionRecord(caption, str(number), str(image_id), image, split, where))
    return records


def select_splits(
    path: Path, records: Sequence[CaptionRecord], split: str | Collection[str] | None
) -> list[CaptionRecord]:
    """The records of ``split`` (a name or a collection of names; ``None`` keeps all).

    A requested split that no record has is an error listing the splits the file has.
    """
    if split is None:
        return list(records)
    wanted = {split} if isinstance(split, str) else set(split)
    available = sorted({record.split for record in records})
    unknown = sorted(wanted - set(available))
    if unknown:
        raise CaptionFormatError(
            path, "", f"no records of split {unknown}; the file has {available}"
        )
    return [record for record in records if record.split in wanted]


# ---------------------------------------------------------------------------- helpers


def _top_level_list(path: Path, document: Any, key: str) -> list[Any]:
    if not isinstance(document, dict):
        raise CaptionFormatError(
            path, "", f"expected a JSON object with a list '{key}', found {type(document).__name__}"
        )
    value = document.get(key)
    if not isinstance(value, list):
        raise CaptionFormatError(path, "", f"expected '{key}' to be a list, found {_short(value)}")
    return value


_REQUIRED: Any = object()
_KIND_NAMES: dict[type | tuple[type, ...], str] = {
    str: "a string",
    int: "an integer",
    (str, int): "a string or integer",
}


def _field(
    path: Path,
    where: str,
    record: dict[str, Any],
    key: str,
    kind: type | tuple[type, ...],
    default: Any = _REQUIRED,
) -> Any:
    """``record[key]`` checked to be of ``kind``; ``default`` when the key is absent."""
    if key not in record and default is not _REQUIRED:
        return default
    value = record.get(key)
    # bool is an int subclass; a true/false id is a mistake, not an id.
    if not isinstance(value, kind) or isinstance(value, bool):
        expected = _KIND_NAMES.get(kind, str(kind))
        found = "nothing (key missing)" if key not in record else _short(value)
        raise CaptionFormatError(path, where, f"expected '{key}' to be {expected}, found {found}")
    return value


def _caption(path: Path, where: str, record: dict[str, Any], key: str, keep_blank: bool) -> str:
    caption = str(_field(path, where, record, key, str)).strip()
    if not caption and not keep_blank:
        raise CaptionFormatError(
            path,
            where,
            f"expected '{key}' to be a non-empty caption, found {_short(record[key])}",
        )
    return caption


def _id(path: Path, where: str, record: dict[str, Any], key: str, default: str) -> str:
    """``record[key]`` as an id (a non-blank string or an integer), ``default`` when absent."""
    text = str(_field(path, where, record, key, (str, int), default=default)).strip()
    if not text:
        raise CaptionFormatError(
            path, where, f"expected '{key}' to be a non-empty id, found {_short(record[key])}"
        )
    return text


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
