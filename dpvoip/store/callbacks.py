"""What click-to-call reads and writes: the user's VoIP connections, the record of every
request (``dpvoip.callback_request``) and the recording of a call.

``click_to_call.callbacks`` decides (whose connection, which number, what answer); the
statements are here, with the rest of dpvoip's SQL.
"""

from __future__ import annotations

from dataclasses import dataclass

from dpvoip.crm.schema import quote_ident
from dpvoip.store.database import Store

#: A ``voip_connection`` row: id, type, number, callerid, provider.
ConnectionRow = tuple[int, str, str, str, str]


@dataclass(frozen=True)
class CallbackRequest:
    """One row of ``dpvoip.callback_request``: a click-to-call request, dialled or not."""

    user_id: int | None
    login: str
    connection_id: int | None
    from_number: str | None
    number_given: str
    number_dialled: str | None
    result: str
    http_status: int
    message: str


class CallbackRecords:
    """The click-to-call tables in the CRM's ``crm_schema`` and dpvoip's own.

    Who may hear a call's recording (``recording_of_*`` with a ``viewer``): CRM staff
    (``auth_user.is_staff``, active), and a user one of whose ``voip_connection`` numbers
    was the office's side of the call: its line (``own_number``, ``line``), the extension
    that took it, an extension Zadarma reported for a leg, or the phone a click-to-call
    rang first. Numbers are compared by their digits, the last nine when both are that
    long (``+30 210 765 4321`` is ``2107654321``).
    """

    def __init__(self, store: Store, crm_schema: str) -> None:
        self._store = store
        self._crm = quote_ident(crm_schema)

    async def connections(self, owner_id: int) -> list[ConnectionRow]:
        """The active connections of the CRM user ``owner_id``, oldest first."""
        rows = await self._store.read(
            f"SELECT id, type, number, callerid, provider FROM {self._crm}.voip_connection"
            " WHERE owner_id = %s AND active ORDER BY id",
            (owner_id,),
        )
        return [(row[0], row[1], row[2], row[3], row[4]) for row in rows]

    async def own_connection(self, connection_id: int, owner_id: int) -> ConnectionRow | None:
        """Connection ``connection_id`` if it is active and ``owner_id``'s, else None."""
        rows = await self._store.read(
            f"SELECT id, type, number, callerid, provider FROM {self._crm}.voip_connection"
            " WHERE id = %s AND owner_id = %s AND active",
            (connection_id, owner_id),
        )
        return (rows[0][0], rows[0][1], rows[0][2], rows[0][3], rows[0][4]) if rows else None

    async def record(self, request: CallbackRequest) -> None:
        """Write the request's row (one statement, atomic, shielded from cancellation)."""
        await self._store.write_one(
            "INSERT INTO dpvoip.callback_request (user_id, login, connection_id,"
            " from_number, number_given, number_dialled, result, http_status, message)"
            " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)",
            (request.user_id, request.login, request.connection_id, request.from_number,
             request.number_given, request.number_dialled, request.result,
             request.http_status, request.message),
        )

    async def recording_of_crm_call(self, crm_call_id: int,
                                    viewer: int | None) -> str | None:
        """Zadarma's recording id of the call the CRM knows as ``accounting_voipcall``
        ``crm_call_id``, else None; with ``viewer``, only if that user may hear it
        (``_VISIBLE``)."""
        return await self._recording(
            "SELECT d.* FROM dpvoip.call_detail d"
            f" JOIN {self._crm}.accounting_voipcall v ON v.call_id = d.call_id"
            " WHERE v.id = %(call)s", crm_call_id, viewer)

    async def recording_of_call(self, call_id: str, viewer: int | None) -> str | None:
        """Zadarma's recording id of dpvoip's call ``call_id``, else None; with ``viewer``,
        only if that user may hear it (``_VISIBLE``)."""
        return await self._recording(
            "SELECT d.* FROM dpvoip.call_detail d WHERE d.call_id = %(call)s", call_id, viewer)

    async def _recording(self, call: str, key: int | str, viewer: int | None) -> str | None:
        crm = self._crm
        rows = await self._store.read(
            f"WITH d AS ({call}),"
            # the office's side of the call: its line, the extension that took it, and
            # Zadarma's legs (an extension; the phone a callback rang first)
            " legs AS (SELECT regexp_replace(x, '[^0-9]', '', 'g') AS digits"
            "  FROM d, unnest(ARRAY[d.own_number, d.line, d.extension::text]) AS x"
            "  UNION SELECT regexp_replace(x, '[^0-9]', '', 'g')"
            "  FROM d JOIN dpvoip.zadarma_event e ON e.pbx_call_id = d.pbx_call_id,"
            "  unnest(ARRAY[e.internal, CASE WHEN e.calltype = 'callback_leg1'"
            "   THEN e.destination END]) AS x),"
            " mine AS (SELECT regexp_replace(c.number, '[^0-9]', '', 'g') AS digits"
            f"  FROM {crm}.voip_connection c WHERE c.owner_id = %(viewer)s)"
            " SELECT d.recording FROM d WHERE %(viewer)s IS NULL"
            f" OR EXISTS (SELECT 1 FROM {crm}.auth_user u WHERE u.id = %(viewer)s"
            "  AND u.is_staff AND u.is_active)"
            " OR EXISTS (SELECT 1 FROM legs, mine WHERE legs.digits <> ''"
            "  AND mine.digits <> '' AND (legs.digits = mine.digits"
            "   OR (length(legs.digits) >= 9 AND length(mine.digits) >= 9"
            "       AND right(legs.digits, 9) = right(mine.digits, 9))))",
            {"call": key, "viewer": viewer},
        )
        return rows[0][0] if rows and rows[0][0] else None
