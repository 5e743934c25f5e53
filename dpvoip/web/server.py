"""The HTTP server around the Klein app: body limit, slow-client cut-off, access log, drain.

Twisted's ``Site`` would buffer any body a client announces and wait twelve hours for an
idle one. Here a request announcing (or sending) more than the limit is answered 413 at
once and the connection closed, a client that takes longer than ``request_timeout`` to
send its request is cut off, and shutdown waits for requests in flight to finish.
"""

from __future__ import annotations

import os
from typing import Any
from urllib.parse import unquote_to_bytes

from twisted.application.service import Service
from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IListeningPort, IReactorTime
from twisted.internet.protocol import connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import http, server
from twisted.web.resource import IResource

from dpvoip.config import WebSettings
from dpvoip.deferreds import EmptyableSet, race
from dpvoip.internals import (
    ChannelHooks,
    has_unread_bytes,
    leave_form_to_caller,
    request_line,
)
from dpvoip.web.errors import media_type, raw_response

log = Logger(namespace="dpvoip.web.access")


class BoundedRequest(server.Request):
    """A request that refuses bodies over the site's limit before buffering them."""

    site: DpvoipSite
    refused = False
    """Answered already (413 or 400) before the application saw it."""
    _received = 0
    _form_pending = False

    def __init__(self, channel: Any, *args: Any, **kwargs: Any) -> None:
        super().__init__(channel, *args, **kwargs)
        # Request.finish() drops self.channel: keep the site for the bookkeeping after it.
        self.owner: DpvoipSite = channel.factory
        self.started_at = self.owner.clock.seconds()
        self.owner.request_started(self)

    def _limit(self) -> int:
        return self.owner.settings.max_body_bytes

    def gotLength(self, length: int | None) -> None:
        if length is not None and length > self._limit():
            self._refuse()
            return
        super().gotLength(length)

    def handleContentChunk(self, data: bytes) -> None:
        if self.refused:
            return
        self._received += len(data)
        if self._received > self._limit():
            self._refuse()
            return
        super().handleContentChunk(data)

    def _refuse(self) -> None:
        self.refused = True
        limit = self._limit()
        transport: Any = self.channel.transport
        transport.write(raw_response(413, f"request body larger than {limit} bytes"))
        command, path = request_line(self.channel)
        self.method = command
        self.path = path.split(b"?", 1)[0]
        transport.loseConnection()
        self.owner.request_refused(self, 413)

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
        if self.refused:
            return
        try:
            path.split(b"?", 1)[0].decode("utf-8")
            unquote_to_bytes(path.split(b"?", 1)[0]).decode("utf-8")
        except UnicodeDecodeError:
            self._answer_bad(command, path, "the path is not UTF-8")
            return
        content_type = self.requestHeaders.getRawHeaders(b"Content-Type")
        if (command == b"POST" and content_type
                and media_type(content_type[0]) == "application/x-www-form-urlencoded"):
            # Twisted reads every Content-Type with Python's email package, which costs
            # more than the rest of a webhook's parsing: the common form is read here.
            leave_form_to_caller(self)
            self._form_pending = True
        try:
            super().requestReceived(command, path, version)
        except (ValueError, IndexError, AttributeError, TypeError) as error:
            # Twisted parses the Content-Type and a multipart body with Python's email
            # package, which raises on some odd header values before any route runs.
            if self.finished or self.refused:
                raise
            log.info("unreadable request refused: {error}", error=type(error).__name__)
            self._answer_bad(command, path, "the Content-Type or the form cannot be read")

    def process(self) -> None:
        if self._form_pending:
            self._form_pending = False
            assert self.content is not None and self.args is not None
            self.args.update(http.parse_qs(self.content.read(), 1))
            self.content.seek(0, 0)
        super().process()

    def _answer_bad(self, command: bytes, path: bytes, message: str) -> None:
        self.refused = True
        self.method = command
        self.path = path.split(b"?", 1)[0]
        transport: Any = self.channel.transport
        transport.write(raw_response(400, message))
        transport.loseConnection()
        self.owner.request_refused(self, 400)

    def connectionLost(self, reason: Any) -> None:
        super().connectionLost(reason)
        self.owner.request_ended(self)

    def finish(self) -> None:
        super().finish()
        self.owner.request_ended(self)


class BoundedChannel(ChannelHooks):
    """An HTTP channel that gives each request a deadline from its first byte."""

    _deadline: IDelayedCall | None = None

    def dataReceived(self, data: bytes) -> None:
        if self._deadline is None and data:
            self._arm()
        super().dataReceived(data)

    def allContentReceived(self) -> None:
        self._disarm()
        super().allContentReceived()
        if has_unread_bytes(self):
            # Part of a pipelined next request arrived with this one: its clock runs now.
            self._arm()

    def may_send_continue(self) -> bool:
        # A refused request (413 already sent) must not get an interim response after it.
        return not (self.requests and self.requests[-1].refused)

    def _arm(self) -> None:
        factory: DpvoipSite = self.factory
        self._deadline = factory.clock.callLater(factory.settings.request_timeout, self._too_slow)

    def _too_slow(self) -> None:
        self._deadline = None
        log.info("cut off a client too slow to send its request")
        transport: Any = self.transport
        transport.write(raw_response(408, "request not received in time"))
        transport.abortConnection()

    def answer_malformed(self) -> None:
        # Twisted answers a malformed request (bad request line, too many or too long
        # headers, broken chunking) with a bare 400; answer it in dpvoip's JSON shape.
        self._disarm()
        transport: Any = self.transport
        transport.write(raw_response(400, "malformed HTTP request"))
        self.loseConnection()

    def _disarm(self) -> None:
        if self._deadline is not None and self._deadline.active():
            self._deadline.cancel()
        self._deadline = None

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._disarm()
        super().connectionLost(reason)


class DpvoipSite(server.Site):
    """A Site with dpvoip's limits, a secret-free access log and in-flight tracking."""

    protocol = BoundedChannel  # type: ignore[assignment]
    requestFactory = BoundedRequest
    noisy = False

    def __init__(self, resource: IResource, settings: WebSettings, clock: IReactorTime) -> None:
        super().__init__(resource, timeout=settings.idle_timeout, reactor=clock)
        self.settings = settings
        self.clock = clock
        self.displayTracebacks = False
        self._in_flight: EmptyableSet[BoundedRequest] = EmptyableSet()

    def buildProtocol(self, addr: Any) -> Any:
        channel = super().buildProtocol(addr)
        channel.maxHeaders = self.settings.max_headers
        return channel

    # -- in-flight tracking --------------------------------------------------------------

    def request_started(self, request: BoundedRequest) -> None:
        self._in_flight.add(request)

    def request_ended(self, request: BoundedRequest) -> None:
        self._in_flight.discard(request)

    def request_refused(self, request: BoundedRequest, status: int) -> None:
        self._access(request, status, 0)
        self.request_ended(request)

    @property
    def in_flight(self) -> int:
        return len(self._in_flight)

    def idle(self) -> Deferred[None]:
        """Fires once no request is in flight (at once if none is)."""
        return self._in_flight.when_empty()

    # -- access log ----------------------------------------------------------------------

    def log(self, request: Any) -> None:
        if self.settings.access_log:
            self._access(request, request.code, request.sentLength)

    def _access(self, request: BoundedRequest, status: int, sent: int) -> None:
        # The path only: query strings carry tokens (zd_echo, numbers) and stay out of logs.
        path = request.path.decode("ascii", "replace") if request.path else "-"
        method = request.method.decode("ascii", "replace") if request.method else "-"
        try:
            peer = request.getClientAddress()
            client = peer.host if isinstance(peer, IPv4Address | IPv6Address) else str(peer)
        except Exception:
            client = "-"
        elapsed_ms = (self.clock.seconds() - request.started_at) * 1000
        log.info(
            "{client} {method} {path} {status} {sent}B {elapsed_ms:.1f}ms",
            client=client, method=method, path=path, status=status, sent=sent,
            elapsed_ms=elapsed_ms,
        )


class WebService(Service):
    """Listens on the configured endpoint and says where; at stop, stops accepting then
    drains."""

    name = "web"

    def __init__(self, reactor: Any, site: DpvoipSite, endpoint_description: str) -> None:
        self._reactor = reactor
        self.site = site
        self._description = endpoint_description
        self.port: IListeningPort | None = None

    def listen(self) -> Deferred[IListeningPort]:
        from twisted.internet.endpoints import serverFromString

        endpoint = serverFromString(self._reactor, self._description)
        listening: Deferred[IListeningPort] = endpoint.listen(self.site)

        def keep(port: IListeningPort) -> IListeningPort:
            self.port = port
            return port

        return listening.addCallback(keep)

    def startService(self) -> Deferred[None]:
        super().startService()
        return self.listen().addCallback(_announce)

    def stopService(self) -> Deferred[None]:
        super().stopService()
        return Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
        if self.port is not None:
            port, self.port = self.port, None
            stopped = port.stopListening()
            if stopped is not None:
                await stopped
        if self.site.in_flight:
            log.info("shutdown: waiting for {n} requests in flight", n=self.site.in_flight)
            waited = self.site.idle().addCallback(lambda _: True)
            await race(self._reactor, waited, self.site.settings.drain_timeout, False)


def _announce(port: IListeningPort) -> None:
    from dpvoip import __version__

    address = port.getHost()
    if isinstance(address, IPv4Address | IPv6Address):
        shown = f"[{address.host}]" if ":" in address.host else address.host
        url = f"http://{shown}:{address.port}"
    elif isinstance(address, UNIXAddress):
        url = f"unix:{os.fsdecode(address.name or b'')}"
    else:
        url = str(address)
    Logger(namespace="dpvoip").info(
        "dpvoip {version} listening on {url} — check it with: curl {url}/readyz "
        "(configuration: etc/dpvoip.toml.example explains every setting)",
        version=__version__, url=url,
    )
