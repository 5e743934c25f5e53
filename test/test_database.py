"""The pool and the store against a real PostgreSQL: healing, starting while it is down,
transactions that commit only when the interaction is done, writes that survive a
cancelled caller, and connect attempts that never hang."""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any, cast

import psycopg2
from psycopg2.extensions import parse_dsn
from twisted.internet import defer, protocol, reactor, threads
from twisted.internet.task import Clock, deferLater
from twisted.trial.unittest import SynchronousTestCase, TestCase

from dpvoip.config import DatabaseSettings
from dpvoip.store.database import Store
from dpvoip.store.dsn import connection_dsn, describe
from dpvoip.store.embedded import EmbeddedPostgres
from dpvoip.store.pool import ConnectionDead, HealingPool, PooledConnection, backoff_delays
from test.support.postgres import postgres, query


async def eventually(check: Any, seconds: float = 20.0, step: float = 0.1) -> None:
    """Poll ``check()`` (sync or returning a Deferred) until it is true, or fail."""
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
        self.assertEqual(parts["options"], "-c statement_timeout=2500")

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

        yield threads.deferToThread(self.cluster.stop, "fast")
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
        yield threads.deferToThread(self.cluster.stop, "fast")
        yield threads.deferToThread(self.cluster.start)
        yield defer.Deferred.fromCoroutine(eventually(lambda: pool.live == 2))
        for n in range(4):
            rows = yield pool.run_prepared("double", statement, (n,))
            self.assertEqual(rows, [(n * 2,)])
