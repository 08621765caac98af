"""The search stage of the routes, batched: concurrent queries share one FAISS call.

A flat index answers ``B`` queries in one matrix-matrix product far faster than ``B``
matrix-vector products, and an encode micro-batch releases its queries together, so they reach
the search stage together. :class:`SearchStage` gives each target index (gallery images,
captions) its own :class:`service.batching.MicroBatcher` (the same window, back-pressure and
per-query isolation as the encoders), whose processor :class:`SearchBatch` searches the queries
of one batch that leased the same index version in one ``index.search`` call with a ``(B, D)``
matrix and the largest depth of the group, then cuts, filters (:class:`Exclusion`) and hydrates
each query's own results. Queries with a metadata filter search alone (their row selection is
their own), in a worker thread, as :func:`service.retrieval.retrieve` always did.

``vld_search_seconds`` is still observed once per query: the FAISS search its results came
from, shared with its batch (``vld_search_batch_size`` counts queries per FAISS call).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Generic, cast

import numpy as np

from indexer.store import IndexVersion
from service.batching import BatchingConfig, MicroBatcher
from service.metrics import ServiceMetrics
from service.retrieval import (
    CAPTIONS,
    IMAGES,
    NO_EXCLUSION,
    Exclusion,
    RecordT,
    Scored,
    Target,
    best_hits,
    hydrate_each,
    retrieve,
    search_matrix,
)

SEARCH_WINDOW_S = 0.001  # an encode batch's queries arrive within one event-loop pass


@dataclass(frozen=True, eq=False)
class SearchQuery:
    """One unfiltered query of the search stage, in the index version its request leased."""

    index: IndexVersion
    xq: np.ndarray  # (D,) float32 unit vector
    k: int  # results wanted (after the exclusion)
    modality: str  # the query's modality, the metrics label: "text" or "image"
    exclude: Exclusion = NO_EXCLUSION

    @property
    def depth(self) -> int:
        """How many results to search so that ``k`` remain after the exclusion."""
        return self.k + self.exclude.slack


class SearchBatch(Generic[RecordT]):
    """Search stage of one target, run by a micro-batcher: queries → their hydrated results,
    one FAISS call per index version among them (blocking)."""

    def __init__(self, target: Target[RecordT], metrics: ServiceMetrics) -> None:
        self.target: Target[RecordT] = target
        self.metrics = metrics

    def __call__(self, queries: Sequence[SearchQuery]) -> list[list[Scored[RecordT]]]:
        results: dict[int, list[Scored[RecordT]]] = {}  # by position in ``queries``
        for positions in _by_version(queries):
            group = [queries[i] for i in positions]
            for i, found in zip(positions, self._search(group), strict=True):
                results[i] = found
        return [results[i] for i in range(len(queries))]

    def _search(self, group: Sequence[SearchQuery]) -> list[list[Scored[RecordT]]]:
        index = group[0].index
        xq = np.stack([query.xq for query in group])  # (B, D)
        self.metrics.search_batch_size.labels(self.target.modality).observe(len(group))
        started = time.perf_counter()
        try:
            distances, rows = search_matrix(
                index, self.target, xq, max(query.depth for query in group)
            )  # (B, max depth)
        finally:
            seconds = time.perf_counter() - started
            for query in group:
                self.metrics.search_seconds.labels(query.modality).observe(seconds)
        hits = [
            best_hits(distances[b], rows[b], query.k, query.exclude)
            for b, query in enumerate(group)
        ]
        return hydrate_each(index, self.target, hits)


def _by_version(queries: Sequence[SearchQuery]) -> list[list[int]]:
    """Positions of ``queries`` grouped by the index version object each leased, in order."""
    groups: dict[int, list[int]] = {}
    for i, query in enumerate(queries):
        groups.setdefault(id(query.index), []).append(i)
    return list(groups.values())


def search_config(encode: BatchingConfig) -> BatchingConfig:
    """The search batchers' settings: the encoders', with a window that only gathers queries
    arriving together (a lone query must not wait the encoders' window a second time)."""
    return replace(encode, window_s=min(encode.window_s, SEARCH_WINDOW_S))


class SearchStage:
    """Search + hydrate for the routes: unfiltered queries batched per target index, filtered
    ones alone in a worker thread. Start and stop it from the event loop, like a batcher."""

    def __init__(
        self,
        metrics: ServiceMetrics,
        config: BatchingConfig,
        targets: Sequence[Target[Any]] = (IMAGES, CAPTIONS),
    ) -> None:
        self.metrics = metrics
        self._batchers: dict[Target[Any], MicroBatcher[SearchQuery, list[Scored[Any]]]] = {
            target: MicroBatcher(
                f"{target.modality} search",
                SearchBatch(target, metrics),
                config,
                on_reject=metrics.rejected.labels("search").inc,
            )
            for target in targets
        }

    async def start(self) -> None:
        for batcher in self._batchers.values():
            await batcher.start()

    async def stop(self) -> None:
        for batcher in self._batchers.values():
            await batcher.stop()

    async def retrieve(
        self,
        index: IndexVersion,
        target: Target[RecordT],
        xq: np.ndarray,  # (D,) float32 unit vector
        k: int,
        modality: str,
        *,
        metadata_filter: Mapping[str, Any] | None = None,
        exclude: Exclusion = NO_EXCLUSION,
    ) -> list[Scored[RecordT]]:
        """The ``k`` nearest records of ``target`` in the leased ``index`` that match
        ``metadata_filter`` and are not excluded, best first (as :func:`retrieve`)."""
        batcher = self._batchers.get(target)
        if metadata_filter or batcher is None:
            return await asyncio.to_thread(
                retrieve,
                index,
                target,
                xq,
                k,
                self.metrics,
                modality,
                metadata_filter=metadata_filter,
                exclude=exclude,
            )
        found = await batcher.submit(SearchQuery(index, xq, k, modality, exclude))
        return cast(list[Scored[RecordT]], found)
