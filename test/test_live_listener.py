"""The LISTEN connection and its feed on a PostgreSQL cluster of the test's own,
restarted under it: LISTEN is issued again, the events committed while it was away are
read from the table, and nothing reaches the streams twice."""

from __future__ import annotations

from typing import Any

from twisted.internet import defer, reactor
from twisted.trial.unittest import TestCase

from dpvoip.config import DatabaseSettings
from dpvoip.live.events import Viewer
from dpvoip.live.hub import Hub
from dpvoip.live.listener import LiveFeed
from dpvoip.store.database import Store
from dpvoip.store.dsn import connection_dsn
from dpvoip.store.live import ListenConnection
from dpvoip.store.migrations import prepare
from dpvoip.store.pool import HealingPool
from test.support.daemon import PATIENCE
from test.support.postgres import private_cluster, query
from test.support.waiting import until
from test.test_live_hub import FakeSink


class ListenerRestartTests(TestCase):
    timeout = 4 * PATIENCE  # a hang detector

    def setUp(self) -> Any:
        _, self.cluster, self.dsn = private_cluster(self, "dpvoip-live-")
        dsn = connection_dsn(self.dsn, DatabaseSettings())
        pool = HealingPool(reactor, dsn, 1)
        self.addCleanup(pool.close)
        store = Store(pool, reactor)
        self.hub = Hub(reactor, heartbeat=3600)
        self.sink = FakeSink()
        self.hub.subscribe(Viewer(1, True), self.sink).release()
        self.addCleanup(self.hub.close_all)
        self.listen = ListenConnection(reactor, dsn, connect_timeout=2.0)
        self.feed = LiveFeed(self.listen, self.hub, reactor)
        self.listen.watch(self.feed.notified, self.feed.listening)
        self.addCleanup(self.listen.stop)

        async def ready() -> None:
            await pool.start()
            await store.write(lambda c: prepare(c, standalone=False, crm_schema="public"))

        return defer.Deferred.fromCoroutine(ready())

    def commit(self, name: str) -> int:
        """A box event as the call path writes one: the row and its NOTIFY, committed."""
        [(ident, _)] = query(
            self.dsn, "WITH e AS (INSERT INTO dpvoip.live_event (kind, data) VALUES ('box',"
            " jsonb_build_object('box', %s::text)) RETURNING id)"
            " SELECT e.id, pg_notify('dpvoip_calls', json_build_object('id', e.id)::text)"
            " FROM e", (name,))
        return int(ident)

    def delivered(self) -> list[int]:
        return self.sink.ids()

    @defer.inlineCallbacks
    def test_events_committed_while_postgresql_restarted_are_caught_up_once(self) -> Any:
        self.listen.start()
        yield defer.Deferred.fromCoroutine(until(lambda: self.listen.listening))
        yield defer.Deferred.fromCoroutine(until(lambda: self.feed.reads == 1))
        first = self.commit("a")
        yield defer.Deferred.fromCoroutine(until(lambda: self.delivered() == [first]))
        # The reactor is held while PostgreSQL restarts and two events are committed:
        # nobody listens when they are announced.
        self.cluster.stop(mode="fast")
        self.cluster.start()
        missed = [self.commit("b"), self.commit("c")]
        yield defer.Deferred.fromCoroutine(until(lambda: self.feed.catch_ups == 2))
        yield defer.Deferred.fromCoroutine(until(lambda: len(self.delivered()) == 3))
        self.assertEqual(self.delivered(), [first, *missed])
        last = self.commit("d")  # and live again, on the new session
        yield defer.Deferred.fromCoroutine(until(lambda: len(self.delivered()) == 4))
        self.assertEqual(self.delivered(), [first, *missed, last])


class AnnouncementInTheLastAnswerTests(TestCase):
    """An announcement that arrives in the same read as the answer to the LISTEN
    connection's own query (the feed reads the table on it) is heard at once, not when the
    connection next has traffic: in a quiet office that is the next call, minutes later."""

    timeout = 4 * PATIENCE  # a hang detector

    def setUp(self) -> Any:
        from test.support.postgres import postgres

        self.heard: list[str] = []
        dsn = connection_dsn(postgres().new_database(crm="2025-12"), DatabaseSettings())
        self.listen = ListenConnection(reactor, dsn, connect_timeout=5.0)
        self.listen.watch(self.heard.append, lambda: None)
        self.addCleanup(self.listen.stop)
        return defer.Deferred.fromCoroutine(self._started())

    async def _started(self) -> None:
        await self.listen.start()
        await until(lambda: self.listen.listening)

    @defer.inlineCallbacks
    def test_heard_when_it_rides_with_the_answer(self) -> Any:
        # The connection announces on its own channel: PostgreSQL sends the NOTIFY with
        # the statement's answer, in one read (the only way to make that deterministic is
        # this connection's own statement; hence its private connection here).
        yield self.listen._connection.runOperation(
            "NOTIFY dpvoip_calls, 'in the same read'")
        # Handed to the observers on the next turn of the reactor (txpostgres' cooperator);
        # without the poll after the answer it waits for traffic that never comes here.
        yield defer.Deferred.fromCoroutine(until(lambda: self.heard))
        self.assertEqual(self.heard, ["in the same read"])
