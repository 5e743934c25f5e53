"""From the LISTEN connection to the hub: each announcement (or a reconnect) reads the
events after the last settled id from ``dpvoip.live_event`` and publishes those not
delivered yet, in the order they committed; nothing is lost across a PostgreSQL restart
and nothing is published twice.

Reads never overlap: an announcement that arrives during a read makes one more read
after it, so a burst of commits costs a few reads, not one each.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable
from typing import Protocol

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from dpvoip.core.errors import summary
from dpvoip.live.events import LiveEvent, Watermark
from dpvoip.live.hub import Hub

log = Logger(namespace="dpvoip.live")


class EventReader(Protocol):
    """The events table as the feed reads it (``store.live.ListenConnection``)."""

    def since(self, after: int, limit: int, skip: list[int]) -> Awaitable[list[LiveEvent]]:
        """The events with an id above ``after`` but those in ``skip``, oldest first."""
        ...

    def newest(self) -> Awaitable[int]: ...


class LiveFeed:
    """Reads and publishes; see the module's docstring. ``batch``: most events per read
    (more are read at once after it)."""

    def __init__(self, reader: EventReader, hub: Hub, clock: IReactorTime,
                 watermark: Watermark | None = None, batch: int = 500) -> None:
        self._reader = reader
        self._hub = hub
        self._clock = clock
        self.watermark = watermark or Watermark()
        self._batch = batch
        self._started = False
        self._reading = False
        self._again = False
        self.reads = 0
        self.catch_ups = 0  # reads after a (re)connect
        self.skipped = 0  # announcements settled without a read (no stream open)

    def settled(self) -> int | None:
        """The id up to which every event is settled (committed and seen, or given up),
        None before the first read."""
        return self.watermark.low if self._started else None

    def notified(self, payload: str) -> None:
        """An announcement on the channel. With streams open, the table says what to
        publish (its payload is not needed). With none, nobody is to be sent the event:
        its id, from the payload, is settled without reading the table (a read per
        committed call was a tenth of a webhook's cost, for an office with no live page
        open); a browser that opens its stream later is sent what it missed from the
        table (its Last-Event-ID), as after a reconnect."""
        if not self._started:
            return
        ident = None if self._reading or self._hub.open_streams else _announced_id(payload)
        if ident is None:
            self._read()
            return
        self.skipped += 1
        self.watermark.delivered([ident], self._clock.seconds())

    def listening(self) -> None:
        """LISTEN is in place (the first time, or after a reconnect): read what was
        missed meanwhile (the first time: only what comes from now on)."""
        self.catch_ups += 1
        self._read()

    def _read(self) -> None:
        if self._reading:
            self._again = True
            return
        self._reading = True
        Deferred.fromCoroutine(self._loop())

    async def _loop(self) -> None:
        try:
            while True:
                self._again = False
                if not self._started:
                    self.watermark.start_at(await self._reader.newest())
                    self._started = True
                full = await self._read_once()
                if not (self._again or full):
                    return
        except Exception as error:  # the connection went: its recovery reads again
            log.info("live events: read failed ({error}); read again once reconnected",
                     error=summary(error))
        finally:
            self._reading = False

    async def _read_once(self) -> bool:
        self.reads += 1
        events = await self._reader.since(self.watermark.low, self._batch,
                                          sorted(self.watermark.seen))
        fresh = set(self.watermark.fresh(e.id for e in events))
        new = [e for e in events if e.id in fresh]
        self.watermark.delivered((e.id for e in new), self._clock.seconds())
        self._hub.publish(new)
        return len(events) >= self._batch


def _announced_id(payload: str) -> int | None:
    """The event id an announcement carries (``store.calls.payload``); None when it
    carries none that can be trusted (the table is read instead)."""
    try:
        ident = json.loads(payload).get("id")
    except (ValueError, AttributeError):
        return None
    return ident if isinstance(ident, int) and not isinstance(ident, bool) else None
