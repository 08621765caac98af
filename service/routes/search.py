"""``POST /search/images`` (text → images) and ``POST /search/captions`` (image → captions)."""

# No `from __future__ import annotations`: FastAPI must see the per-app request model, a
# local variable of build_router, when it reads the route signature.

import asyncio
import time
from typing import Annotated
from urllib.parse import quote

from fastapi import APIRouter, Query, Request

from service.deps import ImageBatcherDep, IndexDep, SettingsDep, TextBatcherDep
from service.errors import ModalityMissing, error_responses
from service.retrieval import ImageQuery, TextQuery
from service.schemas import (
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
    TextSearchRequest = text_search_request_model(settings.max_k, settings.max_text_chars)
    default_k = min(10, settings.max_k)

    @router.post(
        "/images",
        response_model=ImageSearchResponse,
        summary="Find gallery images for a text",
        description=(
            "Encodes the text with the decomposed text encoder (micro-batched with concurrent "
            "queries) and returns the k nearest gallery images by cosine similarity."
        ),
        responses=error_responses(400, 404, 413, 422, 500, 503),
    )
    async def search_images(
        body: TextSearchRequest,  # type: ignore[valid-type]
        request: Request,
        index: IndexDep,
        batcher: TextBatcherDep,
    ) -> ImageSearchResponse:
        started = time.perf_counter()
        if index.image_count == 0:
            raise ModalityMissing(f"index version {index.version} has no gallery images")
        neighbours = await batcher.submit(TextQuery(body.text, body.k, index))  # type: ignore[attr-defined]
        results = [
            ImageHit(
                rank=rank,
                id=record.id,
                score=score,
                url=image_url(request, record.id),
                captions=list(record.captions),
            )
            for rank, (score, record) in enumerate(
                zip(neighbours.scores, neighbours.records, strict=True), start=1
            )
        ]
        return ImageSearchResponse(
            results=results,
            k=body.k,  # type: ignore[attr-defined]
            took_ms=_elapsed_ms(started),
            index_version=index.version,
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
            f"{settings.max_image_pixels} pixels per image (checked before decoding)."
        ),
        responses=error_responses(400, 404, 413, 415, 422, 500, 503),
        openapi_extra={"requestBody": caption_request_body(settings.max_k, RAW_IMAGE_TYPES)},
    )
    async def search_captions(
        request: Request,
        index: IndexDep,
        batcher: ImageBatcherDep,
        config: SettingsDep,
        k: Annotated[
            int,
            Query(
                ge=1,
                le=settings.max_k,
                description="How many captions to return (a multipart `k` part overrides it).",
            ),
        ] = default_k,
    ) -> CaptionSearchResponse:
        started = time.perf_counter()
        if index.caption_count == 0:
            raise ModalityMissing(f"index version {index.version} has no captions")
        upload = await read_image_upload(request)
        if upload.k_field is not None:
            k = parse_k_field(upload.k_field, config.max_k)

        async def decode() -> ImageQuery:
            image = await asyncio.to_thread(decode_upload, upload.data, config.max_image_pixels)
            return ImageQuery(image, k, index)

        # The queue place is taken before decoding: a full queue answers 503 without decoding.
        neighbours = await batcher.submit_prepared(decode)
        results = [
            CaptionHit(
                rank=rank,
                id=record.id,
                caption=record.caption,
                score=score,
                image_id=record.image_id,
            )
            for rank, (score, record) in enumerate(
                zip(neighbours.scores, neighbours.records, strict=True), start=1
            )
        ]
        return CaptionSearchResponse(
            results=results, k=k, took_ms=_elapsed_ms(started), index_version=index.version
        )

    return router
