"""A txpostgres connection pool that heals, starts without PostgreSQL, and never hangs.

txpostgres' own ``ConnectionPool`` connects once and never recovers a dead connection;
its ``start()`` fails when PostgreSQL is down. Here every connection has its own
``DeadConnectionDetector`` that reconnects it with capped back-off, the pool starts
whatever the state of PostgreSQL, queries go to a live connection when there is one and
fail fast with ``ConnectionDead`` when there is none.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import random
import re
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, NoReturn, TypeVar

import psycopg2
from twisted.internet import defer
from twisted.internet.defer import Deferred, DeferredSemaphore
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from txpostgres import reconnection, retrying, txpostgres

from dpvoip.core.errors import summary
from dpvoip.deferreds import within
from dpvoip.internals import raw_connection

T = TypeVar("T")
log = Logger()

ConnectionDead = reconnection.ConnectionDead


def backoff_delays(
    initial: float = 0.5, cap: float = 5.0, factor: float = 2.0, jitter: float = 0.1
) -> Iterator[float]:
    """Reconnection delays: at once, then growing with jitter up to ``cap``, forever."""
    yield 0.0
    delay = initial
    while True:
        yield min(cap, delay * random.uniform(1 - jitter, 1 + jitter))  # noqa: S311
        delay = min(cap, delay * factor)


class _Detector(reconnection.DeadConnectionDetector):  # type: ignore[misc]
    """A detector whose reconnection loop can be stopped when the pool closes."""

    def __init__(self, reactor: IReactorTime, on_state: Callable[[], None]) -> None:
        super().__init__(reconnectionIterator=backoff_delays, reactor=reactor)
        self._retrying: Deferred[Any] | None = None
        self._on_state = on_state
        self.closed = False

    def startReconnecting(self, f: Failure) -> None:
        if self.closed:
            return
        log.warn("database connection lost ({error}); reconnecting", error=summary(f.value or ""))
        self._on_state()
        call = retrying.RetryingCall(self.reconnect)
        call.reactor = self.reactor
        self._retrying = call.start(self.reconnectionIterator())
        self._retrying.addCallback(lambda _: self.connectionRecovered())
        self._retrying.addErrback(lambda f: f.trap(defer.CancelledError))

    def reconnect(self) -> Deferred[Any]:
        if self.closed:
            return defer.fail(defer.CancelledError())
        return super().reconnect()  # type: ignore[no-any-return]

    def connectionRecovered(self) -> Deferred[Any]:
        self._retrying = None
        log.info("database connection re-established")
        d: Deferred[Any] = super().connectionRecovered()
        self._on_state()
        return d

    def stop(self) -> None:
        self.closed = True
        if self._retrying is not None:
            retrying, self._retrying = self._retrying, None
            retrying.cancel()


class PooledConnection(txpostgres.Connection):  # type: ignore[misc]
    """A connection whose connect attempt gives up after ``connect_timeout``.

    libpq's ``connect_timeout`` is not applied to asynchronous connections, so an
    unanswered SYN would otherwise leave the reconnection loop waiting forever.
    ``prepared`` records the statements PREPAREd on it (see ``ensure_prepared``).
    """

    connect_timeout = 5.0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.prepared: dict[str, Any] = {}

    def connect(self, *args: Any, **kwargs: Any) -> Deferred[Any]:
        attempt: Deferred[Any] = super().connect(*args, **kwargs)
        if attempt.called:
            return attempt
        return within(self.reactor, attempt, self.connect_timeout).addErrback(self._give_up)

    def doRead(self) -> None:
        try:
            super().doRead()
        except psycopg2.Error as error:
            # The server closed an idle connection (restart, failover): heal it now rather
            # than on its next use, and without an "Unhandled Error" in the log.
            self.reactor.removeReader(self)
            self.detector.checkForDeadConnection(Failure(error))

    def _give_up(self, failure: Failure) -> NoReturn:
        failure.trap(defer.TimeoutError)
        # The attempt still polls: closing ends it (its own failure goes nowhere: the
        # deadline has answered already), and the next attempt starts afresh.
        with contextlib.suppress(Exception):  # the socket may already be gone
            self.close()
        raise psycopg2.OperationalError("timeout while connecting to PostgreSQL")


class HealingPool:
    """A fixed-size pool of self-healing txpostgres connections."""

    def __init__(
        self,
        reactor: Any,
        dsn: str,
        size: int,
        connect_timeout: float = 5.0,
        on_reconnect: Callable[[], None] | None = None,
    ) -> None:
        self._reactor = reactor
        self._dsn = dsn
        self._connections: list[PooledConnection] = []
        self._idle: list[PooledConnection] = []
        self._semaphore = DeferredSemaphore(size)
        self._on_reconnect = on_reconnect or (lambda: None)
        self._closed = False
        for _ in range(size):
            connection = PooledConnection(reactor=reactor)
            connection.connect_timeout = connect_timeout
            connection.detector = _Detector(reactor, self._state_changed)
            self._connections.append(connection)
            self._idle.append(connection)

    def _state_changed(self) -> None:
        if not self._closed:
            self._on_reconnect()

    def start(self) -> Deferred[None]:
        """Connect every connection; fires once each has tried once, whatever the outcome."""
        attempts = []
        for connection in self._connections:
            d = connection.connect(self._dsn)
            d.addErrback(connection.detector.checkForDeadConnection)
            d.addErrback(lambda _: None)
            attempts.append(d)
        return defer.gatherResults(attempts).addCallback(lambda _: None)

    @property
    def live(self) -> int:
        """How many connections are currently usable."""
        return sum(1 for c in self._connections if self._usable(c))

    @staticmethod
    def _usable(connection: PooledConnection) -> bool:
        raw = raw_connection(connection)
        return (
            raw is not None
            and not raw.closed
            and not connection.detector.connectionIsDead
        )

    def close(self) -> None:
        self._closed = True
        for connection in self._connections:
            connection.detector.stop()
            try:
                if raw_connection(connection) is not None:
                    connection.close()
            except Exception:  # noqa: S110 - closing a dead connection may fail; nothing to do
                pass

    def _checkout(self) -> PooledConnection:
        for connection in self._idle:
            if self._usable(connection):
                self._idle.remove(connection)
                return connection
        return self._idle.pop()

    def with_connection(self, work: Callable[[PooledConnection], Deferred[T]]) -> Deferred[T]:
        """Run ``work`` with one connection of its own (a live one if there is one)."""
        def run() -> Deferred[T]:
            if self._closed:
                return defer.fail(ConnectionDead("the pool is closed"))
            connection = self._checkout()

            def put_back(result: Any) -> Any:
                self._idle.append(connection)
                return result

            return work(connection).addBoth(put_back)

        return self._semaphore.run(run)

    def run_query(self, sql: Any, params: Any = None) -> Deferred[list[tuple[Any, ...]]]:
        return self.with_connection(lambda c: c.runQuery(sql, params))

    def run_prepared(
        self, name: str, statement: str, params: tuple[Any, ...]
    ) -> Deferred[list[tuple[Any, ...]]]:
        """Run a hot read as a server-side prepared statement (planned once per connection).

        ``statement`` uses ``$1, $2 ...``; it is PREPAREd on each connection the first time
        that connection runs it, and again after the connection is re-established.
        """

        async def run(connection: PooledConnection) -> list[tuple[Any, ...]]:
            return await run_prepared(connection, name, statement, params,
                                      connection.runOperation, connection.runQuery)

        return self.with_connection(lambda c: Deferred.fromCoroutine(run(c)))

    def run_operation(self, sql: str, params: Any = None) -> Deferred[None]:
        return self.with_connection(lambda c: c.runOperation(sql, params))

    def run_interaction(
        self, interaction: Callable[[Any], Awaitable[T]]
    ) -> Deferred[T]:
        """Run ``async def interaction(cursor)`` in one transaction.

        txpostgres would commit at once if handed a coroutine function: it does not await
        it. Wrapping it in ``Deferred.fromCoroutine`` makes the commit wait for it.
        """

        def transact(cursor: Any) -> Deferred[T]:
            return Deferred.fromCoroutine(_as_coroutine(interaction(cursor)))

        return self.with_connection(lambda c: c.runInteraction(transact))


async def ensure_prepared(connection: PooledConnection, name: str, statement: str,
                          operation: Callable[[str], Awaitable[Any]]) -> None:
    """PREPARE ``statement`` as ``name`` unless this connection (this libpq session: a
    reconnected connection is a new one) has already."""
    raw = raw_connection(connection)
    if connection.prepared.get(name) is not raw:
        await operation(f"PREPARE {name} AS {statement}")
        connection.prepared[name] = raw


_NAMED = re.compile(r"%\((\w+)\)s|%%")


@functools.lru_cache(maxsize=128)
def positional(statement: str) -> tuple[str, tuple[str, ...]]:
    """``statement`` with its ``%(name)s`` parameters turned into ``$1, $2 ...`` (for
    PREPARE), and the names in that order (for the EXECUTE that passes them)."""
    names: list[str] = []

    def number(match: re.Match[str]) -> str:
        if match.group(0) == "%%":
            return "%"
        name = match.group(1)
        if name not in names:
            names.append(name)
        return f"${names.index(name) + 1}"

    return _NAMED.sub(number, statement), tuple(names)


@functools.lru_cache(maxsize=128)
def statement_name(statement: str) -> str:
    """A name that changes whenever the statement does (variants get their own plans)."""
    return "dpvoip_" + hashlib.sha1(statement.encode(), usedforsecurity=False).hexdigest()[:16]


async def run_prepared(
    connection: PooledConnection, name: str, statement: str, params: tuple[Any, ...],
    operation: Callable[[str], Awaitable[Any]],
    query: Callable[[str, tuple[Any, ...]], Awaitable[list[tuple[Any, ...]]]],
) -> list[tuple[Any, ...]]:
    """EXECUTE ``name``, PREPAREd first if this connection has not prepared it yet."""
    await ensure_prepared(connection, name, statement, operation)
    placeholders = ", ".join(["%s"] * len(params))
    return await query(f"EXECUTE {name} ({placeholders})" if params else f"EXECUTE {name}",
                       params)


async def _as_coroutine(awaitable: Awaitable[T]) -> T:
    return await awaitable

