"""The Klein application: routes translate HTTP into calls on injected services.

Routes never touch the database or the reactor themselves: what they need (here the
readiness report) is passed in by the composition root.

One request is not Klein's: ``POST /voip/zd/``, Zadarma's events, the one route under
load (every step of every call). A front resource hands it straight to its handler
(``WebhookResource``) and everything else to Klein; Klein's 405 answers still name POST
among the methods that path allows.

The providers' own resources (``providers.WebPart``: a path under ``/voip/`` and a leaf
resource) are handed their requests by the same front resource, before Klein: Klein's
routes are the class's, a provider's are the configuration's. The ``[zadarma]``
section's provider keeps the routes above (its part at ``zd``); a part may not take a
path of dpvoip's own routes.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote

from klein import Klein
from twisted.internet.defer import Deferred
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest
from twisted.web.resource import IResource
from werkzeug.exceptions import HTTPException, MethodNotAllowed, NotFound
from zope.interface import implementer

from dpvoip.providers.interface import WebPart
from dpvoip.web.callback import CallbackPages
from dpvoip.web.errors import HttpError, error_answer, failure_answer, json_answer, json_body
from dpvoip.web.events import EventStreams
from dpvoip.web.live_page import LivePages
from dpvoip.web.zadarma import NOT_CONFIGURED, WebhookResource, ZadarmaEndpoint, ZadarmaWebhook

#: Zadarma's events: the one request answered in front of Klein (``_Front``). The path
#: without its slash is the same route (a webhook URL configured without it must neither
#: get a 404 nor a redirect a POST client might not follow): the same handler, signature
#: and all.
EVENTS_METHOD, EVENTS_PATH = b"POST", b"/voip/zd/"
EVENTS_PATHS = (EVENTS_PATH, EVENTS_PATH.rstrip(b"/"))

#: The first path segments under ``/voip/`` that dpvoip's own routes use: no provider's
#: part may take one (``zd/<name>`` below Zadarma's URL excepted).
OWN_SEGMENTS = frozenset({"", "zd", "get-callback", "calls", "popup.json", "popup.js",
                          "static", "events"})


@dataclass(frozen=True)
class Readiness:
    """What /readyz reports; ``ready`` decides between 200 and 503."""

    ready: bool
    checks: dict[str, Any] = field(default_factory=dict)


ReadinessProbe = Callable[[], Deferred[Readiness]]


class WebApp:
    """dpvoip's HTTP surface. Later capabilities add their routes here."""

    app = Klein()

    def __init__(self, readiness: ReadinessProbe, version: str,
                 zadarma: ZadarmaWebhook | None = None,
                 callback: CallbackPages | None = None,
                 metrics: Callable[[], bytes] | None = None,
                 legacy_monitor: IResource | None = None,
                 live_page: LivePages | None = None,
                 events: EventStreams | None = None,
                 parts: Sequence[WebPart] = ()) -> None:
        self._legacy_monitor = legacy_monitor  # the old monitor's endpoints (issue 15)
        self._live_page = live_page  # the live page and the CRM's screen pop
        self._events = events  # the live events' streams
        self._readiness = readiness
        self._version = version
        self._callback = callback
        self._metrics = metrics
        self._parts: list[tuple[bytes, bytes, IResource]] = []
        for part in parts:
            path = part.path.strip("/")
            if path == "zd" and isinstance(part.resource, ZadarmaEndpoint):
                zadarma = zadarma or part.resource.webhook  # the historic routes serve it
                continue
            if path.split("/", 1)[0] in OWN_SEGMENTS and not path.startswith("zd/"):
                raise ValueError(f"a provider's resource cannot be served at /voip/{path}/: "
                                 "dpvoip's own routes use that path")
            mounted = f"/voip/{path}".encode()
            self._parts.append((mounted + b"/", mounted, part.resource))
        self._parts.sort(key=lambda mount: -len(mount[0]))  # the deepest path first
        self._zadarma = zadarma

    def resource(self) -> IResource:
        """The Klein app behind a front door that answers Zadarma's events and the
        providers' parts itself."""
        return _Front(self.app.resource(), self._zadarma, self._parts)

    @app.route("/healthz", methods=["GET", "HEAD"])
    def healthz(self, request: IRequest) -> bytes:
        """Alive: the process answers. Says nothing about the database (see /readyz)."""
        return json_answer(request, 200, json_body({"alive": True, "version": self._version}))

    @app.route("/readyz", methods=["GET", "HEAD"])
    async def readyz(self, request: IRequest) -> bytes:
        report = await self._readiness()
        status = 200 if report.ready else 503
        return json_answer(request, status, json_body({"ready": report.ready, **report.checks}))

    @app.route("/metrics", methods=["GET"])
    def metrics(self, request: IRequest) -> bytes:
        """Prometheus' text format. Meant for the monitoring host: keep it off the proxy."""
        if self._metrics is None:
            raise HttpError(404, "metrics are not configured")
        request.setHeader(b"Content-Type", b"text/plain; version=0.0.4; charset=utf-8")
        return self._metrics()

    @app.route("/voip/zd/", methods=["GET", "HEAD"])
    def zadarma_echo(self, request: IRequest) -> bytes:
        """Zadarma checks the URL with ?zd_echo=X and wants exactly X back, first of all.
        (Its events, ``POST /voip/zd/``, are answered in front of Klein: ``_Front``.)"""
        if self._zadarma is None:
            raise HttpError(404, NOT_CONFIGURED)
        return self._zadarma.echo(request)

    def _click_to_call(self) -> CallbackPages:
        if self._callback is None:
            raise HttpError(404, "click-to-call is not configured")
        return self._callback

    @app.route("/voip/get-callback/", methods=["GET", "HEAD"], strict_slashes=False)
    async def callback_page(self, request: IRequest) -> bytes:
        """Shows the number and the user's connections. Never dials: a link must not be
        able to make the company pay for a call."""
        return await self._click_to_call().page(request)

    @app.route("/voip/get-callback/", methods=["POST"], strict_slashes=False)
    async def callback_dial(self, request: IRequest) -> bytes:
        return await self._click_to_call().dial(request)

    @app.route("/voip/calls/<string:call>/recording", methods=["GET", "HEAD"])
    async def call_recording(self, request: IRequest, call: str) -> bytes:
        return await self._click_to_call().recording(request, call)

    # -- the live page and the screen pop (``web/live_page.py``) ---------------------------

    def _live(self) -> LivePages:
        if self._live_page is None:
            raise HttpError(404, "the live page is not configured")
        return self._live_page

    @app.route("/voip/", methods=["GET", "HEAD"])
    async def live_page(self, request: IRequest) -> bytes:
        return await self._live().page(request)

    @app.route("/voip", methods=["GET", "HEAD"])
    def live_page_slash(self, request: IRequest) -> bytes:
        """To ``/voip/``, relatively (the page's own links are relative to it, and the
        CRM's proxy may serve it under another prefix)."""
        self._live()
        request.setResponseCode(302)
        request.setHeader(b"Location", b"voip/")
        return b""

    @app.route("/voip/popup.json", methods=["GET", "HEAD"])
    async def popup_settings(self, request: IRequest) -> bytes:
        return await self._live().popup_json(request)

    @app.route("/voip/popup.js", methods=["GET", "HEAD"])
    def popup_script(self, request: IRequest) -> bytes:
        return self._live().static(request, "popup.js")

    @app.route("/voip/static/<string:name>", methods=["GET", "HEAD"])
    def live_static(self, request: IRequest, name: str) -> bytes:
        return self._live().static(request, name)

    @app.route("/voip/events", methods=["GET"])
    async def live_events(self, request: IRequest) -> bytes:
        """Server-Sent Events of every call and box change (``web/events.py``)."""
        if self._events is None:
            raise HttpError(404, "live events are not configured")
        return await self._events.stream(request)

    @app.route("/accounting/api/", branch=True)
    def legacy_monitor(self, request: IRequest) -> IResource:
        """The old monitor's endpoints, whole (``web/legacy_monitor.py``)."""
        if self._legacy_monitor is None:
            raise HttpError(404, "no such resource")
        return self._legacy_monitor

    @app.handle_errors(NotFound)
    def not_found(self, request: IRequest, failure: Failure) -> bytes:
        return error_answer(request, HttpError(404, "no such resource"))

    @app.handle_errors(MethodNotAllowed)
    def method_not_allowed(self, request: IRequest, failure: Failure) -> bytes:
        error = failure.value
        assert isinstance(error, MethodNotAllowed)
        allowed = set(error.valid_methods or ())
        if _routed_path(request) in (p.decode() for p in EVENTS_PATHS):
            allowed.add(EVENTS_METHOD.decode())
        headers = {"Allow": ", ".join(sorted(allowed))} if allowed else {}
        method = request.method.decode("ascii", "replace")
        return error_answer(request, HttpError(405, f"method {method} not allowed here",
                                               headers))

    @app.handle_errors(HTTPException)
    def other_http(self, request: IRequest, failure: Failure) -> bytes:
        error = failure.value
        assert isinstance(error, HTTPException)
        status = error.code or 400
        return error_answer(request, HttpError(status, error.description or error.name))

    @app.handle_errors(Exception)
    def unexpected(self, request: IRequest, failure: Failure) -> bytes:
        """An HttpError a route raised, as it says; anything else a 500, details logged."""
        return failure_answer(request, failure)


def _routed_path(request: IRequest) -> str:
    """The path as Klein's routing reads it: percent-decoded, runs of slashes merged."""
    path: bytes = request.path
    return re.sub("/{2,}", "/", unquote(path.decode("ascii", "replace")))


@implementer(IResource)
class _Front:
    """``POST /voip/zd/`` straight to its handler, a provider's path to its resource;
    everything else to Klein. Klein's routing and result handling cost more than the
    event's own checks."""

    isLeaf = True

    def __init__(self, app: IResource, zadarma: ZadarmaWebhook | None,
                 parts: Sequence[tuple[bytes, bytes, IResource]] = ()) -> None:
        self._app = app
        self._events = WebhookResource(zadarma)
        self._parts = parts

    def getChildWithDefault(self, name: bytes, request: IRequest) -> IResource:
        return self  # a leaf: never asked

    def putChild(self, path: bytes, child: IResource) -> None:
        raise NotImplementedError("dpvoip's routes are Klein's")

    def render(self, request: IRequest) -> Any:
        path: bytes = request.path
        if request.method == EVENTS_METHOD and path in EVENTS_PATHS:
            return self._events.render(request)
        for below, mounted, resource in self._parts:
            if path == mounted or path.startswith(below):
                return resource.render(request)
        return self._app.render(request)
