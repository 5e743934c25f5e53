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
    """The click-to-call tables in the CRM's ``crm_schema`` and dpvoip's own."""

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

    async def recording_of_crm_call(self, crm_call_id: int) -> str | None:
        """Zadarma's recording id of the call the CRM knows as ``accounting_voipcall``
        ``crm_call_id``, else None."""
        rows = await self._store.read(
            "SELECT d.recording, d.pbx_call_id FROM dpvoip.call_detail d"
            f" JOIN {self._crm}.accounting_voipcall v ON v.call_id = d.call_id"
            " WHERE v.id = %s",
            (crm_call_id,),
        )
        return rows[0][0] if rows and rows[0][0] else None

    async def recording_of_call(self, call_id: str) -> str | None:
        """Zadarma's recording id of dpvoip's call ``call_id``, else None."""
        rows = await self._store.read(
            "SELECT recording, pbx_call_id FROM dpvoip.call_detail WHERE call_id = %s",
            (call_id,),
        )
        return rows[0][0] if rows and rows[0][0] else None
