"""Domain errors and the one place that turns every error into an HTTP response.

Every error body has the same shape, whatever raised it (our code, FastAPI's validation,
Starlette's routing, the body-size limit)::

    {"error": {"code": "payload_too_large", "message": "...", "details": null}}
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

logger = logging.getLogger(__name__)


class ErrorBody(BaseModel):
    code: str = Field(description="Stable machine-readable error code, e.g. 'payload_too_large'.")
    message: str = Field(description="What went wrong, for a person.")
    details: list[dict[str, Any]] | None = Field(
        None, description="Per-field problems (validation errors) or index check failures."
    )


class ErrorResponse(BaseModel):
    """The body of every error response."""

    error: ErrorBody


class ServiceError(Exception):
    """Base of the errors the service raises on purpose; each maps to one HTTP status."""

    status_code = 500
    code = "internal_error"

    def __init__(
        self,
        message: str,
        *,
        code: str | None = None,
        details: list[dict[str, Any]] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.details = details
        self.headers = headers
        if code is not None:
            self.code = code


class BadRequest(ServiceError):
    """Unusable input: not an image, corrupt or truncated, a malformed multipart body."""

    status_code = 400
    code = "bad_request"


class Unauthorized(ServiceError):
    status_code = 401
    code = "unauthorized"

    def __init__(self, message: str) -> None:
        super().__init__(message, headers={"WWW-Authenticate": "Bearer"})


class NotFound(ServiceError):
    status_code = 404
    code = "not_found"


class ModalityMissing(ServiceError):
    """The published index has no vectors of the modality a query searches."""

    status_code = 404
    code = "modality_missing"


class IndexRefused(ServiceError):
    """A new index version failed validation; the old one keeps serving."""

    status_code = 409
    code = "index_refused"


class PayloadTooLarge(ServiceError):
    """A body over the upload limit, or an image over the pixel limit."""

    status_code = 413
    code = "payload_too_large"


class UnsupportedMediaType(ServiceError):
    status_code = 415
    code = "unsupported_media_type"


class InvalidInput(ServiceError):
    """A request field that fails validation outside FastAPI's own (e.g. a multipart ``k``)."""

    status_code = 422
    code = "validation_error"


class InvalidFilter(InvalidInput):
    """A metadata filter naming an unknown field, or an operator or value its field's type
    does not take; ``details`` lists the known fields."""

    code = "invalid_filter"


class EncodeFailed(ServiceError):
    """The encoder failed on this query, tried alone; the other queries of its batch were
    answered."""

    status_code = 500
    code = "encode_failed"


class Overloaded(ServiceError):
    """The per-modality queue is full: come back after ``Retry-After`` seconds."""

    status_code = 503
    code = "overloaded"

    def __init__(self, message: str, *, retry_after_s: int) -> None:
        super().__init__(message, headers={"Retry-After": str(retry_after_s)})


class NotReady(ServiceError):
    """The model or the index is not loaded (yet, or it was refused)."""

    status_code = 503
    code = "not_ready"


# Codes for errors Starlette/FastAPI raise as plain HTTPExceptions.
_HTTP_CODES = {
    400: "bad_request",
    401: "unauthorized",
    404: "not_found",
    405: "method_not_allowed",
    413: "payload_too_large",
    415: "unsupported_media_type",
    422: "validation_error",
    503: "not_ready",
}


def error_response(
    status_code: int,
    code: str,
    message: str,
    *,
    details: list[dict[str, Any]] | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    """A JSON error response in the service's one error shape. Text that cannot be written
    as UTF-8 (lone surrogates, e.g. a field name sent as ``"\\ud800"``) is shown escaped."""
    body = ErrorResponse(error=ErrorBody(code=code, message=message, details=details))
    return JSONResponse(
        _utf8_safe(body.model_dump(mode="json")), status_code=status_code, headers=headers
    )


def _utf8_safe(value: Any) -> Any:
    """``value`` (JSON data) with every string's lone surrogates replaced by their escapes."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return value.encode("utf-8", "backslashreplace").decode("utf-8")
        return value
    if isinstance(value, dict):
        return {_utf8_safe(key): _utf8_safe(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_utf8_safe(item) for item in value]
    return value


def error_responses(*status_codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` entries for a route's error statuses, all with :class:`ErrorResponse`."""
    descriptions = {
        400: "Not an image, a corrupt or truncated image, or a malformed body.",
        401: "Missing or wrong bearer token.",
        404: "No such resource, or the index lacks this modality.",
        409: "The new index version failed validation; the old one keeps serving.",
        413: "Body over the upload limit, or image over the pixel limit.",
        415: "Content type or image format outside the allowed list.",
        422: "A field is missing, has the wrong type, or is out of range; or a metadata filter "
        "names an unknown field (the known ones are listed) or misuses an operator.",
        500: "The encoder failed on this query alone (its batch's other queries were "
        "answered), or an internal error (sent with Connection: close).",
        503: "Not ready (no model or index loaded) or overloaded (see Retry-After).",
    }
    return {
        status: {"model": ErrorResponse, "description": descriptions[status]}
        for status in status_codes
    }


def _validation_details(exc: RequestValidationError) -> list[dict[str, Any]]:
    # Only loc/msg/type: 'input' and 'ctx' can hold bytes or exception objects.
    return [
        {
            "loc": [str(part) for part in error.get("loc", ())],
            "msg": str(error.get("msg", "")),
            "type": str(error.get("type", "")),
        }
        for error in exc.errors()
    ]


async def _service_error_handler(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ServiceError)
    if exc.status_code >= 500 and not isinstance(exc, (Overloaded, NotReady)):
        logger.error("%s %s failed: %s", request.method, request.url.path, exc.message)
    return error_response(
        exc.status_code, exc.code, exc.message, details=exc.details, headers=exc.headers
    )


async def _validation_error_handler(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    details = _validation_details(exc)
    fields = ", ".join(".".join(item["loc"]) for item in details) or "request"
    return error_response(422, "validation_error", f"invalid {fields}", details=details)


async def _http_error_handler(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    code = _HTTP_CODES.get(exc.status_code, f"http_{exc.status_code}")
    return error_response(
        exc.status_code, code, str(exc.detail), headers=dict(exc.headers or {}) or None
    )


async def _unhandled_error_handler(request: Request, exc: Exception) -> JSONResponse:
    # Starlette re-raises an unhandled exception once this response is sent, and the server
    # then drops the connection: say so, or a keep-alive client's next request on it gets an
    # empty reply. (ServiceErrors, 5xx included, leave the connection usable.)
    logger.exception("unhandled error in %s %s", request.method, request.url.path)
    return error_response(
        500, "internal_error", "internal server error", headers={"Connection": "close"}
    )


def install_error_handlers(app: FastAPI) -> None:
    """Register the handlers that give every error the :class:`ErrorResponse` shape."""
    app.add_exception_handler(ServiceError, _service_error_handler)
    app.add_exception_handler(RequestValidationError, _validation_error_handler)
    app.add_exception_handler(StarletteHTTPException, _http_error_handler)
    app.add_exception_handler(Exception, _unhandled_error_handler)
