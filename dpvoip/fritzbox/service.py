"""Keeping the Fritz!Boxes connected, and telling other processes how they are.

``FritzBoxService`` is Twisted's ``ClientService``: it connects to the box and reconnects
forever with capped, jittered exponential back-off (a timer, no polling: the CPU is idle
while it waits), with TCP keepalive set on every connection so that a dead path is noticed
in about 90 s. ``BoxStatusReporter`` is a ``TimerService`` that writes every box's status
to the database for ``dpvoip check``.
"""

from __future__ import annotations

import errno
import random
import socket
from collections.abc import Callable
from typing import Any

from twisted.application.internet import TimerService
from twisted.internet import error
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.endpoints import HostnameEndpoint
from twisted.internet.interfaces import (
    IProtocol,
    IProtocolFactory,
    IReactorTime,
    IStreamClientEndpoint,
    ISystemHandle,
    ITCPTransport,
)
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from dpvoip.core.errors import summary
from dpvoip.fritzbox.box import FritzBox
from dpvoip.internals import QuietClientService
from dpvoip.protocols.callmonitor import CallMonitorProtocol
from dpvoip.store.boxes import report_boxes
from dpvoip.store.database import Store

log = Logger(namespace="dpvoip.fritzbox")  # the box's lines, wherever written from

#: TCP keepalive: first probe after 60 s of silence, then every 10 s, dead after 3.
KEEPALIVE_IDLE, KEEPALIVE_INTERVAL, KEEPALIVE_COUNT = 60, 10, 3


class BoxStatusReporter(TimerService):
    """Writes every box's state to ``dpvoip.box_status`` every few seconds (the first time
    at start), so that ``dpvoip check`` (another process) can tell. Best effort: a failed
    write is tried again at the next tick; while one is still under way (a slow database)
    the tick is skipped, so that writes never pile up, and stopping never waits for it
    (the store drains its writes at shutdown)."""

    name = "box status"

    def __init__(self, boxes: list[FritzBox], store: Store, clock: IReactorTime,
                 every: float = 5.0) -> None:
        super().__init__(every, self._tick)
        self.clock = clock
        self._boxes = boxes
        self._store = store
        self._writing: Deferred[None] | None = None

    def _tick(self) -> None:
        if not self._boxes or self._writing is not None:
            return
        writing = self._writing = self.report()

        def done(_: object) -> None:
            if self._writing is writing:
                self._writing = None

        writing.addBoth(done)

    def report(self) -> Deferred[None]:
        """Write every box's status now; fires when written (or failed: not retried)."""
        written = report_boxes(self._store,
                               [(box.status, box.tracker.open_calls) for box in self._boxes])
        return written.addErrback(lambda _: None)


def keepalive(protocol: Any) -> None:
    """prepareConnection: short TCP keepalive timers on the box's socket.

    ``protocol`` is what ``ClientService`` hands over (its proxy of the CallMonitor
    protocol). A transport that is not TCP (a test's ``StringTransport``) has no keepalive
    to set."""
    transport = protocol.transport
    if not ITCPTransport.providedBy(transport):
        return
    transport.setTcpKeepAlive(True)
    if not ISystemHandle.providedBy(transport):
        return
    handle = transport.getHandle()
    if not isinstance(handle, socket.socket):
        return
    for option, value in (("TCP_KEEPIDLE", KEEPALIVE_IDLE),
                          ("TCP_KEEPINTVL", KEEPALIVE_INTERVAL),
                          ("TCP_KEEPCNT", KEEPALIVE_COUNT)):
        if hasattr(socket, option):  # Linux has all three; other systems some
            handle.setsockopt(socket.IPPROTO_TCP, getattr(socket, option), value)


def retry_policy(initial: float = 1.0, cap: float = 60.0,
                 random: Callable[[], float] = random.random) -> Callable[[int], float]:
    """Exponential back-off that never gives up: ``initial`` doubled at each failure, never
    more than ``cap``. The jitter (a quarter of the delay, so that boxes behind one router
    do not retry in step) is taken off the delay, never added: the cap is the cap."""

    def delay(attempt: int) -> float:  # ClientService counts failed attempts from 1
        base = min(initial * 2.0 ** (min(max(attempt, 1), 64) - 1), cap)
        return base * (0.75 + 0.25 * random())

    return delay


def why_not_connected(failure: BaseException | None, host: str, port: int
                      ) -> tuple[str, str]:
    """(kind, what to tell a person) for a failed connection attempt to a box: the kind
    groups repeated failures (``core.log_budget.Outage``), the text says what to check."""
    if isinstance(failure, error.DNSLookupError | error.UnknownHostError):
        return "name not found", (f"the name {host} is not found (DNS): check the host, "
                                  "or give the box's IP address")
    if isinstance(failure, error.ConnectionRefusedError):
        return "refused", (f"connection refused: nothing listens on port {port} there "
                           "(the CallMonitor is off? dial #96*5* on a phone of the box)")
    if isinstance(failure, error.TimeoutError | error.TCPTimedOutError):
        return "timed out", ("no answer (timed out): a wrong address, or a firewall "
                             "drops the connection")
    if isinstance(failure, error.NoRouteError) or (
            isinstance(failure, error.ConnectError)
            and failure.osError in (errno.ENETUNREACH, errno.EHOSTUNREACH)):
        return "unreachable", f"network unreachable: no route to {host}"
    return ("failed" if failure is None else type(failure).__name__), summary(failure)


@implementer(IStreamClientEndpoint)
class _Reporting:
    """The box's endpoint, telling its service why an attempt failed (``ClientService``
    keeps the reason to itself)."""

    def __init__(self, endpoint: IStreamClientEndpoint,
                 failed: Callable[[Failure], None]) -> None:
        self._endpoint = endpoint
        self._failed = failed

    def connect(self, factory: IProtocolFactory) -> Deferred[IProtocol]:
        def report(failure: Failure) -> Failure:
            self._failed(failure)
            return failure

        attempt: Deferred[IProtocol] = self._endpoint.connect(factory)
        return attempt.addErrback(report)


class FritzBoxService(QuietClientService):
    """Keeps one box connected, from the moment the database is prepared.

    Why an attempt failed and when the next one is (``retrying in 0.8 s``) is the box's
    line (``FritzBox.connect_failed``), not Twisted's: the endpoint reports the failure,
    the retry policy the delay that follows it."""

    def __init__(self, box: FritzBox, reactor: Any, prepared: Callable[[], Deferred[None]],
                 endpoint: Any = None, retry: Callable[[int], float] | None = None) -> None:
        settings = box.settings
        endpoint = endpoint or HostnameEndpoint(reactor, settings.host, settings.port,
                                                timeout=10)
        factory = Factory.forProtocol(
            lambda: CallMonitorProtocol(box, reactor, settings.newline_keepalive_seconds)
        )
        factory.noisy = False  # no "Starting factory" / "Stopping factory" per attempt
        self._policy = retry or retry_policy()
        self._failure: Failure | None = None
        super().__init__(_Reporting(endpoint, self._attempt_failed), factory,
                         retryPolicy=self._retry, clock=reactor, prepareConnection=keepalive)
        self.box = box
        self.name = f"fritzbox {settings.name}"
        self._prepared = prepared
        self._begun = False

    def _attempt_failed(self, failure: Failure) -> None:
        if not failure.check(CancelledError, error.ConnectingCancelledError):  # stopping
            self._failure = failure

    def _retry(self, attempt: int) -> float:
        """The retry policy's delay; told with the reason when an attempt failed (not
        after a connection that was lost: the box has said so)."""
        delay = self._policy(attempt)
        failure, self._failure = self._failure, None
        if failure is not None:
            settings = self.box.settings
            kind, reason = why_not_connected(failure.value, settings.host, settings.port)
            self.box.connect_failed(kind, reason, delay)
        return delay

    def startService(self) -> None:
        # Connected at once, whether the database is there or not (events are spooled),
        # so that no call is missed; the last run's open calls are closed once the
        # database is there and what the last run spooled has been replayed.
        super().startService()
        closing = self._prepared().addCallback(
            lambda _: Deferred.fromCoroutine(self._close_left_open()))
        closing.addErrback(lambda f: log.failure("box {box}: could not start", f,
                                                 box=self.box.settings.name))

    async def _close_left_open(self) -> None:
        if not self.running or self._begun:
            return
        self._begun = True
        try:
            closed = await self.box.close_left_open()
        except Exception as error:  # the database went away; the calls stay for next time
            log.warn("box {box}: could not close the calls left open: {error}",
                     box=self.box.settings.name, error=summary(error))
            closed = 0
        if closed:
            log.info("box {box}: closed {n} calls left open by the last run",
                     box=self.box.settings.name, n=closed)
