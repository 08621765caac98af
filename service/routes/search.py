"""``POST /search/images`` (text → images) and ``POST /search/captions`` (image → captions).

Each route reads as its stages (:mod:`service.retrieval`, :mod:`service.rerank`): encode in the
encoder's micro-batcher → search the target index and hydrate its records → optionally re-rank
the shortlist with the teacher → the response.
"""

# No `from __future__ import annotations`: FastAPI must see the per-app request model, a
# local variable of build_router, when it reads the route signature.

import asyncio
import time
from typing import Annotated
from urllib.parse import quote

from fastapi import APIRouter, Query, Request
from PIL import Image

from service.deps import (
    ImageBatcherDep,
    IndexDep,
    MetricsDep,
    RerankerDep,
    TextBatcherDep,
)
from service.errors import error_responses
from service.rerank import DEFAULT_RERANK_K, MAX_RERANK_K, rerank_shortlist
from service.retrieval import CAPTIONS, IMAGES, require_target, retrieve
from service.schemas import (
    RERANK_DESCRIPTION,
    RERANK_K_DESCRIPTION,
    CaptionHit,
    CaptionSearchResponse,
    ImageHit,
    ImageSearchResponse,
    caption_request_body,
    text_search_request_model,
)
from service.settings import Settings
from service.uploads import RAW_IMAGE_TYPES, decode_upload, parse_k_field, read_image_upload


def image_url(request: Request, image_id: str) -> str:
    """The path that serves a gallery image (``GET /images/{id}``), under the app's root path."""
    return f"{request.scope.get('root_path', '')}/images/{quote(image_id, safe='')}"


def _elapsed_ms(started: float) -> float:
    return round((time.perf_counter() - started) * 1000.0, 3)


def build_router(settings: Settings) -> APIRouter:
    """The search router, with this deployment's limits in its request schemas."""
    router = APIRouter(prefix="/search", tags=["search"])
    TextSearchRequest = text_search_request_model(
        settings.max_k, settings.max_text_chars, rerank_default=settings.rerank_default
    )
    default_k = min(10, settings.max_k)

    @router.post(
        "/images",
        response_model=ImageSearchResponse,
        summary="Find gallery images for a text",
        description=(
            "Encodes the text with the decomposed text encoder (micro-batched with concurrent "
            "queries) and returns the k nearest gallery images by cosine similarity. With "
            "`rerank`, the teacher re-scores the best `rerank_k` (text, image) pairs in batched "
            "joint passes and they are re-ordered by its logit (`score`; the cosine stays in "
            "`retrieval_score`). Without a loaded teacher the request is still answered, in "
            "retrieval order with `reranked: false`; /readyz says why."
        ),
        responses=error_responses(400, 404, 413, 422, 500, 503),
    )
    async def search_images(
        body: TextSearchRequest,  # type: ignore[valid-type]
        request: Request,
        index: IndexDep,
        encoder: TextBatcherDep,
        reranker: RerankerDep,
        metrics: MetricsDep,
    ) -> ImageSearchResponse:
        started = time.perf_counter()
        require_target(index, IMAGES)
        text, k, rerank_k = body.text, body.k, body.rerank_k  # type: ignore[attr-defined]
        teacher = reranker if body.rerank else None  # type: ignore[attr-defined]
        xq = await encoder.submit(text)
        search_k = max(k, rerank_k) if teacher is not None else k
        found = await asyncio.to_thread(retrieve, index, IMAGES, xq, search_k, metrics, "text")
        reranked = False
        if teacher is not None:
            found, reranked = await rerank_shortlist(
                found,
                rerank_k,
                lambda records: teacher.score_images(text, [r.path for r in records]),
                metrics.rerank_seconds.labels("text").observe,
                teacher,
            )
        results = [
            ImageHit(
                rank=rank,
                id=hit.record.id,
                score=hit.score,
                retrieval_score=hit.retrieval_score,
                url=image_url(request, hit.record.id),
                captions=list(hit.record.captions),
            )
            for rank, hit in enumerate(found[:k], start=1)
        ]
        return ImageSearchResponse(
            results=results,
            k=k,
            took_ms=_elapsed_ms(started),
            index_version=index.version,
            reranked=reranked,
        )

    @router.post(
        "/captions",
        response_model=CaptionSearchResponse,
        summary="Find gallery captions for an image",
        description=(
            "Send the image as a multipart `image` part (optional `k` part) or as the raw body "
            f"with Content-Type one of {', '.join(RAW_IMAGE_TYPES)}. The format is recognised "
            "from the content, EXIF orientation is applied, any colour mode is converted to "
            f"RGB. Limits: {settings.max_upload_bytes} bytes per body, "
            f"{settings.max_image_pixels} pixels per image (checked before decoding). With "
            "`rerank` (query string), the teacher re-scores the best `rerank_k` (caption, image) "
            "pairs and they are re-ordered by its logit (`score`; the cosine stays in "
            "`retrieval_score`). Without a loaded teacher the request is still answered, in "
            "retrieval order with `reranked: false`; /readyz says why."
        ),
        responses=error_responses(400, 404, 413, 415, 422, 500, 503),
        openapi_extra={"requestBody": caption_request_body(settings.max_k, RAW_IMAGE_TYPES)},
    )
    async def search_captions(
        request: Request,
        index: IndexDep,
        encoder: ImageBatcherDep,
        reranker: RerankerDep,
        metrics: MetricsDep,
        k: Annotated[
            int,
            Query(
                ge=1,
                le=settings.max_k,
                description="How many captions to return (a multipart `k` part overrides it).",
            ),
        ] = default_k,
        rerank: Annotated[bool, Query(description=RERANK_DESCRIPTION)] = settings.rerank_default,
        rerank_k: Annotated[
            int, Query(ge=1, le=MAX_RERANK_K, description=RERANK_K_DESCRIPTION)
        ] = DEFAULT_RERANK_K,
    ) -> CaptionSearchResponse:
        started = time.perf_counter()
        require_target(index, CAPTIONS)
        upload = await read_image_upload(request)
        if upload.k_field is not None:
            k = parse_k_field(upload.k_field, settings.max_k)

        teacher = reranker if rerank else None
        # The queue place is taken before decoding: a full queue answers 503 without decoding.
        decoded: list[Image.Image] = []

        async def decode() -> Image.Image:
            decoded.append(
                await asyncio.to_thread(decode_upload, upload.data, settings.max_image_pixels)
            )
            return decoded[0]

        xq = await encoder.submit_prepared(decode)
        search_k = max(k, rerank_k) if teacher is not None else k
        found = await asyncio.to_thread(retrieve, index, CAPTIONS, xq, search_k, metrics, "image")
        reranked = False
        if teacher is not None:
            image = decoded[0]
            found, reranked = await rerank_shortlist(
                found,
                rerank_k,
                lambda records: teacher.score_captions(image, [r.caption for r in records]),
                metrics.rerank_seconds.labels("image").observe,
                teacher,
            )
        results = [
            CaptionHit(
                rank=rank,
                id=hit.record.id,
                caption=hit.record.caption,
                score=hit.score,
                retrieval_score=hit.retrieval_score,
                image_id=hit.record.image_id,
            )
            for rank, hit in enumerate(found[:k], start=1)
        ]
        return CaptionSearchResponse(
            results=results,
            k=k,
            took_ms=_elapsed_ms(started),
            index_version=index.version,
            reranked=reranked,
        )

    return router
