"""Image queries: ``POST /search/captions`` (image → captions) and
``POST /search/similar-images`` ("more like this": an upload or a gallery id → images).

An upload goes through one path (:func:`service.uploads.read_image_upload`: multipart or raw
body, the size, pixel and format limits), is decoded once it has a queue place and encoded in
the image micro-batcher; a gallery id skips the encoder (its stored vector is searched). Then,
as for text: search (restricted by the filter) and hydrate → optionally re-rank → cut the page.
"""

# No `from __future__ import annotations`: FastAPI must see the per-app dependency and its
# annotations, local to build_router, when it reads the route signatures.

import asyncio
import json
import time
from typing import Annotated

import numpy as np
from fastapi import APIRouter, Depends, Query, Request
from fastapi.exceptions import RequestValidationError
from PIL import Image
from pydantic import ValidationError

from service.batching import MicroBatcher
from service.deps import ImageBatcherDep, IndexDep, MetricsDep, RerankerDep, SearchDep
from service.errors import error_responses
from service.options import (
    FILTER_DESCRIPTION,
    FILTER_EXAMPLE,
    MIN_SCORE_DESCRIPTION,
    QueryOptions,
    offset_description,
    upload_options,
)
from service.rerank import DEFAULT_RERANK_K, MAX_RERANK_K, rerank_shortlist
from service.retrieval import (
    CAPTIONS,
    DUPLICATE_COSINE,
    IMAGES,
    Exclusion,
    require_target,
    retrieve_similar,
)
from service.routes.results import caption_search_response, image_search_response
from service.schemas import (
    RERANK_DESCRIPTION,
    RERANK_K_DESCRIPTION,
    CaptionSearchResponse,
    ImageSearchResponse,
    SimilarImagesQueryBase,
    image_request_body,
    similar_images_request_model,
)
from service.settings import Settings
from service.uploads import (
    RAW_IMAGE_TYPES,
    ImageUpload,
    decode_upload,
    read_image_upload,
    request_media_type,
)


async def encode_upload(
    encoder: MicroBatcher[Image.Image, np.ndarray], upload: ImageUpload, max_pixels: int
) -> tuple[np.ndarray, Image.Image]:
    """Encode stage of an upload: ``(xq (D,), the decoded image)``. The queue place is taken
    before decoding: a full queue answers 503 without decoding."""
    decoded: list[Image.Image] = []

    async def decode() -> Image.Image:
        decoded.append(await asyncio.to_thread(decode_upload, upload.data, max_pixels))
        return decoded[0]

    xq = await encoder.submit_prepared(decode)
    return xq, decoded[0]


def build_router(settings: Settings) -> APIRouter:
    """The image search router, with this deployment's limits in its schemas."""
    router = APIRouter(prefix="/search", tags=["search"])
    max_k = settings.max_k
    SimilarImagesRequest = similar_images_request_model(max_k)
    upload_limits = (
        f"Limits: {settings.max_upload_bytes} bytes per body, {settings.max_image_pixels} "
        "pixels per image (checked before decoding). The format is recognised from the "
        "content, EXIF orientation is applied, any colour mode is converted to RGB."
    )

    async def query_options(
        k: Annotated[
            int,
            Query(
                ge=1,
                le=max_k,
                description="How many results to return (a multipart `k` part overrides it).",
            ),
        ] = min(10, max_k),
        offset: Annotated[
            int,
            Query(ge=0, le=max_k - 1, description=offset_description(max_k), examples=[0]),
        ] = 0,
        min_score: Annotated[
            float | None,
            Query(ge=-1.0, le=1.0, description=MIN_SCORE_DESCRIPTION, examples=[0.2]),
        ] = None,
        filter_json: Annotated[
            str | None,
            Query(
                alias="filter",
                description=f"The filter as JSON text (URL-encoded). {FILTER_DESCRIPTION}",
                examples=[json.dumps(FILTER_EXAMPLE)],
            ),
        ] = None,
    ) -> QueryOptions:
        return QueryOptions(k, offset, min_score, filter_json)

    QueryOptionsDep = Annotated[QueryOptions, Depends(query_options)]

    @router.post(
        "/captions",
        response_model=CaptionSearchResponse,
        summary="Find gallery captions for an image",
        description=(
            "Send the image as a multipart `image` part (optional `k`, `offset`, `min_score`, "
            "`filter` parts) or as the raw body with Content-Type one of "
            f"{', '.join(RAW_IMAGE_TYPES)} (options in the query string). {upload_limits} With "
            "`rerank` (query string), the teacher re-scores the best `rerank_k` (caption, image) "
            "pairs and they are re-ordered by its logit (`score`; the cosine stays in "
            "`retrieval_score`); the page is cut from that order. Without a loaded teacher the "
            "request is still answered, in retrieval order with `reranked: false`; /readyz says "
            "why. `filter` applies to the metadata of the image each caption describes."
        ),
        responses=error_responses(400, 404, 413, 415, 422, 500, 503),
        openapi_extra={"requestBody": image_request_body(max_k, RAW_IMAGE_TYPES, "captions")},
    )
    async def search_captions(
        request: Request,
        index: IndexDep,
        encoder: ImageBatcherDep,
        searcher: SearchDep,
        reranker: RerankerDep,
        metrics: MetricsDep,
        options: QueryOptionsDep,
        rerank: Annotated[bool, Query(description=RERANK_DESCRIPTION)] = settings.rerank_default,
        rerank_k: Annotated[
            int, Query(ge=1, le=MAX_RERANK_K, description=RERANK_K_DESCRIPTION)
        ] = DEFAULT_RERANK_K,
    ) -> CaptionSearchResponse:
        started = time.perf_counter()
        require_target(index, CAPTIONS)
        upload = await read_image_upload(request)
        page, metadata_filter = upload_options(upload, options, max_k)
        teacher = reranker if rerank else None
        xq, image = await encode_upload(encoder, upload, settings.max_image_pixels)
        depth = max(page.depth, rerank_k) if teacher is not None else page.depth
        found = await searcher.retrieve(
            index, CAPTIONS, xq, depth, "image", metadata_filter=metadata_filter
        )
        reranked = False
        if teacher is not None:
            found, reranked = await rerank_shortlist(
                found,
                rerank_k,
                lambda records: teacher.score_captions(image, [r.caption for r in records]),
                metrics.rerank_seconds.labels("image").observe,
                teacher,
            )
        return caption_search_response(page.cut(found), page, index, started, reranked=reranked)

    @router.post(
        "/similar-images",
        response_model=ImageSearchResponse,
        summary="More like this: gallery images similar to an image",
        description=(
            'Two forms, by Content-Type. `application/json`: `{"id": "<gallery id>", '
            '"k": 10}` (options as body fields) searches with the stored vector of that gallery '
            "image (no encoder pass) and leaves the image itself out, so k others come back; an "
            "unknown id is a 404. An upload (multipart `image` part or raw body, the same limits "
            f"and errors as /search/captions; options as parts or in the query string): "
            f"{upload_limits} Gallery images at least {DUPLICATE_COSINE} cosine-similar to an "
            "upload are taken to be copies of it and left out (up to 4 of them). On a "
            "compressed (IVF-PQ) index the scores are approximate, so an uploaded gallery image "
            "may come back as its own first result (its score under the threshold) or a near "
            "copy be left out; the id form leaves the image out by its row, on every index "
            "type. No `rerank`: "
            f"the teacher scores (text, image) pairs, not two images. `filter`: "
            f"{FILTER_DESCRIPTION}"
        ),
        responses=error_responses(400, 404, 413, 415, 422, 500, 503),
        openapi_extra={
            "requestBody": image_request_body(
                max_k, RAW_IMAGE_TYPES, "images", json_body=SimilarImagesRequest
            )
        },
    )
    async def search_similar_images(
        request: Request,
        index: IndexDep,
        encoder: ImageBatcherDep,
        searcher: SearchDep,
        metrics: MetricsDep,
        options: QueryOptionsDep,
    ) -> ImageSearchResponse:
        started = time.perf_counter()
        require_target(index, IMAGES)
        if request_media_type(request) == "application/json":
            body = _validate_body(SimilarImagesRequest, await request.body())
            page = body.page(max_k)
            found = await asyncio.to_thread(
                retrieve_similar, index, body.id, page.depth, metrics, metadata_filter=body.filter
            )
        else:
            upload = await read_image_upload(request)
            page, metadata_filter = upload_options(upload, options, max_k)
            xq, _ = await encode_upload(encoder, upload, settings.max_image_pixels)
            found = await searcher.retrieve(
                index,
                IMAGES,
                xq,
                page.depth,
                "image",
                metadata_filter=metadata_filter,
                exclude=Exclusion(min_cosine=DUPLICATE_COSINE),
            )
        return image_search_response(request, page.cut(found), page, index, started)

    return router


def _validate_body(model: type[SimilarImagesQueryBase], raw: bytes) -> SimilarImagesQueryBase:
    """A JSON body read by hand, validated like FastAPI's own (422, locations under "body")."""
    try:
        return model.model_validate_json(raw)
    except ValidationError as exc:
        raise RequestValidationError(
            [{**error, "loc": ("body", *error["loc"])} for error in exc.errors()]
        ) from exc
