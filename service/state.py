"""What the lifespan hook builds and the routes use, kept on ``app.state.service``."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from service.batching import MicroBatcher
from service.errors import IndexRefused, NotReady
from service.index_holder import IndexHolder, IndexRejectedError, ReloadOutcome
from service.metrics import ServiceMetrics
from service.rerank import Reranker
from service.retrieval import Encoder
from service.search_batch import SearchStage
from service.settings import Settings


@dataclass
class ServiceState:
    """The loaded model, the served index, one micro-batcher per encoder, the search stage
    and the re-ranker."""

    settings: Settings
    metrics: ServiceMetrics
    encoder: Encoder | None = None
    holder: IndexHolder | None = None
    text_batcher: MicroBatcher[str, np.ndarray] | None = None
    image_batcher: MicroBatcher[Image.Image, np.ndarray] | None = None
    search: SearchStage | None = None  # batched search + hydrate, one batcher per target
    reranker: Reranker | None = None
    rerank_problem: str | None = "no teacher is configured (VLD_TEACHER_DIR is unset)"
    started_at: float = field(default_factory=time.monotonic)
    ready_at: float | None = None


async def reload_served_index(state: ServiceState) -> ReloadOutcome:
    """Validate and swap in the version ``CURRENT`` names, off the event loop.

    Raises :class:`service.errors.IndexRefused` (old version keeps serving) or
    :class:`service.errors.NotReady` (no model loaded).
    """
    holder = state.holder
    if holder is None:
        raise NotReady("the model is not loaded; nothing to reload into")
    try:
        outcome = await asyncio.to_thread(holder.reload, verify=True)
    except IndexRejectedError as exc:
        state.metrics.reloads.labels("refused").inc()
        raise IndexRefused(
            str(exc),
            details=[{"version": exc.version, "problem": problem} for problem in exc.problems],
        ) from exc
    state.metrics.reloads.labels(outcome.status).inc()
    if state.ready_at is None and holder.current is not None:
        state.ready_at = time.monotonic()
    return outcome
