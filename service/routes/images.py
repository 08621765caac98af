"""``GET /images/{id}``: a gallery image file — only files the served index lists."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse

from service.deps import IndexDep
from service.errors import NotFound, error_responses

logger = logging.getLogger(__name__)

router = APIRouter(prefix="/images", tags=["images"])

_MEDIA_TYPES = {
    ".jpg": "image/jpeg",
    ".jpeg": "image/jpeg",
    ".png": "image/png",
    ".webp": "image/webp",
    ".gif": "image/gif",
    ".bmp": "image/bmp",
    ".tif": "image/tiff",
    ".tiff": "image/tiff",
}
_FALLBACK_MEDIA_TYPE = "application/octet-stream"
_BINARY = {"schema": {"type": "string", "format": "binary"}}


@router.get(
    "/{image_id:path}",
    response_class=FileResponse,
    summary="A gallery image by id",
    description=(
        "Serves the file the served index lists for this id, nothing else: the id is looked up "
        "in the index's metadata, never joined onto a path."
    ),
    responses={
        200: {
            "description": "The image file.",
            "content": {
                media_type: _BINARY
                for media_type in [*dict.fromkeys(_MEDIA_TYPES.values()), _FALLBACK_MEDIA_TYPE]
            },
        },
        **error_responses(404, 503),
    },
)
async def get_image(image_id: str, index: IndexDep) -> FileResponse:
    record = await asyncio.to_thread(index.image_by_id, image_id)
    if record is None:
        raise NotFound(f"no image with id {image_id[:200]!r} in index version {index.version}")
    path = Path(record.path)
    if not await asyncio.to_thread(path.is_file):
        logger.warning("image %r is listed at %s but the file is missing", record.id, path)
        raise NotFound(f"the file of image {record.id!r} is missing on the server")
    return FileResponse(
        path,
        media_type=_MEDIA_TYPES.get(path.suffix.lower(), _FALLBACK_MEDIA_TYPE),
        headers={"X-Content-Type-Options": "nosniff", "Cache-Control": "private, max-age=60"},
    )
