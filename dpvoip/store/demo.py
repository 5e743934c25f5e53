"""The demo client's row in the CRM's ``accounting_clientprofile`` (``dpvoip demo-client``):
the table's columns read, and the row written or brought up to date by its tax number in
one statement. What the row holds is decided in ``dpvoip.demo_client``; only the SQL is
here."""

from __future__ import annotations

from collections.abc import Mapping

from psycopg2 import sql

from dpvoip.store.database import Store

TABLE = "accounting_clientprofile"

#: Changed when the demo client is already there: what the command's options say, and
#: the row made active again (a demo client someone deactivated would never match).
UPDATED = ("eponimia", "kinito_tilefono", "email", "is_active")


async def client_columns(store: Store, crm_schema: str) -> frozenset[str]:
    """The columns of the CRM's client table (the 2025-12 CRM has six the newest lacks)."""
    rows = await store.read(
        "SELECT column_name FROM information_schema.columns"
        " WHERE table_schema = %s AND table_name = %s", (crm_schema, TABLE))
    return frozenset(str(name) for (name,) in rows)


async def put_client(store: Store, crm_schema: str, row: Mapping[str, object]) -> tuple[int, bool]:
    """(id, created): the client with ``row["afm"]`` inserted with ``row`` (and both
    timestamps now, as Django's ``auto_now_add``/``auto_now`` write them), or, when a client
    has that tax number already, its ``UPDATED`` columns set from ``row``."""
    columns = [*row, "created_at", "updated_at"]
    statement = sql.SQL(
        "INSERT INTO {table} ({columns}) VALUES ({values}, now(), now())"
        " ON CONFLICT (afm) DO UPDATE SET {updates}, updated_at = now()"
        " RETURNING id, (xmax = 0)"
    ).format(
        table=sql.Identifier(crm_schema, TABLE),
        columns=sql.SQL(", ").join(sql.Identifier(c) for c in columns),
        values=sql.SQL(", ").join(sql.Placeholder() * len(row)),
        updates=sql.SQL(", ").join(
            sql.SQL("{0} = EXCLUDED.{0}").format(sql.Identifier(c)) for c in UPDATED),
    )
    [(client_id, created)] = await store.write_one(statement, tuple(row.values()))
    return int(client_id), bool(created)
