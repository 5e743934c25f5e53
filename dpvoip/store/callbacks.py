"""What click-to-call reads and writes: the user's VoIP connections, the record of every
request (``dpvoip.callback_request``), the per-user limit counted in that record, and the
recording of a call.

``click_to_call.callbacks`` decides (whose connection, which number, what answer, whether
the user is over the limit); the statements are here, with the rest of dpvoip's SQL.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from dpvoip.crm.schema import quote_ident
from dpvoip.store.database import Batch, Store

#: A ``voip_connection`` row: id, type, number, callerid, provider.
ConnectionRow = tuple[int, str, str, str, str]

#: The first key of the advisory locks that serialise one user's claims (the second is
#: the user's id). Two-key locks never meet the one-key lock of the migrations.
CLAIM_LOCK = 0x64706363  # "dpcc"

#: What a claimed request's row says until its outcome is written over it: seen only when
#: dpvoip stopped, or lost the database, between the claim and the answer.
PENDING = "pending"
PENDING_MESSAGE = "no outcome recorded: dpvoip stopped or lost its database before it answered"


@dataclass(frozen=True)
class Claim:
    """The answer to a claim: ``request_id``, the row counted for the request when it is
    within the limit, else ``wait``, the seconds until the next one would be (> 0)."""

    request_id: int | None
    wait: float | None = None


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

    async def claim(self, pending: CallbackRequest, at: float, window: float,
                    decide: Callable[[list[float]], float | None]) -> Claim:
        """Count one request of ``pending.user_id`` at ``at`` (seconds since the epoch, the
        caller's clock) against the limit shared by every instance on this database.

        One transaction, serialised per user by an advisory lock: the times of the user's
        counted requests after ``at - window`` are read, ``decide`` (the limit's rule,
        pure) says whether one more is allowed, and if it is, the request's row is written
        (``pending`` with ``counted_at``), to be completed by ``record(..., claimed=id)``.
        A request refused here writes nothing (``record`` keeps it, uncounted). Two
        instances claiming for one user at once are taken one after the other, so the
        second sees the first's row: the limit holds whichever instance takes the click.
        """
        if pending.user_id is None:
            raise ValueError("only a signed-in user's request is counted")
        user = pending.user_id

        async def steps(batch: Batch) -> Claim:
            rows = await batch.run(
                "SELECT pg_advisory_xact_lock(%s, %s);"
                " SELECT extract(epoch FROM counted_at)::float8"
                " FROM dpvoip.callback_request"
                " WHERE user_id = %s AND counted_at > to_timestamp(%s) ORDER BY counted_at",
                (CLAIM_LOCK, user, user, at - window))
            wait = decide([float(row[0]) for row in rows])
            if wait is not None:
                return Claim(None, wait)
            made = await batch.run(
                "INSERT INTO dpvoip.callback_request (user_id, login, connection_id,"
                " from_number, number_given, number_dialled, result, http_status, message,"
                " counted_at) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, to_timestamp(%s))"
                " RETURNING id",
                (user, pending.login, pending.connection_id, pending.from_number,
                 pending.number_given, pending.number_dialled, PENDING, 0, PENDING_MESSAGE,
                 at))
            return Claim(int(made[0][0]))

        return await self._store.batch(steps)

    async def record(self, request: CallbackRequest, claimed: int | None = None) -> None:
        """Write the request's row (one statement, atomic, shielded from cancellation): the
        outcome over the row of its claim (``claimed``: it stays counted), else a new row
        (a request refused before it was counted: no login, over the limit)."""
        if claimed is not None:
            await self._store.write_one(
                "UPDATE dpvoip.callback_request SET user_id = %s, login = %s,"
                " connection_id = %s, from_number = %s, number_given = %s,"
                " number_dialled = %s, result = %s, http_status = %s, message = %s"
                " WHERE id = %s",
                (request.user_id, request.login, request.connection_id,
                 request.from_number, request.number_given, request.number_dialled,
                 request.result, request.http_status, request.message, claimed),
            )
            return
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
