"""dpvoip's own services: how the daemon starts, stops and ends, and the long-lived work it
owns (the private PostgreSQL, the database and its schema, the phone directory, the
tables' statistics, the Zadarma journal's pruning).

The composition root (``dpvoip.service``) builds them; nothing here builds another
service or reaches for a global reactor: what each needs is handed in.
"""

from __future__ import annotations

import atexit
import gc
import os
import sys
from collections.abc import Callable
from datetime import timedelta
from typing import Any

from twisted.application.internet import TimerService
from twisted.application.service import MultiService, Service
from twisted.internet import defer, threads
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from dpvoip.config import Config, DirectorySettings
from dpvoip.core.errors import summary
from dpvoip.deferreds import OneShotObserver
from dpvoip.internals import forget_exit_signal
from dpvoip.store.database import Store
from dpvoip.store.directory import DirectoryIndex
from dpvoip.store.embedded import EmbeddedPostgres
from dpvoip.store.migrations import SchemaMismatch, SchemaReport, prepare
from dpvoip.store.statistics import PlannerStatistics
from dpvoip.store.zadarma_journal import ZadarmaJournal

log = Logger(namespace="dpvoip")


class ExitStatus:
    """How the process ends: 0 after SIGTERM or a clean stop, 1 after a fatal error.

    twistd re-raises SIGTERM on itself after a clean shutdown (exit status 143); an
    administrator's `systemctl stop` or `kill` is a normal stop, so it exits 0 here.
    """

    def __init__(self, reactor: Any) -> None:
        self._reactor = reactor
        self.code = 0
        self.message = ""
        reactor.addSystemEventTrigger("after", "shutdown", self._settle)

    def fatal(self, message: str) -> None:
        if self.code == 0:
            self.code, self.message = 1, message
            log.critical("dpvoip cannot run: {message}", message=message)
        if self._reactor.running:
            self._reactor.stop()

    def _settle(self) -> None:
        forget_exit_signal(self._reactor)
        if self.code:
            code = self.code
            sys.stderr.write(f"dpvoip: {self.message}\n")

            def leave() -> None:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)

            atexit.register(leave)


class OrderedServices(MultiService):
    """Children start one after the other, in order, and stop in the reverse order."""

    def __init__(self, exit_status: ExitStatus) -> None:
        super().__init__()
        self._exit = exit_status
        self.started: Deferred[None] = Deferred()

    def startService(self) -> None:
        Service.startService(self)
        Deferred.fromCoroutine(self._start())

    async def _start(self) -> None:
        for child in list(self):
            try:
                await defer.maybeDeferred(child.startService)
            except Exception as error:
                self._exit.fatal(f"{child.name or child} failed to start: {error}")
                return
        # What start-up loaded (libraries, number metadata) lives as long as the process:
        # keep it out of the collector's full passes, which would stall calls for tens of ms.
        gc.collect()
        gc.freeze()
        self.started.callback(None)

    def stopService(self) -> Deferred[None]:
        Service.stopService(self)
        return Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
        for child in reversed(list(self)):
            if not child.running:
                continue
            try:
                await defer.maybeDeferred(child.stopService)
            except Exception:
                log.failure("stopping {name} failed", name=child.name or child)


class EmbeddedPostgresService(Service):
    """Starts the private PostgreSQL (in a thread: initdb and pg_ctl block) and stops it."""

    name = "embedded PostgreSQL"

    def __init__(self, reactor: Any, cluster: EmbeddedPostgres) -> None:
        self._reactor = reactor
        self.cluster = cluster

    def startService(self) -> Deferred[None]:
        super().startService()
        log.info("starting embedded PostgreSQL in {folder}", folder=str(self.cluster.folder))
        return threads.deferToThreadPool(
            self._reactor, self._reactor.getThreadPool(), self.cluster.start
        )

    def stopService(self) -> Deferred[None]:
        super().stopService()
        return threads.deferToThreadPool(
            self._reactor, self._reactor.getThreadPool(), self.cluster.stop
        )


class Reconnections:
    """The pool's news that a connection was lost or made again, passed on to whoever
    listens.

    Built before the pool (which is given ``notify``) and before the database service
    (which subscribes): the pool must exist before the service that owns it, and the
    service must hear the pool; with this in between, neither refers to the other.
    """

    def __init__(self) -> None:
        self._listeners: list[Callable[[], None]] = []

    def subscribe(self, listener: Callable[[], None]) -> None:
        self._listeners.append(listener)

    def notify(self) -> None:
        for listener in list(self._listeners):
            listener()


class DatabaseService(Service):
    """Owns the pool: starts it (PostgreSQL may be down), prepares the schema once reachable,
    and again tries whenever the pool reports a connection back."""

    name = "database"

    def __init__(self, store: Store, config: Config, exit_status: ExitStatus,
                 schema: OneShotObserver[SchemaReport], reconnections: Reconnections,
                 clock: IReactorTime) -> None:
        self.store = store
        self._config = config
        self._exit = exit_status
        self._schema = schema
        self._clock = clock
        self._preparing = False
        reconnections.subscribe(self._reconnected)

    def when_prepared(self) -> Deferred[None]:
        """Fires once the schema is checked and migrated (at once if it already is)."""
        return self._schema.when_fired().addCallback(lambda _: None)

    def startService(self) -> Deferred[None]:
        super().startService()
        started = self.store.pool.start()
        return started.addCallback(lambda _: self.try_prepare())

    def _reconnected(self) -> None:
        # Told from inside the pool's connection bookkeeping: prepare after it is done.
        self._clock.callLater(0, self.try_prepare)

    def try_prepare(self) -> None:
        """Check and migrate the schema, once, as soon as PostgreSQL answers."""
        if self._schema.fired or self._preparing or not self.running:
            return
        if self.store.pool.live == 0:
            log.warn("PostgreSQL is not reachable yet; dpvoip is up but not ready")
            return
        self._preparing = True
        standalone = self._config.standalone
        schema = self._config.database.crm_schema
        prepared = self.store.write(lambda c: prepare(c, standalone=standalone, crm_schema=schema))
        prepared.addCallbacks(self._prepared, self._not_prepared)

    def _prepared(self, report: SchemaReport) -> None:
        self._preparing = False
        self._schema.fire(report)
        if report.created_crm_tables:
            log.info("created the CRM tables of standalone mode (D.P. Economy 2025-12)")
        log.info(
            "database ready: {mode} mode, dpvoip schema version {version}"
            "{applied}, CRM {crm}",
            mode=report.mode, version=report.schema_version, crm=report.crm.version,
            applied=f" (applied now: {list(report.applied_now)})" if report.applied_now else "",
        )

    def _not_prepared(self, failure: Failure) -> None:
        self._preparing = False
        if failure.check(SchemaMismatch):
            self._exit.fatal(str(failure.value))
            return
        error = failure.value
        assert error is not None  # a Failure always holds its exception
        log.warn("schema preparation failed, will retry when the database is back: {error}",
                 error=summary(error))

    def stopService(self) -> Deferred[None]:
        super().stopService()
        drained = self.store.drain(self._config.web.drain_timeout)
        return drained.addCallback(lambda _: self.store.pool.close())


#: Tables the statistics show untouched are skipped; every so often all are read anyway
#: (statistics lag, and can be switched off).
FULL_PASS_SECONDS = 300.0

directory_log = Logger(namespace="dpvoip.directory")


class BeatOnceReady(Service):
    """A beat (Twisted's ``TimerService``) that starts once the schema is prepared (its
    first beat at once) and whose stop waits for a beat still running. Subclasses say
    what a beat does (``_beat``, a Deferred that never fails: the loop must not die)."""

    def __init__(self, interval: float, clock: IReactorTime,
                 prepared: Callable[[], Deferred[None]]) -> None:
        self._prepared = prepared
        self._timer = TimerService(interval, self._beat)
        self._timer.clock = clock

    def _beat(self) -> Deferred[None]:
        raise NotImplementedError

    def startService(self) -> None:
        super().startService()
        self._prepared().addCallback(lambda _: self._begin())

    def _begin(self) -> None:
        if self.running and not self._timer.running:
            self._timer.startService()

    def stopService(self) -> Deferred[None] | None:
        """Stops the beat; fires once a beat still running has finished."""
        super().stopService()
        if not self._timer.running:
            return None
        stopped: Deferred[None] = self._timer.stopService()
        return stopped


class DirectoryService(BeatOnceReady):
    """Keeps the phone directory's index fresh while dpvoip runs.

    Once the schema is prepared: build the index if it was never built (or the region
    changed), else catch up on what changed while dpvoip was stopped; then re-read edited
    records every ``refresh_seconds`` and sweep deleted ones every ``sweep_seconds``.

    The beat is Twisted's ``TimerService``: its loop waits for a pass to finish before it
    schedules the next one, so a pass still running (a big first build) makes the beats
    that fall within it be skipped, and stopping waits for it. A failed pass is logged and
    counted and the next beat tries again: a pass never fails the loop, so it never dies.
    """

    name = "directory"

    def __init__(
        self,
        index: DirectoryIndex,
        settings: DirectorySettings,
        clock: IReactorTime,
        prepared: Callable[[], Deferred[None]],
    ) -> None:
        super().__init__(settings.refresh_seconds, clock, prepared)
        self.index = index
        self._settings = settings
        self._clock = clock
        self._last_sweep = float("-inf")
        self._last_full = float("-inf")

    def _beat(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._pass()).addErrback(self._failed)

    def _failed(self, failure: Failure) -> None:
        self.index.state.errors += 1
        directory_log.warn("directory refresh failed, will retry: {error}",
                           error=summary(failure.value))

    async def _pass(self) -> None:
        index = self.index
        started = self._clock.seconds()
        if not index.state.built and await index.needs_build():
            directory_log.info("building the phone directory from the CRM's records")
            rows = await index.build()
            index.state.last_build_seconds = self._clock.seconds() - started
            self._last_sweep = started
            directory_log.info(
                "phone directory built: {entries} numbers from {rows} records in {s:.1f}s",
                entries=index.state.entries, rows=rows, s=index.state.last_build_seconds)
            return
        sweep = started - self._last_sweep >= self._settings.sweep_seconds
        force = started - self._last_full >= FULL_PASS_SECONDS
        changed = await index.refresh(sweep=sweep, force=force)
        if force:
            self._last_full = started
        if sweep:
            self._last_sweep = started
        if changed:
            directory_log.debug("phone directory: {n} records re-read", n=changed)


class StatisticsService(BeatOnceReady):
    """Analyzes the tables dpvoip writes once they have grown by a good share
    (``store.statistics``), every ``interval`` seconds once the schema is prepared, so that
    the hot statements' plans follow the tables' sizes. A failed pass (the database away)
    is quiet: the next beat tries again, and autovacuum does the same work more slowly."""

    name = "statistics"

    def __init__(self, statistics: PlannerStatistics, clock: IReactorTime,
                 prepared: Callable[[], Deferred[None]], interval: float = 10.0) -> None:
        super().__init__(interval, clock, prepared)
        self.statistics = statistics
        self.failures = 0

    def _beat(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self.statistics.refresh()).addCallbacks(
            lambda _: None, self._failed)

    def _failed(self, failure: Failure) -> None:
        self.failures += 1
        log.debug("planner statistics not refreshed: {error}", error=summary(failure.value))


#: How often the Zadarma journal is pruned: it grows by a webhook's form at a time.
JOURNAL_PRUNE_SECONDS = 3600.0


class JournalRetentionService(BeatOnceReady):
    """Prunes Zadarma's webhook journal of what is older than ``keep``
    (``zadarma.retention``): once ``prepared`` fires (the composition root: once the
    spool's first replay is through, so as not to compete with it), then every hour.
    Without it the journal grows by every webhook for as long as dpvoip runs. A failed
    pass (the database away) is logged and counted; the next beat tries again."""

    name = "zadarma journal"

    def __init__(self, journal: ZadarmaJournal, keep: timedelta, clock: IReactorTime,
                 prepared: Callable[[], Deferred[None]],
                 interval: float = JOURNAL_PRUNE_SECONDS) -> None:
        super().__init__(interval, clock, prepared)
        self.journal = journal
        self.keep = keep
        self.failures = 0

    def _beat(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._pass()).addErrback(self._failed)

    async def _pass(self) -> None:
        pruned = await self.journal.prune(self.keep)
        if pruned.events or pruned.bindings:
            log.info("zadarma journal: pruned {events} events and {bindings} signed strings"
                     " older than {days:g} days", events=pruned.events,
                     bindings=pruned.bindings, days=self.keep / timedelta(days=1))

    def _failed(self, failure: Failure) -> None:
        self.failures += 1
        log.info("zadarma journal not pruned, will retry: {error}",
                 error=summary(failure.value))
