"""End to end: the daemon as the composition root wires it reads a Fritz!Box's call list
over TR-064 (the fake box, TLS, digest, on loopback) beside its CallMonitor port, into a
real PostgreSQL with the CRM's tables (issue 16).

dpvoip runs once (its first pass takes the list as a baseline), stops; the office takes
calls while it is away (they reach only the box's list); dpvoip starts again and every
call is there once, with the right outcome and the missed ones ticketed; the box's
certificate was pinned on first use. The failures of point 4 never stop the CallMonitor
path: a wrong password or a foreign certificate is a warning in ``/readyz``, a series in
``/metrics``, and the box's lines are still recorded.
"""

from __future__ import annotations

import json
from datetime import datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import treq
from twisted.internet import defer, reactor
from twisted.trial.unittest import TestCase

from dpvoip.cli import call_list_line
from dpvoip.config import DirectorySettings, Secret
from dpvoip.fritzbox.calllist import BLOCKED, INCOMING, MISSED, OUTGOING
from dpvoip.fritzbox.reconciler import ReconcileStatus
from dpvoip.fritzbox.service import BoxStatusReporter
from dpvoip.service import Daemon, build
from dpvoip.store.boxes import reported_boxes
from dpvoip.testing.fritzbox import FritzSimulator, box_time, parse_script
from dpvoip.testing.tr064 import FakeTr064Box
from test.support.crm import Crm
from test.support.crm_rules import crm_findings
from test.support.daemon import PATIENCE, scratch
from test.support.postgres import postgres
from test.support.wiring import in_process, loopback_box, running
from test.test_database import eventually

ZONE = ZoneInfo("Europe/Athens")
USER, PASSWORD = "dpvoip", "gurken-salat-7"


class CallListEndToEnd(TestCase):
    timeout = 4 * PATIENCE
    crm_version = "2025-12"

    def setUp(self) -> Any:
        self.dsn = postgres().new_database(crm=self.crm_version)
        self.crm = Crm(self.dsn)
        self.tr064 = FakeTr064Box(reactor, USER, PASSWORD)
        self.simulator = FritzSimulator(reactor, parse_script(""))

        async def listen() -> None:
            self.tr064_port = await self.tr064.listen()
            self.addCleanup(self.tr064.stop)
            self.box_port = await self.simulator.listen(0)
            self.addCleanup(self.simulator.stop)

        return defer.Deferred.fromCoroutine(listen())

    def tearDown(self) -> None:
        self.assertEqual(crm_findings(self.dsn), [])

    def daemon(self, password: str = PASSWORD, certificate: str = "") -> Daemon:
        box = loopback_box("office", self.box_port, reconnect_initial_seconds=0.2,
                           reconnect_max_seconds=1.0, tr064_user=USER,
                           tr064_password=Secret(password), tr064_port=self.tr064_port,
                           tr064_certificate=certificate)
        config = in_process(self.dsn, pool_size=4, boxes=[box],
                            directory=DirectorySettings(own_numbers=("2107654321",)))
        return build(config, reactor, scratch(self))

    async def started(self, daemon: Daemon) -> int:
        port = await running(self, daemon)
        listing = daemon.boxes[0].status.call_list
        assert isinstance(listing, ReconcileStatus)
        # Its first pass through (read, or failed): at start, once the spool is replayed.
        await eventually(lambda: listing.runs + listing.failures >= 1, PATIENCE)
        return port

    async def readyz(self, port: int) -> tuple[int, dict[str, Any]]:
        response = await treq.get(f"http://127.0.0.1:{port}/readyz", persistent=False)
        return response.code, json.loads(await response.content())

    async def metrics(self, port: int) -> str:
        response = await treq.get(f"http://127.0.0.1:{port}/metrics", persistent=False)
        return str((await response.content()).decode())

    async def check_line(self, daemon: Daemon) -> str:
        """What `dpvoip check` (another process) says of the box's call list, once the
        daemon has reported it."""
        await BoxStatusReporter(daemon.boxes, daemon.store, reactor).report()
        reports = await reported_boxes(daemon.store)
        return call_list_line(daemon.boxes[0].settings, reports.get("office"))

    def calls(self) -> list[tuple[Any, ...]]:
        return self.crm.query(
            "SELECT direction, phone_number, status, notes, ticket_created"
            " FROM accounting_voipcall ORDER BY started_at, id")

    def minutes_ago(self, minutes: int) -> datetime:
        return (datetime.now(ZONE) - timedelta(minutes=minutes)).replace(tzinfo=None)

    @defer.inlineCallbacks
    def test_calls_taken_while_dpvoip_was_away_are_recovered_once(self) -> Any:
        self.crm.client("Papadopoulos AE", kinito_tilefono="691 234 5678")
        first = self.daemon()
        yield defer.Deferred.fromCoroutine(self.started(first))
        yield first.service.stopService()  # dpvoip stopped for an update
        pinned = self.crm.query("SELECT certificate_sha256 FROM dpvoip.call_list_state")
        self.assertEqual(pinned, [(self.tr064.fingerprint,)], "pinned on first use")

        # The office takes calls meanwhile: only the box's list keeps them.
        self.tr064.call(MISSED, "06912345678", self.minutes_ago(9), own_number="2107654321")
        self.tr064.call(INCOMING, "2101111111", self.minutes_ago(8), 95, port="11",
                        own_number="2107654321")
        self.tr064.call(INCOMING, "2102222222", self.minutes_ago(7), 40, port="40",
                        own_number="2107654321")
        self.tr064.call(BLOCKED, "2103333333", self.minutes_ago(6), own_number="2107654321")
        self.tr064.call(OUTGOING, "2104444444", self.minutes_ago(5), 0, port="11",
                        own_number="2107654321")

        again = self.daemon()
        port = yield defer.Deferred.fromCoroutine(self.started(again))
        expected = [  # direction, number, status, ticket
            ("incoming", "+306912345678", "missed", True),
            ("incoming", "+302101111111", "completed", False),
            ("incoming", "+302102222222", "missed", True),  # the answering machine
            ("incoming", "+302103333333", "failed", False),  # blocked by the box
            ("outgoing", "+302104444444", "failed", False),  # not reached
        ]
        yield eventually(lambda: len(self.calls()) == 5, PATIENCE)
        self.assertEqual([(*c[:3], c[4]) for c in self.calls()], expected)
        self.assertTrue(all("from the box's call list" in c[3] for c in self.calls()),
                        self.calls())
        tickets = self.crm.query("SELECT title, client_id IS NOT NULL FROM accounting_ticket"
                                 " ORDER BY id")
        self.assertEqual(tickets, [("MISSED CALL - +306912345678 - Papadopoulos AE", True),
                                   ("MISSED CALL - +302102222222", False)])
        code, body = yield defer.Deferred.fromCoroutine(self.readyz(port))
        self.assertEqual(code, 200)
        listing = body["fritzbox"][0]["call_list"]
        self.assertEqual((listing["state"], listing["inserted"], body["warnings"]),
                         ("ok", 5, []))
        line = yield defer.Deferred.fromCoroutine(self.check_line(again))
        self.assertIn("read, last at", line)
        self.assertIn(f"certificate pinned on first use: sha256 {self.tr064.fingerprint}",
                      line)

        # Started once more: the list read again changes nothing.
        yield again.service.stopService()
        third = self.daemon()
        yield defer.Deferred.fromCoroutine(self.started(third))
        self.assertEqual(len(self.calls()), 5)
        self.assertEqual(len(self.crm.query("SELECT id FROM accounting_ticket")), 2)

    @defer.inlineCallbacks
    def test_a_wrong_password_is_a_warning_and_the_port_still_records(self) -> Any:
        daemon = self.daemon(password="not-the-password")
        port = yield defer.Deferred.fromCoroutine(self.started(daemon))
        code, body = yield defer.Deferred.fromCoroutine(self.readyz(port))
        self.assertEqual(code, 200, "a warning, not a failure")
        [warning] = body["warnings"]
        self.assertIn("box office: its call list cannot be read (auth)", warning)
        self.assertNotIn("not-the-password", json.dumps(body))
        page = yield defer.Deferred.fromCoroutine(self.metrics(port))
        self.assertIn('dpvoip_call_list_failing{box="office",kind="auth"} 1.0', page)
        line = yield defer.Deferred.fromCoroutine(self.check_line(daemon))
        self.assertIn("FAILING (auth)", line)
        self.assertNotIn("not-the-password", line)
        # The CallMonitor path goes on.
        yield eventually(lambda: self.simulator.connected == 1, PATIENCE)
        self.simulator._send(f"{box_time(reactor.seconds(), ZONE)};RING;0;2105555555;"
                             "2107654321;SIP0;\r\n".encode())
        yield eventually(lambda: len(self.calls()) == 1, PATIENCE)

    @defer.inlineCallbacks
    def test_a_box_with_another_certificate_gets_no_credentials(self) -> Any:
        daemon = self.daemon(certificate="ab" * 32)
        port = yield defer.Deferred.fromCoroutine(self.started(daemon))
        code, body = yield defer.Deferred.fromCoroutine(self.readyz(port))
        self.assertEqual(code, 200)
        self.assertIn("(tls)", body["warnings"][0])
        self.assertEqual(self.tr064.authorization_headers, 0)
        self.assertEqual(body["fritzbox"][0]["call_list"]["certificate"],
                         self.tr064.fingerprint, "what the box showed, for the administrator")


class NewestCrmCallListEndToEnd(CallListEndToEnd):
    crm_version = "2026-08"
