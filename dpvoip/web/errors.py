"""HTTP errors as JSON: one shape for every rejection, never a stack trace.

Every JSON error dpvoip answers is rendered here: ``error_answer`` for a request a route
or a resource answers (Klein's error handlers, the Zadarma webhook, click-to-call),
``failure_answer`` for whatever a handler raised, and ``raw_response`` for the rejections
the server writes before a request reaches any route. All three use ``error_body``.
"""

from __future__ import annotations

import json
from http import HTTPStatus
from typing import Any

from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest

log = Logger(namespace="dpvoip.web")


class HttpError(Exception):
    """Raised by a route to answer ``status`` with ``message`` (and nothing written)."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or {}


#: The answer to an error dpvoip did not expect (its details go to the log, never out).
INTERNAL_ERROR = "internal error; the details are logged"


def json_answer(request: IRequest, status: int, body: bytes) -> bytes:
    """``body`` as the JSON answer with ``status`` (headers set on ``request``)."""
    request.setResponseCode(status)
    request.setHeader(b"Content-Type", b"application/json; charset=utf-8")
    request.setHeader(b"Cache-Control", b"no-store")
    return body


def error_answer(request: IRequest, error: HttpError, **extra: Any) -> bytes:
    """The JSON answer to ``error``: its status, its headers, the one error shape (with
    ``extra`` fields after the usual two, for a client that can act on them)."""
    for name, value in error.headers.items():
        request.setHeader(name.encode(), value.encode())
    return json_answer(request, error.status, error_body(error.status, error.message, **extra))


def failure_answer(request: IRequest, failure: Failure) -> bytes:
    """The answer to what a handler raised: an ``HttpError`` as it says; anything else a
    500 whose details go to the log, never to the client."""
    error = failure.value
    if not isinstance(error, HttpError):
        log.failure("unexpected error answering {method} {path}", failure,
                    method=_text(request.method), path=_text(request.path))
        error = HttpError(500, INTERNAL_ERROR)
    return error_answer(request, error)


def _text(raw: bytes | None) -> str:
    return raw.decode("ascii", "replace") if raw else "-"


def error_body(status: int, message: str, **extra: Any) -> bytes:
    """The one error shape: ``{"error": message, "status": status, ...}``."""
    return json_body({"error": message, "status": status, **extra})


def json_body(data: Any) -> bytes:
    return json.dumps(data, ensure_ascii=False, separators=(",", ":")).encode("utf-8") + b"\n"


def raw_response(status: int, message: str) -> bytes:
    """A whole HTTP/1.1 response, for rejections made before a request reaches a route."""
    body = error_body(status, message)
    reason = HTTPStatus(status).phrase
    return (
        f"HTTP/1.1 {status} {reason}\r\n"
        "Content-Type: application/json; charset=utf-8\r\n"
        "X-Content-Type-Options: nosniff\r\n"
        f"Content-Length: {len(body)}\r\n"
        "Connection: close\r\n\r\n"
    ).encode("ascii") + body


def media_type(header: bytes | None) -> str:
    """The bare media type of a Content-Type header value, lower-case ('' when absent)."""
    if not header:
        return ""
    return header.split(b";", 1)[0].strip().decode("latin-1").lower()


def require_media_type(header: bytes | None, *accepted: str) -> str:
    """The request's media type if it is one of ``accepted``, else a 415 HttpError."""
    found = media_type(header)
    if found not in accepted:
        shown = found or "none"
        raise HttpError(415, f"Content-Type {shown} not supported; send {' or '.join(accepted)}")
    return found
