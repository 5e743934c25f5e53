"""dpvoip keeps the plans of its hot statements true to its tables' sizes: a plan made
while a table was nearly empty scans the whole table for ever after (until an ANALYZE),
which made each recorded call cost the database four times as much after 9,000 calls.

The rule with plain numbers; the refresh against the test suite's real PostgreSQL, with a
statement planned once (as the pool's connections plan theirs) while its table was empty.
"""

from __future__ import annotations

from typing import Any

import psycopg2
from twisted.internet import defer, reactor
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase, TestCase

from dpvoip.config import DatabaseSettings
from dpvoip.deferreds import OneShotObserver
from dpvoip.services import StatisticsService
from dpvoip.store.database import Store
from dpvoip.store.dsn import connection_dsn
from dpvoip.store.migrations import prepare
from dpvoip.store.pool import HealingPool
from dpvoip.store.statistics import PlannerStatistics, stale
from test.support.daemon import PATIENCE
from test.support.postgres import postgres
from test.support.waiting import until


class StaleRuleTests(SynchronousTestCase):
    def test_a_young_table_is_analyzed_once_it_has_a_few_hundred_rows(self) -> None:
        self.assertFalse(stale(live_rows=150, changed=150, analyzed=False))
        self.assertTrue(stale(live_rows=250, changed=250, analyzed=False))

    def test_then_again_each_time_it_has_grown_by_a_fifth(self) -> None:
        self.assertFalse(stale(live_rows=1150, changed=150, analyzed=True), "too few writes")
        self.assertFalse(stale(live_rows=10_000 + 1_500, changed=1_500, analyzed=True))
        self.assertTrue(stale(live_rows=10_000 + 2_000, changed=2_000, analyzed=True))

    def test_a_big_table_is_left_to_autovacuum(self) -> None:
        """A million-row CRM table needs 200,000 writes: practically never."""
        self.assertFalse(stale(live_rows=1_000_000 + 50_000, changed=50_000, analyzed=True))


def plan(connection: Any) -> str:
    """The plan the connection's prepared lookup runs with now."""
    with connection.cursor() as cursor:
        cursor.execute("EXPLAIN EXECUTE lookup('6912345678')")
        return "\n".join(row[0] for row in cursor.fetchall())


class PreparedDatabase(TestCase):
    """A fresh database with the CRM's tables and dpvoip's schema, as the daemon prepares
    it."""

    timeout = 2 * PATIENCE

    def setUp(self) -> Any:
        self.dsn = postgres().new_database(crm="2025-12")
        pool = HealingPool(reactor, connection_dsn(self.dsn, DatabaseSettings()), 2)
        self.addCleanup(pool.close)
        self.store = Store(pool, reactor)

        async def ready() -> None:
            await pool.start()
            await self.store.write(lambda c: prepare(c, standalone=False, crm_schema="public"))

        return defer.Deferred.fromCoroutine(ready())

    def writer(self) -> Any:
        connection = psycopg2.connect(self.dsn)
        connection.autocommit = True
        self.addCleanup(connection.close)
        return connection

    def fill(self, connection: Any, rows: int) -> None:
        with connection.cursor() as cursor:
            cursor.execute(
                "INSERT INTO dpvoip.call_detail (call_id, source, direction, remote_number,"
                " started_at) SELECT 'c' || n, 'fritzbox', 'incoming', '69' || lpad(n::text,"
                " 8, '0'), now() FROM generate_series(1, %s) AS n", (rows,))
            cursor.execute("SELECT pg_stat_force_next_flush()")


class RefreshTests(PreparedDatabase):
    @defer.inlineCallbacks
    def test_a_plan_made_on_an_empty_table_is_replanned_once_it_grew(self) -> Any:
        setup = self.writer()
        with setup.cursor() as cursor:  # only dpvoip analyzes it here
            cursor.execute("ALTER TABLE dpvoip.call_detail SET (autovacuum_enabled = off)")
            cursor.execute("ANALYZE dpvoip.call_detail")  # empty, as on a new installation
        hot = self.writer()
        with hot.cursor() as cursor:  # planned once, as the pool's connections do
            cursor.execute("SET plan_cache_mode = force_generic_plan")
            cursor.execute("PREPARE lookup(text) AS SELECT call_id FROM dpvoip.call_detail"
                           " WHERE remote_number = $1 ORDER BY started_at DESC LIMIT 1")
            cursor.execute("EXECUTE lookup('6912345678')")
        self.fill(setup, 20_000)
        self.assertIn("Seq Scan", plan(hot), "the plan of the empty table")

        statistics = PlannerStatistics(self.store)
        analyzed = yield defer.Deferred.fromCoroutine(statistics.refresh())
        self.assertIn("dpvoip.call_detail", analyzed)
        self.assertIn("Index", plan(hot), "replanned for 20,000 rows")
        self.assertNotIn("Seq Scan", plan(hot))

        again = yield defer.Deferred.fromCoroutine(statistics.refresh())
        self.assertNotIn("dpvoip.call_detail", again, "nothing changed since")

    @defer.inlineCallbacks
    def test_the_service_refreshes_on_its_beat_once_the_schema_is_prepared(self) -> Any:
        clock = Clock()
        prepared: OneShotObserver[None] = OneShotObserver()
        statistics = PlannerStatistics(self.store)
        service = StatisticsService(statistics, clock, prepared.when_fired, interval=10.0)
        service.startService()
        self.addCleanup(service.stopService)
        self.fill(self.writer(), 1_000)
        self.assertEqual(statistics.analyzed, 0, "nothing before the schema is prepared")
        prepared.fire(None)  # the first beat at once
        yield defer.Deferred.fromCoroutine(until(lambda: statistics.analyzed >= 1))
        self.assertEqual(service.failures, 0)


class GroupedTicketCountTests(PreparedDatabase):
    """A missed call grouped into an open ticket counts the ticket's calls (for its live
    event): with years of calls in ``call_detail`` that must be an index lookup, not a
    scan of every call (it was: a billion rows read in a two-minute bench)."""

    def test_the_count_of_a_tickets_calls_reads_an_index(self) -> None:
        connection = self.writer()
        with connection.cursor() as cursor:
            cursor.execute(
                "INSERT INTO dpvoip.call_detail (call_id, source, direction, remote_number,"
                " started_at, ticket_id) SELECT 'c' || n, 'fritzbox', 'incoming',"
                " '69' || lpad((n % 5000)::text, 8, '0'), now(), CASE WHEN n % 10 = 0"
                " THEN n / 10 END FROM generate_series(1, 50000) AS n")
            cursor.execute("ANALYZE dpvoip.call_detail")
            cursor.execute("EXPLAIN SELECT count(*) + 1 FROM dpvoip.call_detail o"
                           " WHERE o.ticket_id = 77 AND o.call_id <> 'c770'")
            plan = "\n".join(row[0] for row in cursor.fetchall())
        self.assertNotIn("Seq Scan", plan)
        self.assertIn("call_detail_by_ticket", plan)
