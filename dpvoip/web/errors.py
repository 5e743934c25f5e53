"""HTTP errors as JSON: one shape for every rejection, never a stack trace."""

from __future__ import annotations

import json
from http import HTTPStatus
from typing import Any

from twisted.web.iweb import IRequest


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


def error_answer(request: IRequest, error: HttpError) -> bytes:
    for name, value in error.headers.items():
        request.setHeader(name.encode(), value.encode())
    return json_answer(request, error.status, error_body(error.status, error.message))


def error_body(status: int, message: str) -> bytes:
    return json_body({"error": message, "status": status})


def json_body(data: Any) -> bytes:
    return json.dumps(data, ensure_ascii=False, separators=(",", ":")).encode("utf-8") + b"\n"


def raw_response(status: int, message: str) -> bytes:
    """A whole HTTP/1.1 response, for rejections made before a request reaches a route."""
    body = error_body(status, message)
    reason = HTTPStatus(status).phrase
    return (
        f"HTTP/1.1 {status} {reason}\r\n"
        "Content-Type: application/json; charset=utf-8\r\n"
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
