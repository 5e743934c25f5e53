"""``Ingest.apply_together``: many events in one transaction (the spool's replay, a box's
call list) write exactly what the same events write one by one, or nothing at all."""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any
from zoneinfo import ZoneInfo

import psycopg2
from twisted.internet import defer, reactor

from dpvoip.calls.ingest import Ingest, Submission, ZadarmaContext, ZadarmaSubmission
from dpvoip.config import DatabaseSettings
from dpvoip.core.happenings import Happening
from dpvoip.core.numbers import Dialling
from dpvoip.deferreds import OneShotObserver
from dpvoip.fritzbox.parser import parse
from dpvoip.fritzbox.tracker import CallTracker
from dpvoip.store.database import Batch, Store
from dpvoip.store.directory import DirectoryIndex
from dpvoip.store.dsn import connection_dsn
from dpvoip.store.migrations import SchemaReport, prepare
from dpvoip.store.pool import HealingPool
from dpvoip.zadarma.events import ZadarmaEvent, parse_event
from test.support.crm import Crm
from test.support.crm_rules import crm_findings
from test.support.postgres import postgres
from test.support.statements import messages, statements_sent, told_runs
from test.test_ingest import OWN, ZadarmaTestCase, notifications, today, zadarma_call

#: When the events arrived: today, so that the tickets' 24-hour window is real.
ARRIVED = datetime.strptime(today("09:10:00"), "%d.%m.%y %H:%M:%S").replace(
    tzinfo=ZoneInfo("Europe/Athens")).astimezone(UTC)


def moment(hhmmss: str) -> datetime:
    """Today at ``hhmmss``, Athens time (as the box's lines and Zadarma's forms say it)."""
    return datetime.strptime(today(hhmmss), "%d.%m.%y %H:%M:%S")


def submissions(forms: Iterable[dict[str, str]], context: ZadarmaContext
                ) -> list[ZadarmaSubmission]:
    """Zadarma webhook forms as they reach ``apply_together``, all arrived at ``ARRIVED``."""
    items = []
    for form in forms:
        event = parse_event(form)
        assert isinstance(event, ZadarmaEvent)
        items.append(ZadarmaSubmission(event, form, context, ARRIVED))
    return items


class TogetherTests(ZadarmaTestCase):
    crm_version = "2025-12"

    def day_of_calls(self) -> list[Submission | ZadarmaSubmission]:
        """A day's events: an answered client call, two missed calls of one client (a
        ticket, then grouped), the answering machine, an unreached outgoing call, a
        blocked caller, a call whose DISCONNECT comes after a restart (found again in the
        database: in the same transaction, before it is committed), and a missed Zadarma
        call with its ticket."""
        lines = [
            f"{today('09:00:00')};RING;0;06912345678;7654321;SIP0;",
            f"{today('09:00:05')};CONNECT;0;11;06912345678;",
            f"{today('09:01:10')};DISCONNECT;0;60;",
            f"{today('09:02:00')};RING;1;06912345679;7654321;SIP0;",
            f"{today('09:02:30')};DISCONNECT;1;0;",
            f"{today('09:03:00')};RING;1;06912345679;7654321;SIP0;",
            f"{today('09:03:25')};DISCONNECT;1;0;",
            f"{today('09:04:00')};RING;2;2101234567;7654321;SIP0;",
            f"{today('09:04:20')};CONNECT;2;40;2101234567;",
            f"{today('09:05:00')};DISCONNECT;2;40;",
            f"{today('09:06:00')};CALL;3;11;7654321;2109999999;SIP0;",
            f"{today('09:06:30')};DISCONNECT;3;0;",
            f"{today('09:07:00')};RING;4;2105555555;7654321;SIP0;",
            f"{today('09:07:00')};DISCONNECT;4;0;",
            f"{today('09:08:00')};RING;5;2106666666;7654321;SIP0;",
        ]
        happenings = self.happenings(lines)
        after_restart = CallTracker(self.rules)
        happenings += after_restart.feed(parse(f"{today('09:08:40')};DISCONNECT;5;0;"))
        items: list[Submission | ZadarmaSubmission] = [
            Submission(h, self.origin, ARRIVED) for h in happenings]
        context = replace(self.context, tickets=True)
        items += submissions(zadarma_call("+306912345678", "in_" + "7" * 40, answered=False),
                             context)
        return items

    def clients(self, crm: Crm) -> None:
        crm.client("Papadopoulos AE", kinito_tilefono="691 234 5678")
        crm.client("Ioannou OE", kinito_tilefono="691 234 5679")

    async def _one_by_one(self, items: Sequence[Submission | ZadarmaSubmission]
                          ) -> tuple[Crm, str]:
        """A second database and ingest given ``items`` one by one: its CRM and DSN."""
        twin, twin_crm, twin_dsn = await self._twin()
        for item in items:
            if isinstance(item, ZadarmaSubmission):
                await twin.submit_zadarma(item.event, item.form, item.context, item.received)
            else:
                await twin.submit(item.happening, item.origin, item.received)
        return twin_crm, twin_dsn

    async def _twin(self) -> tuple[Ingest, Crm, str]:
        """A second database and ingest, the same as this test's."""
        dsn = postgres().new_database(crm=self.crm_version)
        pool = HealingPool(reactor, connection_dsn(dsn, DatabaseSettings()), 2)
        self.addCleanup(pool.close)
        await pool.start()
        store = Store(pool, reactor)
        schema: OneShotObserver[SchemaReport] = OneShotObserver()
        schema.fire(await store.write(
            lambda c: prepare(c, standalone=False, crm_schema="public")))
        index = DirectoryIndex(store, "public", Dialling("GR"), own_numbers=OWN)
        crm = Crm(dsn)
        self.clients(crm)
        await index.build()
        ingest = Ingest(store, index, self.texts, self.tickets, ZoneInfo("Europe/Athens"),
                        schema, reactor)
        return ingest, crm, dsn

    def rows(self, crm: Crm) -> dict[str, list[tuple[Any, ...]]]:
        return {
            "calls": crm.query(
                "SELECT call_id, direction, phone_number, status, started_at, ended_at,"
                " duration_seconds, notes, ticket_created, ticket_id, client_id,"
                " created_at, updated_at FROM accounting_voipcall ORDER BY call_id"),
            "logs": crm.query(
                "SELECT c.call_id, l.action, l.description, l.created_at FROM"
                " accounting_voipcalllog l JOIN accounting_voipcall c ON c.id = l.call_id"
                " ORDER BY c.call_id, l.id"),
            "tickets": crm.query(
                "SELECT t.title, t.status, t.priority, t.notes, c.call_id, t.client_id"
                " FROM accounting_ticket t JOIN accounting_voipcall c ON c.id = t.call_id"
                " ORDER BY t.id"),
            "details": crm.query(
                "SELECT call_id, box, direction, remote_number, extension, outcome,"
                " talk_seconds, started_at, ended_at FROM dpvoip.call_detail"
                " ORDER BY call_id"),
        }

    @defer.inlineCallbacks
    def test_one_transaction_writes_what_one_by_one_writes(self) -> Any:
        self.clients(self.crm)
        yield self.build_directory()
        items = self.day_of_calls()
        yield self.ingest.apply_together(items)

        twin_crm, twin_dsn = yield defer.Deferred.fromCoroutine(self._one_by_one(items))
        together, one_by_one = self.rows(self.crm), self.rows(twin_crm)
        self.assertEqual(together, one_by_one)
        self.assertEqual([c[3] for c in together["calls"]], [
            "completed", "missed", "missed", "missed", "failed", "failed", "missed",
            "missed"])
        self.assertEqual(len(together["tickets"]), 4, together["tickets"])
        self.assertIn("recovered after a reconnect", together["calls"][6][7])
        self.assertEqual(crm_findings(twin_dsn), [])

    @defer.inlineCallbacks
    def test_a_failing_step_writes_nothing_and_a_second_try_writes_once(self) -> Any:
        self.clients(self.crm)
        yield self.build_directory()
        items = self.day_of_calls()

        async def broken(batch: Batch) -> None:
            raise RuntimeError("the disk of the list's state failed")

        with self.assertRaises(RuntimeError):
            yield self.ingest.apply_together(items, broken)
        self.assertEqual(self.rows(self.crm), {"calls": [], "logs": [], "tickets": [],
                                               "details": []})
        yield self.ingest.apply_together(items)
        yield self.ingest.apply_together(items)  # applied again: nothing changes
        rows = self.rows(self.crm)
        self.assertEqual(len(rows["calls"]), 8)
        self.assertEqual(len(rows["tickets"]), 4, rows["tickets"])

    @defer.inlineCallbacks
    def test_the_last_step_shares_the_events_transaction(self) -> Any:
        seen: list[str] = []

        async def state(batch: Batch) -> None:
            [(xid,)] = await batch.run("SELECT txid_current()::text")
            seen.append(xid)

        items = self.day_of_calls()[:2]
        yield self.ingest.apply_together(items, state)
        written = {xmin for (xmin,) in self.crm.query(
            "SELECT xmin::text FROM accounting_voipcall")}
        self.assertEqual(written, set(seen))

    @defer.inlineCallbacks
    def test_a_refused_zadarma_event_is_undone_alone(self) -> Any:
        """A second call claiming the first one's signed string is refused inside the
        transaction (its journal row is undone); the events around it stay."""
        first, _ = zadarma_call("+306912345678", "in_" + "1" * 40, answered=True)
        thief = dict(first, pbx_call_id="in_" + "2" * 40)
        other, _ = zadarma_call("+306912345670", "in_" + "3" * 40, answered=True,
                                start="2026-01-15 10:07:00")
        items = submissions((first, thief, other), self.context)
        yield self.ingest.apply_together(items)
        self.assertEqual([c[0] for c in self.rows(self.crm)["calls"]],
                         ["zd-in_" + "1" * 40, "zd-in_" + "3" * 40])
        journalled = self.crm.query(
            "SELECT DISTINCT pbx_call_id FROM dpvoip.zadarma_event ORDER BY 1")
        self.assertEqual(journalled, [("in_" + "1" * 40,), ("in_" + "3" * 40,)])
        self.assertEqual(self.ingest.counters.zadarma_bound_elsewhere, 1)

    @defer.inlineCallbacks
    def test_a_groups_callers_are_looked_up_in_one_round_trip(self) -> Any:
        self.clients(self.crm)
        yield self.build_directory()
        items = self.day_of_calls()
        sent = statements_sent(self)
        yield self.ingest.apply_together(items)
        lookups = [text for text in sent if "EXECUTE dpvoip_directory_lookup" in text]
        self.assertEqual(len(lookups), 1, "the callers of the group's seven box calls at once,"
                         f" before its events: {lookups}")
        calls = self.crm.query("SELECT call_id, client_id FROM accounting_voipcall"
                               " WHERE call_id LIKE 'fb-%%' AND client_id IS NOT NULL")
        self.assertEqual(len(calls), 3, f"the clients' three box calls, matched: {calls}")

    @defer.inlineCallbacks
    def test_zadarma_events_in_a_row_share_their_round_trips(self) -> Any:
        """Starts of four calls, then the end of one of them (its call's event must see the
        start committed before it: a new group), in one transaction: two round trips for
        the four starts, two for the end."""
        forms = [zadarma_call(f"+30691234567{n}", f"in_{n:040d}", answered=True,
                              start=f"2026-01-15 10:0{n}:00") for n in range(4)]
        items = submissions([call[0] for call in forms] + [forms[0][1]], self.context)
        yield self.ingest.apply_together(items[:1])  # each statement planned
        sent = statements_sent(self)
        yield self.ingest.apply_together(items)
        executed = [text for text in sent if "EXECUTE" in text or text == "COMMIT"]
        self.assertEqual(len(executed), 5, "two and two (each statement planned once on a"
                         f" connection besides), then the COMMIT: {executed}")
        self.assertEqual(self.crm.query(
            "SELECT call_id, status FROM accounting_voipcall ORDER BY 1"),
            [(f"zd-in_{0:040d}", "completed")]
            + [(f"zd-in_{n:040d}", "active") for n in range(1, 4)])
        self.assertEqual(self.ingest.counters.calls_started, 4)
        self.assertEqual(self.ingest.counters.replays_ignored, 1)  # the first start again

    def spooled_calls(self) -> list[ZadarmaSubmission]:
        """Six Zadarma calls as a spool holds them: each call's end after the next call's
        start. Calls 1 and 3 are missed calls of one caller (a ticket, then grouped into
        it), call 4 a missed call of another."""
        context = replace(self.context, tickets=True)
        callers = ["+306912345670", "+306912345678", "+306912345671", "+306912345678",
                   "+306912345672", "+306912345673"]
        calls = [zadarma_call(caller, f"in_{n:040d}", answered=n not in (1, 3, 4),
                              start=f"2026-01-15 10:0{n}:00")
                 for n, caller in enumerate(callers)]
        order = [calls[0][0]]
        for n in range(1, len(calls)):
            order += [calls[n][0], calls[n - 1][1]]
        order.append(calls[-1][1])
        return submissions(order, context)

    @defer.inlineCallbacks
    def test_a_spools_interleaved_calls_share_their_runs(self) -> Any:
        """The starts go together, then the ends, and a caller's second call waits for
        the end of its first: three journal statements for twelve events (ending each run
        at a call's second event took four), and the rows are what one by one writes,
        the caller's second missed call in its first one's ticket."""
        self.clients(self.crm)
        yield self.build_directory()
        items = self.spooled_calls()
        sent = statements_sent(self)
        yield self.ingest.apply_together(items)
        journals = [text for text in sent if "%(events)s" in text]
        self.assertEqual(len(journals), 3, journals)

        twin_crm, twin_dsn = yield defer.Deferred.fromCoroutine(self._one_by_one(items))
        together = self.rows(self.crm)
        self.assertEqual(together, self.rows(twin_crm))
        self.assertEqual([(t[4], t[0].split(" - ")[0]) for t in together["tickets"]],
                         [(f"zd-in_{1:040d}", "MISSED CALLS (2x)"),
                          (f"zd-in_{4:040d}", "MISSED CALL")])
        for written in (self.dsn, twin_dsn):
            self.assertEqual(crm_findings(written), [])


    @defer.inlineCallbacks
    def test_a_repeated_missed_end_does_not_commit_the_group_early(self) -> Any:
        """A missed call's end delivered twice in a group: the second finds the call
        finalised and writes nothing, and the group still commits once, at its end (the
        answered call after it in the same transaction)."""
        self.clients(self.crm)
        yield self.build_directory()
        ring, end, answered_ring, connect, hang_up = [
            Submission(h, self.origin, ARRIVED) for h in self.happenings([
                f"{today('09:00:00')};RING;0;06912345678;7654321;SIP0;",
                f"{today('09:00:30')};DISCONNECT;0;0;",
                f"{today('09:00:40')};RING;1;2101234567;7654321;SIP0;",
                f"{today('09:00:45')};CONNECT;1;13;2101234567;",
                f"{today('09:01:12')};DISCONNECT;1;20;",
            ])]
        sent = statements_sent(self)
        yield self.ingest.apply_together([ring, end, end, answered_ring, connect, hang_up])
        commits = [text for text in messages(sent) if "COMMIT" in text]
        self.assertEqual(len(commits), 1, messages(sent))
        self.assertIn("COMMIT", messages(sent)[-1])
        self.assertEqual(self.ingest.counters.replays_ignored, 1)
        self.assertEqual(len(self.rows(self.crm)["tickets"]), 1)

    @defer.inlineCallbacks
    def test_a_runs_missed_zadarma_calls_share_their_round_trips(self) -> Any:
        """Four missed Zadarma calls end in one run, the first and the last of one caller:
        the calls of three numbers write their rows and read their ticket facts in one
        round trip and their tickets in one message; the caller's second call follows in
        a round of its own, and joins the first one's ticket, as one by one."""
        self.clients(self.crm)
        yield self.build_directory()
        callers = ["+306912345678", "+306912345670", "+306912345671", "+306912345678"]
        calls = [zadarma_call(caller, f"in_{n:040d}", answered=False,
                              start=f"2026-01-15 10:0{n}:00")
                 for n, caller in enumerate(callers)]
        items = submissions([call[0] for call in calls] + [call[1] for call in calls],
                            replace(self.context, tickets=True))
        sent = statements_sent(self)
        yield self.ingest.apply_together(items)
        self.assertEqual(told_runs(sent), [3, 1])
        facts = [text for text in messages(sent) if "%(numbers_" in text]
        self.assertEqual([text.count("EXECUTE") for text in facts], [3 + 2, 1 + 2])

        twin_crm, twin_dsn = yield defer.Deferred.fromCoroutine(self._one_by_one(items))
        together = self.rows(self.crm)
        self.assertEqual(together, self.rows(twin_crm))
        self.assertEqual([(t[4], t[0].split(" - ")[0]) for t in together["tickets"]],
                         [(f"zd-in_{0:040d}", "MISSED CALLS (2x)"),
                          (f"zd-in_{1:040d}", "MISSED CALL"),
                          (f"zd-in_{2:040d}", "MISSED CALL")])
        for written in (self.dsn, twin_dsn):
            self.assertEqual(crm_findings(written), [])

    def answered_calls(self) -> list[Submission | ZadarmaSubmission]:
        """Three answered Fritz!Box calls: nine events, none of which reads anything before
        its write (their callers are looked up with the group's)."""
        lines = [
            f"{today('09:00:00')};RING;0;06912345678;7654321;SIP0;",
            f"{today('09:00:01')};RING;1;06912345679;7654321;SIP0;",
            f"{today('09:00:02')};RING;2;2101234567;7654321;SIP0;",
            f"{today('09:00:05')};CONNECT;0;11;06912345678;",
            f"{today('09:00:06')};CONNECT;1;12;06912345679;",
            f"{today('09:00:07')};CONNECT;2;13;2101234567;",
            f"{today('09:01:10')};DISCONNECT;0;60;",
            f"{today('09:01:11')};DISCONNECT;1;30;",
            f"{today('09:01:12')};DISCONNECT;2;20;",
        ]
        return [Submission(h, self.origin, ARRIVED) for h in self.happenings(lines)]

    def happenings(self, lines: Iterable[str]) -> list[Happening]:
        """CallMonitor lines as this test's box tracker reads them."""
        return [happening for line in lines for happening in self.tracker.feed(parse(line))]

    @defer.inlineCallbacks
    def test_a_groups_plain_events_go_in_one_message(self) -> Any:
        """Starts, answers and ends that read nothing before they write are sent together
        (one round trip, not one each; the group's COMMIT rides along with the last of
        them), and each still tells whether it took effect: the counters and log lines
        are those of one by one, and so are the rows."""
        self.clients(self.crm)
        yield self.build_directory()
        items = self.answered_calls()
        self.assertEqual(len(items), 9)
        listener = psycopg2.connect(self.dsn)
        listener.autocommit = True
        self.addCleanup(listener.close)
        listener.cursor().execute("LISTEN dpvoip_calls")
        sent = statements_sent(self)
        yield self.ingest.apply_together(items)
        writes = messages(sent)
        self.assertEqual(len(writes), 2, writes)  # the callers; the nine events, COMMIT
        self.assertEqual(writes[1].count("EXECUTE"), 9)
        self.assertIn("; COMMIT", writes[1])
        published = [json.loads(n.payload)["event"] for n in notifications(listener, 9)]
        self.assertEqual(published, ["started"] * 3 + ["answered"] * 3 + ["ended"] * 3)
        counters = self.ingest.counters
        self.assertEqual((counters.calls_started, counters.calls_ended,
                          counters.replays_ignored), (3, 3, 0))

        yield self.ingest.apply_together(items)  # replayed again: nothing takes effect
        self.assertEqual((counters.calls_started, counters.calls_ended,
                          counters.replays_ignored), (3, 3, 9))

        twin_crm, twin_dsn = yield defer.Deferred.fromCoroutine(self._one_by_one(items))
        together = self.rows(self.crm)
        self.assertEqual(together, self.rows(twin_crm))
        self.assertEqual([c[3] for c in together["calls"]], ["completed"] * 3)
        for written in (self.dsn, twin_dsn):
            self.assertEqual(crm_findings(written), [])


    @defer.inlineCallbacks
    def test_missed_calls_ends_wait_for_the_plain_events_after_them(self) -> Any:
        """Two missed calls of one client end between answered calls: the plain events
        still go in one message (the ends' tickets read nothing they write), the two ends
        follow in order, each with its facts and its ticket (one number: the second's
        facts read again once the first's ticket is written), and the rows are what one
        by one writes: the client's second missed call in the first one's ticket."""
        self.clients(self.crm)
        yield self.build_directory()
        items = [Submission(h, self.origin, ARRIVED) for h in self.happenings([
            f"{today('09:00:00')};RING;0;06912345678;7654321;SIP0;",
            f"{today('09:00:01')};RING;1;06912345679;7654321;SIP0;",
            f"{today('09:00:05')};CONNECT;0;11;06912345678;",
            f"{today('09:00:30')};DISCONNECT;1;0;",
            f"{today('09:00:40')};RING;2;2101234567;7654321;SIP0;",
            f"{today('09:00:41')};RING;1;06912345679;7654321;SIP0;",
            f"{today('09:00:45')};CONNECT;2;13;2101234567;",
            f"{today('09:01:00')};DISCONNECT;1;0;",
            f"{today('09:01:10')};DISCONNECT;0;60;",
            f"{today('09:01:12')};DISCONNECT;2;20;",
        ])]
        sent = statements_sent(self)
        yield self.ingest.apply_together(items)
        writes = messages(sent)
        # the plain events, then each end's ticket (the COMMIT riding with the last)
        self.assertEqual(told_runs(sent), [8, 1, 1])
        self.assertEqual(len(writes), 1 + 1 + 2 * 2, writes)  # callers, told, two ends
        self.assertIn("COMMIT", writes[-1])

        twin_crm, twin_dsn = yield defer.Deferred.fromCoroutine(self._one_by_one(items))
        together = self.rows(self.crm)
        self.assertEqual(together, self.rows(twin_crm))
        self.assertEqual(sorted(c[3] for c in together["calls"]),
                         ["completed", "completed", "missed", "missed"])
        self.assertEqual(len(together["tickets"]), 1, together["tickets"])
        self.assertIn("(2x)", together["tickets"][0][0])
        for written in (self.dsn, twin_dsn):
            self.assertEqual(crm_findings(written), [])


    @defer.inlineCallbacks
    def test_missed_calls_of_different_numbers_share_their_round_trips(self) -> Any:
        """Three missed calls of three numbers end in a group: their facts are read in one
        round trip and their tickets written in one message, with the COMMIT; the rows
        are what one by one writes (three tickets, in the order the calls ended)."""
        self.clients(self.crm)
        yield self.build_directory()
        items = [Submission(h, self.origin, ARRIVED) for h in self.happenings([
            f"{today('09:00:00')};RING;0;06912345678;7654321;SIP0;",
            f"{today('09:00:01')};RING;1;2101234567;7654321;SIP0;",
            f"{today('09:00:02')};RING;2;06955555555;7654321;SIP0;",
            f"{today('09:00:30')};DISCONNECT;1;0;",
            f"{today('09:00:31')};DISCONNECT;0;0;",
            f"{today('09:00:32')};DISCONNECT;2;0;",
        ])]
        sent = statements_sent(self)
        yield self.ingest.apply_together(items)
        writes = messages(sent)
        self.assertEqual(told_runs(sent), [3, 3])
        # callers, the starts, the ends' facts, their tickets with the COMMIT
        self.assertEqual(len(writes), 4, writes)
        self.assertIn("COMMIT", writes[-1])

        twin_crm, twin_dsn = yield defer.Deferred.fromCoroutine(self._one_by_one(items))
        together = self.rows(self.crm)
        self.assertEqual(together, self.rows(twin_crm))
        self.assertEqual(len(together["tickets"]), 3, together["tickets"])
        for written in (self.dsn, twin_dsn):
            self.assertEqual(crm_findings(written), [])

    @defer.inlineCallbacks
    def test_a_missed_end_held_back_goes_before_a_later_zadarma_call(self) -> Any:
        """A missed call's end waiting for the plain events after it is applied before a
        Zadarma call that follows it: a number's tickets group its missed calls of both
        sources in the order they ended, as one by one."""
        self.clients(self.crm)
        yield self.build_directory()
        ring, disconnect = [Submission(h, self.origin, ARRIVED) for h in self.happenings([
            f"{today('09:00:00')};RING;0;06912345678;7654321;SIP0;",
            f"{today('09:00:30')};DISCONNECT;0;0;",
        ])]
        start, end = submissions(zadarma_call(
            "+306912345678", "in_" + "8" * 40, answered=False,
            start=f"{moment('09:00:10'):%Y-%m-%d %H:%M:%S}"), replace(self.context, tickets=True))
        items: list[Submission | ZadarmaSubmission] = [ring, start, disconnect, end]
        yield self.ingest.apply_together(items)

        twin_crm, _twin_dsn = yield defer.Deferred.fromCoroutine(self._one_by_one(items))
        together = self.rows(self.crm)
        self.assertEqual(together, self.rows(twin_crm))
        self.assertEqual(len(together["tickets"]), 1, together["tickets"])
        self.assertTrue(together["tickets"][0][4].startswith("fb-"), together["tickets"])


class NewestCrmTogetherTests(TogetherTests):
    crm_version = "2026-08"
