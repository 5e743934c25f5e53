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
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

from twisted.internet.defer import Deferred
from twisted.logger import Logger

from dpvoip.config import TicketSettings
from dpvoip.crm_schema import CrmCapabilities, quote_ident
from dpvoip.directory import Match
from dpvoip.directory_index import DirectoryIndex
from dpvoip.numbers import Dialling, is_withheld, normalise
from dpvoip.outcomes import Outcome, notes, talk_time
from dpvoip.store import Store
from dpvoip.texts import Texts, grouped_title, missed_title
from dpvoip.tracker import (
    Answered,
    BoxRules,
    Ended,
    Forwarded,
    Happening,
    Started,
    Unmatched,
    decide,
)

log = Logger(namespace="dpvoip.ingest")

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


@dataclass
class IngestCounters:
    calls_started: int = 0
    calls_ended: int = 0
    tickets_created: int = 0
    tickets_updated: int = 0
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
        crm_schema: str = "public",
    ) -> None:
        self._store = store
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
        key = _chain_key(happening)
        previous = self._chains.get(key)
        done: Deferred[None] = Deferred()  # fires, never fails, when this one is through
        self._chains[key] = done

        async def run() -> None:
            if previous is not None:
                await previous
            try:
                await self._apply(happening, origin)
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

    # -- the CRM's call log ------------------------------------------------------------------

    @property
    def _capabilities(self) -> CrmCapabilities:
        schema = self._store.schema
        return schema.crm if schema is not None else CrmCapabilities()

    async def _log(self, cursor: Any, row: tuple[int, str, str, int | None], action: str,
                   description: str) -> None:
        """One line of the CRM's call log; fills the 2026-08 CRM's extra columns."""
        row_id, reference, phone, client_id = row
        columns = ["action", "description", "created_at", "call_id"]
        values: list[Any] = [action, description, row_id]
        capabilities = self._capabilities
        if capabilities.call_log_client_id:
            columns.append("client_id")
            values.append(client_id)
        if capabilities.call_log_call_reference:
            columns.append("call_reference")
            values.append(reference)
        if capabilities.call_log_phone_number:
            columns.append("phone_number")
            values.append(phone)
        placeholders = ["%s", "%s", "now()", *(["%s"] * (len(columns) - 3))]
        await cursor.execute(
            f"INSERT INTO {self._crm}.accounting_voipcalllog ({', '.join(columns)})"
            f" VALUES ({', '.join(placeholders)})",
            values,
        )

    async def _notify(self, cursor: Any, event: str, call_id: str, **fields: Any) -> None:
        payload = json.dumps({"event": event, "call_id": call_id, **fields}, default=str)
        await cursor.execute("SELECT pg_notify(%s, %s)", (NOTIFY_CHANNEL, payload))

    # -- happenings --------------------------------------------------------------------------

    async def _started(self, started: Started, origin: Origin) -> None:
        number = None if started.hairpin else normalise(started.remote, origin.where)
        match = await self._directory.lookup(number) if number else None
        phone = "" if started.hairpin else remote_column(started.remote, number)
        client = match.client if match else None
        person = match.person if match else None

        async def write(cursor: Any) -> bool:
            await cursor.execute(
                f"INSERT INTO {self._crm}.accounting_voipcall (call_id, direction,"
                " phone_number, status, started_at, ended_at, duration_seconds, notes,"
                " ticket_created, ticket_id, created_at, updated_at, client_id, client_email,"
                " resolution) VALUES (%s, %s, %s, 'active', %s, NULL, 0, %s, false, NULL,"
                " now(), now(), %s, %s, 'pending') ON CONFLICT (call_id) DO NOTHING"
                " RETURNING id",
                (started.call_id, started.direction, phone, started.at,
                 "internal call to an own number" if started.hairpin else "",
                 client.id if client else None, client.email if client else None),
            )
            inserted = cursor.fetchone()
            if inserted is None:
                return False  # a replay: the call is there already
            row = (inserted[0], started.call_id, phone, client.id if client else None)
            await cursor.execute(
                "INSERT INTO dpvoip.call_detail (call_id, source, box, conn_id, direction,"
                " remote_raw, remote_number, own_number, line, extension, started_at,"
                " client_id, contact_id, lead_id, deal_id, hairpin) VALUES (%s, %s, %s, %s,"
                " %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)"
                " ON CONFLICT (call_id) DO NOTHING",
                (started.call_id, origin.source, started.box, started.conn_id,
                 started.direction, started.remote, number, started.own_number, started.line,
                 started.extension, started.at, client.id if client else None,
                 person.id if person and person.kind == "contact" else None,
                 person.id if person and person.kind == "lead" else None,
                 match.deal.id if match and match.deal else None, started.hairpin),
            )
            shown = phone or self._texts("withheld")
            name = match.display_name if match else self._texts("unknown")
            await self._log(cursor, row, "started",
                            self._texts(f"started_{started.direction}", number=shown,
                                        name=name))
            if match is not None:
                await self._log(cursor, row, "client_matched", self._matched_text(match))
            await self._notify(cursor, "started", started.call_id, direction=started.direction,
                               number=phone, name=match.display_name if match else None,
                               box=started.box)
            return True

        if await self._store.write(write):
            self.counters.calls_started += 1
        else:
            self.counters.replays_ignored += 1

    def _matched_text(self, match: Match) -> str:
        if match.client is not None:
            return self._texts("client_matched", kind="client", name=match.client.name,
                               id=match.client.id)
        if match.person is not None:
            return self._texts("client_matched", kind=match.person.kind,
                               name=match.person.name, id=match.person.id)
        return self._texts("client_matched", kind="company", name=match.company_name or "",
                           id="-")

    async def _call_row(self, cursor: Any, call_id: str) -> tuple[int, str, str, int | None]:
        await cursor.execute(
            f"SELECT id, call_id, phone_number, client_id FROM {self._crm}.accounting_voipcall"
            " WHERE call_id = %s",
            (call_id,),
        )
        found = cursor.fetchone()
        if found is None:
            raise LookupError(f"call {call_id} has no row")
        return (found[0], found[1], found[2], found[3])

    async def _answered(self, answered: Answered) -> None:
        async def write(cursor: Any) -> None:
            await cursor.execute(
                "UPDATE dpvoip.call_detail SET extension = %s, answered_at ="
                " coalesce(answered_at, %s), updated_at = now() WHERE call_id = %s"
                " AND ended_at IS NULL AND extension IS DISTINCT FROM %s RETURNING call_id",
                (answered.extension, answered.at, answered.call_id, answered.extension),
            )
            if cursor.fetchone() is None:
                self.counters.replays_ignored += 1
                return
            row = await self._call_row(cursor, answered.call_id)
            key = "transferred" if answered.transfer else "answered"
            await self._log(cursor, row, "status_changed",
                            self._texts(key, extension=answered.extension))
            await self._notify(cursor, "answered", answered.call_id,
                               extension=answered.extension)

        await self._store.write(write)

    async def _forwarded(self, forwarded: Forwarded) -> None:
        async def write(cursor: Any) -> None:
            await cursor.execute(
                "UPDATE dpvoip.call_detail SET forwarded_to = %s, updated_at = now()"
                " WHERE call_id = %s AND forwarded_to IS DISTINCT FROM %s RETURNING call_id",
                (forwarded.to_number, forwarded.call_id, forwarded.to_number),
            )
            if cursor.fetchone() is None:
                return
            row = await self._call_row(cursor, forwarded.call_id)
            await self._log(cursor, row, "status_changed",
                            self._texts("forwarded", number=forwarded.to_number))

        await self._store.write(write)

    async def _ended(self, ended: Ended, origin: Origin, recovering: bool = False) -> None:
        async def write(cursor: Any) -> bool:
            return await self._finish(cursor, ended, origin, recovering)

        if await self._store.write(write):
            self.counters.calls_ended += 1
        else:
            self.counters.replays_ignored += 1

    async def _finish(self, cursor: Any, ended: Ended, origin: Origin,
                      recovering: bool) -> bool:
        """Finalise the call row, log it, apply the ticket rule: one transaction."""
        reopen = " OR d.outcome = 'interrupted'" if recovering else ""
        await cursor.execute(
            f"UPDATE {self._crm}.accounting_voipcall c SET status = %s, ended_at = %s,"
            " duration_seconds = %s, notes = %s, updated_at = now()"
            " FROM dpvoip.call_detail d WHERE c.call_id = %s AND d.call_id = c.call_id"
            f" AND (c.status = 'active'{reopen}) AND d.outcome IS DISTINCT FROM %s"
            " RETURNING c.id, c.phone_number, c.client_id, d.direction, d.remote_number,"
            " d.started_at, d.own_number, d.extension",
            (ended.outcome.status, ended.at, ended.duration, ended.notes, ended.call_id,
             ended.outcome.value),
        )
        found = cursor.fetchone()
        if found is None:
            return False
        row_id, phone, client_id, direction, number, started_at, own, extension = found
        await cursor.execute(
            "UPDATE dpvoip.call_detail SET outcome = %s, ended_at = %s, updated_at = now()"
            " WHERE call_id = %s",
            (ended.outcome.value, ended.at, ended.call_id),
        )
        row = (row_id, ended.call_id, phone, client_id)
        await self._log(cursor, row, "ended", self._texts(
            "ended", notes=ended.notes, talk=talk_time(ended.duration)))
        await self._notify(cursor, "ended", ended.call_id, status=ended.outcome.status,
                           outcome=ended.outcome.value, duration=ended.duration)
        if ended.outcome.wants_ticket(direction) and (phone or self._tickets.withheld):
            await self._ticket(cursor, row, number or phone, started_at, own,
                               extension if extension is not None else ended.extension,
                               origin)
        return True

    async def _ticket(self, cursor: Any, row: tuple[int, str, str, int | None], number: str,
                      started_at: datetime, own_number: str, extension: int | None,
                      origin: Origin) -> None:
        """The missed-call ticket rule of behaviour.md section 5, inside the call's
        transaction."""
        row_id, call_id, phone, client_id = row
        local = started_at.astimezone(self._zone)
        ticket = None
        count = 1
        if number:
            await cursor.execute("SELECT pg_advisory_xact_lock(hashtext(%s))",
                                 (f"dpvoip-ticket:{number}",))
            await cursor.execute(
                f"SELECT t.id, t.priority FROM dpvoip.call_detail d JOIN {self._crm}"
                ".accounting_ticket t ON t.id = d.ticket_id WHERE d.remote_number = %s"
                " AND d.ticket_id IS NOT NULL AND t.status = ANY(%s) AND t.created_at > %s"
                " ORDER BY t.created_at DESC LIMIT 1 FOR UPDATE OF t",
                (number, list(_OPEN_TICKET),
                 started_at - timedelta(hours=self._tickets.group_hours)),
            )
            ticket = cursor.fetchone()
            await cursor.execute(
                "SELECT count(*) FROM dpvoip.call_detail WHERE remote_number = %s AND"
                " direction = 'incoming' AND outcome IN ('missed', 'voicemail')"
                " AND started_at > %s",
                (number, started_at - timedelta(hours=self._tickets.group_hours)),
            )
            count = int(cursor.fetchone()[0])
        shown = phone or self._texts("withheld")
        if ticket is not None:
            ticket_id = int(ticket[0])
            title = grouped_title(count, shown)
            priority = "urgent" if count >= self._tickets.urgent_at else ticket[1]
            note = self._texts("ticket_note", time=f"{local:%d/%m %H:%M}", count=count)
            await cursor.execute(
                f"UPDATE {self._crm}.accounting_ticket SET title = %s, priority = %s,"
                " notes = CASE WHEN notes = '' THEN %s ELSE notes || E'\\n' || %s END"
                " WHERE id = %s",
                (title, priority, note, note, ticket_id),
            )
            action = "ticket_updated"
            self.counters.tickets_updated += 1
        else:
            client_name = await self._client_name(cursor, client_id)
            title = missed_title(shown, client_name)
            description = self._texts(
                "ticket_description", number=shown,
                client=f" ({client_name})" if client_name else "",
                time=f"{local:%d/%m/%Y %H:%M}",
            )
            assignee = await self._assignee(cursor, own_number, extension, origin)
            await cursor.execute(
                f"INSERT INTO {self._crm}.accounting_ticket (title, description, status,"
                " priority, notes, created_at, assigned_at, resolved_at, closed_at,"
                " email_sent, follow_up_scheduled, assigned_to_id, call_id, client_id)"
                " VALUES (%s, %s, %s, 'high', '', now(), %s, NULL, NULL, false, false, %s,"
                " %s, %s) RETURNING id",
                (title, description, "assigned" if assignee else "open",
                 datetime.now(self._zone) if assignee else None, assignee, row_id,
                 client_id),
            )
            ticket_id = int(cursor.fetchone()[0])
            action = "ticket_created"
            self.counters.tickets_created += 1
        await cursor.execute(
            f"UPDATE {self._crm}.accounting_voipcall SET ticket_created = true,"
            " ticket_id = %s, updated_at = now() WHERE id = %s",
            (str(ticket_id), row_id),
        )
        await cursor.execute(
            "UPDATE dpvoip.call_detail SET ticket_id = %s WHERE call_id = %s",
            (ticket_id, call_id),
        )
        await self._log(cursor, row, action, self._texts(action, id=ticket_id, title=title))
        await self._notify(cursor, action, call_id, ticket_id=ticket_id)

    async def _client_name(self, cursor: Any, client_id: int | None) -> str | None:
        if client_id is None:
            return None
        await cursor.execute(
            f"SELECT eponimia FROM {self._crm}.accounting_clientprofile WHERE id = %s",
            (client_id,),
        )
        found = cursor.fetchone()
        return str(found[0]) if found else None

    async def _assignee(self, cursor: Any, own_number: str, extension: int | None,
                        origin: Origin) -> int | None:
        """The CRM user a ticket goes to, by the called own number or the extension."""
        username = None
        if extension is not None:
            username = self._tickets.assign_by_extension.get(str(extension))
        if username is None and own_number:
            wanted = normalise(own_number, origin.where) or own_number
            for configured, user in self._tickets.assign_by_number.items():
                if (normalise(configured, origin.where) or configured) == wanted:
                    username = user
                    break
        if username is None:
            return None
        await cursor.execute(
            f"SELECT id FROM {self._crm}.auth_user WHERE username = %s AND is_active",
            (username,),
        )
        found = cursor.fetchone()
        if found is None:
            log.warn("ticket assignment: no active CRM user {username!r}", username=username)
            return None
        return int(found[0])

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

    async def close_open_calls(self, box: str, reason: str, at: datetime) -> int:
        """Close every call of ``box`` still active (left by a lost connection or a crash)."""
        rows = await self._store.read(
            f"SELECT d.call_id, d.extension FROM dpvoip.call_detail d JOIN {self._crm}"
            ".accounting_voipcall c ON c.call_id = d.call_id WHERE d.box = %s"
            " AND c.status = 'active'",
            (box,),
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


Apply = Callable[[Happening, Origin], Awaitable[None]]
