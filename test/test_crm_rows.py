"""Rows the CRM can live with (issue 13): written as at the events' arrival, with the CRM's
own duration, log rows that follow their call, a grouped ticket that learns its client,
the CRM's ``update_date`` bumped, a hidden Zadarma caller recorded, a callback's first
line naming the number dialled. On both shipped CRM schemas where the columns differ."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

from twisted.internet import defer

from dpvoip.fritzbox.parser import parse
from dpvoip.zadarma.events import ZadarmaEvent, parse_event
from test.test_ingest import IngestTestCase, today
from test.test_zadarma_webhook import PBX, START, WebhookTestCase, incoming

#: A moment long before the tests run: a row dated so was dated by its arrival.
ARRIVED = datetime(2026, 3, 1, 9, 0, 0, tzinfo=UTC)


class FritzRowTests(IngestTestCase):
    crm_version = "2026-08"

    async def _feed(self, received: datetime, *lines: str) -> None:
        for line in lines:
            for happening in self.tracker.feed(parse(line)):
                await self.ingest.submit(happening, self.origin, received)

    def feed(self, received: datetime, *lines: str) -> defer.Deferred[None]:
        return defer.Deferred.fromCoroutine(self._feed(received, *lines))

    @defer.inlineCallbacks
    def test_every_row_is_dated_by_the_events_arrival_not_by_its_commit(self) -> Any:
        yield self.feed(ARRIVED, f"{today('10:28:29')};RING;0;06912345678;7654321;SIP0;")
        yield self.feed(ARRIVED + timedelta(seconds=30), f"{today('10:28:59')};DISCONNECT;0;0;")
        [(created, updated)] = self.crm.query(
            "SELECT created_at, updated_at FROM accounting_voipcall")
        self.assertEqual((created, updated), (ARRIVED, ARRIVED + timedelta(seconds=30)))
        self.assertEqual(self.crm.query(
            "SELECT action, created_at FROM accounting_voipcalllog ORDER BY id"), [
            ("started", ARRIVED),
            ("ended", ARRIVED + timedelta(seconds=30)),
            ("ticket_created", ARRIVED + timedelta(seconds=30)),
        ])
        self.assertEqual(self.crm.query("SELECT created_at FROM accounting_ticket"),
                         [(ARRIVED + timedelta(seconds=30),)])

    @defer.inlineCallbacks
    def test_the_duration_is_the_crms_own_and_the_talk_time_is_kept(self) -> Any:
        yield self.lines(f"{today('10:28:29')};RING;0;06912345678;7654321;SIP0;",
                         f"{today('10:28:43')};CONNECT;0;11;06912345678;",
                         f"{today('10:30:31')};DISCONNECT;0;65;")
        [(duration, started, ended)] = self.crm.query(
            "SELECT duration_seconds, started_at, ended_at FROM accounting_voipcall")
        self.assertEqual(duration, int((ended - started).total_seconds()))
        self.assertEqual(duration, 122)
        self.assertEqual(self.crm.query("SELECT talk_seconds FROM dpvoip.call_detail"),
                         [(65,)])

    @defer.inlineCallbacks
    def test_a_grouped_ticket_learns_the_client_added_since_the_first_missed_call(
            self) -> Any:
        yield self.lines(*self.missed(0, "06912345678", "09:00:00", "09:00:20"))
        [(ticket, first_call, no_client)] = self.crm.query(
            "SELECT id, call_id, client_id FROM accounting_ticket")
        self.assertIsNone(no_client)
        client = self.crm.client("Papadopoulos AE", email="info@papadopoulos.gr",
                                 kinito_tilefono="691 234 5678")
        yield self.build_directory()
        yield self.lines(*self.missed(1, "06912345678", "09:10:00", "09:10:20"))
        self.assertEqual(self.crm.query("SELECT id, client_id, title FROM accounting_ticket"),
                         [(ticket, client, "MISSED CALLS (2x) - +306912345678 - Papadopoulos AE")])
        # The CRM keeps a ticket and the call it was opened for on one client (its
        # change_call_client), and the log rows of that call with them.
        self.assertEqual(self.crm.query(
            "SELECT client_id, client_email FROM accounting_voipcall WHERE id = %s",
            (first_call,)), [(client, "info@papadopoulos.gr")])
        self.assertEqual(self.crm.query(
            "SELECT DISTINCT client_id FROM accounting_voipcalllog"), [(client,)])

    @defer.inlineCallbacks
    def test_a_grouped_ticket_keeps_the_client_it_has(self) -> Any:
        first = self.crm.client("First AE", kinito_tilefono="691 234 5678")
        yield self.build_directory()
        yield self.lines(*self.missed(0, "06912345678", "09:00:00", "09:00:20"))
        yield self.lines(*self.missed(1, "06912345678", "09:10:00", "09:10:20"))
        self.assertEqual(self.crm.query("SELECT client_id FROM accounting_ticket"),
                         [(first,)])


class FritzRowTests2025(FritzRowTests):
    crm_version = "2025-12"

    @defer.inlineCallbacks
    def test_a_grouped_ticket_learns_the_client_added_since_the_first_missed_call(
            self) -> Any:
        # The older CRM's log rows have no snapshot columns: only the call and ticket.
        yield self.lines(*self.missed(0, "06912345678", "09:00:00", "09:00:20"))
        [(ticket, first_call)] = self.crm.query("SELECT id, call_id FROM accounting_ticket")
        client = self.crm.client("Papadopoulos AE", kinito_tilefono="691 234 5678")
        yield self.build_directory()
        yield self.lines(*self.missed(1, "06912345678", "09:10:00", "09:10:20"))
        self.assertEqual(self.crm.query("SELECT id, client_id FROM accounting_ticket"),
                         [(ticket, client)])
        self.assertEqual(self.crm.query(
            "SELECT client_id FROM accounting_voipcall WHERE id = %s", (first_call,)),
            [(client,)])


def event(form: dict[str, str]) -> ZadarmaEvent:
    parsed = parse_event(form)
    assert isinstance(parsed, ZadarmaEvent)
    return parsed


class ZadarmaRowTests(WebhookTestCase):
    def submit(self, form: dict[str, str], received: datetime) -> defer.Deferred[Any]:
        context = self.daemon.zadarma.context
        return self.daemon.ingest.submit_zadarma(event(form), form, context, received)

    @defer.inlineCallbacks
    def test_a_call_replayed_after_an_outage_keeps_its_own_length(self) -> Any:
        start, *_, end = incoming()
        end = {**end, "duration": "20"}
        yield self.submit(start, ARRIVED)
        yield self.submit(end, ARRIVED + timedelta(seconds=45 + 20))  # an outage's replay
        [(started, ended, duration, created, updated)] = self.crm.query(
            "SELECT started_at, ended_at, duration_seconds, created_at, updated_at"
            " FROM accounting_voipcall")
        self.assertEqual((ended - started, duration), (timedelta(seconds=20), 20))
        self.assertEqual((created, updated), (ARRIVED, ARRIVED + timedelta(seconds=65)))
        self.assertEqual(self.crm.query(
            "SELECT created_at FROM accounting_voipcalllog ORDER BY id"),
            [(ARRIVED,), (ARRIVED + timedelta(seconds=65),)])

    @defer.inlineCallbacks
    def test_a_hidden_caller_is_recorded_as_a_withheld_call(self) -> Any:
        events = [{**form, "caller_id": ""} for form in incoming(answered=False)]
        code, body = yield self.post(events[0])
        self.assertEqual((code, json.loads(body)), (200, {}))
        self.assertEqual((yield self.send_all(events[1:])), [200, 200])
        [call] = self.calls()
        # The CRM refuses a blank number: the withheld marker, matched to nobody.
        self.assertEqual(call[:4], (f"zd-{PBX}", "incoming", "withheld", "missed"))
        self.assertIsNone(call[6])
        self.assertEqual(self.crm.query("SELECT remote_number FROM dpvoip.call_detail"),
                         [(None,)])

    @defer.inlineCallbacks
    def test_log_rows_follow_their_call_when_a_later_event_finds_its_client(self) -> Any:
        events = incoming()
        yield self.send_all(events[:2])  # an unknown caller so far
        client = self.crm.client("Papadopoulos AE", kinito_tilefono="691 234 5678")
        yield defer.Deferred.fromCoroutine(self.daemon.directory.build())
        yield self.send_all(events[2:])
        [(row, call_client, phone, call_id)] = self.crm.query(
            "SELECT id, client_id, phone_number, call_id FROM accounting_voipcall")
        self.assertEqual(call_client, client)
        self.assertEqual(self.crm.query(
            "SELECT DISTINCT client_id, phone_number, call_reference FROM"
            " accounting_voipcalllog WHERE call_id = %s", (row,)),
            [(client, phone, call_id)])

    @defer.inlineCallbacks
    def test_a_callbacks_first_leg_is_logged_with_the_number_dialled(self) -> Any:
        user_phone, customer = "306971234567", "302101234567"
        self.crm.query(
            "INSERT INTO dpvoip.callback_request (requested_at, user_id, login,"
            " connection_id, from_number, number_given, number_dialled, result,"
            " http_status) VALUES (now(), 1, 'anna', 1, %s, '210 123 4567', %s,"
            " 'dialled', 200)", (user_phone, "+" + customer))
        pbx = "out_" + "d" * 40
        leg = {"event": "NOTIFY_OUT_START", "pbx_call_id": pbx, "call_start": START,
               "internal": "100", "caller_id": "302107654321"}
        yield self.send_all([{**leg, "destination": user_phone, "calltype": "callback_leg1"}])
        [call] = self.calls()
        self.assertEqual(call[1:3], ("outgoing", "+302101234567"))
        self.assertEqual(self.crm.query(
            "SELECT action, description FROM accounting_voipcalllog ORDER BY id")[0],
            ("started", "Outgoing call to +302101234567 - unknown"))
        yield self.send_all([{**leg, "destination": customer, "calltype": "callback_leg2"}])
        self.assertEqual([c[1:3] for c in self.calls()], [("outgoing", "+302101234567")])

    @defer.inlineCallbacks
    def test_the_crms_update_date_is_bumped_on_every_row_dpvoip_changes(self) -> Any:
        contact = self.crm.contact("Maria", "Ioannou", mobile="6912345678")
        self.crm.deal("Insurance", contact_id=contact, workflow="")
        self.crm.query("UPDATE crm_contact SET update_date = '2020-01-01'")
        self.crm.query("UPDATE crm_deal SET update_date = '2020-01-01'")
        yield defer.Deferred.fromCoroutine(self.daemon.directory.build())
        before = datetime.now(UTC)
        yield self.send_all(incoming())
        for table in ("crm_contact", "crm_deal"):
            [(bumped,)] = self.crm.query(f"SELECT update_date FROM {table}")
            self.assertGreaterEqual(bumped, before - timedelta(seconds=1), table)



class ZadarmaRowTests2025(ZadarmaRowTests):
    crm_version = "2025-12"

    @defer.inlineCallbacks
    def test_log_rows_follow_their_call_when_a_later_event_finds_its_client(self) -> Any:
        # The older CRM's log rows have no snapshot columns: the call itself follows.
        events = incoming()
        yield self.send_all(events[:2])
        client = self.crm.client("Papadopoulos AE", kinito_tilefono="691 234 5678")
        yield defer.Deferred.fromCoroutine(self.daemon.directory.build())
        yield self.send_all(events[2:])
        self.assertEqual([c[6] for c in self.calls()], [client])
