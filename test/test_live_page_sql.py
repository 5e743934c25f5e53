"""The live page's snapshot read from a real PostgreSQL, on both CRM versions, from rows
the real ingest wrote (CallMonitor lines through the tracker): calls in progress, today's
calls, open tickets with their counts, the boxes, and who sees which call."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

from twisted.internet import defer

from dpvoip.live.snapshot import Client, Snapshot
from dpvoip.store.live_page import LivePageReads
from test.test_ingest import IngestTestCase

#: The script's office day runs from 08:00 to 11:00:30 on its own clock; it is played on
#: the hours just before the test runs (its 11:00:30 an hour ago), so that the day's calls
#: are today's, the answered one is still in progress (started under 12 hours ago) and
#: none is in the future, whatever the time of day the test runs at.
SCRIPT_DAY = datetime(2026, 1, 1, 8, 0)
PLAYED_BEFORE_NOW = timedelta(hours=4)

ATHENS = ZoneInfo("Europe/Athens")


class SnapshotTests(IngestTestCase):
    crm_version = "2025-12"

    def setUp(self) -> Any:
        ready = super().setUp()
        self.reads = LivePageReads(self.store, "public")
        self.played = datetime.now(ATHENS).replace(tzinfo=None) - PLAYED_BEFORE_NOW
        return ready

    def at(self, hhmmss: str, days_ago: int = 0) -> str:
        """The CallMonitor time of the script's ``hhmmss`` (its day played before now)."""
        clock = datetime.strptime(hhmmss, "%H:%M:%S").time()
        moment = (self.played + (datetime.combine(SCRIPT_DAY, clock) - SCRIPT_DAY)
                  - timedelta(days=days_ago))
        return f"{moment:%d.%m.%y %H:%M:%S}"

    def missed(self, conn: int, caller: str, ring: str, end: str) -> tuple[str, str]:
        return (f"{self.at(ring)};RING;{conn};{caller};7654321;SIP0;",
                f"{self.at(end)};DISCONNECT;{conn};0;")

    def read(self, viewer: int | None = None, recent: int = 50,
             tickets: int = 50) -> defer.Deferred[Snapshot]:
        """The page as at now, its "today" beginning just before the script's day (the
        office's midnight would cut it in two when the test runs soon after midnight)."""
        start = self.played.replace(tzinfo=ATHENS) - timedelta(minutes=1)
        return defer.Deferred.fromCoroutine(self.reads.snapshot(
            start.astimezone(UTC), viewer, recent, tickets))

    @defer.inlineCallbacks
    def office_day(self) -> Any:
        """A client answered and still talking, a mobile that missed twice (one ticket of
        two calls), an outgoing call, and yesterday's missed call."""
        self.client_id = self.crm.client("Papadopoulos AE", kinito_tilefono="691 234 5678")
        yield self.build_directory()
        yield self.lines(*self.missed(1, "6977000111", "08:00:00", "08:00:30"))
        yield self.lines(*self.missed(1, "6977000111", "08:10:00", "08:10:30"))
        yield self.lines(f"{self.at('09:00:00')};CALL;2;11;7654321;2101234567#;SIP0;",
                         f"{self.at('09:00:05')};CONNECT;2;11;2101234567;",
                         f"{self.at('09:01:10')};DISCONNECT;2;65;")
        yield self.lines(f"{self.at('10:00:00', days_ago=1)};RING;3;6944000222;7654321;SIP0;",
                         f"{self.at('10:00:20', days_ago=1)};DISCONNECT;3;0;")
        yield self.lines(f"{self.at('09:30:00')};RING;0;06912345678;7654321;SIP0;",
                         f"{self.at('09:30:10')};CONNECT;0;12;06912345678;")
        self.crm.query(
            "INSERT INTO dpvoip.box_status (box, host, port, connected, since, reconnects,"
            " lines, bad_lines, open_calls) VALUES ('office', '192.168.178.1', 1012, true,"
            " now() - interval '1 hour', 0, 10, 0, 1), ('branch', '10.0.0.1', 1012, false,"
            " NULL, 3, 0, 0, 0)")

    @defer.inlineCallbacks
    def test_the_office_day_as_the_page_shows_it(self) -> Any:
        yield self.office_day()
        shown = yield self.read()
        [talking] = shown.in_progress
        self.assertEqual(
            (talking.state, talking.direction, talking.number, talking.client,
             talking.extension, talking.box, talking.outcome, talking.duration),
            ("answered", "incoming", "+306912345678", Client(self.client_id,
                                                             "Papadopoulos AE"),
             "12", "office", None, None))
        self.assertEqual(
            [(c.state, c.direction, c.number, c.outcome, c.status, c.duration)
             for c in shown.recent],
            [("ended", "outgoing", "+302101234567", "answered", "completed", 65),
             ("ended", "incoming", "+306977000111", "missed", "missed", 0),
             ("ended", "incoming", "+306977000111", "missed", "missed", 0)],
            "today's only, newest first, the talk time as duration")
        tickets = {t.number: t for t in shown.tickets}
        self.assertEqual(set(tickets), {"+306977000111", "+306944000222"},
                         "yesterday's ticket is still open")
        ticket = tickets["+306977000111"]
        first_missed = shown.recent[2].call_id
        self.assertEqual((ticket.count, ticket.call_id, ticket.client),
                         (2, first_missed, None))
        self.assertEqual(tickets["+306944000222"].count, 1)
        self.assertEqual([(b.box, b.connected, b.since is not None) for b in shown.boxes],
                         [("branch", False, False), ("office", True, True)])

    @defer.inlineCallbacks
    def test_the_events_kept_are_read_with_the_snapshot(self) -> Any:
        yield self.lines(f"{self.at('11:00:00')};RING;4;2109999999;7654321;SIP0;",
                         f"{self.at('11:00:30')};DISCONNECT;4;0;")
        shown = yield self.read()
        [(oldest, newest)] = self.crm.query("SELECT min(id), max(id) FROM dpvoip.live_event")
        self.assertGreater(newest, oldest)
        self.assertEqual(shown.window, (oldest, newest))

    @defer.inlineCallbacks
    def test_the_calls_ringing_now_for_a_screen_pop(self) -> Any:
        """Incoming and not answered yet: a call in conversation or going out is not."""
        yield self.office_day()  # one call in conversation at its end
        yield self.lines(f"{self.at('11:00:00')};RING;4;2109999999;7654321;SIP0;",
                         f"{self.at('11:00:05')};CALL;5;11;7654321;2101234567#;SIP0;")
        shown = yield self.read()
        self.assertEqual(sorted((c.state, c.direction) for c in shown.in_progress),
                         [("answered", "incoming"), ("ringing", "incoming"),
                          ("ringing", "outgoing")])
        ringing = yield defer.Deferred.fromCoroutine(self.reads.ringing(None))
        self.assertEqual([(c.state, c.direction, c.number) for c in ringing.calls],
                         [("ringing", "incoming", "+302109999999")])
        [(oldest, newest)] = self.crm.query("SELECT min(id), max(id) FROM dpvoip.live_event")
        self.assertEqual(ringing.window, (oldest, newest))

    @defer.inlineCallbacks
    def test_the_call_ringing_then_ended(self) -> Any:
        yield self.lines(f"{self.at('11:00:00')};RING;4;2109999999;7654321;SIP0;")
        shown = yield self.read()
        self.assertEqual([(c.state, c.number, c.client, c.box) for c in shown.in_progress],
                         [("ringing", "+302109999999", None, "office")])
        self.assertEqual(shown.recent, [])
        yield self.lines(f"{self.at('11:00:30')};DISCONNECT;4;0;")
        shown = yield self.read()
        self.assertEqual(shown.in_progress, [])
        self.assertEqual([(c.state, c.outcome) for c in shown.recent], [("ended", "missed")])
        self.assertEqual([t.count for t in shown.tickets], [1])

    @defer.inlineCallbacks
    def test_closed_tickets_and_limits(self) -> Any:
        yield self.office_day()
        self.crm.query("UPDATE accounting_ticket SET status = 'closed'")
        shown = yield self.read(recent=1)
        self.assertEqual(shown.tickets, [])
        self.assertEqual([c.direction for c in shown.recent], ["outgoing"])

    @defer.inlineCallbacks
    def test_a_call_left_open_for_hours_is_not_in_progress(self) -> Any:
        yield self.lines(f"{self.at('10:00:00', days_ago=1)};RING;5;2108888888;7654321;SIP0;")
        self.crm.query("UPDATE accounting_voipcall SET started_at = %s",
                       (datetime.now(UTC) - timedelta(hours=13),))
        shown = yield self.read()
        self.assertEqual(shown.in_progress, [])

    @defer.inlineCallbacks
    def test_a_user_who_is_not_staff_sees_the_calls_of_their_numbers(self) -> Any:
        yield self.office_day()
        desk = self.crm.user("desk", is_staff=False)
        line = self.crm.user("line", is_staff=False)
        boss = self.crm.user("boss", is_staff=True)
        self.crm.insert("voip_connection", type="pbx", active=True, number="12",
                        callerid="desk 12", provider="Zadarma", owner_id=desk)
        self.crm.insert("voip_connection", type="voip", active=True, number="765-4321",
                        callerid="the line", provider="Zadarma", owner_id=line)
        self.crm.insert("voip_connection", type="pbx", active=False, number="11",
                        callerid="old", provider="Zadarma", owner_id=desk)
        shown = yield self.read(viewer=desk)
        self.assertEqual([c.extension for c in shown.in_progress], ["12"])
        self.assertEqual(shown.recent, [], "extension 11 is an inactive connection")
        self.assertEqual(shown.tickets, [])
        self.assertEqual(len(shown.boxes), 2, "every box, as the stream sends every box")
        everything = yield self.read()
        shown = yield self.read(viewer=line)  # the number every call came in on
        self.assertEqual((shown.in_progress, shown.recent, shown.tickets),
                         (everything.in_progress, everything.recent, everything.tickets))
        nobody = self.crm.user("nobody", is_staff=False)
        shown = yield self.read(viewer=nobody)
        self.assertEqual((shown.in_progress, shown.recent, shown.tickets), ([], [], []))
        viewers = yield defer.gatherResults([
            defer.Deferred.fromCoroutine(self.reads.viewer(u)) for u in (desk, boss, 999)])
        self.assertEqual([(v.staff, v.numbers) for v in viewers],
                         [(False, ("12",)), (True, ()), (False, ())])

    @defer.inlineCallbacks
    def test_a_call_the_crm_wrote_itself_is_shown_from_its_own_columns(self) -> Any:
        now = datetime.now(UTC)
        self.crm.insert("accounting_voipcall", call_id="crm-1", direction="incoming",
                        phone_number="2101112222", status="active", started_at=now,
                        ticket_created=False, resolution="pending", created_at=now,
                        updated_at=now)
        shown = yield self.read()
        self.assertEqual([(c.call_id, c.state, c.number, c.box, c.extension)
                          for c in shown.in_progress],
                         [("crm-1", "ringing", "2101112222", None, None)])
        desk = self.crm.user("desk", is_staff=False)
        shown = yield self.read(viewer=desk)
        self.assertEqual(shown.in_progress, [], "no detail: no office-side number to match")


class NewestCrmSnapshotTests(SnapshotTests):
    crm_version = "2026-08"
