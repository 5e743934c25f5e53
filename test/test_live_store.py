"""Live events written by the call path into ``dpvoip.live_event`` in the call's own
transaction and announced with their ids, on a real PostgreSQL, both CRM versions: the
Fritz!Box's and Zadarma's calls, tickets created and grouped, the boxes' connections;
the window, the pruning and the watchers."""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any

import psycopg2
from twisted.internet import defer

from dpvoip.live.events import Viewer
from dpvoip.store.boxes import report_boxes
from dpvoip.store.live import LiveEvents
from test.test_ingest import ZadarmaTestCase, notifications, zadarma_call


@dataclass
class Box:
    name: str = "office"
    host: str = "192.168.178.1"
    port: int = 1012
    connected: bool = True
    since: datetime | None = datetime(2026, 3, 2, 8, 0, tzinfo=UTC)
    last_line_at: datetime | None = None
    reconnects: int = 0
    lines: int = 0
    bad_lines: int = 0

    def as_json(self, open_calls: int) -> dict[str, Any]:
        return {}


class LiveStoreTests(ZadarmaTestCase):
    def rows(self) -> list[tuple[str, dict[str, Any]]]:
        return [(k, d) for k, d in self.crm.query(
            "SELECT kind, data FROM dpvoip.live_event ORDER BY id")]

    def listen(self) -> Any:
        listener = psycopg2.connect(self.dsn)
        listener.autocommit = True
        self.addCleanup(listener.close)
        listener.cursor().execute("LISTEN dpvoip_calls")
        return listener

    @defer.inlineCallbacks
    def test_a_missed_call_of_a_client_its_ticket_and_the_next_one_grouped(self) -> Any:
        client = self.crm.client("Papadopoulos AE", kinito_tilefono="6912345678")
        yield self.build_directory()
        listener = self.listen()
        yield self.lines(*self.missed(0, "6912345678", "11:00:00", "11:00:30"))
        yield self.lines(*self.missed(1, "6912345678", "11:05:00", "11:05:30"))
        rows = self.rows()
        self.assertEqual([(k, d.get("state") or d["action"]) for k, d in rows], [
            ("call", "ringing"), ("call", "ended"), ("ticket", "created"),
            ("call", "ringing"), ("call", "ended"), ("ticket", "grouped")])
        who = {"id": client, "name": "Papadopoulos AE"}
        self.assertEqual({json.dumps(d["client"]) for _, d in rows}, {json.dumps(who)})
        ringing, ended, created = (d for _, d in rows[:3])
        self.assertEqual((ringing["number"], ringing["direction"], ringing["box"],
                          ringing["status"]), ("+306912345678", "incoming", "office", "active"))
        self.assertEqual((ended["outcome"], ended["status"], ended["duration"]),
                         ("missed", "missed", 0))
        self.assertEqual((created["call_id"], created["count"]), (ringing["call_id"], 1))
        self.assertEqual(rows[5][1]["count"], 2)
        self.assertEqual(rows[5][1]["ticket_id"], created["ticket_id"])
        [(ticket,)] = self.crm.query("SELECT id FROM accounting_ticket")
        self.assertEqual(created["ticket_id"], ticket)
        # Each row announced with its id, in the order of the rows.
        ids = [i for (i,) in self.crm.query("SELECT id FROM dpvoip.live_event ORDER BY id")]
        announced = [json.loads(n.payload) for n in notifications(listener, 6)]
        self.assertEqual([a["id"] for a in announced], ids)
        self.assertEqual(announced[2]["event"], "ticket_created")

    @defer.inlineCallbacks
    def test_an_answered_call_rings_is_answered_and_ends(self) -> Any:
        day = self.missed(0, "2101234567", "12:00:00", "12:00:00")[0].split(";")[0][:8]
        yield self.lines(f"{day} 12:00:00;RING;0;2101234567;7654321;SIP0;",
                         f"{day} 12:00:04;CONNECT;0;11;2101234567;",
                         f"{day} 12:01:04;DISCONNECT;0;60;")
        rows = self.rows()
        self.assertEqual([(d["state"], d["extension"], d["outcome"], d["duration"])
                          for _, d in rows],
                         [("ringing", None, None, None), ("answered", 11, None, None),
                          ("ended", 11, "answered", 60)])
        self.assertIsNone(rows[0][1]["client"])
        [(legs,)] = self.crm.query("SELECT legs FROM dpvoip.live_event WHERE id ="
                                   " (SELECT max(id) FROM dpvoip.live_event)")
        self.assertEqual(legs, ["7654321", "SIP0", "11"])

    @defer.inlineCallbacks
    def test_a_zadarma_call_once_per_change_a_replayed_event_adds_nothing(self) -> Any:
        client = self.crm.client("Client Z", kinito_tilefono="6912345678")
        yield self.build_directory()
        forms = zadarma_call("+306912345678", "in_" + "3" * 40, answered=True)
        yield self.send(forms)
        yield self.send(forms)  # Zadarma sends again: nothing changes
        rows = self.rows()
        self.assertEqual([(d["state"], d["box"], d["outcome"]) for _, d in rows],
                         [("ringing", "zadarma", None), ("ended", "zadarma", "answered")])
        self.assertEqual(rows[1][1]["client"], {"id": client, "name": "Client Z"})
        self.assertEqual(rows[1][1]["duration"], 95)

    @defer.inlineCallbacks
    def test_a_zadarma_missed_call_ends_once_with_its_ticket(self) -> Any:
        yield self.send(zadarma_call("+306912345677", "in_" + "4" * 40, answered=False),
                        replace(self.context, tickets=True))
        self.assertEqual([(k, d.get("state") or d["action"]) for k, d in self.rows()],
                         [("call", "ringing"), ("call", "ended"), ("ticket", "created")])

    @defer.inlineCallbacks
    def test_a_box_is_an_event_when_its_connection_changes_only(self) -> Any:
        box = Box()
        yield report_boxes(self.store, [(box, 0)])
        yield report_boxes(self.store, [(box, 0)])
        box.connected = False
        box.since = datetime(2026, 3, 2, 9, 30, 1, 500000, tzinfo=UTC)
        yield report_boxes(self.store, [(box, 0)])
        self.assertEqual(self.rows(), [
            ("box", {"box": "office", "connected": True, "since": "2026-03-02T08:00:00Z"}),
            ("box", {"box": "office", "connected": False, "since": "2026-03-02T09:30:01Z"})])

    @defer.inlineCallbacks
    def test_window_replay_and_pruning(self) -> Any:
        events = LiveEvents(self.store, "public")
        self.assertEqual((yield defer.Deferred.fromCoroutine(events.window())), (None, 0))
        yield self.lines(*self.missed(0, "2101234567", "13:00:00", "13:00:30"))
        ids = [i for (i,) in self.crm.query("SELECT id FROM dpvoip.live_event ORDER BY id")]
        window = yield defer.Deferred.fromCoroutine(events.window())
        self.assertEqual(window, (ids[0], ids[-1]))
        since = yield defer.Deferred.fromCoroutine(events.since(ids[0]))
        self.assertEqual([e.id for e in since], ids[1:])
        self.assertEqual(since[0].legs, ("7654321", "0"))
        self.crm.query("UPDATE dpvoip.live_event SET at = now() - interval '61 minutes'"
                       " WHERE id = %s", (ids[0],))
        gone = yield defer.Deferred.fromCoroutine(events.prune(60))
        self.assertEqual(gone, 1)
        window = yield defer.Deferred.fromCoroutine(events.window())
        self.assertEqual(window, (ids[1], ids[-1]))

    @defer.inlineCallbacks
    def test_a_watcher_is_staff_or_has_the_numbers_of_their_connections(self) -> Any:
        staff = self.crm.user("boss", is_staff=True)
        anna = self.crm.user("anna", is_staff=False)
        self.crm.insert("voip_connection", type="pbx", active=True, number="100",
                        callerid="Anna", provider="Zadarma", owner_id=anna)
        self.crm.insert("voip_connection", type="sip", active=False, number="555",
                        callerid="old", provider="Zadarma", owner_id=anna)
        events = LiveEvents(self.store, "public")
        seen = yield defer.Deferred.fromCoroutine(events.viewer(anna))
        self.assertEqual(seen, Viewer(anna, False, frozenset({"100"})))
        seen = yield defer.Deferred.fromCoroutine(events.viewer(staff))
        self.assertTrue(seen.staff)
        seen = yield defer.Deferred.fromCoroutine(events.viewer(9999))
        self.assertEqual(seen, Viewer(9999, False))


class NewestCrmLiveStoreTests(LiveStoreTests):
    crm_version = "2026-08"
