"""The generic plans of the hot statements, on an office's database of a realistic size:
none may scan a big table whole.

dpvoip's pool connections run their prepared statements with ``plan_cache_mode =
force_generic_plan`` (``store.dsn``): each statement is planned once per connection,
without its values. A generic plan that scans the call table, the call details, the
tickets, the live events or the directory whole costs nothing on the small tables of the
other tests, and grows with every call the office takes; no other test sees it (the last
one was found by a benchmark only: a statement joining a JSON recordset to the call table
had a worse plan than one index lookup per row).

So here the CRM's and dpvoip's big tables are filled to an office's size (set-based,
a few seconds), the ingest's hot paths run on a pool of ONE connection (every statement
they prepare lives on it: the direct Fritz!Box path with a forwarded call, an end
recovered after a restart, a PBX's calls writing the CRM's sales side, Zadarma's webhooks
and a refused one taken back, a replayed group of both sources, the directory's lookups),
and then every ``dpvoip_`` statement prepared on that connection is explained as that
connection runs it (``EXPLAIN EXECUTE`` with NULL values: the generic plan; EXPLAIN
without ANALYZE executes nothing, data-modifying CTEs included). A ``Seq Scan`` on a big
table fails the test, naming the statement and its plan. Both CRM versions.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg2
from twisted.internet import defer

from dpvoip.asterisk.service import origin_of
from dpvoip.asterisk.settings import read_settings
from dpvoip.calls.ingest import Submission, ZadarmaSubmission
from dpvoip.core.happenings import Ended, Happening, Started
from dpvoip.core.outcomes import Outcome, Reason
from dpvoip.fritzbox.parser import parse
from dpvoip.fritzbox.tracker import CallTracker
from test.test_ingest import OWN, ZadarmaTestCase, today, zadarma_call
from test.test_ingest_together import ARRIVED, moment, submissions

#: The tables that grow with the office's calls and records: never scanned whole.
BIG_TABLES = frozenset({
    "accounting_voipcall", "accounting_voipcalllog", "accounting_ticket",
    "accounting_clientprofile", "crm_contact", "crm_lead", "call_detail", "live_event",
    "zadarma_event", "zadarma_binding", "directory_entry",
})
#: A plan line's sequential scan and the table it reads (an alias may follow it).
SEQ_SCAN = re.compile(r"Seq Scan on (?:\w+\.)?(\w+)")

#: The office's size: records of the directory, and calls over a couple of years.
CLIENTS = 20_000
CONTACTS = 15_000
LEADS = 10_000
COMPANIES = 1_000
DEALS = 500
CALLS = 30_000
#: Distinct numbers the past calls came from (the first ``CLIENTS`` are clients').
CALLERS = 25_000

#: At least this many distinct statements must have been explained.
MINIMUM_STATEMENTS = 22
#: A distinctive fragment of each hot path's statement, which must be among them.
EXPECTED = {
    "a call's start": "ON CONFLICT (call_id) DO NOTHING",
    "a new ticket": "accounting_ticket (title, description",
    "an open ticket joined": "ticket AS (UPDATE",
    "missed ends' facts (finishing_missed)": "recovering boolean",
    "plain events told together": "dpvoip.told",
    "the Zadarma journal": "INSERT INTO dpvoip.zadarma_event",
    "a Zadarma call": "json_to_record(",
    "Zadarma missed calls' facts (zadarma_missed)": "number text, started timestamptz",
    "the directory's lookup": "WHERE number = $1",
    "the directory's group lookup": "unnest($1::text[]) AS w(number)",
    "a forwarded call (forward_step)": "SET forwarded_to = $1",
    "an end recovered after a restart": "'active' OR d.outcome IN ('interrupted', 'blocked')",
    "a PBX's end with the sales side": "c.ended_at, d.direction, d.contact_id",
    "a PBX's missed call's ticket with the sales side": "touch_before AS (SELECT",
    "a refused Zadarma event taken back (unjournal)": "DELETE FROM dpvoip.zadarma_binding",
}


#: The mobiles of the clients, contacts and leads: the base plus the record's id.
CLIENT_MOBILES = 6910000000
CONTACT_MOBILES = 6920000000
LEAD_MOBILES = 6930000000


def mobile(base: int, record: int) -> str:
    """The mobile number (10 digits) the fill gives record ``record`` of a table whose
    mobiles start at ``base``."""
    return str(base + record)


_DEFAULTS = {"boolean": "false", "date": "current_date", "integer": "0", "bigint": "0",
             "smallint": "0", "numeric": "0", "jsonb": "'{}'"}


def _required(cursor: Any, table: str) -> dict[str, str]:
    """A default SQL value for each NOT NULL column of ``table`` (the CRM's tables have
    no database defaults; its code fills them)."""
    cursor.execute(
        "SELECT column_name, data_type FROM information_schema.columns WHERE table_schema ="
        " 'public' AND table_name = %s AND is_nullable = 'NO' AND column_name <> 'id'",
        (table,))
    return {column: "now()" if kind.startswith("timestamp") else _DEFAULTS.get(kind, "''")
            for column, kind in cursor.fetchall()}


def _series(cursor: Any, table: str, count: int, values: dict[str, str]) -> None:
    """``count`` rows of CRM table ``table``, row ``g`` (1..count) given ``values`` (SQL
    over ``g``) and the rest of its NOT NULL columns a default."""
    columns = {**_required(cursor, table), **values}
    cursor.execute(
        f"INSERT INTO public.{table} ({', '.join(columns)}) OVERRIDING SYSTEM VALUE"
        f" SELECT {', '.join(columns.values())} FROM generate_series(1, {count}) g")


def _records(cursor: Any) -> None:
    """The directory's records: companies, clients, contacts, leads, a few deals."""
    _series(cursor, "crm_company", COMPANIES, {
        "id": "g", "full_name": "'Company ' || g", "token": "'o' || g",
        "phone": "(2140000000 + g)::text"})
    _series(cursor, "accounting_clientprofile", CLIENTS, {
        "id": "g", "afm": "'F' || lpad(g::text, 8, '0')", "eponimia": "'Client ' || g",
        "eidos_ipoxreou": "'individual'", "is_active": "g % 10 <> 0",
        "kinito_tilefono": f"({CLIENT_MOBILES} + g)::text",
        "tilefono_oikias_1": "(2110000000 + g)::text",
        "updated_at": "now() - g * interval '1 hour'"})
    _series(cursor, "crm_contact", CONTACTS, {
        "id": "g", "first_name": "'Maria'", "last_name": "'Contact ' || g",
        "token": "'c' || g", "company_id": f"1 + g % {COMPANIES}",
        "mobile": f"({CONTACT_MOBILES} + g)::text", "phone": "(2120000000 + g)::text"})
    _series(cursor, "crm_lead", LEADS, {
        "id": "g", "first_name": "'Nikos'", "last_name": "'Lead ' || g", "token": "'l' || g",
        "mobile": f"({LEAD_MOBILES} + g)::text", "company_phone": "(2130000000 + g)::text"})
    half = DEALS // 2
    _series(cursor, "crm_deal", DEALS, {
        "id": "g", "name": "'Deal ' || g", "ticket": "'d' || g", "active": "true",
        "contact_id": f"CASE WHEN g <= {half} THEN g END",
        "lead_id": f"CASE WHEN g > {half} THEN g - {half} END"})


def _directory(cursor: Any) -> None:
    """The directory's index of those records, as a build leaves it (the texts are the
    numbers the CRM holds, so a lookup confirms them without parsing)."""
    parts = [
        (source, table, field)
        for source, table, fields in (
            ("client", "accounting_clientprofile", ("kinito_tilefono", "tilefono_oikias_1")),
            ("contact", "crm_contact", ("mobile", "phone")),
            ("lead", "crm_lead", ("mobile", "company_phone")),
            ("company", "crm_company", ("phone",)),
        )
        for field in fields
    ]
    cursor.execute(
        "INSERT INTO dpvoip.directory_entry (source, record_id, field, number, raw) "
        + " UNION ALL ".join(f"SELECT '{source}', id, '{field}', '+30' || {field}, {field}"
                             f" FROM public.{table}" for source, table, field in parts))
    cursor.execute(
        "INSERT INTO dpvoip.directory_watermark (source, updated_to, region)"
        " SELECT s, now(), 'GR' FROM unnest(ARRAY['client', 'contact', 'lead', 'company']) s")


def _calls(cursor: Any, newest: bool) -> None:
    """Past calls as dpvoip wrote them: every fourth one a Zadarma call, a sixth of the
    incoming ones missed (each with its ticket, a few still open, all out of the ticket
    window), their details, log lines and live events, and Zadarma's journal and
    bindings. Each is what the CRM's own rules allow (``test.support.crm_rules``)."""
    caller = f"(1 + (g * 7919) % {CALLERS})"
    missed = "(g % 6 = 1 AND g % 5 <> 0)"
    cursor.execute(
        "INSERT INTO public.accounting_voipcall (id, call_id, direction, phone_number, status,"
        " started_at, ended_at, duration_seconds, notes, ticket_created, ticket_id,"
        " created_at, updated_at, client_id, client_email, resolution)"
        " SELECT g, CASE WHEN g % 4 = 0 THEN 'zd-in_' || lpad(g::text, 40, '0')"
        " ELSE 'fb-past-' || g END, CASE WHEN g % 5 = 0 THEN 'outgoing' ELSE 'incoming' END,"
        f" '+30' || ({CLIENT_MOBILES} + {caller}), CASE WHEN {missed} THEN 'missed'"
        " ELSE 'completed' END, s, s + (g % 300) * interval '1 second', g % 300,"
        f" CASE WHEN {missed} THEN 'missed' ELSE 'answered on extension 11' END,"
        f" {missed}, CASE WHEN {missed} THEN g::text END, s, s + interval '5 minutes',"
        f" CASE WHEN {caller} <= {CLIENTS} THEN {caller} END, NULL, 'pending'"
        f" FROM generate_series(1, {CALLS}) g, LATERAL (SELECT now() - interval '2 days'"
        " - g * interval '40 minutes' AS s) t")
    cursor.execute(
        "INSERT INTO public.accounting_ticket (id, title, description, status, priority,"
        " notes, created_at, email_sent, follow_up_scheduled, call_id, client_id)"
        " SELECT c.id, 'MISSED CALL - ' || c.phone_number, '', CASE WHEN c.id % 60 = 1"
        " THEN 'open' ELSE 'closed' END, 'medium', '', c.ended_at, false, false, c.id,"
        " c.client_id FROM public.accounting_voipcall c WHERE c.ticket_created")
    extra_columns, extra_values = (
        (", call_reference, phone_number, client_id", ", c.call_id, c.phone_number, c.client_id")
        if newest else ("", ""))
    cursor.execute(
        "INSERT INTO public.accounting_voipcalllog (action, description, created_at,"
        f" call_id{extra_columns}) SELECT a.action, 'history', c.ended_at, c.id{extra_values}"
        " FROM public.accounting_voipcall c CROSS JOIN LATERAL (VALUES ('started'),"
        " ('ended'), ('ticket_created')) AS a(action)"
        " WHERE a.action <> 'ticket_created' OR c.ticket_created ORDER BY c.id")
    cursor.execute(
        "INSERT INTO dpvoip.call_detail (call_id, source, box, conn_id, direction, remote_raw,"
        " remote_number, own_number, line, extension, answered_at, outcome, started_at,"
        " ended_at, client_id, ticket_id, talk_seconds, pbx_call_id, calltype)"
        " SELECT c.call_id, z.source, CASE WHEN z.source = 'fritzbox' THEN 'office' END,"
        " CASE WHEN z.source = 'fritzbox' THEN c.id % 10 END, c.direction,"
        " substr(c.phone_number, 4), c.phone_number, '2107654321', 'SIP0',"
        " CASE WHEN NOT c.ticket_created THEN 11 END, CASE WHEN NOT c.ticket_created"
        " THEN c.started_at END, CASE WHEN c.ticket_created THEN 'missed' ELSE 'answered'"
        " END, c.started_at, c.ended_at, c.client_id, c.ticket_id::bigint,"
        " c.duration_seconds, CASE WHEN z.source = 'zadarma' THEN substr(c.call_id, 4) END,"
        " 'normal' FROM public.accounting_voipcall c, LATERAL (SELECT CASE WHEN c.call_id"
        " LIKE 'zd-%' THEN 'zadarma' ELSE 'fritzbox' END AS source) z")
    cursor.execute(
        "INSERT INTO dpvoip.live_event (at, kind, call_id, legs, data) SELECT c.started_at,"
        " 'call', c.call_id, ARRAY['2107654321'], jsonb_build_object('call_id', c.call_id,"
        " 'state', s.state) FROM public.accounting_voipcall c,"
        " unnest(ARRAY['ringing', 'ended']) AS s(state) ORDER BY c.started_at, s.state")
    cursor.execute(
        "INSERT INTO dpvoip.zadarma_event (pbx_call_id, event, calltype, internal,"
        " destination, form, received_at) SELECT d.pbx_call_id, e.event, 'normal',"
        " CASE WHEN e.event = 'NOTIFY_END' THEN '100' ELSE '' END, '',"
        " jsonb_build_object('event', e.event, 'pbx_call_id', d.pbx_call_id, 'caller_id',"
        " d.remote_number), d.started_at FROM dpvoip.call_detail d,"
        " unnest(ARRAY['NOTIFY_START', 'NOTIFY_END']) AS e(event)"
        " WHERE d.pbx_call_id IS NOT NULL ORDER BY d.started_at")
    cursor.execute(
        "INSERT INTO dpvoip.zadarma_binding (signed_sha256, pbx_call_id, bound_at)"
        " SELECT sha256(convert_to(d.pbx_call_id, 'UTF8')), d.pbx_call_id, d.started_at"
        " FROM dpvoip.call_detail d WHERE d.pbx_call_id IS NOT NULL")
    for table in ("accounting_voipcall", "accounting_ticket", "accounting_voipcalllog",
                  "accounting_clientprofile", "crm_company", "crm_contact", "crm_lead",
                  "crm_deal"):
        cursor.execute(f"SELECT setval(pg_get_serial_sequence('public.{table}', 'id'),"
                       f" (SELECT max(id) FROM public.{table}))")


def fill_office(dsn: str, newest: bool) -> None:
    """The big tables of an office's database at a realistic size, then VACUUM ANALYZE
    (as autovacuum long has in an office: statistics, visibility maps)."""
    connection = psycopg2.connect(dsn)
    try:
        connection.autocommit = True
        with connection.cursor() as cursor:
            cursor.execute("BEGIN")
            # Consistent by construction: the foreign keys are not checked row by row (a
            # second's deferred checks at the COMMIT).
            cursor.execute("SET LOCAL session_replication_role = replica")
            _records(cursor)
            _directory(cursor)
            _calls(cursor, newest)
            cursor.execute("COMMIT")
            cursor.execute(
                "VACUUM (ANALYZE) public.accounting_voipcall, public.accounting_voipcalllog,"
                " public.accounting_ticket, public.accounting_clientprofile,"
                " public.crm_company, public.crm_contact, public.crm_lead, public.crm_deal,"
                " dpvoip.call_detail, dpvoip.live_event, dpvoip.zadarma_event,"
                " dpvoip.zadarma_binding, dpvoip.directory_entry")
    finally:
        connection.close()


@dataclass(frozen=True)
class Plan:
    """A prepared statement and its generic plan, as its connection runs it."""

    name: str
    statement: str
    lines: list[str]

    def big_scans(self) -> list[str]:
        """The big tables its plan scans whole."""
        return [match.group(1) for line in self.lines
                for match in SEQ_SCAN.finditer(line) if match.group(1) in BIG_TABLES]

    def describe(self) -> str:
        text = " ".join(self.statement.split())
        start = text if len(text) <= 400 else text[:400] + "..."
        scanned = ", ".join(sorted(set(self.big_scans())))
        return "\n    ".join([f"{self.name} (scans {scanned} whole): {start}", *self.lines])


class StatementPlanTests(ZadarmaTestCase):
    crm_version = "2025-12"
    pool_size = 1  # every statement the paths prepare lives on this one connection

    def setUp(self) -> Any:
        ready: defer.Deferred[None] = super().setUp()
        return ready.addCallback(
            lambda _: fill_office(self.dsn, newest=self.crm_version == "2026-08"))

    def tearDown(self) -> None:
        """Not ``crm_findings``: it reads every row of the call tables (seconds at this
        size). The fill's rows follow the CRM's rules by construction, and the rows the
        paths write are checked by those paths' own tests (``test_ingest``,
        ``test_ingest_together``)."""

    def happenings(self, lines: Iterable[str]) -> list[Happening]:
        """CallMonitor lines as this test's box tracker reads them."""
        return [happening for line in lines for happening in self.tracker.feed(parse(line))]

    async def _direct(self) -> None:
        """The Fritz!Box's direct path, each event a transaction of its own: a client's
        answered call, then two missed calls of another client (a ticket, then joined)."""
        caller = mobile(CLIENT_MOBILES, 17)
        await self._lines((f"{today('10:00:00')};RING;0;{caller};7654321;SIP0;",
                           f"{today('10:00:05')};CONNECT;0;11;{caller};",
                           f"{today('10:01:00')};DISCONNECT;0;55;"))
        twice = mobile(CLIENT_MOBILES, 4242)
        await self._lines(self.missed(1, twice, "10:02:00", "10:02:20"))
        await self._lines(self.missed(2, twice, "10:03:00", "10:03:20"))

    async def _forwarded(self) -> None:
        """The box forwarding a client's ringing call to a mobile (a CALL on the ringing
        connection: ``forward_step``), answered there, on the direct path."""
        caller = mobile(CLIENT_MOBILES, 321)
        await self._lines((f"{today('10:04:00')};RING;4;{caller};7654321;SIP0;",
                           f"{today('10:04:04')};CALL;4;0;7654321;6971234567;SIP0;",
                           f"{today('10:04:09')};CONNECT;4;0;6971234567;",
                           f"{today('10:06:09')};DISCONNECT;4;120;"))

    async def _recovered(self) -> None:
        """An answered call left open by a restart: closed as interrupted at the start
        (``close_open_calls``), then its DISCONNECT reaches a tracker that never saw it
        (``Unmatched``): the call is looked up (``latest_of_connection``) and finished as
        recovering, which may reopen an interrupted call."""
        caller = mobile(CLIENT_MOBILES, 654)
        await self._lines((f"{today('10:05:00')};RING;6;{caller};7654321;SIP0;",
                           f"{today('10:05:05')};CONNECT;6;11;{caller};"))
        restarted = datetime.strptime(today("10:05:20"), "%d.%m.%y %H:%M:%S").replace(
            tzinfo=self.rules.zone)
        closed = await self.ingest.close_open_calls("office", Reason.RESTARTED, restarted)
        assert closed == 1, closed
        self.tracker = CallTracker(self.rules)  # as after a restart
        await self._lines((f"{today('10:05:45')};DISCONNECT;6;40;",))

    async def _pbx_calls(self) -> None:
        """A PBX's calls through ``Ingest.submit`` with the PBX's own origin (``origin_of``:
        the sales side, late ends), as its service submits them: a contact's answered call
        and a lead's missed one (a ticket), both people with an active deal; then another
        contact's answered call replayed from the spool (``apply_together``: its end told
        with the group)."""
        origin = origin_of(read_settings({"name": "pbx", "secret": "x"}))
        at = datetime.now(UTC) - timedelta(hours=1)
        calls = [(mobile(CONTACT_MOBILES, 20), Outcome.ANSWERED, 61, 201),
                 (mobile(LEAD_MOBILES, 30), Outcome.MISSED, 0, None),
                 (mobile(CONTACT_MOBILES, 40), Outcome.ANSWERED, 45, 202)]
        happened: list[list[tuple[Happening, datetime]]] = []
        for n, (caller, outcome, talk, extension) in enumerate(calls):
            call = f"ast-pbx-190000000{n}.1"
            start = at + timedelta(minutes=n)
            end = start + timedelta(seconds=70)
            happened.append([
                (Started(call, "pbx", 0, "incoming", caller, OWN[0], "", None, start), start),
                (Ended(call, outcome, talk, end, extension), end)])
        *live, replayed = happened
        for happening, arrived in (pair for call in live for pair in call):
            await self.ingest.submit(happening, origin, arrived)
        await self.ingest.apply_together([Submission(h, origin, arrived)
                                          for h, arrived in replayed])

    async def _zadarma_webhooks(self) -> None:
        """Zadarma's webhooks one by one: a client's missed call (a ticket), a contact's
        answered one (the CRM's sales side)."""
        tickets = replace(self.context, tickets=True)
        await self._send(zadarma_call("+30" + mobile(CLIENT_MOBILES, 555), "in_" + "1" * 40,
                                      answered=False), tickets)
        await self._send(zadarma_call("+30" + mobile(CONTACT_MOBILES, 12), "in_" + "2" * 40,
                                      answered=True, start="2026-01-15 10:05:00"), tickets)
        # Another call's start signed as the first one's: its string is bound to that
        # call already, so it is refused and its journal entry taken back (``unjournal``).
        [start, _] = zadarma_call("+30" + mobile(CLIENT_MOBILES, 555), "in_" + "5" * 40,
                                  answered=False)
        await self._send([start], tickets)

    async def _replayed_group(self) -> None:
        """A replayed group of both sources in one transaction: an answered box call (the
        box forwarding it first: the forward told with the group), two missed ones ending
        together, a Zadarma missed call of one of their numbers and a lead's answered
        Zadarma call."""
        answered, missed, other = (mobile(CLIENT_MOBILES, 101), mobile(CLIENT_MOBILES, 202),
                                   mobile(LEAD_MOBILES, 33))
        lines = [
            f"{today('09:00:00')};RING;0;{answered};7654321;SIP0;",
            f"{today('09:00:02')};CALL;0;0;7654321;6971234567;SIP0;",
            f"{today('09:00:05')};CONNECT;0;11;{answered};",
            f"{today('09:00:10')};RING;1;{missed};7654321;SIP0;",
            f"{today('09:00:11')};RING;3;{other};7654321;SIP0;",
            f"{today('09:00:40')};DISCONNECT;1;0;",
            f"{today('09:00:41')};DISCONNECT;3;0;",
            f"{today('09:01:10')};DISCONNECT;0;60;",
        ]
        ring, forwarded, connect, *box = [Submission(h, self.origin, ARRIVED)
                                          for h in self.happenings(lines)]
        tickets = replace(self.context, tickets=True)
        zadarma_missed = submissions(zadarma_call(
            "+30" + missed, "in_" + "3" * 40, answered=False,
            start=f"{moment('09:00:20'):%Y-%m-%d %H:%M:%S}"), tickets)
        zadarma_answered = submissions(zadarma_call(
            "+30" + mobile(LEAD_MOBILES, 44), "in_" + "4" * 40, answered=True,
            start=f"{moment('09:00:30'):%Y-%m-%d %H:%M:%S}"), tickets)
        items: list[Submission | ZadarmaSubmission] = [
            ring, forwarded, connect, zadarma_missed[0], zadarma_answered[0], *box,
            *zadarma_missed[1:], *zadarma_answered[1:]]
        await self.ingest.apply_together(items)

    async def _lookups(self) -> None:
        """The directory's lookups on their own: one number, and a group's numbers."""
        match = await self.index.lookup("+30" + mobile(CLIENT_MOBILES, 9000))
        assert match is not None and match.client is not None, match

        async def group(batch: Any) -> None:
            await self.index.lookup_all(["+30" + mobile(CONTACT_MOBILES, 7),
                                         "+30" + mobile(LEAD_MOBILES, 8)], batch)

        await self.store.batch(group)

    async def _plans(self) -> list[Plan]:
        """Every dpvoip statement prepared on the pool's one connection, with its generic
        plan as that connection runs it."""
        [(mode,)] = await self.store.read("SHOW plan_cache_mode")
        assert mode == "force_generic_plan", f"the connection plans as {mode!r}"
        prepared = await self.store.read(
            "SELECT name, statement, parameter_types::text[] FROM pg_prepared_statements"
            " WHERE name LIKE 'dpvoip\\_%' ORDER BY name")
        plans = []
        for name, statement, types in prepared:
            values = ", ".join(f"NULL::{kind}" for kind in types)
            explained = await self.store.read(
                f"EXPLAIN EXECUTE {name}({values})" if types else f"EXPLAIN EXECUTE {name}")
            plans.append(Plan(name, statement, [line for (line,) in explained]))
        return plans

    async def _scenario(self) -> list[Plan]:
        await self._direct()
        await self._forwarded()
        await self._recovered()
        await self._pbx_calls()
        await self._zadarma_webhooks()
        await self._replayed_group()
        await self._lookups()
        return await self._plans()

    @defer.inlineCallbacks
    def test_no_hot_statement_scans_a_big_table_whole(self) -> Any:
        plans: list[Plan] = yield defer.Deferred.fromCoroutine(self._scenario())
        counters = self.ingest.counters
        self.assertEqual(counters.ticket_writes, 7,
                         "the paths' seven missed calls wrote (or joined) their tickets")
        self.assertEqual(counters.zadarma_bound_elsewhere, 1, "the refused start")
        self.assertEqual(counters.orphans, 0, "the recovered end found its call")
        self.assertGreaterEqual(len(plans), MINIMUM_STATEMENTS,
                                "\n".join(plan.name for plan in plans))
        missing = [path for path, fragment in EXPECTED.items()
                   if not any(fragment in plan.statement for plan in plans)]
        self.assertEqual(missing, [], "hot paths whose statements were not explained")
        offending = [plan for plan in plans if plan.big_scans()]
        if offending:
            self.fail(f"{len(offending)} of {len(plans)} prepared statements scan a big table"
                      " whole under their generic plan (force_generic_plan):\n\n"
                      + "\n\n".join(plan.describe() for plan in offending))


class NewestCrmStatementPlanTests(StatementPlanTests):
    crm_version = "2026-08"


#: A plan line that reads the ticket table (a scan of it, by whatever means).
TICKET_READ = re.compile(r" on accounting_ticket\b")
#: The one way a ticket-facts read may reach a ticket: by its id.
BY_ID = "Index Scan using accounting_ticket_pkey on accounting_ticket"


class BusyDayStatementPlanTests(StatementPlanTests):
    """A day of many missed calls: thousands of open tickets in the window, and callers who
    call often (many calls, each with its ticket, per number). The ticket-facts reads must
    still find a number's open ticket from the number's own calls, by the ticket's id: a
    generic plan that walked the window's open tickets newest first (the CRM's index on
    ``created_at DESC``) or hashed them all cost 2.5 ms per missed call in a replay, and
    grew with every ticket left open."""

    def setUp(self) -> Any:
        ready: defer.Deferred[None] = super().setUp()
        return ready.addCallback(lambda _: busy_day(self.dsn))

    @defer.inlineCallbacks
    def test_a_numbers_open_ticket_is_found_from_its_own_calls(self) -> Any:
        plans: list[Plan] = yield defer.Deferred.fromCoroutine(self._scenario())
        facts = [plan for plan in plans if "FOR NO KEY UPDATE OF t" in plan.statement]
        self.assertGreaterEqual(len(facts), 2, "the two ticket-facts reads were explained")
        walking = [plan for plan in facts
                   if any(TICKET_READ.search(line) and BY_ID not in line
                          for line in plan.lines)]
        if walking:
            self.fail("ticket-facts reads that reach the tickets otherwise than by id:\n\n"
                      + "\n\n".join("\n    ".join([plan.name, *plan.lines])
                                     for plan in walking))


class NewestCrmBusyDayStatementPlanTests(BusyDayStatementPlanTests):
    crm_version = "2026-08"


def busy_day(dsn: str) -> None:
    """3,000 more tickets open within the day's window, and the past calls' numbers
    narrowed to 500 callers, each call with one of those tickets."""
    connection = psycopg2.connect(dsn)
    try:
        connection.autocommit = True
        with connection.cursor() as cursor:
            cursor.execute(
                "INSERT INTO public.accounting_ticket (title, description, status, priority,"
                " notes, created_at, email_sent, follow_up_scheduled) SELECT 'MISSED CALL',"
                " '', 'open', 'medium', '', now() - g * interval '20 seconds', false, false"
                " FROM generate_series(1, 3000) g")
            cursor.execute(
                "UPDATE dpvoip.call_detail SET remote_number = '+30691000' || lpad((abs("
                "hashtext(call_id)) % 500)::text, 4, '0'), ticket_id = (SELECT max(id) FROM"
                " public.accounting_ticket) - abs(hashtext(call_id)) % 3000")
            cursor.execute("ANALYZE public.accounting_ticket; ANALYZE dpvoip.call_detail")
    finally:
        connection.close()
