"""The query path as stages: encode → search → (re-rank, see :mod:`service.rerank`) → hydrate.

- **encode**: :class:`EncodeBatch` is the one micro-batcher processor per encoder: a batch of
  inputs in, one unit vector per input out, in a single forward pass.
- **search**: :func:`search` looks a query vector up in the index its :class:`Target` names.
- **hydrate**: :func:`hydrate` turns hits into :class:`Scored` records from the index metadata.

A route composes them in order; a new query kind (say image → images) is one route naming an
encoder and a target. Every stage runs in the index version the request leased, so a query
that straddles a hot reload is answered from the version it started with.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

import numpy as np
from PIL import Image

from indexer.store import CaptionRecord, ImageRecord, IndexVersion, ModalityMissingError
from model.images import ImageError
from service.errors import BadRequest, EncodeFailed, ModalityMissing
from service.metrics import ServiceMetrics

RecordT = TypeVar("RecordT", ImageRecord, CaptionRecord)
InputT = TypeVar("InputT", str, Image.Image)


class Encoder(Protocol):
    """What the service needs of :class:`model.VLDeformer` (tests may pass a fake)."""

    @property
    def embedding_dim(self) -> int: ...

    @property
    def fingerprint(self) -> str: ...

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


@dataclass(frozen=True)
class Target(Generic[RecordT]):
    """An index a query searches: how to search it, count it and read its records."""

    name: str  # what the index holds, for messages: "gallery image" or "caption"
    search: Callable[[IndexVersion, np.ndarray, int], tuple[np.ndarray, np.ndarray]]
    records: Callable[[IndexVersion, Sequence[int]], list[RecordT]]
    count: Callable[[IndexVersion], int]


IMAGES: Target[ImageRecord] = Target(
    "gallery image",
    search=lambda index, xq, k: index.search_images(xq, k),
    records=lambda index, rows: index.image_records(rows),
    count=lambda index: index.image_count,
)
CAPTIONS: Target[CaptionRecord] = Target(
    "caption",
    search=lambda index, xq, k: index.search_captions(xq, k),
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


def require_target(index: IndexVersion, target: Target[RecordT]) -> None:
    """Refuse a query (before it is encoded) whose target index is empty in this version."""
    if target.count(index) == 0:
        raise ModalityMissing(f"index version {index.version} has no {target.name}s")


def search(
    index: IndexVersion,
    target: Target[RecordT],
    xq: np.ndarray,  # (D,) float32 unit vector
    k: int,
    metrics: ServiceMetrics,
    modality: str,
) -> list[Hit]:
    """Search stage: the ``k`` nearest rows of ``target`` in ``index``, best first (blocking)."""
    started = time.perf_counter()
    try:
        distances, rows = target.search(index, np.ascontiguousarray(xq[None]), k)  # (1, k)
    except ModalityMissingError as exc:
        raise ModalityMissing(f"the served index has no {target.name} vectors: {exc}") from exc
    finally:
        metrics.search_seconds.labels(modality).observe(time.perf_counter() - started)
    # -1 = fewer than k rows in the index
    return [Hit(int(r), float(d)) for d, r in zip(distances[0], rows[0], strict=True) if r >= 0]


def hydrate(
    index: IndexVersion, target: Target[RecordT], hits: Sequence[Hit]
) -> list[Scored[RecordT]]:
    """Hydrate stage: each hit's record from the index metadata, in the hits' order (blocking)."""
    records = target.records(index, [hit.row for hit in hits])
    return [Scored(record, hit.retrieval_score) for record, hit in zip(records, hits, strict=True)]


def retrieve(
    index: IndexVersion,
    target: Target[RecordT],
    xq: np.ndarray,
    k: int,
    metrics: ServiceMetrics,
    modality: str,
) -> list[Scored[RecordT]]:
    """Search then hydrate, in one call so a route runs both in one worker-thread hop."""
    return hydrate(index, target, search(index, target, xq, k, metrics, modality))
