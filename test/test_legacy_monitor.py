"""The old monitor's endpoints (issue 15): the contracts as plain data, then both contracts
end to end against the wired daemon on a real PostgreSQL (both shipped CRM schemas), as the
scripts send them (``dpvoip.testing.monitor``), with every refusal."""

from __future__ import annotations

import json
import time
from dataclasses import asdict, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, cast
from zoneinfo import ZoneInfo

import treq
from twisted.internet import defer, reactor
from twisted.logger import ILogObserver, LogLevel, formatEvent, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.client import HTTPConnectionPool

from dpvoip.config import DirectorySettings, LegacyMonitorSettings, Secret, SpoolSettings
from dpvoip.core.happenings import Answered, Ended, Started
from dpvoip.core.outcomes import Outcome
from dpvoip.legacy_monitor.contracts import (
    BadAction,
    BadJson,
    Invalid,
    KnownCall,
    Update,
    api_key_matches,
    bearer_matches,
    body_object,
    create_request,
    dpvoip_call_id,
    token_problem,
    update_happenings,
    update_request,
    webhook_request,
)
from dpvoip.legacy_monitor.service import LegacyMonitor, check_lines, write_state
from dpvoip.service import Daemon, build
from dpvoip.spool.records import fritz_record, read_record
from dpvoip.testing.monitor import FakeMonitor
from test.support.crm import Crm
from test.support.crm_rules import crm_findings
from test.support.daemon import PATIENCE, scratch
from test.support.postgres import postgres
from test.support.wiring import in_process
from test.test_database import eventually

ATHENS = ZoneInfo("Europe/Athens")
TOKEN = "monitor-token-1234"
OWN = "2107654321"

#: An office's morning as its box reports it: answered, missed, outgoing unanswered.
SCRIPT = """
0 {now};RING;0;2101234567;2107654321;SIP0;
8 {now};CONNECT;0;11;2101234567;
20 {now};DISCONNECT;0;20;
5 {now};RING;1;6912345678;2107654321;SIP0;
6 {now};DISCONNECT;1;0;
4 {now};CALL;2;20;2107654321;2310123456;SIP0;
9 {now};DISCONNECT;2;0;
"""


class ContractTests(SynchronousTestCase):
    def test_token_only_when_set_and_not_the_default(self) -> None:
        self.assertIsNotNone(token_problem(""))
        self.assertIsNotNone(token_problem("change-this-token-in-production"))
        self.assertIsNone(token_problem(TOKEN))
        self.assertTrue(bearer_matches(b"Bearer " + TOKEN.encode(), TOKEN))
        self.assertFalse(bearer_matches(TOKEN.encode(), TOKEN))
        self.assertFalse(bearer_matches(None, TOKEN))
        self.assertTrue(api_key_matches(TOKEN.encode(), TOKEN))
        self.assertFalse(api_key_matches(b"Bearer " + TOKEN.encode(), TOKEN))
        default = "change-this-token-in-production"
        self.assertFalse(api_key_matches(default.encode(), default))
        self.assertFalse(bearer_matches(b"Bearer ", ""))

    def test_fields_validated_naming_the_field(self) -> None:
        good = {"call_id": "0_1700000000", "phone_number": "2101234567",
                "direction": "incoming", "started_at": "2026-03-02T09:00:00+00:00"}
        create = create_request(good, ATHENS)
        self.assertEqual(create.started_at, datetime(2026, 3, 2, 9, tzinfo=UTC))
        naive = create_request({**good, "started_at": "2026-03-02T11:00:00"}, ATHENS)
        self.assertEqual(naive.started_at, datetime(2026, 3, 2, 9, tzinfo=UTC))
        for field, value in [("direction", "inbound"), ("direction", None),
                             ("started_at", "yesterday"), ("started_at", None),
                             ("started_at", 1700000000), ("call_id", ""), ("call_id", 5),
                             ("call_id", "x" * 51), ("call_id", "a b"),
                             ("phone_number", 2101234567), ("phone_number", "1" * 41),
                             ("status", "missed")]:
            with self.assertRaises(Invalid) as caught:
                create_request({**good, field: value}, ATHENS)
            self.assertEqual(caught.exception.field, field, (field, value))
        for field, value in [("status", "ringing"), ("ended_at", "noon"),
                             ("create_ticket", "yes")]:
            with self.assertRaises(Invalid) as caught:
                update_request({field: value}, 5, ATHENS)
            self.assertEqual(caught.exception.field, field)
        with self.assertRaises(Invalid):
            webhook_request({"action": "update", "id": True}, ATHENS)
        with self.assertRaises(Invalid):
            webhook_request({"action": "update", "id": "abc"}, ATHENS)
        with self.assertRaises(BadAction):
            webhook_request({"action": "delete"}, ATHENS)
        for body in (b"{", b"[1]", b"\xff"):
            with self.assertRaises(BadJson):
                body_object(body)

    def test_call_id_stable_and_within_the_column(self) -> None:
        self.assertEqual(dpvoip_call_id("monitor", "0_17"), "lm-monitor-0_17")
        long = dpvoip_call_id("monitor", "x" * 50)
        self.assertEqual(len(long), 50)
        self.assertEqual(long, dpvoip_call_id("monitor", "x" * 50))
        self.assertNotEqual(long, dpvoip_call_id("monitor", "x" * 49 + "y"))

    def test_what_an_update_means(self) -> None:
        at = datetime(2026, 3, 2, 9, tzinfo=UTC)
        now = at + timedelta(seconds=30)
        incoming = KnownCall(7, "lm-monitor-1", "incoming", "+302101234567", at)
        outgoing = replace(incoming, direction="outgoing")
        missed = Update(7, "missed", at + timedelta(seconds=6), True)
        (ended,) = update_happenings(incoming, missed, now)
        assert isinstance(ended, Ended)
        self.assertEqual((ended.outcome, ended.at), (Outcome.MISSED, missed.ended_at))
        # outgoing: never a ticket, whatever the script asks
        (ended,) = update_happenings(outgoing, missed, now)
        assert isinstance(ended, Ended)
        self.assertEqual(ended.outcome, Outcome.NOT_REACHED)
        self.assertFalse(ended.outcome.wants_ticket("outgoing"))
        # a repeated update of an ended call: nothing
        self.assertEqual(update_happenings(replace(incoming, ended=True), missed, now), ())
        # CONNECT (v3.5): answered once
        (answered,) = update_happenings(incoming, Update(7, "completed", None, None), now)
        self.assertEqual(answered, Answered("lm-monitor-1", 0, now))
        self.assertEqual(update_happenings(replace(incoming, answered_at=now),
                                           Update(7, "completed", None, None), now), ())
        # the end never before the start; talk time from the answer
        done = Update(7, "completed", at + timedelta(seconds=40), False)
        (ended,) = update_happenings(replace(incoming, answered_at=now), done, now)
        assert isinstance(ended, Ended)
        self.assertEqual((ended.outcome, ended.duration), (Outcome.ANSWERED, 10))
        early = Update(7, "missed", at - timedelta(hours=1), True)
        (ended,) = update_happenings(incoming, early, now)
        assert isinstance(ended, Ended)
        self.assertEqual(ended.at, at)

    def test_spool_records_keep_the_reserved_id_and_read_old_ones(self) -> None:
        at = datetime(2026, 3, 2, 9, tzinfo=UTC)
        reserved = Started("lm-monitor-1", "monitor", 0, "incoming", "2101234567", "", "",
                           None, at, row_id=4711)
        _, back, box = read_record(fritz_record(reserved, "legacy_monitor", at))
        self.assertEqual((back, box), (reserved, "legacy_monitor"))
        boxes = replace(reserved, row_id=None)
        record = fritz_record(boxes, "office", at)
        self.assertNotIn(b"row_id", record)  # a box's record exactly as before
        old = json.loads(record)
        self.assertEqual(read_record(json.dumps(old).encode())[1], boxes)


def monitor_of(daemon: Daemon) -> LegacyMonitor:
    for service in daemon.service:
        if service.name == "legacy-monitor":
            found: LegacyMonitor = service.monitor
            return found
    raise AssertionError("no legacy-monitor service")


class MonitorCase(TestCase):
    """The daemon as wired on a real PostgreSQL, its token set."""

    timeout = 2 * PATIENCE  # a hang detector
    crm_version = "2026-08"
    token = TOKEN

    def setUp(self) -> Any:
        self.dsn = postgres().new_database(crm=self.crm_version)
        self.crm = Crm(self.dsn)
        self.http = HTTPConnectionPool(reactor, persistent=False)
        self.addCleanup(self.http.closeCachedConnections)
        config = in_process(
            self.dsn, spool=replace(SpoolSettings(), deadline_seconds=60.0),
            legacy_monitor=LegacyMonitorSettings(token=Secret(self.token)),
            directory=replace(DirectorySettings(), own_numbers=(OWN,)))
        self.daemon: Daemon = build(config, reactor, scratch(self))

        async def start() -> None:
            self.daemon.service.startService()
            self.addCleanup(self.daemon.service.stopService)
            await self.daemon.service.started
            await eventually(lambda: self.daemon.directory.state.built, PATIENCE)

        return defer.Deferred.fromCoroutine(start())

    def tearDown(self) -> None:
        self.assertEqual(crm_findings(self.dsn), [])

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.daemon.web.port.getHost().port}"  # type: ignore

    def monitor(self, contract: str, **kwargs: Any) -> FakeMonitor:
        return FakeMonitor(self.base, self.token, contract, pool=self.http, **kwargs)

    def rows(self) -> list[tuple[Any, ...]]:
        return self.crm.query(
            "SELECT id, call_id, direction, phone_number, status, started_at, ended_at,"
            " ticket_created, client_id FROM accounting_voipcall ORDER BY id")


class BothContracts(MonitorCase):
    def _play(self, contract: str, prefix: str = "/accounting/api/") -> Any:
        client = self.crm.client("Papadopoulos OE", kinito_tilefono="6912345678")
        start = time.time() - 600
        monitor = self.monitor(contract, prefix=prefix)

        async def run() -> None:
            await self.daemon.directory.build()
            exchanges = await monitor.play(SCRIPT, start)
            self.assertEqual([e.status for e in exchanges if e.status >= 300], [],
                             [(e.path, e.status, e.answer) for e in exchanges])
            rows = self.rows()
            self.assertEqual(len(rows), 3)
            answered, missed, outgoing = rows
            self.assertEqual(answered[2:5], ("incoming", "+302101234567", "completed"))
            self.assertEqual(missed[2:5], ("incoming", "+306912345678", "missed"))
            self.assertEqual(missed[8], client)
            self.assertEqual(outgoing[2:5], ("outgoing", "+302310123456", "failed"))
            # the monitor's own times: the lines' (whole seconds)
            first = datetime.fromtimestamp(int(start), UTC)
            self.assertEqual(answered[5], first)
            self.assertEqual(answered[6], first + timedelta(seconds=28))
            self.assertEqual(missed[6] - missed[5], timedelta(seconds=6))
            # the ticket only for the incoming missed call, whatever the script asked
            self.assertEqual([r[7] for r in rows], [False, True, False])
            self.assertEqual(self.crm.query("SELECT count(*) FROM accounting_ticket")[0][0], 1)
            # the answers name the rows
            ids = [e.answer["id"] for e in exchanges if e.method == "POST"
                   and isinstance(e.answer, dict) and "client_name" in e.answer]
            self.assertEqual(ids, [r[0] for r in rows])
            created = exchanges[0].answer
            if contract == "rest":
                self.assertEqual(exchanges[0].status, 201)
                for key in ("id", "call_id", "client", "client_name", "direction",
                            "phone_number", "status", "started_at", "ended_at",
                            "duration_seconds", "ticket_created", "ticket_id"):
                    self.assertIn(key, created)
                last = exchanges[-1].answer
                self.assertEqual((last["status"], last["ticket_created"]), ("failed", False))
                ticketed = [e.answer for e in exchanges if e.method == "PATCH"
                            and e.answer.get("ticket_created")]
                self.assertEqual(len(ticketed), 1)
                self.assertEqual(ticketed[0]["client_name"], "Papadopoulos OE")
            else:
                self.assertEqual(set(created), {"success", "id", "call_id", "client_id",
                                                "client_name", "is_known"})
                updates = [e.answer for e in exchanges if e.sent.get("action") == "update"]
                self.assertEqual([u["status"] for u in updates],
                                 ["completed", "missed", "failed"])
                self.assertEqual(updates[0]["duration"], 28)
                self.assertEqual(set(updates[0]), {"success", "id", "status", "duration"})
            sources = self.crm.query("SELECT DISTINCT source FROM dpvoip.call_detail")
            self.assertEqual(sources, [("legacy_monitor",)])

        return defer.Deferred.fromCoroutine(run())

    def test_rest_contract(self) -> Any:
        return self._play("rest")

    def test_rest_contract_v1(self) -> Any:
        return self._play("rest", "/accounting/api/v1/")

    def test_webhook_contract(self) -> Any:
        return self._play("webhook")


class BothContractsOlderCrm(BothContracts):
    crm_version = "2025-12"


class Repeats(MonitorCase):
    def test_repeated_create_and_missed_update_write_once(self) -> Any:
        async def run() -> None:
            for contract in ("rest", "webhook"):
                monitor = self.monitor(contract)
                at = datetime.now(UTC).replace(microsecond=0) - timedelta(minutes=5)
                call_id = f"1_{contract}"
                body = {"call_id": call_id, "phone_number": "6912345678",
                        "direction": "incoming", "started_at": at.isoformat()}
                create = ("POST", "voip-calls/", body) if contract == "rest" else (
                    "POST", "fritz-webhook/", {"action": "create", **body})
                first = await monitor.send(*create)
                second = await monitor.send(*create)
                self.assertEqual(first.answer["id"], second.answer["id"])
                if contract == "webhook":
                    self.assertTrue(second.answer["duplicate"])
                end = {"status": "missed", "create_ticket": True,
                       "ended_at": (at + timedelta(seconds=9)).isoformat()}
                row = first.answer["id"]
                update = ("PATCH", f"voip-calls/{row}/", end) if contract == "rest" else (
                    "POST", "fritz-webhook/", {"action": "update", "id": row, **end})
                one = await monitor.send(*update)
                two = await monitor.send(*update)
                self.assertEqual((one.status, two.status), (200, 200))
            rows = self.rows()
            self.assertEqual(len(rows), 2)
            tickets = self.crm.query("SELECT count(*) FROM accounting_ticket")[0][0]
            self.assertEqual(tickets, 1)  # the second call of the number joins the first's
            logs = self.crm.query(
                "SELECT count(*) FROM accounting_voipcalllog WHERE action = 'started'")[0][0]
            self.assertEqual(logs, 2)

        return defer.Deferred.fromCoroutine(run())

    def test_own_and_withheld_numbers_never_match(self) -> Any:
        self.crm.client("Office itself", tilefono_epixeirisis_1=OWN)

        async def run() -> None:
            await self.daemon.directory.build()
            monitor = self.monitor("rest")
            at = datetime.now(UTC).replace(microsecond=0).isoformat()
            for n, number in enumerate((OWN, "", "anonymous")):
                exchange = await monitor.send("POST", "voip-calls/", {
                    "call_id": f"w{n}", "phone_number": number, "direction": "incoming",
                    "started_at": at})
                self.assertEqual(exchange.status, 201, exchange.answer)
                self.assertIsNone(exchange.answer["client"])
            self.assertEqual([r[8] for r in self.rows()], [None, None, None])
            self.assertNotIn(("+30" + OWN,), [(r[3],) for r in self.rows()])

        return defer.Deferred.fromCoroutine(run())


class Refusals(MonitorCase):
    def test_every_refusal(self) -> Any:
        async def run() -> None:
            rest, hook = self.monitor("rest"), self.monitor("webhook")
            good = {"call_id": "r1", "phone_number": "2101234567", "direction": "incoming",
                    "started_at": "2026-03-02T09:00:00+00:00"}
            json_type = {"Content-Type": ["application/json"]}
            cases = [
                (rest, "POST", "voip-calls/", good, json_type, 401,
                 {"detail": "Authentication credentials were not provided."}),
                (rest, "POST", f"voip-calls/?api_key={TOKEN}", good, json_type, 401, None),
                (rest, "POST", "voip-calls/", good, {"X-API-Key": ["wrong"]}, 401,
                 {"detail": "Invalid API key."}),
                (rest, "POST", "voip-calls/", good,
                 {"Authorization": [f"Bearer {TOKEN}"]}, 401, None),
                (hook, "POST", "fritz-webhook/", {"action": "create", **good},
                 {"X-API-Key": [TOKEN]}, 401, {"error": "Unauthorized"}),
                (hook, "POST", f"fritz-webhook/?token={TOKEN}", {"action": "create", **good},
                 json_type, 401, {"error": "Unauthorized"}),
                (rest, "POST", "voip-calls/", {**good, "direction": "inbound"}, None, 400,
                 {"direction": ["must be one of incoming, outgoing"]}),
                (rest, "POST", "voip-calls/", {**good, "started_at": "9am"}, None, 400, None),
                (rest, "POST", "voip-calls/", {**good, "status": "completed"}, None, 400,
                 {"status": ["a call is created active"]}),
                (rest, "PATCH", "voip-calls/999999/", {"status": "missed"}, None, 404,
                 {"detail": "Not found."}),
                (rest, "PATCH", "voip-calls/abc/", {"status": "missed"}, None, 404, None),
                (rest, "GET", "voip-calls/", None, None, 405, None),
                (hook, "POST", "fritz-webhook/", {"action": "remove"}, None, 400,
                 {"error": "Invalid action: remove"}),
                (hook, "POST", "fritz-webhook/", {"action": "update", "id": 999999,
                                                  "status": "missed"}, None, 404,
                 {"error": "Call not found"}),
                (hook, "POST", "fritz-webhook/", {"action": "create", **good,
                                                  "direction": "x"}, None, 400,
                 {"error": "direction: must be one of incoming, outgoing"}),
                (hook, "POST", "fritz-webhook/", {"action": "update", "id": 1,
                                                  "status": "done"}, None, 400, None),
            ]
            for monitor, method, path, body, headers, status, answer in cases:
                exchange = await monitor.send(method, path, body, headers=headers)
                self.assertEqual(exchange.status, status, (method, path, exchange.answer))
                if answer is not None:
                    self.assertEqual(exchange.answer, answer, (method, path))
            bad = await hook.send("POST", "fritz-webhook/", None, raw=b"{not json")
            self.assertEqual((bad.status, bad.answer), (400, {"error": "Invalid JSON"}))
            bad = await rest.send("POST", "voip-calls/", None, raw=b"[]")
            self.assertEqual(bad.status, 400)
            self.assertEqual(self.rows(), [])
            # counted in /metrics
            response = await treq.get(self.base + "/metrics", pool=self.http)
            text = (await response.content()).decode()
            self.assertIn('dpvoip_legacy_monitor_refused_total{reason="unauthorized"} 6.0',
                          text)
            self.assertIn('dpvoip_legacy_monitor_refused_total{reason="invalid"}', text)
            self.assertIn('dpvoip_legacy_monitor_refused_total{reason="not_found"} 3.0', text)
            self.assertIn("dpvoip_legacy_monitor_token_usable 1.0", text)
            # and in `dpvoip check`: what the daemon writes to its state folder
            state = str(scratch(self) / "legacy_monitor.json")
            write_state(Path(state), {"counters": asdict(monitor_of(self.daemon).counters),
                                      "reserved_ids": 3})
            lines = await check_lines(TOKEN, Path(state), self.daemon.store)
            (line,) = lines
            self.assertTrue(line.startswith("old monitor endpoints: token set; "), line)
            self.assertIn("refused: invalid ", line)
            self.assertIn("not_found 3, unauthorized 6; 0 calls recorded", line)

        return defer.Deferred.fromCoroutine(run())


class DefaultToken(MonitorCase):
    token = "change-this-token-in-production"
    #: The level of the one line at start that says why every request is refused.
    start_level = LogLevel.warn

    def setUp(self) -> Any:
        self.said: list[dict[str, Any]] = []
        observer = cast(ILogObserver, self.said.append)
        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)
        return super().setUp()

    def test_one_line_at_start_says_why(self) -> None:
        lines = [e for e in self.said if "refuse every request" in e.get("log_format", "")]
        self.assertEqual(len(lines), 1)
        self.assertEqual(lines[0]["log_level"], self.start_level)
        self.assertIn("FRITZ_API_TOKEN", formatEvent(lines[0]))

    def test_the_default_token_refuses_everything(self) -> Any:
        async def run() -> None:
            for contract, path in (("rest", "voip-calls/"), ("webhook", "fritz-webhook/")):
                exchange = await self.monitor(contract).send("POST", path, {
                    "action": "create", "call_id": "d1", "phone_number": "2101234567",
                    "direction": "incoming", "started_at": "2026-03-02T09:00:00+00:00"})
                self.assertEqual(exchange.status, 401)
            self.assertEqual(self.rows(), [])
            response = await treq.get(self.base + "/metrics", pool=self.http)
            self.assertIn(b"dpvoip_legacy_monitor_token_usable 0.0", await response.content())

        return defer.Deferred.fromCoroutine(run())


class UnsetToken(DefaultToken):
    token = ""
    start_level = LogLevel.info  # how most offices run: no old monitor left
