"""Malformed HTTP, refused by the server before the app sees it, in the project's JSON shape.

uvicorn answers a request h11 cannot parse (a URL or headers over its buffer limit, a negative
``Content-Length``) with a plain-text 400 of its own. :class:`JsonErrorH11Protocol` answers
with h11's status hint instead (414 for a request line over the limit, 431 for headers, 501
for an unsupported ``Transfer-Encoding``, else 400) and the body every other error has::

    {"error": {"code": "uri_too_long", "message": "...", "details": null}}

Pass it as ``uvicorn.Config(..., http=JsonErrorH11Protocol)``.
"""

from __future__ import annotations

import http
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import DEFAULT_MAX_INCOMPLETE_EVENT_SIZE, H11Protocol

from service.errors import ErrorBody, ErrorResponse

_CODES = {
    400: "bad_request",
    414: "uri_too_long",
    431: "request_header_fields_too_large",
    501: "not_implemented",
}


class _RecordingConnection(h11.Connection):
    """An h11 connection that keeps the last parse error, for the response that answers it."""

    last_error: h11.RemoteProtocolError | None = None

    def next_event(self) -> Any:
        try:
            return super().next_event()
        except h11.RemoteProtocolError as exc:
            self.last_error = exc
            raise


def _status_and_message(
    error: h11.RemoteProtocolError | None, buffered: bytes, limit: int
) -> tuple[int, str]:
    if error is None:
        return 400, "malformed HTTP request"
    status = error.error_status_hint
    if status == 431:
        if b"\r\n" not in buffered[: limit + 2]:  # still in the request line: the URL
            return 414, f"the request line (method and URL) exceeds {limit} bytes"
        return 431, f"the request headers exceed {limit} bytes"
    if status not in _CODES:
        status = 400
    return status, f"malformed HTTP request: {error}"


class JsonErrorH11Protocol(H11Protocol):
    """uvicorn's h11 protocol, with protocol errors answered in the service's JSON shape."""

    def __init__(self, config: Any, *args: Any, **kwargs: Any) -> None:
        super().__init__(config, *args, **kwargs)
        self._limit = (
            config.h11_max_incomplete_event_size
            if config.h11_max_incomplete_event_size is not None
            else DEFAULT_MAX_INCOMPLETE_EVENT_SIZE  # uvicorn's default
        )
        self.conn = _RecordingConnection(h11.SERVER, self._limit)

    def send_400_response(self, msg: str) -> None:
        """Called by uvicorn when h11 cannot parse the request; the connection then closes."""
        assert isinstance(self.conn, _RecordingConnection)
        buffered, _ = self.conn.trailing_data
        status, message = _status_and_message(self.conn.last_error, buffered, self._limit)
        body = (
            ErrorResponse(error=ErrorBody(code=_CODES[status], message=message, details=None))
            .model_dump_json()
            .encode("utf-8")
        )
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode("ascii")),  # bytes, not characters
            (b"connection", b"close"),
        ]
        reason = http.HTTPStatus(status).phrase.encode("ascii")
        self.transport.write(
            self.conn.send(h11.Response(status_code=status, headers=headers, reason=reason)) or b""
        )
        self.transport.write(self.conn.send(h11.Data(data=body)) or b"")
        self.transport.write(self.conn.send(h11.EndOfMessage()) or b"")
        self.transport.close()
