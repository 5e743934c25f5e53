"""The old monitor's endpoints over HTTP: one leaf resource under ``/accounting/api/``.

- ``POST /accounting/api/fritz-webhook/`` (v4: ``Authorization: Bearer``);
- ``POST /accounting/api/voip-calls/``, ``PATCH /accounting/api/voip-calls/<id>/``, the
  same under ``/accounting/api/v1/`` (v3.5: ``X-API-Key``).

Thin: the token is checked first (a header only, never the query string), the body read
by the contracts (``dpvoip.legacy_monitor.contracts``), the service does the rest. Each
contract keeps its own answers: the webhook's ``{"error": ...}``, the REST API's DRF
shapes (``{"detail": ...}``, ``{"<field>": ["..."]}``). Never a 500 for bad input.
"""

from __future__ import annotations

import re
from typing import Any, Protocol

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest
from twisted.web.resource import IResource
from twisted.web.server import NOT_DONE_YET
from zope.interface import implementer

from dpvoip.legacy_monitor.contracts import (
    BadAction,
    BadJson,
    CallRow,
    Create,
    Invalid,
    Update,
    body_object,
    create_request,
    rest_body,
    rest_error,
    row_id,
    update_request,
    webhook_created,
    webhook_request,
    webhook_updated,
)
from dpvoip.legacy_monitor.service import NotFound, Unavailable
from dpvoip.web.errors import json_answer, json_body

log = Logger(namespace="dpvoip.legacy_monitor")

WEBHOOK = re.compile(r"/accounting/api/fritz-webhook/?\Z")
CALLS = re.compile(r"/accounting/api/(?:v1/)?voip-calls/?\Z")
CALL = re.compile(r"/accounting/api/(?:v1/)?voip-calls/([^/]+)/?\Z")


class Monitor(Protocol):
    """What the routes need of ``LegacyMonitor``."""

    zone: Any

    def bearer(self, header: bytes | None) -> bool: ...

    def api_key(self, header: bytes | None) -> bool: ...

    def refused(self, reason: str) -> None: ...

    @property
    def counters(self) -> Any: ...

    async def create(self, create: Create) -> tuple[CallRow, bool]: ...

    async def update(self, update: Update) -> CallRow: ...


class _Answer(Exception):
    def __init__(self, status: int, body: dict[str, Any], reason: str) -> None:
        self.status, self.body, self.reason = status, body, reason


@implementer(IResource)
class LegacyMonitorResource:
    isLeaf = True

    def __init__(self, monitor: Monitor) -> None:
        self._monitor = monitor

    def getChildWithDefault(self, name: bytes, request: IRequest) -> IResource:
        return self

    def putChild(self, path: bytes, child: IResource) -> None:
        raise NotImplementedError("a leaf")

    def render(self, request: IRequest) -> Any:
        gone: list[bool] = []
        finished: Deferred[None] = request.notifyFinish()  # type: ignore[attr-defined]
        finished.addBoth(lambda _: gone.append(True))  # finished, or the client hung up
        d = Deferred.fromCoroutine(self._handle(request))
        d.addCallbacks(lambda answer: self._write(request, gone, *answer),
                       lambda failure: self._failed(request, gone, failure))
        return NOT_DONE_YET

    def _write(self, request: IRequest, gone: list[bool], status: int,
               body: dict[str, Any]) -> None:
        if gone:
            return
        request.write(json_answer(request, status, json_body(body)))
        request.finish()

    def _failed(self, request: IRequest, gone: list[bool], failure: Failure) -> None:
        log.failure("the old monitor's request failed", failure)
        self._monitor.refused("error")
        self._write(request, gone, 500, {"error": "internal error; the details are logged"})

    async def _handle(self, request: IRequest) -> tuple[int, dict[str, Any]]:
        path = request.path.decode("ascii", "replace")
        method = request.method
        webhook = WEBHOOK.match(path) is not None
        calls, call = CALLS.match(path), CALL.match(path)
        if not (webhook or calls or call):
            return 404, {"error": "no such resource", "status": 404}
        self._monitor.counters.requests += 1
        try:
            if webhook:
                return await self._webhook(request, method)
            return await self._rest(request, method, call[1] if call else None)
        except _Answer as answer:
            self._monitor.refused(answer.reason)
            return answer.status, answer.body

    async def _webhook(self, request: IRequest, method: bytes) -> tuple[int, dict[str, Any]]:
        if method != b"POST":
            request.setHeader(b"Allow", b"POST")
            raise _Answer(405, {"error": "Method not allowed"}, "method")
        if not self._monitor.bearer(request.getHeader(b"authorization")):
            raise _Answer(401, {"error": "Unauthorized"}, "unauthorized")
        try:
            what = webhook_request(body_object(request.content.read()), self._monitor.zone)
        except BadJson:
            raise _Answer(400, {"error": "Invalid JSON"}, "invalid") from None
        except BadAction as error:
            raise _Answer(400, {"error": str(error)}, "invalid") from None
        except Invalid as error:
            raise _Answer(400, {"error": str(error)}, "invalid") from None
        try:
            if isinstance(what, Create):
                row, duplicate = await self._monitor.create(what)
                return 200, webhook_created(row, duplicate)
            return 200, webhook_updated(await self._monitor.update(what))
        except NotFound:
            raise _Answer(404, {"error": "Call not found"}, "not_found") from None
        except Unavailable as error:
            raise _Answer(503, {"error": f"Not recorded: {error}"}, "unavailable") from None

    async def _rest(self, request: IRequest, method: bytes,
                    call: str | None) -> tuple[int, dict[str, Any]]:
        allowed = b"PATCH" if call is not None else b"POST"
        if method != allowed:
            request.setHeader(b"Allow", allowed)
            name = method.decode("ascii", "replace")
            raise _Answer(405, {"detail": f'Method "{name}" not allowed.'}, "method")
        key = request.getHeader(b"x-api-key")
        if not self._monitor.api_key(key):
            detail = ("Authentication credentials were not provided." if key is None
                      else "Invalid API key.")
            raise _Answer(401, {"detail": detail}, "unauthorized")
        try:
            data = body_object(request.content.read())
            if call is None:
                row, duplicate = await self._monitor.create(
                    create_request(data, self._monitor.zone))
                return (200 if duplicate else 201), rest_body(row)
            return 200, rest_body(await self._monitor.update(
                update_request(data, row_id(call, "id"), self._monitor.zone)))
        except BadJson as error:
            raise _Answer(400, {"detail": f"JSON parse error - {error}"}, "invalid") from None
        except Invalid as error:
            status = 404 if error.field == "id" and call is not None else 400
            body = {"detail": "Not found."} if status == 404 else rest_error(error)
            raise _Answer(status, body, "not_found" if status == 404 else "invalid") from None
        except NotFound:
            raise _Answer(404, {"detail": "Not found."}, "not_found") from None
        except Unavailable as error:
            raise _Answer(503, {"detail": f"Not recorded: {error}"}, "unavailable") from None
