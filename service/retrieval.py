"""The query path as stages: encode → search → (re-rank, see :mod:`service.rerank`) → hydrate.

- **encode**: :class:`EncodeBatch` is the one micro-batcher processor per encoder: a batch of
  inputs in, one unit vector per input out, in a single forward pass.
- **search**: :func:`search` looks a query vector up in the index its :class:`Target` names,
  restricted to the rows a metadata ``filter`` selects (inside the FAISS search, not after it)
  and leaving out an :class:`Exclusion` (the query image itself). The routes reach it through
  :class:`service.search_batch.SearchStage`, which searches concurrent unfiltered queries in
  one FAISS call (:func:`search_matrix`).
- **hydrate**: :func:`hydrate` turns hits into :class:`Scored` records from the index metadata.
- **page**: :class:`Page` cuts the (re-ranked) results to what the client asked for:
  ``min_score``, then ``offset`` and ``k``.

A route composes them in order; a new query kind (say image → images) is one route naming an
encoder and a target. Every stage runs in the index version the request leased, so a query
that straddles a hot reload is answered from the version it started with.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Generic, Protocol, TypeVar

import numpy as np
from PIL import Image

from indexer.store import (
    CaptionRecord,
    FilterError,
    ImageRecord,
    IndexVersion,
    Modality,
    ModalityMissingError,
    RowSelection,
)
from model.images import ImageError
from service.errors import BadRequest, EncodeFailed, InvalidFilter, ModalityMissing, NotFound
from service.metrics import ServiceMetrics

if TYPE_CHECKING:
    from model.runtime import RuntimeCheck

RecordT = TypeVar("RecordT", ImageRecord, CaptionRecord)
InputT = TypeVar("InputT", str, Image.Image)


class Encoder(Protocol):
    """What the service needs of an encoder runtime (:func:`model.runtime.load_encoder`;
    tests may pass a fake)."""

    @property
    def embedding_dim(self) -> int: ...

    @property
    def fingerprint(self) -> str: ...

    @property
    def runtime(self) -> str: ...  # torch, onnx or onnx-int8

    @property
    def check(self) -> RuntimeCheck | None: ...  # the runtime's check against torch fp32

    def encode_text(self, texts: list[str], batch_size: int = ...) -> np.ndarray: ...

    def encode_images(self, images: list[Image.Image], batch_size: int = ...) -> np.ndarray: ...


class EncodeBatch(Generic[InputT]):
    """Encode stage, run by a micro-batcher: inputs → float32 unit vectors ``(D,)``, one pass."""

    def __init__(
        self,
        modality: str,  # metrics label and error wording: "text" or "image"
        encode: Callable[[list[InputT], int], np.ndarray],  # (inputs, batch size) → (B, D)
        metrics: ServiceMetrics,
    ) -> None:
        self.modality = modality
        self.encode: Callable[[list[InputT], int], np.ndarray] = encode
        self.metrics = metrics

    def __call__(self, inputs: Sequence[InputT]) -> list[np.ndarray]:
        self.metrics.batch_size.labels(self.modality).observe(len(inputs))
        started = time.perf_counter()
        try:
            xq = self.encode(list(inputs), len(inputs))  # (B, D)
        except ImageError as exc:  # preprocessing refused the input itself
            raise BadRequest(f"cannot encode the image: {exc}", code=exc.reason) from exc
        except Exception as exc:
            # Clients see the kind of failure only; the batcher logs the traceback.
            raise EncodeFailed(
                f"the {self.modality} encoder failed on this query ({type(exc).__name__})"
            ) from exc
        self.metrics.encode_seconds.labels(self.modality).observe(time.perf_counter() - started)
        return [np.ascontiguousarray(row, dtype=np.float32) for row in xq]


def text_encoder(encoder: Encoder, metrics: ServiceMetrics) -> EncodeBatch[str]:
    return EncodeBatch("text", lambda texts, n: encoder.encode_text(texts, batch_size=n), metrics)


def image_encoder(encoder: Encoder, metrics: ServiceMetrics) -> EncodeBatch[Image.Image]:
    return EncodeBatch(
        "image", lambda images, n: encoder.encode_images(images, batch_size=n), metrics
    )


SearchFn = Callable[
    [IndexVersion, np.ndarray, int, RowSelection | None], tuple[np.ndarray, np.ndarray]
]


@dataclass(frozen=True)
class Target(Generic[RecordT]):
    """An index a query searches: how to search it, count it and read its records."""

    name: str  # what the index holds, for messages: "gallery image" or "caption"
    modality: Modality  # the store's name for it, which a metadata filter selects rows of
    search: SearchFn  # (index, xq (B, D), k, selection) → (D, I), each (B, k)
    records: Callable[[IndexVersion, Sequence[int]], list[RecordT]]
    count: Callable[[IndexVersion], int]


IMAGES: Target[ImageRecord] = Target(
    "gallery image",
    "images",
    search=lambda index, xq, k, selection: index.search_images(xq, k, selection=selection),
    records=lambda index, rows: index.image_records(rows),
    count=lambda index: index.image_count,
)
CAPTIONS: Target[CaptionRecord] = Target(
    "caption",
    "captions",
    search=lambda index, xq, k, selection: index.search_captions(xq, k, selection=selection),
    records=lambda index, rows: index.caption_records(rows),
    count=lambda index: index.caption_count,
)


@dataclass(frozen=True)
class Hit:
    """One search result: its faiss row and cosine similarity to the query."""

    row: int
    retrieval_score: float


@dataclass(frozen=True)
class Scored(Generic[RecordT]):
    """A hydrated result: its record, its cosine and, once re-ranked, the teacher's logit."""

    record: RecordT
    retrieval_score: float
    teacher_score: float | None = None

    @property
    def score(self) -> float:
        """The final score: the teacher's logit when re-ranked, otherwise the cosine."""
        return self.teacher_score if self.teacher_score is not None else self.retrieval_score


# An upload at least this similar to a gallery image is taken to be that image (the same file,
# re-encoded: float noise only) and left out of "more like this" results.
DUPLICATE_COSINE = 0.9999
DUPLICATE_SLACK = 4  # extra results searched so that k remain after dropping such copies


@dataclass(frozen=True)
class Exclusion:
    """Results a query leaves out: the query image itself, by row (queried by its gallery id)
    or, for an upload, any gallery image with cosine ≥ ``min_cosine`` (its copies)."""

    rows: frozenset[int] = frozenset()
    min_cosine: float | None = None

    @property
    def slack(self) -> int:
        """How many more results to search so that ``k`` remain after the exclusion."""
        return len(self.rows) + (DUPLICATE_SLACK if self.min_cosine is not None else 0)

    def drops(self, hit: Hit) -> bool:
        return hit.row in self.rows or (
            self.min_cosine is not None and hit.retrieval_score >= self.min_cosine
        )


NO_EXCLUSION = Exclusion()


def require_target(index: IndexVersion, target: Target[RecordT]) -> None:
    """Refuse a query (before it is encoded) whose target index is empty in this version."""
    if target.count(index) == 0:
        raise ModalityMissing(f"index version {index.version} has no {target.name}s")


def select_rows(
    index: IndexVersion, target: Target[RecordT], metadata_filter: Mapping[str, Any] | None
) -> RowSelection | None:
    """The rows of ``target`` whose (image) metadata matches ``metadata_filter``; None for no
    filter (an empty one included). Raises :class:`InvalidFilter` (422). Blocking (sqlite)."""
    if not metadata_filter:
        return None
    try:
        return index.select(target.modality, metadata_filter)
    except FilterError as exc:
        field: str | None = exc.field
        known: list[str] = list(exc.known)
        unknown = field is not None and field not in known
        raise InvalidFilter(
            str(exc),
            details=[
                {
                    "loc": ["filter", *([field] if field is not None else [])],
                    "msg": str(exc),
                    "type": "unknown_field" if unknown else "invalid_filter",
                    "known_fields": known,
                }
            ],
        ) from exc


def search(
    index: IndexVersion,
    target: Target[RecordT],
    xq: np.ndarray,  # (D,) float32 unit vector
    k: int,
    metrics: ServiceMetrics,
    modality: str,
    *,
    metadata_filter: Mapping[str, Any] | None = None,
    exclude: Exclusion = NO_EXCLUSION,
) -> list[Hit]:
    """Search stage: the ``k`` nearest rows of ``target`` in ``index`` that match
    ``metadata_filter`` and are not excluded, best first (blocking).

    The filter is applied inside the FAISS search (a row selection), so k results come back
    whenever k rows match, however selective the filter."""
    started = time.perf_counter()
    try:
        selection = select_rows(index, target, metadata_filter)
        if selection is not None and selection.count == 0:
            return []
        distances, rows = search_matrix(
            index, target, xq[None], k + exclude.slack, selection
        )  # (1, k + slack)
    finally:
        metrics.search_seconds.labels(modality).observe(time.perf_counter() - started)
    return best_hits(distances[0], rows[0], k, exclude)


def search_matrix(
    index: IndexVersion,
    target: Target[RecordT],
    xq: np.ndarray,  # (B, D) float32 unit vectors
    k: int,
    selection: RowSelection | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """One FAISS search of ``B`` query vectors: ``(D, I)``, each ``(B, k)`` (blocking).

    Raises :class:`ModalityMissing` when the version has no ``target`` index."""
    try:
        return target.search(index, np.ascontiguousarray(xq, dtype=np.float32), k, selection)
    except ModalityMissingError as exc:
        raise ModalityMissing(f"the served index has no {target.name} vectors: {exc}") from exc


def best_hits(
    distances: np.ndarray,  # (k',) one query's row of a search, best first
    rows: np.ndarray,  # (k',)
    k: int,
    exclude: Exclusion = NO_EXCLUSION,
) -> list[Hit]:
    """The first ``k`` hits of one query's search results that ``exclude`` keeps."""
    # -1 = fewer than k matching rows in the index
    hits = [Hit(int(r), float(d)) for d, r in zip(distances, rows, strict=True) if r >= 0]
    return [hit for hit in hits if not exclude.drops(hit)][:k]


def hydrate(
    index: IndexVersion, target: Target[RecordT], hits: Sequence[Hit]
) -> list[Scored[RecordT]]:
    """Hydrate stage: each hit's record from the index metadata, in the hits' order (blocking)."""
    return hydrate_each(index, target, [hits])[0]


def hydrate_each(
    index: IndexVersion, target: Target[RecordT], hits_per_query: Sequence[Sequence[Hit]]
) -> list[list[Scored[RecordT]]]:
    """:func:`hydrate` for the queries of a search batch: one metadata read for all their hits
    (a read per query would queue on the store's one SQLite connection)."""
    records = iter(target.records(index, [hit.row for hits in hits_per_query for hit in hits]))
    return [[Scored(next(records), hit.retrieval_score) for hit in hits] for hits in hits_per_query]


def retrieve(
    index: IndexVersion,
    target: Target[RecordT],
    xq: np.ndarray,
    k: int,
    metrics: ServiceMetrics,
    modality: str,
    *,
    metadata_filter: Mapping[str, Any] | None = None,
    exclude: Exclusion = NO_EXCLUSION,
) -> list[Scored[RecordT]]:
    """Search then hydrate, in one call so a route runs both in one worker-thread hop."""
    hits = search(
        index, target, xq, k, metrics, modality, metadata_filter=metadata_filter, exclude=exclude
    )
    return hydrate(index, target, hits)


def gallery_vector(index: IndexVersion, image_id: str) -> tuple[int, np.ndarray]:
    """A gallery image's faiss row and stored vector ``(D,)``, renormalised (IVF-PQ stores an
    approximation). Raises :class:`NotFound` (404) for an id the index does not list."""
    row = index.image_row(image_id)  # the row only: the results are hydrated anyway
    if row is None:
        raise NotFound(
            f"no gallery image with id {image_id[:200]!r} in index version {index.version}"
        )
    vector = index.reconstruct("images", [row])[0].astype(np.float32)  # (D,)
    return row, vector / max(float(np.linalg.norm(vector)), 1e-12)


def retrieve_similar(
    index: IndexVersion,
    image_id: str,
    k: int,
    metrics: ServiceMetrics,
    *,
    metadata_filter: Mapping[str, Any] | None = None,
) -> list[Scored[ImageRecord]]:
    """More like a gallery image: its stored vector searched against the gallery (no encoder
    pass), the image itself left out; one call, so one worker-thread hop."""
    row, xq = gallery_vector(index, image_id)
    return retrieve(
        index,
        IMAGES,
        xq,
        k,
        metrics,
        "image",
        metadata_filter=metadata_filter,
        exclude=Exclusion(rows=frozenset({row})),
    )


@dataclass(frozen=True)
class Page:
    """Which results a client asked for: ``k`` of them after the first ``offset``, none whose
    cosine (``retrieval_score``, also after re-ranking) is below ``min_score``."""

    k: int
    offset: int = 0
    min_score: float | None = None

    @property
    def depth(self) -> int:
        """How many results to search (and, at most, re-rank) for this page."""
        return self.offset + self.k

    def cut(self, results: Sequence[Scored[RecordT]]) -> list[Scored[RecordT]]:
        """Page stage: drop results below ``min_score``, then take ``[offset, offset + k)``."""
        kept = [
            result
            for result in results
            if self.min_score is None or result.retrieval_score >= self.min_score
        ]
        return kept[self.offset : self.offset + self.k]
