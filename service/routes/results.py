"""Search results → response bodies, shared by the text and the image search routes."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any
from urllib.parse import quote

from fastapi import Request

from indexer.store import CaptionRecord, ImageRecord, IndexVersion
from service.retrieval import Page, Scored
from service.schemas import CaptionHit, CaptionSearchResponse, ImageHit, ImageSearchResponse


def image_url(request: Request, image_id: str) -> str:
    """The path that serves a gallery image (``GET /images/{id}``), under the app's root path."""
    return f"{request.scope.get('root_path', '')}/images/{quote(image_id, safe='')}"


def elapsed_ms(started: float) -> float:
    return round((time.perf_counter() - started) * 1000.0, 3)


def _page_fields(page: Page, index: IndexVersion, started: float, reranked: bool) -> dict[str, Any]:
    """The fields every search response has besides its results."""
    return {
        "offset": page.offset,
        "k": page.k,
        "took_ms": elapsed_ms(started),
        "index_version": index.version,
        "reranked": reranked,
    }


def image_search_response(
    request: Request,
    results: Sequence[Scored[ImageRecord]],  # one page, already cut
    page: Page,
    index: IndexVersion,
    started: float,
    *,
    reranked: bool = False,
) -> ImageSearchResponse:
    hits = [
        ImageHit(
            rank=rank,
            id=hit.record.id,
            score=hit.score,
            retrieval_score=hit.retrieval_score,
            url=image_url(request, hit.record.id),
            captions=list(hit.record.captions),
            metadata=dict(hit.record.metadata),
        )
        for rank, hit in enumerate(results, start=page.offset + 1)
    ]
    return ImageSearchResponse(
        results=hits, count=len(hits), **_page_fields(page, index, started, reranked)
    )


def caption_search_response(
    results: Sequence[Scored[CaptionRecord]],  # one page, already cut
    page: Page,
    index: IndexVersion,
    started: float,
    *,
    reranked: bool = False,
) -> CaptionSearchResponse:
    hits = [
        CaptionHit(
            rank=rank,
            id=hit.record.id,
            caption=hit.record.caption,
            score=hit.score,
            retrieval_score=hit.retrieval_score,
            image_id=hit.record.image_id,
        )
        for rank, hit in enumerate(results, start=page.offset + 1)
    ]
    return CaptionSearchResponse(
        results=hits, count=len(hits), **_page_fields(page, index, started, reranked)
    )
