"""The Zadarma account as a service: its HTTP client's life, and the zone of its clock.

Zadarma writes ``call_start`` in the account's local time. When the administrator has not
configured that zone and API keys are set, it is asked from ``/v1/info/timezone/`` at
start (and again every few hours, for daylight saving time). Zadarma states an offset
such as ``UTC+2``; when the office's own zone has that offset now, the office zone is
used (so the summer change is followed), else the fixed offset.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta, timezone, tzinfo
from pathlib import Path
from typing import Any, Protocol
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.ssl import Certificate, trustRootFromCertificates
from twisted.logger import Logger
from twisted.web.client import Agent, BrowserLikePolicyForHTTPS, HTTPConnectionPool

from dpvoip.core.errors import summary
from dpvoip.internals import QuietHTTPConnectionPool
from dpvoip.zadarma.api import ZadarmaApiError

log = Logger()

_OFFSET = re.compile(r"^(?:UTC|GMT)\s*(?:([+-])\s*([0-9]{1,2})(?::?([0-9]{2}))?)?$", re.I)
RETRY_SECONDS = 60.0
REFRESH_SECONDS = 6 * 3600.0


class ZadarmaAccountApi(Protocol):
    """Zadarma's API as the account service uses it (``ZadarmaApi`` or an in-memory
    fake)."""

    @property
    def configured(self) -> bool:
        """Whether the API keys are set (without them nothing is asked)."""
        ...

    def timezone(self) -> Awaitable[str]:
        """The account's zone as Zadarma states it (``UTC+2``)."""
        ...


def account_zone(stated: str, office: tzinfo, now: datetime) -> tzinfo | None:
    """The zone to read ``call_start`` in, from what Zadarma states; None if unreadable."""
    text = stated.strip()
    match = _OFFSET.match(text)
    if match is None:
        try:
            return ZoneInfo(text)
        except (ZoneInfoNotFoundError, ValueError):
            return None
    sign, hours, minutes = match.groups()
    offset = timedelta(hours=int(hours or 0), minutes=int(minutes or 0))
    if offset > timedelta(hours=14) or (minutes and int(minutes) >= 60):
        return None
    if sign == "-":
        offset = -offset
    if now.astimezone(office).utcoffset() == offset:
        return office
    return timezone(offset)


def http_pool_and_agent(reactor: Any, ca_file: str, connect_timeout: float) -> tuple[
        HTTPConnectionPool, Agent]:
    """A persistent pool and an Agent that verifies the server's name (service-identity).
    The pool's connections log no "Starting factory" lines."""
    pool: HTTPConnectionPool = QuietHTTPConnectionPool(reactor, persistent=True)
    pool.maxPersistentPerHost = 2
    pool.cachedConnectionTimeout = 60
    policy = BrowserLikePolicyForHTTPS()
    if ca_file:
        marker = b"-----END CERTIFICATE-----"
        blocks = [b + marker for b in Path(ca_file).read_bytes().split(marker) if b.strip()]
        policy = BrowserLikePolicyForHTTPS(trustRoot=trustRootFromCertificates(
            [Certificate.loadPEM(block) for block in blocks]))
    agent = Agent(reactor, contextFactory=policy, pool=pool, connectTimeout=connect_timeout)
    return pool, agent


class ZadarmaAccountService(Service):
    """Owns the API client's connections (closed at shutdown) and learns the account zone."""

    def __init__(self, api: ZadarmaAccountApi, pool: HTTPConnectionPool, reactor: Any,
                 office: tzinfo, learn_zone: bool, on_zone: Callable[[tzinfo], None]) -> None:
        self._api = api
        self._pool = pool
        self._reactor = reactor
        self._office = office
        self._learn = learn_zone and api.configured
        self._on_zone = on_zone
        # One timer at a time, each set from the end of the previous ask (60 s after a
        # failure, 6 h after an answer): not a fixed period, so not a TimerService.
        self._call: IDelayedCall | None = None
        self.zone_stated: str | None = None

    def startService(self) -> None:
        super().startService()
        if self._learn:
            self._call = self._reactor.callLater(0, self._ask)

    def _ask(self) -> None:
        self._call = None
        Deferred.fromCoroutine(self._ask_zone()).addErrback(
            lambda failure: log.failure("asking Zadarma's time zone failed", failure))

    async def _ask_zone(self) -> None:
        try:
            stated = await self._api.timezone()
        except ZadarmaApiError as error:
            log.warn("cannot learn the Zadarma account's time zone ({why}); call times are "
                     "read in the office's zone until it answers", why=summary(error))
            self._schedule(RETRY_SECONDS)
            return
        zone = account_zone(stated, self._office,
                            datetime.fromtimestamp(self._reactor.seconds(), UTC))
        if zone is None:
            log.warn("Zadarma states the account's time zone as {stated!r}, which dpvoip cannot "
                     "read; set [zadarma] timezone", stated=stated[:40])
        else:
            if stated != self.zone_stated:
                log.info("Zadarma account time zone: {stated} (call times read in {zone})",
                         stated=stated, zone=str(zone))
            self.zone_stated = stated
            self._on_zone(zone)
        self._schedule(REFRESH_SECONDS)

    def _schedule(self, seconds: float) -> None:
        if self.running:
            self._call = self._reactor.callLater(seconds, self._ask)

    def stopService(self) -> Deferred[None]:
        super().stopService()
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None
        closed: Deferred[None] = self._pool.closeCachedConnections()
        return closed
