"""CallMonitor lines through the tracker and the ingest entry point into a real PostgreSQL,
with both CRM versions: call rows, call logs, matching, tickets, replays, concurrency,
recovery after a restart."""

from __future__ import annotations

import json
import re
import select
import time
from dataclasses import replace
from datetime import UTC, date, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import psycopg2
from twisted.internet import defer, reactor
from twisted.internet.task import Clock
from twisted.trial.unittest import TestCase

from dpvoip.calls.ingest import Ingest, Origin, ZadarmaContext, ZadarmaOutcome
from dpvoip.config import DatabaseSettings, FritzBoxSettings, TicketSettings
from dpvoip.core.happenings import Ended
from dpvoip.core.numbers import Dialling
from dpvoip.core.outcomes import Outcome, Reason
from dpvoip.core.texts import Texts
from dpvoip.deferreds import OneShotObserver
from dpvoip.fritzbox.box import rules_for
from dpvoip.fritzbox.parser import parse
from dpvoip.fritzbox.tracker import CallTracker
from dpvoip.store.database import Store
from dpvoip.store.directory import DirectoryIndex
from dpvoip.store.dsn import connection_dsn
from dpvoip.store.migrations import SchemaReport, prepare
from dpvoip.store.pool import HealingPool
from dpvoip.zadarma.events import ZadarmaEvent, parse_event
from dpvoip.zadarma.guard import GuardRules
from test.support.crm import Crm
from test.support.crm_rules import crm_findings
from test.support.daemon import PATIENCE
from test.support.postgres import postgres
from test.support.statements import statements_sent

OWN = ("2107654321",)


def today(hhmmss: str, days_ago: int = 0) -> str:
    """A CallMonitor timestamp of today (Athens time) at ``hhmmss``, so that the 24 h
    ticket window is real."""
    moment = datetime.now(ZoneInfo("Europe/Athens")) - timedelta(days=days_ago)
    return f"{moment:%d.%m.%y} {hhmmss}"


class IngestTestCase(TestCase):
    crm_version = "2025-12"
    tickets = TicketSettings()
    texts = Texts("en")
    pool_size = 4
    timeout = 2 * PATIENCE  # a hang detector

    def setUp(self) -> Any:
        self.dsn = postgres().new_database(crm=self.crm_version)
        self.crm = Crm(self.dsn)
        pool = HealingPool(reactor, connection_dsn(self.dsn, DatabaseSettings()),
                           self.pool_size)
        self.addCleanup(pool.close)
        self.store = Store(pool, reactor)
        where = Dialling("GR")
        self.index = DirectoryIndex(self.store, "public", where, own_numbers=OWN)
        self.schema: OneShotObserver[SchemaReport] = OneShotObserver()
        self.ingest = Ingest(self.store, self.index, self.texts, self.tickets,
                             ZoneInfo("Europe/Athens"), self.schema, reactor)
        settings = replace(FritzBoxSettings(), own_numbers=OWN)
        self.rules = rules_for(settings, frozenset(self.index.own_numbers))
        self.origin = Origin("office", where, self.rules)
        self.tracker = CallTracker(self.rules)

        async def ready() -> None:
            await pool.start()
            self.schema.fire(await self.store.write(
                lambda c: prepare(c, standalone=False, crm_schema="public")))

        return defer.Deferred.fromCoroutine(ready())

    def tearDown(self) -> None:
        # Every row the test wrote is what the CRM's own code would keep there.
        self.assertEqual(crm_findings(self.dsn), [])

    async def _lines(self, lines: tuple[str, ...]) -> None:
        for line in lines:
            for happening in self.tracker.feed(parse(line)):
                await self.ingest.submit(happening, self.origin)

    def lines(self, *lines: str) -> defer.Deferred[None]:
        return defer.Deferred.fromCoroutine(self._lines(lines))

    async def _lines_on_time(self, lines: tuple[str, ...]) -> None:
        for line in lines:
            arrived = datetime.strptime(line.split(";")[0], "%d.%m.%y %H:%M:%S").replace(
                tzinfo=ZoneInfo("Europe/Athens")).astimezone(UTC)
            for happening in self.tracker.feed(parse(line)):
                await self.ingest.submit(happening, self.origin, arrived)

    def lines_on_time(self, *lines: str) -> defer.Deferred[None]:
        """The lines as if each arrived at the time it carries (rows are dated by it)."""
        return defer.Deferred.fromCoroutine(self._lines_on_time(lines))

    def build_directory(self) -> defer.Deferred[int]:
        return defer.Deferred.fromCoroutine(self.index.build())

    def calls(self) -> list[tuple[Any, ...]]:
        return self.crm.query(
            "SELECT call_id, direction, phone_number, status, duration_seconds, notes,"
            " ticket_created, ticket_id, client_id, client_email, resolution,"
            " ended_at IS NOT NULL FROM accounting_voipcall ORDER BY id")

    def logs(self) -> list[tuple[str, str]]:
        return [(a, d) for a, d in self.crm.query(
            "SELECT action, description FROM accounting_voipcalllog ORDER BY id")]

    def tickets_rows(self) -> list[tuple[Any, ...]]:
        return self.crm.query(
            "SELECT id, title, status, priority, notes, call_id, client_id, assigned_to_id,"
            " email_sent, follow_up_scheduled FROM accounting_ticket ORDER BY id")

    def missed(self, conn: int, caller: str, ring: str, end: str) -> tuple[str, str]:
        return (f"{today(ring)};RING;{conn};{caller};7654321;SIP0;",
                f"{today(end)};DISCONNECT;{conn};0;")


class CallRecordTests(IngestTestCase):
    @defer.inlineCallbacks
    def test_an_answered_call_of_a_known_client(self) -> Any:
        client = self.crm.client("Papadopoulos AE", email="info@papadopoulos.gr",
                                 kinito_tilefono="691 234 5678")
        yield self.build_directory()
        yield self.lines("17.06.20 10:28:29;RING;0;06912345678;7654321;SIP0;",
                         "17.06.20 10:28:43;CONNECT;0;11;06912345678;")
        [call] = self.calls()
        self.assertEqual(call[:6], ("fb-office-20200617102829-0", "incoming", "+306912345678",
                                    "active", 0, ""))
        yield self.lines("17.06.20 10:30:31;DISCONNECT;0;109;")
        [call] = self.calls()
        # The CRM's own duration (ended - started, as its save() computes it); the talk
        # time (109 s) is kept in dpvoip's detail row.
        self.assertEqual(call, ("fb-office-20200617102829-0", "incoming", "+306912345678",
                                "completed", 122, "answered on extension 11, talk 1:49",
                                False, None,
                                client, "info@papadopoulos.gr", "pending", True))
        started = self.crm.query("SELECT started_at, ended_at FROM accounting_voipcall")[0]
        self.assertEqual(started, (datetime(2020, 6, 17, 7, 28, 29, tzinfo=UTC),
                                   datetime(2020, 6, 17, 7, 30, 31, tzinfo=UTC)))
        self.assertEqual(self.logs(), [
            ("started", "Incoming call from +306912345678 - Papadopoulos AE"),
            ("client_matched", f"Matched to client Papadopoulos AE (#{client})"),
            ("status_changed", "Answered on extension 11"),
            ("ended", "Call ended: answered on extension 11, talk 1:49"),
        ])
        self.assertEqual(self.tickets_rows(), [])
        detail = self.crm.query("SELECT source, box, conn_id, remote_raw, remote_number,"
                                " own_number, line, extension, outcome, talk_seconds"
                                " FROM dpvoip.call_detail")
        self.assertEqual(detail, [("fritzbox", "office", 0, "06912345678", "+306912345678",
                                   "7654321", "SIP0", 11, "answered", 109)])

    @defer.inlineCallbacks
    def test_an_outgoing_call_records_the_dialled_number_never_the_own(self) -> Any:
        yield self.lines(f"{today('10:30:57')};CALL;1;11;7654321;2101234567#;SIP0;",
                         f"{today('10:31:00')};DISCONNECT;1;0;")
        [call] = self.calls()
        self.assertEqual(call[1:6], ("outgoing", "+302101234567", "failed", 3, "not reached"))
        self.assertEqual(self.logs()[0], ("started", "Outgoing call to +302101234567 - unknown"))
        self.assertEqual(self.tickets_rows(), [])

    @defer.inlineCallbacks
    def test_a_withheld_caller_is_recorded_without_number_or_match(self) -> Any:
        self.crm.client("Trap", kinito_tilefono="0")
        self.crm.client("Trap too", kinito_tilefono="withheld")
        yield self.build_directory()
        yield self.lines(*self.missed(0, "", "10:00:00", "10:00:30"))
        [call] = self.calls()
        self.assertEqual((call[2], call[3], call[8]), ("withheld", "missed", None),
                         "a marker, never a blank (the CRM's model refuses one)")
        self.assertEqual(self.crm.query("SELECT remote_number FROM dpvoip.call_detail"),
                         [(None,)])
        self.assertEqual(self.logs()[0],
                         ("started", "Incoming call from withheld number - unknown"))
        self.assertEqual(self.tickets_rows(), [], "no ticket for a withheld number by default")

    @defer.inlineCallbacks
    def test_a_replayed_event_changes_nothing(self) -> Any:
        lines = ("17.06.20 10:28:29;RING;0;2101234567;7654321;SIP0;",
                 "17.06.20 10:28:43;CONNECT;0;11;2101234567;",
                 "17.06.20 10:30:31;DISCONNECT;0;109;")
        yield self.lines(*lines)
        before = self.calls(), self.logs()
        self.tracker = CallTracker(self.rules)  # as after a restart, the box resends
        yield self.lines(*lines)
        self.assertEqual((self.calls(), self.logs()), before)
        self.assertGreaterEqual(self.ingest.counters.replays_ignored, 3)


class TicketTests(IngestTestCase):
    @defer.inlineCallbacks
    def test_a_missed_call_makes_a_ticket_in_the_same_transaction(self) -> Any:
        client = self.crm.client("Papadopoulos AE", kinito_tilefono="6912345678")
        yield self.build_directory()
        yield self.lines(*self.missed(0, "06912345678", "10:00:00", "10:00:20"))
        [ticket] = self.tickets_rows()
        [call] = self.calls()
        call_row = self.crm.query("SELECT id FROM accounting_voipcall")[0][0]
        self.assertEqual(ticket[1:], ("MISSED CALL - +306912345678 - Papadopoulos AE", "open",
                                      "high", "", call_row, client, None, False, False))
        self.assertEqual((call[3], call[6], call[7]), ("missed", True, str(ticket[0])))
        self.assertEqual(self.logs()[-1],
                         ("ticket_created", f"Ticket #{ticket[0]} created: "
                                            "MISSED CALL - +306912345678 - Papadopoulos AE"))
        description = self.crm.query("SELECT description FROM accounting_ticket")[0][0]
        self.assertIn("Missed call from +306912345678 (Papadopoulos AE) at", description)

    @defer.inlineCallbacks
    def test_a_grouped_ticket_learns_its_client_in_the_title(self) -> Any:
        yield self.lines(*self.missed(0, "6912345678", "09:00:00", "09:00:30"))
        self.assertEqual([t[1] for t in self.tickets_rows()], ["MISSED CALL - +306912345678"])
        self.crm.client("Papadopoulos AE", kinito_tilefono="6912345678")
        yield self.build_directory()
        yield self.lines(*self.missed(1, "6912345678", "09:10:00", "09:10:30"))
        [ticket] = self.tickets_rows()
        self.assertEqual(ticket[1], "MISSED CALLS (2x) - +306912345678 - Papadopoulos AE")
        self.assertEqual(self.logs()[-1], ("ticket_created", f"Call joined ticket #{ticket[0]}:"
                                           " MISSED CALLS (2x) - +306912345678"
                                           " - Papadopoulos AE"))

    @defer.inlineCallbacks
    def test_missed_calls_of_one_number_are_grouped_and_escalated(self) -> Any:
        for n, (ring, end) in enumerate([("09:00:00", "09:00:30"), ("09:10:00", "09:10:30"),
                                         ("09:20:00", "09:20:30")]):
            yield self.lines(*self.missed(n % 2, "2101234567", ring, end))
        [ticket] = self.tickets_rows()
        self.assertEqual(ticket[1:4], ("MISSED CALLS (3x) - +302101234567", "open", "urgent"))
        self.assertEqual(ticket[4].splitlines(), [
            f"[{today('09:10:00')[:5].replace('.', '/')} 09:10] missed call (total 2)",
            f"[{today('09:20:00')[:5].replace('.', '/')} 09:20] missed call (total 3)",
        ])
        linked = self.crm.query("SELECT ticket_created, ticket_id FROM accounting_voipcall")
        self.assertEqual(linked, [(True, str(ticket[0]))] * 3)
        actions = [(a, d) for a, d in self.logs() if a.startswith("ticket")]
        self.assertEqual(actions, [
            ("ticket_created", f"Ticket #{ticket[0]} created: MISSED CALL - +302101234567"),
            ("ticket_created", f"Call joined ticket #{ticket[0]}:"
                               " MISSED CALLS (2x) - +302101234567"),
            ("ticket_created", f"Call joined ticket #{ticket[0]}:"
                               " MISSED CALLS (3x) - +302101234567"),
        ], "the CRM's own action choices only (it has no 'ticket_updated')")

    @defer.inlineCallbacks
    def test_an_old_or_closed_ticket_is_not_reused(self) -> Any:
        yield self.lines(*self.missed(0, "2101234567", "08:00:00", "08:00:30"))
        self.crm.query("UPDATE accounting_ticket SET status = 'resolved'")
        yield self.lines(*self.missed(1, "2101234567", "08:10:00", "08:10:30"))
        self.assertEqual([t[1] for t in self.tickets_rows()],
                         ["MISSED CALL - +302101234567"] * 2)

    @defer.inlineCallbacks
    def test_no_ticket_for_blocked_answered_fax_or_outgoing_calls(self) -> Any:
        yield self.lines(
            f"{today('11:00:00')};RING;0;2101111111;7654321;SIP0;",  # blocked
            f"{today('11:00:01')};DISCONNECT;0;0;",
            f"{today('11:01:00')};RING;0;2102222222;7654321;SIP0;",  # answered
            f"{today('11:01:05')};CONNECT;0;11;2102222222;",
            f"{today('11:02:05')};DISCONNECT;0;60;",
            f"{today('11:03:00')};RING;0;2103333333;7654321;SIP0;",  # fax
            f"{today('11:03:02')};CONNECT;0;5;2103333333;",
            f"{today('11:04:00')};DISCONNECT;0;58;",
            f"{today('11:05:00')};CALL;1;11;7654321;2104444444;SIP0;",  # not reached
            f"{today('11:05:20')};DISCONNECT;1;0;",
        )
        self.assertEqual([c[3] for c in self.calls()],
                         ["failed", "completed", "completed", "failed"])
        self.assertEqual(self.tickets_rows(), [])

    @defer.inlineCallbacks
    def test_voicemail_is_a_missed_call_assigned_by_extension(self) -> Any:
        anna = self.crm.user("anna")
        self.ingest._tickets = replace(TicketSettings(), assign_by_extension={"40": "anna"})
        yield self.lines(f"{today('12:00:00')};RING;0;2101234567;7654321;SIP0;",
                         f"{today('12:00:20')};CONNECT;0;40;2101234567;",
                         f"{today('12:00:50')};DISCONNECT;0;30;")
        [call] = self.calls()
        self.assertEqual((call[3], call[5]),
                         ("missed", "voicemail (answering machine 1), message 0:30"))
        [ticket] = self.tickets_rows()
        self.assertEqual((ticket[2], ticket[7]), ("assigned", anna))

    @defer.inlineCallbacks
    def test_assignment_by_the_called_own_number(self) -> Any:
        bob = self.crm.user("bob")
        self.ingest._tickets = replace(TicketSettings(),
                                       assign_by_number={"210 765 4321": "bob"})
        yield self.lines(f"{today('12:00:00')};RING;0;2101234567;2107654321;SIP0;",
                         f"{today('12:00:20')};DISCONNECT;0;0;")
        self.assertEqual(self.tickets_rows()[0][7], bob)

    @defer.inlineCallbacks
    def test_two_missed_calls_of_one_number_ending_at_once_make_one_ticket(self) -> Any:
        for conn in (0, 1):
            yield self.lines(f"{today('13:00:00')};RING;{conn};2101234567;7654321;SIP{conn};")
        ends = [h for conn in (0, 1)
                for h in self.tracker.feed(parse(f"{today('13:00:30')};DISCONNECT;{conn};0;"))]
        yield defer.gatherResults([self.ingest.submit(h, self.origin) for h in ends])
        [ticket] = self.tickets_rows()
        self.assertEqual(ticket[1], "MISSED CALLS (2x) - +302101234567")
        self.assertEqual({c[7] for c in self.calls()}, {str(ticket[0])})


class WithheldTicketTests(IngestTestCase):
    tickets = replace(TicketSettings(), withheld=True)

    @defer.inlineCallbacks
    def test_withheld_calls_get_their_own_tickets_when_configured(self) -> Any:
        yield self.lines(*self.missed(0, "", "14:00:00", "14:00:30"))
        yield self.lines(*self.missed(0, "", "14:01:00", "14:01:30"))
        self.assertEqual([t[1] for t in self.tickets_rows()],
                         ["MISSED CALL - withheld number"] * 2)


#: Latin words a Greek row may hold: none of dpvoip's own (only the values: numbers,
#: names, times; "x" of a grouped title's "(3x)").
GREEK_ALLOWED = {"x"}


def latin_words(text: str, *values: str) -> set[str]:
    """The words of Latin letters in ``text`` once the ``values`` are taken out."""
    for value in values:
        text = text.replace(value, " ")
    return {word for word in re.findall(r"[A-Za-z]+", text)} - GREEK_ALLOWED


class GreekTests(IngestTestCase):
    """With ``[crm] language = "el"`` every text dpvoip writes into the CRM is Greek."""

    texts = Texts("el")
    tickets = replace(TicketSettings(), withheld=True)

    def written(self) -> list[str]:
        """Every text column dpvoip wrote into the CRM's tables."""
        return [text for query in (
            "SELECT phone_number FROM accounting_voipcall",
            "SELECT notes FROM accounting_voipcall",
            "SELECT description FROM accounting_voipcalllog",
            "SELECT title FROM accounting_ticket",
            "SELECT description FROM accounting_ticket",
            "SELECT notes FROM accounting_ticket",
        ) for (text,) in self.crm.query(query)]

    @defer.inlineCallbacks
    def test_every_row_of_a_day_of_calls_is_greek(self) -> Any:
        client = self.crm.client("Papadopoulos AE", kinito_tilefono="6912345678")
        yield self.build_directory()
        yield self.lines(
            f"{today('10:00:00')};RING;0;06912345678;7654321;SIP0;",
            f"{today('10:00:05')};CONNECT;0;11;06912345678;",
            f"{today('10:01:10')};DISCONNECT;0;65;",
            *self.missed(0, "2101234567", "10:10:00", "10:10:30"),
            *self.missed(1, "2101234567", "10:20:00", "10:20:30"),
            *self.missed(0, "2101234567", "10:30:00", "10:30:30"),
            *self.missed(0, "", "10:40:00", "10:40:30"),
            f"{today('10:50:00')};RING;0;2102222222;7654321;SIP0;",  # blocked
            f"{today('10:50:01')};DISCONNECT;0;0;",
            f"{today('11:00:00')};CALL;1;11;7654321;2107654321;SIP0;",  # an own number
            f"{today('11:00:03')};CONNECT;1;11;2107654321;",
            f"{today('11:01:03')};DISCONNECT;1;60;",
            f"{today('11:10:00')};RING;2;2103333333;7654321;SIP0;",
        )
        for end in self.tracker.close_all(Reason.LINK_LOST, datetime.now(UTC)):
            yield self.ingest.submit(end, self.origin)
        calls = {c[2]: c for c in self.calls()}
        self.assertEqual(calls["+306912345678"][5], "απαντήθηκε στο εσωτερικό 11, ομιλία 1:05")
        self.assertEqual(calls["Απόκρυψη"][3], "missed")
        self.assertEqual(calls["+302102222222"][5], "απορρίφθηκε από φραγή κλήσεων")
        self.assertEqual(calls["Εσωτερική"][5],
                         "απαντήθηκε στο εσωτερικό 11: εσωτερική κλήση σε δικό μας αριθμό,"
                         " ομιλία 1:00")
        self.assertEqual(calls["+302103333333"][5],
                         "διακόπηκε: χάθηκε η σύνδεση με το τηλεφωνικό κέντρο")
        logs = self.logs()
        self.assertIn(("client_matched", f"Αντιστοίχιση με πελάτη Papadopoulos AE (#{client})"),
                      logs)
        self.assertIn(("ended", "Τέλος κλήσης: απαντήθηκε στο εσωτερικό 11, ομιλία 1:05"), logs)
        self.assertIn(("started", "Εισερχόμενη κλήση από απόκρυψη αριθμού - άγνωστος"), logs)
        grouped, withheld = self.tickets_rows()
        self.assertEqual((grouped[1], grouped[3]),
                         ("ΑΝΑΠΑΝΤΗΤΕΣ ΚΛΗΣΕΙΣ (3x) - +302101234567", "urgent"))
        self.assertIn(("ticket_created", f"Η κλήση προστέθηκε στο τίκετ #{grouped[0]}:"
                                         " ΑΝΑΠΑΝΤΗΤΕΣ ΚΛΗΣΕΙΣ (3x) - +302101234567"), logs)
        self.assertEqual(withheld[1], "ΑΝΑΠΑΝΤΗΤΗ ΚΛΗΣΗ - απόκρυψη αριθμού")
        self.assertEqual({a for a, _ in logs},
                         {"started", "client_matched", "status_changed", "ended",
                          "ticket_created"})
        values = ("+306912345678", "+302101234567", "+302102222222", "+302103333333",
                  "2107654321", "Papadopoulos AE")
        for text in self.written():
            self.assertEqual(latin_words(text, *values), set(), text)


class WithheldLabelTests(IngestTestCase):
    texts = Texts("el", "Ανώνυμος")
    tickets = replace(TicketSettings(), withheld=True)

    @defer.inlineCallbacks
    def test_the_configured_marker_never_groups_tickets(self) -> Any:
        yield self.lines(*self.missed(0, "", "14:00:00", "14:00:30"))
        yield self.lines(*self.missed(1, "anonymous", "14:01:00", "14:01:30"))
        self.assertEqual([c[2] for c in self.calls()], ["Ανώνυμος"] * 2)
        self.assertEqual([t[1] for t in self.tickets_rows()],
                         ["ΑΝΑΠΑΝΤΗΤΗ ΚΛΗΣΗ - απόκρυψη αριθμού"] * 2)


class RecoveryTests(IngestTestCase):
    @defer.inlineCallbacks
    def test_calls_left_open_are_closed_at_start_and_recovered_by_a_late_disconnect(
        self,
    ) -> Any:
        yield self.lines(f"{today('15:00:00')};RING;2;2101234567;7654321;SIP0;")
        closed = yield defer.Deferred.fromCoroutine(self.ingest.close_open_calls(
            "office", Reason.RESTARTED, datetime.now(UTC)))
        self.assertEqual(closed, 1)
        [call] = self.calls()
        self.assertEqual((call[3], call[5]), ("failed", "interrupted: dpvoip restarted"))
        # After the restart the box sends the DISCONNECT of a call this process never saw.
        self.tracker = CallTracker(self.rules)
        yield self.lines(f"{today('15:00:40')};DISCONNECT;2;0;")
        [call] = self.calls()
        self.assertEqual((call[3], call[5]), ("missed", "missed: recovered after a reconnect"))
        self.assertEqual(len(self.tickets_rows()), 1)

    @defer.inlineCallbacks
    def test_only_the_last_runs_calls_are_closed_at_start(self) -> Any:
        yield self.lines(f"{today('15:00:00')};RING;2;2101234567;7654321;SIP0;")
        yield self.lines(f"{today('15:05:00')};RING;3;2101234568;7654321;SIP0;")
        this_run_began = datetime.strptime(today("15:02:00"), "%d.%m.%y %H:%M:%S").replace(
            tzinfo=self.rules.zone)
        closed = yield defer.Deferred.fromCoroutine(self.ingest.close_open_calls(
            "office", Reason.RESTARTED, datetime.now(UTC), this_run_began))
        self.assertEqual(closed, 1)
        self.assertEqual(sorted((c[3], c[5]) for c in self.calls()), [
            ("active", ""), ("failed", "interrupted: dpvoip restarted")])

    @defer.inlineCallbacks
    def test_an_unknown_disconnect_with_nothing_to_close_is_an_orphan(self) -> Any:
        yield self.lines(f"{today('16:00:00')};DISCONNECT;7;12;")
        self.assertEqual(self.calls(), [])
        self.assertEqual(self.ingest.counters.orphans, 1)

    @defer.inlineCallbacks
    def test_an_interrupted_call_is_never_ticketed(self) -> Any:
        yield self.lines(f"{today('16:00:00')};RING;0;2101234567;7654321;SIP0;")
        # Closed as the ring began (the link lost at once): the CRM's duration is 0 at any
        # hour this test runs (closed "now", it grew with the time of day after 16:00).
        lost = datetime.strptime(today("16:00:00"), "%d.%m.%y %H:%M:%S").replace(
            tzinfo=ZoneInfo("Europe/Athens")).astimezone(UTC)
        for end in self.tracker.close_all(Reason.LINK_LOST, lost):
            assert isinstance(end, Ended) and end.outcome is Outcome.INTERRUPTED
            yield self.ingest.submit(end, self.origin)
        self.assertEqual(self.calls()[0][3:6],
                         ("failed", 0, "interrupted: monitor connection lost"))
        self.assertEqual(self.tickets_rows(), [])


class NewestCrmTests(IngestTestCase):
    crm_version = "2026-08"

    @defer.inlineCallbacks
    def test_call_log_lines_fill_the_newer_columns_and_events_are_published(self) -> Any:
        client = self.crm.client("Client", kinito_tilefono="6912345678")
        yield self.build_directory()
        listener = psycopg2.connect(self.dsn)
        listener.autocommit = True
        self.addCleanup(listener.close)
        listener.cursor().execute("LISTEN dpvoip_calls")
        yield self.lines(*self.missed(0, "6912345678", "17:00:00", "17:00:30"))
        rows = self.crm.query("SELECT action, call_reference, phone_number, client_id"
                              " FROM accounting_voipcalllog ORDER BY id")
        started = datetime.strptime(today("17:00:00"), "%d.%m.%y %H:%M:%S")
        identity = f"fb-office-{started:%Y%m%d%H%M%S}-0"
        self.assertEqual({r[1:] for r in rows}, {(identity, "+306912345678", client)})
        self.assertEqual([r[0] for r in rows],
                         ["started", "client_matched", "ended", "ticket_created"])
        events = [json.loads(n.payload) for n in notifications(listener, 3)]
        self.assertEqual([e["event"] for e in events], ["started", "ended", "ticket_created"])
        self.assertEqual({e["call_id"] for e in events}, {identity})
        self.assertEqual(events[0]["name"], "Client")
        self.assertEqual(events[1]["status"], "missed")


def notifications(listener: Any, count: int) -> list[Any]:
    """The notifications ``listener`` has had once ``count`` have come (or all that came
    within a hang detector's while): each commit sends its own, and they reach the
    listener's socket when they do, not all by the time the first one has."""
    deadline = time.monotonic() + PATIENCE
    while len(listener.notifies) < count and (left := deadline - time.monotonic()) > 0:
        select.select([listener], [], [], left)
        listener.poll()
    return list(listener.notifies)


class WindowTests(IngestTestCase):
    tickets = replace(TicketSettings(), group_hours=1.0)

    @defer.inlineCallbacks
    def test_an_open_ticket_is_joined_only_within_the_configured_window(self) -> Any:
        # The ticket is created when the first call's DISCONNECT arrives, at 09:00:30.
        yield self.lines_on_time(*self.missed(0, "2101234567", "09:00:00", "09:00:30"))
        yield self.lines_on_time(*self.missed(1, "2101234567", "09:50:00", "09:50:30"))
        yield self.lines_on_time(*self.missed(0, "2101234567", "10:30:00", "10:30:30"))
        self.assertEqual([t[1] for t in self.tickets_rows()],
                         ["MISSED CALLS (2x) - +302101234567", "MISSED CALL - +302101234567"])


def zadarma_call(caller: str, pbx: str, answered: bool,
                 start: str = "2026-01-15 10:00:00") -> list[dict[str, str]]:
    """A Zadarma incoming call's events (NOTIFY_START, NOTIFY_END) as their forms. Two
    calls of one caller differ in their ``start`` (a signed string belongs to one call)."""
    common = {"pbx_call_id": pbx, "call_start": start, "caller_id": caller,
              "called_did": "302107654321"}
    return [{"event": "NOTIFY_START", **common},
            {"event": "NOTIFY_END", **common, "duration": "95" if answered else "0",
             "disposition": "answered" if answered else "no answer", "status_code": "16",
             "is_recorded": "0", "calltype": "normal", "internal": "100"}]


class ZadarmaTestCase(IngestTestCase):
    # The events keep their fixed date (and ClockTests' clock is in 2030): the freshness
    # window is opened wide (a century); test_zadarma_attacks tests it at its default.
    context = ZadarmaContext(Dialling("GR"), ZoneInfo("Europe/Athens"),
                             guard=GuardRules(max_age=timedelta(days=36500)))

    async def _send(self, forms: list[dict[str, str]], context: ZadarmaContext) -> None:
        for form in forms:
            event = parse_event(form)
            assert isinstance(event, ZadarmaEvent)
            await self.ingest.submit_zadarma(event, form, context)

    def send(self, forms: list[dict[str, str]],
             context: ZadarmaContext | None = None) -> defer.Deferred[None]:
        return defer.Deferred.fromCoroutine(self._send(forms, context or self.context))


class RoundTripTests(ZadarmaTestCase):
    """The hot paths' round trips to PostgreSQL, once each statement is planned on the
    connection (one pooled connection, warmed by a first call): each execute on a cursor
    is one message to the server and its answer. One more is a regression."""

    pool_size = 1

    def sent(self) -> list[str]:
        """From now on, the text of every execute on any connection."""
        return statements_sent(self)

    @defer.inlineCallbacks
    def test_a_ring_and_a_missed_calls_disconnect_with_its_ticket(self) -> Any:
        self.crm.client("A", kinito_tilefono="6912345678")
        self.crm.client("B", kinito_tilefono="6912345679")
        yield self.build_directory()
        yield self.lines(*self.missed(0, "6912345678", "10:00:00", "10:00:20"))
        sent = self.sent()
        ring, disconnect = self.missed(1, "6912345679", "10:01:00", "10:01:20")
        yield self.lines(ring)
        self.assertEqual(len(sent), 2, f"the lookup, then the call row: {sent}")
        self.assertTrue(all(text.startswith("EXECUTE ") for text in sent),
                        f"each planned once per connection, not parsed at every call: {sent}")
        del sent[:]
        yield self.lines(disconnect)
        self.assertEqual(len(sent), 2, "the lock and the facts, then the rest with its"
                         f" COMMIT (the new ticket's id carried past it, for the log): {sent}")
        self.assertEqual(self.ingest.counters.ticket_writes, 2)
        yield self.lines(*self.missed(2, "6912345679", "10:02:00", "10:02:20"))  # planned
        ring, disconnect = self.missed(3, "6912345679", "10:03:00", "10:03:20")
        yield self.lines(ring)
        del sent[:]
        yield self.lines(disconnect)
        self.assertEqual(len(sent), 2, "joining the number's open ticket: the lock and the"
                         f" facts, then the rest with its COMMIT: {sent}")

    @defer.inlineCallbacks
    def test_zadarmas_start_and_end(self) -> Any:
        self.crm.client("A", kinito_tilefono="6912345678")
        yield self.build_directory()
        yield self.send(zadarma_call("+306912345678", "in_" + "1" * 40, answered=True))
        sent = self.sent()
        start, end = zadarma_call("+306912345678", "in_" + "2" * 40, answered=True,
                                  start="2026-01-15 10:05:00")
        yield self.send([start])
        self.assertEqual(len(sent), 2, f"the journal, then the call: {sent}")
        del sent[:]
        yield self.send([end])
        self.assertEqual(len(sent), 2, f"the journal, then the call: {sent}")
        self.assertEqual(self.ingest.counters.calls_ended, 2)

    @defer.inlineCallbacks
    def test_a_zadarma_missed_call_with_its_ticket(self) -> Any:
        context = replace(self.context, tickets=True)
        yield self.send(zadarma_call("+306912345678", "in_" + "1" * 40, answered=False),
                        context)
        start, end = zadarma_call("+306912345679", "in_" + "2" * 40, answered=False)
        yield self.send([start], context)
        sent = self.sent()
        yield self.send([end], context)
        self.assertEqual(len(sent), 3, "the journal, the call with the ticket's facts, the"
                         " new ticket with its COMMIT (the ticket's id carried past it, for"
                         f" the log): {sent}")
        self.assertEqual(self.ingest.counters.ticket_writes, 2)
        start, end = zadarma_call("+306912345679", "in_" + "3" * 40, answered=False,
                                  start="2026-01-15 10:09:00")
        yield self.send([start], context)
        del sent[:]
        yield self.send([end], context)
        executed = [text for text in sent if not text.startswith("PREPARE")]  # once
        self.assertEqual(len(executed), 3, "joining the number's open ticket: the journal,"
                         f" the call with the ticket's facts, the ticket with the COMMIT:"
                         f" {executed}")
        self.assertEqual(self.ingest.counters.ticket_writes, 3)

    def one_transaction_at_a_time(self) -> None:
        """The events that arrive while a transaction is in flight share the next."""
        self.ingest = Ingest(self.store, self.index, self.texts, self.tickets,
                             ZoneInfo("Europe/Athens"), self.schema, reactor,
                             groups_in_flight=1)

    def arriving_together(self, forms: list[dict[str, str]]
                          ) -> defer.Deferred[list[ZadarmaOutcome]]:
        """``forms`` submitted at once, without waiting for each other's answers."""
        answers = []
        for form in forms:
            event = parse_event(form)
            assert isinstance(event, ZadarmaEvent)
            answers.append(self.ingest.submit_zadarma(event, form, self.context))
        return defer.gatherResults(answers, consumeErrors=True)

    @defer.inlineCallbacks
    def test_zadarma_events_that_arrive_together_share_two_round_trips(self) -> Any:
        self.one_transaction_at_a_time()
        names = ["Alpha", "Beta", "Gamma", "Delta", "Epsilon"]
        for n, name in enumerate(names):
            self.crm.client(name, kinito_tilefono=f"691234567{n}")
        yield self.build_directory()
        yield self.send(zadarma_call("+306912345670", "in_" + "0" * 40, answered=True,
                                     start="2026-01-15 09:00:00"))  # planned
        sent = self.sent()
        starts = [zadarma_call(f"+30691234567{n}", f"in_{n + 1:040d}", answered=True,
                               start=f"2026-01-15 10:0{n}:00")[0] for n in range(5)]
        outcomes = yield self.arriving_together(starts)
        self.assertEqual(len(sent), 4, "the first alone (the journal, the call), the four"
                         f" that arrived meanwhile together: {sent}")
        self.assertEqual([o.match.display_name for o in outcomes], names)
        rows = self.crm.query(
            "SELECT c.call_id, c.status, p.eponimia, count(l.id) FROM accounting_voipcall c"
            " JOIN accounting_clientprofile p ON p.id = c.client_id JOIN"
            " accounting_voipcalllog l ON l.call_id = c.id WHERE c.call_id <> %s"
            " GROUP BY 1, 2, 3 ORDER BY 1", ("zd-in_" + "0" * 40,))
        # (each: the line of its start and the line naming its caller)
        self.assertEqual(rows, [(f"zd-in_{n + 1:040d}", "active", name, 2)
                                for n, name in enumerate(names)])
        self.assertEqual(self.ingest.counters.calls_started, 6)
        self.assertEqual((self.ingest.zadarma_groups.groups,
                          self.ingest.zadarma_groups.items), (4, 7))

    @defer.inlineCallbacks
    def test_a_refused_event_is_taken_back_without_its_group(self) -> Any:
        self.one_transaction_at_a_time()
        first, _ = zadarma_call("+306912345678", "in_" + "1" * 40, answered=True)
        yield self.send([first])
        thief = dict(first, pbx_call_id="in_" + "2" * 40)  # the first's signed string
        other, _ = zadarma_call("+306912345670", "in_" + "3" * 40, answered=True,
                                start="2026-01-15 10:07:00")
        blocker, _ = zadarma_call("+306912345671", "in_" + "4" * 40, answered=True,
                                  start="2026-01-15 10:08:00")
        sent = self.sent()
        outcomes = yield self.arriving_together([blocker, thief, other])
        executed = [text for text in sent if not text.startswith("PREPARE")]  # once
        self.assertEqual(len(executed), 4, f"the blocker alone, then the other two: {sent}")
        self.assertEqual([o.refused for o in outcomes], ["", "bound_elsewhere", ""])
        self.assertEqual(self.crm.query(
            "SELECT DISTINCT pbx_call_id FROM dpvoip.zadarma_event ORDER BY 1"),
            [("in_" + "1" * 40,), ("in_" + "3" * 40,), ("in_" + "4" * 40,)])
        self.assertEqual(self.crm.query(
            "SELECT pbx_call_id FROM dpvoip.zadarma_binding ORDER BY 1"),
            [("in_" + "1" * 40,), ("in_" + "3" * 40,), ("in_" + "4" * 40,)])
        self.assertEqual([c for (c,) in self.crm.query(
            "SELECT call_id FROM accounting_voipcall ORDER BY 1")],
            ["zd-in_" + "1" * 40, "zd-in_" + "3" * 40, "zd-in_" + "4" * 40])
        self.assertEqual(self.ingest.counters.zadarma_bound_elsewhere, 1)
        self.assertEqual(self.ingest.counters.calls_started, 3)

    @defer.inlineCallbacks
    def test_a_group_that_fails_is_tried_again_event_by_event(self) -> Any:
        """One event whose writes the database refuses fails alone; the others of its
        group are written, and counted, once."""
        self.one_transaction_at_a_time()
        blocker, _ = zadarma_call("+306912345671", "in_" + "4" * 40, answered=True,
                                  start="2026-01-15 10:08:00")
        good, _ = zadarma_call("+306912345670", "in_" + "3" * 40, answered=True,
                               start="2026-01-15 10:07:00")
        broken, _ = zadarma_call("+306912345672", "in_" + "5" * 40, answered=True,
                                 start="2026-01-15 10:09:00")
        # The CRM refuses this one call's row (as a constraint of its own would).
        self.crm.query("ALTER TABLE accounting_voipcall ADD CONSTRAINT no_five"
                       f" CHECK (call_id <> 'zd-in_{'5' * 40}')")
        answers = []
        for form in (blocker, good, broken):
            event = parse_event(form)
            assert isinstance(event, ZadarmaEvent)
            answers.append(self.ingest.submit_zadarma(event, form, self.context))
        results = yield defer.DeferredList(answers, consumeErrors=True)
        self.assertEqual([ok for ok, _ in results], [True, True, False])
        self.assertIsInstance(results[2][1].value, psycopg2.errors.CheckViolation)
        self.assertEqual([c for (c,) in self.crm.query(
            "SELECT call_id FROM accounting_voipcall ORDER BY 1")],
            ["zd-in_" + "3" * 40, "zd-in_" + "4" * 40])
        self.assertEqual(self.crm.query("SELECT pbx_call_id FROM dpvoip.zadarma_event"
                                        " WHERE pbx_call_id = %s", ("in_" + "5" * 40,)), [])
        self.assertEqual(self.ingest.counters.calls_started, 2)
        self.assertEqual(self.ingest.zadarma_groups.groups, 4)  # 1, (2, 3) failed, 2, 3


class GroupLockTests(ZadarmaTestCase):
    """Two instances' groups that end calls of the same callers."""

    @defer.inlineCallbacks
    def test_groups_ending_two_callers_in_opposite_orders_do_not_deadlock(self) -> Any:
        # Each group takes its ending callers' ticket locks up front, sorted with its other
        # locks: taken event by event, the first group would hold X's and wait for Y's
        # while the second held Y's and waited for X's, until PostgreSQL ended one of
        # them (a second later) and it was tried again event by event.
        context = replace(self.context, tickets=True)
        x, y = "+306912345601", "+306912345602"
        instances = [Ingest(self.store, self.index, self.texts, self.tickets,
                            ZoneInfo("Europe/Athens"), self.schema, reactor,
                            groups_in_flight=1) for _ in range(2)]
        calls = {  # (instance, caller, call, minute); each instance ends X and Y
            (0, x, "1", 1), (0, y, "2", 2), (1, y, "3", 3), (1, x, "4", 4)}
        forms = {call: zadarma_call(caller, "in_" + call * 40, answered=False,
                                    start=f"2026-01-15 10:0{minute}:00")
                 for _, caller, call, minute in calls}
        for start, _ in forms.values():
            yield self.send([start], context)
        answers = []
        for n, ingest in enumerate(instances):
            # A first event alone, so that its instance's two ends form the next group.
            blocker, _ = zadarma_call(f"+30691234570{n}", f"in_{n + 5:040d}", answered=True,
                                      start=f"2026-01-15 10:0{n + 5}:00")
            ordered = [call for _, call in sorted(
                (minute, call) for i, _, call, minute in calls if i == n)]
            for form in [blocker, *(forms[call][1] for call in ordered)]:
                event = parse_event(form)
                assert isinstance(event, ZadarmaEvent)
                answers.append(ingest.submit_zadarma(event, form, context))
        outcomes = yield defer.gatherResults(answers, consumeErrors=True)
        self.assertEqual([o.refused for o in outcomes], [""] * 6)
        self.assertEqual([(i.zadarma_groups.groups, i.zadarma_groups.items)
                          for i in instances], [(2, 3), (2, 3)],
                         "each instance: its blocker alone, then its two ends together,"
                         " never undone and tried again")
        rows = self.crm.query(
            "SELECT t.title, count(d.call_id) FROM accounting_ticket t JOIN"
            " dpvoip.call_detail d ON d.ticket_id = t.id GROUP BY t.id, t.title ORDER BY 1")
        self.assertEqual([calls for _, calls in rows], [2, 2], rows)


class ClockTests(ZadarmaTestCase):
    """The wall clock the ingest reads is the one it is given."""

    @defer.inlineCallbacks
    def test_the_sales_sides_today_and_the_rows_times_come_from_the_clock(
        self,
    ) -> Any:
        clock = Clock()
        moment = datetime(2030, 3, 1, 22, 30, tzinfo=UTC)  # 2 March in Athens already
        clock.advance(moment.timestamp())
        self.ingest = Ingest(self.store, self.index, Texts("en"), self.tickets,
                             ZoneInfo("Europe/Athens"), self.schema, clock)
        contact = self.crm.contact("Maria", "Ioannou", mobile="6912345678")
        self.crm.deal("Insurance", contact_id=contact, workflow="")
        yield self.build_directory()
        yield self.send(zadarma_call("+306912345678", "in_" + "1" * 40, answered=True))
        self.assertEqual(self.crm.query("SELECT was_in_touch FROM crm_contact"),
                         [(date(2030, 3, 2),)])
        self.assertEqual(self.crm.query("SELECT workflow FROM crm_deal"), [
            ("02.03.2030 - Incoming call from Maria Ioannou (answered, 1:35).",)])
        yield self.send(zadarma_call("+302101234567", "in_" + "2" * 40, answered=False),
                        replace(self.context, tickets=True))
        # Written as at the event's arrival (the clock); a missed Zadarma call ends when
        # it started plus its talk time: Zadarma's own times, never the delivery's.
        self.assertEqual(self.crm.query(
            "SELECT created_at, updated_at, ended_at - started_at FROM accounting_voipcall"
            " WHERE ticket_created"), [(moment, moment, timedelta(0))])
        self.assertEqual(self.crm.query("SELECT created_at FROM accounting_ticket"),
                         [(moment,)])


class GreekZadarmaTests(ZadarmaTestCase):
    texts = Texts("el")

    @defer.inlineCallbacks
    def test_a_zadarma_call_and_the_deals_line_in_greek(self) -> Any:
        contact = self.crm.contact("Maria", "Ioannou", mobile="6912345678")
        self.crm.deal("Insurance", contact_id=contact, workflow="")
        yield self.build_directory()
        yield self.send(zadarma_call("+306912345678", "in_" + "1" * 40, answered=True))
        yield self.send(zadarma_call("0", "in_" + "2" * 40, answered=False))
        [workflow] = self.crm.query("SELECT workflow FROM crm_deal")[0]
        self.assertRegex(workflow, r"^[0-9.]{10} - Εισερχόμενη κλήση από Maria Ioannou"
                                   r" \(απαντήθηκε, 1:35\)\.$")
        self.assertEqual([(c[2], c[5]) for c in self.calls()], [
            ("+306912345678", "απαντήθηκε, ομιλία 1:35"),
            ("Απόκρυψη", "αναπάντητη (χωρίς απάντηση)"),
        ])
        self.assertIn(("ended", "Τέλος κλήσης: αναπάντητη (χωρίς απάντηση)"), self.logs())


def test_a_form_an_older_version_journalled_and_this_one_refuses_is_left_out() -> None:
    from dpvoip.calls.ingest import journalled

    start, end = zadarma_call("6912345678", "in_" + "7" * 40, answered=True)
    older = {**start, "event": "NOTIFY_INTERNAL", "internal": "10\x000"}  # a NUL: now a 400
    events = journalled([start, older, end])
    assert [e.kind for e in events] == ["NOTIFY_START", "NOTIFY_END"]
