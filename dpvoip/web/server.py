"""The HTTP server around the Klein app: body limit, slow-client cut-off, connection
limits, access log, drain.

Twisted's ``Site`` would buffer any body a client announces and wait twelve hours for an
idle one. Here a request announcing (or sending) more than the limit is answered 413 at
once and the connection closed, a client that takes longer than ``request_timeout`` to
send its request is cut off, and shutdown waits for requests in flight to finish.

Connections are bounded (``ConnectionLimits``): at most ``max_connections_per_peer`` from
one address and ``max_connections`` in all; one beyond is closed as soon as it is
accepted (the listening socket's ``buildProtocol`` answers None), before it costs a
channel or a timer, and counted (``dpvoip_web_connections_refused``). Trusted proxies are
exempt from both (the reverse proxy carries every client over its connections: its own
limits bound them), the Zadarma webhook senders from the total (a flood of idle sockets
from elsewhere must not shut out the webhooks). Every answer carries
``X-Content-Type-Options: nosniff`` and no ``Server`` header (Twisted's names its
version).
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
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
from dpvoip.logs import ACCESS_FORMAT
from dpvoip.web.errors import media_type, raw_response
from dpvoip.web.sources import Network, peer_host, trusted

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

    def setHeader(self, name: bytes | str, value: bytes | str) -> None:
        # Twisted's Site names itself and its version in every answer: not dpvoip's.
        raw = name.encode("latin-1") if isinstance(name, str) else name
        if raw.lower() == b"server":
            return
        super().setHeader(name, value)

    def process(self) -> None:
        self.responseHeaders.setRawHeaders(b"X-Content-Type-Options", [b"nosniff"])
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
    """An HTTP channel that gives each request a deadline from its first byte, and counts
    itself among its peer's connections while it is open."""

    _deadline: IDelayedCall | None = None
    _counted: str | None = None

    def connectionMade(self) -> None:
        super().connectionMade()
        factory: DpvoipSite = self.factory
        self._counted = peer_host(self.transport.getPeer()) if self.transport else ""
        factory.limits.opened(self._counted)

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
        if self._counted is not None:
            factory: DpvoipSite = self.factory
            factory.limits.closed(self._counted)
            self._counted = None
        super().connectionLost(reason)


class ConnectionLimits:
    """Open connections per peer address and in all; whether one more may be accepted.

    ``proxies`` (the trusted reverse proxies) are exempt from both limits and not counted
    in the total; ``reserved`` (the addresses Zadarma sends webhooks from) are exempt from
    the total but not from the per-peer limit. A peer that is not an IP address (a unix
    socket) has the per-peer limit on the address ''."""

    def __init__(self, total: int, per_peer: int, proxies: Sequence[Network] = (),
                 reserved: Sequence[Network] = ()) -> None:
        self.total = total
        self.per_peer = per_peer
        self._proxies = tuple(proxies)
        self._reserved = tuple(reserved)
        self._open: dict[str, int] = {}
        self.counted = 0  # open connections subject to the total
        self.open = 0  # all open connections
        #: Connections closed at once, by the limit they hit: "per_peer", "total".
        self.refused: dict[str, int] = {"per_peer": 0, "total": 0}
        self._kinds: dict[str, str] = {}

    def _kind(self, peer: str) -> str:
        kind = self._kinds.get(peer)
        if kind is None:
            kind = ("proxy" if trusted(peer, self._proxies)
                    else "reserved" if trusted(peer, self._reserved) else "peer")
            if len(self._kinds) < 4096:
                self._kinds[peer] = kind
        return kind

    def admit(self, peer: str) -> str | None:
        """None when a connection from ``peer`` may be accepted, else the limit it hits
        (counted)."""
        kind = self._kind(peer)
        if kind == "proxy":
            return None
        if self._open.get(peer, 0) >= self.per_peer:
            self.refused["per_peer"] += 1
            return "per_peer"
        if kind == "peer" and self.counted >= self.total:
            self.refused["total"] += 1
            return "total"
        return None

    def opened(self, peer: str) -> None:
        self.open += 1
        kind = self._kind(peer)
        if kind == "proxy":
            return
        self._open[peer] = self._open.get(peer, 0) + 1
        if kind == "peer":
            self.counted += 1

    def closed(self, peer: str) -> None:
        self.open -= 1
        kind = self._kind(peer)
        if kind == "proxy":
            return
        left = self._open.get(peer, 0) - 1
        if left > 0:
            self._open[peer] = left
        else:
            self._open.pop(peer, None)
        if kind == "peer":
            self.counted -= 1

    def metrics(self) -> bytes:
        """The limits' figures in Prometheus' text format."""
        lines = [
            "# HELP dpvoip_web_connections_open Open connections to the web listener.",
            "# TYPE dpvoip_web_connections_open gauge",
            f"dpvoip_web_connections_open {self.open}",
            "# HELP dpvoip_web_connections_refused_total Connections closed at once: a "
            "connection limit was reached.",
            "# TYPE dpvoip_web_connections_refused_total counter",
            *(f'dpvoip_web_connections_refused_total{{limit="{limit}"}} {count}'
              for limit, count in self.refused.items()),
        ]
        return ("\n".join(lines) + "\n").encode("ascii")


class DpvoipSite(server.Site):
    """A Site with dpvoip's limits, a secret-free access log and in-flight tracking."""

    protocol = BoundedChannel  # type: ignore[assignment]
    requestFactory = BoundedRequest
    noisy = False

    def __init__(self, resource: IResource, settings: WebSettings, clock: IReactorTime,
                 proxies: Sequence[Network] = (), reserved: Sequence[Network] = ()) -> None:
        super().__init__(resource, timeout=settings.idle_timeout, reactor=clock)
        self.settings = settings
        self.clock = clock
        self.displayTracebacks = False
        self._in_flight: EmptyableSet[BoundedRequest] = EmptyableSet()
        self.limits = ConnectionLimits(settings.max_connections,
                                       settings.max_connections_per_peer, proxies, reserved)
        self._refusals_logged = 0.0

    def buildProtocol(self, addr: Any) -> Any:
        peer = peer_host(addr)
        limit = self.limits.admit(peer)
        if limit is not None:
            self._log_refusal(peer, limit)
            return None  # the port closes the socket at once
        channel = super().buildProtocol(addr)
        channel.maxHeaders = self.settings.max_headers
        return channel

    def _log_refusal(self, peer: str, limit: str) -> None:
        """One warning a minute at most: a flood must not become a flood of log lines."""
        now = self.clock.seconds()
        if now - self._refusals_logged >= 60.0:
            self._refusals_logged = now
            refused = self.limits.refused
            log.warn("connection from {peer} closed: {limit} connection limit reached "
                     "({per_peer} per-peer and {total} total refusals so far)",
                     peer=peer or "-", limit=limit.replace("_", "-"),
                     per_peer=refused["per_peer"], total=refused["total"])

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
            ACCESS_FORMAT,
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


#: The address in the line the daemon logs once it listens on TCP (``_announce``): what
#: the tests and benches that start it read its port from.
LISTENING = re.compile(r"listening on (http://[0-9.]+:\d+)")


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
