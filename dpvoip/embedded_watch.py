"""The embedded PostgreSQL watched: started again when it went away.

A postmaster killed (the OOM killer, an administrator's ``kill``, ``dpvoip check`` of an
older version stopping a server it had adopted) used to leave dpvoip up and not ready for
good. It is started again in the process, not by exiting for systemd to restart dpvoip:
``make start`` in a terminal has no supervisor, and meanwhile the spool keeps every event
and the pool heals on its own, while a restart of the whole daemon would interrupt the
calls in flight and drop the Fritz!Box connections. A start that fails (a full disk, old
server processes still attached to its memory) is tried again at the next look; dpvoip
stays up, not ready, spooling, and says so at a calm rate.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from dpvoip.core.errors import summary

log = Logger(namespace="dpvoip")

#: Seconds between two looks (reading ``postmaster.pid`` and ``/proc``: cheap).
EVERY = 2.0
#: While starting keeps failing, one warning per this many failed attempts.
WARN_EVERY = 30


class Watched(Protocol):
    """What the watch needs of ``store.embedded.EmbeddedPostgres``."""

    started_pid: int | None

    def running(self) -> bool: ...

    def start(self) -> None: ...


class EmbeddedWatch(Service):
    """Looks every ``every`` seconds whether the embedded server runs, and starts it
    (through ``blocking``: in a thread, pg_ctl blocks) when it does not.

    Added after the service that starts the server and so stopped before the one that
    stops it: the watch never starts a server that the shutdown is stopping. A start in
    progress when the watch stops is waited for, so that the server it starts is stopped.
    """

    name = "embedded PostgreSQL watch"

    def __init__(self, clock: IReactorTime, cluster: Watched,
                 blocking: Callable[[Callable[[], None]], Deferred[None]],
                 every: float = EVERY) -> None:
        self._clock = clock
        self._cluster = cluster
        self._blocking = blocking
        self._every = every
        self._loop: LoopingCall | None = None
        self._starting: Deferred[None] | None = None
        self.failures = 0  # failed starts since the server went away
        self.restarts = 0

    def startService(self) -> None:
        super().startService()
        loop = LoopingCall(self.look)
        loop.clock = self._clock
        loop.start(self._every, now=False)
        self._loop = loop

    def stopService(self) -> Deferred[None] | None:
        super().stopService()
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None
        return self._starting  # its own callbacks handle its failure

    def look(self) -> None:
        """Start the server when it is gone (unless a start is already under way)."""
        if self._starting is not None or not self.running:
            return
        if self._cluster.running():
            return
        if self.failures == 0:
            gone = self._cluster.started_pid
            log.warn("the embedded PostgreSQL{pid} is gone; starting it again",
                     pid=f" (pid {gone})" if gone else "")
        starting = self._blocking(self._cluster.start)
        self._starting = starting
        starting.addCallbacks(self._started, self._failed)

    def _started(self, _: object) -> None:
        self._starting = None
        self.failures = 0
        self.restarts += 1
        log.info("the embedded PostgreSQL runs again (pid {pid})", pid=self._cluster.started_pid)

    def _failed(self, failure: Failure) -> None:
        self._starting = None
        self.failures += 1
        if self.failures % WARN_EVERY == 1:
            log.warn("the embedded PostgreSQL could not be started again: {reason}; trying "
                     "again every {every:g} s (calls are spooled meanwhile)",
                     reason=summary(failure.value), every=self._every)
