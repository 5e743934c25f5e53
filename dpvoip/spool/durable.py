"""The ingest entry point made durable: committed to PostgreSQL, or spooled to disk first.

Every event goes to the ingest. When PostgreSQL is unreachable, or does not commit within
``deadline`` seconds, the event is appended to the spool and fsynced; only then is it
acknowledged (a webhook gets its 200). From the first spooled event on, every newer event
is spooled too, until the replay has emptied the spool: the events of a call therefore
reach the database in the order they happened. Replay goes through the same ingest, which
is replay-safe (the Zadarma journal and the call ids make a second delivery a no-op).
An event that timed out may still commit later: its replay then changes nothing.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TypeVar

from twisted.application.internet import TimerService
from twisted.application.service import Service
from twisted.internet.defer import Deferred, TimeoutError, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure

from dpvoip.calls.ingest import Ingest, Origin, ZadarmaContext, ZadarmaOutcome
from dpvoip.core.errors import summary
from dpvoip.core.happenings import Happening
from dpvoip.core.numbers import Dialling
from dpvoip.core.outcomes import Reason
from dpvoip.deferreds import OneShotObserver, shield, within
from dpvoip.spool.journal import AsyncSpool, SpoolFull
from dpvoip.spool.records import fritz_record, read_received, read_record, zadarma_record
from dpvoip.store.database import Store, is_unavailable
from dpvoip.store.migrations import SchemaReport
from dpvoip.zadarma.events import ZadarmaEvent, parse_event

log = Logger()
T = TypeVar("T")


def unavailable(error: BaseException) -> bool:
    """Whether ``error`` means "the database is not there now" (or did not commit within
    the deadline), not "this event is wrong": the event is spooled, the replay pauses."""
    return isinstance(error, TimeoutError) or is_unavailable(error)


class NotRecorded(Exception):
    """Neither committed nor spooled (the spool is full): the event is not acknowledged."""


@dataclass
class DurableCounters:
    direct: int = 0
    spooled: int = 0
    replayed: int = 0
    unreplayable: int = 0
    refused: int = 0  # spool full: not acknowledged (webhooks get 503; Zadarma retries)


class DurableIngest:
    def __init__(self, ingest: Ingest, spool: AsyncSpool, store: Store,
                 schema: OneShotObserver[SchemaReport], clock: Any,
                 origins: Mapping[str, Origin], zadarma: Callable[[], ZadarmaContext],
                 region: str, deadline: float = 2.0) -> None:
        self._ingest = ingest
        self._spool = spool
        self._store = store
        self._schema = schema
        self._clock = clock
        self._origins = origins
        self._zadarma = zadarma
        self._region = region
        self._deadline = deadline
        self._spooling = False
        self._appends = itertools.count()
        self._appended = 0
        self._replaying: OneShotObserver[bool] | None = None
        self.counters = DurableCounters()

    @property
    def spooling(self) -> bool:
        return self._spooling

    # -- the entry points ------------------------------------------------------------------

    def submit(self, happening: Happening, origin: Origin) -> Deferred[None]:
        received = self._now()  # kept with the event: a replay writes the same rows
        return shield(Deferred.fromCoroutine(self._durably(
            lambda: self._ingest.submit(happening, origin, received),
            lambda: fritz_record(happening, origin.name, received), None)))

    def submit_zadarma(self, event: ZadarmaEvent, form: Mapping[str, str],
                       context: ZadarmaContext) -> Deferred[ZadarmaOutcome]:
        # Spooled, the answer has no caller name: the directory is in the database.
        # Shielded: a client hanging up (Klein cancels its handler) must not stop the
        # event half-way between a failed commit and the spool.
        received = self._now()
        return shield(Deferred.fromCoroutine(self._durably(
            lambda: self._ingest.submit_zadarma(event, form, context, received),
            lambda: zadarma_record(dict(form), received), ZadarmaOutcome(duplicate=False))))

    def _now(self) -> datetime:
        return datetime.fromtimestamp(self._clock.seconds(), UTC)

    async def close_open_calls(self, box: str, reason: Reason, at: datetime,
                               started_before: datetime | None = None) -> int:
        """At a box's start, after the replay: straight to the database."""
        return await self._ingest.close_open_calls(box, reason, at, started_before)

    async def _durably(self, work: Callable[[], Deferred[T]], record: Callable[[], bytes],
                       spooled_result: T) -> T:
        if self._spooling or not self._schema.fired:
            return await self._to_spool(record, spooled_result, "spool not empty")
        attempt = work()
        try:
            result = await within(self._clock, attempt, self._deadline)
        except Exception as error:
            if not unavailable(error):
                raise
            return await self._to_spool(record, spooled_result, type(error).__name__)
        self.counters.direct += 1
        return result

    async def _to_spool(self, record: Callable[[], bytes], result: T, reason: str) -> T:
        if not self._spooling:
            log.warn("database unavailable ({reason}): events are spooled to disk until it "
                     "is back", reason=reason)
        self._spooling = True
        self._appended = next(self._appends)
        try:
            await self._spool.append(record())
        except SpoolFull:
            self.counters.refused += 1
            log.critical("the spool is full: an event could not be recorded (not "
                         "acknowledged); free space or raise [spool] max_mb")
            raise NotRecorded("the database is unavailable and the spool is full") from None
        self.counters.spooled += 1
        return result

    # -- replay ----------------------------------------------------------------------------

    def idle(self) -> Deferred[None]:
        """Fires when no replay is running."""
        running = self._replaying
        if running is None:
            return succeed(None)
        return running.when_fired().addBoth(lambda _: None)

    def replay(self) -> Deferred[bool]:
        """Replay the spool into the database, in order; fires True once it is empty (then
        new events go straight to the database again), False if the database failed. One
        replay at a time: who asks while one runs gets its result."""
        running = self._replaying
        if running is None:
            running = self._replaying = OneShotObserver()
            Deferred.fromCoroutine(self._replay()).addBoth(
                functools.partial(self._replay_ended, running))
        return running.when_fired()

    def _replay_ended(self, run: OneShotObserver[bool], result: bool | Failure) -> None:
        if self._replaying is run:
            self._replaying = None
        run.fire(result)

    async def _replay(self) -> bool:
        if not self._schema.fired:
            return False
        while True:
            seen = self._appended
            pending = await self._spool.pending()
            if not pending:
                if seen == self._appended:
                    if self._spooling:
                        log.info("spool replayed: events go straight to the database again")
                    self._spooling = False
                    return True
                continue  # an event was spooled while we looked: read again
            self._spooling = True
            done = 0
            try:
                for seq, payload in pending:
                    try:
                        await self._apply(payload)
                    except Exception as error:
                        if unavailable(error):
                            raise
                        # this record, every time: skipped, never a jam
                        self.counters.unreplayable += 1
                        log.error("spool record {seq} could not be applied and is skipped"
                                  " ({error}): {payload}", seq=seq,
                                  error=f"{type(error).__name__}: {error}"[:300],
                                  payload=payload[:500].decode("utf-8", "replace"))
                    else:
                        self.counters.replayed += 1
                    done = seq
            except Exception as error:
                if not unavailable(error):
                    raise
                log.info("replay paused: the database is unavailable ({error})",
                         error=type(error).__name__)
                return False
            finally:
                if done:
                    await self._spool.replayed(done)

    async def _apply(self, payload: bytes) -> None:
        source, what, box = read_record(payload)  # BadRecord: skipped by the caller
        # As at its arrival (a record from before dpvoip kept it: as now, as it did then).
        received = read_received(payload)
        if source == "zadarma":
            event = parse_event(what)
            if isinstance(event, ZadarmaEvent):
                await within(self._clock, self._ingest.submit_zadarma(
                    event, what, self._zadarma(), received), self._deadline * 5)
            return
        origin = self._origins.get(box) or Origin(box, Dialling(self._region))
        await within(self._clock, self._ingest.submit(what, origin, received),
                     self._deadline * 5)


class DurableService(Service):
    """Opens the spool at start, replays it once the database schema is prepared (before
    the boxes connect), and again every ``interval`` seconds while events are spooled.

    The periodic replay is Twisted's ``TimerService``, started once the schema is prepared
    (its first tick at once) rather than at this service's start: there is nothing to
    replay into before that."""

    name = "spool"

    def __init__(self, durable: DurableIngest, spool: AsyncSpool, clock: Any,
                 prepared: Callable[[], Deferred[None]], interval: float = 1.0) -> None:
        self._durable = durable
        self._spool = spool
        self._prepared = prepared
        self._replayer = TimerService(interval, self._tick)
        self._replayer.clock = clock
        self._replayed = OneShotObserver[None]()
        self._alarmed = False

    def when_replayed(self) -> Deferred[None]:
        """Fires once what the last run spooled is in the database."""
        return self._replayed.when_fired()

    def startService(self) -> Deferred[None]:
        super().startService()
        opened = self._spool.start()

        def begin(_: object) -> None:
            state = self._spool.state()
            if state.recovered_torn_bytes:
                log.warn("spool: cut {n} bytes of a record torn by a crash",
                         n=state.recovered_torn_bytes)
            if state.pending:
                log.info("spool: {n} events of the last run to replay", n=state.pending)
            self._prepared().addCallback(lambda _: self._start_replaying())

        return opened.addCallback(begin)

    def _start_replaying(self) -> None:
        if self.running and not self._replayer.running:
            self._replayer.startService()

    def _tick(self) -> None:
        """One tick of the replay loop: never waits (a replay under way is joined, not
        started twice), so the loop keeps its beat and stops at once."""
        self._watch_alarm()
        if self._replayed.fired and not self._durable.spooling:
            return
        self._durable.replay().addBoth(self._replay_settled)

    def _replay_settled(self, result: bool | Failure) -> None:
        if isinstance(result, Failure):
            log.warn("spool replay failed, will retry: {error}",
                     error=summary(result.getErrorMessage()))
        elif result:
            self._replayed.fire(None)

    def _watch_alarm(self) -> None:
        state = self._spool.state()
        if state.alarm and not self._alarmed:
            log.critical("spool nearly full: {used} of {limit} bytes; the database has been "
                         "unavailable for long", used=state.bytes, limit=state.limit)
        elif self._alarmed and not state.alarm:
            log.info("spool below its alarm level again")
        self._alarmed = state.alarm

    def stopService(self) -> Deferred[None]:
        super().stopService()
        return Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
        if self._replayer.running:
            await self._replayer.stopService()
        await self._durable.idle()  # a replay in flight finishes first
        await self._spool.stop()
