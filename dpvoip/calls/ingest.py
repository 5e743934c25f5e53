"""The one door through which every call event enters the database.

A happening (a call started, was answered, forwarded, ended) becomes one transaction on
the CRM's tables and dpvoip's own: the call row, its log lines, the directory match, and
for a missed call the ticket, all committed together or not at all. Every statement is
written so that replaying the same happening changes nothing: the call row is inserted
once (its id is derived from the source), and it is finalised only while it is active.

Events of one call are applied in order (one chain per call); different calls run
concurrently. Two missed calls of one number that end at once are serialised on the
number by a transaction-scoped advisory lock, so they make one ticket.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, tzinfo
from typing import Any, TypeVar
from zoneinfo import ZoneInfo

from twisted.internet.defer import Deferred
from twisted.logger import Logger

from dpvoip.config import TicketSettings
from dpvoip.core.happenings import Answered, Ended, Forwarded, Happening, Started, Unmatched
from dpvoip.core.matching import Match
from dpvoip.core.numbers import Dialling, is_withheld, normalise
from dpvoip.core.outcomes import Outcome, notes, talk_time
from dpvoip.core.texts import Texts, grouped_title, missed_title
from dpvoip.crm.schema import CrmCapabilities, quote_ident
from dpvoip.deferreds import OneShotObserver
from dpvoip.fritzbox.tracker import BoxRules, decide
from dpvoip.store.database import Batch, Store
from dpvoip.store.directory import DirectoryIndex
from dpvoip.store.migrations import SchemaReport
from dpvoip.zadarma.calls import ZadarmaCall, summarise
from dpvoip.zadarma.events import ZadarmaEvent, parse_event
from dpvoip.zadarma.events import call_id as zadarma_call_id

log = Logger(namespace="dpvoip.calls.ingest")
T = TypeVar("T")

#: How far back a CONNECT/DISCONNECT of an unknown id may find the call it belongs to.
RECOVERY_WINDOW = timedelta(hours=12)
NOTIFY_CHANNEL = "dpvoip_calls"
_OPEN_TICKET = ("open", "assigned", "in_progress")


@dataclass(frozen=True)
class Origin:
    """Where happenings come from: a box's name, its dialling context and its rules."""

    name: str
    where: Dialling
    rules: BoxRules | None = None
    source: str = "fritzbox"


@dataclass(frozen=True)
class ZadarmaContext:
    """How to read a Zadarma account's events: its numbers' country, its clock's zone."""

    where: Dialling
    zone: tzinfo
    tickets: bool = False
    redirect_to_owner: bool = False


@dataclass(frozen=True)
class ZadarmaOutcome:
    duplicate: bool
    match: Match | None = None
    owner_extension: str = ""  # the pbx_number of the CRM user who owns the caller


@dataclass
class IngestCounters:
    calls_started: int = 0
    calls_ended: int = 0
    ticket_writes: int = 0  # tickets created or updated
    replays_ignored: int = 0
    orphans: int = 0
    failures: int = 0


def remote_column(raw: str, number: str | None) -> str:
    """The CRM's phone_number: E.164, else the raw value cut to 20, '' when withheld."""
    if is_withheld(raw):
        return ""
    return number if number is not None else raw.strip()[:20]


class Ingest:
    def __init__(
        self,
        store: Store,
        directory: DirectoryIndex,
        texts: Texts,
        tickets: TicketSettings,
        office_zone: ZoneInfo,
        schema: OneShotObserver[SchemaReport],
        crm_schema: str = "public",
    ) -> None:
        self._store = store
        self._schema = schema
        self._directory = directory
        self._texts = texts
        self._tickets = tickets
        self._zone = office_zone
        self._crm = quote_ident(crm_schema)
        self._chains: dict[str, Deferred[None]] = {}
        self.counters = IngestCounters()

    # -- the entry point -------------------------------------------------------------------

    def submit(self, happening: Happening, origin: Origin) -> Deferred[None]:
        """Apply ``happening``; fires when it is committed (or fails, after logging it)."""
        return self._in_order(_chain_key(happening), lambda: self._apply(happening, origin))

    def submit_zadarma(self, event: ZadarmaEvent, form: Mapping[str, str],
                       context: ZadarmaContext) -> Deferred[ZadarmaOutcome]:
        """Record a Zadarma webhook event (journal, call row, logs, CRM, ticket); fires with
        what the answer needs once it is committed."""
        return self._in_order(f"zd:{event.pbx_call_id}",
                              lambda: self._zadarma(event, form, context))

    def _in_order(self, key: str, work: Callable[[], Awaitable[T]]) -> Deferred[T]:
        """Run ``work`` after everything submitted before under ``key`` (one call's events
        in order); different keys run concurrently."""
        previous = self._chains.get(key)
        done: Deferred[None] = Deferred()  # fires, never fails, when this one is through
        self._chains[key] = done

        async def run() -> T:
            if previous is not None:
                await previous
            try:
                return await work()
            finally:
                if self._chains.get(key) is done:
                    del self._chains[key]
                done.callback(None)

        return Deferred.fromCoroutine(run())

    async def _apply(self, happening: Happening, origin: Origin) -> None:
        try:
            if isinstance(happening, Started):
                await self._started(happening, origin)
            elif isinstance(happening, Answered):
                await self._answered(happening)
            elif isinstance(happening, Forwarded):
                await self._forwarded(happening)
            elif isinstance(happening, Ended):
                await self._ended(happening, origin)
            else:
                await self._unmatched(happening, origin)
        except Exception:
            self.counters.failures += 1
            raise

    # -- SQL fragments ---------------------------------------------------------------------

    @property
    def _capabilities(self) -> CrmCapabilities:
        prepared = self._schema.peek()
        return prepared.crm if prepared is not None else CrmCapabilities()

    def _log_lines(self, call: str, count: int) -> str:
        """INSERT of ``count`` call-log lines for the call row of CTE ``call`` (id, call_id,
        phone_number, client_id); fills the 2026-08 CRM's extra columns when present.
        Parameters: action, description per line."""
        extra_columns, extra_values = self._log_extras()
        lines = ", ".join(["(%s, %s, " + str(n) + ")" for n in range(count)])
        return (
            f"INSERT INTO {self._crm}.accounting_voipcalllog (action, description, created_at,"
            f" call_id{extra_columns}) SELECT v.action, v.description, now(), c.id{extra_values}"
            f" FROM {call} c CROSS JOIN (VALUES {lines}) AS v(action, description, n)"
            " ORDER BY v.n"
        )

    @staticmethod
    def _payload(event: str, call_id: str, **fields: Any) -> str:
        return json.dumps({"event": event, "call_id": call_id, **fields}, default=str)

    # -- happenings --------------------------------------------------------------------------

    async def _started(self, started: Started, origin: Origin) -> None:
        number = None if started.hairpin else normalise(started.remote, origin.where)
        match = await self._directory.lookup(number) if number else None
        phone = "" if started.hairpin else remote_column(started.remote, number)
        client = match.client if match else None
        person = match.person if match else None
        shown = phone or self._texts("withheld")
        name = match.display_name if match else self._texts("unknown")
        logs: list[str] = ["started", self._texts(f"started_{started.direction}",
                                                  number=shown, name=name)]
        if match is not None:
            logs += ["client_matched", self._matched_text(match)]
        statement = (
            f"WITH call AS (INSERT INTO {self._crm}.accounting_voipcall (call_id, direction,"
            " phone_number, status, started_at, ended_at, duration_seconds, notes,"
            " ticket_created, ticket_id, created_at, updated_at, client_id, client_email,"
            " resolution) VALUES (%s, %s, %s, 'active', %s, NULL, 0, %s, false, NULL,"
            " now(), now(), %s, %s, 'pending') ON CONFLICT (call_id) DO NOTHING"
            " RETURNING id, call_id, phone_number, client_id),"
            " detail AS (INSERT INTO dpvoip.call_detail (call_id, source, box, conn_id,"
            " direction, remote_raw, remote_number, own_number, line, extension, started_at,"
            " client_id, contact_id, lead_id, deal_id, hairpin) SELECT c.call_id, %s, %s, %s,"
            " %s, %s, %s, %s, %s, %s, %s, c.client_id, %s, %s, %s, %s FROM call c"
            " ON CONFLICT (call_id) DO NOTHING),"
            f" logs AS ({self._log_lines('call', len(logs) // 2)}),"
            " note AS (SELECT pg_notify(%s, %s) FROM call)"
            " SELECT c.id, (SELECT count(*) FROM note) FROM call c"
        )
        params = (
            started.call_id, started.direction, phone, started.at,
            "internal call to an own number" if started.hairpin else "",
            client.id if client else None, client.email if client else None,
            origin.source, started.box, started.conn_id, started.direction, started.remote,
            number, started.own_number, started.line, started.extension, started.at,
            person.id if person and person.kind == "contact" else None,
            person.id if person and person.kind == "lead" else None,
            match.deal.id if match and match.deal else None, started.hairpin,
            *logs,
            NOTIFY_CHANNEL, self._payload("started", started.call_id,
                                          direction=started.direction, number=phone,
                                          name=match.display_name if match else None,
                                          box=started.box),
        )
        if await self._store.write_one(statement, params):
            self.counters.calls_started += 1
            log.info("call {call_id}: {direction} {number} ({name})", call_id=started.call_id,
                     direction=started.direction, number=shown, name=name)
        else:
            self.counters.replays_ignored += 1  # the call is there already

    def _matched_text(self, match: Match) -> str:
        if match.client is not None:
            return self._texts("client_matched", kind="client", name=match.client.name,
                               id=match.client.id)
        if match.person is not None:
            return self._texts("client_matched", kind=match.person.kind,
                               name=match.person.name, id=match.person.id)
        return self._texts("client_matched", kind="company", name=match.company_name or "",
                           id="-")

    def _detail_change(self, assignment: str, condition: str, log: str) -> str:
        """One statement: change the detail row if it changes, log it, publish it."""
        return (
            f"WITH changed AS (UPDATE dpvoip.call_detail SET {assignment}, updated_at = now()"
            f" WHERE call_id = %s AND {condition} RETURNING call_id),"
            f" call AS (SELECT v.id, v.call_id, v.phone_number, v.client_id FROM"
            f" {self._crm}.accounting_voipcall v JOIN changed USING (call_id)),"
            f" logs AS ({log}),"
            " note AS (SELECT pg_notify(%s, %s) FROM call)"
            " SELECT c.id, (SELECT count(*) FROM note) FROM call c"
        )

    async def _answered(self, answered: Answered) -> None:
        key = "transferred" if answered.transfer else "answered"
        statement = self._detail_change(
            "extension = %s, answered_at = coalesce(answered_at, %s)",
            "ended_at IS NULL AND extension IS DISTINCT FROM %s",
            self._log_lines("call", 1),
        )
        rows = await self._store.write_one(statement, (
            answered.extension, answered.at, answered.call_id, answered.extension,
            "status_changed", self._texts(key, extension=answered.extension),
            NOTIFY_CHANNEL, self._payload("answered", answered.call_id,
                                          extension=answered.extension),
        ))
        if not rows:
            self.counters.replays_ignored += 1

    async def _forwarded(self, forwarded: Forwarded) -> None:
        statement = self._detail_change(
            "forwarded_to = %s", "forwarded_to IS DISTINCT FROM %s", self._log_lines("call", 1)
        )
        await self._store.write_one(statement, (
            forwarded.to_number, forwarded.call_id, forwarded.to_number,
            "status_changed", self._texts("forwarded", number=forwarded.to_number),
            NOTIFY_CHANNEL, self._payload("forwarded", forwarded.call_id),
        ))

    def _finish_statement(self, recovering: bool) -> str:
        """One statement: finalise the call row and its detail, log and publish it."""
        return (
            f"WITH updated AS (UPDATE {self._crm}.accounting_voipcall c SET status = %s,"
            " ended_at = %s, duration_seconds = %s, notes = %s, updated_at = now()"
            " FROM dpvoip.call_detail d WHERE c.call_id = %s AND d.call_id = c.call_id"
            f" AND (c.status = 'active'{self._reopen(recovering)})"
            " AND d.outcome IS DISTINCT FROM %s RETURNING c.id, c.call_id, c.phone_number,"
            " c.client_id),"
            " detail AS (UPDATE dpvoip.call_detail d SET outcome = %s, ended_at = %s,"
            " updated_at = now() FROM updated u WHERE d.call_id = u.call_id),"
            f" logs AS ({self._log_lines('updated', 1)}),"
            " note AS (SELECT pg_notify(%s, %s) FROM updated)"
            " SELECT u.id, (SELECT count(*) FROM note) FROM updated u"
        )

    @staticmethod
    def _reopen(recovering: bool) -> str:
        return " OR d.outcome = 'interrupted'" if recovering else ""

    async def _ended(self, ended: Ended, origin: Origin, recovering: bool = False) -> None:
        log_line = self._texts("ended", notes=ended.notes, talk=talk_time(ended.duration))
        payload = self._payload("ended", ended.call_id, status=ended.outcome.status,
                                outcome=ended.outcome.value, duration=ended.duration)
        params = (
            ended.outcome.status, ended.at, ended.duration, ended.notes, ended.call_id,
            ended.outcome.value, ended.outcome.value, ended.at,
            "ended", log_line, NOTIFY_CHANNEL, payload,
        )
        if not ended.outcome.wants_ticket("incoming"):
            done = bool(await self._store.write_one(self._finish_statement(recovering),
                                                    params))
        else:
            async def steps(batch: Batch) -> bool:
                # First the call and, for a number, its ticket lock: the statement that
                # follows then sees any ticket another transaction just committed.
                found = await batch.run_planned(
                    "SELECT c.id, c.phone_number, c.client_id, d.direction, d.remote_number,"
                    f" d.started_at, d.own_number, d.extension FROM {self._crm}"
                    ".accounting_voipcall c JOIN dpvoip.call_detail d ON d.call_id = c.call_id"
                    " LEFT JOIN LATERAL (SELECT pg_advisory_xact_lock(hashtext("
                    "'dpvoip-ticket:' || d.remote_number)) WHERE d.direction = 'incoming'"
                    " AND d.remote_number IS NOT NULL) AS locked ON true"
                    " WHERE c.call_id = %(call)s AND (c.status = 'active'"
                    f"{self._reopen(recovering)}) AND d.outcome IS DISTINCT FROM %(outcome)s"
                    " FOR UPDATE OF c",
                    {"call": ended.call_id, "outcome": ended.outcome.value},
                )
                if not found:
                    return False
                row_id, phone, client_id, direction, number, started_at, own, extension = (
                    found[0])
                if direction != "incoming" or not (phone or self._tickets.withheld):
                    await batch.run(self._finish_statement(recovering), params, last=True)
                    return True
                await self._ticket(batch, ended, origin, row_id, phone, client_id, number,
                                   started_at, own, extension, log_line, payload)
                return True

            done = await self._store.batch(steps)
        if done:
            self.counters.calls_ended += 1
            log.info("call {call_id}: {status}, {notes}, talk time {talk}",
                     call_id=ended.call_id, status=ended.outcome.status, notes=ended.notes,
                     talk=talk_time(ended.duration))
        else:
            self.counters.replays_ignored += 1

    async def _ticket(self, batch: Batch, ended: Ended, origin: Origin, row_id: int,
                      phone: str, client_id: int | None, number: str | None,
                      started_at: datetime, own_number: str, extension: int | None,
                      ended_line: str, ended_payload: str) -> None:
        """The missed call's end and its ticket (behaviour.md section 5), one statement
        that also commits: it looks for an open ticket of the number created within the
        window, counts the number's missed calls, updates that ticket or creates one,
        finalises the call row linked to it, logs and publishes both. The words come from
        ``texts`` as templates; SQL only fills in the numbers."""
        if extension is None:
            extension = ended.extension
        shown = phone or self._texts("withheld")
        local = started_at.astimezone(self._zone)
        assignee = self._assignee_name(own_number, extension, origin)
        extra_columns, extra_values = self._log_extras()
        await batch.run_planned(
            "WITH facts AS (SELECT"
            f" (SELECT t.id FROM dpvoip.call_detail d JOIN {self._crm}.accounting_ticket t"
            " ON t.id = d.ticket_id WHERE %(number)s::text IS NOT NULL"
            " AND d.remote_number = %(number)s AND d.ticket_id IS NOT NULL"
            " AND t.status = ANY(%(open)s) AND t.created_at > %(since)s"
            " ORDER BY t.created_at DESC LIMIT 1) AS existing,"
            " CASE WHEN %(number)s::text IS NULL THEN 1 ELSE 1 + (SELECT count(*)"
            " FROM dpvoip.call_detail WHERE remote_number = %(number)s AND direction ="
            " 'incoming' AND outcome IN ('missed', 'voicemail') AND started_at > %(since)s"
            " AND call_id <> %(call_id)s) END AS n,"
            f" (SELECT eponimia FROM {self._crm}.accounting_clientprofile"
            " WHERE id = %(client)s) AS client_name,"
            f" (SELECT id FROM {self._crm}.auth_user WHERE username = %(user)s"
            " AND is_active) AS assignee),"
            f" updated AS (UPDATE {self._crm}.accounting_ticket t SET"
            " title = left(replace(%(grouped)s, '{n}', f.n::text), 200),"
            " priority = CASE WHEN f.n >= %(urgent_at)s THEN 'urgent' ELSE t.priority END,"
            " notes = CASE WHEN t.notes = '' THEN replace(%(note)s, '{n}', f.n::text)"
            " ELSE t.notes || E'\\n' || replace(%(note)s, '{n}', f.n::text) END"
            " FROM facts f WHERE t.id = f.existing RETURNING t.id, t.title),"
            f" created AS (INSERT INTO {self._crm}.accounting_ticket (title, description,"
            " status, priority, notes, created_at, assigned_at, resolved_at, closed_at,"
            " email_sent, follow_up_scheduled, assigned_to_id, call_id, client_id) SELECT"
            " left(%(title)s || coalesce(' - ' || f.client_name, ''), 200),"
            " replace(%(description)s, '{client}', coalesce(' (' || f.client_name || ')', '')),"
            " CASE WHEN f.assignee IS NULL THEN 'open' ELSE 'assigned' END, 'high', '', now(),"
            " CASE WHEN f.assignee IS NULL THEN NULL ELSE now() END, NULL, NULL, false, false,"
            " f.assignee, %(row)s, %(client)s FROM facts f WHERE f.existing IS NULL"
            " RETURNING id, title),"
            " ticket AS (SELECT id, title, 'ticket_updated' AS action FROM updated"
            " UNION ALL SELECT id, title, 'ticket_created' FROM created),"
            f" call AS (UPDATE {self._crm}.accounting_voipcall v SET status = %(status)s,"
            " ended_at = %(at)s, duration_seconds = %(duration)s, notes = %(notes)s,"
            " ticket_created = true, ticket_id = t.id::text, updated_at = now()"
            " FROM ticket t WHERE v.id = %(row)s RETURNING v.id, v.call_id, v.phone_number,"
            " v.client_id, t.id AS ticket, t.title, t.action),"
            " detail AS (UPDATE dpvoip.call_detail d SET outcome = %(outcome)s, ended_at ="
            " %(at)s, ticket_id = c.ticket, updated_at = now() FROM call c"
            " WHERE d.call_id = c.call_id),"
            f" logs AS (INSERT INTO {self._crm}.accounting_voipcalllog (action, description,"
            f" created_at, call_id{extra_columns}) SELECT line.action, line.description,"
            f" now(), c.id{extra_values} FROM call c CROSS JOIN LATERAL (VALUES"
            " (0, 'ended', %(ended_line)s), (1, c.action, replace(replace(CASE c.action"
            " WHEN 'ticket_created' THEN %(created_log)s ELSE %(updated_log)s END, '{id}',"
            " c.ticket::text), '{title}', c.title))) AS line(n, action, description)"
            " ORDER BY line.n),"
            " note AS (SELECT pg_notify(%(channel)s, %(ended_payload)s) FROM call"
            " UNION ALL SELECT pg_notify(%(channel)s, json_build_object('event', c.action,"
            " 'call_id', c.call_id, 'ticket_id', c.ticket)::text) FROM call c)"
            " SELECT (SELECT count(*) FROM note)",
            {
                "number": number, "open": list(_OPEN_TICKET), "call_id": ended.call_id,
                "since": started_at - timedelta(hours=self._tickets.group_hours),
                "client": client_id, "user": assignee, "row": row_id,
                "urgent_at": self._tickets.urgent_at,
                "grouped": grouped_title("{n}", shown),
                "note": self._texts("ticket_note", time=f"{local:%d/%m %H:%M}", count="{n}"),
                "title": missed_title(shown, None),
                "description": self._texts("ticket_description", number=shown,
                                           client="{client}",
                                           time=f"{local:%d/%m/%Y %H:%M}"),
                "created_log": self._texts("ticket_created", id="{id}", title="{title}"),
                "updated_log": self._texts("ticket_updated", id="{id}", title="{title}"),
                "channel": NOTIFY_CHANNEL, "status": ended.outcome.status, "at": ended.at,
                "duration": ended.duration, "notes": ended.notes,
                "outcome": ended.outcome.value, "ended_line": ended_line,
                "ended_payload": ended_payload,
            },
            last=True,
        )
        self.counters.ticket_writes += 1
        log.info("call {call_id}: missed-call ticket written for {number}",
                 call_id=ended.call_id, number=shown)

    def _log_extras(self) -> tuple[str, str]:
        """The 2026-08 CRM's extra call-log columns, and their values from a call CTE ``c``
        (id, call_id, phone_number, client_id): both as ", a, b" fragments."""
        capabilities = self._capabilities
        pairs = [pair for pair, present in (
            (("client_id", "c.client_id"), capabilities.call_log_client_id),
            (("call_reference", "c.call_id"), capabilities.call_log_call_reference),
            (("phone_number", "c.phone_number"), capabilities.call_log_phone_number),
        ) if present]
        return ("".join(", " + column for column, _ in pairs),
                "".join(", " + value for _, value in pairs))

    def _assignee_name(self, own_number: str, extension: int | None,
                       origin: Origin) -> str | None:
        """The CRM username a ticket goes to, by the extension or the called own number."""
        if extension is not None and str(extension) in self._tickets.assign_by_extension:
            return self._tickets.assign_by_extension[str(extension)]
        if own_number:
            wanted = normalise(own_number, origin.where) or own_number
            for configured, user in self._tickets.assign_by_number.items():
                if (normalise(configured, origin.where) or configured) == wanted:
                    return user
        return None

    # -- Zadarma -----------------------------------------------------------------------------

    async def _zadarma(self, event: ZadarmaEvent, form: Mapping[str, str],
                       context: ZadarmaContext) -> ZadarmaOutcome:
        """Journal the event, then compute the call again from all of its events and write
        what changed: one transaction, serialised per call across instances by an advisory
        lock. A repeated event stops at the journal and changes nothing."""
        identity = zadarma_call_id(event.pbx_call_id)

        # The caller as this event alone shows it: looked up in the same round trip as the
        # journal. Nearly always the call's own number; when the whole journal says
        # otherwise (a callback's legs), it is looked up again.
        alone = summarise([event])
        guessed = normalise(alone.remote, context.where) if alone else None
        guess = None if self._directory.never_matches(guessed) else guessed

        async def steps(batch: Batch) -> ZadarmaOutcome:
            # One round trip: the lock, then (a new statement, so a new snapshot that sees
            # what the lock's previous holder committed) the journal entry, the journal
            # and the guessed caller's directory entries.
            [(fresh, forms, previous, existed, found)] = await batch.run_planned(
                "WITH added AS (INSERT INTO dpvoip.zadarma_event (pbx_call_id, event,"
                " calltype, internal, destination, form) VALUES (%(pbx)s, %(event)s,"
                " %(calltype)s, %(internal)s, %(destination)s, %(form)s)"
                " ON CONFLICT DO NOTHING RETURNING id, form)"
                " SELECT (SELECT count(*) FROM added) > 0,"
                " (SELECT json_agg(j.form ORDER BY j.id) FROM (SELECT id, form FROM"
                " dpvoip.zadarma_event WHERE pbx_call_id = %(pbx)s UNION ALL SELECT id, form"
                " FROM added) AS j),"
                " (SELECT outcome FROM dpvoip.call_detail WHERE call_id = %(call)s),"
                f" EXISTS (SELECT 1 FROM {self._crm}.accounting_voipcall"
                " WHERE call_id = %(call)s),"
                f" {self._directory.lookup_subquery('number')}",
                {"lock": f"dpvoip-zadarma:{event.pbx_call_id}", "pbx": event.pbx_call_id,
                 "event": event.kind, "calltype": event.calltype, "internal": event.internal,
                 "destination": event.destination, "form": json.dumps(dict(form)),
                 "call": identity, "number": guess},
                prefix="SELECT pg_advisory_xact_lock(hashtext(%(lock)s)); ",
            )
            if not fresh:
                self.counters.replays_ignored += 1
                return ZadarmaOutcome(duplicate=True)
            if len(forms) == 1:  # the journal is this event alone: read it already
                call = alone
            else:
                call = summarise(e for e in map(parse_event, forms)
                                 if isinstance(e, ZadarmaEvent))
            if call is None:
                return ZadarmaOutcome(duplicate=False)  # a recording notice, kept for later
            number = (guessed if alone is not None and call.remote == alone.remote
                      else normalise(call.remote, context.where))
            if number == guess:
                match = self._directory.match_of(number, found)
            else:
                match = await self._directory.lookup(number, within=batch) if number else None
            return await self._zadarma_call(batch, identity, call, previous, existed,
                                            context, number, match)

        return await self._store.batch(steps)

    async def _zadarma_call(self, batch: Batch, identity: str, call: ZadarmaCall,
                            previous: str | None, existed: bool, context: ZadarmaContext,
                            number: str | None, match: Match | None) -> ZadarmaOutcome:
        """The call row, its detail, its log lines, the live event and the CRM's sales
        side in one statement; the COMMIT rides along unless a ticket or the owner's
        extension still has to be written or read (the usual event: two round trips in
        all, the journal's and this one)."""
        phone = remote_column(call.remote, number)
        client = match.client if match else None
        person = match.person if match else None
        started = (call.started.replace(tzinfo=context.zone).astimezone(UTC)
                   if call.started else datetime.now(UTC))
        outcome = call.outcome
        extension = int(call.extension) if call.extension.isdigit() else None
        shown = phone or self._texts("withheld")
        name = match.display_name if match else self._texts("unknown")
        ending = outcome is not None and previous is None
        ended_line = self._texts("ended", notes=call.notes, talk=talk_time(call.duration))
        ended_payload = self._payload("ended", identity, status=outcome.status,
                                      outcome=outcome.value, duration=call.duration
                                      ) if outcome else ""
        ticket = (ending and outcome is not None and context.tickets
                  and outcome.wants_ticket(call.direction)
                  and bool(phone or self._tickets.withheld))
        # (action, text, only when the row is new): the row's creation is known in SQL.
        entries = [("started", self._texts(f"started_{call.direction}", number=shown,
                                           name=name), True)]
        if match is not None:
            entries.append(("client_matched", self._matched_text(match), True))
        if ending and not ticket:
            entries.append(("ended", ended_line, False))
        extra_columns, extra_values = self._log_extras()
        touch = ending and outcome is not None and person is not None
        owner_wanted = (context.redirect_to_owner and person is not None
                        and person.owner_id is not None)
        last = not ticket and not owner_wanted
        # The values travel as one JSON document (``p``) and the log lines as a JSON
        # array: psycopg2 quotes each parameter on its own, which cost more CPU than the
        # rest of the statement when they were forty.
        values = {
            "id": identity, "direction": call.direction, "phone": phone,
            "status": outcome.status if outcome else "active", "started": started.isoformat(),
            "final": outcome is not None, "duration": call.duration, "notes": call.notes,
            "client": client.id if client else None, "email": client.email if client else None,
            "remote": call.remote, "number": number, "own": call.own_number,
            "extension": extension, "outcome": outcome.value if outcome else None,
            "contact": person.id if person and person.kind == "contact" else None,
            "lead": person.id if person and person.kind == "lead" else None,
            "deal": match.deal.id if match and match.deal else None,
            "pbx": call.pbx_call_id, "disposition": call.disposition or None,
            "calltype": "callback" if call.callback else "normal",
            "recording": call.recording, "channel": NOTIFY_CHANNEL,
            "started_payload": self._payload("started", identity, direction=call.direction,
                                             number=phone,
                                             name=match.display_name if match else None),
            "ended_payload": ended_payload, "ending": ending and not ticket,
            **self._sales_side(call, outcome, person.name if person else "", touch),
        }
        rows = await batch.run_planned(
            "WITH p AS (SELECT * FROM json_to_record(%(values)s::json) AS p(id text,"
            " direction text, phone text, status text, started timestamptz, final boolean,"
            " duration integer, notes text, client bigint, email text, remote text,"
            " number text, own text, extension integer, outcome text, contact bigint,"
            " lead bigint, deal bigint, pbx text, disposition text, calltype text,"
            " recording text, channel text, started_payload text, ended_payload text,"
            " ending boolean, touch boolean, today date, answered boolean, line text)),"
            f" call AS (INSERT INTO {self._crm}.accounting_voipcall AS v (call_id,"
            " direction, phone_number, status, started_at, ended_at, duration_seconds, notes,"
            " ticket_created, ticket_id, created_at, updated_at, client_id, client_email,"
            " resolution) SELECT p.id, p.direction, p.phone, p.status, p.started,"
            " CASE WHEN p.final THEN now() END, p.duration, p.notes, false, NULL, now(),"
            " now(), p.client, p.email, 'pending' FROM p ON CONFLICT (call_id) DO UPDATE SET"
            " direction = EXCLUDED.direction, phone_number = EXCLUDED.phone_number,"
            " status = EXCLUDED.status, started_at = EXCLUDED.started_at,"
            " ended_at = coalesce(v.ended_at, EXCLUDED.ended_at),"
            " duration_seconds = EXCLUDED.duration_seconds, notes = EXCLUDED.notes,"
            " client_id = coalesce(EXCLUDED.client_id, v.client_id),"
            " client_email = coalesce(EXCLUDED.client_email, v.client_email),"
            " updated_at = now() RETURNING v.id, v.call_id, v.phone_number, v.client_id,"
            " (xmax = 0) AS inserted),"
            # The CRM's sales side, once per call (read before this statement's own write
            # to the detail row: every part of one statement sees the same snapshot).
            " touch AS (SELECT p.touch AND NOT coalesce((SELECT d.crm_touched"
            " FROM dpvoip.call_detail d WHERE d.call_id = p.id), false) AS go FROM p),"
            " detail AS (INSERT INTO dpvoip.call_detail AS d (call_id, source, direction,"
            " remote_raw, remote_number, own_number, extension, started_at, ended_at, outcome,"
            " client_id, contact_id, lead_id, deal_id, pbx_call_id, disposition, calltype,"
            " recording, crm_touched) SELECT p.id, 'zadarma', p.direction, p.remote,"
            " p.number, p.own, p.extension, p.started, CASE WHEN p.final THEN now() END,"
            " p.outcome, p.client, p.contact, p.lead, p.deal, p.pbx, p.disposition,"
            " p.calltype, p.recording, p.touch FROM p"
            " ON CONFLICT (call_id) DO UPDATE"
            " SET direction = EXCLUDED.direction, remote_raw = EXCLUDED.remote_raw,"
            " remote_number = EXCLUDED.remote_number, own_number = EXCLUDED.own_number,"
            " extension = EXCLUDED.extension, started_at = EXCLUDED.started_at,"
            " ended_at = coalesce(d.ended_at, EXCLUDED.ended_at), outcome = EXCLUDED.outcome,"
            " client_id = coalesce(EXCLUDED.client_id, d.client_id),"
            " contact_id = coalesce(EXCLUDED.contact_id, d.contact_id),"
            " lead_id = coalesce(EXCLUDED.lead_id, d.lead_id),"
            " deal_id = coalesce(EXCLUDED.deal_id, d.deal_id),"
            " disposition = EXCLUDED.disposition, calltype = EXCLUDED.calltype,"
            " recording = coalesce(nullif(EXCLUDED.recording, ''), d.recording),"
            " crm_touched = d.crm_touched OR EXCLUDED.crm_touched,"
            " updated_at = now()),"
            f" contact AS (UPDATE {self._crm}.crm_contact x SET was_in_touch = p.today"
            " FROM p, touch WHERE x.id = p.contact AND p.answered AND touch.go RETURNING x.id),"
            f" lead AS (UPDATE {self._crm}.crm_lead x SET was_in_touch = p.today"
            " FROM p, touch WHERE x.id = p.lead AND p.answered AND touch.go RETURNING x.id),"
            f" deal AS (UPDATE {self._crm}.crm_deal x SET workflow = p.line || CASE WHEN"
            " x.workflow = '' THEN '' ELSE E'\\n' END || x.workflow FROM p, touch"
            " WHERE x.id = p.deal AND touch.go RETURNING x.id),"
            f" logs AS (INSERT INTO {self._crm}.accounting_voipcalllog (action, description,"
            f" created_at, call_id{extra_columns}) SELECT l.action, l.description, now(),"
            f" c.id{extra_values} FROM call c CROSS JOIN json_to_recordset(%(lines)s::json)"
            " AS l(action text, description text, only_new boolean, n integer)"
            " WHERE c.inserted OR NOT l.only_new ORDER BY l.n),"
            " note AS (SELECT pg_notify(p.channel, CASE WHEN c.inserted THEN"
            " p.started_payload ELSE p.ended_payload END) FROM call c, p"
            " WHERE c.inserted OR p.ending)"
            # (The UPDATEs run unreferenced; the NOTIFY, a plain SELECT, only when read.)
            " SELECT id, (SELECT count(*) FROM note) FROM call",
            {"values": json.dumps(values),
             "lines": json.dumps([{"action": action, "description": text, "only_new": only,
                                   "n": n} for n, (action, text, only) in enumerate(entries)])},
            last=last,
        )
        if not existed:  # under the call's lock: the row this statement inserted
            self.counters.calls_started += 1
        if ending and not ticket:
            self.counters.calls_ended += 1
        owner_extension = ""
        if owner_wanted and person is not None:
            found = await batch.run(
                f"SELECT pbx_number FROM {self._crm}.common_userprofile WHERE user_id = %s"
                " AND pbx_number <> ''", (person.owner_id,))
            owner_extension = str(found[0][0]) if found else ""
        if ticket and outcome is not None:
            [(row_id, *_)] = rows
            self.counters.calls_ended += 1
            ended = Ended(identity, outcome, call.duration, datetime.now(UTC), extension,
                          call.notes)
            origin = Origin("zadarma", context.where, source="zadarma")
            await self._ticket(batch, ended, origin, row_id, phone,
                               client.id if client else None, number, started,
                               call.own_number, extension, ended_line, ended_payload)
        return ZadarmaOutcome(duplicate=False, match=match, owner_extension=owner_extension)

    def _sales_side(self, call: ZadarmaCall, outcome: Outcome | None, name: str,
                    touch: bool) -> dict[str, Any]:
        """The CRM's sales side, once per call (behaviour.md section 6): an answered call
        sets the contact's or lead's ``was_in_touch``; every finished call prepends one line
        to the active deal's workflow. Targeted UPDATEs only: CRM users edit these rows."""
        if not touch or outcome is None:
            return {"touch": False, "today": None, "answered": False, "line": None}
        today = datetime.now(self._zone).date()
        what = "Incoming call from" if call.direction == "incoming" else "Outgoing call to"
        line = (f"{today:%d.%m.%Y} - {what} {name} ({outcome.value},"
                f" {talk_time(call.duration)}).")
        return {"touch": True, "today": today.isoformat(),
                "answered": outcome is Outcome.ANSWERED, "line": line}

    # -- events of calls this process never saw start ----------------------------------------

    async def _unmatched(self, event: Unmatched, origin: Origin) -> None:
        rows = await self._store.read(
            "SELECT d.call_id, d.direction, d.started_at, d.extension, d.outcome,"
            " d.answered_at IS NOT NULL FROM dpvoip.call_detail d WHERE d.box = %s AND"
            " d.conn_id = %s AND d.started_at > %s AND d.started_at <= %s"
            " ORDER BY d.started_at DESC LIMIT 1",
            (event.box, event.conn_id, event.at - RECOVERY_WINDOW,
             event.at + timedelta(minutes=1)),
        )
        candidate = rows[0] if rows else None
        if candidate is None or candidate[4] not in (None, Outcome.INTERRUPTED.value):
            self.counters.orphans += 1
            log.warn("{kind} for connection {conn} of box {box} matches no open call: ignored",
                     kind=event.kind, conn=event.conn_id, box=event.box)
            return
        call_id, direction, started_at, extension, _, answered = candidate
        if event.kind == "CONNECT":
            assert event.extension is not None
            await self._answered(Answered(call_id, event.extension, event.at))
            return
        rules = origin.rules or BoxRules(origin.name, self._zone)
        zone = rules.zone
        started_local = started_at.astimezone(zone).replace(tzinfo=None)
        outcome = decide(direction, started_local, event.local_at, event.duration,
                         extension if answered else None, rules)
        ended = Ended(call_id, outcome, event.duration, event.at, extension,
                      notes(outcome, extension, "recovered after a reconnect"))
        await self._ended(ended, origin, recovering=True)

    async def close_open_calls(self, box: str, reason: str, at: datetime,
                               started_before: datetime | None = None) -> int:
        """Close every call of ``box`` still active (left by a lost connection or a crash);
        with ``started_before``, only those that started before it (the last run's)."""
        rows = await self._store.read(
            f"SELECT d.call_id, d.extension FROM dpvoip.call_detail d JOIN {self._crm}"
            ".accounting_voipcall c ON c.call_id = d.call_id WHERE d.box = %s"
            " AND c.status = 'active' AND (%s::timestamptz IS NULL OR d.started_at < %s)",
            (box, started_before, started_before),
        )
        origin = Origin(box, Dialling())
        for call_id, extension in rows:
            await self._ended(
                Ended(call_id, Outcome.INTERRUPTED, 0, at, extension,
                      notes(Outcome.INTERRUPTED, detail=reason)),
                origin,
            )
        return len(rows)


def _chain_key(happening: Happening) -> str:
    if isinstance(happening, Unmatched):
        return f"{happening.box}:{happening.conn_id}"
    return happening.call_id

