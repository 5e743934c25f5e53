"""The CRM's Redis, where a CRM with ``REDIS_CACHE_URL`` keeps its sessions: one raw
``GET`` per cookie login, through txredisapi.

``RedisSessionCache`` holds one lazily (re)connecting txredisapi connection (``RedisFactory``
on a Twisted endpoint: TCP, TLS verified against the host name for ``rediss://``, or a unix
socket), authenticated (``AUTH [user] password``) and on the URL's database (``SELECT``).
Values come back as bytes, untouched (no charset, no number conversion): decoding them is
``crm.redis_sessions``'s job. ``RedisSessionService`` opens it when the daemon starts and
closes it when it stops.

Every failure to answer (not connected within the deadline, Redis down, a wrong password,
an error reply) is ``SessionCacheUnreachable`` with a one-line reason that holds neither
the password nor the key (and so not the session key): Redis's own error texts hold
neither.

txredisapi is imported when the connection is opened, not with this module: it imports
``twisted.internet.reactor`` at import time, which would install the default reactor
before ``twistd`` installs the one it was asked for.
"""

from __future__ import annotations

import uuid
from typing import Any

from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import HostnameEndpoint, UNIXClientEndpoint, wrapClientTLS
from twisted.internet.interfaces import IReactorTime, IStreamClientEndpoint
from twisted.internet.ssl import optionsForClientTLS
from twisted.logger import Logger

from dpvoip.core.errors import summary
from dpvoip.crm.redis_sessions import RedisAddress, session_cache_key
from dpvoip.deferreds import within

log = Logger(namespace="dpvoip.logins")


class SessionCacheUnreachable(Exception):
    """The CRM's Redis did not answer a session lookup (the message says why, and never
    holds the password or the session key): nothing was decided about the login."""


class RedisSessionCache:
    """Reads the CRM's cached sessions (``cached_session``) from its Redis."""

    def __init__(self, address: RedisAddress, key_prefix: str, key_version: int,
                 timeout: float, reactor: Any, clock: IReactorTime | None = None) -> None:
        self.address = address
        self._prefix = key_prefix
        self._version = key_version
        self._timeout = timeout
        self._reactor = reactor
        #: The deadline's clock: the reactor, or a ``Clock`` in tests.
        self._clock: IReactorTime = clock if clock is not None else reactor
        self._factory: Any = None

    def _endpoint(self) -> IStreamClientEndpoint:
        address = self.address
        if address.unix_path:
            return UNIXClientEndpoint(self._reactor, address.unix_path, timeout=self._timeout)
        endpoint: IStreamClientEndpoint = HostnameEndpoint(
            self._reactor, address.host, address.port, timeout=self._timeout)
        if address.tls:
            endpoint = wrapClientTLS(optionsForClientTLS(address.host), endpoint)
        return endpoint

    def start(self) -> None:
        """Start connecting (and reconnecting, with back-off, whenever the connection is
        lost); lookups wait for the connection up to their deadline."""
        import txredisapi  # type: ignore[import-untyped]  # see the module's docstring

        if self._factory is not None:
            return
        address = self.address
        factory = txredisapi.RedisFactory(
            uuid.uuid4().hex, address.db or None, 1, isLazy=True,
            handler=txredisapi.ConnectionHandler, charset=None,
            password=address.password or None, replyTimeout=self._timeout,
            convertNumbers=False, username=address.username or None)
        factory.noisy = False
        # Fires once: the first connection is ready, or it never will be (a refused
        # password or database: txredisapi then stops trying). Consumed here, so that a
        # refusal is one clear line instead of an unhandled error.
        factory.deferred.addCallbacks(self._connected, self._refused)
        factory.startConnecting(self._endpoint())
        self._factory = factory

    def _connected(self, _: object) -> None:
        log.info("connected to the CRM's Redis at {where}", where=self.address.where())

    def _refused(self, failure: Any) -> None:
        log.error("the CRM's Redis at {where} refused dpvoip ({why}): CRM sessions in Redis "
                  "are refused until dpvoip is restarted with the right URL",
                  where=self.address.where(), why=summary(failure.value))

    def stop(self) -> Deferred[None]:
        """Stop reconnecting and close the connection; fires when it is closed."""
        factory, self._factory = self._factory, None
        if factory is None:
            return defer.succeed(None)
        closed: Deferred[Any] = factory.disconnect()
        return closed.addCallback(lambda _: None)

    async def cached_session(self, session_key: str) -> bytes | None:
        """The raw value Django's cache backend stored for session ``session_key``, else
        None (never written, expired, or signed out: Redis has no such key). Waits at most
        ``timeout`` seconds for the connection and the answer, else
        ``SessionCacheUnreachable``."""
        factory = self._factory
        if factory is None:
            raise SessionCacheUnreachable("the connection to Redis is not open")
        key = session_cache_key(session_key, self._prefix, self._version)
        try:
            value = await within(self._clock, factory.handler.get(key), self._timeout)
        except defer.TimeoutError:
            raise SessionCacheUnreachable(
                f"no answer within {self._timeout:g} s (Redis down or not reachable, or "
                "the password refused)") from None
        except Exception as error:  # txredisapi's ConnectionError, an error reply, ...
            raise SessionCacheUnreachable(summary(error)) from None
        if value is None:
            return None
        if not isinstance(value, bytes):
            raise SessionCacheUnreachable(
                f"Redis answered {type(value).__name__}, not a string")
        return value


class RedisSessionService(Service):
    """Opens the connection to the CRM's Redis at start and closes it at stop."""

    name = "CRM sessions in Redis"

    def __init__(self, cache: RedisSessionCache) -> None:
        self.cache = cache

    def startService(self) -> None:
        super().startService()
        log.info("CRM sessions are read from Redis at {where}", where=self.cache.address.where())
        self.cache.start()

    def stopService(self) -> Deferred[None]:
        super().stopService()
        return self.cache.stop()
