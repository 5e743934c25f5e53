"""The HTTP server around the Klein app: body limit, slow-client cut-off, access log, drain.

Twisted's ``Site`` would buffer any body a client announces and wait twelve hours for an
idle one. Here a request announcing (or sending) more than the limit is answered 413 at
once and the connection closed, a client that takes longer than ``request_timeout`` to
send its request is cut off, and shutdown waits for requests in flight to finish.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import unquote_to_bytes

from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IListeningPort, IReactorTime
from twisted.internet.protocol import connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import http, server
from twisted.web.resource import IResource

from dpvoip.config import WebSettings
from dpvoip.web.errors import media_type, raw_response

log = Logger(namespace="dpvoip.web.access")


class BoundedRequest(server.Request):
    """A request that refuses bodies over the site's limit before buffering them."""

    site: DpvoipSite
    _refused = False
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
        if self._refused:
            return
        self._received += len(data)
        if self._received > self._limit():
            self._refuse()
            return
        super().handleContentChunk(data)

    def _refuse(self) -> None:
        self._refused = True
        limit = self._limit()
        transport: Any = self.channel.transport
        transport.write(raw_response(413, f"request body larger than {limit} bytes"))
        self.method = getattr(self.channel, "_command", b"-")
        self.path = getattr(self.channel, "_path", b"-").split(b"?", 1)[0]
        transport.loseConnection()
        self.owner.request_refused(self, 413)

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
        if self._refused:
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
            self._parsePOSTFormSubmission = False
            self._form_pending = True
        try:
            super().requestReceived(command, path, version)
        except (ValueError, IndexError, AttributeError, TypeError) as error:
            # Twisted parses the Content-Type and a multipart body with Python's email
            # package, which raises on some odd header values before any route runs.
            if self.finished or self._refused:
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
        self._refused = True
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


class BoundedChannel(http.HTTPChannel):
    """An HTTP channel that gives each request a deadline from its first byte."""

    _deadline: IDelayedCall | None = None

    def dataReceived(self, data: bytes) -> None:
        if self._deadline is None and data:
            self._arm()
        super().dataReceived(data)

    def allContentReceived(self) -> None:
        self._disarm()
        super().allContentReceived()
        if getattr(self, "_buffer", b"") or self._dataBuffer:
            # Part of a pipelined next request arrived with this one: its clock runs now.
            self._arm()

    def _send100Continue(self) -> None:
        # A refused request (413 already sent) must not get an interim response after it.
        if self.requests and getattr(self.requests[-1], "_refused", False):
            return
        super()._send100Continue()

    def _arm(self) -> None:
        factory: DpvoipSite = self.factory
        self._deadline = factory.clock.callLater(factory.settings.request_timeout, self._too_slow)

    def _too_slow(self) -> None:
        self._deadline = None
        log.info("cut off a client too slow to send its request")
        transport: Any = self.transport
        transport.write(raw_response(408, "request not received in time"))
        transport.abortConnection()

    def _respondToBadRequestAndDisconnect(self) -> None:
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
        self._in_flight: set[BoundedRequest] = set()
        self._idle_waiters: list[Deferred[None]] = []

    def buildProtocol(self, addr: Any) -> Any:
        channel = super().buildProtocol(addr)
        channel.maxHeaders = self.settings.max_headers
        return channel

    # -- in-flight tracking --------------------------------------------------------------

    def request_started(self, request: BoundedRequest) -> None:
        self._in_flight.add(request)

    def request_ended(self, request: BoundedRequest) -> None:
        self._in_flight.discard(request)
        if not self._in_flight:
            waiters, self._idle_waiters = self._idle_waiters, []
            for waiter in waiters:
                waiter.callback(None)

    def request_refused(self, request: BoundedRequest, status: int) -> None:
        self._access(request, status, 0)
        self.request_ended(request)

    @property
    def in_flight(self) -> int:
        return len(self._in_flight)

    def idle(self) -> Deferred[None]:
        if not self._in_flight:
            return defer.succeed(None)
        waiter: Deferred[None] = Deferred()
        self._idle_waiters.append(waiter)
        return waiter

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
            client = getattr(peer, "host", str(peer))
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
            from dpvoip.deferreds import race

            waited = self.site.idle().addCallback(lambda _: True)
            await race(self._reactor, waited, self.site.settings.drain_timeout, False)


def _announce(port: IListeningPort) -> None:
    from dpvoip import __version__

    address: Any = port.getHost()
    host = getattr(address, "host", None)
    if host is not None:
        shown = f"[{host}]" if ":" in host else host
        url = f"http://{shown}:{address.port}"
    else:
        url = f"unix:{getattr(address, 'name', address)}"
    Logger(namespace="dpvoip").info(
        "dpvoip {version} listening on {url} — check it with: curl {url}/readyz "
        "(configuration: etc/dpvoip.toml.example explains every setting)",
        version=__version__, url=url,
    )
