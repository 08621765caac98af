"""Dependencies as ``Annotated`` aliases, so route signatures read like documentation."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import Depends, Request

from indexer.store import CaptionRecord, ImageRecord, IndexVersion
from service.batching import MicroBatcher
from service.errors import NotReady
from service.metrics import ServiceMetrics
from service.retrieval import ImageQuery, Neighbours, TextQuery
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


async def get_text_batcher(state: StateDep) -> MicroBatcher[TextQuery, Neighbours[ImageRecord]]:
    if state.text_batcher is None:
        raise NotReady("the text encoder is not running")
    return state.text_batcher


async def get_image_batcher(state: StateDep) -> MicroBatcher[ImageQuery, Neighbours[CaptionRecord]]:
    if state.image_batcher is None:
        raise NotReady("the image encoder is not running")
    return state.image_batcher


SettingsDep = Annotated[Settings, Depends(get_settings)]
MetricsDep = Annotated[ServiceMetrics, Depends(get_metrics)]
IndexDep = Annotated[IndexVersion, Depends(leased_index)]
TextBatcherDep = Annotated[
    MicroBatcher[TextQuery, Neighbours[ImageRecord]], Depends(get_text_batcher)
]
ImageBatcherDep = Annotated[
    MicroBatcher[ImageQuery, Neighbours[CaptionRecord]], Depends(get_image_batcher)
]
