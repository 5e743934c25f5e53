"""Reconciling a box's call list against a real PostgreSQL, both CRM versions (issue 16
points 2-4): calls taken while dpvoip was stopped, calls left open or interrupted,
blocked <-> missed corrections and their tickets, a list reset, a first run, active
entries, a crash between passes, and a second pass that changes nothing; then the
service's schedule and failures, driven by a Clock."""

from __future__ import annotations

from collections.abc import Awaitable, Sequence
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any, cast
from zoneinfo import ZoneInfo

import psycopg2
from twisted.internet import defer, reactor
from twisted.internet.task import Clock
from twisted.logger import ILogObserver, LogEvent, formatEvent, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase, TestCase

from dpvoip.calls.ingest import Ingest, Origin
from dpvoip.config import DatabaseSettings, FritzBoxSettings, Secret, TicketSettings
from dpvoip.core.numbers import Dialling
from dpvoip.core.outcomes import Reason
from dpvoip.core.texts import Texts
from dpvoip.deferreds import OneShotObserver
from dpvoip.fritzbox.box import rules_for
from dpvoip.fritzbox.listed import (
    ACTIVE_INCOMING,
    BLOCKED,
    INCOMING,
    MISSED,
    OUTGOING,
    CallList,
    ListedCall,
)
from dpvoip.fritzbox.parser import parse
from dpvoip.fritzbox.reconcile import ListState
from dpvoip.fritzbox.reconciler import (
    CallListError,
    Reconciler,
    ReconcileReport,
    ReconcileService,
)
from dpvoip.fritzbox.tracker import CallTracker
from dpvoip.protocols.tr064 import Tr064Client
from dpvoip.store.call_list import CallListStatements
from dpvoip.store.database import Batch, Store
from dpvoip.store.directory import DirectoryIndex
from dpvoip.store.dsn import connection_dsn
from dpvoip.store.migrations import SchemaReport, prepare
from dpvoip.store.pool import HealingPool
from dpvoip.testing.tr064 import FakeTr064Box
from test.support.crm import Crm
from test.support.crm_rules import crm_findings
from test.support.daemon import PATIENCE
from test.support.postgres import postgres
from test.support.waiting import until

ATHENS = ZoneInfo("Europe/Athens")
OWN = ("2107654321",)
A, B, C, D = "06912345678", "06923456789", "06934567890", "06945678901"
#: When the tests' reconciler reads the list (the calls are of the same morning).
NOON = datetime(2026, 3, 2, 12, 0, tzinfo=ATHENS).timestamp()


def entry(id: int, type: int, hhmm: str, remote: str = A, port: str = "10",
          duration: int = 0) -> ListedCall:
    hour, minute = map(int, hhmm.split(":"))
    return ListedCall(id, type, remote, "2107654321", "", "", port,
                      datetime(2026, 3, 2, hour, minute), duration)


def line(hhmmss: str, rest: str) -> str:
    return f"02.03.26 {hhmmss};{rest}"


class FakeList:
    """The TR-064 client as the reconciler sees it, over an in-memory list that behaves
    as the box's: ``since`` gives the entries after the id when the timestamp is the
    list's own, the whole list when it is not (the list was reset since)."""

    def __init__(self) -> None:
        self.calls: list[ListedCall] = []
        self.timestamp = 1000
        self.errors: list[Exception] = []
        self.asked: list[tuple[int | None, tuple[int, int] | None]] = []

    def call_list(self, days: int | None = None, max_entries: int | None = None,
                  since: tuple[int, int] | None = None) -> Awaitable[CallList]:
        self.asked.append((days, since))
        if self.errors:
            return defer.fail(self.errors.pop(0))
        calls = [c for c in self.calls
                 if since is None or since[1] != self.timestamp or c.id > since[0]]
        return defer.succeed(CallList(self.timestamp,
                                      tuple(sorted(calls, key=lambda c: -c.id))))

    def reset(self, *calls: ListedCall) -> None:
        self.calls = list(calls)
        self.timestamp += 1000


class FailingOnce(CallListStatements):
    """The run's last step fails once: as if dpvoip crashed before its COMMIT."""

    failed = False

    async def write_state(self, batch: Batch, box: str, state: ListState,
                          at: datetime) -> None:
        if not self.failed:
            self.failed = True
            raise RuntimeError("crash before COMMIT")
        await super().write_state(batch, box, state, at)


class ReconcilerTestCase(TestCase):
    crm_version = "2025-12"
    timeout = 2 * PATIENCE

    def setUp(self) -> Any:
        self.dsn = postgres().new_database(crm=self.crm_version)
        self.crm = Crm(self.dsn)
        pool = HealingPool(reactor, connection_dsn(self.dsn, DatabaseSettings()), 4)
        self.addCleanup(pool.close)
        self.store = Store(pool, reactor)
        where = Dialling("GR")
        index = DirectoryIndex(self.store, "public", where, own_numbers=OWN)
        schema: OneShotObserver[SchemaReport] = OneShotObserver()
        self.texts = Texts("en")
        self.ingest = Ingest(self.store, index, self.texts, TicketSettings(), ATHENS, schema,
                             reactor)
        self.settings = replace(FritzBoxSettings(), own_numbers=OWN, tr064_user="dpvoip",
                                tr064_password=Secret("not-logged"))
        rules = rules_for(self.settings, frozenset(index.own_numbers))
        self.origin = Origin("office", where, rules)
        self.tracker = CallTracker(rules)
        self.box = FakeList()
        self.clock = Clock()
        self.clock.advance(NOON)

        def capabilities() -> Any:
            report = schema.peek()
            return report.crm if report is not None else None

        self.statements = CallListStatements(self.store, "public",
                                             lambda: capabilities() or _no_extras())
        self.reconciler = self.make(self.statements)

        async def ready() -> None:
            await pool.start()
            schema.fire(await self.store.write(
                lambda c: prepare(c, standalone=False, crm_schema="public")))

        return defer.Deferred.fromCoroutine(ready())

    def tearDown(self) -> None:
        self.assertEqual(crm_findings(self.dsn), [])

    def make(self, statements: CallListStatements) -> Reconciler:
        return Reconciler(self.settings, self.origin, self.box, statements, self.ingest,
                          self.clock, self.texts)

    # -- helpers ---------------------------------------------------------------------------

    def run_once(self, reconciler: Reconciler | None = None
                 ) -> defer.Deferred[ReconcileReport]:
        return defer.Deferred.fromCoroutine((reconciler or self.reconciler).run())

    def stored_state(self, last_id: int = 100, timestamp: int = 1000) -> None:
        """The state of a pass of the night before (so every call of the morning is
        after it)."""
        self.crm.query("INSERT INTO dpvoip.call_list_state (box, last_id, list_timestamp,"
                       " updated_at) VALUES ('office', %s, %s, %s)",
                       (last_id, timestamp, datetime(2026, 3, 1, 23, 0, tzinfo=ATHENS)))

    def state(self) -> tuple[Any, ...] | None:
        rows = self.crm.query("SELECT last_id, list_timestamp FROM dpvoip.call_list_state"
                              " WHERE box = 'office'")
        return rows[0] if rows else None

    async def _lines(self, lines: Sequence[str]) -> None:
        for text in lines:
            arrived = datetime.strptime(text.split(";")[0], "%d.%m.%y %H:%M:%S").replace(
                tzinfo=ATHENS).astimezone(UTC)
            for happening in self.tracker.feed(parse(text)):
                await self.ingest.submit(happening, self.origin, arrived)

    def lines(self, *lines: str) -> defer.Deferred[None]:
        return defer.Deferred.fromCoroutine(self._lines(lines))

    def missed(self, conn: int, caller: str, ring: str, end: str) -> defer.Deferred[None]:
        return self.lines(line(ring, f"RING;{conn};{caller};7654321;SIP0;"),
                          line(end, f"DISCONNECT;{conn};0;"))

    def calls(self) -> list[tuple[Any, ...]]:
        return self.crm.query(
            "SELECT c.call_id, c.direction, c.phone_number, c.status, d.outcome,"
            " c.ticket_id, d.list_id FROM accounting_voipcall c JOIN dpvoip.call_detail d"
            " USING (call_id) ORDER BY c.started_at, c.id")

    def outcomes(self) -> dict[str, tuple[str, str | None, bool]]:
        """phone and start minute -> (status, outcome, has a ticket)."""
        return {f"{row[2]}@{row[0]}": (row[3], row[4], row[5] is not None)
                for row in self.calls()}

    def tickets(self) -> list[tuple[Any, ...]]:
        return self.crm.query("SELECT id, title, status, notes, call_id FROM accounting_ticket"
                              " ORDER BY id")

    def everything(self) -> list[list[tuple[Any, ...]]]:
        """Every row a pass could change, for "a second pass changes nothing"."""
        return [self.crm.query(f"SELECT * FROM {table} ORDER BY 1") for table in (
            "accounting_voipcall", "accounting_voipcalllog", "accounting_ticket",
            "dpvoip.call_list_state")] + [self.crm.query(
                "SELECT call_id, outcome, list_id, ticket_id, talk_seconds, ended_at"
                " FROM dpvoip.call_detail ORDER BY call_id")]


def _no_extras() -> Any:
    from dpvoip.crm.schema import CrmCapabilities

    return CrmCapabilities()


class StoppedTests(ReconcilerTestCase):
    @defer.inlineCallbacks
    def test_calls_taken_while_dpvoip_was_stopped_are_all_recovered_once(self) -> Any:
        self.stored_state(100, 1000)
        self.box.calls = [
            entry(101, MISSED, "09:00", A),
            entry(102, INCOMING, "09:05", B, port="10", duration=120),
            entry(103, INCOMING, "09:10", C, port="40", duration=60),
            entry(104, BLOCKED, "09:15", "02109999999"),
            entry(105, OUTGOING, "09:20", "2101234567", port="11", duration=180),
            entry(106, OUTGOING, "09:25", "2101234567", port="11"),
            entry(107, MISSED, "09:30", A),
        ]
        report = yield self.run_once()
        self.assertEqual((report.inserted, report.linked, report.state),
                         (7, 0, ListState(107, 1000)))
        calls = self.calls()
        self.assertEqual([(c[1], c[2], c[3], c[4]) for c in calls], [
            ("incoming", "+306912345678", "missed", "missed"),
            ("incoming", "+306923456789", "completed", "answered"),
            ("incoming", "+306934567890", "missed", "voicemail"),
            ("incoming", "+302109999999", "failed", "blocked"),
            ("outgoing", "+302101234567", "completed", "answered"),
            ("outgoing", "+302101234567", "failed", "not reached"),
            ("incoming", "+306912345678", "missed", "missed"),
        ])
        self.assertEqual([c[6] for c in calls], [101, 102, 103, 104, 105, 106, 107])
        self.assertTrue(all(c[0].startswith("fb-office-list-2603020") for c in calls))
        # The missed ones ticketed, the second missed call of A grouped into the first's.
        tickets = self.tickets()
        self.assertEqual([t[1] for t in tickets], ["MISSED CALLS (2x) - +306912345678",
                                                    "MISSED CALL - +306934567890"])
        self.assertEqual([c[5] is not None for c in calls],
                         [True, False, True, False, False, False, True])
        notes = self.crm.query("SELECT notes FROM accounting_voipcall ORDER BY started_at")
        self.assertIn("from the box's call list", notes[0][0])
        self.assertIn("answering machine 1", notes[2][0])
        self.assertEqual(self.state(), (107, 1000))
        # Running twice changes nothing.
        before = self.everything()
        again = yield self.run_once()
        self.assertEqual((again.inserted, again.linked), (0, 0))
        self.assertEqual(self.everything(), before)

    @defer.inlineCallbacks
    def test_a_recovered_missed_call_joins_the_monitors_open_ticket(self) -> Any:
        self.stored_state(100, 1000)
        yield self.missed(0, A, "09:00:05", "09:00:25")
        self.box.calls = [entry(101, MISSED, "09:00", A), entry(102, MISSED, "09:40", A)]
        report = yield self.run_once()
        self.assertEqual((report.linked, report.inserted), (1, 1))
        [monitor, recovered] = self.calls()
        self.assertEqual((monitor[0], monitor[6]), ("fb-office-20260302090005-0", 101))
        self.assertEqual(recovered[5], monitor[5])
        [ticket] = self.tickets()
        self.assertEqual(ticket[1], "MISSED CALLS (2x) - +306912345678")


class StoppedTests2026(StoppedTests):
    crm_version = "2026-08"


class OpenCallTests(ReconcilerTestCase):
    @defer.inlineCallbacks
    def test_a_call_left_open_is_finished_from_the_list(self) -> Any:
        self.stored_state(100, 1000)
        yield self.lines(line("09:00:10", f"RING;0;{B};7654321;SIP0;"),
                         line("09:00:20", f"CONNECT;0;11;{B};"))
        self.box.calls = [entry(101, INCOMING, "09:00", B, port="11", duration=120)]
        report = yield self.run_once()
        self.assertEqual((report.linked, report.finished, report.inserted), (1, 1, 0))
        [call] = self.calls()
        self.assertEqual((call[3], call[4], call[6]), ("completed", "answered", 101))
        [(notes, duration)] = self.crm.query(
            "SELECT notes, duration_seconds FROM accounting_voipcall")
        self.assertEqual(notes, "answered on extension 11: from the box's call list,"
                                " talk 2:00")
        self.assertEqual(duration, 120)

    @defer.inlineCallbacks
    def test_an_interrupted_call_is_corrected_from_the_list(self) -> Any:
        self.stored_state(100, 1000)
        yield self.lines(line("09:10:05", f"RING;1;{C};7654321;SIP0;"))
        closed = yield defer.Deferred.fromCoroutine(self.ingest.close_open_calls(
            "office", Reason.LINK_LOST, datetime(2026, 3, 2, 7, 10, 30, tzinfo=UTC)))
        self.assertEqual(closed, 1)
        self.assertEqual(self.calls()[0][4], "interrupted")
        self.box.calls = [entry(102, MISSED, "09:10", C)]
        report = yield self.run_once()
        self.assertEqual(report.finished, 1)
        [call] = self.calls()
        self.assertEqual((call[3], call[4], call[5] is not None), ("missed", "missed", True))
        before = self.everything()
        yield self.run_once()
        self.assertEqual(self.everything(), before)


class OpenCallTests2026(OpenCallTests):
    crm_version = "2026-08"


class CorrectionTests(ReconcilerTestCase):
    @defer.inlineCallbacks
    def test_blocked_and_missed_as_the_box_says_with_their_tickets(self) -> Any:
        self.stored_state(100, 1000)
        # A: a 3 s ring, missed by the timestamps, blocked by the box: its ticket goes.
        yield self.missed(0, A, "09:00:00", "09:00:03")
        # B: a 1 s ring, blocked by the timestamps, missed by the box: it gets a ticket.
        yield self.missed(1, B, "09:10:00", "09:10:01")
        # C: a 3 s ring whose ticket staff are working on: the ticket stays, noted.
        yield self.missed(2, C, "09:20:00", "09:20:03")
        # D: a long missed ring (its ticket), then a 3 s one that joined that ticket.
        yield self.missed(3, D, "09:30:00", "09:30:30")
        yield self.missed(4, D, "09:31:00", "09:31:03")
        self.assertEqual(len(self.tickets()), 3)
        worked = next(t for t in self.tickets() if t[1].endswith("+306934567890"))
        self.crm.update("accounting_ticket", worked[0], status="in_progress")
        self.box.calls = [entry(101, BLOCKED, "09:00", A), entry(102, MISSED, "09:10", B),
                          entry(103, BLOCKED, "09:20", C), entry(104, MISSED, "09:30", D),
                          entry(105, BLOCKED, "09:31", D)]
        report = yield self.run_once()
        self.assertEqual((report.linked, report.corrected, report.tickets_removed), (5, 4, 1))
        calls = {c[2] + "@" + c[0][-16:]: c for c in self.calls()}
        a, b, c = (calls[f"+30{n[1:]}@" + k] for n, k in (
            (A, "20260302090000-0"), (B, "20260302091000-1"), (C, "20260302092000-2")))
        self.assertEqual((a[3], a[4], a[5]), ("failed", "blocked", None))
        self.assertEqual((b[3], b[4], b[5] is not None), ("missed", "missed", True))
        self.assertEqual((c[3], c[4], c[5] is not None), ("failed", "blocked", True))
        d1 = calls["+306945678901@20260302093000-3"]
        d2 = calls["+306945678901@20260302093100-4"]
        self.assertEqual((d1[4], d1[5] is not None), ("missed", True))
        self.assertEqual((d2[4], d2[5]), ("blocked", None))
        tickets = {t[1].split(" - ")[1]: t for t in self.tickets()}
        self.assertEqual(sorted(tickets), ["+306923456789", "+306934567890", "+306945678901"])
        self.assertEqual(tickets["+306934567890"][2], "in_progress")
        self.assertIn("blocked by the box", tickets["+306934567890"][3])
        self.assertIn("blocked by the box", tickets["+306945678901"][3])
        logs = self.crm.query("SELECT description FROM accounting_voipcalllog"
                              " WHERE action = 'status_changed' ORDER BY id")
        self.assertIn(("Corrected from the box's call list: blocked by call barring: from"
                       " the box's call list",), logs)
        before = self.everything()
        again = yield self.run_once()
        self.assertEqual((again.corrected, again.linked), (0, 0))
        self.assertEqual(self.everything(), before)


class CorrectionTests2026(CorrectionTests):
    crm_version = "2026-08"


class ListStateTests(ReconcilerTestCase):
    @defer.inlineCallbacks
    def test_a_reset_list_is_read_by_days_and_matched_by_time(self) -> Any:
        self.stored_state(100, 1000)
        self.box.calls = [entry(101, MISSED, "09:00", A), entry(102, MISSED, "09:05", B)]
        yield self.run_once()
        self.assertEqual(len(self.calls()), 2)
        # Two hours later the list starts again, with the 09:05 call in it under id 2, an
        # older call the old list had (never recorded: before TR-064 was on), a new one.
        self.clock.advance(7200)
        self.box.reset(entry(1, MISSED, "08:30", D), entry(2, MISSED, "09:05", B),
                       entry(3, MISSED, "13:00", C))
        report = yield self.run_once()
        self.assertTrue(report.reset)
        self.assertEqual((report.linked, report.inserted, report.too_old), (1, 1, 1))
        self.assertEqual(self.box.asked[-1], (self.settings.call_list_days, None))
        calls = self.calls()
        self.assertEqual([c[2] for c in calls],
                         ["+306912345678", "+306923456789", "+306934567890"])
        self.assertEqual([c[6] for c in calls], [None, 2, 3])
        self.assertEqual(self.state(), (3, 2000))
        before = self.everything()
        yield self.run_once()
        self.assertEqual(self.everything(), before)

    @defer.inlineCallbacks
    def test_a_reset_list_grown_past_the_stored_id_is_noticed(self) -> Any:
        self.stored_state(2, 1000)
        self.box.calls = [entry(1, MISSED, "09:00", A), entry(2, MISSED, "09:05", B)]
        self.box.reset(entry(1, MISSED, "10:00", C), entry(2, MISSED, "10:05", D),
                       entry(3, MISSED, "10:10", A))
        report = yield self.run_once()
        self.assertTrue(report.reset)
        self.assertEqual(report.inserted, 3)
        self.assertEqual(self.state(), (3, 2000))

    @defer.inlineCallbacks
    def test_active_entries_are_not_passed(self) -> Any:
        self.stored_state(100, 1000)
        self.box.calls = [entry(101, MISSED, "09:00", A), entry(102, ACTIVE_INCOMING, "09:05", B),
                          entry(103, MISSED, "09:06", C)]
        report = yield self.run_once()
        self.assertEqual((report.inserted, report.held_back), (1, 2))
        self.assertEqual(self.state(), (101, 1000))
        self.box.calls[1] = entry(102, INCOMING, "09:05", B, duration=240)
        report = yield self.run_once()
        self.assertEqual(report.inserted, 2)
        self.assertEqual(self.state(), (103, 1000))
        self.assertEqual([c[4] for c in self.calls()], ["missed", "answered", "missed"])

    @defer.inlineCallbacks
    def test_a_first_run_is_a_baseline(self) -> Any:
        self.box.calls = [entry(1, MISSED, "08:00", A), entry(2, MISSED, "09:00", B),
                          entry(3, INCOMING, "11:00", C, duration=60)]
        report = yield self.run_once()
        self.assertTrue(report.baseline)
        self.assertEqual((report.inserted, report.too_old), (0, 3))
        self.assertEqual(self.calls(), [])
        self.assertEqual(self.state(), (3, 1000))
        # Calls of this run: the monitor's is linked, the one it missed recovered.
        yield self.missed(0, D, "12:05:00", "12:05:30")
        self.box.calls += [entry(4, MISSED, "12:05", D), entry(5, MISSED, "12:10", A)]
        report = yield self.run_once()
        self.assertEqual((report.linked, report.inserted), (1, 1))
        self.assertEqual(len(self.tickets()), 2)

    @defer.inlineCallbacks
    def test_a_crash_before_the_commit_moves_nothing(self) -> Any:
        self.stored_state(100, 1000)
        yield self.missed(0, A, "09:00:00", "09:00:20")
        self.box.calls = [entry(101, MISSED, "09:00", A), entry(102, MISSED, "09:05", B)]
        before = self.everything()
        crashing = self.make(FailingOnce(self.store, "public", _no_extras))
        with self.assertRaises(RuntimeError):
            yield self.run_once(crashing)
        self.assertEqual(self.everything(), before)
        report = yield self.run_once()
        self.assertEqual((report.linked, report.inserted), (1, 1))
        self.assertEqual(len(self.calls()), 2)
        self.assertEqual(self.state(), (102, 1000))

    @defer.inlineCallbacks
    def test_the_certificate_seen_first_is_pinned(self) -> Any:
        self.assertIsNone((yield defer.Deferred.fromCoroutine(
            self.statements.certificate("office"))))
        first = yield defer.Deferred.fromCoroutine(
            self.statements.pin_certificate("office", ":".join(["AB"] * 32)))
        second = yield defer.Deferred.fromCoroutine(
            self.statements.pin_certificate("office", "CD" * 32))
        self.assertEqual((first, second), ("ab" * 32, "ab" * 32))
        # Pinning keeps the list's state, and the state keeps the pin.
        self.box.calls = [entry(1, MISSED, "08:00", A)]
        yield self.run_once()
        self.assertEqual((yield defer.Deferred.fromCoroutine(
            self.statements.certificate("office"))), "ab" * 32)
        self.assertEqual(self.state(), (1, 1000))


class FakeBoxTests(ReconcilerTestCase):
    """The real TR-064 client against the fake box on 127.0.0.1 (plain HTTP, Digest)."""

    password = "Gurken-Salat-77"

    async def fake_box(self) -> tuple[FakeTr064Box, Tr064Client]:
        box = FakeTr064Box(reactor, "dpvoip", self.password, tls=False,
                           now=lambda: datetime(2026, 3, 2, 12, 0))
        await box.listen()
        self.addCleanup(box.stop)
        assert box.port is not None
        client = Tr064Client(reactor, "127.0.0.1", box.port, "dpvoip", Secret(self.password),
                             tls=False)
        return box, client

    async def test_calls_taken_while_stopped_from_the_fake_box(self) -> None:
        box, client = await self.fake_box()
        self.stored_state(0, box.timestamp)
        # The monitor saw the blocked caller (a 1 s ring); the rest it missed.
        await self.missed(0, "02101112223", "11:55:10", "11:55:11")
        morning = datetime(2026, 3, 2, 9, 0)
        box.call(MISSED, A, morning, own_number="2107654321")
        box.call(INCOMING, B, morning.replace(hour=9, minute=30), 95, port="40",
                 own_number="2107654321", device="Anrufbeantworter 1")
        box.call(OUTGOING, "2310555666", morning.replace(hour=10), 300,
                 own_number="2107654321", device="DECT 1", port="11")
        box.call(BLOCKED, "02101112223", morning.replace(hour=11, minute=55))
        reconciler = Reconciler(self.settings, self.origin, client, self.statements,
                                self.ingest, self.clock, self.texts)
        report = await reconciler.run()
        self.assertEqual((report.inserted, report.linked), (3, 1))
        self.assertEqual([(c[2], c[3], c[4]) for c in self.calls()], [
            ("+306912345678", "missed", "missed"),
            ("+306923456789", "missed", "voicemail"),
            ("+302310555666", "completed", "answered"),
            ("+302101112223", "failed", "blocked"),
        ])
        self.assertEqual(len(self.tickets()), 2)
        before = self.everything()
        again = await reconciler.run()
        self.assertEqual((again.inserted, again.linked, again.already), (0, 0, 0))
        self.assertEqual(self.everything(), before)

    async def test_a_refused_login_writes_nothing_and_says_what_to_do(self) -> None:
        box, _ = await self.fake_box()
        self.stored_state(0, box.timestamp)
        box.call(MISSED, A, datetime(2026, 3, 2, 9, 0))
        assert box.port is not None
        client = Tr064Client(reactor, "127.0.0.1", box.port, "dpvoip", Secret("wrong"),
                             tls=False)
        service = ReconcileService(
            Reconciler(self.settings, self.origin, client, self.statements, self.ingest,
                       self.clock, self.texts), self.clock, lambda: defer.succeed(None))
        service.startService()
        self.addCleanup(service.stopService)
        self.clock.advance(0)
        await until(lambda: service.status.state == "failing")
        self.assertEqual(service.status.kind, "auth")
        self.assertTrue(service.status.advice)
        self.assertEqual(self.calls(), [])
        self.assertEqual(self.state(), (0, box.timestamp))


# -- the service, with a Clock -----------------------------------------------------------------


class FakePasses:
    def __init__(self) -> None:
        self.settings = replace(FritzBoxSettings(), reconcile_every_seconds=600.0)
        self.runs = 0
        self.pending: list[defer.Deferred[ReconcileReport]] = []
        self.errors: list[Exception] = []
        self.hold = False

    def run(self) -> Awaitable[ReconcileReport]:
        self.runs += 1
        if self.errors:
            return defer.fail(self.errors.pop(0))
        if self.hold:
            waiting: defer.Deferred[ReconcileReport] = defer.Deferred()
            self.pending.append(waiting)
            return waiting
        return defer.succeed(ReconcileReport("office", inserted=2, linked=1))


class ServiceTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.passes = FakePasses()
        self.prepared: defer.Deferred[None] = defer.Deferred()
        self.service = ReconcileService(self.passes, self.clock, lambda: self.prepared,
                                        retry=lambda attempt: 30.0 * attempt)
        self.events: list[LogEvent] = []
        observer = cast(ILogObserver, self.events.append)
        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)
        self.service.startService()
        self.addCleanup(self.service.stopService)

    def said(self) -> list[str]:
        return [formatEvent(e) for e in self.events
                if e.get("log_namespace") == "dpvoip.fritzbox.reconcile"]

    def test_the_first_pass_waits_for_the_database(self) -> None:
        self.clock.advance(100)
        self.assertEqual(self.passes.runs, 0)
        self.prepared.callback(None)
        self.clock.advance(0)
        self.assertEqual(self.passes.runs, 1)
        self.assertEqual((self.service.status.state, self.service.status.inserted),
                         ("ok", 2))
        # Not connected: no periodic pass.
        self.clock.advance(3600)
        self.assertEqual(self.passes.runs, 1)

    def test_a_connect_reads_the_list_ten_seconds_later_then_periodically(self) -> None:
        self.prepared.callback(None)
        self.clock.advance(0)
        self.service.box_connected()
        self.clock.advance(9.9)
        self.assertEqual(self.passes.runs, 1)
        self.clock.advance(0.1)
        self.assertEqual(self.passes.runs, 2)
        self.clock.advance(600)
        self.assertEqual(self.passes.runs, 3)
        self.clock.advance(600)
        self.assertEqual(self.passes.runs, 4)
        self.service.box_disconnected()
        self.clock.advance(600)  # the pass already scheduled
        self.clock.advance(1800)
        self.assertEqual(self.passes.runs, 5)

    def test_never_two_passes_at_once(self) -> None:
        self.passes.hold = True
        self.prepared.callback(None)
        self.clock.advance(0)
        self.service.box_connected()
        self.clock.advance(10)
        self.service.run_now()
        self.clock.advance(0)
        self.assertEqual((self.passes.runs, self.service.busy), (1, True))
        self.passes.pending.pop().callback(ReconcileReport("office"))
        self.clock.advance(0)
        self.assertEqual(self.passes.runs, 2)  # the one asked for meanwhile, once
        self.passes.pending.pop().callback(ReconcileReport("office"))
        self.clock.advance(0)
        self.assertEqual(self.passes.runs, 2)

    def test_failures_are_kept_logged_once_per_kind_and_retried(self) -> None:
        secret = "not-logged-password"
        self.passes.errors = [
            CallListError("auth", "check the TR-064 user and password", f"401 for {secret}"),
            CallListError("auth", "check the TR-064 user and password", f"401 for {secret}"),
            CallListError("rights", "give the user the call list right"),
        ]
        self.prepared.callback(None)
        self.clock.advance(0)
        status = self.service.status
        self.assertEqual((status.state, status.kind, status.ok), ("failing", "auth", False))
        self.assertEqual(status.advice, "check the TR-064 user and password")
        self.clock.advance(29)
        self.assertEqual(self.passes.runs, 1)
        self.clock.advance(1)  # the first retry: 30 s
        self.assertEqual(self.passes.runs, 2)
        self.clock.advance(60)  # the second: 60 s
        self.assertEqual((self.passes.runs, status.kind), (3, "rights"))
        self.clock.advance(90)
        self.assertEqual((self.passes.runs, status.state), (4, "ok"))
        self.assertEqual(status.failures_by_kind, {"auth": 2, "rights": 1})
        warnings = [text for text in self.said() if "cannot read" in text]
        self.assertEqual(len(warnings), 2)  # auth once, rights once
        self.assertIn("check the TR-064 user and password", warnings[0])
        self.assertFalse(any(secret in text for text in self.said()))
        self.assertIsNotNone(status.last_success)

    def test_the_database_away_is_a_kind_of_its_own(self) -> None:
        self.passes.errors = [psycopg2.OperationalError("server closed the connection")]
        self.prepared.callback(None)
        self.clock.advance(0)
        self.assertEqual((self.service.status.state, self.service.status.kind),
                         ("failing", "database"))
        self.assertTrue(any("server closed the connection" in text for text in self.said()))
        self.clock.advance(30)
        self.assertEqual(self.service.status.state, "ok")

    def test_stopping_cancels_the_next_pass(self) -> None:
        self.prepared.callback(None)
        self.clock.advance(0)
        self.service.box_connected()
        self.service.stopService()
        self.assertEqual(self.clock.getDelayedCalls(), [])
