"""Every statement of reconciling a box's call list (TR-064): the list's state, the box's
recorded calls, a call linked to its list entry, a finished call's outcome corrected as
the box says, and the box's pinned TLS certificate.

The decisions are ``dpvoip.fritzbox.reconcile``'s; this module turns them into
statements. The state, the links and the corrections are written inside the ingest's
transaction (its ``then`` step), so the state only moves together with the calls.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from dpvoip.core.call_log import LogLine
from dpvoip.core.outcomes import Outcome
from dpvoip.crm.schema import CrmCapabilities, quote_ident
from dpvoip.fritzbox.reconcile import ListState, Recorded
from dpvoip.live.events import ended_changes
from dpvoip.store.calls import NOTIFY_CHANNEL, ended_payload
from dpvoip.store.database import Batch, Store
from dpvoip.store.live import announce, row_call_event

#: A ticket nobody touched since dpvoip created it for its call: still open (or assigned
#: by dpvoip when it was created), no note, no mail, no follow-up, not resolved or closed.
_UNTOUCHED = (
    "t.notes = '' AND t.resolved_at IS NULL AND t.closed_at IS NULL AND NOT t.email_sent"
    " AND NOT t.follow_up_scheduled AND ((t.status = 'open' AND t.assigned_to_id IS NULL)"
    " OR (t.status = 'assigned' AND t.assigned_at = t.created_at))"
)


@dataclass(frozen=True)
class BlockedCorrection:
    """A call recorded as missed that the box's list says it blocked, ready to write."""

    call_id: str
    notes: str  # the call's new notes
    line: LogLine  # the call-log line saying so
    ticket_note: str  # the line a ticket that stays gets
    talk: int


class CallListStatements:
    """The reconciler's statements on dpvoip's schema and the CRM's call tables."""

    def __init__(self, store: Store, crm_schema: str = "public",
                 capabilities: Callable[[], CrmCapabilities] = CrmCapabilities) -> None:
        self._store = store
        self._crm = quote_ident(crm_schema)
        self._capabilities = capabilities  # the CRM's optional columns, once known

    # -- the state -------------------------------------------------------------------------

    async def state(self, box: str) -> ListState | None:
        """How far ``box``'s list was processed; None before its first run."""
        rows = await self._store.read(
            "SELECT last_id, list_timestamp FROM dpvoip.call_list_state WHERE box = %s"
            " AND last_id IS NOT NULL", (box,))
        return ListState(int(rows[0][0]), int(rows[0][1])) if rows else None

    async def last_read(self, box: str) -> datetime | None:
        """When ``box``'s list state was last written: the last pass that changed it."""
        rows = await self._store.read(
            "SELECT updated_at FROM dpvoip.call_list_state WHERE box = %s"
            " AND last_id IS NOT NULL", (box,))
        return rows[0][0] if rows else None

    async def write_state(self, batch: Batch, box: str, state: ListState,
                          at: datetime) -> None:
        """The new state, as of the pass at ``at`` (inside the pass's transaction)."""
        await batch.run(
            "INSERT INTO dpvoip.call_list_state (box, last_id, list_timestamp, updated_at)"
            " VALUES (%s, %s, %s, %s) ON CONFLICT (box) DO UPDATE SET"
            " last_id = EXCLUDED.last_id, list_timestamp = EXCLUDED.list_timestamp,"
            " updated_at = EXCLUDED.updated_at",
            (box, state.last_id, state.timestamp, at))

    # -- the box's recorded calls ----------------------------------------------------------

    async def recorded(self, box: str, since: datetime, until: datetime) -> list[Recorded]:
        """The calls of ``box`` that started in [since, until)."""
        rows = await self._store.read(
            "SELECT d.call_id, d.direction, d.remote_raw, d.remote_number, d.started_at,"
            f" c.ended_at, c.status, d.outcome, d.list_id FROM dpvoip.call_detail d JOIN"
            f" {self._crm}.accounting_voipcall c ON c.call_id = d.call_id WHERE d.box = %s"
            " AND d.started_at >= %s AND d.started_at < %s ORDER BY d.started_at",
            (box, since, until))
        return [Recorded(str(call_id), str(direction), str(raw or ""), number, started,
                         ended, str(status), outcome, None if listed is None else int(listed))
                for (call_id, direction, raw, number, started, ended, status, outcome, listed)
                in rows]

    # -- links -----------------------------------------------------------------------------

    async def forget_links(self, batch: Batch, box: str) -> None:
        """The box's list was reset: its old entry ids mean nothing any more."""
        await batch.run("UPDATE dpvoip.call_detail SET list_id = NULL WHERE box = %s"
                        " AND list_id IS NOT NULL", (box,))

    async def link(self, batch: Batch, box: str, links: Sequence[tuple[str, int]]) -> None:
        """Each call to its list entry (one entry, one call: a unique index says so)."""
        if not links:
            return
        await batch.run(
            "UPDATE dpvoip.call_detail d SET list_id = v.list_id, updated_at = now()"
            " FROM unnest(%s::text[], %s::bigint[]) AS v(call_id, list_id)"
            " WHERE d.call_id = v.call_id AND d.box = %s"
            " AND d.list_id IS DISTINCT FROM v.list_id",
            ([call for call, _ in links], [entry for _, entry in links], box))

    # -- corrections -----------------------------------------------------------------------

    async def correct_to_blocked(self, batch: Batch, correction: BlockedCorrection,
                                 received: datetime) -> str:
        """A call recorded as missed that the box blocked: its row, detail and log say so,
        and its ticket goes, when nobody touched it and it stands for this call alone;
        else the ticket stays, with a note line (a grouped call leaves the ticket it had
        joined). Returns what happened to the ticket: '', 'deleted', 'noted' or 'left'."""
        extra_columns, extra_values = self._log_extras()
        rows = await batch.run(
            f"WITH c AS (UPDATE {self._crm}.accounting_voipcall v SET status = %(status)s,"
            " notes = %(notes)s, updated_at = %(received)s FROM dpvoip.call_detail d"
            " WHERE v.call_id = %(call)s AND d.call_id = v.call_id AND d.outcome = 'missed'"
            " AND v.status = 'missed'"
            " RETURNING v.id, v.call_id, v.phone_number, v.client_id, v.ticket_id),"
            " detail AS (UPDATE dpvoip.call_detail d SET outcome = 'blocked',"
            " updated_at = now() FROM c WHERE d.call_id = c.call_id),"
            f" logs AS (INSERT INTO {self._crm}.accounting_voipcalllog (action, description,"
            f" created_at, call_id{extra_columns}) SELECT %(action)s, %(line)s,"
            f" %(received)s, c.id{extra_values} FROM c),"
            f" live AS ({row_call_event(self._crm, 'c', '%(changes)s')}),"
            f" note AS ({announce('%(channel)s', '%(payload)s')})"
            " SELECT c.id, t.id, t.call_id = c.id,"
            f" coalesce(t.call_id = c.id AND {_UNTOUCHED} AND NOT EXISTS (SELECT 1 FROM"
            f" {self._crm}.accounting_voipcall o WHERE o.ticket_id = c.ticket_id"
            " AND o.id <> c.id), false), (SELECT count(*) FROM note)"
            f" FROM c LEFT JOIN {self._crm}.accounting_ticket t"
            " ON c.ticket_id ~ '^[0-9]+$' AND t.id = c.ticket_id::bigint",
            {"status": Outcome.BLOCKED.status, "notes": correction.notes,
             "received": received, "call": correction.call_id,
             "action": correction.line.action, "line": correction.line.text,
             "channel": NOTIFY_CHANNEL,
             "payload": ended_payload(correction.call_id, Outcome.BLOCKED, correction.talk),
             "changes": json.dumps(ended_changes(Outcome.BLOCKED, correction.talk, received))})
        if not rows:
            return ""
        row, ticket, own, untouched, _ = rows[0]
        if ticket is None:
            return ""
        if untouched:
            await batch.run(
                f"WITH gone AS (DELETE FROM {self._crm}.accounting_ticket WHERE id = %(t)s"
                " RETURNING id),"
                f" call AS (UPDATE {self._crm}.accounting_voipcall SET ticket_created = false,"
                " ticket_id = NULL, updated_at = %(received)s WHERE id = %(row)s"
                " AND EXISTS (SELECT 1 FROM gone) RETURNING call_id)"
                " UPDATE dpvoip.call_detail d SET ticket_id = NULL, updated_at = now()"
                " FROM call WHERE d.call_id = call.call_id",
                {"t": ticket, "row": row, "received": received})
            return "deleted"
        if not own:
            # The call had joined another call's ticket: it leaves it (as the CRM does
            # when a ticket goes: ticket_created and ticket_id reset together).
            await batch.run(
                f"WITH call AS (UPDATE {self._crm}.accounting_voipcall SET"
                " ticket_created = false, ticket_id = NULL, updated_at = %(received)s"
                " WHERE id = %(row)s RETURNING call_id)"
                " UPDATE dpvoip.call_detail d SET ticket_id = NULL, updated_at = now()"
                " FROM call WHERE d.call_id = call.call_id",
                {"row": row, "received": received})
        await batch.run(
            f"UPDATE {self._crm}.accounting_ticket t SET notes = CASE WHEN t.notes = ''"
            " THEN %(note)s ELSE t.notes || E'\\n' || %(note)s END WHERE t.id = %(t)s",
            {"note": correction.ticket_note, "t": ticket})
        return "noted" if own else "left"

    def _log_extras(self) -> tuple[str, str]:
        """The 2026-08 CRM's extra call-log columns and their values from CTE ``c``."""
        capabilities = self._capabilities()
        pairs = [pair for pair, present in (
            (("client_id", "c.client_id"), capabilities.call_log_client_id),
            (("call_reference", "c.call_id"), capabilities.call_log_call_reference),
            (("phone_number", "c.phone_number"), capabilities.call_log_phone_number),
        ) if present]
        return ("".join(", " + column for column, _ in pairs),
                "".join(", " + value for _, value in pairs))

    # -- the box's certificate -------------------------------------------------------------

    async def certificate(self, box: str) -> str | None:
        """The SHA-256 fingerprint pinned for ``box``'s TR-064 TLS, None before the first."""
        rows = await self._store.read(
            "SELECT certificate_sha256 FROM dpvoip.call_list_state WHERE box = %s", (box,))
        return str(rows[0][0]) if rows and rows[0][0] is not None else None

    async def pin_certificate(self, box: str, fingerprint: str) -> str:
        """Pin ``fingerprint`` (hex, colons allowed) unless one is pinned already; the one
        pinned (the first one seen wins, also when two instances race)."""
        rows: list[tuple[Any, ...]] = await self._store.write_one(
            "INSERT INTO dpvoip.call_list_state AS s (box, certificate_sha256) VALUES (%s, %s)"
            " ON CONFLICT (box) DO UPDATE SET certificate_sha256 ="
            " coalesce(s.certificate_sha256, EXCLUDED.certificate_sha256),"
            " updated_at = CASE WHEN s.certificate_sha256 IS NULL THEN now()"
            " ELSE s.updated_at END RETURNING certificate_sha256",
            (box, fingerprint.replace(":", "").strip().lower()))
        return str(rows[0][0])
