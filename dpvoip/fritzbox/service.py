"""Keeping the Fritz!Boxes connected, and telling other processes how they are.

``FritzBoxService`` is Twisted's ``ClientService``: it connects to the box and reconnects
forever with capped, jittered exponential back-off (a timer, no polling: the CPU is idle
while it waits), with TCP keepalive set on every connection so that a dead path is noticed
in about 90 s. ``BoxStatusReporter`` is a ``TimerService`` that writes every box's status
to the database for ``dpvoip check``.
"""

from __future__ import annotations

import errno
from collections.abc import Callable, Iterator, Sequence
from datetime import datetime
from functools import partial
from typing import Any, Protocol

from twisted.application.internet import TimerService
from twisted.application.service import Service
from twisted.internet import error
from twisted.internet.defer import CancelledError, Deferred, maybeDeferred, succeed
from twisted.internet.endpoints import HostnameEndpoint
from twisted.internet.interfaces import (
    IDelayedCall,
    IProtocol,
    IProtocolFactory,
    IReactorTime,
    IStreamClientEndpoint,
)
from twisted.internet.protocol import Factory
from twisted.internet.task import LoopingCall, deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from dpvoip.core.errors import summary
from dpvoip.fritzbox.box import FritzBox
from dpvoip.fritzbox.leadership import (
    Action,
    Hold,
    Lead,
    Leadership,
    LeaseRules,
    Prior,
    Resume,
    Role,
)
from dpvoip.internals import QuietClientService
from dpvoip.protocols.callmonitor import CallMonitorProtocol
from dpvoip.reconnecting import keepalive, retry_policy
from dpvoip.store.boxes import report_boxes
from dpvoip.store.database import Store
from dpvoip.store.leases import LeaseConnection, application_name
from dpvoip.store.pool import backoff_delays

log = Logger(namespace="dpvoip.fritzbox")  # the box's lines, wherever written from

class BoxStatusReporter(TimerService):
    """Writes every box's state to ``dpvoip.box_status`` every few seconds (the first time
    at start), so that ``dpvoip check`` (another process) can tell. Best effort: a failed
    write is tried again at the next tick; while one is still under way (a slow database)
    the tick is skipped, so that writes never pile up, and stopping never waits for it
    (the store drains its writes at shutdown)."""

    name = "box status"

    def __init__(self, boxes: list[FritzBox], store: Store, clock: IReactorTime,
                 every: float = 5.0, leads: Callable[[str], bool] = lambda box: True) -> None:
        super().__init__(every, self._tick)
        self.clock = clock
        self._boxes = boxes
        self._store = store
        self._leads = leads  # only a box's leader reports it (a standby would say "down")
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
        led = [(box.status, box.tracker.open_calls) for box in self._boxes
               if self._leads(box.settings.name)]
        if not led:
            return succeed(None)
        return report_boxes(self._store, led).addErrback(lambda _: None)


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
        self._starts = 0

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
        # so that no call is missed; the calls left open by the last run (or, started
        # again as the box's new leader, by the last leader) are closed once the database
        # is there and what the last run spooled has been replayed.
        super().startService()
        self._starts += 1
        start, began = self._starts, self.box.now()  # the box is read from now on
        closing = self._prepared().addCallback(
            lambda _: Deferred.fromCoroutine(self._close_left_open(start, began)))
        closing.addErrback(lambda f: log.failure("box {box}: could not start", f,
                                                 box=self.box.settings.name))

    async def _close_left_open(self, start: int, began: datetime) -> None:
        if not self.running or start != self._starts:  # stopped, or started again since
            return
        try:
            closed = await self.box.close_left_open(began)
        except Exception as error:  # the database went away; the calls stay for next time
            log.warn("box {box}: could not close the calls left open: {error}",
                     box=self.box.settings.name, error=summary(error))
            closed = 0
        if closed:
            log.info("box {box}: closed {n} calls left open by the last run",
                     box=self.box.settings.name, n=closed)


# -- one reader per box: the lead (fritzbox.leadership) carried out --------------------------


class Reader(Protocol):
    """What reads a box while this instance leads it: its CallMonitor connection
    (``FritzBoxService``) and its call list (``ReconcileService``)."""

    running: int | bool

    def startService(self) -> None: ...
    def stopService(self) -> Deferred[None] | None: ...


class LedBox:
    """A box and what reads it, started and stopped as its lead comes and goes.

    Starts and stops follow each other in order (a stop still under way is waited for
    before the next start), so that a box dropped and led again in one breath never
    has two connections."""

    def __init__(self, box: FritzBox, monitor: Reader, clock: IReactorTime,
                 call_list: Reader | None = None) -> None:
        self.box = box
        self.name = box.settings.name
        self._readers: list[Reader] = [monitor] + ([call_list] if call_list else [])
        self._call_list = call_list
        self._clock = clock
        self._order: Deferred[None] = succeed(None)

    def _then(self, step: Callable[[], Deferred[None] | None]) -> Deferred[None]:
        def run(_: object) -> Deferred[None] | None:
            return step()

        order: Deferred[Any] = self._order.addCallback(run)
        self._order = order.addErrback(
            lambda f: log.failure("box {box}: start or stop failed", f, box=self.name))
        return self._order

    def start(self) -> None:
        def start() -> None:
            for reader in self._readers:
                if not reader.running:
                    reader.startService()

        self._then(start)

    def hold(self) -> None:
        self.box.hold()
        if self._call_list is not None and self._call_list.running:
            self._call_list.stopService()

    def resume(self) -> None:
        """Read the held lines and go on; whatever reads the box and is not running (the
        call list, stopped while held; a connection whose lead was held before it began)
        starts."""
        self.box.resume()
        self.start()

    def drop(self) -> Deferred[None]:
        """Not this instance's box any more: no line of it is read from now on; the
        services stop on the reactor's next turn (never inside a ``ClientService``
        callback: its state machine is not reentrant)."""
        self.box.drop()

        async def stop() -> None:
            await deferLater(self._clock, 0, lambda: None)
            for reader in reversed(self._readers):
                if reader.running:
                    await maybeDeferred(reader.stopService)

        return self._then(lambda: Deferred.fromCoroutine(stop()))


class BoxLeadership(Service):
    """Leads the boxes this instance may read, through one lease connection.

    Every ``heartbeat_seconds`` (one timer): a statement on the lease connection that
    asks for the locks not held and proves the session alive; the answer and the time
    go to the state machine, whose actions are carried out here. A lost connection is
    made again with back-off, forever. Every line of a box asks ``may_read`` first.
    Stopping drops every box before the locks are released (the connection closed)."""

    name = "fritzbox leadership"

    def __init__(self, boxes: Sequence[LedBox], lease: LeaseConnection, clock: IReactorTime,
                 prepared: Callable[[], Deferred[None]], rules: LeaseRules | None = None,
                 reconnect: Callable[[], Iterator[float]] = lambda: backoff_delays(0.5, 5.0)
                 ) -> None:
        self.boxes = {led.name: led for led in boxes}
        self.lease = lease
        self.clock = clock
        self.machine = Leadership(lease.instance, list(self.boxes), rules or LeaseRules())
        self._prepared = prepared
        self._reconnect = reconnect
        self._delays: Iterator[float] = reconnect()
        self._next_connect = 0.0
        self._busy: Deferred[None] | None = None
        self._loop: LoopingCall | None = None
        self._leads: dict[str, IDelayedCall] = {}
        self._held_terms: dict[str, str | None] = {}  # the term of each box's lead
        lease.on_lost = self._lost
        for name, led in self.boxes.items():
            led.box.gate = partial(self.may_read, name)

    # -- questions (a box's gate, /readyz, /metrics, the status reporter) -------------------

    def may_read(self, box: str) -> bool:
        now = self.clock.seconds()
        self._apply(self.machine.tick(now))
        return self.machine.may_read(box, now)

    def leads(self, box: str) -> bool:
        return self.machine.leads(box)

    def describe(self, box: str) -> dict[str, Any]:
        """The box's lead as /readyz and /metrics show it: as of now (a lease that ran
        out while the process was frozen is not shown as a lead)."""
        self._apply(self.machine.tick(self.clock.seconds()))
        lease = self.machine.lease[box]
        return {"leader": lease.role is Role.LEADING, "role": lease.role.value,
                "led_by": lease.leader or None, "instance": self.lease.instance,
                "leads": lease.leads, "takeovers": lease.takeovers, "losses": lease.losses}

    # -- the service -------------------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        waiting = self._prepared()
        waiting.addCallback(lambda _: self._begin())
        waiting.addErrback(lambda f: log.failure("box leadership not started", f))

    def _begin(self) -> None:
        if not self.running or self._loop is not None:
            return
        self._loop = LoopingCall(self._beat)
        self._loop.clock = self.clock
        self._loop.start(self.machine.rules.heartbeat_seconds, now=True)

    async def _stop(self) -> None:
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None
        for timer in self._leads.values():
            if timer.active():
                timer.cancel()
        self._leads.clear()
        drops = [self.boxes[action.box].drop() for action in self.machine.stopping()]
        for dropping in drops:
            await dropping
        if self._busy is not None:
            busy = self._busy
            busy.cancel()
        self.lease.close()  # the locks go with the session: a standby takes over

    def stopService(self) -> Deferred[None]:
        super().stopService()
        return Deferred.fromCoroutine(self._stop())

    # -- the heartbeat ---------------------------------------------------------------------

    def _beat(self) -> None:
        now = self.clock.seconds()
        self._apply(self.machine.tick(now))
        if self._busy is not None:
            return  # the last one has not answered: the lease's deadline decides
        if self.lease.connected:
            work = self._heartbeat(now)
        elif now >= self._next_connect:
            work = self._connect()
        else:
            return
        busy = self._busy = Deferred.fromCoroutine(work)

        def done(_: object) -> None:
            if self._busy is busy:
                self._busy = None

        busy.addBoth(done)

    async def _connect(self) -> None:
        try:
            await self.lease.connect()
        except Exception as error:
            self._next_connect = self.clock.seconds() + next(self._delays)
            if not self.machine.unreachable:
                log.warn("box leadership: cannot reach PostgreSQL ({error}); trying again",
                         error=summary(error))
            self._apply(self.machine.cannot_connect(self.clock.seconds()))
            return
        self._delays = self._reconnect()
        log.info("box leadership: lease connection up as {name}",
                 name=application_name(self.lease.instance))
        await self._heartbeat(self.clock.seconds())

    async def _heartbeat(self, sent_at: float) -> None:
        try:
            tried = await self.lease.heartbeat(self.machine.to_try())
        except CancelledError:
            return
        except Exception as error:
            if self.running:
                self._lost(summary(error))
            return
        if not self.running:
            return
        granted = {box: self._prior(box, term) for box, term in tried.granted.items()}
        self._apply(self.machine.answered(sent_at, self.clock.seconds(), granted,
                                          tried.refused))
        for box in granted:  # the term written now is the one a later loss compares
            if self.machine.lease[box].locked:
                self._held_terms[box] = self.lease.last_term(box)

    def _prior(self, box: str, term: str | None) -> Prior:
        if term is None:
            return Prior.NOBODY
        if term == self._held_terms.get(box):
            return Prior.SAME_TERM
        if term.rsplit(" ", 1)[0] == self.lease.instance:
            return Prior.THIS_INSTANCE
        return Prior.OTHER

    def _lost(self, why: str) -> None:
        self.lease.close()
        self._next_connect = self.clock.seconds()
        if self.running:
            log.warn("box leadership: lease connection lost ({why})", why=why)
        self._apply(self.machine.failed(self.clock.seconds(), why))

    # -- the actions ---------------------------------------------------------------------------

    def _apply(self, actions: Sequence[Action]) -> None:
        for action in actions:
            led = self.boxes[action.box]
            if isinstance(action, Lead):
                log.info("box {box}: this instance ({instance}) leads it{after}",
                         box=action.box, instance=self.lease.instance,
                         after=f" in {action.after:g} s (the last leader's lease runs"
                               " out first)" if action.after else "")
                self._leads[action.box] = self.clock.callLater(
                    action.after, self._lead, action.box)
            elif isinstance(action, Hold):
                log.warn("box {box}: reading held ({why})", box=action.box, why=action.why)
                led.hold()
            elif isinstance(action, Resume):
                log.info("box {box}: reading on ({why})", box=action.box, why=action.why)
                if action.box in self._leads:  # still settling: its timer starts it
                    led.box.resume()
                else:
                    led.resume()
            else:
                timer = self._leads.pop(action.box, None)
                if timer is not None and timer.active():
                    timer.cancel()
                log.warn("box {box}: not read by this instance any more ({why})",
                         box=action.box, why=action.why)
                led.drop()

    def _lead(self, box: str) -> None:
        self._leads.pop(box, None)
        if self.running and self.machine.leads(box):
            self.boxes[box].start()
