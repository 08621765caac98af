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
from model.images import ImageError
from service.errors import BadRequest, EncodeFailed, ModalityMissing
from service.metrics import ServiceMetrics

RecordT = TypeVar("RecordT", ImageRecord, CaptionRecord)
QueryT = TypeVar("QueryT", "TextQuery", "ImageQuery")


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


class _BatchSearch(Generic[QueryT, RecordT]):
    """Batch processor: encode a batch of queries in one forward pass, then search each query
    in the index version it leased. Subclasses name the modality and the target index."""

    modality: str  # metrics label: "text" or "image"
    target: str  # what the searched index holds, for the error message

    def __init__(self, encoder: Encoder, metrics: ServiceMetrics, *, delay_s: float = 0.0) -> None:
        self.encoder = encoder
        self.metrics = metrics
        self.delay_s = delay_s

    def encode(self, queries: Sequence[QueryT]) -> np.ndarray:
        raise NotImplementedError

    def search(self, index: IndexVersion, xq: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError

    def records(self, index: IndexVersion, rows: list[int]) -> list[RecordT]:
        raise NotImplementedError

    def __call__(self, queries: Sequence[QueryT]) -> list[Neighbours[RecordT]]:
        self.metrics.batch_size.labels(self.modality).observe(len(queries))
        started = time.perf_counter()
        if self.delay_s:
            time.sleep(self.delay_s)
        try:
            xq = self.encode(queries)
        except ImageError as exc:  # preprocessing refused the input itself
            raise BadRequest(f"cannot encode the image: {exc}", code=exc.reason) from exc
        except Exception as exc:
            # Clients see the kind of failure only; the batcher logs the traceback.
            raise EncodeFailed(
                f"the {self.modality} encoder failed on this query ({type(exc).__name__})"
            ) from exc
        self.metrics.encode_seconds.labels(self.modality).observe(time.perf_counter() - started)
        started = time.perf_counter()
        try:
            return _search_groups(
                xq, [q.k for q in queries], [q.index for q in queries], self.search, self.records
            )
        except ModalityMissingError as exc:
            raise ModalityMissing(f"the served index has no {self.target} vectors: {exc}") from exc
        finally:
            self.metrics.search_seconds.labels(self.modality).observe(time.perf_counter() - started)


class TextSearch(_BatchSearch[TextQuery, ImageRecord]):
    """Texts → text vectors → nearest gallery images."""

    modality, target = "text", "image"

    def encode(self, queries: Sequence[TextQuery]) -> np.ndarray:
        return self.encoder.encode_text([q.text for q in queries], batch_size=len(queries))

    def search(self, index: IndexVersion, xq: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        return index.search_images(xq, k)

    def records(self, index: IndexVersion, rows: list[int]) -> list[ImageRecord]:
        return index.image_records(rows)


class ImageSearch(_BatchSearch[ImageQuery, CaptionRecord]):
    """Decoded images → image vectors → nearest gallery captions."""

    modality, target = "image", "caption"

    def encode(self, queries: Sequence[ImageQuery]) -> np.ndarray:
        return self.encoder.encode_images([q.image for q in queries], batch_size=len(queries))

    def search(self, index: IndexVersion, xq: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        return index.search_captions(xq, k)

    def records(self, index: IndexVersion, rows: list[int]) -> list[CaptionRecord]:
        return index.caption_records(rows)
