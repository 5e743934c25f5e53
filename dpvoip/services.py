"""Keeps the phone directory's index fresh while dpvoip runs.

Once the schema is prepared: build the index if it was never built (or the region
changed), else catch up on what changed while dpvoip was stopped; then re-read edited
records every ``refresh_seconds`` and sweep deleted ones every ``sweep_seconds``. A failed
pass is logged and counted and the next one tries again: the loop never dies.
"""

from __future__ import annotations

from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from dpvoip.config import DirectorySettings
from dpvoip.store.directory import DirectoryIndex

log = Logger(namespace="dpvoip.core.matching")


#: Tables the statistics show untouched are skipped; every so often all are read anyway
#: (statistics lag, and can be switched off).
FULL_PASS_SECONDS = 300.0


class DirectoryService(Service):
    name = "directory"

    def __init__(
        self,
        index: DirectoryIndex,
        settings: DirectorySettings,
        clock: Any,
        prepared: Any,
    ) -> None:
        self.index = index
        self._settings = settings
        self._clock = clock
        self._prepared = prepared
        self._loop: LoopingCall | None = None
        self._running_pass: Deferred[None] | None = None
        self._last_sweep = float("-inf")
        self._last_full = float("-inf")

    def startService(self) -> None:
        super().startService()
        self._prepared().addCallback(lambda _: self._begin())

    def _begin(self) -> None:
        if not self.running:
            return
        loop = LoopingCall(self._tick)
        loop.clock = self._clock
        self._loop = loop
        loop.start(self._settings.refresh_seconds, now=True)

    def _tick(self) -> None:
        if self._running_pass is not None:
            return  # the previous pass is still running (a big first build): skip a beat
        self._running_pass = Deferred.fromCoroutine(self._pass())

        def done(result: Any) -> None:
            self._running_pass = None
            if hasattr(result, "getErrorMessage"):
                self.index.state.errors += 1
                log.warn("directory refresh failed, will retry: {error}",
                         error=result.getErrorMessage())

        self._running_pass.addBoth(done)

    async def _pass(self) -> None:
        index = self.index
        started = self._clock.seconds()
        if not index.state.built and await index.needs_build():
            log.info("building the phone directory from the CRM's records")
            rows = await index.build()
            index.state.last_build_seconds = self._clock.seconds() - started
            self._last_sweep = started
            log.info("phone directory built: {entries} numbers from {rows} records in {s:.1f}s",
                     entries=index.state.entries, rows=rows,
                     s=index.state.last_build_seconds)
            return
        sweep = started - self._last_sweep >= self._settings.sweep_seconds
        force = started - self._last_full >= FULL_PASS_SECONDS
        changed = await index.refresh(sweep=sweep, force=force)
        if force:
            self._last_full = started
        if sweep:
            self._last_sweep = started
        if changed:
            log.debug("phone directory: {n} records re-read", n=changed)

    def stopService(self) -> Deferred[None] | None:
        super().stopService()
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        running = self._running_pass
        if running is None:
            return None
        waiter: Deferred[None] = Deferred()
        running.addBoth(lambda _: waiter.callback(None))
        return waiter
