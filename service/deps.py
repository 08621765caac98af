"""Dependencies as ``Annotated`` aliases, so route signatures read like documentation."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated

import numpy as np
from fastapi import Depends, Request
from PIL import Image

from indexer.store import IndexVersion
from service.batching import MicroBatcher
from service.errors import NotReady
from service.metrics import ServiceMetrics
from service.rerank import Reranker
from service.search_batch import SearchStage
from service.settings import Settings
from service.state import ServiceState


async def get_state(request: Request) -> ServiceState:
    state = getattr(request.app.state, "service", None)
    if not isinstance(state, ServiceState):
        raise NotReady("the service is starting")
    return state


StateDep = Annotated[ServiceState, Depends(get_state)]


async def get_settings(state: StateDep) -> Settings:
    return state.settings


async def get_metrics(state: StateDep) -> ServiceMetrics:
    return state.metrics


async def leased_index(state: StateDep) -> AsyncIterator[IndexVersion]:
    """The served index version, held for the whole request (a reload cannot close it)."""
    if state.holder is None or state.encoder is None:
        raise NotReady("the model and index are not loaded")
    with state.holder.lease() as index:
        yield index


async def get_text_batcher(state: StateDep) -> MicroBatcher[str, np.ndarray]:
    if state.text_batcher is None:
        raise NotReady("the text encoder is not running")
    return state.text_batcher


async def get_image_batcher(state: StateDep) -> MicroBatcher[Image.Image, np.ndarray]:
    if state.image_batcher is None:
        raise NotReady("the image encoder is not running")
    return state.image_batcher


async def get_search(state: StateDep) -> SearchStage:
    if state.search is None:
        raise NotReady("the search stage is not running")
    return state.search


async def get_reranker(state: StateDep) -> Reranker | None:
    """The loaded teacher's re-ranker, or None when re-ranking is unavailable."""
    return state.reranker


SettingsDep = Annotated[Settings, Depends(get_settings)]
MetricsDep = Annotated[ServiceMetrics, Depends(get_metrics)]
IndexDep = Annotated[IndexVersion, Depends(leased_index)]
TextBatcherDep = Annotated[MicroBatcher[str, np.ndarray], Depends(get_text_batcher)]
ImageBatcherDep = Annotated[MicroBatcher[Image.Image, np.ndarray], Depends(get_image_batcher)]
SearchDep = Annotated[SearchStage, Depends(get_search)]
RerankerDep = Annotated[Reranker | None, Depends(get_reranker)]
