"""Text queries: ``POST /search/images`` (text → images) and ``POST /search/captions-by-text``
(text → captions).

Each route reads as its stages (:mod:`service.retrieval`, :mod:`service.rerank`): encode in the
text micro-batcher → search the target index (restricted by the metadata filter) and hydrate
its records → optionally re-rank the shortlist with the teacher → cut the page → the response.
"""

# No `from __future__ import annotations`: FastAPI must see the per-app request models, local
# variables of build_router, when it reads the route signatures.

import time

from fastapi import APIRouter, Request

from service.deps import IndexDep, MetricsDep, RerankerDep, SearchDep, TextBatcherDep
from service.errors import error_responses
from service.options import FILTER_DESCRIPTION
from service.rerank import rerank_shortlist
from service.retrieval import CAPTIONS, IMAGES, require_target
from service.routes.results import caption_search_response, image_search_response
from service.schemas import (
    CaptionSearchResponse,
    ImageSearchResponse,
    caption_text_request_model,
    text_search_request_model,
)
from service.settings import Settings

PAGING_DESCRIPTION = (
    " `offset` pages through the results (offset + k at most the largest k); `min_score` drops "
    "results whose cosine (`retrieval_score`) is below it; `count` says how many came back."
)


def build_router(settings: Settings) -> APIRouter:
    """The text search router, with this deployment's limits in its request schemas."""
    router = APIRouter(prefix="/search", tags=["search"])
    TextSearchRequest = text_search_request_model(
        settings.max_k, settings.max_text_chars, rerank_default=settings.rerank_default
    )
    CaptionTextSearchRequest = caption_text_request_model(settings.max_k, settings.max_text_chars)

    @router.post(
        "/images",
        response_model=ImageSearchResponse,
        summary="Find gallery images for a text",
        description=(
            "Encodes the text with the decomposed text encoder (micro-batched with concurrent "
            "queries) and returns the k nearest gallery images by cosine similarity. With "
            "`rerank`, the teacher re-scores the best `rerank_k` (text, image) pairs in batched "
            "joint passes and they are re-ordered by its logit (`score`; the cosine stays in "
            "`retrieval_score`); the page (`offset`, `k`) is cut from that order. Without a "
            "loaded teacher the request is still answered, in retrieval order with "
            f"`reranked: false`; /readyz says why. `filter`: {FILTER_DESCRIPTION}"
            f"{PAGING_DESCRIPTION}"
        ),
        responses=error_responses(400, 404, 413, 422, 500, 503),
    )
    async def search_images(
        body: TextSearchRequest,  # type: ignore[valid-type]
        request: Request,
        index: IndexDep,
        encoder: TextBatcherDep,
        searcher: SearchDep,
        reranker: RerankerDep,
        metrics: MetricsDep,
    ) -> ImageSearchResponse:
        started = time.perf_counter()
        require_target(index, IMAGES)
        page = body.page(settings.max_k)  # type: ignore[attr-defined]
        text, rerank_k = body.text, body.rerank_k  # type: ignore[attr-defined]
        teacher = reranker if body.rerank else None  # type: ignore[attr-defined]
        xq = await encoder.submit(text)
        depth = max(page.depth, rerank_k) if teacher is not None else page.depth
        found = await searcher.retrieve(
            index,
            IMAGES,
            xq,
            depth,
            "text",
            metadata_filter=body.filter,  # type: ignore[attr-defined]
        )
        reranked = False
        if teacher is not None:
            found, reranked = await rerank_shortlist(
                found,
                rerank_k,
                lambda records: teacher.score_images(text, [r.path for r in records]),
                metrics.rerank_seconds.labels("text").observe,
                teacher,
            )
        return image_search_response(
            request, page.cut(found), page, index, started, reranked=reranked
        )

    @router.post(
        "/captions-by-text",
        response_model=CaptionSearchResponse,
        summary="Find gallery captions for a text",
        description=(
            "Encodes the text with the decomposed text encoder and returns the k nearest "
            "captions of the caption index by cosine similarity. There is no `rerank`: the "
            "teacher scores (text, image) pairs, not two texts. `filter` applies to the "
            f"metadata of the image each caption describes: {FILTER_DESCRIPTION}"
            f"{PAGING_DESCRIPTION}"
        ),
        responses=error_responses(400, 404, 413, 422, 500, 503),
    )
    async def search_captions_by_text(
        body: CaptionTextSearchRequest,  # type: ignore[valid-type]
        index: IndexDep,
        encoder: TextBatcherDep,
        searcher: SearchDep,
    ) -> CaptionSearchResponse:
        started = time.perf_counter()
        require_target(index, CAPTIONS)
        page = body.page(settings.max_k)  # type: ignore[attr-defined]
        xq = await encoder.submit(body.text)  # type: ignore[attr-defined]
        found = await searcher.retrieve(
            index,
            CAPTIONS,
            xq,
            page.depth,
            "text",
            metadata_filter=body.filter,  # type: ignore[attr-defined]
        )
        return caption_search_response(page.cut(found), page, index, started)

    return router
