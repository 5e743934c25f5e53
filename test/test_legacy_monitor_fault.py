"""The old monitor's calls while PostgreSQL is down (issue 15, point 4): a create still
answers with the row's id, the update finds its call by that id after the replay, also
across a restart of dpvoip between the two; nothing lost, nothing doubled, one ticket.

A private cluster the test stops and starts (as ``test_fault_db``)."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

from twisted.internet import defer, reactor, threads
from twisted.trial.unittest import TestCase
from twisted.web.client import HTTPConnectionPool

from dpvoip.config import DaemonSettings, LegacyMonitorSettings, Secret, SpoolSettings
from dpvoip.service import Daemon, build
from dpvoip.testing.monitor import FakeMonitor
from test.support.crm_rules import crm_findings
from test.support.postgres import private_cluster, query
from test.support.wiring import in_process
from test.test_database import eventually

TOKEN = "monitor-token-1234"
PATIENCE = 120.0


class OutageCase(TestCase):
    timeout = 600  # a hang detector
    crm_version = "2025-12"

    def setUp(self) -> Any:
        self.folder, self.cluster, self.dsn = private_cluster(self, "dpvoip-lm-fault-",
                                                              self.crm_version)
        self.http = HTTPConnectionPool(reactor, persistent=False)
        self.addCleanup(self.http.closeCachedConnections)
        return defer.Deferred.fromCoroutine(self.start())

    async def start(self) -> None:
        config = in_process(
            self.dsn, connect_timeout=2.0,
            daemon=DaemonSettings(state_dir=str(self.folder / "state")),
            spool=replace(SpoolSettings(), deadline_seconds=1.0),
            legacy_monitor=LegacyMonitorSettings(token=Secret(TOKEN)))
        self.daemon: Daemon = build(config, reactor, base=self.folder)
        self.daemon.service.startService()
        await self.daemon.service.started
        await eventually(lambda: self.daemon.schema.fired, PATIENCE)
        await eventually(lambda: self.reserved() > 0, PATIENCE)

    def reserved(self) -> int:
        for service in self.daemon.service:
            if service.name == "legacy-monitor":
                return int(service.monitor.reserved)
        return 0

    async def stop(self) -> None:
        await self.daemon.service.stopService()

    def tearDown(self) -> Any:
        async def end() -> None:
            if self.daemon.service.running:
                await self.stop()
            if self.cluster.running():
                self.assertEqual(crm_findings(self.dsn), [])

        return defer.Deferred.fromCoroutine(end())

    def monitor(self, contract: str) -> FakeMonitor:
        port = self.daemon.web.port.getHost().port  # type: ignore[union-attr]
        return FakeMonitor(f"http://127.0.0.1:{port}", TOKEN, contract, pool=self.http)

    async def create(self, contract: str, call_id: str, number: str,
                     at: datetime) -> dict[str, Any]:
        body = {"call_id": call_id, "phone_number": number, "direction": "incoming",
                "started_at": at.isoformat()}
        if contract == "rest":
            exchange = await self.monitor(contract).send("POST", "voip-calls/", body)
        else:
            exchange = await self.monitor(contract).send(
                "POST", "fritz-webhook/", {"action": "create", **body})
        self.assertIn(exchange.status, (200, 201), exchange.answer)
        answer: dict[str, Any] = exchange.answer
        return answer

    async def missed(self, contract: str, row: int, at: datetime) -> dict[str, Any]:
        end = {"status": "missed", "create_ticket": True, "ended_at": at.isoformat()}
        if contract == "rest":
            exchange = await self.monitor(contract).send("PATCH", f"voip-calls/{row}/", end)
        else:
            exchange = await self.monitor(contract).send(
                "POST", "fritz-webhook/", {"action": "update", "id": row, **end})
        self.assertEqual(exchange.status, 200, exchange.answer)
        answer: dict[str, Any] = exchange.answer
        return answer

    async def down(self) -> None:
        await threads.deferToThread(self.cluster.stop, "fast")

    async def up(self) -> None:
        await threads.deferToThread(self.cluster.start)
        await eventually(lambda: not self.daemon.durable.spooling
                         and self.daemon.spooler.when_replayed().called, PATIENCE)

    def calls(self) -> list[tuple[Any, ...]]:
        return query(self.dsn, "SELECT id, call_id, status, ticket_created, started_at,"
                               " ended_at FROM accounting_voipcall ORDER BY id")


class DatabaseOutage(OutageCase):
    def test_create_before_and_during_an_outage_update_during_it(self) -> Any:
        async def run() -> None:
            at = datetime.now(UTC).replace(microsecond=0) - timedelta(minutes=3)
            before = await self.create("rest", "a_1", "6912345678", at)
            await self.down()
            during = await self.create("webhook", "b_1", "6912345679", at)
            again = await self.create("webhook", "b_1", "6912345679", at)
            self.assertEqual(again["id"], during["id"])
            self.assertTrue(again["duplicate"])
            end = at + timedelta(seconds=7)
            self.assertEqual((await self.missed("rest", before["id"], end))["status"],
                             "missed")
            self.assertEqual((await self.missed("webhook", during["id"], end))["status"],
                             "missed")
            await self.missed("webhook", during["id"], end)  # repeated: no second ticket
            await self.up()
            calls = self.calls()
            self.assertEqual([c[0] for c in calls], [before["id"], during["id"]])
            self.assertEqual([c[2:4] for c in calls], [("missed", True), ("missed", True)])
            self.assertEqual([c[4] for c in calls], [at, at])  # the monitor's times
            self.assertEqual([c[5] for c in calls], [end, end])
            tickets = query(self.dsn, "SELECT count(*) FROM accounting_ticket")[0][0]
            self.assertEqual(tickets, 2)

        return defer.Deferred.fromCoroutine(run())

    def test_restart_between_create_and_update(self) -> Any:
        async def run() -> None:
            at = datetime.now(UTC).replace(microsecond=0) - timedelta(minutes=3)
            await self.down()
            created = await self.create("rest", "c_1", "6912345670", at)
            await self.stop()
            await self.start_without_database()
            again = await self.create("rest", "c_1", "6912345670", at)
            self.assertEqual(again["id"], created["id"])
            await self.missed("rest", created["id"], at + timedelta(seconds=5))
            await self.up()
            calls = self.calls()
            self.assertEqual([(c[0], c[2], c[3]) for c in calls],
                             [(created["id"], "missed", True)])

        return defer.Deferred.fromCoroutine(run())

    async def start_without_database(self) -> None:
        config = in_process(
            self.dsn, connect_timeout=2.0,
            daemon=DaemonSettings(state_dir=str(self.folder / "state")),
            spool=replace(SpoolSettings(), deadline_seconds=1.0),
            legacy_monitor=LegacyMonitorSettings(token=Secret(TOKEN)))
        self.daemon = build(config, reactor, base=self.folder)
        self.daemon.service.startService()
        await self.daemon.service.started


class DatabaseOutageNewerCrm(DatabaseOutage):
    crm_version = "2026-08"
