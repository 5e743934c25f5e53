"""Issue 13's proof: the CRM's own rules (``test.support.crm_rules``: what its ``save()``,
``auto_now`` columns, field validation and ``clean()`` would change or refuse) applied to
every row dpvoip wrote, on both shipped CRM schemas.

Part 1: the checker itself, on hand-written rows: each broken rule gives its finding,
correct rows give none.

Part 2: end to end, the daemon as wired (``dpvoip.service.build``) fed by the Fritz!Box
simulator over loopback TCP and by signed Zadarma webhooks over HTTP, then
``crm_findings() == []``; and a call whose end is spooled while PostgreSQL is down and
replayed later keeps the length it really had.

Every wait is a hang detector (``eventually``, ``PATIENCE``), never a speed bound.
"""

from __future__ import annotations

import time
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import urlencode
from zoneinfo import ZoneInfo

import treq
from twisted.internet import defer, reactor, threads
from twisted.internet.task import deferLater
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.client import HTTPConnectionPool
from twisted.web.http_headers import Headers

from dpvoip.config import (
    DirectorySettings,
    Secret,
    SpoolSettings,
    ZadarmaSettings,
)
from dpvoip.service import Daemon, build
from dpvoip.testing.fritzbox import BOX_TIME, FritzSimulator, box_time, parse_script
from dpvoip.zadarma.signing import webhook_signature
from test.support.crm import Crm
from test.support.crm_rules import (
    SalesSnapshot,
    crm_findings,
    sales_snapshot,
    valid_email,
)
from test.support.daemon import PATIENCE, scratch
from test.support.ports import HeldPort, HeldPortReactor
from test.support.postgres import postgres, query, take_down
from test.support.wiring import in_process, loopback_box
from test.test_database import eventually
from test.test_fault_db import FaultCase

ZONE = "Europe/Athens"
ATHENS = ZoneInfo(ZONE)
SECRET = "crm-rules-secret"
OWN = "2107654321"


# == Part 1: the checker ======================================================================


class CheckerTests(SynchronousTestCase):
    """Hand-written rows in the 2025-12 CRM's tables (the subclass: 2026-08)."""

    crm_version = "2025-12"

    def setUp(self) -> None:
        self.dsn = postgres().new_database(crm=self.crm_version)
        self.crm = Crm(self.dsn)
        self.newest = self.crm_version == "2026-08"
        self.t0 = datetime(2026, 3, 2, 9, 0, 0, tzinfo=UTC)
        self.client = self.crm.client("Papadopoulos AE", email="info@papadopoulos.gr")

    # -- correct rows, as the CRM would keep them -------------------------------------------

    def call(self, **values: Any) -> int:
        row: dict[str, Any] = {
            "call_id": f"fb-test-{time.monotonic_ns()}", "direction": "incoming",
            "phone_number": "+306912345678", "status": "completed",
            "started_at": self.t0, "ended_at": self.t0 + timedelta(seconds=28.7),
            "duration_seconds": 28, "notes": "answered on extension 11, talk 0:20",
            "ticket_created": False, "ticket_id": None, "created_at": self.t0,
            "updated_at": self.t0 + timedelta(seconds=29), "client_id": self.client,
            "client_email": "info@papadopoulos.gr", "resolution": "pending",
        }
        row.update(values)
        return self.crm.insert("accounting_voipcall", **row)

    def log(self, call: int, **values: Any) -> int:
        [(call_id, phone, client, created)] = self.crm.query(
            "SELECT call_id, phone_number, client_id, created_at FROM accounting_voipcall"
            " WHERE id = %s", (call,))
        row: dict[str, Any] = {"action": "started", "description": "Incoming call",
                               "created_at": created, "call_id": call}
        if self.newest:
            row.update(client_id=client, call_reference=call_id, phone_number=phone)
        row.update(values)
        return self.crm.insert("accounting_voipcalllog", **row)

    def ticket(self, call: int | None, **values: Any) -> int:
        client = None
        if call is not None:
            [(client,)] = self.crm.query(
                "SELECT client_id FROM accounting_voipcall WHERE id = %s", (call,))
        row: dict[str, Any] = {
            "title": "MISSED CALL - +306912345678", "description": "", "status": "open",
            "priority": "high", "notes": "", "created_at": self.t0 + timedelta(seconds=10),
            "email_sent": False, "follow_up_scheduled": False, "call_id": call,
            "client_id": client,
        }
        link = values.pop("link", True)
        row.update(values)
        ticket = self.crm.insert("accounting_ticket", **row)
        if call is not None and link:
            self.crm.update("accounting_voipcall", call, ticket_created=True,
                            ticket_id=str(ticket))
        return ticket

    def missed_call(self, **values: Any) -> int:
        return self.call(**{"status": "missed", "notes": "missed",
                            "ended_at": self.t0 + timedelta(seconds=6),
                            "duration_seconds": 6, **values})

    # -- assertions ----------------------------------------------------------------------

    def findings(self, before: SalesSnapshot | None = None) -> list[str]:
        return crm_findings(self.dsn, before)

    def assertFinding(self, table: str, row_id: int, column: str, *parts: str,
                      before: SalesSnapshot | None = None) -> None:
        found = self.findings(before)
        mine = [f for f in found if f.startswith(f"{table} id={row_id} {column}: ")]
        self.assertTrue(mine, f"no finding for {table} id={row_id} {column} in {found}")
        for part in parts:
            self.assertTrue(any(part in f for f in mine), f"{part!r} not in {mine}")

    # -- correct rows -------------------------------------------------------------------

    def test_correct_rows_give_no_finding(self) -> None:
        answered = self.call()
        self.log(answered)
        self.log(answered, action="client_matched")
        self.log(answered, action="ended", created_at=self.t0 + timedelta(seconds=29))
        missed = self.missed_call()
        self.log(missed)
        self.ticket(missed)
        self.log(missed, action="ticket_created")
        self.call(status="active", ended_at=None, duration_seconds=0, client_id=None,
                  client_email=None, phone_number="withheld", notes="")
        self.call(direction="outgoing", status="failed", notes="not reached",
                  ended_at=self.t0 + timedelta(seconds=4), duration_seconds=4,
                  client_email="", resolution="")
        # an old ticket whose call is gone (the CRM's SET_NULL), a grouped call
        self.ticket(None, status="closed", priority="urgent")
        first = self.missed_call(client_id=None, client_email=None)
        grouped = self.ticket(first)
        self.missed_call(client_id=None, client_email=None, ticket_created=True,
                         ticket_id=str(grouped))
        self.assertEqual(self.findings(), [])

    # -- VoIPCall ---------------------------------------------------------------------

    def test_duration_is_what_save_computes(self) -> None:
        call = self.call(duration_seconds=20)
        self.assertFinding("accounting_voipcall", call, "duration_seconds", "value 20",
                           "expected 28 = int(ended_at - started_at)", "VoIPCall.save()")

    def test_an_end_before_the_start(self) -> None:
        call = self.call(ended_at=self.t0 - timedelta(seconds=5), duration_seconds=-5)
        self.assertFinding("accounting_voipcall", call, "ended_at", "not before started_at")

    def test_an_active_call_keeps_its_duration(self) -> None:
        self.call(status="active", ended_at=None, duration_seconds=0)
        self.assertEqual(self.findings(), [])

    def test_a_blank_phone_number(self) -> None:
        call = self.call(phone_number="", client_id=None, client_email=None)
        self.assertFinding("accounting_voipcall", call, "phone_number", "value ''",
                           "a non-blank value", "blank=False")

    def test_the_choices(self) -> None:
        direction = self.call(direction="inbound")
        status = self.call(status="answered")
        resolution = self.call(resolution="open")
        self.assertFinding("accounting_voipcall", direction, "direction", "'inbound'",
                           "DIRECTION_CHOICES")
        self.assertFinding("accounting_voipcall", status, "status", "'answered'",
                           "STATUS_CHOICES")
        self.assertFinding("accounting_voipcall", resolution, "resolution", "'open'",
                           "RESOLUTION_CHOICES")

    def test_client_email(self) -> None:
        bad = self.call(client_email="info at papadopoulos")
        self.call(client_email=None)
        self.call(client_email="")
        self.assertFinding("accounting_voipcall", bad, "client_email",
                           "'info at papadopoulos'", "a valid email")
        self.assertEqual(len(self.findings()), 1)

    def test_the_email_validator(self) -> None:
        for good in ("a@example.gr", "first.last+tag@mail.example.com", "x@localhost",
                     "user@[192.0.2.1]", "a@παράδειγμα.ελ"):
            self.assertTrue(valid_email(good), good)
        for bad in ("", "plain", "a@b", "a@-example.com", "a b@example.com", "a@example..gr",
                    "a@example.gr.", "@example.gr", "a@"):
            self.assertFalse(valid_email(bad), bad)

    def test_ticket_flags_go_together_and_name_an_existing_ticket(self) -> None:
        flag_only = self.missed_call(ticket_created=True, ticket_id=None)
        id_only = self.missed_call(ticket_created=False, ticket_id="1")
        dangling = self.missed_call(ticket_created=True, ticket_id="999999")
        self.ticket(id_only, link=False)
        self.assertFinding("accounting_voipcall", flag_only, "ticket_created",
                           "cleanup_orphan_call_on_ticket_delete")
        self.assertFinding("accounting_voipcall", id_only, "ticket_created")
        self.assertFinding("accounting_voipcall", dangling, "ticket_id",
                           "'999999'", "an existing ticket")

    def test_updated_at_not_before_created_at(self) -> None:
        call = self.call(updated_at=self.t0 - timedelta(seconds=1))
        self.assertFinding("accounting_voipcall", call, "updated_at", "auto_now")

    # -- VoIPCallLog ------------------------------------------------------------------

    def test_log_actions_are_the_crms_choices(self) -> None:
        call = self.missed_call()
        self.ticket(call)
        log = self.log(call, action="ticket_updated")
        self.assertFinding("accounting_voipcalllog", log, "action", "'ticket_updated'",
                           "ACTION_CHOICES")
        self.assertEqual(len(self.findings()), 1)

    def test_a_log_line_before_its_call(self) -> None:
        call = self.call()
        log = self.log(call, created_at=self.t0 - timedelta(seconds=1))
        self.assertFinding("accounting_voipcalllog", log, "created_at",
                           "not before its call's created_at")

    # -- Ticket -----------------------------------------------------------------------

    def test_ticket_fields(self) -> None:
        status = self.ticket(self.missed_call(), status="new")
        priority = self.ticket(self.missed_call(), priority="critical")
        title = self.ticket(self.missed_call(), title="")
        self.assertFinding("accounting_ticket", status, "status", "'new'", "STATUS_CHOICES")
        self.assertFinding("accounting_ticket", priority, "priority", "'critical'",
                           "PRIORITY_CHOICES")
        self.assertFinding("accounting_ticket", title, "title", "a non-blank value")

    def test_a_ticket_its_call_does_not_carry(self) -> None:
        call = self.missed_call()
        ticket = self.ticket(call, link=False)
        self.assertFinding("accounting_voipcall", call, "ticket_id",
                           f"'{ticket}' with ticket_created true")

    def test_a_ticket_made_before_its_call(self) -> None:
        ticket = self.ticket(self.missed_call(), created_at=self.t0 - timedelta(seconds=1))
        self.assertFinding("accounting_ticket", ticket, "created_at")

    def test_the_call_ticket_client_invariant_of_the_newest_crm(self) -> None:
        other = self.crm.client("Other AE")
        ticket_side = self.ticket(self.missed_call(), client_id=other)
        unassigned = self.missed_call()
        self.ticket(unassigned)
        self.crm.update("accounting_voipcall", unassigned, client_id=None)
        if self.newest:
            self.assertFinding("accounting_ticket", ticket_side, "client_id",
                               f"value {other}", "Ticket.clean()")
            self.assertFinding("accounting_voipcall", unassigned, "client_id", "value None",
                               "VoIPCall.clean()")
        else:  # the 2025-12 CRM's models have no clean(): nothing refuses it
            self.assertEqual([f for f in self.findings() if "client_id" in f], [])

    # -- the sales side -------------------------------------------------------------------

    def test_update_date_follows_was_in_touch_and_workflow(self) -> None:
        old = datetime(2026, 1, 1, tzinfo=UTC)
        kept = self.crm.contact("Eleni", "Kosta", update_date=old)
        bumped = self.crm.contact("Maria", "Ioannou", update_date=old)
        stale = self.crm.lead("Nikos", "Georgiou", update_date=old)
        deal = self.crm.deal("Insurance", contact_id=bumped, workflow="older line",
                             update_date=old)
        unchanged_deal = self.crm.deal("Other", workflow="line", update_date=old)
        before = sales_snapshot(self.dsn)
        today = before.taken_at.date()
        self.crm.query("UPDATE crm_contact SET was_in_touch = %s, update_date = now()"
                       " WHERE id = %s", (today, bumped))
        self.crm.query("UPDATE crm_lead SET was_in_touch = %s WHERE id = %s", (today, stale))
        self.crm.query("UPDATE crm_deal SET workflow = 'new line' || E'\\n' || workflow"
                       " WHERE id = %s", (deal,))
        self.crm.query("UPDATE crm_contact SET update_date = %s WHERE id = %s",
                       (old - timedelta(days=1), kept))  # not changed by dpvoip: not looked at
        found = self.findings(before)
        self.assertFinding("crm_lead", stale, "update_date", "was_in_touch changed",
                           "auto_now", before=before)
        self.assertFinding("crm_deal", deal, "update_date", "workflow changed", before=before)
        self.assertEqual(len(found), 2, found)
        self.assertFalse(any(f"id={unchanged_deal} " in f for f in found))
        self.assertEqual(self.findings(), [], "no snapshot: the sales tables are not read")

    def test_update_date_not_before_the_call_that_changed_the_row(self) -> None:
        # dpvoip's own schema links a Zadarma call to the contact and deal it changed: the
        # row's update_date must not be before that call's end.
        query(self.dsn, "CREATE SCHEMA dpvoip; CREATE TABLE dpvoip.call_detail (call_id text,"
                        " source text, contact_id integer, lead_id integer, deal_id integer)")
        contact = self.crm.contact("Maria", "Ioannou",
                                   update_date=datetime(2026, 1, 1, tzinfo=UTC))
        before = sales_snapshot(self.dsn)
        end = before.taken_at + timedelta(hours=1)
        call = self.call(call_id="zd-in_1", started_at=end - timedelta(seconds=30),
                         ended_at=end, duration_seconds=30, created_at=end,
                         updated_at=end)
        query(self.dsn, "INSERT INTO dpvoip.call_detail VALUES ('zd-in_1', 'zadarma', %s,"
                        " NULL, NULL)", (contact,))
        self.crm.query("UPDATE crm_contact SET was_in_touch = %s, update_date = %s"
                       " WHERE id = %s", (end.date(), end - timedelta(minutes=1), contact))
        self.assertFinding("crm_contact", contact, "update_date", "when the row was changed",
                           end.isoformat(), before=before)
        self.crm.query("UPDATE crm_contact SET update_date = %s WHERE id = %s", (end, contact))
        self.assertEqual(self.findings(before), [])
        self.assertTrue(call)


class CheckerNewestCrmTests(CheckerTests):
    """The same on the 2026-08 CRM's tables, and its call log's snapshot columns."""

    crm_version = "2026-08"

    def test_log_snapshots_follow_their_call(self) -> None:
        call = self.call()
        client = self.log(call, client_id=None)
        reference = self.log(call, call_reference="")
        other_reference = self.log(call, call_reference="zd-other")
        phone = self.log(call, phone_number="")
        self.assertFinding("accounting_voipcalllog", client, "client_id", "value None",
                           f"expected {self.client!r}", "client-mismatch")
        self.assertFinding("accounting_voipcalllog", reference, "call_reference",
                           "missing-call-reference")
        self.assertFinding("accounting_voipcalllog", other_reference, "call_reference",
                           "'zd-other'")
        self.assertFinding("accounting_voipcalllog", phone, "phone_number", "value ''",
                           "expected '+306912345678'")
        self.assertEqual(len(self.findings()), 4)

    def test_an_orphan_log_line_keeps_some_attribution(self) -> None:
        bare = self.crm.insert("accounting_voipcalllog", action="ended", description="",
                               created_at=self.t0, call_id=None, client_id=None,
                               call_reference="", phone_number="")
        self.crm.insert("accounting_voipcalllog", action="ended", description="",
                        created_at=self.t0, call_id=None, client_id=None,
                        call_reference="fb-gone", phone_number="+302101234567")
        self.assertFinding("accounting_voipcalllog", bare, "call_reference",
                           "orphan-without-attribution")
        self.assertEqual(len(self.findings()), 1)


# == Part 2: every row dpvoip writes, end to end =============================================


def _local(at: float) -> str:
    """A moment as Zadarma writes ``call_start``: the account's local time."""
    return datetime.fromtimestamp(at, ATHENS).strftime("%Y-%m-%d %H:%M:%S")


def inbound(pbx: str, caller: str, start: float, talk: int | None) -> list[dict[str, str]]:
    """An incoming Zadarma call of ``caller`` that rang from ``start``: answered and
    talked ``talk`` seconds, or (None) missed."""
    common = {"pbx_call_id": pbx, "call_start": _local(start), "caller_id": caller}
    events = [{"event": "NOTIFY_START", **common, "called_did": "30" + OWN},
              {"event": "NOTIFY_INTERNAL", **common, "called_did": "30" + OWN,
               "internal": "100", "calltype": "normal"}]
    end = {"event": "NOTIFY_END", **common, "called_did": "30" + OWN,
           "duration": str(talk or 0), "disposition": "answered" if talk else "no answer",
           "status_code": "16" if talk else "19", "is_recorded": "0", "calltype": "normal"}
    if talk:
        events.append({"event": "NOTIFY_ANSWER", **common, "destination": "100",
                       "internal": "100", "calltype": "normal"})
        end["internal"] = "100"
    return [*events, end]


def callback(pbx: str, user_phone: str, customer: str, start: float,
             talk: int) -> list[dict[str, str]]:
    """A click-to-call callback: leg 1 rings the user (its first event has no customer
    number yet), leg 2 the customer; one pbx_call_id."""
    common = {"pbx_call_id": pbx, "call_start": _local(start), "internal": "100",
              "caller_id": "30" + OWN}
    legs = (("callback_leg1", user_phone), ("callback_leg2", customer))
    starts = [{"event": "NOTIFY_OUT_START", **common, "destination": destination,
               "calltype": leg} for leg, destination in legs]
    ends = [{"event": "NOTIFY_OUT_END", **common, "destination": destination,
             "duration": str(seconds), "disposition": "answered", "status_code": "16",
             "is_recorded": "0", "calltype": leg}
            for (leg, destination), seconds in zip(legs, (talk + 9, talk), strict=True)]
    return [*starts, ends[1], ends[0]]


async def post_webhook(daemon: Daemon, http: HTTPConnectionPool, form: dict[str, str]) -> int:
    """POST a Zadarma event, signed as Zadarma signs it, from loopback (an allowed network);
    the answer's status."""
    port = daemon.web.port.getHost().port  # type: ignore[union-attr]
    response = await treq.post(
        f"http://127.0.0.1:{port}/voip/zd/", data=urlencode(form).encode(), pool=http,
        headers=Headers({"Content-Type": ["application/x-www-form-urlencoded"],
                         "Signature": [webhook_signature(SECRET, form) or ""]}))
    await response.content()
    return int(response.code)


class EndToEndRowsTests(TestCase):
    """The daemon as wired on a database with the 2025-12 CRM's tables (the subclass:
    2026-08): a Fritz!Box on loopback, signed Zadarma webhooks over HTTP."""

    timeout = 2 * PATIENCE  # a hang detector
    crm_version = "2025-12"

    def setUp(self) -> None:
        self.dsn = postgres().new_database(crm=self.crm_version)
        self.crm = Crm(self.dsn)
        self.http = HTTPConnectionPool(reactor, persistent=False)
        self.addCleanup(self.http.closeCachedConnections)

    async def start(self, script: str | None = None) -> Daemon:
        boxes = []
        if script is not None:
            held = HeldPort()
            self.addCleanup(held.close)  # after the simulator has stopped
            simulator = FritzSimulator(HeldPortReactor(reactor, held), parse_script(script))
            port = await simulator.listen(0)
            self.addCleanup(simulator.stop)
            boxes.append(loopback_box("office", port, reconnect_initial_seconds=0.2,
                                      reconnect_max_seconds=1.0))
        config = in_process(
            self.dsn, pool_size=4, boxes=boxes,
            directory=DirectorySettings(own_numbers=(OWN,)),
            zadarma=replace(ZadarmaSettings(), secret=Secret(SECRET), timezone=ZONE,
                            create_tickets=True, allowed_networks=("127.0.0.1/32",)),
            spool=replace(SpoolSettings(), deadline_seconds=60.0))
        daemon = build(config, reactor, scratch(self))
        daemon.service.startService()
        self.addCleanup(daemon.service.stopService)
        await daemon.service.started
        await eventually(lambda: daemon.directory.state.built, PATIENCE)
        if script is not None:
            simulator.run()
        self.daemon = daemon
        return daemon

    async def post(self, form: dict[str, str]) -> int:
        return await post_webhook(self.daemon, self.http, form)

    def finished(self, count: int) -> bool:
        [(rows, ended)] = self.crm.query(
            "SELECT count(*), count(*) FILTER (WHERE status <> 'active')"
            " FROM accounting_voipcall")
        return bool(rows == ended == count)

    def report(self, problems: list[str]) -> None:
        """Fail with every problem, printed one a line (the findings of today's code)."""
        if problems:
            print(f"\n{self.id()}: {len(problems)} findings")
            for problem in problems:
                print("  " + problem)
        self.assertEqual(problems, [])

    @defer.inlineCallbacks
    def test_every_fritzbox_row_is_a_fixed_point_of_the_crms_save(self) -> Any:
        self.crm.client("Papadopoulos AE", kinito_tilefono="691 234 5678",
                        email="info@papadopoulos.gr")
        self.crm.client("Grammatiki OE", kinito_tilefono="694 555 6667")
        before = sales_snapshot(self.dsn)
        yield defer.Deferred.fromCoroutine(self.start(
            # answered by a known client: 20 s talk, 28 s from ring to hang-up
            "0 {now-300};RING;0;6912345678;2107654321;SIP0;\n"
            "0 {now-292};CONNECT;0;11;6912345678;\n"
            "0 {now-272};DISCONNECT;0;20;\n"
            # missed, an unknown caller: a ticket
            "0 {now-250};RING;1;2101112223;2107654321;SIP0;\n"
            "0 {now-244};DISCONNECT;1;0;\n"
            # three missed calls of a client: one grouped, urgent ticket
            "0 {now-240};RING;2;6945556667;2107654321;SIP0;\n"
            "0 {now-233};DISCONNECT;2;0;\n"
            "0 {now-200};RING;2;6945556667;2107654321;SIP0;\n"
            "0 {now-195};DISCONNECT;2;0;\n"
            "0 {now-180};RING;2;6945556667;2107654321;SIP0;\n"
            "0 {now-171};DISCONNECT;2;0;\n"
            # voicemail: the answering machine (extension 40) took 30 s of a 40 s call
            "0 {now-160};RING;3;2103334445;2107654321;SIP0;\n"
            "0 {now-150};CONNECT;3;40;2103334445;\n"
            "0 {now-120};DISCONNECT;3;30;\n"
            # blocked by call barring
            "0 {now-110};RING;0;2109998887;2107654321;SIP0;\n"
            "0 {now-110};DISCONNECT;0;0;\n"
            # a withheld caller, missed
            "0 {now-100};RING;1;;2107654321;SIP0;\n"
            "0 {now-94};DISCONNECT;1;0;\n"
            # outgoing, answered: 60 s talk, 66 s from dialling
            "0 {now-90};CALL;2;11;2107654321;2310555123;SIP0;\n"
            "0 {now-84};CONNECT;2;11;2310555123;\n"
            "0 {now-24};DISCONNECT;2;60;\n"
            # outgoing, not reached
            "0 {now-20};CALL;3;12;2107654321;2104445556;SIP0;\n"
            "0 {now-12};DISCONNECT;3;0;\n"))
        yield defer.Deferred.fromCoroutine(eventually(lambda: self.finished(10), PATIENCE))
        [(tickets,)] = self.crm.query("SELECT count(*) FROM accounting_ticket")
        self.assertEqual(tickets, 3, "missed, grouped, voicemail")
        self.report(crm_findings(self.dsn, before))

    @defer.inlineCallbacks
    def test_every_zadarma_row_is_a_fixed_point_of_the_crms_save(self) -> Any:
        contact = self.crm.contact("Maria", "Ioannou", mobile="697 111 1111",
                                   update_date=datetime(2026, 1, 1, tzinfo=UTC))
        contact_deal = self.crm.deal("Insurance", contact_id=contact, workflow="older line",
                                     update_date=datetime(2026, 1, 1, tzinfo=UTC))
        lead = self.crm.lead("Nikos", "Georgiou", mobile="6900000001",
                             update_date=datetime(2026, 1, 1, tzinfo=UTC))
        lead_deal = self.crm.deal("Lead deal", lead_id=lead,
                                  update_date=datetime(2026, 1, 1, tzinfo=UTC))
        self.crm.client("Customer AE", tilefono_oikias_1="210 123 4567",
                        email="office@customer.gr")
        yield defer.Deferred.fromCoroutine(self.start())
        # the click-to-call request the callback below answers (dpvoip only takes callback
        # legs it asked for as a callback)
        self.crm.query(
            "INSERT INTO dpvoip.callback_request (requested_at, user_id, login,"
            " connection_id, from_number, number_given, number_dialled, result,"
            " http_status) VALUES (now() - interval '90 seconds', 1, 'anna', 1,"
            " '306971234567', '210 123 4567', '+302101234567', 'dialled', 200)")
        before = sales_snapshot(self.dsn)
        now = time.time()
        scenario = [
            # the contact of an active deal calls, answered, 20 s talk after 9 s ringing
            *inbound("in_" + "a" * 40, "306971111111", now - 30, talk=20),
            # the lead of a deal calls, missed: a ticket (create_tickets), a workflow line
            *inbound("in_" + "b" * 40, "306900000001", now - 12, talk=None),
            # a click-to-call callback to a client, 61 s talk
            *callback("out_" + "c" * 40, "306971234567", "302101234567", now - 80, talk=61),
            # a hidden caller: an empty caller_id, missed
            *inbound("in_" + "d" * 40, "", now - 8, talk=None),
        ]
        problems = []
        for form in scenario:
            code = yield defer.Deferred.fromCoroutine(self.post(form))
            if code != 200:
                problems.append(f"webhook {form['event']} {form.get('calltype', '')} of"
                                f" {form['pbx_call_id'][:8]}: HTTP {code}, expected 200")
        [(rows,)] = self.crm.query("SELECT count(*) FROM accounting_voipcall")
        if rows != 4:
            problems.append(f"accounting_voipcall: {rows} rows, expected 4 calls")
        callbacks = self.crm.query(
            "SELECT phone_number FROM accounting_voipcall WHERE notes LIKE '%%callback%%'")
        if callbacks != [("+302101234567",)]:
            problems.append(f"the callback: {callbacks}, expected one to +302101234567")
        [(in_touch,)] = self.crm.query("SELECT was_in_touch FROM crm_contact WHERE id = %s",
                                       (contact,))
        if in_touch is None:
            problems.append(f"crm_contact id={contact}: was_in_touch not set (scenario)")
        for deal in (contact_deal, lead_deal):
            [(workflow,)] = self.crm.query("SELECT workflow FROM crm_deal WHERE id = %s",
                                           (deal,))
            if "call" not in workflow:
                problems.append(f"crm_deal id={deal}: no workflow line (scenario)")
        self.report(problems + crm_findings(self.dsn, before))


class EndToEndRowsNewestCrmTests(EndToEndRowsTests):
    crm_version = "2026-08"


# -- replayed after an outage ------------------------------------------------------------------


def _box_seconds(line_time: str) -> float:
    return datetime.strptime(line_time, BOX_TIME).replace(tzinfo=ATHENS).timestamp()


class ReplayedRowsTests(FaultCase):
    """A call whose end is spooled while PostgreSQL is down keeps its real length when
    the spool replays it: its end is when the end happened, not when it was replayed.
    The daemon and its own cluster, stopped and started by the test (2025-12; the
    subclass: 2026-08)."""

    crm_version = "2025-12"
    #: How long PostgreSQL stays down after the end was spooled: a replay-time end would
    #: make the call at least this much longer.
    OUTAGE = 5.0

    def row(self, prefix: str) -> tuple[Any, ...]:
        [found] = query(self.dsn, "SELECT status, started_at, ended_at FROM"
                                  " accounting_voipcall WHERE call_id LIKE %s", (prefix + "%",))
        return found

    @defer.inlineCallbacks
    def test_a_call_ended_during_an_outage_keeps_its_real_length(self) -> Any:
        pbx = "in_" + "f" * 40
        begun = float(int(time.time()))  # call_start has whole seconds
        zd = inbound(pbx, "306912345678", begun, talk=1)
        ring = box_time(begun, ATHENS)
        self.box.send(f"{ring};RING;7;6945556667;{OWN};SIP0;")
        self.box.send(f"{ring};CONNECT;7;11;6945556667;")
        for form in zd[:-1]:  # start, internal, answer: committed at once
            self.assertEqual((yield defer.Deferred.fromCoroutine(self.webhook(form))), 200)
        yield defer.Deferred.fromCoroutine(eventually(
            lambda: len(query(self.dsn, "SELECT 1 FROM accounting_voipcall")) == 2, PATIENCE))
        yield deferLater(reactor, 2.0, lambda: None)  # the calls go on
        yield threads.deferToThread(take_down, self.cluster)
        # Both calls end while the database is away: their ends are spooled.
        ended_sent = time.time()
        hang_up = box_time(ended_sent, ATHENS)
        talk = int(ended_sent - begun)
        self.box.send(f"{hang_up};DISCONNECT;7;{talk};")
        zd_end = {**zd[-1], "duration": str(talk)}
        self.assertEqual((yield defer.Deferred.fromCoroutine(self.webhook(zd_end))), 200)
        yield defer.Deferred.fromCoroutine(eventually(
            lambda: self.daemon.durable.counters.spooled >= 2, PATIENCE))
        ended_answered = time.time()
        yield deferLater(reactor, self.OUTAGE, lambda: None)
        yield threads.deferToThread(self.cluster.start)
        yield defer.Deferred.fromCoroutine(eventually(
            lambda: not self.daemon.durable.spooling, PATIENCE))
        problems = []
        # Fritz!Box: the box's own times, RING to DISCONNECT.
        status, started, ended = self.row("fb-")
        real = _box_seconds(hang_up) - _box_seconds(ring)
        if status == "active" or ended is None or (ended - started).total_seconds() != real:
            problems.append(f"Fritz!Box call: {status}, {started} to {ended}, expected"
                            f" {real:g} s from the box's RING to its DISCONNECT")
        # Zadarma: from call_start to the NOTIFY_END's arrival (between sending it and its
        # answer), or call_start plus ring and talk: never the replay, OUTAGE s later.
        status, started, ended = self.row("zd-")
        low, high = ended_sent - begun - 1, ended_answered - begun + 1
        length = (ended - started).total_seconds() if ended is not None else None
        if status == "active" or length is None or not low <= length <= high:
            problems.append(f"Zadarma call: {status}, {started} to {ended} ({length} s),"
                            f" expected {low:.1f} to {high:.1f} s: the end replayed after"
                            f" the outage must keep the time it arrived")
        print(f"\n{self.id()}: {len(problems)} problems")
        for problem in [*problems, *crm_findings(self.dsn)]:
            print("  " + problem)
        self.assertEqual(problems + crm_findings(self.dsn), [])


class ReplayedRowsNewestCrmTests(ReplayedRowsTests):
    crm_version = "2026-08"
