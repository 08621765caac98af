"""The version manifest (``manifest.json``): one typed record, written by :mod:`indexer.publish`
and read by :mod:`indexer.store`.

:meth:`Manifest.to_dict` produces, and :meth:`Manifest.from_dict` accepts, exactly the JSON
layout of format :data:`FORMAT_VERSION` (key names and order)::

    format_version, version, created_at,
    model {fingerprint, embedding_dim, runtime, runtime_check, path},
    dim, metric, normalized,
    counts {images, captions, skipped, captions_linked_to_images, ignored_files},
    indexes {<modality>: {type, metric, ntotal, layout, files, params, recall_at_10, ...}},
    library_versions, inputs {images, captions}, skipped [...], skipped_by_reason {...},
    build {config, device, runtime, dtype, images, captions, engine, seconds, ...},
    files {<name>: {sha256, bytes}}

Only ``format_version``, ``version``, ``model.fingerprint``, ``dim``, ``counts.images``,
``counts.captions``, ``indexes`` and ``files`` are required: versions from older builds (no
runtime, no build section, ...) still read. An optional key that a manifest lacks stays
absent when written back (its field is None). Keys this module does not know are kept in
each record's ``extra`` and written back after the known ones, so a round trip loses nothing.
A missing required key or a value of the wrong type raises :class:`ManifestError` naming the
key (the store turns it into ``CorruptVersionError`` naming the file).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from indexer.sources import SkippedItem

FORMAT_VERSION = 1
# The encoder runtime of a manifest that records none: every version built before runtimes.
DEFAULT_RUNTIME = "torch"


class ManifestError(ValueError):
    """A manifest key that is missing or holds a value of the wrong type."""

    def __init__(self, key: str, problem: str) -> None:
        self.key = key
        super().__init__(f"key {key!r}: {problem}")


# ---------------------------------------------------------------------- reading helpers
_NAMES = {str: "a string", int: "an integer", float: "a number", bool: "a boolean"}


def _object(value: Any, key: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise ManifestError(key, f"expected an object, found {_describe(value)}")
    return value


def _describe(value: Any) -> str:
    return f"{type(value).__name__} {repr(value)[:40]}"


def _check(value: Any, kind: type, key: str) -> Any:
    """``value`` if it is a ``kind`` (an int counts as a float, a bool as neither)."""
    if kind is dict or kind is list:
        ok = isinstance(value, dict if kind is dict else list)
    elif kind is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    elif kind is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    else:
        ok = isinstance(value, kind)
    if not ok:
        expected = _NAMES.get(kind, f"a {kind.__name__}")
        raise ManifestError(key, f"expected {expected}, found {_describe(value)}")
    return value


def _required(data: Mapping[str, Any], key: str, kind: type, where: str) -> Any:
    name = f"{where}.{key}" if where else key
    if key not in data:
        raise ManifestError(name, "missing")
    return _check(data[key], kind, name)


def _optional(data: Mapping[str, Any], key: str, kind: type, where: str) -> Any:
    """The value at ``key``, or None when absent or null."""
    value = data.get(key)
    return None if value is None else _check(value, kind, f"{where}.{key}" if where else key)


def _extra(data: Mapping[str, Any], known: tuple[str, ...]) -> dict[str, Any]:
    return {key: value for key, value in data.items() if key not in known}


def _present(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """The pairs whose value is not None, in order (None marks an absent optional key)."""
    return {key: value for key, value in pairs if value is not None}


# ---------------------------------------------------------------------- records
@dataclass(frozen=True)
class RuntimeCheckFigures:
    """An encoder runtime's export-time check against torch fp32 (``model.runtime_check``)."""

    min_cosine: float
    mean_cosine: float
    recall_drop: float | None  # None: measured without a dataset
    extra: Mapping[str, Any] = field(default_factory=dict)

    _KEYS = ("min_cosine", "mean_cosine", "recall_drop")

    def to_dict(self) -> dict[str, Any]:
        return {
            "min_cosine": self.min_cosine,
            "mean_cosine": self.mean_cosine,
            "recall_drop": self.recall_drop,
            **self.extra,
        }

    @classmethod
    def from_dict(cls, data: Any, where: str = "model.runtime_check") -> RuntimeCheckFigures:
        data = _object(data, where)
        return cls(
            min_cosine=_required(data, "min_cosine", float, where),
            mean_cosine=_required(data, "mean_cosine", float, where),
            recall_drop=_optional(data, "recall_drop", float, where),
            extra=_extra(data, cls._KEYS),
        )


@dataclass(frozen=True)
class ModelInfo:
    """The encoder the vectors came from (``model``). ``runtime`` None: a manifest written
    before runtimes (read as :data:`DEFAULT_RUNTIME`); ``runtime_check`` is written (null for
    torch) whenever ``runtime`` is. ``path`` is the model directory of a build."""

    fingerprint: str
    embedding_dim: int | None = None
    runtime: str | None = None
    runtime_check: RuntimeCheckFigures | None = None
    path: str | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)

    _KEYS = ("fingerprint", "embedding_dim", "runtime", "runtime_check", "path")

    def to_dict(self) -> dict[str, Any]:
        check = self.runtime_check.to_dict() if self.runtime_check is not None else None
        return {
            "fingerprint": self.fingerprint,
            **_present([("embedding_dim", self.embedding_dim), ("runtime", self.runtime)]),
            **({"runtime_check": check} if self.runtime is not None or check is not None else {}),
            **_present([("path", self.path)]),
            **self.extra,
        }

    @classmethod
    def from_dict(cls, data: Any, where: str = "model") -> ModelInfo:
        data = _object(data, where)
        check = data.get("runtime_check")
        return cls(
            fingerprint=_required(data, "fingerprint", str, where),
            embedding_dim=_optional(data, "embedding_dim", int, where),
            runtime=_optional(data, "runtime", str, where),
            runtime_check=None if check is None else RuntimeCheckFigures.from_dict(check),
            path=_optional(data, "path", str, where),
            extra=_extra(data, cls._KEYS),
        )


@dataclass(frozen=True)
class Counts:
    """Rows per modality; the build adds what it left out (``counts``)."""

    images: int
    captions: int
    skipped: int | None = None
    captions_linked_to_images: int | None = None
    ignored_files: int | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)

    _KEYS = ("images", "captions", "skipped", "captions_linked_to_images", "ignored_files")

    def of(self, modality: str) -> int:
        """The row count of ``modality`` (``images`` or ``captions``)."""
        if modality not in ("images", "captions"):
            raise KeyError(modality)
        return self.images if modality == "images" else self.captions

    def to_dict(self) -> dict[str, Any]:
        return {
            "images": self.images,
            "captions": self.captions,
            **_present(
                [
                    ("skipped", self.skipped),
                    ("captions_linked_to_images", self.captions_linked_to_images),
                    ("ignored_files", self.ignored_files),
                ]
            ),
            **self.extra,
        }

    @classmethod
    def from_dict(cls, data: Any, where: str = "counts") -> Counts:
        data = _object(data, where)
        return cls(
            images=_required(data, "images", int, where),
            captions=_required(data, "captions", int, where),
            skipped=_optional(data, "skipped", int, where),
            captions_linked_to_images=_optional(data, "captions_linked_to_images", int, where),
            ignored_files=_optional(data, "ignored_files", int, where),
            extra=_extra(data, cls._KEYS),
        )


@dataclass(frozen=True)
class IndexEntry:
    """One modality's vector index (``indexes.<modality>``): its kind (``flat``, ``ivf``,
    ``hnsw``, ``ivfpq``; JSON ``type``), search parameters, ``layout`` (``in_memory`` or
    ``ondisk``), the files it spans and the recall@10 measured at build time."""

    kind: str
    metric: str | None = None
    ntotal: int | None = None
    layout: str | None = None
    files: tuple[str, ...] = ()  # written only when not empty
    params: Mapping[str, Any] = field(default_factory=dict)
    recall_at_10: float | None = None
    recall_queries: int | None = None
    recall_query_source: str | None = None
    tuning: tuple[Mapping[str, float], ...] | None = None
    build_seconds: float | None = None
    backend: str | None = None  # the reader (indexer.vector_index.BACKENDS); absent: faiss
    extra: Mapping[str, Any] = field(default_factory=dict)

    _KEYS = (
        "type", "metric", "ntotal", "layout", "files", "params", "recall_at_10",
        "recall_queries", "recall_query_source", "tuning", "build_seconds", "backend",
    )  # fmt: skip

    def to_dict(self) -> dict[str, Any]:
        return {
            "type": self.kind,
            **_present([("metric", self.metric), ("ntotal", self.ntotal)]),
            **_present([("layout", self.layout)]),
            **({"files": list(self.files)} if self.files else {}),
            "params": dict(self.params),
            **_present(
                [
                    ("recall_at_10", self.recall_at_10),
                    ("recall_queries", self.recall_queries),
                    ("recall_query_source", self.recall_query_source),
                    ("tuning", None if self.tuning is None else [dict(t) for t in self.tuning]),
                    ("build_seconds", self.build_seconds),
                    ("backend", self.backend),
                ]
            ),
            **self.extra,
        }

    @classmethod
    def from_dict(cls, data: Any, where: str = "indexes") -> IndexEntry:
        data = _object(data, where)
        files = _optional(data, "files", list, where) or []
        tuning = _optional(data, "tuning", list, where)
        return cls(
            kind=_required(data, "type", str, where),
            metric=_optional(data, "metric", str, where),
            ntotal=_optional(data, "ntotal", int, where),
            layout=_optional(data, "layout", str, where),
            files=tuple(_check(name, str, f"{where}.files") for name in files),
            params=_optional(data, "params", dict, where) or {},
            recall_at_10=_optional(data, "recall_at_10", float, where),
            recall_queries=_optional(data, "recall_queries", int, where),
            recall_query_source=_optional(data, "recall_query_source", str, where),
            tuning=None
            if tuning is None
            else tuple(_object(step, f"{where}.tuning") for step in tuning),
            build_seconds=_optional(data, "build_seconds", float, where),
            backend=_optional(data, "backend", str, where),
            extra=_extra(data, cls._KEYS),
        )


@dataclass(frozen=True)
class FileEntry:
    """The sha256 and size in bytes of one file of the version (``files.<name>``)."""

    sha256: str
    bytes: int
    extra: Mapping[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"sha256": self.sha256, "bytes": self.bytes, **self.extra}

    @classmethod
    def from_dict(cls, data: Any, where: str) -> FileEntry:
        data = _object(data, where)
        return cls(
            sha256=_required(data, "sha256", str, where),
            bytes=_required(data, "bytes", int, where),
            extra=_extra(data, ("sha256", "bytes")),
        )


@dataclass(frozen=True)
class SourceInfo:
    """One input of a build (``inputs.images`` / ``inputs.captions``)."""

    path: str
    format: str
    candidates: int
    extra: Mapping[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "format": self.format,
            "candidates": self.candidates,
            **self.extra,
        }

    @classmethod
    def from_dict(cls, data: Any, where: str) -> SourceInfo:
        data = _object(data, where)
        return cls(
            path=_required(data, "path", str, where),
            format=_required(data, "format", str, where),
            candidates=_required(data, "candidates", int, where),
            extra=_extra(data, ("path", "format", "candidates")),
        )


@dataclass(frozen=True)
class Inputs:
    """What a build read (``inputs``); None for a modality it was not given."""

    images: SourceInfo | None
    captions: SourceInfo | None
    extra: Mapping[str, Any] = field(default_factory=dict)

    def of(self, modality: str) -> SourceInfo | None:
        return self.images if modality == "images" else self.captions

    def to_dict(self) -> dict[str, Any]:
        return {
            "images": self.images.to_dict() if self.images is not None else None,
            "captions": self.captions.to_dict() if self.captions is not None else None,
            **self.extra,
        }

    @classmethod
    def from_dict(cls, data: Any, where: str = "inputs") -> Inputs:
        data = _object(data, where)
        images, captions = data.get("images"), data.get("captions")
        return cls(
            images=None if images is None else SourceInfo.from_dict(images, f"{where}.images"),
            captions=None
            if captions is None
            else SourceInfo.from_dict(captions, f"{where}.captions"),
            extra=_extra(data, ("images", "captions")),
        )


def _skipped_item(data: Any, where: str) -> SkippedItem:
    data = _object(data, where)
    return SkippedItem(
        modality=_required(data, "modality", str, where),
        id=_required(data, "id", str, where),
        path=_optional(data, "path", str, where),
        reason=_required(data, "reason", str, where),
        detail=_required(data, "detail", str, where),
    )


@dataclass(frozen=True)
class EngineInfo:
    """The engine that encoded a build (``build.engine``): its name and what it reports
    about itself (``workers``; the ``ray`` engine adds its cluster address and timings)."""

    name: str
    details: Mapping[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, **self.details}

    @classmethod
    def from_dict(cls, data: Any, where: str = "build.engine") -> EngineInfo:
        data = _object(data, where)
        return cls(_required(data, "name", str, where), _extra(data, ("name",)))


@dataclass(frozen=True)
class BuildInfo:
    """How a build ran (``build``): its config (:meth:`indexer.build.BuildConfig.to_dict`),
    where, the encoding figures of each modality (:meth:`indexer.pipeline.EncodeStats.to_dict`,
    None when not given) and the engine. Absent in versions published from given vectors."""

    config: Mapping[str, Any] | None = None
    device: str | None = None
    runtime: str | None = None
    dtype: str | None = None
    images: Mapping[str, float] | None = None  # always written, null when not built
    captions: Mapping[str, float] | None = None
    engine: EngineInfo | None = None
    seconds: float | None = None  # wall-clock, the whole build
    resumed_items: int | None = None  # items found already encoded by an earlier attempt
    images_per_s: float | None = None
    captions_per_s: float | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)

    _KEYS = (
        "config", "device", "runtime", "dtype", "images", "captions", "engine", "seconds",
        "resumed_items", "images_per_s", "captions_per_s",
    )  # fmt: skip

    def to_dict(self) -> dict[str, Any]:
        return {
            **_present(
                [
                    ("config", None if self.config is None else dict(self.config)),
                    ("device", self.device),
                    ("runtime", self.runtime),
                    ("dtype", self.dtype),
                ]
            ),
            "images": None if self.images is None else dict(self.images),
            "captions": None if self.captions is None else dict(self.captions),
            **_present(
                [
                    ("engine", None if self.engine is None else self.engine.to_dict()),
                    ("seconds", self.seconds),
                    ("resumed_items", self.resumed_items),
                    ("images_per_s", self.images_per_s),
                    ("captions_per_s", self.captions_per_s),
                ]
            ),
            **self.extra,
        }

    @classmethod
    def from_dict(cls, data: Any, where: str = "build") -> BuildInfo:
        data = _object(data, where)
        engine = data.get("engine")
        return cls(
            config=_optional(data, "config", dict, where),
            device=_optional(data, "device", str, where),
            runtime=_optional(data, "runtime", str, where),
            dtype=_optional(data, "dtype", str, where),
            images=_optional(data, "images", dict, where),
            captions=_optional(data, "captions", dict, where),
            engine=None if engine is None else EngineInfo.from_dict(engine),
            seconds=_optional(data, "seconds", float, where),
            resumed_items=_optional(data, "resumed_items", int, where),
            images_per_s=_optional(data, "images_per_s", float, where),
            captions_per_s=_optional(data, "captions_per_s", float, where),
            extra=_extra(data, cls._KEYS),
        )


@dataclass(frozen=True)
class Manifest:
    """Everything about one version (``manifest.json``); see the module docstring.

    ``metric`` is ``inner_product`` over ``normalized`` (L2) vectors. ``inputs``, ``skipped``,
    ``skipped_by_reason`` and ``build`` are written by a build (None: absent, e.g. a version
    published from given vectors). ``files`` is filled in when the manifest is written
    (:func:`indexer.publish.write_manifest`).
    """

    format_version: int
    version: str
    created_at: str | None
    model: ModelInfo
    dim: int
    counts: Counts
    indexes: Mapping[str, IndexEntry]
    metric: str | None = None
    normalized: bool | None = None
    library_versions: Mapping[str, str] | None = None
    inputs: Inputs | None = None
    skipped: tuple[SkippedItem, ...] | None = None
    skipped_by_reason: Mapping[str, int] | None = None
    build: BuildInfo | None = None
    files: Mapping[str, FileEntry] = field(default_factory=dict)
    extra: Mapping[str, Any] = field(default_factory=dict)  # written before ``files``

    _KEYS = (
        "format_version", "version", "created_at", "model", "dim", "metric", "normalized",
        "counts", "indexes", "library_versions", "inputs", "skipped", "skipped_by_reason",
        "build", "files",
    )  # fmt: skip

    @property
    def runtime(self) -> str:
        """The encoder runtime (``torch``, ``onnx``, ``onnx-int8``) the vectors came from;
        :data:`DEFAULT_RUNTIME` for manifests written before the indexer recorded it."""
        return self.model.runtime or DEFAULT_RUNTIME

    def to_dict(self) -> dict[str, Any]:
        """The JSON object of ``manifest.json``, keys in the order they are written."""
        return {
            "format_version": self.format_version,
            "version": self.version,
            **_present([("created_at", self.created_at)]),
            "model": self.model.to_dict(),
            "dim": self.dim,
            **_present([("metric", self.metric), ("normalized", self.normalized)]),
            "counts": self.counts.to_dict(),
            "indexes": {name: entry.to_dict() for name, entry in self.indexes.items()},
            **_present(
                [
                    (
                        "library_versions",
                        None if self.library_versions is None else dict(self.library_versions),
                    ),
                    ("inputs", None if self.inputs is None else self.inputs.to_dict()),
                    (
                        "skipped",
                        None if self.skipped is None else [s.to_dict() for s in self.skipped],
                    ),
                    (
                        "skipped_by_reason",
                        None if self.skipped_by_reason is None else dict(self.skipped_by_reason),
                    ),
                    ("build", None if self.build is None else self.build.to_dict()),
                ]
            ),
            **self.extra,
            "files": {name: entry.to_dict() for name, entry in self.files.items()},
        }

    @classmethod
    def from_dict(cls, data: Any) -> Manifest:
        """Read a manifest's JSON object; raises :class:`ManifestError` naming the key that is
        missing or of the wrong type. The format version is not checked here (the store does)."""
        data = _object(data, "(top level)")
        indexes = _required(data, "indexes", dict, "")
        files = _required(data, "files", dict, "")
        inputs, build = data.get("inputs"), data.get("build")
        skipped = _optional(data, "skipped", list, "")
        reasons = _optional(data, "skipped_by_reason", dict, "")
        versions = _optional(data, "library_versions", dict, "")
        return cls(
            format_version=_required(data, "format_version", int, ""),
            version=_required(data, "version", str, ""),
            created_at=_optional(data, "created_at", str, ""),
            model=ModelInfo.from_dict(_required(data, "model", dict, "")),
            dim=_required(data, "dim", int, ""),
            counts=Counts.from_dict(_required(data, "counts", dict, "")),
            indexes={
                name: IndexEntry.from_dict(entry, f"indexes.{name}")
                for name, entry in indexes.items()
            },
            metric=_optional(data, "metric", str, ""),
            normalized=_optional(data, "normalized", bool, ""),
            library_versions=None
            if versions is None
            else {
                name: _check(value, str, f"library_versions.{name}")
                for name, value in versions.items()
            },
            inputs=None if inputs is None else Inputs.from_dict(inputs),
            skipped=None
            if skipped is None
            else tuple(_skipped_item(item, f"skipped[{i}]") for i, item in enumerate(skipped)),
            skipped_by_reason=None
            if reasons is None
            else {
                reason: _check(count, int, f"skipped_by_reason.{reason}")
                for reason, count in reasons.items()
            },
            build=None if build is None else BuildInfo.from_dict(build),
            files={
                name: FileEntry.from_dict(entry, f"files.{name}") for name, entry in files.items()
            },
            extra=_extra(data, cls._KEYS),
        )
