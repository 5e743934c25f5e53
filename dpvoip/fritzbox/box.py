"""One Fritz!Box: its connection, its call tracker, its state for /readyz.

``FritzBox`` joins the pure parts (parser, tracker) to the ingest entry point and keeps
the box's status. ``FritzBoxService`` is a ``ClientService`` that connects to the box and
reconnects forever with capped, jittered exponential back-off (a timer, no polling: the
CPU is idle while it waits), with TCP keepalive set on every connection so that a dead
path is noticed in about 90 s.
"""

from __future__ import annotations

import random
import socket
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol
from zoneinfo import ZoneInfo

from twisted.application.internet import ClientService
from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import HostnameEndpoint
from twisted.internet.interfaces import IProtocol, IReactorTime
from twisted.internet.protocol import Factory
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from dpvoip.calls.ingest import Origin
from dpvoip.config import FritzBoxSettings
from dpvoip.core.happenings import Happening
from dpvoip.core.numbers import Dialling, normalise
from dpvoip.fritzbox.parser import BadLine, parse
from dpvoip.fritzbox.tracker import BoxRules, CallTracker
from dpvoip.protocols.callmonitor import CallMonitorProtocol

log = Logger(namespace="dpvoip.fritzbox.box")

#: TCP keepalive: first probe after 60 s of silence, then every 10 s, dead after 3.
KEEPALIVE_IDLE, KEEPALIVE_INTERVAL, KEEPALIVE_COUNT = 60, 10, 3
#: A box clock this far from ours is worth a warning (wrong zone, or just rebooted).
CLOCK_SKEW_WARNING = 300.0


class Recorder(Protocol):
    """What a box needs of the ingest entry point (the real ``Ingest``, or a test's fake)."""

    def submit(self, happening: Happening, origin: Origin) -> Deferred[None]: ...

    async def close_open_calls(self, box: str, reason: str, at: datetime,
                               started_before: datetime | None = None) -> int: ...


@dataclass
class BoxStatus:
    name: str
    host: str
    port: int
    connected: bool = False
    since: datetime | None = None
    last_line_at: datetime | None = None
    reconnects: int = 0
    connections: int = 0
    lines: int = 0
    bad_lines: int = 0
    long_lines: int = 0
    orphans_closed: int = 0

    def as_json(self, open_calls: int) -> dict[str, Any]:
        return {
            "name": self.name, "host": self.host, "port": self.port,
            "connected": self.connected,
            "since": self.since.isoformat() if self.since else None,
            "last_line": self.last_line_at.isoformat() if self.last_line_at else None,
            "reconnects": self.reconnects, "lines": self.lines, "bad_lines": self.bad_lines,
            "open_calls": open_calls,
        }


def rules_for(settings: FritzBoxSettings, own_numbers: frozenset[str]) -> BoxRules:
    where = Dialling(settings.country, settings.area_code)

    def is_own(raw: str) -> bool:
        number = normalise(raw, where)
        return number is not None and number in own_numbers

    return BoxRules(
        name=settings.name,
        zone=ZoneInfo(settings.timezone),
        machine_extensions=frozenset(settings.answering_machine_extensions),
        blocked_within=settings.blocked_threshold_seconds,
        is_own_number=is_own,
    )


class FritzBox:
    """A box's lines become happenings for the ingest; its status is kept here."""

    def __init__(self, settings: FritzBoxSettings, ingest: Recorder, clock: IReactorTime,
                 own_numbers: frozenset[str]) -> None:
        self.settings = settings
        self._ingest = ingest
        self._clock = clock
        self.rules = rules_for(settings, own_numbers)
        self.origin = Origin(settings.name, Dialling(settings.country, settings.area_code),
                             self.rules)
        self.tracker = CallTracker(self.rules)
        self.status = BoxStatus(settings.name, settings.host, settings.port)
        self.pending: set[Deferred[None]] = set()
        self.born = self._now()  # calls older than this are the last run's
        self.connection: CallMonitorProtocol | None = None

    def _now(self) -> datetime:
        return datetime.fromtimestamp(self._clock.seconds(), UTC)

    def _submit(self, happenings: list[Any]) -> None:
        for happening in happenings:
            done = self._ingest.submit(happening, self.origin)
            self.pending.add(done)

            def settle(result: object, d: Deferred[None] = done, h: Any = happening) -> None:
                self.pending.discard(d)
                if isinstance(result, Failure):
                    self._failed(result, h)

            done.addBoth(settle)

    def _failed(self, failure: Failure, happening: Any) -> None:
        log.failure("box {box}: could not record {what}", failure, box=self.settings.name,
                    what=type(happening).__name__)

    async def close_left_open(self) -> int:
        """Close the calls of this box the last run left active: those that started before
        this run did (the box is already connected, its new calls are this run's)."""
        return await self._ingest.close_open_calls(self.settings.name, "dpvoip restarted",
                                                   self._now(), self.born)

    # -- from the protocol -----------------------------------------------------------------

    def connection_made(self, protocol: CallMonitorProtocol) -> None:
        status = self.status
        if status.connections:
            status.reconnects += 1
        status.connections += 1
        self.connection = protocol
        status.connected = True
        status.since = self._now()
        log.info("box {box}: connected to {host}:{port}", box=self.settings.name,
                 host=self.settings.host, port=self.settings.port)
        # Calls open when the connection went down can no longer be followed.
        orphans = self.tracker.close_all("monitor connection lost", self._now())
        status.orphans_closed += len(orphans)
        self._submit(orphans)

    def line_received(self, text: str) -> None:
        self.status.lines += 1
        self.status.last_line_at = self._now()
        if not text.strip():
            return
        try:
            event = parse(text)
        except BadLine as error:
            self.status.bad_lines += 1
            log.warn("box {box}: skipped a bad line ({error}): {line!r}",
                     box=self.settings.name, error=str(error), line=text[:120])
            return
        skew = abs(self.tracker.utc(event.at).timestamp() - self._clock.seconds())
        if skew > CLOCK_SKEW_WARNING:
            log.warn("box {box}: its clock is {minutes:.0f} min away from ours (time zone "
                     "{zone}?)", box=self.settings.name, minutes=skew / 60,
                     zone=self.settings.timezone)
        self._submit(self.tracker.feed(event))

    def line_too_long(self) -> None:
        self.status.long_lines += 1
        log.warn("box {box}: a line longer than the limit; dropping the connection",
                 box=self.settings.name)

    def connection_lost(self, reason: Failure) -> None:
        self.connection = None
        self.status.connected = False
        self.status.since = self._now()
        log.info("box {box}: connection lost ({why})", box=self.settings.name,
                 why=reason.getErrorMessage())


class BoxStatusReporter(Service):
    """Writes every box's state to ``dpvoip.box_status`` every few seconds, so that
    ``dpvoip check`` (another process) can tell. Best effort: a failed write is retried
    at the next tick."""

    name = "box status"

    def __init__(self, boxes: list[FritzBox], store: Any, clock: IReactorTime,
                 every: float = 5.0) -> None:
        self._boxes = boxes
        self._store = store
        self._clock = clock
        self._every = every
        self._loop: LoopingCall | None = None

    def startService(self) -> None:
        super().startService()
        if self._boxes:
            self._loop = LoopingCall(self.report)
            self._loop.clock = self._clock
            self._loop.start(self._every, now=False)

    def report(self) -> Deferred[None]:
        async def write(cursor: Any) -> None:
            for box in self._boxes:
                s = box.status
                await cursor.execute(
                    "INSERT INTO dpvoip.box_status (box, host, port, connected, since,"
                    " last_line_at, reconnects, lines, bad_lines, open_calls, reported_at)"
                    " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, now())"
                    " ON CONFLICT (box) DO UPDATE SET host = EXCLUDED.host, port ="
                    " EXCLUDED.port, connected = EXCLUDED.connected, since = EXCLUDED.since,"
                    " last_line_at = EXCLUDED.last_line_at, reconnects = EXCLUDED.reconnects,"
                    " lines = EXCLUDED.lines, bad_lines = EXCLUDED.bad_lines,"
                    " open_calls = EXCLUDED.open_calls, reported_at = now()",
                    (s.name, s.host, s.port, s.connected, s.since, s.last_line_at,
                     s.reconnects, s.lines, s.bad_lines, box.tracker.open_calls),
                )

        written: Deferred[None] = self._store.write(write)
        written.addErrback(lambda _: None)
        return written

    def stopService(self) -> Deferred[None] | None:
        super().stopService()
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        return None


def keepalive(protocol: IProtocol) -> None:
    """prepareConnection: short TCP keepalive timers on the box's socket."""
    transport: Any = getattr(protocol, "transport", None)
    get_handle = getattr(transport, "getHandle", None)
    handle = get_handle() if get_handle is not None else None
    if handle is None or not hasattr(handle, "setsockopt"):
        return
    handle.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for option, value in (("TCP_KEEPIDLE", KEEPALIVE_IDLE),
                          ("TCP_KEEPINTVL", KEEPALIVE_INTERVAL),
                          ("TCP_KEEPCNT", KEEPALIVE_COUNT)):
        if hasattr(socket, option):
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


class FritzBoxService(ClientService):
    """Keeps one box connected, from the moment the database is prepared."""

    def __init__(self, box: FritzBox, reactor: Any, prepared: Callable[[], Deferred[None]],
                 endpoint: Any = None, retry: Callable[[int], float] | None = None) -> None:
        settings = box.settings
        endpoint = endpoint or HostnameEndpoint(reactor, settings.host, settings.port,
                                                timeout=10)
        factory = Factory.forProtocol(
            lambda: CallMonitorProtocol(box, reactor, settings.newline_keepalive_seconds)
        )
        super().__init__(endpoint, factory, retryPolicy=retry or retry_policy(),
                         clock=reactor, prepareConnection=keepalive)
        self.box = box
        self.name = f"fritzbox {settings.name}"
        self._prepared = prepared
        self._reactor = reactor
        self._begun = False

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
                     box=self.box.settings.name, error=str(error) or type(error).__name__)
            closed = 0
        if closed:
            log.info("box {box}: closed {n} calls left open by the last run",
                     box=self.box.settings.name, n=closed)

    def stopService(self) -> Deferred[None]:
        stopped: Deferred[None] = super().stopService()
        return stopped
