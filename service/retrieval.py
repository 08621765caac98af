"""The two query pipelines the batchers run: encode a batch, then search it, off the event loop.

A text query searches the image index; an image query searches the caption index. Each query
carries the :class:`indexer.store.IndexVersion` it leased when it arrived, so a batch that
straddles a hot reload searches each query in the version it started with.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

import numpy as np
from PIL import Image

from indexer.store import CaptionRecord, ImageRecord, IndexVersion, ModalityMissingError
from service.errors import ModalityMissing
from service.metrics import ServiceMetrics

RecordT = TypeVar("RecordT", ImageRecord, CaptionRecord)


class Encoder(Protocol):
    """What the service needs of :class:`model.VLDeformer` (tests may pass a fake)."""

    @property
    def embedding_dim(self) -> int: ...

    @property
    def fingerprint(self) -> str: ...

    def encode_text(self, texts: list[str], batch_size: int = ...) -> np.ndarray: ...

    def encode_images(self, images: list[Image.Image], batch_size: int = ...) -> np.ndarray: ...


@dataclass(frozen=True)
class TextQuery:
    text: str
    k: int
    index: IndexVersion


@dataclass(frozen=True)
class ImageQuery:
    image: Image.Image
    k: int
    index: IndexVersion


@dataclass(frozen=True)
class Neighbours(Generic[RecordT]):
    """One query's hits, best first: cosine ``scores`` and the matching ``records``."""

    scores: list[float]
    records: list[RecordT]


def _search_groups(
    xq: np.ndarray,  # (B, D) float32 unit rows
    ks: Sequence[int],
    indexes: Sequence[IndexVersion],
    search: Callable[[IndexVersion, np.ndarray, int], tuple[np.ndarray, np.ndarray]],
    records: Callable[[IndexVersion, list[int]], list[RecordT]],
) -> list[Neighbours[RecordT]]:
    """Search each query in its own index version: one search call per distinct version."""
    out: list[Neighbours[RecordT] | None] = [None] * len(ks)
    groups: dict[int, list[int]] = {}
    for position, index in enumerate(indexes):
        groups.setdefault(id(index), []).append(position)
    for positions in groups.values():
        index = indexes[positions[0]]
        k = max(ks[p] for p in positions)
        distances, rows = search(index, np.ascontiguousarray(xq[positions]), k)  # (b, k)
        for j, position in enumerate(positions):
            keep = [c for c in range(ks[position]) if rows[j, c] >= 0]  # -1 = fewer than k
            found = records(index, [int(rows[j, c]) for c in keep])
            out[position] = Neighbours([float(distances[j, c]) for c in keep], found)
    return [neighbours for neighbours in out if neighbours is not None]


class TextSearch:
    """Batch processor: texts → text vectors → nearest gallery images."""

    def __init__(self, encoder: Encoder, metrics: ServiceMetrics, *, delay_s: float = 0.0) -> None:
        self.encoder = encoder
        self.metrics = metrics
        self.delay_s = delay_s

    def __call__(self, queries: Sequence[TextQuery]) -> list[Neighbours[ImageRecord]]:
        self.metrics.batch_size.labels("text").observe(len(queries))
        started = time.perf_counter()
        if self.delay_s:
            time.sleep(self.delay_s)
        xq = self.encoder.encode_text([q.text for q in queries], batch_size=len(queries))
        self.metrics.encode_seconds.labels("text").observe(time.perf_counter() - started)
        started = time.perf_counter()
        try:
            return _search_groups(
                xq,
                [q.k for q in queries],
                [q.index for q in queries],
                lambda index, x, k: index.search_images(x, k),
                lambda index, rows: index.image_records(rows),
            )
        except ModalityMissingError as exc:
            raise ModalityMissing(f"the served index has no image vectors: {exc}") from exc
        finally:
            self.metrics.search_seconds.labels("text").observe(time.perf_counter() - started)


class ImageSearch:
    """Batch processor: decoded images → image vectors → nearest gallery captions."""

    def __init__(self, encoder: Encoder, metrics: ServiceMetrics, *, delay_s: float = 0.0) -> None:
        self.encoder = encoder
        self.metrics = metrics
        self.delay_s = delay_s

    def __call__(self, queries: Sequence[ImageQuery]) -> list[Neighbours[CaptionRecord]]:
        self.metrics.batch_size.labels("image").observe(len(queries))
        started = time.perf_counter()
        if self.delay_s:
            time.sleep(self.delay_s)
        xq = self.encoder.encode_images([q.image for q in queries], batch_size=len(queries))
        self.metrics.encode_seconds.labels("image").observe(time.perf_counter() - started)
        started = time.perf_counter()
        try:
            return _search_groups(
                xq,
                [q.k for q in queries],
                [q.index for q in queries],
                lambda index, x, k: index.search_captions(x, k),
                lambda index, rows: index.caption_records(rows),
            )
        except ModalityMissingError as exc:
            raise ModalityMissing(f"the served index has no caption vectors: {exc}") from exc
        finally:
            self.metrics.search_seconds.labels("image").observe(time.perf_counter() - started)
