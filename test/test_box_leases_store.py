"""The lease connection against the real PostgreSQL (issue 19): two instances' lease
sessions compete for a box's advisory lock; the loser takes it when the winner's session
is closed, terminated by the server (``pg_terminate_backend``) or left idle (a frozen
process: ``idle_session_timeout``); ``dpvoip check``'s look at who holds what; and two
``BoxLeadership`` services on one database, one box read by one of them at a time.

Real waits here are hang detectors (``eventually``), never targets: how quickly a lease
runs out is shown on a ``Clock`` in ``test_box_leadership``."""

from __future__ import annotations

from typing import Any

from twisted.internet import defer, reactor
from twisted.trial.unittest import TestCase

from dpvoip.config import DatabaseSettings, FritzBoxSettings
from dpvoip.fritzbox.box import FritzBox
from dpvoip.fritzbox.leadership import LeaseRules
from dpvoip.fritzbox.service import BoxLeadership, LedBox
from dpvoip.store.database import Store
from dpvoip.store.dsn import connection_dsn
from dpvoip.store.leases import LeaseConnection, box_key, read_holders
from dpvoip.store.migrations import prepare
from dpvoip.store.pool import HealingPool
from test.support.daemon import PATIENCE
from test.support.postgres import postgres, query
from test.test_database import eventually


class LeaseCase(TestCase):
    timeout = 2 * PATIENCE  # a hang detector

    def setUp(self) -> Any:
        self.raw = postgres().new_database(crm="2025-12")
        self.dsn = connection_dsn(self.raw, DatabaseSettings())
        pool = HealingPool(reactor, self.dsn, 1)
        self.addCleanup(pool.close)
        self.store = Store(pool, reactor)

        async def ready() -> None:
            await pool.start()
            await self.store.write(lambda c: prepare(c, standalone=False,
                                                     crm_schema="public"))

        return defer.Deferred.fromCoroutine(ready())

    def lease(self, instance: str) -> LeaseConnection:
        lease = LeaseConnection(reactor, self.dsn, instance)
        self.addCleanup(lease.close)
        self.lost: dict[str, list[str]] = getattr(self, "lost", {})
        self.lost[instance] = []
        lease.on_lost = self.lost[instance].append
        return lease

    def pid_of(self, instance: str) -> int:
        [(pid,)] = query(self.raw, "SELECT pid FROM pg_stat_activity WHERE"
                                   " application_name = %s", ("dpvoip lease " + instance,))
        return int(pid)


class CompetingLeasesTests(LeaseCase):
    async def _two(self) -> tuple[LeaseConnection, LeaseConnection]:
        first, second = self.lease("athens-1"), self.lease("rhodes-2")
        await first.connect()
        await second.connect()
        won = await first.heartbeat(["office", "annex"])
        self.assertEqual(won.granted, {"office": None, "annex": None}, "the first leader ever")
        lost = await second.heartbeat(["office", "annex"])
        self.assertEqual(lost.granted, {})
        self.assertEqual(lost.refused, {"office": "athens-1", "annex": "athens-1"})
        return first, second

    async def _closed(self) -> None:
        first, second = await self._two()
        first_term = first.last_term("office")
        first.close()  # a clean stop: the session ends, its locks with it
        # The server ends the session once it reads the goodbye: on a busy machine that
        # can be after the other's next heartbeat, which then simply tries again.
        await eventually(lambda: not query(
            self.raw, "SELECT 1 FROM pg_stat_activity WHERE application_name = %s",
            ("dpvoip lease athens-1",)), PATIENCE)
        taken = await second.heartbeat(["office"])
        self.assertEqual(taken.granted, {"office": first_term}, "and whose term it ended")
        again = await second.heartbeat([])
        self.assertEqual(again.granted, {}, "a heartbeat alone asks for nothing")

    def test_one_wins_the_other_takes_over_when_its_session_is_closed(self) -> Any:
        return defer.Deferred.fromCoroutine(self._closed())

    async def _terminated(self) -> None:
        first, second = await self._two()
        query(self.raw, "SELECT pg_terminate_backend(%s)", (self.pid_of("athens-1"),))
        await eventually(lambda: self.lost["athens-1"], PATIENCE)
        self.assertFalse(first.connected)
        taken = await second.heartbeat(["office", "annex"])
        self.assertEqual(set(taken.granted), {"office", "annex"})

    def test_a_terminated_session_is_noticed_and_its_locks_go_to_the_other(self) -> Any:
        return defer.Deferred.fromCoroutine(self._terminated())

    async def _idle(self) -> None:
        first, second = await self._two()
        # No more heartbeats from the first: a frozen process. The server ends its
        # session after idle_session_timeout, and the locks go with it.

        async def taken() -> bool:
            return bool((await second.heartbeat(["office"])).granted)

        await eventually(lambda: defer.Deferred.fromCoroutine(taken()), PATIENCE, step=0.5)
        self.assertTrue(first.idle_timeout, "this PostgreSQL ends idle sessions")

    def test_a_session_left_idle_is_ended_by_the_server(self) -> Any:
        return defer.Deferred.fromCoroutine(self._idle())

    async def _holders(self) -> None:
        await self._two()

        async def look(cursor: Any) -> Any:
            return await read_holders(cursor)

        seen = await self.store.write(look)
        self.assertEqual(seen.leaders, {box_key("office"): "athens-1",
                                        box_key("annex"): "athens-1"})
        self.assertEqual(seen.instances, ("athens-1", "rhodes-2"))

    def test_who_holds_each_lock_as_dpvoip_check_reads_it(self) -> Any:
        return defer.Deferred.fromCoroutine(self._holders())

    async def _unreachable(self) -> None:
        lease = LeaseConnection(reactor, connection_dsn(
            "host=127.0.0.1 port=1 dbname=nothing connect_timeout=2", DatabaseSettings()),
            "athens-1")
        with self.assertRaises(Exception):  # noqa: B017 - libpq's own error, any kind
            await lease.connect()
        self.assertFalse(lease.connected)

    def test_an_unreachable_server_fails_the_connect(self) -> Any:
        return defer.Deferred.fromCoroutine(self._unreachable())


class Reader:
    def __init__(self) -> None:
        self.running: int | bool = False

    def startService(self) -> None:
        self.running = True

    def stopService(self) -> None:
        self.running = False


QUICK = LeaseRules(lease_seconds=1.0, heartbeat_seconds=0.2)


class TwoLeadershipsTests(LeaseCase):
    """Two instances' ``BoxLeadership`` on one database: exactly one reads the box."""

    def instance(self, name: str) -> tuple[BoxLeadership, Reader]:
        box = FritzBox(FritzBoxSettings(), _NoIngest(), reactor, frozenset())
        reader = Reader()
        service = BoxLeadership([LedBox(box, reader, reactor)],
                                LeaseConnection(reactor, self.dsn, name), reactor,
                                lambda: defer.succeed(None), QUICK)
        service.startService()
        self.addCleanup(service.stopService)
        return service, reader

    async def _handover(self) -> None:
        first, first_reader = self.instance("athens-1")
        await eventually(lambda: first_reader.running, PATIENCE)
        second, second_reader = self.instance("rhodes-2")
        await eventually(lambda: second.describe("office")["led_by"] == "athens-1",
                         PATIENCE)
        self.assertFalse(second_reader.running)
        await first.stopService()
        self.assertFalse(first_reader.running)
        await eventually(lambda: second_reader.running, PATIENCE)
        self.assertEqual(second.describe("office")["takeovers"], 1)
        self.assertFalse(first_reader.running, "never two readers")

    def test_the_standby_reads_once_the_leader_has_stopped(self) -> Any:
        return defer.Deferred.fromCoroutine(self._handover())

    async def _terminated(self) -> None:
        first, first_reader = self.instance("athens-1")
        await eventually(lambda: first_reader.running, PATIENCE)
        second, second_reader = self.instance("rhodes-2")
        await eventually(lambda: second.describe("office")["led_by"] == "athens-1",
                         PATIENCE)
        both: list[bool] = []

        def sample() -> bool:
            both.append(bool(first_reader.running and second_reader.running))
            return bool(second_reader.running or first.describe("office")["leader"])

        query(self.raw, "SELECT pg_terminate_backend(%s)", (self.pid_of("athens-1"),))
        await eventually(lambda: not first.describe("office")["leader"] or both, PATIENCE,
                         step=0.01)
        await eventually(sample, PATIENCE, step=0.01)
        self.assertNotIn(True, both, "never two readers at a sampled moment")
        leaders = [s for s in (first, second) if s.describe("office")["leader"]]
        self.assertEqual(len(leaders), 1)

    def test_a_terminated_leader_stops_and_exactly_one_leads_after(self) -> Any:
        return defer.Deferred.fromCoroutine(self._terminated())


class _NoIngest:
    def submit(self, happening: Any, origin: Any) -> defer.Deferred[None]:
        return defer.succeed(None)

    async def close_open_calls(self, *args: Any) -> int:
        return 0
