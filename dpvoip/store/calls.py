"""Every statement of the call ingest: a call's row, its detail, its log lines, its
missed-call ticket and the CRM's sales side, each change published with NOTIFY.

The decisions are taken elsewhere (``dpvoip.core``: the tickets, the sales side, the log
lines) and arrive here as plain data; this module only turns them into statements. Each
change is one statement (or one transaction of as few round trips as the hot paths
allow), written so that replaying the same happening changes nothing: the call row is
inserted once (its id is derived from the source) and finalised only while it is active.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime, timedelta
from typing import Any, NamedTuple

from dpvoip.core.call_log import LogLine
from dpvoip.core.happenings import Answered, Ended, Forwarded, Started
from dpvoip.core.matching import Match
from dpvoip.core.numbers import is_withheld
from dpvoip.core.outcomes import Outcome
from dpvoip.core.sales import EndTouch, SalesTouch
from dpvoip.core.tickets import (
    OPEN_STATUSES,
    TICKET_ID,
    MissedCall,
    NewTicket,
    TicketFacts,
    TicketPlan,
)
from dpvoip.crm.schema import CrmCapabilities, quote_ident
from dpvoip.live import events as live
from dpvoip.store.database import Batch, Store, told
from dpvoip.store.directory import DirectoryIndex
from dpvoip.store.live import CHANNEL, announce, given_call_event, row_call_event, ticket_event
from dpvoip.store.pool import numbered, positional, statement_name
from dpvoip.zadarma.calls import ZadarmaCall
from dpvoip.zadarma.events import ZadarmaEvent

#: The channel every change of a call is published on (behaviour.md section 8); each
#: payload carries the id of its row in ``dpvoip.live_event`` (``store.live``).
NOTIFY_CHANNEL = CHANNEL
def _number_locks(numbers: str) -> str:
    """The locks on numbers that serialise the tickets of their missed calls, taken in the
    numbers' order (two transactions never wait on each other); ``numbers``: a SELECT of
    distinct numbers as ``n``."""
    return (f"SELECT pg_advisory_xact_lock(hashtext('dpvoip-ticket:' || x.n))"
            f" FROM ({numbers} ORDER BY 1) AS x")


#: The locks of incoming calls' numbers (parameter: calls, their call_ids).
_TICKET_LOCKS = _number_locks(
    "SELECT DISTINCT remote_number AS n FROM dpvoip.call_detail WHERE call_id ="
    " ANY(%(calls)s::text[]) AND direction = 'incoming' AND remote_number IS NOT NULL")


#: A call's end that may finish it again, with ``recovering`` (``CallStatements._reopen``).
_REOPENED = "d.outcome IN ('interrupted', 'blocked')"


#: The same locks for Zadarma calls' missed ends, from their numbers (parameter:
#: numbers, NULL for a withheld one).
_ZADARMA_TICKET_LOCKS = _number_locks(
    "SELECT DISTINCT n FROM unnest(%(numbers)s::text[]) AS n WHERE n IS NOT NULL")


#: ``update_date`` of a CRM row dpvoip changes, as the CRM's ``auto_now`` would set it
#: (as at the event's arrival; never backwards).
_BUMPED = "update_date = greatest(x.update_date, p.received)"
#: A Zadarma call's end once this event is written: the first end recorded stays.
_END_SO_FAR = "coalesce(v.ended_at, EXCLUDED.ended_at)"
#: A contact's or lead's name as the directory gives it (``store.directory``): the name
#: a PBX call's workflow line carries (``x``: the row).
_PERSON_NAME = ("concat_ws(' ', nullif(x.first_name, ''), nullif(x.middle_name, ''),"
                " nullif(x.last_name, ''))")


def ended_at(at: str, start: str, over: bool = False) -> str:
    """A call's end as the CRM keeps it, from SQL expressions for the time it ended (NULL:
    not over; ``over``: never NULL) and its start: never before its start, so that the
    CRM's duration is never negative."""
    end = f"greatest({at}::timestamptz, {start})"
    return end if over else f"CASE WHEN {at} IS NULL THEN NULL ELSE {end} END"


def crm_duration(at: str, start: str, over: bool = False) -> str:
    """The CRM's duration (NULL while the call is not over), exactly as its own
    ``VoIPCall.save()`` computes it: ``int((ended_at - started_at).total_seconds())``,
    truncated toward zero; so a Save in the CRM's admin changes nothing. The talk time is
    kept in dpvoip's detail row and in the call's notes."""
    return f"trunc(extract(epoch from {ended_at(at, start, over)} - {start}))::integer"


def _positional(name: str) -> str:
    """A parameter's placeholder in a statement of ``%s`` parameters (its order counts)."""
    return "%s"


def _named(name: str) -> str:
    """A parameter's placeholder in a statement of named parameters."""
    return f"%({name})s"


def payload(event: str, call_id: str, **fields: Any) -> str:
    """A live event as published on ``NOTIFY_CHANNEL``."""
    return json.dumps({"event": event, "call_id": call_id, **fields}, default=str)


def ended_payload(call_id: str, outcome: Outcome, duration: int) -> str:
    return payload("ended", call_id, status=outcome.status, outcome=outcome.value,
                   duration=duration)


#: One statement and its ``%s`` parameters, for ``_write`` or ``Batch.run_told``.
Step = tuple[str, tuple[Any, ...]]


def _rows(select: str, tell: bool) -> str:
    """A call statement's last part: ``select`` (a row for each call it changed, and the
    count of its NOTIFYs), or with ``tell`` the same told (``database.told``)."""
    return " " + (told(select) if tell else select)


class FinishingCall(NamedTuple):
    """A call about to be finalised as missed, with the facts its ticket depends on, read
    under its row lock and its number's ticket lock."""

    row: int  # the call row's id
    direction: str
    client: int | None  # the call row's client
    call: MissedCall
    facts: TicketFacts


class JournalEntry(NamedTuple):
    """A Zadarma event after it was journalled (in the transaction's first round trip)."""

    forms: list[dict[str, str]]  # every event of the call so far, in arrival order
    first_received: datetime  # when the call's first event arrived
    previous: str | None  # the call's outcome before this event
    existed: bool  # the call row existed before this event
    found: list[list[Any]] | None  # the guessed caller's directory rows (``match_of``)
    bound_elsewhere: int  # other calls the event's signed string is bound to already
    added: int | None  # the journal row this event added (None: it was there already)
    bound_now: bool  # this event bound its signed string to its call

    @property
    def fresh(self) -> bool:
        """False: the event was there already (a replay)."""
        return self.added is not None


class JournalItem(NamedTuple):
    """A Zadarma event to journal (``CallStatements.journal``)."""

    event: ZadarmaEvent
    form: Mapping[str, str]
    identity: str  # its call row's call_id
    guess: str | None  # the caller's number as the event alone shows it
    received: datetime
    signed: bytes  # the SHA-256 of its signed string
    #: An incoming call's end: its caller, whose ticket lock the group takes up front.
    ticket_caller: str | None = None


class ZadarmaRow(NamedTuple):
    """A Zadarma call as recomputed from its journal, ready to be written."""

    identity: str  # the call row's call_id
    call: ZadarmaCall
    phone: str
    number: str | None
    match: Match | None
    started: datetime  # aware
    ended: datetime | None  # aware; when the call is over
    received: datetime  # when this event arrived: the time its writes are made at
    extension: int | None
    notes: str  # the call's notes line, in the office's language
    lines: Sequence[tuple[LogLine, bool]]  # each with: only when the row is new
    ending: bool  # this event finishes the call and no ticket follows: publish the end
    touch: SalesTouch | None


class TicketQuery(NamedTuple):
    """What the ticket facts are read for: the window before the call's start, and the
    usernames whose active user ids are wanted."""

    window: timedelta
    users: Sequence[str]


class CallStatements:
    """The ingest's statements on the CRM's call tables and dpvoip's own."""

    def __init__(self, store: Store, directory: DirectoryIndex, crm_schema: str,
                 capabilities: Callable[[], CrmCapabilities]) -> None:
        self._store = store
        self._directory = directory
        self._crm = quote_ident(crm_schema)
        self._capabilities = capabilities
        self._built: dict[tuple[object, ...], str] = {}
        self._built_for: CrmCapabilities | None = None

    # -- fragments ---------------------------------------------------------------------

    def _statement(self, variant: tuple[object, ...], build: Callable[[], str]) -> str:
        """The statement ``build`` writes, built once per ``variant`` and per set of the
        CRM's optional columns: the same text object at every call saves formatting it,
        and hashing it again for the plan cache's lookup."""
        capabilities = self._capabilities()
        if capabilities is not self._built_for:
            self._built, self._built_for = {}, capabilities
        text = self._built.get(variant)
        if text is None:
            text = self._built[variant] = build()
        return text

    def _log_extras(self) -> tuple[str, str]:
        """The 2026-08 CRM's extra call-log columns, and their values from a call CTE ``c``
        (id, call_id, phone_number, client_id): both as ", a, b" fragments."""
        capabilities = self._capabilities()
        pairs = [pair for pair, present in (
            (("client_id", "c.client_id"), capabilities.call_log_client_id),
            (("call_reference", "c.call_id"), capabilities.call_log_call_reference),
            (("phone_number", "c.phone_number"), capabilities.call_log_phone_number),
        ) if present]
        return ("".join(", " + column for column, _ in pairs),
                "".join(", " + value for _, value in pairs))

    def _log_lines(self, call: str, count: int) -> str:
        """INSERT of ``count`` call-log lines for the call row of CTE ``call`` (id, call_id,
        phone_number, client_id); fills the 2026-08 CRM's extra columns when present.
        Parameters: the time the lines were written (when the event arrived), then
        action, description per line."""
        extra_columns, extra_values = self._log_extras()
        lines = ", ".join(["(%s, %s, " + str(n) + ")" for n in range(count)])
        return (
            f"INSERT INTO {self._crm}.accounting_voipcalllog (action, description, created_at,"
            f" call_id{extra_columns}) SELECT v.action, v.description, %s::timestamptz, c.id"
            f"{extra_values}"
            f" FROM {call} c CROSS JOIN (VALUES {lines}) AS v(action, description, n)"
            " ORDER BY v.n"
        )

    def _ticket_facts(self, number: str, started: str, client: str, call_id: str) -> str:
        """The facts a ticket decision needs (``TicketFacts``), as four columns, from SQL
        expressions for the call's number, start, client and call_id. The open ticket is
        locked as an UPDATE of it would lock it: it is updated in the next statement.
        Parameters: open, window, users."""
        since = f"{started} - %(window)s::interval"
        is_open = f"t.status = ANY(%(open)s::text[]) AND t.created_at > {since}"
        # The number's newest open ticket, found from the number's own calls: each call's
        # ticket looked up by its id (``OFFSET 0`` keeps that lookup per call). As a plain
        # join, the generic plan could instead walk the window's open tickets newest first
        # (``accounting_ticket (created_at DESC)``) or hash them all: a read that grew with
        # the office's open tickets (2.5 ms each with a replay's thousands, session 19).
        # Then the ticket is locked as an UPDATE would lock it, its state checked again.
        return (
            f"(SELECT t.id FROM {self._crm}.accounting_ticket t WHERE t.id = ("
            f"SELECT n.id FROM dpvoip.call_detail o CROSS JOIN LATERAL (SELECT t.id,"
            f" t.created_at FROM {self._crm}.accounting_ticket t WHERE t.id = o.ticket_id"
            f" AND {is_open} OFFSET 0) AS n WHERE o.remote_number = {number}"
            " AND o.ticket_id IS NOT NULL ORDER BY n.created_at DESC LIMIT 1)"
            f" AND {is_open} FOR NO KEY UPDATE OF t),"
            " (SELECT count(*) FROM dpvoip.call_detail m WHERE m.remote_number ="
            f" {number} AND m.direction = 'incoming' AND m.outcome IN ('missed', 'voicemail')"
            f" AND m.started_at > {since} AND m.call_id <> {call_id}),"
            f" (SELECT eponimia FROM {self._crm}.accounting_clientprofile WHERE id = {client}),"
            f" (SELECT json_object_agg(u.username, u.id) FROM {self._crm}.auth_user u"
            " WHERE u.username = ANY(%(users)s::text[]) AND u.is_active)"
        )

    @staticmethod
    def _facts_parameters(query: TicketQuery) -> dict[str, Any]:
        return {"open": list(OPEN_STATUSES), "window": query.window, "users": list(query.users)}

    @staticmethod
    def _facts(open_ticket: int | None, earlier: int, client_name: str | None,
               users: Mapping[str, int] | None) -> TicketFacts:
        return TicketFacts(open_ticket, int(earlier), client_name, dict(users or {}))

    # -- a Fritz!Box call's steps ------------------------------------------------------

    async def _write(self, batch: Batch | None, statement: str, params: tuple[Any, ...]
                     ) -> list[tuple[Any, ...]]:
        """One statement: atomic on its own, or a step of ``batch``'s transaction; either
        way planned once per connection: the server parses and plans these long
        statements once, not once per event."""
        text = numbered(statement)
        if batch is None:
            return await self._store.write_prepared(statement_name(text), text, params)
        return await batch.run_prepared(statement_name(text), text, params)

    async def write(self, batch: Batch | None, step: Step) -> bool:
        """One of the steps below, on its own (or as a step of ``batch``): whether it took
        effect. Several told steps go together with ``Batch.run_told``."""
        return bool(await self._write(batch, *step))

    def start_step(self, started: Started, source: str, number: str | None, phone: str,
                   match: Match | None, lines: Sequence[LogLine], received: datetime,
                   notes: str = "", tell: bool = False) -> Step:
        """The call row, its detail, its first log lines and the live event, in one
        statement, written as at ``received`` (when the event arrived: a replay writes
        the same row); it takes no effect when the call was there already. ``tell``: to
        be sent with others (``Batch.run_told``), as every ``_step`` may be."""
        client = match.client if match else None
        person = match.person if match else None
        # A row id reserved before (the old monitor's answer named it): inserted as given.
        given = started.row_id is not None
        statement = self._statement(("start", len(lines), given, tell), lambda: (
            f"WITH call AS (INSERT INTO {self._crm}.accounting_voipcall ({'id, ' * given}"
            "call_id, direction,"
            " phone_number, status, started_at, ended_at, duration_seconds, notes,"
            " ticket_created, ticket_id, created_at, updated_at, client_id, client_email,"
            f" resolution) VALUES ({'%s, ' * given}%s, %s, %s, 'active', %s, NULL, 0, %s,"
            " false, NULL,"
            " %s, %s, %s, %s, 'pending') ON CONFLICT (call_id) DO NOTHING"
            " RETURNING id, call_id, phone_number, client_id),"
            " detail AS (INSERT INTO dpvoip.call_detail (call_id, source, box, conn_id,"
            " direction, remote_raw, remote_number, own_number, line, extension, started_at,"
            " client_id, contact_id, lead_id, deal_id, hairpin) SELECT c.call_id, %s, %s, %s,"
            " %s, %s, %s, %s, %s, %s, %s, c.client_id, %s, %s, %s, %s FROM call c"
            " ON CONFLICT (call_id) DO NOTHING),"
            f" logs AS ({self._log_lines('call', len(lines))}),"
            f" live AS ({given_call_event('call', '%s', '%s')}),"
            f" note AS ({announce('%s', '%s')})"
            + _rows("SELECT c.id, (SELECT count(*) FROM note) FROM call c", tell)
        ))
        params = (
            *((started.row_id,) if given else ()),
            started.call_id, started.direction, phone, started.at, notes, received, received,
            client.id if client else None, client.email if client else None,
            source, started.box, started.conn_id, started.direction, started.remote,
            number, started.own_number, started.line, started.extension, started.at,
            person.id if person and person.kind == "contact" else None,
            person.id if person and person.kind == "lead" else None,
            match.deal.id if match and match.deal else None, started.hairpin, received,
            *(part for line in lines for part in (line.action, line.text)),
            live.legs(started.own_number, started.line, started.extension),
            json.dumps(live.call_data(
                call_id=started.call_id, state="ringing", direction=started.direction,
                number=number, client=live.client_of(match), extension=started.extension,
                box=started.box, at=started.at)),
            NOTIFY_CHANNEL, payload("started", started.call_id, direction=started.direction,
                                    number=phone,
                                    name=match.display_name if match else None,
                                    box=started.box),
        )
        return statement, params

    def _detail_change(self, assignment: str, condition: str, log: str,
                       event: bool = True, tell: bool = False) -> str:
        """One statement: change the detail row if it changes, log it, publish it (with
        ``event``: as a live event too, its changes the last parameter before the
        NOTIFY's)."""
        note = (f" live AS ({row_call_event(self._crm, 'call', '%s')}),"
                f" note AS ({announce('%s', '%s')})" if event
                else " note AS (SELECT pg_notify(%s, %s) FROM call)")
        return (
            f"WITH changed AS (UPDATE dpvoip.call_detail SET {assignment}, updated_at = now()"
            f" WHERE call_id = %s AND {condition} RETURNING call_id),"
            f" call AS (SELECT v.id, v.call_id, v.phone_number, v.client_id FROM"
            f" {self._crm}.accounting_voipcall v JOIN changed USING (call_id)),"
            f" logs AS ({log}),"
            f"{note}"
            + _rows("SELECT c.id, (SELECT count(*) FROM note) FROM call c", tell)
        )

    def answer_step(self, answered: Answered, line: LogLine, received: datetime,
                    tell: bool = False) -> Step:
        """The extension that took the call (the first answer's time kept); no effect
        when nothing changes."""
        statement = self._statement(("answer", tell), lambda: self._detail_change(
            "extension = %s, answered_at = coalesce(answered_at, %s)",
            "ended_at IS NULL AND extension IS DISTINCT FROM %s",
            self._log_lines("call", 1), tell=tell,
        ))
        return (statement, (
            answered.extension, answered.at, answered.call_id, answered.extension,
            received, line.action, line.text,
            json.dumps(live.answered_changes(answered.extension, answered.at)),
            NOTIFY_CHANNEL, payload("answered", answered.call_id,
                                    extension=answered.extension),
        ))

    def forward_step(self, forwarded: Forwarded, line: LogLine, received: datetime,
                     tell: bool = False) -> Step:
        """Where the box forwards the ringing call; no effect when nothing changes."""
        statement = self._statement(("forward", tell), lambda: self._detail_change(
            "forwarded_to = %s", "forwarded_to IS DISTINCT FROM %s", self._log_lines("call", 1),
            event=False,  # not a change the live events name: the call still rings
            tell=tell,
        ))
        return (statement, (
            forwarded.to_number, forwarded.call_id, forwarded.to_number,
            received, line.action, line.text,
            NOTIFY_CHANNEL, payload("forwarded", forwarded.call_id),
        ))

    @staticmethod
    def _reopen(recovering: bool) -> str:
        """A call closed as interrupted may still be finalised by its own late end; one
        recorded as blocked, by the box's call list saying it was missed (the reconciler
        decides which; a late DISCONNECT never reaches a blocked call)."""
        return f" OR {_REOPENED}" if recovering else ""

    def _finish_statement(self, recovering: bool, touch: bool = False,
                          tell: bool = False) -> str:
        return self._statement(("finish", recovering, touch, tell),
                               lambda: self._finish_sql(recovering, touch, tell))

    def _finish_sql(self, recovering: bool, touch: bool = False, tell: bool = False) -> str:
        """One statement: finalise the call row and its detail, log and publish it; with
        ``touch``, the CRM's sales side of the person its start matched rides along
        (``_touch_ctes``: its parameters come last)."""
        return (
            f"WITH updated AS (UPDATE {self._crm}.accounting_voipcall c SET status = %s,"
            f" ended_at = {ended_at('%s', 'c.started_at', over=True)}, duration_seconds ="
            f" {crm_duration('%s', 'c.started_at', over=True)}, notes = %s, updated_at = %s"
            " FROM dpvoip.call_detail d WHERE c.call_id = %s AND d.call_id = c.call_id"
            f" AND (c.status = 'active'{self._reopen(recovering)})"
            " AND d.outcome IS DISTINCT FROM %s RETURNING c.id, c.call_id, c.phone_number,"
            " c.client_id, c.ended_at"
            # The detail as it was before this statement (``d`` is only joined here).
            + (", d.direction, d.contact_id, d.lead_id, d.deal_id, d.crm_touched"
               if touch else "")
            + "),"
            " detail AS (UPDATE dpvoip.call_detail d SET outcome = %s, ended_at = u.ended_at,"
            f" talk_seconds = %s,{' crm_touched = true,' if touch else ''} updated_at = now()"
            " FROM updated u WHERE d.call_id = u.call_id),"
            f" logs AS ({self._log_lines('updated', 1)}),"
            f" live AS ({row_call_event(self._crm, 'updated', '%s')}),"
            f" note AS ({announce('%s', '%s')})"
            + (self._touch_ctes("updated", _positional) if touch else "")
            + _rows("SELECT u.id, (SELECT count(*) FROM note) FROM updated u", tell)
        )

    def _touch_ctes(self, before: str, param: Callable[[str], str]) -> str:
        """CTEs (each after a comma) writing a call's ``EndTouch`` for the contact or
        lead its start matched, from CTE ``before`` (call_id, direction, contact_id,
        lead_id, deal_id, crm_touched: the detail row as it was before the statement),
        once per call: nothing when its sales side was written already. The deal is the
        one its start recorded (the person's active deal then); the name is the
        person's as the CRM has it now (a contact or lead deleted since: no line).
        ``param`` writes a parameter's placeholder; they are, in this order:
        touch_today (NULL: not answered), touch_in_head, touch_in_tail, touch_out_head,
        touch_out_tail, touch_received (``update_date``, as the CRM's save would)."""
        names = ("touch_today", "touch_in_head", "touch_in_tail", "touch_out_head",
                 "touch_out_tail", "touch_received")
        today, in_head, in_tail, out_head, out_tail, received = (param(n) for n in names)
        crm = self._crm
        return (
            f", touch_p AS (SELECT {today}::date AS today, {in_head}::text AS in_head,"
            f" {in_tail}::text AS in_tail, {out_head}::text AS out_head,"
            f" {out_tail}::text AS out_tail, {received}::timestamptz AS received),"
            " touch_of AS (SELECT b.contact_id, b.lead_id, b.deal_id, CASE WHEN b.direction"
            " = 'outgoing' THEN p.out_head ELSE p.in_head END || coalesce("
            f"(SELECT {_PERSON_NAME} FROM {crm}.crm_contact x WHERE x.id = b.contact_id),"
            f" (SELECT coalesce(nullif({_PERSON_NAME}, ''), x.company_name) FROM"
            f" {crm}.crm_lead x WHERE x.id = b.lead_id)) || CASE WHEN b.direction ="
            " 'outgoing' THEN p.out_tail ELSE p.in_tail END AS line, p.today, p.received"
            f" FROM {before} b, touch_p p WHERE NOT b.crm_touched),"
            f" touch_contact AS (UPDATE {crm}.crm_contact x SET was_in_touch = t.today,"
            " update_date = greatest(x.update_date, t.received) FROM touch_of t"
            " WHERE x.id = t.contact_id AND t.today IS NOT NULL),"
            f" touch_lead AS (UPDATE {crm}.crm_lead x SET was_in_touch = t.today,"
            " update_date = greatest(x.update_date, t.received) FROM touch_of t"
            " WHERE x.id = t.lead_id AND t.today IS NOT NULL),"
            f" touch_deal AS (UPDATE {crm}.crm_deal x SET workflow = t.line || CASE WHEN"
            " x.workflow = '' THEN '' ELSE E'\\n' END || x.workflow,"
            " update_date = greatest(x.update_date, t.received) FROM touch_of t"
            " WHERE x.id = t.deal_id AND t.line IS NOT NULL)"
        )

    @staticmethod
    def _touch_parameters(touch: EndTouch, received: datetime) -> dict[str, Any]:
        """The values of ``_touch_ctes``' parameters, by name (in their order)."""
        return {
            "touch_today": touch.in_touch_on, "touch_in_head": touch.incoming[0],
            "touch_in_tail": touch.incoming[1], "touch_out_head": touch.outgoing[0],
            "touch_out_tail": touch.outgoing[1], "touch_received": received,
        }

    def _finish_parameters(self, ended: Ended, line: LogLine, notes: str,
                           received: datetime, touch: EndTouch | None = None
                           ) -> tuple[Any, ...]:
        return (
            ended.outcome.status, ended.at, ended.at, notes, received, ended.call_id,
            ended.outcome.value, ended.outcome.value, ended.duration,
            received, line.action, line.text,
            json.dumps(live.ended_changes(ended.outcome, ended.duration, ended.at)),
            NOTIFY_CHANNEL, ended_payload(ended.call_id, ended.outcome, ended.duration),
            *(self._touch_parameters(touch, received).values() if touch else ()),
        )

    def finish_step(self, ended: Ended, line: LogLine, notes: str, received: datetime,
                    recovering: bool = False, touch: EndTouch | None = None,
                    tell: bool = False) -> Step:
        """Finalise a call that gets no ticket, in one statement; no effect when it was
        finalised already. The CRM's duration is its own ``VoIPCall.save()``'s,
        ``int(ended_at - started_at)``; the talk time is kept in the detail row. With
        ``touch``, the CRM's sales side rides in the same statement, once per call."""
        return (self._finish_statement(recovering, touch is not None, tell),
                self._finish_parameters(ended, line, notes, received, touch))

    async def finishing_missed(self, batch: Batch, ends: Sequence[tuple[Ended, bool]],
                               query: TicketQuery) -> list[FinishingCall | None]:
        """The first round trip of missed calls' ends (each with whether it is
        ``recovering``): their numbers' ticket locks, then their call rows (locked) and
        ticket facts; for each end in order, None when its call was finalised already.

        The locks come first, in a statement of their own, taken in the numbers' order
        (two transactions that lock two numbers never wait on each other): the statement
        after it takes a new snapshot, which sees a ticket that a lock's previous holder
        (another missed call of the number ending at the same moment) has just
        committed. Both ride in one message. Two ends of one number read the same facts:
        the second's must be read again once the first's ticket is written."""
        rows = await batch.run_planned(
            self._statement(("finishing",), lambda: (
                # Each end's row found by its own index lookup (LATERAL): joined as sets,
                # under the generic plan a group's ends took longer than two round trips
                # each (``bench.replay``, session 18).
                "SELECT e.n, x.* FROM json_to_recordset(%(ends)s::json) AS e(n integer,"
                " call text, outcome text, recovering boolean) CROSS JOIN LATERAL ("
                "SELECT c.id, c.phone_number, c.client_id, d.direction,"
                " d.remote_number, d.started_at, d.own_number, d.extension, d.remote_raw, "
                + self._ticket_facts("d.remote_number", "d.started_at", "c.client_id",
                                     "c.call_id")
                + f" FROM {self._crm}.accounting_voipcall c"
                " JOIN dpvoip.call_detail d ON d.call_id = c.call_id WHERE c.call_id = e.call"
                f" AND (c.status = 'active' OR e.recovering AND {_REOPENED})"
                " AND d.outcome IS DISTINCT FROM e.outcome"
                " FOR UPDATE OF c) AS x")),
            {"calls": [ended.call_id for ended, _ in ends],
             "ends": json.dumps([{"n": n, "call": ended.call_id,
                                  "outcome": ended.outcome.value, "recovering": recovering}
                                 for n, (ended, recovering) in enumerate(ends)]),
             **self._facts_parameters(query)},
            prefix=_TICKET_LOCKS,
        )
        found: list[FinishingCall | None] = [None] * len(ends)
        for (n, row, phone, client, direction, number, started_at, own, extension, raw,
             open_ticket, earlier, client_name, users) in rows:
            found[n] = FinishingCall(row, direction, client,
                                     MissedCall(phone, number, started_at, own, extension,
                                                is_withheld(raw)),
                                     self._facts(open_ticket, earlier, client_name, users))
        return found

    @staticmethod
    def ticket_of(plan: TicketPlan, told: str) -> int | None:
        """The ticket's id, from what ``ticket_step`` told: an update's is the plan's."""
        if not isinstance(plan, NewTicket):
            return plan.ticket
        return int(told) if told else None

    def ticket_step(self, plan: TicketPlan, row: int, client: int | None, ended: Ended,
                    line: LogLine, notes: str, received: datetime,
                    touch: EndTouch | None = None) -> Step:
        """The missed call's end and its ticket (behaviour.md section 5) in one statement:
        the ticket created or updated as ``plan`` says, the call row finalised and linked
        to it, both logged and published, as at ``received``. It tells the ticket's id
        (``Batch.run_told``): a new ticket's is made by its INSERT, and the log says which
        ticket ("ticket 12 created") without a round trip more, also when the COMMIT rode
        along.

        An open ticket that had no client gets the call's (a client added to the CRM
        since the number's first missed call), and so does the call it was opened for,
        with that call's log rows: the CRM's own ``change_call_client`` keeps the call,
        its ticket and its log rows on one client.

        With ``touch`` (a PBX's call), the CRM's sales side rides along, once per call."""
        params: dict[str, Any]
        if isinstance(plan, NewTicket):
            head, _, tail = plan.log.partition(TICKET_ID)
            params = {"title": plan.title, "description": plan.description,
                      "ticket_status": plan.status, "priority": plan.priority,
                      "assignee": plan.assignee, "client": client, "head": head,
                      "tail": tail, "action": plan.log_action}
        else:
            params = {"title": plan.title, "urgent": plan.urgent, "note": plan.note,
                      "ticket": plan.ticket, "log": plan.log, "action": plan.log_action,
                      "client": client}
        new = isinstance(plan, NewTicket)
        touched = touch is not None
        if touch is not None:
            params.update(self._touch_parameters(touch, received))
        params.update({
            "row": row, "channel": NOTIFY_CHANNEL,
            "status": ended.outcome.status, "at": ended.at, "talk": ended.duration,
            "notes": notes, "outcome": ended.outcome.value, "received": received,
            "ended_action": line.action, "ended_line": line.text,
            "ended_payload": ended_payload(ended.call_id, ended.outcome, ended.duration),
            "changes": json.dumps(live.ended_changes(ended.outcome, ended.duration,
                                                     ended.at)),
        })
        text, names = positional(
            self._statement(("ticket", new, touched), lambda: self._ticket_sql(new, touched)))
        # As a step of ``%s`` parameters: its own '%' kept (``numbered`` reads '%%' as '%').
        return text.replace("%", "%%"), tuple(params[name] for name in names)

    def _ticket_sql(self, new: bool, touch: bool = False) -> str:
        """The ticket statement: a ``new`` ticket inserted (its log line gets the new id
        between ``head`` and ``tail``), or the open one updated (its notes get one more
        line, its priority turns urgent or stays); with ``touch``, the CRM's sales side
        (``_touch_ctes``)."""
        if new:
            ticket = (
                f"ticket AS (INSERT INTO {self._crm}.accounting_ticket (title, description,"
                " status, priority, notes, created_at, assigned_at, resolved_at, closed_at,"
                " email_sent, follow_up_scheduled, assigned_to_id, call_id, client_id)"
                " VALUES (%(title)s, %(description)s, %(ticket_status)s, %(priority)s, '',"
                " %(received)s, CASE WHEN %(assignee)s::integer IS NULL THEN NULL"
                " ELSE %(received)s::timestamptz END,"
                " NULL, NULL, false, false, %(assignee)s, %(row)s, %(client)s)"
                " RETURNING id, title, %(head)s || id::text || %(tail)s AS log)"
            )
            follow = ""
        else:
            ticket = (
                f"ticket AS (UPDATE {self._crm}.accounting_ticket t SET title = %(title)s,"
                " priority = CASE WHEN %(urgent)s THEN 'urgent' ELSE t.priority END,"
                " notes = CASE WHEN t.notes = '' THEN %(note)s"
                " ELSE t.notes || E'\\n' || %(note)s END,"
                " client_id = coalesce(t.client_id, %(client)s::bigint)"
                " WHERE t.id = %(ticket)s RETURNING t.id, t.title, %(log)s::text AS log,"
                " t.client_id, t.call_id AS first_call)"
            )
            follow = self._first_call_follows()
        extra_columns, extra_values = self._log_extras()
        # The ticket's live event: how many missed calls it holds with this one.
        action, count = ("'created'", "1") if new else (
            "'grouped'", "(SELECT count(*) + 1 FROM dpvoip.call_detail o"
            " WHERE o.ticket_id = s.ticket AND o.call_id <> s.call_id)")
        return (
            f"WITH {ticket},"
            f" call AS (UPDATE {self._crm}.accounting_voipcall v SET status = %(status)s,"
            f" ended_at = {ended_at('%(at)s', 'v.started_at', over=True)}, duration_seconds ="
            f" {crm_duration('%(at)s', 'v.started_at', over=True)}, notes = %(notes)s,"
            " ticket_created = true, ticket_id = t.id::text, updated_at = %(received)s"
            " FROM ticket t WHERE v.id = %(row)s RETURNING v.id, v.call_id, v.phone_number,"
            " v.client_id, v.ended_at, t.id AS ticket, t.log),"
            " detail AS (UPDATE dpvoip.call_detail d SET outcome = %(outcome)s, ended_at ="
            " c.ended_at, talk_seconds = %(talk)s, ticket_id = c.ticket,"
            f"{' crm_touched = true,' if touch else ''} updated_at = now()"
            f" FROM call c WHERE d.call_id = c.call_id),{follow}"
            f" logs AS (INSERT INTO {self._crm}.accounting_voipcalllog (action, description,"
            f" created_at, call_id{extra_columns}) SELECT line.action, line.description,"
            f" %(received)s, c.id{extra_values} FROM call c CROSS JOIN LATERAL (VALUES"
            " (0, %(ended_action)s::text, %(ended_line)s::text), (1, %(action)s::text, c.log))"
            " AS line(n, action, description) ORDER BY line.n),"
            f" live AS ({ticket_event(self._crm, 'call', action, count)}),"
            " note AS (SELECT pg_notify(%(channel)s, (CASE WHEN e.kind = 'call' THEN"
            " %(ended_payload)s::jsonb ELSE jsonb_build_object('event', %(action)s::text,"
            " 'call_id', e.call_id, 'ticket_id', (e.data->>'ticket_id')::bigint) END"
            " || jsonb_build_object('id', e.id))::text)"
            " FROM live e)"
            + (", touch_before AS (SELECT d.call_id, d.direction, d.contact_id, d.lead_id,"
               " d.deal_id, d.crm_touched FROM dpvoip.call_detail d JOIN call c"
               " ON d.call_id = c.call_id)" + self._touch_ctes("touch_before", _named)
               if touch else "")
            + _rows("SELECT c.ticket, (SELECT count(*) FROM note) FROM call c", tell=True)
        )

    def _first_call_follows(self) -> str:
        """CTEs after an open ticket's update (CTE ``ticket``: client_id, first_call): the
        call the ticket was opened for takes the ticket's client when it had none, with
        its email, its detail row and its log rows' client snapshot (2026-08 CRM)."""
        logs = (
            f" first_logs AS (UPDATE {self._crm}.accounting_voipcalllog l SET client_id ="
            " f.client_id FROM first f WHERE l.call_id = f.id"
            " AND l.client_id IS DISTINCT FROM f.client_id),"
            if self._capabilities().call_log_client_id else ""
        )
        return (
            f" first AS (UPDATE {self._crm}.accounting_voipcall f SET client_id = t.client_id,"
            f" client_email = (SELECT coalesce(p.email, '') FROM {self._crm}"
            ".accounting_clientprofile p WHERE p.id = t.client_id),"
            " updated_at = %(received)s FROM ticket t WHERE f.id = t.first_call"
            " AND f.id <> %(row)s AND f.client_id IS NULL AND t.client_id IS NOT NULL"
            " RETURNING f.id, f.call_id, f.client_id),"
            " first_detail AS (UPDATE dpvoip.call_detail d SET client_id = f.client_id,"
            " updated_at = now() FROM first f WHERE d.call_id = f.call_id),"
            + logs
        )

    # -- calls this process never saw start --------------------------------------------

    async def latest_of_connection(self, box: str, conn_id: int, since: datetime,
                                   until: datetime, batch: Batch | None = None
                                   ) -> tuple[Any, ...] | None:
        """The newest call of ``box``'s connection ``conn_id`` started in (since, until]:
        (call_id, direction, started_at, extension, outcome, answered). Within ``batch``:
        as that transaction sees it (the calls it started itself included)."""
        read = self._store.read if batch is None else batch.run
        rows = await read(
            "SELECT d.call_id, d.direction, d.started_at, d.extension, d.outcome,"
            " d.answered_at IS NOT NULL FROM dpvoip.call_detail d WHERE d.box = %s AND"
            " d.conn_id = %s AND d.started_at > %s AND d.started_at <= %s"
            " ORDER BY d.started_at DESC LIMIT 1",
            (box, conn_id, since, until),
        )
        return rows[0] if rows else None

    async def active_calls(self, box: str, started_before: datetime | None
                           ) -> list[tuple[str, int | None]]:
        """(call_id, extension) of every call of ``box`` still active (with
        ``started_before``: only of those that started before it)."""
        rows = await self._store.read(
            f"SELECT d.call_id, d.extension FROM dpvoip.call_detail d JOIN {self._crm}"
            ".accounting_voipcall c ON c.call_id = d.call_id WHERE d.box = %s"
            " AND c.status = 'active' AND (%s::timestamptz IS NULL OR d.started_at < %s)",
            (box, started_before, started_before),
        )
        return [(call_id, extension) for call_id, extension in rows]

    # -- Zadarma -----------------------------------------------------------------------

    async def journal(self, batch: Batch, items: Sequence[JournalItem]
                      ) -> list[JournalEntry]:
        """One round trip for a group of events (at most one per call and one per signed
        string: each is judged against what was committed before the group): the locks
        of their calls, signed strings and ending callers' tickets (all at once and
        sorted, so that two groups never wait on each other: the ticket lock taken again
        by a missed end's statement is held already), then (a new statement, so a new
        snapshot that sees what the locks' previous holders committed) every event's
        journal entry, its signed string's binding to its call (when it has none yet), its
        call's journal, the other calls its string is bound to, and its guessed caller's
        directory entries.

        The entries and bindings are written before the caller has judged the events
        (``dpvoip.zadarma.guard``): a refused event's are taken back (``unjournal``) in
        the group's next statement, without undoing the rest of the group."""
        rows = await batch.run_planned(
            self._statement(("journal",), self._journal_sql),
            {"events": json.dumps([
                {"n": n, "pbx": item.event.pbx_call_id, "event": item.event.kind,
                 "calltype": item.event.calltype, "internal": item.event.internal,
                 "destination": item.event.destination, "form": dict(item.form),
                 "call": item.identity, "number": item.guess,
                 "received": item.received.isoformat(), "signed": item.signed.hex()}
                for n, item in enumerate(items)]),
             "locks": sorted({key for item in items for key in (
                 f"dpvoip-zadarma:{item.event.pbx_call_id}",
                 f"dpvoip-signed:{item.signed.hex()}",
                 *((f"dpvoip-ticket:{item.ticket_caller}",) if item.ticket_caller else ()))
             })},
            prefix=("SELECT pg_advisory_xact_lock(k) FROM (SELECT DISTINCT hashtext(k) AS k"
                    " FROM unnest(%(locks)s::text[]) AS k ORDER BY 1 OFFSET 0) AS s"),
        )
        return [JournalEntry(forms, first, previous, bool(existed), found, int(others), added,
                             bool(bound_now))
                for _, added, forms, first, previous, existed, found, others, bound_now
                in rows]

    def _journal_sql(self) -> str:
        # The events are ``ev`` (the directory's lookup, correlated on ``ev.number``,
        # names its own tables ``p`` and ``c``).
        return (
            "WITH ev AS (SELECT * FROM json_to_recordset(%(events)s::json) AS ev(n integer,"
            " pbx text, event text, calltype text, internal text, destination text,"
            " form jsonb, call text, number text, received timestamptz, signed text)),"
            " added AS (INSERT INTO dpvoip.zadarma_event (pbx_call_id, event, calltype,"
            " internal, destination, form, received_at) SELECT ev.pbx, ev.event,"
            " ev.calltype, ev.internal, ev.destination, ev.form, ev.received FROM ev"
            " ORDER BY ev.n ON CONFLICT DO NOTHING RETURNING id, pbx_call_id, form,"
            " received_at),"
            " bind AS (INSERT INTO dpvoip.zadarma_binding (signed_sha256, pbx_call_id)"
            " SELECT decode(ev.signed, 'hex'), ev.pbx FROM ev ON CONFLICT DO NOTHING"
            " RETURNING pbx_call_id)"
            # Every part reads per event (correlated, by index): the planner takes a
            # recordset for a hundred rows, and would otherwise scan whole tables once.
            " SELECT ev.n, a.id, j.forms, j.first,"
            " (SELECT outcome FROM dpvoip.call_detail WHERE call_id = ev.call),"
            f" coalesce((SELECT true FROM {self._crm}.accounting_voipcall"
            " WHERE call_id = ev.call LIMIT 1), false),"
            f" {self._directory.lookup_of('ev.number')},"
            " (SELECT count(*) FROM dpvoip.zadarma_binding b WHERE b.signed_sha256 ="
            " decode(ev.signed, 'hex') AND b.pbx_call_id <> ev.pbx),"
            " EXISTS (SELECT 1 FROM bind WHERE bind.pbx_call_id = ev.pbx)"
            " FROM ev LEFT JOIN added a ON a.pbx_call_id = ev.pbx"
            " CROSS JOIN LATERAL (SELECT json_agg(e.form ORDER BY e.id) AS forms,"
            " min(e.received_at) AS first FROM (SELECT id, form, received_at"
            " FROM dpvoip.zadarma_event WHERE pbx_call_id = ev.pbx UNION ALL"
            " SELECT a.id, a.form, a.received_at WHERE a.id IS NOT NULL) AS e) AS j"
            " ORDER BY ev.n"
        )

    @staticmethod
    def unjournal(item: JournalItem, entry: JournalEntry) -> tuple[str, dict[str, Any]]:
        """The statement that takes back a refused event's journal entry and the binding
        it made (to ride along with the group's next statement: ``run_planned_together``)."""
        return ("WITH event AS (DELETE FROM dpvoip.zadarma_event WHERE id = %(id)s)"
                " DELETE FROM dpvoip.zadarma_binding WHERE %(bound)s AND signed_sha256 ="
                " %(signed)s AND pbx_call_id = %(pbx)s",
                {"id": entry.added, "bound": entry.bound_now, "signed": item.signed,
                 "pbx": item.event.pbx_call_id})

    def zadarma_statement(self, row: ZadarmaRow) -> tuple[str, dict[str, Any]]:
        """A Zadarma call's statement: the call row, its detail, its log lines, the live
        event and the CRM's sales side, to ride along with a group's others
        (``run_planned_together``). Times are the row's; its id comes back."""
        return self._statement(("zadarma",), self._zadarma_sql), self._zadarma_parameters(row)

    async def zadarma_missed(self, batch: Batch, rows: Sequence[ZadarmaRow],
                             query: TicketQuery) -> list[tuple[int, TicketFacts]]:
        """Zadarma calls whose end gets a ticket, of different numbers: their call
        statements (``zadarma_statement``), their numbers' ticket locks (in the numbers'
        order) and then their ticket facts, in ONE message; for each, its call row's id
        and its facts. The facts statement takes a new snapshot after the locks: it sees
        a ticket that a lock's previous holder has just committed."""
        ends = [{"n": n, "id": row.identity, "number": row.number,
                 "started": row.started.isoformat(),
                 "client": row.match.client.id if row.match and row.match.client else None}
                for n, row in enumerate(rows)]
        found = await batch.run_planned_together([
            *(self.zadarma_statement(row) for row in rows),
            (_ZADARMA_TICKET_LOCKS, {"numbers": [row.number for row in rows]}),
            (self._statement(("zadarma facts",), lambda: (
                "SELECT e.n, (SELECT c.id FROM"
                f" {self._crm}.accounting_voipcall c WHERE c.call_id = e.id), "
                + self._ticket_facts("e.number", "e.started", "e.client", "e.id")
                + " FROM json_to_recordset(%(ends)s::json) AS e(n integer, id text,"
                " number text, started timestamptz, client bigint) ORDER BY e.n")),
             {"ends": json.dumps(ends), **self._facts_parameters(query)}),
        ])
        if len(found) != len(rows):
            raise RuntimeError(f"{len(rows)} Zadarma calls, {len(found)} rows")
        return [(int(row_id), self._facts(open_ticket, earlier, client_name, users))
                for _, row_id, open_ticket, earlier, client_name, users in found]

    def _zadarma_parameters(self, row: ZadarmaRow) -> dict[str, Any]:
        call, match, outcome = row.call, row.match, row.call.outcome
        client = match.client if match else None
        person = match.person if match else None
        touch = row.touch
        # The values travel as one JSON document (``p``) and the log lines as a JSON
        # array: psycopg2 quotes each parameter on its own, which cost more CPU than the
        # rest of the statement when they were forty.
        values = {
            "id": row.identity, "direction": call.direction, "phone": row.phone,
            "status": outcome.status if outcome else "active",
            "started": row.started.isoformat(),
            "ended": row.ended.isoformat() if row.ended is not None else None,
            "received": row.received.isoformat(),
            "final": outcome is not None, "talk": call.duration if outcome else None,
            "notes": row.notes,
            "client": client.id if client else None, "email": client.email if client else None,
            "remote": call.remote, "number": row.number, "own": call.own_number,
            "extension": row.extension, "outcome": outcome.value if outcome else None,
            "contact": person.id if person and person.kind == "contact" else None,
            "lead": person.id if person and person.kind == "lead" else None,
            "deal": match.deal.id if match and match.deal else None,
            "pbx": call.pbx_call_id, "disposition": call.disposition or None,
            "calltype": "callback" if call.callback else "normal",
            "recording": call.recording, "channel": NOTIFY_CHANNEL,
            "started_payload": payload("started", row.identity, direction=call.direction,
                                       number=row.phone,
                                       name=match.display_name if match else None),
            "ended_payload": (ended_payload(row.identity, outcome, call.duration)
                              if outcome else ""),
            "ending": row.ending,
            # The live event: none for the end a ticket statement finishes next (it
            # publishes the end), and none when nothing the event shows changed.
            "live": live.call_data(
                call_id=row.identity, state=live.call_state(call.answered, outcome),
                direction=call.direction, number=row.number,
                client=live.client_of(match), extension=row.extension, box="zadarma",
                at=row.ended if outcome is not None and row.ended else row.received,
                outcome=outcome, duration=call.duration if outcome else None),
            "legs": live.legs(call.own_number, row.extension),
            "touch": touch is not None,
            "today": (touch.in_touch_on.isoformat()
                      if touch is not None and touch.in_touch_on is not None else None),
            "answered": touch is not None and touch.in_touch_on is not None,
            "line": touch.workflow_line if touch is not None else None,
        }
        return {"values": json.dumps(values),
                "lines": json.dumps([{"action": line.action, "description": line.text,
                                      "only_new": only, "n": n}
                                     for n, (line, only) in enumerate(row.lines)])}

    def _zadarma_sql(self) -> str:
        """The Zadarma call statement."""
        extra_columns, extra_values = self._log_extras()
        return (
            "WITH p AS (SELECT * FROM json_to_record(%(values)s::json) AS p(id text,"
            " direction text, phone text, status text, started timestamptz,"
            " ended timestamptz, received timestamptz, final boolean,"
            " talk integer, notes text, client bigint, email text, remote text,"
            " number text, own text, extension integer, outcome text, contact bigint,"
            " lead bigint, deal bigint, pbx text, disposition text, calltype text,"
            " recording text, channel text, started_payload text, ended_payload text,"
            " ending boolean, live jsonb, legs text[], touch boolean, today date,"
            " answered boolean, line text)),"
            f" call AS (INSERT INTO {self._crm}.accounting_voipcall AS v (call_id,"
            " direction, phone_number, status, started_at, ended_at, duration_seconds, notes,"
            " ticket_created, ticket_id, created_at, updated_at, client_id, client_email,"
            " resolution) SELECT p.id, p.direction, p.phone, p.status, p.started,"
            f" {ended_at('p.ended', 'p.started')},"
            f" coalesce({crm_duration('p.ended', 'p.started')}, 0),"
            " p.notes, false, NULL, p.received, p.received, p.client, p.email, 'pending'"
            " FROM p ON CONFLICT (call_id) DO UPDATE SET"
            " direction = EXCLUDED.direction, phone_number = EXCLUDED.phone_number,"
            " status = EXCLUDED.status, started_at = EXCLUDED.started_at,"
            f" ended_at = {ended_at(_END_SO_FAR, 'EXCLUDED.started_at')},"
            f" duration_seconds = coalesce({crm_duration(_END_SO_FAR, 'EXCLUDED.started_at')},"
            " 0),"
            " notes = EXCLUDED.notes,"
            " client_id = coalesce(EXCLUDED.client_id, v.client_id),"
            " client_email = coalesce(EXCLUDED.client_email, v.client_email),"
            " updated_at = EXCLUDED.updated_at RETURNING v.id, v.call_id, v.phone_number,"
            " v.client_id, (xmax = 0) AS inserted),"
            # The CRM's sales side, once per call (read before this statement's own write
            # to the detail row: every part of one statement sees the same snapshot).
            " touch AS (SELECT p.touch AND NOT coalesce((SELECT d.crm_touched"
            " FROM dpvoip.call_detail d WHERE d.call_id = p.id), false) AS go FROM p),"
            " detail AS (INSERT INTO dpvoip.call_detail AS d (call_id, source, direction,"
            " remote_raw, remote_number, own_number, extension, started_at, ended_at, outcome,"
            " client_id, contact_id, lead_id, deal_id, pbx_call_id, disposition, calltype,"
            " recording, crm_touched, talk_seconds) SELECT p.id, 'zadarma', p.direction,"
            " p.remote, p.number, p.own, p.extension, p.started,"
            f" {ended_at('p.ended', 'p.started')},"
            " p.outcome, p.client, p.contact, p.lead, p.deal, p.pbx, p.disposition,"
            " p.calltype, p.recording, p.touch, p.talk FROM p"
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
            " talk_seconds = coalesce(EXCLUDED.talk_seconds, d.talk_seconds),"
            " updated_at = now()),"
            # The CRM's save() bumps update_date (auto_now) on every change of these rows.
            f" contact AS (UPDATE {self._crm}.crm_contact x SET was_in_touch = p.today,"
            f" {_BUMPED} FROM p, touch WHERE x.id = p.contact AND p.answered AND touch.go"
            " RETURNING x.id),"
            f" lead AS (UPDATE {self._crm}.crm_lead x SET was_in_touch = p.today, {_BUMPED}"
            " FROM p, touch WHERE x.id = p.lead AND p.answered AND touch.go RETURNING x.id),"
            f" deal AS (UPDATE {self._crm}.crm_deal x SET workflow = p.line || CASE WHEN"
            f" x.workflow = '' THEN '' ELSE E'\\n' END || x.workflow, {_BUMPED} FROM p, touch"
            " WHERE x.id = p.deal AND touch.go RETURNING x.id),"
            f"{self._logs_follow()}"
            f" logs AS (INSERT INTO {self._crm}.accounting_voipcalllog (action, description,"
            f" created_at, call_id{extra_columns}) SELECT l.action, l.description, p.received,"
            f" c.id{extra_values} FROM p, call c CROSS JOIN json_to_recordset(%(lines)s::json)"
            " AS l(action text, description text, only_new boolean, n integer)"
            " WHERE c.inserted OR NOT l.only_new ORDER BY l.n),"
            " live AS (INSERT INTO dpvoip.live_event (kind, call_id, legs, data)"
            " SELECT 'call', p.id, p.legs, p.live FROM p, call c"
            " WHERE (p.outcome IS NULL OR p.ending) AND NOT EXISTS (SELECT 1 FROM"
            " (SELECT e.data FROM dpvoip.live_event e WHERE e.call_id = p.id"
            " ORDER BY e.id DESC LIMIT 1) AS x WHERE x.data - 'at' = p.live - 'at')"
            " RETURNING id),"
            " note AS (SELECT pg_notify(p.channel, (CASE WHEN c.inserted THEN"
            " p.started_payload::jsonb WHEN p.ending THEN p.ended_payload::jsonb"
            " ELSE jsonb_build_object('event', 'changed', 'call_id', p.id) END"
            " || jsonb_build_object('id', l.id))::text) FROM live l, call c, p)"
            # (The UPDATEs run unreferenced; the NOTIFY, a plain SELECT, only when read.)
            " SELECT id, (SELECT count(*) FROM note) FROM call"
        )

    def _logs_follow(self) -> str:
        """CTEs after the Zadarma call's upsert (CTE ``call``): when this event changed the
        call's number or client (a callback's customer leg, a client added to the CRM),
        its earlier log rows' snapshot columns (2026-08 CRM) and its ticket, when that
        had no client, follow it, as the CRM's own ``change_call_client`` does."""
        capabilities = self._capabilities()
        pairs = [assignment for assignment, present in (
            ("client_id = c.client_id", capabilities.call_log_client_id),
            ("phone_number = c.phone_number", capabilities.call_log_phone_number),
        ) if present]
        logs = (
            f" log_follow AS (UPDATE {self._crm}.accounting_voipcalllog l SET"
            f" {', '.join(pairs)} FROM call c WHERE l.call_id = c.id AND NOT c.inserted"
            " AND (" + " OR ".join(
                f"l.{a.split(' = ')[0]} IS DISTINCT FROM {a.split(' = ')[1]}" for a in pairs)
            + ")),"
            if pairs else ""
        )
        return (
            logs
            + f" ticket_follow AS (UPDATE {self._crm}.accounting_ticket t SET client_id ="
            " c.client_id FROM call c WHERE t.call_id = c.id AND NOT c.inserted"
            " AND t.client_id IS NULL AND c.client_id IS NOT NULL),"
        )

    async def callback_requests(self, batch: Batch, phones: Sequence[str],
                                numbers: Sequence[str], around: datetime
                                ) -> list[tuple[str, str]]:
        """(from_number, number_dialled) of the click-to-call requests dpvoip made, newest
        first, in the minutes before ``around`` (when the call's first event arrived), that
        ring one of ``phones`` (the user's leg) or dial one of ``numbers`` (the customer's):
        Zadarma's callback answer carries no call id, so its legs are found by the phones
        rung and the time (zadarma.md 2.2)."""
        if not phones and not numbers:
            return []
        found = await batch.run(
            "SELECT from_number, number_dialled FROM dpvoip.callback_request"
            " WHERE (from_number = ANY(%s::text[]) OR number_dialled = ANY(%s::text[]))"
            " AND result = 'dialled' AND number_dialled IS NOT NULL"
            " AND requested_at BETWEEN %s::timestamptz - interval '10 minutes'"
            " AND %s::timestamptz + interval '1 minute' ORDER BY requested_at DESC LIMIT 20",
            (list(phones), list(numbers), around, around))
        return [(str(phone or ""), str(number)) for phone, number in found]

    async def owner_extension(self, batch: Batch, owner_id: int) -> str:
        """The extension (pbx_number) of the CRM user who owns a contact or lead, '' when
        the user has none."""
        found = await batch.run(
            f"SELECT pbx_number FROM {self._crm}.common_userprofile WHERE user_id = %s"
            " AND pbx_number <> ''", (owner_id,))
        return str(found[0][0]) if found else ""
