"""The live events as a service: the LISTEN connection and its feed into the hub, started
once dpvoip's schema is prepared (the table must be there); the events older than
``[live] keep_minutes`` pruned every minute; every stream closed cleanly at stop.

Added after the web service, so that it stops first: the streams end before the web
service waits for the requests in flight (a stream would otherwise hold it for its whole
drain timeout).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from twisted.application.internet import TimerService
from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from dpvoip.core.errors import summary
from dpvoip.live.hub import Hub
from dpvoip.live.listener import LiveFeed

log = Logger(namespace="dpvoip.live")

PRUNE_EVERY = 60.0


class Listening(Protocol):
    """The LISTEN connection (``store.live.ListenConnection``)."""

    listening: bool

    def watch(self, on_notify: Callable[[str], None], on_listening: Callable[[], None]
              ) -> None: ...

    def start(self) -> Deferred[None]: ...

    def stop(self) -> None: ...


class Pruning(Protocol):
    def prune(self, keep_minutes: float) -> Awaitable[int]: ...


class LiveService(Service):
    name = "live events"

    def __init__(self, hub: Hub, feed: LiveFeed, connection: Listening, events: Pruning,
                 keep_minutes: float, clock: IReactorTime,
                 when_prepared: Callable[[], Deferred[Any]]) -> None:
        self.hub = hub
        self.feed = feed
        self.connection = connection
        self._events = events
        self._keep = keep_minutes
        self._when_prepared = when_prepared
        self._pruning = False
        connection.watch(feed.notified, feed.listening)
        pruner = TimerService(PRUNE_EVERY, self._prune)
        pruner.clock = clock
        self._pruner = pruner
        self._waiting: Deferred[Any] | None = None

    def startService(self) -> None:
        super().startService()
        waiting = self._waiting = self._when_prepared()

        def begin(_: object) -> None:
            if self.running:
                self.connection.start()
                self._pruner.startService()

        waiting.addCallback(begin).addErrback(lambda _: None)

    def stopService(self) -> None:
        self.hub.close_all()
        self.connection.stop()
        if self._waiting is not None and not self._waiting.called:
            self._waiting.cancel()
        if self._pruner.running:
            self._pruner.stopService()
        super().stopService()

    def _prune(self) -> None:
        if self._pruning:
            return
        self._pruning = True

        async def prune() -> None:
            try:
                gone = await self._events.prune(self._keep)
                if gone:
                    log.debug("live events: pruned {n}", n=gone)
            except Exception as error:  # PostgreSQL away: the next tick tries again
                log.info("live events: pruning failed ({error})", error=summary(error))
            finally:
                self._pruning = False

        Deferred.fromCoroutine(prune())


class LiveCollector(Collector):
    """The hub's figures for ``/metrics``."""

    def __init__(self, service: LiveService) -> None:
        self._service = service

    def collect(self) -> list[Metric]:
        hub, feed = self._service.hub, self._service.feed
        c = hub.counters
        figures: list[Metric] = [
            _gauge("dpvoip_live_streams_open", "Event streams open now.", hub.open_streams),
            _gauge("dpvoip_live_listening", "1 while the LISTEN connection is in place.",
                   int(self._service.connection.listening)),
        ]
        for name, text, value in (
            ("dpvoip_live_streams_opened", "Event streams opened.", c.streams_opened),
            ("dpvoip_live_streams_refused", "Event streams refused (max_streams).",
             c.streams_refused),
            ("dpvoip_live_streams_dropped", "Event streams dropped: too slow to keep up.",
             c.streams_dropped),
            ("dpvoip_live_events_published", "Live events published to the streams.",
             c.events_published),
            ("dpvoip_live_frames_sent", "Frames written to streams (events, heartbeats).",
             c.frames_sent),
            ("dpvoip_live_catch_ups", "Reads of missed events after LISTEN was (re)issued.",
             feed.catch_ups),
        ):
            counter = CounterMetricFamily(name, text)
            counter.add_metric([], value)
            figures.append(counter)
        return figures


def _gauge(name: str, text: str, value: float) -> GaugeMetricFamily:
    gauge = GaugeMetricFamily(name, text)
    gauge.add_metric([], value)
    return gauge


def exposition(service: LiveService) -> Callable[[], bytes]:
    """``/metrics`` text of the live events (a registry of their own)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(LiveCollector(service))
    return lambda: generate_latest(registry)
