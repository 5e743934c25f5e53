"""The pool and the store against a real PostgreSQL: healing, starting while it is down,
transactions that commit only when the interaction is done, writes that survive a
cancelled caller, and connect attempts that never hang."""

from __future__ import annotations

import contextlib
import shutil
import socket
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any, cast

import psycopg2
from psycopg2.extensions import POLL_OK, parse_dsn
from twisted.internet import defer, protocol, reactor, threads
from twisted.internet.endpoints import UNIXClientEndpoint, connectProtocol
from twisted.internet.task import Clock, deferLater
from twisted.trial.unittest import SynchronousTestCase, TestCase

from dpvoip.config import DatabaseSettings
from dpvoip.store.database import Batch, Store, is_unavailable
from dpvoip.store.dsn import connection_dsn, describe
from dpvoip.store.embedded import EmbeddedPostgres
from dpvoip.store.pool import ConnectionDead, HealingPool, PooledConnection, backoff_delays
from test.support.postgres import postgres, query, take_down


async def eventually(check: Any, seconds: float = 120.0, step: float = 0.1) -> None:
    """Poll ``check()`` (sync or returning a Deferred) until it is true, or fail after
    ``seconds`` of polling: a hang detector, not a bound a busy machine must meet."""
    waited = 0.0
    while waited < seconds:
        result = check()
        if isinstance(result, defer.Deferred):
            result = await result
        if result:
            return
        await deferLater(reactor, step, lambda: None)
        waited += step
    raise AssertionError(f"condition not met within {seconds}s")


class DsnTests(SynchronousTestCase):
    def test_keepalives_timeouts_and_name_are_added(self) -> None:
        settings = replace(DatabaseSettings(), keepalives_idle=20, statement_timeout=2.5)
        parts = parse_dsn(connection_dsn("postgresql://crm:pw@db.example:5433/crm", settings))
        self.assertEqual(parts["host"], "db.example")
        self.assertEqual(parts["port"], "5433")
        self.assertEqual(parts["keepalives"], "1")
        self.assertEqual(parts["keepalives_idle"], "20")
        self.assertEqual(parts["keepalives_interval"], "10")
        self.assertEqual(parts["keepalives_count"], "3")
        self.assertEqual(parts["connect_timeout"], "5")
        self.assertEqual(parts["application_name"], "dpvoip")
        self.assertEqual(parts["options"],
                         "-c statement_timeout=2500 -c plan_cache_mode=force_generic_plan")

    def test_description_hides_the_password(self) -> None:
        dsn = connection_dsn("postgresql://crm:hunter2@db.example/crm", DatabaseSettings())
        shown = describe(dsn)
        self.assertNotIn("hunter2", shown)
        self.assertEqual(shown, "crm@db.example:5432/crm")

    def test_backoff_starts_at_once_grows_and_is_capped(self) -> None:
        delays = backoff_delays(initial=0.5, cap=5.0)
        first = [next(delays) for _ in range(40)]
        self.assertEqual(first[0], 0.0)
        self.assertLess(first[1], first[4])
        self.assertTrue(all(d <= 5.0 for d in first))
        self.assertTrue(all(d >= 4.5 for d in first[10:]))


class _HeldPool:
    """A pool whose transactions finish when the test says."""

    def __init__(self) -> None:
        self.transactions: list[defer.Deferred[None]] = []

    def run_interaction(self, interaction: Any) -> defer.Deferred[None]:
        self.transactions.append(defer.Deferred())
        return self.transactions[-1]


async def _nothing(cursor: Any) -> None:
    pass


class DrainTests(SynchronousTestCase):
    """Shutdown waits for the writes under way, on a Clock."""

    def setUp(self) -> None:
        self.pool = _HeldPool()
        self.clock = Clock()
        self.store = Store(cast(Any, self.pool), self.clock)

    def test_nothing_under_way_is_drained_at_once(self) -> None:
        self.assertIsNone(self.successResultOf(self.store.drain(5)))

    def test_a_write_started_as_the_last_one_ends_is_waited_for_too(self) -> None:
        first = self.store.write(_nothing)
        first.addCallback(lambda _: self.store.write(_nothing))  # the spool's next record
        drained = self.store.drain(5)
        self.pool.transactions[0].callback(None)
        self.assertNoResult(drained)
        self.assertEqual(self.store.writes_in_flight, 1)
        self.pool.transactions[1].callback(None)
        self.assertIsNone(self.successResultOf(drained))
        self.assertEqual(self.store.writes_in_flight, 0)

    def test_drain_gives_up_after_its_timeout(self) -> None:
        self.store.write(_nothing)
        drained = self.store.drain(5)
        self.clock.advance(4.9)
        self.assertNoResult(drained)
        self.clock.advance(0.1)
        self.assertIsNone(self.successResultOf(drained))
        self.assertEqual(self.store.writes_in_flight, 1)  # left to finish on its own


class PoolOnSharedServerTests(TestCase):
    timeout = 60

    def setUp(self) -> None:
        self.dsn = postgres().new_database(crm=None)
        settings = DatabaseSettings()
        self.pool = HealingPool(reactor, connection_dsn(self.dsn, settings), 3)
        self.addCleanup(self.pool.close)
        self.store = Store(self.pool, reactor)
        query(self.dsn, "CREATE TABLE note (id serial PRIMARY KEY, text text NOT NULL)")

    async def _start(self) -> None:
        await self.pool.start()
        self.assertEqual(self.pool.live, 3)

    @defer.inlineCallbacks
    def test_statement_timeout_from_the_dsn_is_in_force(self) -> Any:
        yield defer.Deferred.fromCoroutine(self._start())
        rows = yield self.pool.run_query("SHOW statement_timeout")
        self.assertEqual(rows, [("10s",)])

    @defer.inlineCallbacks
    def test_a_hot_statement_is_not_planned_again_once_its_table_has_grown(self) -> Any:
        # A prepared statement first run while its table is small, as dpvoip's are after
        # an install: once the table has grown, PostgreSQL would plan every execution
        # again on that connection (the generic plan then looks dearer than the first
        # custom plans did), and keep doing so for as long as the connection lives.
        pool = HealingPool(reactor, connection_dsn(self.dsn, DatabaseSettings()), 1)
        self.addCleanup(pool.close)
        yield pool.start()
        query(self.dsn, "CREATE TABLE grows (k text, v text); CREATE INDEX ON grows (k)")
        statement = ("SELECT ev.k, (SELECT count(*) FROM grows WHERE grows.k = ev.k)"
                     " FROM json_to_recordset($1::json) AS ev(k text)")

        @defer.inlineCallbacks
        def run(times: int) -> Any:
            for n in range(times):
                yield pool.run_prepared("dpvoip_grows", statement,
                                        (f'[{{"k": "k{n}"}}]',))

        yield run(8)
        query(self.dsn, "INSERT INTO grows (k, v) SELECT 'k' || (g % 50), 'x'"
                        " FROM generate_series(1, 100000) g; ANALYZE grows")
        yield run(20)
        rows = yield pool.run_query("SELECT generic_plans, custom_plans"
                                    " FROM pg_prepared_statements WHERE name = 'dpvoip_grows'")
        self.assertEqual(rows, [(28, 0)])

    @defer.inlineCallbacks
    def test_async_interaction_commits_only_when_it_is_done(self) -> Any:
        yield defer.Deferred.fromCoroutine(self._start())

        async def two_inserts(cursor: Any) -> str:
            await cursor.execute("INSERT INTO note (text) VALUES ('first')")
            await cursor.execute("SELECT pg_sleep(0.2)")
            await cursor.execute("INSERT INTO note (text) VALUES ('second')")
            return "done"

        result = yield self.store.write(two_inserts)
        self.assertEqual(result, "done")
        self.assertEqual(query(self.dsn, "SELECT text FROM note ORDER BY id"),
                         [("first",), ("second",)])

    @defer.inlineCallbacks
    def test_a_failing_interaction_rolls_back_everything(self) -> Any:
        yield defer.Deferred.fromCoroutine(self._start())

        async def half(cursor: Any) -> None:
            await cursor.execute("INSERT INTO note (text) VALUES ('lost')")
            raise ValueError("bad input")

        with self.assertRaises(ValueError):
            yield self.store.write(half)
        self.assertEqual(query(self.dsn, "SELECT count(*) FROM note"), [(0,)])

    @defer.inlineCallbacks
    def test_a_cancelled_caller_does_not_roll_the_write_back(self) -> Any:
        yield defer.Deferred.fromCoroutine(self._start())

        async def slow_write(cursor: Any) -> None:
            await cursor.execute("INSERT INTO note (text) VALUES ('kept')")
            await cursor.execute("SELECT pg_sleep(0.3)")

        caller = self.store.write(slow_write)
        self.assertEqual(self.store.writes_in_flight, 1)
        caller.cancel()  # what Klein does when the HTTP client goes away
        with self.assertRaises(defer.CancelledError):
            yield caller
        yield self.store.drain(5)
        self.assertEqual(self.store.writes_in_flight, 0)
        self.assertEqual(query(self.dsn, "SELECT text FROM note"), [("kept",)])

    @defer.inlineCallbacks
    def test_drain_waits_for_writes_under_way(self) -> Any:
        yield defer.Deferred.fromCoroutine(self._start())

        async def slow_write(cursor: Any) -> None:
            await cursor.execute("SELECT pg_sleep(0.3)")
            await cursor.execute("INSERT INTO note (text) VALUES ('late')")

        self.store.write(slow_write)
        yield self.store.drain(5)
        self.assertEqual(query(self.dsn, "SELECT text FROM note"), [("late",)])

    @defer.inlineCallbacks
    def test_state_reports_reachable(self) -> Any:
        yield defer.Deferred.fromCoroutine(self._start())
        state = yield self.store.state()
        self.assertTrue(state.reachable)
        self.assertEqual(state.live_connections, 3)


class _Silent(protocol.Protocol):
    """A peer that accepts the TCP connection and never says a word (a hung server)."""


class ConnectTimeoutTests(TestCase):
    """A hung server: without the connect deadline these would wait for ever (trial's
    timeout would end them)."""

    timeout = 30

    def silent_dsn(self) -> str:
        factory = protocol.ServerFactory()
        factory.protocol = _Silent
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        address: Any = port.getHost()
        return f"host=127.0.0.1 port={address.port} dbname=x user=x"

    async def test_an_attempt_gives_up_and_the_next_one_starts_afresh(self) -> None:
        connection = PooledConnection(reactor=reactor)
        connection.connect_timeout = 0.2
        dsn = self.silent_dsn()
        for _ in range(2):  # the first attempt's leftovers do not block the second
            with self.assertRaises(psycopg2.OperationalError) as raised:
                await connection.connect(dsn)
            self.assertEqual(str(raised.exception), "timeout while connecting to PostgreSQL")

    @defer.inlineCallbacks
    def test_a_server_that_never_answers_does_not_hang_the_pool(self) -> Any:
        pool = HealingPool(reactor, self.silent_dsn(), 2, connect_timeout=0.5)
        self.addCleanup(pool.close)
        yield pool.start()
        self.assertEqual(pool.live, 0)
        with self.assertRaises(ConnectionDead):
            yield pool.run_query("SELECT 1")
        state = yield Store(pool, reactor).state(timeout=0.5)
        self.assertFalse(state.reachable)


class HealingTests(TestCase):
    """A private cluster that the tests stop, start and restart."""

    timeout = 120

    def setUp(self) -> Any:
        self.folder = Path(tempfile.mkdtemp(prefix="dpvoip-heal-"))
        self.folder.chmod(0o755)
        self.addCleanup(shutil.rmtree, self.folder, True)
        self.cluster = EmbeddedPostgres(self.folder / "pg")
        self.addCleanup(self.cluster.stop, "immediate")
        return threads.deferToThread(self.cluster.initialise)

    def _pool(self, size: int, on_reconnect: Any = None) -> HealingPool:
        dsn = connection_dsn(self.cluster.dsn(), DatabaseSettings())
        pool = HealingPool(reactor, dsn, size, connect_timeout=2, on_reconnect=on_reconnect)
        self.addCleanup(pool.close)
        return pool

    async def _backends(self, pool: HealingPool, n: int) -> set[int]:
        """Backend pids of ``n`` queries run at once: one per pooled connection."""
        rows = await defer.gatherResults(
            [pool.run_query("SELECT pg_backend_pid(), pg_sleep(0.05)") for _ in range(n)]
        )
        return {r[0][0] for r in rows}

    @defer.inlineCallbacks
    def test_starts_while_postgres_is_down_and_connects_when_it_comes(self) -> Any:
        pool = self._pool(3)
        yield pool.start()  # PostgreSQL is not running: start must not fail
        self.assertEqual(pool.live, 0)
        with self.assertRaises(ConnectionDead):
            yield pool.run_query("SELECT 1")
        # A transaction of the store's (its own cursor, no txpostgres query) is told the
        # same, not an AttributeError that the spool's replay would take for a bad record.
        store = Store(pool, reactor)
        with self.assertRaises(ConnectionDead):
            yield store.batch(lambda batch: batch.run("SELECT 1"))
        with self.assertRaises(ConnectionDead):
            yield store.write_one("SELECT 1")
        yield threads.deferToThread(self.cluster.start)
        yield defer.Deferred.fromCoroutine(eventually(lambda: pool.live == 3))
        pids = yield defer.Deferred.fromCoroutine(self._backends(pool, 3))
        self.assertEqual(len(pids), 3)

    @defer.inlineCallbacks
    def test_every_connection_heals_after_a_postgres_restart(self) -> Any:
        yield threads.deferToThread(self.cluster.start)
        recovered: list[None] = []
        pool = self._pool(3, on_reconnect=lambda: recovered.append(None))
        yield pool.start()
        before = yield defer.Deferred.fromCoroutine(self._backends(pool, 3))
        self.assertEqual(len(before), 3)

        yield threads.deferToThread(take_down, self.cluster)
        # Every connection finds out on its next use, and reconnects on its own.
        for _ in range(3):
            with contextlib.suppress(Exception):  # the point is that these fail now
                yield pool.run_query("SELECT 1")
        yield threads.deferToThread(self.cluster.start)
        yield defer.Deferred.fromCoroutine(eventually(lambda: pool.live == 3))
        after = yield defer.Deferred.fromCoroutine(self._backends(pool, 3))
        self.assertEqual(len(after), 3)
        self.assertFalse(before & after, "the old backends died with the restart")
        self.assertTrue(recovered, "the pool told its owner about the reconnection")

    @defer.inlineCallbacks
    def test_prepared_statements_are_prepared_again_after_a_restart(self) -> Any:
        yield threads.deferToThread(self.cluster.start)
        pool = self._pool(2)
        yield pool.start()
        statement = "SELECT $1::int * 2"
        for n in range(4):  # both connections prepare it once and reuse it
            rows = yield pool.run_prepared("double", statement, (n,))
            self.assertEqual(rows, [(n * 2,)])
        yield threads.deferToThread(take_down, self.cluster)
        yield threads.deferToThread(self.cluster.start)
        yield defer.Deferred.fromCoroutine(eventually(lambda: pool.live == 2))
        for n in range(4):
            rows = yield pool.run_prepared("double", statement, (n,))
            self.assertEqual(rows, [(n * 2,)])


# -- sessions that go away under the pool -------------------------------------------------


class _HangUpAfterStartup(protocol.Protocol):
    """A server that reads the startup packet and hangs up without a word: what a client
    sees when PostgreSQL closes its listening socket with the connection still queued
    (a restart), and what leaves libpq with its socket dropped mid-connect."""

    def dataReceived(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.loseConnection()


class _ToPostgres(protocol.Protocol):
    """The PostgreSQL end of a ``_Forwarder`` connection."""

    def __init__(self, client: _FromClient) -> None:
        self.client = client

    def connectionMade(self) -> None:
        self.client.peer = self
        cast(Any, self.client.transport).resumeProducing()

    def dataReceived(self, data: bytes) -> None:
        assert self.client.transport is not None
        self.client.transport.write(data)

    def connectionLost(self, reason: Any = None) -> None:
        if self.client.transport is not None:
            self.client.transport.loseConnection()


class _FromClient(protocol.Protocol):
    """A client of a ``_Forwarder``: hung up on after its startup packet while the
    forwarder still refuses, otherwise forwarded to PostgreSQL's unix socket."""

    def __init__(self, forwarder: _Forwarder) -> None:
        self.forwarder = forwarder
        self.peer: _ToPostgres | None = None
        self.refused = False

    def connectionMade(self) -> None:
        assert self.transport is not None
        if self.forwarder.refusals > 0:
            self.forwarder.refusals -= 1
            self.refused = True
            return
        transport = cast(Any, self.transport)
        transport.pauseProducing()  # nothing to forward to yet
        endpoint = UNIXClientEndpoint(reactor, self.forwarder.socket_path)
        connectProtocol(endpoint, _ToPostgres(self)).addErrback(
            lambda _: transport.loseConnection())

    def dataReceived(self, data: bytes) -> None:
        assert self.transport is not None
        if self.refused:
            self.transport.loseConnection()
        elif self.peer is not None and self.peer.transport is not None:
            self.peer.transport.write(data)

    def connectionLost(self, reason: Any = None) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.loseConnection()


class _Forwarder(protocol.ServerFactory):
    """A TCP port in front of the test PostgreSQL that hangs up on the first
    ``refusals`` connections after their startup packet (``_HangUpAfterStartup``)."""

    def __init__(self, dsn: str, refusals: int) -> None:
        parts = parse_dsn(dsn)
        self.socket_path = f"{parts['host']}/.s.PGSQL.{parts.get('port', '5432')}"
        self.refusals = refusals

    def buildProtocol(self, addr: Any) -> _FromClient:
        return _FromClient(self)


class _Recovery:
    """The pool's ``on_reconnect``: fires the waiters whose condition has come true."""

    def __init__(self) -> None:
        self.waiting: list[tuple[Any, defer.Deferred[None]]] = []

    def __call__(self) -> None:
        for entry in list(self.waiting):
            if entry[0]():
                self.waiting.remove(entry)
                entry[1].callback(None)

    def until(self, condition: Any) -> defer.Deferred[None]:
        if condition():
            return defer.succeed(None)
        waiter: defer.Deferred[None] = defer.Deferred()
        self.waiting.append((condition, waiter))
        return waiter


def _tcp_dsn(port: Any, dsn: str = "dbname=x user=x") -> str:
    """``dsn`` reached through 127.0.0.1:``port`` (no SSL or GSS negotiation: the
    startup packet is the first thing sent)."""
    parts = parse_dsn(dsn)
    parts.update(host="127.0.0.1", port=str(port.getHost().port), sslmode="disable",
                 gssencmode="disable")
    return " ".join(f"{key}={value}" for key, value in parts.items())


class SocketGoneWhileConnectingTests(TestCase):
    """A connect attempt whose socket libpq drops (psycopg2 still calls the connection
    open, its ``fileno()`` is -1): it fails like any other, and nothing asks the reactor
    to watch descriptor -1 (``ValueError``, an "Unhandled Error" in the reactor)."""

    timeout = 60

    def listen(self, factory: protocol.ServerFactory) -> Any:
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        return port

    async def test_a_server_hanging_up_mid_connect_is_a_failed_attempt(self) -> None:
        factory = protocol.ServerFactory()
        factory.protocol = _HangUpAfterStartup
        connection = PooledConnection(reactor=reactor)
        with self.assertRaises(psycopg2.OperationalError):
            await connection.connect(_tcp_dsn(self.listen(factory)))
        self.assertEqual(self.flushLoggedErrors(ValueError), [])
        self.assertTrue(connection.gone)
        self.assertNotIn(connection, reactor.getReaders())
        self.assertNotIn(connection, reactor.getWriters())

    async def test_the_pool_connects_once_the_server_answers(self) -> None:
        dsn = postgres().new_database(crm=None)
        forwarder = _Forwarder(dsn, refusals=2)  # the start, and the first retry at once
        recovery = _Recovery()
        pool = HealingPool(reactor, _tcp_dsn(self.listen(forwarder), dsn), 1,
                           on_reconnect=recovery)
        self.addCleanup(pool.close)
        await pool.start()
        self.assertEqual(pool.live, 0)
        await recovery.until(lambda: pool.live == 1)
        self.assertEqual(forwarder.refusals, 0)
        self.assertEqual(await pool.run_query("SELECT 1"), [(1,)])
        self.assertEqual(self.flushLoggedErrors(ValueError), [])


class _DroppingDriver:
    """A psycopg2 connection stand-in on one end of a socket pair, whose sending fails as
    libpq's does when it finds the peer gone: socket closed, ``fileno()`` -1, and still
    not ``closed`` (psycopg2 marks it closed on some failures only)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.socket, self.peer = socket.socketpair()
        self.closed = 0
        self.notifies: list[Any] = []

    def fileno(self) -> int:
        return self.socket.fileno()  # -1 once closed

    def poll(self) -> int:
        return POLL_OK

    def cursor(self) -> _DroppingCursor:
        return _DroppingCursor(self)

    def close(self) -> None:
        self.closed = 1
        self.socket.close()
        self.peer.close()


class _DroppingCursor:
    def __init__(self, driver: _DroppingDriver) -> None:
        self.driver = driver

    def execute(self, sql: str, params: Any = None) -> None:
        self.driver.socket.close()
        raise psycopg2.OperationalError("server closed the connection unexpectedly")


class SocketGoneWhileSendingTests(TestCase):
    """libpq closing the socket inside the call that sends a statement: the reactor was
    watching it (an idle connection waits for the server's word), and a closed descriptor
    cannot be taken out of epoll any more (``EBADF``, the reactor's records then wrong for
    whichever socket gets the number next): it is no longer watched by then."""

    async def test_a_statement_that_finds_the_peer_gone(self) -> None:
        connection = PooledConnection(reactor=reactor)
        connection.connectionFactory = _DroppingDriver
        await connection.connect("dbname=x")
        self.assertIn(connection, reactor.getReaders())  # idle: watched
        with self.assertRaises(psycopg2.OperationalError):
            await connection.cursor().execute("SELECT 1")
        self.assertTrue(connection.gone)
        self.assertNotIn(connection, reactor.getReaders())
        connection.close()  # what the detector does before reconnecting: no error


class _Gate:
    """Holds a transaction half-way until the test has killed its backend."""

    def __init__(self) -> None:
        self.reached: defer.Deferred[int] = defer.Deferred()
        self.go: defer.Deferred[None] = defer.Deferred()

    async def hold(self, pid: int) -> None:
        """Tell the test which backend runs the transaction; wait for its word."""
        self.reached.callback(pid)
        await self.go


class SessionLostTests(TestCase):
    """The backend of a pooled connection killed (``pg_terminate_backend``, as a restart
    or a failover does) under a transaction or while idle: the work fails as "database
    unavailable" (the spool keeps it), nothing is logged as an error, the pool heals."""

    timeout = 60

    def setUp(self) -> None:
        self.dsn = postgres().new_database(crm=None)
        query(self.dsn, "CREATE TABLE note (id serial PRIMARY KEY, text text NOT NULL)")
        self.recovery = _Recovery()
        self.pool = HealingPool(reactor, connection_dsn(self.dsn, DatabaseSettings()), 1,
                                on_reconnect=self.recovery)
        self.addCleanup(self.pool.close)
        self.store = Store(self.pool, reactor)

    def kill(self, pid: int) -> None:
        """End backend ``pid`` and wait until it has exited (sent its goodbye and closed
        its socket)."""
        self.assertEqual(query(self.dsn, "SELECT pg_terminate_backend(%s, 60000)", (pid,)),
                         [(True,)])

    async def healed(self) -> None:
        await self.recovery.until(lambda: self.pool.live == 1)
        self.assertEqual(await self.pool.run_query("SELECT count(*) FROM note"), [(0,)])

    async def test_a_transaction_whose_session_is_killed_fails_quietly(self) -> None:
        await self.pool.start()
        gate = _Gate()

        async def write(cursor: Any) -> None:
            await cursor.execute("INSERT INTO note (text) VALUES ('lost')")
            await cursor.execute("SELECT pg_backend_pid()")
            await gate.hold(cursor.fetchall()[0][0])
            await cursor.execute("INSERT INTO note (text) VALUES ('never')")

        written = self.store.write(write)
        self.kill(await gate.reached)
        gate.go.callback(None)  # the next statement meets the dead session
        with self.assertRaises(Exception) as raised:
            await written
        self.assertTrue(is_unavailable(raised.exception), repr(raised.exception))
        self.assertEqual(self.flushLoggedErrors(), [], "a lost session is not an error")
        await self.healed()

    async def test_a_batch_whose_session_is_killed_fails_quietly(self) -> None:
        await self.pool.start()
        gate = _Gate()

        async def steps(batch: Batch) -> None:
            await batch.run("INSERT INTO note (text) VALUES ('lost')")
            [(pid,)] = await batch.run("SELECT pg_backend_pid()")
            await gate.hold(pid)
            await batch.run("INSERT INTO note (text) VALUES ('never')", last=True)

        written = self.store.batch(steps)
        self.kill(await gate.reached)
        gate.go.callback(None)
        with self.assertRaises(Exception) as raised:
            await written
        self.assertTrue(is_unavailable(raised.exception), repr(raised.exception))
        self.assertEqual(self.flushLoggedErrors(), [])
        await self.healed()

    async def test_an_idle_session_killed_just_before_its_next_batch(self) -> None:
        await self.pool.start()
        [(pid,)] = await self.pool.run_query("SELECT pg_backend_pid()")
        self.kill(pid)  # and the batch starts before the reactor has seen the hang-up

        async def steps(batch: Batch) -> None:
            await batch.run("INSERT INTO note (text) VALUES ('x')", last=True)

        with self.assertRaises(Exception) as raised:
            await self.store.batch(steps)
        self.assertTrue(is_unavailable(raised.exception), repr(raised.exception))
        self.assertEqual(self.flushLoggedErrors(), [])
        await self.healed()
