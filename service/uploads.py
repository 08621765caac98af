"""Untrusted bodies: the request-size limit (before buffering) and image uploads.

:class:`BodySizeLimitMiddleware` answers 413 as soon as a body is known to be too large:
from ``Content-Length`` before reading a byte, or, for chunked bodies, the moment the
running count crosses the limit. Image bytes are decoded only through
:func:`model.images.open_image` (content-sniffed format allow-list, header pixel check before
decoding, EXIF orientation, any mode → RGB); its errors become 400 / 413 / 415 here.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from PIL import Image
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.formparsers import MultiPartException
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from model.images import (
    ImageError,
    TooManyPixelsError,
    UnsupportedFormatError,
    open_image,
)
from service.errors import (
    BadRequest,
    InvalidInput,
    PayloadTooLarge,
    UnsupportedMediaType,
    error_response,
)

logger = logging.getLogger(__name__)

# Raw-body content types POST /search/captions accepts (the content is sniffed regardless).
RAW_IMAGE_TYPES: tuple[str, ...] = (
    "image/jpeg",
    "image/png",
    "image/webp",
    "image/gif",
    "image/bmp",
    "image/tiff",
)
# Uploads are shrunk to fit this square right after decoding (aspect ratio kept). ViLT's image
# processor resizes to a 384-pixel short side and at most 640 pixels long side anyway.
MAX_DECODED_SIDE = 1024
_URLENCODED_FORM = "application/x-www-form-urlencoded"
# The text parts an image search reads besides `image` (each overrides its query parameter).
OPTION_PARTS: tuple[str, ...] = ("k", "offset", "min_score", "filter")
MAX_OPTION_PART_BYTES = 8192  # a filter is a few hundred bytes; k, offset, min_score a few


class _BodyTooLarge(StarletteHTTPException):
    """Raised from ``receive`` mid-body; FastAPI re-raises HTTPExceptions from body parsing,
    so the app's error handler renders it like any other 413."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"request body exceeds the limit of {limit} bytes")


class BodySizeLimitMiddleware:
    """Pure ASGI middleware: refuse bodies over ``max_bytes`` with 413 before buffering them."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = _content_length(scope)
        if declared is not None and declared > self.max_bytes:
            response = error_response(
                413,
                "payload_too_large",
                f"Content-Length {declared} exceeds the limit of {self.max_bytes} bytes",
                headers={"Connection": "close"},
            )
            await response(scope, receive, send)
            return

        received = 0
        response_started = False

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise _BodyTooLarge(self.max_bytes)
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal response_started
            if message["type"] == "http.response.start":
                response_started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except _BodyTooLarge as exc:  # raised where no handler saw it (outside a route)
            if response_started:
                raise
            response = error_response(413, "payload_too_large", str(exc.detail))
            await response(scope, receive, send)


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


@dataclass(frozen=True)
class ImageUpload:
    """The bytes of an uploaded image and the option parts (:data:`OPTION_PARTS`) sent with
    it, as text: ``{"k": "5", "filter": "{...}"}``."""

    data: bytes
    fields: dict[str, str]


def request_media_type(request: Request) -> str:
    """The request's media type, lower case, without parameters (``image/png``)."""
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


async def read_image_upload(request: Request) -> ImageUpload:
    """Read a multipart ``image`` part (+ optional option parts: ``k``, ``offset``,
    ``min_score``, ``filter``) or a raw ``image/*`` body.

    Raises 415 for any other content type, 400 for a malformed multipart body, 422 when the
    ``image`` part is missing (a urlencoded form has none) or empty, or an option part is over
    :data:`MAX_OPTION_PART_BYTES`. The body-size limit applies while reading.
    """
    media_type = request_media_type(request)
    if media_type in RAW_IMAGE_TYPES:
        return ImageUpload(data=_non_empty(await request.body(), "the request body"), fields={})
    if media_type == _URLENCODED_FORM:
        # What a client sends for a form whose file part was left out (e.g. only `k`): the
        # problem is the missing image, not the encoding.
        raise _missing_image_part(f"the {media_type} body has no 'image' file part")
    if media_type != "multipart/form-data":
        raise UnsupportedMediaType(
            f"Content-Type {media_type or '(none)'!r} is not accepted; send multipart/form-data "
            f"with an 'image' part, or a raw body of one of {list(RAW_IMAGE_TYPES)}"
        )
    try:
        form = await request.form(max_files=1, max_fields=8)
    except MultiPartException as exc:
        raise BadRequest(f"malformed multipart body: {exc.message}") from exc
    try:
        image = form.get("image")
        if image is None:
            raise _missing_image_part("the multipart body has no 'image' part")
        data = await image.read() if isinstance(image, UploadFile) else image.encode()
        _non_empty(data, "the 'image' part")
        fields: dict[str, str] = {}
        for name in OPTION_PARTS:
            value = form.get(name)
            if isinstance(value, UploadFile):
                raw = await value.read(MAX_OPTION_PART_BYTES + 1)
                value = raw.decode("utf-8", "replace")
            if value is None:
                continue
            if len(value.encode("utf-8", "replace")) > MAX_OPTION_PART_BYTES:
                raise InvalidInput(
                    f"the {name!r} part is over {MAX_OPTION_PART_BYTES} bytes",
                    details=[{"loc": ["body", name], "msg": "too long", "type": "too_long"}],
                )
            fields[name] = value
        return ImageUpload(data=data, fields=fields)
    finally:
        await form.close()


def _missing_image_part(message: str) -> InvalidInput:
    return InvalidInput(
        message,
        details=[{"loc": ["body", "image"], "msg": "Field required", "type": "missing"}],
    )


def _non_empty(data: bytes, what: str) -> bytes:
    """``data``, or 422 when it is empty (the schema says minLength: 1)."""
    if not data:
        raise InvalidInput(
            f"{what} is empty; send the image's bytes",
            details=[
                {
                    "loc": ["body", "image"],
                    "msg": "String should have at least 1 byte",
                    "type": "string_too_short",
                }
            ],
        )
    return data


def decode_upload(data: bytes, max_pixels: int) -> Image.Image:
    """Decode uploaded bytes to an upright RGB image of at most
    :data:`MAX_DECODED_SIDE` pixels a side, or raise 400 / 413 / 415.

    Blocking (decodes pixels): call it from a worker thread.
    """
    try:
        image = open_image(data, max_pixels=max_pixels, max_side=MAX_DECODED_SIDE)
        # Shrunk at once, so a queued query holds ~3 MB rather than the full decode.
        image.thumbnail((MAX_DECODED_SIDE, MAX_DECODED_SIDE))
        return image
    except TooManyPixelsError as exc:
        raise PayloadTooLarge(str(exc), code=exc.reason) from exc
    except UnsupportedFormatError as exc:
        raise UnsupportedMediaType(str(exc), code=exc.reason) from exc
    except ImageError as exc:
        raise BadRequest(str(exc), code=exc.reason) from exc
    except Exception as exc:  # a decoder bug on hostile input must not become a 500
        logger.warning("image decoder failed on a %d-byte upload: %r", len(data), exc)
        raise BadRequest(f"cannot decode the image: {exc}", code="corrupt_image") from exc
