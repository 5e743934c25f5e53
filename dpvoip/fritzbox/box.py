"""One Fritz!Box: its lines, its call tracker, its state for /readyz and ``dpvoip check``.

``FritzBox`` joins the pure parts (parser, tracker) to the ingest entry point and keeps
the box's status. Keeping it connected is ``fritzbox.service``'s work.

The box's dates are believed within ``clock_tolerance_seconds`` of dpvoip's clock. The
rule when they are not (written in docs/decisions.md, issue 14):

* a line dated further than the tolerance from its arrival (a box just rebooted, a wrong
  time zone, a forged line) is dated by its arrival, in the box's zone;
* a CONNECT or DISCONNECT dated before the start of its call (the box's clock stepped
  back) is dated by its arrival, and never before the call's start;

each such line counts in ``dates_replaced`` and warns (a few warnings a minute at most).
Bad lines, calls closed beyond the bound of open calls and happenings not recorded warn
the same way (``core.log_budget``); the counters count every one.

Every event also carries the time its line arrived, read here from the injected clock
(the reactor's; a ``Clock`` in tests): the tracker decides blocked or missed by it together
with the box's whole-second times (docs/decisions.md, issue 16). Lines of one TCP segment
are handled in one pass, so their arrivals are microseconds apart: a burst after a stall
shows a gap of about 0, which the tracker does not believe against the box's times.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any, Protocol, cast
from zoneinfo import ZoneInfo

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime, ITCPTransport
from twisted.logger import Logger
from twisted.python.failure import Failure

from dpvoip.calls.ingest import Origin
from dpvoip.config import FritzBoxSettings
from dpvoip.core.errors import summary
from dpvoip.core.happenings import Happening
from dpvoip.core.log_budget import LogBudget, Outage, more_like_this, seconds_text
from dpvoip.core.numbers import Dialling, normalise
from dpvoip.core.outcomes import Reason
from dpvoip.deferreds import EmptyableSet
from dpvoip.fritzbox.parser import BadLine, Connect, Disconnect, Event, parse
from dpvoip.fritzbox.tracker import BoxRules, CallTracker
from dpvoip.protocols.callmonitor import CallMonitorProtocol
from dpvoip.spool.durable import NotRecorded

log = Logger(namespace="dpvoip.fritzbox")


#: What a happening the box could not record is called in its log line.
_WHAT = {"Started": "a call's start", "Answered": "a call's answer",
         "Forwarded": "a call's forwarding", "Ended": "a call's end",
         "Unmatched": "a line of a call not seen starting"}


class Recorder(Protocol):
    """What a box needs of the ingest entry point (the real ``Ingest``, or a test's fake)."""

    def submit(self, happening: Happening, origin: Origin) -> Deferred[None]: ...

    async def close_open_calls(self, box: str, reason: Reason, at: datetime,
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
    calls_evicted: int = 0  # closed as interrupted: more than max_open_calls were open
    dates_replaced: int = 0  # lines dated by their arrival instead of the box's clock
    not_recorded: int = 0  # happenings neither committed nor spooled (spool or disk full)
    call_list: Reporting | None = None  # the box's TR-064 call list, when configured

    def as_json(self, open_calls: int) -> dict[str, Any]:
        return {
            "name": self.name, "host": self.host, "port": self.port,
            "connected": self.connected,
            "since": self.since.isoformat() if self.since else None,
            "last_line": self.last_line_at.isoformat() if self.last_line_at else None,
            "reconnects": self.reconnects, "lines": self.lines, "bad_lines": self.bad_lines,
            "open_calls": open_calls, "calls_evicted": self.calls_evicted,
            "dates_replaced": self.dates_replaced, "not_recorded": self.not_recorded,
            "call_list": self.call_list.as_json() if self.call_list else None,
        }


class Reporting(Protocol):
    """A part of the box that reports itself (``ReconcileStatus``)."""

    def as_json(self) -> dict[str, Any]: ...


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
        max_open=settings.max_open_calls,
    )


def origin_of(settings: FritzBoxSettings, own_numbers: frozenset[str]) -> Origin:
    """Where a box's happenings come from: its name, dialling context and rules (also what
    the spool's replay needs to apply a box's spooled happenings)."""
    rules = rules_for(settings, own_numbers)
    return Origin(settings.name, Dialling(settings.country, settings.area_code), rules)


class FritzBox:
    """A box's lines become happenings for the ingest; its status is kept here."""

    def __init__(self, settings: FritzBoxSettings, ingest: Recorder, clock: IReactorTime,
                 own_numbers: frozenset[str]) -> None:
        self.settings = settings
        self._ingest = ingest
        self._clock = clock
        self.origin = origin_of(settings, own_numbers)
        assert self.origin.rules is not None
        self.rules = self.origin.rules
        self.tracker = CallTracker(self.rules)
        self.status = BoxStatus(settings.name, settings.host, settings.port)
        #: The happenings handed to the ingest and not yet recorded (or failed).
        self.pending: EmptyableSet[Deferred[None]] = EmptyableSet()
        self.born = self._now()  # calls older than this are the last run's
        self.connection: CallMonitorProtocol | None = None
        self.budget = LogBudget()  # warnings of one kind: a few a minute
        self.outage = Outage()  # failed connection attempts: told calmly
        self._watchers: list[Callable[[bool], None]] = []
        #: Whether this instance may record the box's lines now (its lead: asked on
        #: every line, ``fritzbox.leadership``); always, when nothing leads boxes.
        self.gate: Callable[[], bool] = lambda: True
        #: Lines read while the gate was shut, with their arrival: read on ``resume``.
        self.held: list[tuple[str, float]] = []
        self._refused = 0  # connections refused by the gate whose loss is still to come

    def watch_connection(self, watcher: Callable[[bool], None]) -> None:
        """``watcher(True)`` at every (re)connect, ``watcher(False)`` at every loss (the
        call list is read after a reconnect)."""
        self._watchers.append(watcher)

    def _now(self) -> datetime:
        return datetime.fromtimestamp(self._clock.seconds(), UTC)

    def now(self) -> datetime:
        """The box's clock's "now" (the injected one), as an aware datetime."""
        return self._now()

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
        what = _WHAT.get(type(happening).__name__, type(happening).__name__)
        if failure.check(NotRecorded):
            self.status.not_recorded += 1
            # summary of the error itself: its type's name when its text is empty
            self._warn("not recorded", "box {box}: {what} was not recorded ({error})",
                       level="critical", what=what, error=summary(failure.value))
            return
        write, held = self.budget.allow("record failed", self._clock.seconds())
        if write:
            log.failure("box {box}: could not record {what}{more}", failure,
                        box=self.settings.name, what=what,
                        more=more_like_this(held, self.budget.window))

    def _warn(self, topic: str, text: str, level: str = "warn", **fields: Any) -> None:
        """A line about ``topic``, a few a minute at most (with how many were held back)."""
        write, held = self.budget.allow(topic, self._clock.seconds())
        if write:
            emit = log.critical if level == "critical" else log.warn
            emit(text + "{more}", box=self.settings.name,
                 more=more_like_this(held, self.budget.window), **fields)

    def settled(self) -> Deferred[None]:
        """Fires once no happening handed to the ingest is still being recorded."""
        return self.pending.when_empty()

    async def close_left_open(self, started_before: datetime | None = None) -> int:
        """Close the calls of this box the last run (or the last leader) left active:
        those that started before this run did, or before ``started_before`` (when this
        instance began leading the box; its new calls are its own)."""
        return await self._ingest.close_open_calls(
            self.settings.name, Reason.RESTARTED, self._now(),
            self.born if started_before is None else started_before)

    # -- the lead (fritzbox.leadership): hold, resume, drop ------------------------------------

    def hold(self) -> None:
        """Record nothing more for now: the connection stops reading (its lines wait in
        the socket; a line already read waits in ``held``)."""
        if self.connection is not None:
            self.connection.pauseProducing()

    def resume(self) -> None:
        """Record the held lines (with the time they arrived), then read on."""
        held, self.held = self.held, []
        for text, arrived in held:
            self._line(text, arrived)
        if self.connection is not None and not self.held:
            self.connection.resumeProducing()

    def drop(self) -> None:
        """Another instance leads the box: forget the held lines, drop the connection at
        once (none of its lines is read any more)."""
        self.held = []
        if self.connection is not None and self.connection.transport is not None:
            cast(ITCPTransport, self.connection.transport).abortConnection()

    # -- from the protocol -----------------------------------------------------------------

    def connection_made(self, protocol: CallMonitorProtocol) -> None:
        if not self.gate():  # connected as the lead was lost: read nothing from it
            self._refused += 1
            if protocol.transport is not None:
                cast(ITCPTransport, protocol.transport).abortConnection()
            return
        status = self.status
        if status.connections:
            status.reconnects += 1
        status.connections += 1
        self.connection = protocol
        status.connected = True
        status.since = self._now()
        over = self.outage.ended(self._clock.seconds())
        if over is None:
            log.info("box {box}: connected to {address}", box=self.settings.name,
                     address=self.address, host=self.settings.host, port=self.settings.port)
        else:
            log.info("box {box}: connected to {address} {again}after {attempts} failed "
                     "attempts in {lasted} (the last: {kind})", box=self.settings.name,
                     address=self.address, host=self.settings.host, port=self.settings.port,
                     again="again " if status.connections > 1 else "",
                     attempts=over.attempts, lasted=seconds_text(over.lasted),
                     kind=over.kind)
        # Calls open when the connection went down can no longer be followed.
        orphans = self.tracker.close_all(Reason.LINK_LOST, self._now())
        status.orphans_closed += len(orphans)
        self._submit(orphans)
        for watcher in self._watchers:
            watcher(True)

    def line_received(self, text: str) -> None:
        arrived = self._clock.seconds()
        if self.held or not self.gate():  # not (or not surely) this instance's to read
            self.held.append((text, arrived))
            self.hold()
            return
        self._line(text, arrived)

    def _line(self, text: str, arrived: float) -> None:
        self.status.lines += 1
        self.status.last_line_at = datetime.fromtimestamp(arrived, UTC)
        if not text.strip():
            return
        try:
            event = parse(text)
        except BadLine as error:
            self.status.bad_lines += 1
            self._warn("bad line", "box {box}: skipped a bad line ({error}): {line!r}",
                       error=str(error), line=text[:120])
            return
        event = self._dated(replace(event, arrived=arrived))
        evicted = self.tracker.evicted
        happenings = self.tracker.feed(event)
        if self.tracker.evicted != evicted:
            self.status.calls_evicted += self.tracker.evicted - evicted
            self._warn("evicted", "box {box}: more than {limit} calls open at once; the "
                       "oldest closed as interrupted", limit=self.rules.max_open)
        self._submit(happenings)

    def _dated(self, event: Event) -> Event:
        """The event with the date the rule gives it (the module's docstring)."""
        arrived = event.arrived if event.arrived is not None else self._clock.seconds()
        local = datetime.fromtimestamp(arrived, self.rules.zone).replace(tzinfo=None)
        skew = self.tracker.utc(event.at).timestamp() - arrived
        tolerance = self.settings.clock_tolerance_seconds
        if tolerance and abs(skew) > tolerance:
            self.status.dates_replaced += 1
            self._warn("clock", "box {box}: its clock is {minutes:.0f} min away from ours "
                       "(time zone {zone}?): the line is dated by its arrival",
                       minutes=skew / 60, zone=self.settings.timezone)
            event = replace(event, at=local)
        if isinstance(event, Connect | Disconnect):
            started = self.tracker.started_local(event.conn_id)
            if started is not None and event.at < started:
                self.status.dates_replaced += 1
                self._warn("before start", "box {box}: a {kind} dated before its call "
                           "started: dated by its arrival", kind=type(event).__name__.upper())
                event = replace(event, at=max(local, started))
        return event

    def line_too_long(self) -> None:
        self.status.long_lines += 1
        log.warn("box {box}: a line longer than the limit; dropping the connection",
                 box=self.settings.name)

    def connect_failed(self, kind: str, reason: str, delay: float) -> None:
        """A connection attempt failed (``kind``: ``name not found``, ``refused``, ...;
        ``reason``: what to tell a person); the next one is in ``delay`` seconds. The
        first failure of a kind is told at once, repeated ones at most once a minute
        with how many failed meanwhile (``core.log_budget.Outage``)."""
        failing = self.outage.failed(kind, self._clock.seconds())
        if failing is None:
            return
        fields: dict[str, Any] = dict(
            box=self.settings.name, address=self.address, host=self.settings.host,
            port=self.settings.port, kind=kind, reason=reason,
            retry=seconds_text(delay), retry_seconds=round(delay, 1))
        if failing.first:
            log.warn("box {box}: cannot connect to {address}: {reason}; retrying in {retry}",
                     **fields)
        else:
            log.warn("box {box}: still cannot connect to {address}: {reason} ({unsaid} "
                     "failed attempts in the last {span}); retrying in {retry}",
                     unsaid=failing.unsaid, span=seconds_text(failing.span), **fields)

    @property
    def address(self) -> str:
        """``host:port`` as a person types it (an IPv6 address in brackets)."""
        host = self.settings.host
        if ":" in host and not host.startswith("["):
            host = f"[{host}]"
        return f"{host}:{self.settings.port}"

    def connection_lost(self, reason: Failure) -> None:
        if self._refused:  # the connection refused at connection_made: never read
            self._refused -= 1
            return
        self.connection = None
        self.status.connected = False
        self.status.since = self._now()
        log.info("box {box}: connection to {address} lost ({why})", box=self.settings.name,
                 address=self.address, why=summary(reason.value))
        for watcher in self._watchers:
            watcher(False)
