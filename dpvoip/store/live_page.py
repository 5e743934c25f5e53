"""What the live page (``GET /voip/``) shows when it is opened: every statement it reads.

One snapshot, read in one transaction so that its parts agree: the calls in progress,
the calls of today that ended, the open missed-call tickets with how many calls each
holds, and each Fritz!Box's connection state (``dpvoip.box_status``). Afterwards the
page follows the event stream (``/voip/events``); this module only reads.

The rows are the CRM's (``accounting_voipcall``, ``accounting_ticket``,
``accounting_clientprofile``: the same columns in both CRM versions) with dpvoip's
``call_detail`` beside them for what the CRM has no column for (the caller's number in
E.164, the extension, the outcome, the box, the talk time). A call the CRM wrote itself,
without a detail row, is shown from its own columns.

Who sees what: ``viewer`` None sees every call; a CRM user's id sees only the calls one of
whose office-side numbers (the line, the own number called, the extension that took it,
a Zadarma leg) is the number of one of the user's active ``voip_connection`` rows, and
the tickets of those calls. Numbers are compared by their digits, the last nine when
both are that long, as click-to-call's recordings do (``store.callbacks``).
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from dpvoip.crm.schema import quote_ident
from dpvoip.live.snapshot import (
    Client,
    LiveBox,
    LiveCall,
    LiveTicket,
    Ringing,
    Snapshot,
    Viewer,
)
from dpvoip.store.database import Store
from dpvoip.store.live import EVENT_WINDOW

#: A call still "active" after this long is a row a crash left open, not a call in
#: progress: the page does not show it (``dpvoip check`` and the box's call list do).
STALE_ACTIVE = "12 hours"
#: The calls in progress (a crash's leftovers excepted); ``d`` its detail, if any.
_IN_PROGRESS = (f"v.status = 'active' AND v.ended_at IS NULL AND v.started_at > now()"
                f" - interval '{STALE_ACTIVE}'")
#: The CRM's ticket statuses that are still open.
OPEN_TICKETS = ("open", "assigned", "in_progress")


class LivePageReads:
    """The live page's reads in the CRM's ``crm_schema`` and dpvoip's own."""

    def __init__(self, store: Store, crm_schema: str) -> None:
        self._store = store
        self._crm = quote_ident(crm_schema)

    async def viewer(self, user_id: int) -> Viewer:
        """Whether the user is active staff, and the numbers of their active
        connections (what the screen pop compares a ringing call's extension with)."""
        rows = await self._store.read(
            f"SELECT coalesce((SELECT u.is_staff AND u.is_active FROM {self._crm}.auth_user u"
            "  WHERE u.id = %(user)s), false),"
            f" coalesce((SELECT array_agg(c.number ORDER BY c.id) FROM {self._crm}"
            ".voip_connection c WHERE c.owner_id = %(user)s AND c.active AND c.number <> ''),"
            " '{}')",
            {"user": user_id})
        staff, numbers = rows[0]
        return Viewer(user_id, bool(staff), tuple(numbers))

    async def snapshot(self, day_start: datetime, viewer: int | None, recent: int,
                       tickets: int) -> Snapshot:
        """The page's four parts in one read-only transaction. ``day_start``: the office's
        midnight (the recent calls are today's); ``recent`` and ``tickets`` bound the
        lists (newest first)."""
        params = {"viewer": viewer, "day": day_start, "recent": recent, "tickets": tickets,
                  "open": list(OPEN_TICKETS)}

        async def read(cursor: Any) -> Snapshot:
            # One snapshot of the database for the four reads, so that they agree.
            await cursor.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            await cursor.execute(self._calls_query(
                f"{_IN_PROGRESS} ORDER BY v.started_at DESC, v.id DESC"), params)
            in_progress = [_call(row) for row in cursor.fetchall()]
            await cursor.execute(self._calls_query(
                "v.status <> 'active' AND v.started_at >= %(day)s"
                " ORDER BY v.started_at DESC, v.id DESC LIMIT %(recent)s"), params)
            ended = [_call(row) for row in cursor.fetchall()]
            await cursor.execute(self._tickets_query(), params)
            open_tickets = [_ticket(row) for row in cursor.fetchall()]
            await cursor.execute(
                "SELECT box, connected, since, extract(epoch FROM now() - reported_at)"
                " FROM dpvoip.box_status ORDER BY box")
            boxes = [LiveBox(r[0], r[1], r[2], float(r[3])) for r in cursor.fetchall()]
            return Snapshot(in_progress, ended, open_tickets, boxes, await _window(cursor))

        return await self._store.write(read)

    async def ringing(self, viewer: int | None) -> Ringing:
        """The incoming calls ringing now that ``viewer`` may see, oldest first, with the
        events table's window, in one snapshot (the screen pop of a page just opened)."""

        async def read(cursor: Any) -> Ringing:
            await cursor.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            await cursor.execute(self._calls_query(
                f"{_IN_PROGRESS} AND v.direction = 'incoming' AND d.answered_at IS NULL"
                " ORDER BY v.started_at, v.id LIMIT 20"), {"viewer": viewer})
            calls = [_call(row) for row in cursor.fetchall()]
            return Ringing(calls, await _window(cursor))

        return await self._store.write(read)

    def _mine(self) -> str:
        return (f"mine AS (SELECT regexp_replace(c.number, '[^0-9]', '', 'g') AS digits"
                f" FROM {self._crm}.voip_connection c WHERE c.owner_id = %(viewer)s"
                " AND c.active)")

    def _calls_query(self, condition: str) -> str:
        """The calls the viewer may see that meet ``condition`` (which may end with its
        ORDER BY and LIMIT)."""
        crm = self._crm
        return (
            f"WITH {self._mine()}"
            " SELECT v.call_id, v.direction, v.phone_number, d.remote_number, v.status,"
            " v.started_at, v.duration_seconds, d.talk_seconds, d.outcome, d.extension,"
            " d.answered_at, CASE WHEN d.source = 'zadarma' THEN 'zadarma' ELSE d.box END,"
            " v.client_id, p.eponimia"
            f" FROM {crm}.accounting_voipcall v"
            " LEFT JOIN dpvoip.call_detail d ON d.call_id = v.call_id"
            f" LEFT JOIN {crm}.accounting_clientprofile p ON p.id = v.client_id"
            f" WHERE ({_VISIBLE}) AND {condition}")

    def _tickets_query(self) -> str:
        crm = self._crm
        return (
            f"WITH {self._mine()}"
            " SELECT t.id, v.call_id, coalesce(d.remote_number, v.phone_number),"
            " p.id, p.eponimia, t.created_at,"
            " greatest(1, (SELECT count(*) FROM dpvoip.call_detail m"
            "  WHERE m.remote_number = d.remote_number AND m.ticket_id = t.id))"
            f" FROM {crm}.accounting_ticket t"
            f" JOIN {crm}.accounting_voipcall v ON v.id = t.call_id"
            " LEFT JOIN dpvoip.call_detail d ON d.call_id = v.call_id"
            f" LEFT JOIN {crm}.accounting_clientprofile p"
            "  ON p.id = coalesce(t.client_id, v.client_id)"
            f" WHERE t.status = ANY(%(open)s::text[]) AND ({_VISIBLE})"
            " ORDER BY t.created_at DESC, t.id DESC LIMIT %(tickets)s")


#: Whether the call ``v`` (its detail ``d``) is the viewer's: see the module's docstring.
_VISIBLE = (
    "%(viewer)s::integer IS NULL OR EXISTS (SELECT 1 FROM mine, (SELECT regexp_replace(x,"
    " '[^0-9]', '', 'g') AS digits FROM unnest(ARRAY[d.own_number, d.line,"
    " d.extension::text]) AS x UNION ALL SELECT regexp_replace(e.internal, '[^0-9]', '',"
    " 'g') FROM dpvoip.zadarma_event e WHERE e.pbx_call_id = d.pbx_call_id) AS legs"
    " WHERE legs.digits <> '' AND mine.digits <> '' AND (legs.digits = mine.digits"
    " OR (length(legs.digits) >= 9 AND length(mine.digits) >= 9"
    " AND right(legs.digits, 9) = right(mine.digits, 9))))"
)


async def _window(cursor: Any) -> tuple[int | None, int]:
    """The events table's window (the oldest id kept, the newest issued), in the
    transaction's snapshot: where a page's first stream may resume."""
    await cursor.execute(EVENT_WINDOW)
    [(oldest, newest)] = cursor.fetchall()
    return oldest, int(newest)


def _client(client_id: int | None, name: str | None) -> Client | None:
    return None if client_id is None else Client(client_id, name or "")


def _call(row: Sequence[Any]) -> LiveCall:
    (call_id, direction, phone, remote, status, started, crm_duration, talk, outcome,
     extension, answered_at, box, client_id, name) = row
    if status == "active":
        state = "answered" if answered_at is not None else "ringing"
        duration = None
    else:
        state = "ended"
        duration = talk if talk is not None else crm_duration
    return LiveCall(call_id, state, direction, remote or phone, _client(client_id, name),
                    None if extension is None else str(extension),
                    outcome if state == "ended" else None, status, duration, started, box)


def _ticket(row: Sequence[Any]) -> LiveTicket:
    ticket_id, call_id, number, client_id, name, created_at, count = row
    return LiveTicket(ticket_id, call_id, number, _client(client_id, name), int(count),
                      created_at)
