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
import itertools
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
from dpvoip.internals import raw_connection, tolerate_closed_descriptors

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


def _close_if_dropped(raw: Any) -> None:
    """Mark a psycopg2 connection closed when libpq has already dropped its socket.

    libpq closes the socket of a session it finds broken (the server hung up during a
    connect attempt, a send failed), but psycopg2 sets ``closed`` only on some of those
    paths: on the others it reports an open connection whose ``fileno()`` is -1.
    txpostgres decides with ``closed`` whether to watch the socket again, and asking the
    reactor to watch descriptor -1 raises ``ValueError`` inside the reactor ("Unhandled
    Error"). Closing the psycopg2 connection (a no-op for libpq, which has nothing left
    to close) makes every such check see what is true: the session is gone.
    """
    if raw is not None and not raw.closed and raw.fileno() < 0:
        raw.close()


class PooledCursor(txpostgres.Cursor):  # type: ignore[misc]
    """A cursor that keeps the reactor's view of its connection's socket true.

    libpq closes the socket of a session it finds broken, sometimes inside the very call
    that sends a statement. txpostgres stops watching the connection's socket only once
    the statement is sent (``cursorRunning``); a socket closed while the reactor still
    watches it cannot be taken out of epoll any more (``EBADF``, leaving the reactor's own
    records wrong for whichever socket gets the number next). So the connection's socket
    is unwatched before each statement, and watched again if the statement was refused
    before anything was sent on a session that is still there. And a poll never leaves a
    dropped socket looking open (see ``_close_if_dropped``): txpostgres watches the
    connection's socket again after each statement unless the connection is closed.
    """

    def __init__(self, cursor: Any, connection: PooledConnection) -> None:
        super().__init__(cursor, connection)
        self.owner = connection

    def execute(self, query: Any, params: Any = None) -> Deferred[Any]:
        self.reactor.removeReader(self.owner)
        started: Deferred[Any] = super().execute(query, params)
        if started.called and not self.owner.gone:  # refused at once: nothing was sent
            self.reactor.addReader(self.owner)
        return started

    def continuePolling(self, swallowErrors: bool = False) -> None:
        try:
            super().continuePolling(swallowErrors)
        finally:
            _close_if_dropped(self.pollable())


class PooledConnection(txpostgres.Connection):  # type: ignore[misc]
    """A connection that gives up connecting after ``connect_timeout``, heals when its
    socket goes away, and rolls back quietly what a lost session took with it.

    libpq's ``connect_timeout`` is not applied to asynchronous connections, so an
    unanswered SYN would otherwise leave the reconnection loop waiting forever.
    ``prepared`` records the statements PREPAREd on it (see ``ensure_prepared``).
    """

    connect_timeout = 5.0
    cursorFactory = PooledCursor

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.prepared: dict[str, Any] = {}
        tolerate_closed_descriptors(self.reactor)

    @property
    def gone(self) -> bool:
        """Whether there is no usable session: never connected, closed, or its socket
        dropped by libpq (which psycopg2 may still call open)."""
        raw = raw_connection(self)
        return raw is None or bool(raw.closed) or raw.fileno() < 0

    def connect(self, *args: Any, **kwargs: Any) -> Deferred[Any]:
        attempt: Deferred[Any] = super().connect(*args, **kwargs)
        if attempt.called:
            return attempt
        return within(self.reactor, attempt, self.connect_timeout).addErrback(self._give_up)

    def continuePolling(self, swallowErrors: bool = False) -> None:
        # A connect attempt the server hung up on (PostgreSQL shutting down or starting)
        # fails here with its socket dropped; txpostgres' doRead then watches the socket
        # again unless the connection is closed (see ``_close_if_dropped``).
        try:
            super().continuePolling(swallowErrors)
        finally:
            _close_if_dropped(raw_connection(self))

    def doRead(self) -> None:
        try:
            super().doRead()
        except psycopg2.Error as error:
            # The server closed an idle connection (restart, failover): heal it now rather
            # than on its next use, and without an "Unhandled Error" in the log.
            self.reactor.removeReader(self)
            self.start_over(Failure(error))

    def doWrite(self) -> None:
        try:
            super().doWrite()
        except psycopg2.Error as error:
            # A connect attempt nobody waits for any more (given up after connect_timeout)
            # that the server refuses as it shuts down ("the database system is shutting
            # down"): heal it, as doRead does, without an "Unhandled Error" in the log.
            self.reactor.removeWriter(self)
            self.start_over(Failure(error))

    def notice_loss(self, failure: Failure) -> None:
        """After ``failure`` of work done on this connection: if the session is gone,
        have the detector reconnect it (a no-op when it already does)."""
        if self.gone:
            self.start_over(failure)

    def start_over(self, reason: Failure) -> None:
        """Have the detector replace this session with a new one, for ``reason`` (a
        no-op while it is already reconnecting)."""
        if self.detector is None:
            return
        if not self.detector.deathChecker(reason):
            reason = Failure(psycopg2.OperationalError(
                f"the connection to PostgreSQL is gone ({summary(reason.value or '')})"))
        self.detector.checkForDeadConnection(reason)

    def run_transaction(self, interaction: Callable[[Any], Awaitable[T]]) -> Deferred[T]:
        """Run ``interaction(cursor)`` between BEGIN and COMMIT (ROLLBACK if it fails).

        txpostgres' ``runInteraction`` does the same but logs any failed ROLLBACK as an
        error and answers ``RollbackFailed`` instead of the error that ended the
        transaction, "cursor already closed" included: the ROLLBACK that must fail when
        the connection died during the transaction (PostgreSQL ended the transaction with
        the session). Here that is expected and quiet, and the caller gets the error that
        says the database is unavailable (see ``roll_back``). Like ``runInteraction``, it
        waits for this connection's lock and fails fast with ``ConnectionDead`` while the
        connection is being re-established.
        """

        async def transaction() -> T:
            cursor = self.cursor()
            await cursor.execute("BEGIN")
            try:
                result = await interaction(cursor)
                await cursor.execute("COMMIT")
            except Exception:  # CancelledError included
                await roll_back(self, cursor)
                raise
            return result

        def checked() -> Deferred[T]:
            if self.detector is None:
                return Deferred.fromCoroutine(transaction())
            return self.detector.callChecking(  # type: ignore[no-any-return]
                lambda: Deferred.fromCoroutine(transaction()))

        return self.lock.run(checked)  # type: ignore[no-any-return]

    def _give_up(self, failure: Failure) -> NoReturn:
        failure.trap(defer.TimeoutError)
        # The attempt still polls: closing ends it (its own failure goes nowhere: the
        # deadline has answered already), and the next attempt starts afresh.
        with contextlib.suppress(Exception):  # the socket may already be gone
            self.close()
        raise psycopg2.OperationalError("timeout while connecting to PostgreSQL")


async def roll_back(connection: PooledConnection, cursor: Any) -> None:
    """ROLLBACK the transaction open on ``cursor``; never raises, so the caller keeps the
    error that ended the transaction.

    When the connection is gone, so is its transaction: PostgreSQL rolls back whatever a
    lost session left open. The ROLLBACK then cannot be sent (psycopg2: "cursor already
    closed") or its answer cannot come: expected, and said at info level. A ROLLBACK that
    fails on a live connection is a real error: logged as one, and the session, which may
    still hold the transaction open, is replaced.
    """
    if connection.gone:
        log.info("database transaction ended with its connection: nothing to roll back")
        return
    try:
        await cursor.execute("ROLLBACK")
    except Exception as error:
        if connection.gone:
            log.info("database transaction ended with its connection ({error})",
                     error=summary(error))
            return
        failure = Failure(error)
        log.failure("ROLLBACK failed on a live database connection; replacing it", failure)
        connection.start_over(Failure(txpostgres.RollbackFailed(connection, failure)))


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
        return not connection.gone and not connection.detector.connectionIsDead

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
            if connection.gone:
                # Not connected (PostgreSQL is still coming back): the work would reach for
                # a cursor of nothing. Said as what it is, so that it is kept and retried.
                self._idle.append(connection)
                dead = Failure(ConnectionDead("no connection to PostgreSQL yet"))
                connection.notice_loss(dead)  # have it healed (a no-op while it is)
                return defer.fail(dead)

            def put_back(result: Any) -> Any:
                self._idle.append(connection)
                return result

            def heal(failure: Failure) -> Failure:
                # Work that runs its own cursors (batches) bypasses txpostgres' detector:
                # a session lost under it is reported here, as runQuery reports its own.
                connection.notice_loss(failure)
                return failure

            return work(connection).addErrback(heal).addBoth(put_back)

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
        """Run ``async def interaction(cursor)`` in one transaction that commits when
        it is done (see ``PooledConnection.run_transaction``)."""
        return self.with_connection(lambda c: c.run_transaction(interaction))


async def ensure_prepared(connection: PooledConnection, name: str, statement: str,
                          operation: Callable[[str], Awaitable[Any]]) -> None:
    """PREPARE ``statement`` as ``name`` unless this connection (this libpq session: a
    reconnected connection is a new one) has already."""
    raw = raw_connection(connection)
    if connection.prepared.get(name) is not raw:
        await operation(f"PREPARE {name} AS {statement}")
        connection.prepared[name] = raw


@functools.lru_cache(maxsize=64)
def numbered(statement: str) -> str:
    """``statement`` with its ``%s`` parameters numbered ``$1, $2 ...`` (for PREPARE)."""
    count = itertools.count(1)
    return re.sub(r"%s|%%", lambda m: "%" if m.group(0) == "%%" else f"${next(count)}",
                  statement)


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

