"""Rows in the CRM's real tables, as the CRM (Django) would write them: every NOT NULL
column filled, since the CRM's tables have no database defaults."""

from __future__ import annotations

import itertools
from datetime import datetime
from typing import Any

import psycopg2
from psycopg2 import sql

_serial = itertools.count(1)
_FILL = {
    "character varying": "", "text": "", "boolean": False, "integer": 0, "bigint": 0,
    "smallint": 0, "numeric": 0, "jsonb": "{}",
}


class Crm:
    """Writes CRM rows into one database (autocommit; deferred FKs are checked at once)."""

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn
        self._columns: dict[str, list[tuple[str, str]]] = {}

    def _required(self, table: str) -> list[tuple[str, str]]:
        if table not in self._columns:
            self._columns[table] = [
                (name, kind) for name, kind in self.query(
                    "SELECT column_name, data_type FROM information_schema.columns"
                    " WHERE table_schema = 'public' AND table_name = %s AND is_nullable = 'NO'"
                    " AND is_identity = 'NO' AND column_name <> 'id'", (table,))
            ]
        return self._columns[table]

    def query(self, text: Any, params: Any = ()) -> list[tuple[Any, ...]]:
        """Run ``text``, then have PostgreSQL publish its statistics before answering.

        The directory's refresh skips the tables whose statistics show no writes; a
        backend publishes them at most once a second (or when it exits, which happens
        after the client has closed), so on a busy machine a test's write could still be
        unpublished when the refresh under test reads them. ``pg_stat_force_next_flush``
        makes the next transaction's end publish everything pending, before its answer.
        """
        connection = psycopg2.connect(self.dsn)
        try:
            connection.autocommit = True
            with connection.cursor() as cursor:
                cursor.execute(text, params)
                rows: list[tuple[Any, ...]] = cursor.fetchall() if cursor.description else []
                cursor.execute("SELECT pg_stat_force_next_flush()")
            return rows
        finally:
            connection.close()

    def insert(self, table: str, **values: Any) -> int:
        row: dict[str, Any] = {}
        for name, kind in self._required(table):
            if kind.startswith("timestamp"):
                row[name] = datetime.now().astimezone()
            elif kind == "date":
                row[name] = datetime.now().date()
            else:
                row[name] = _FILL.get(kind, "")
        row.update(values)
        statement = sql.SQL("INSERT INTO {} ({}) VALUES ({}) RETURNING {}").format(
            sql.Identifier(table),
            sql.SQL(", ").join(sql.Identifier(k) for k in row),
            sql.SQL(", ").join(sql.Placeholder() * len(row)),
            sql.Identifier("user_id" if table == "common_userprofile" else "id"),
        )
        return int(self.query(statement, tuple(row.values()))[0][0])

    def update(self, table: str, record_id: int, **values: Any) -> None:
        statement = sql.SQL("UPDATE {} SET {} WHERE id = %s").format(
            sql.Identifier(table),
            sql.SQL(", ").join(
                sql.SQL("{} = %s").format(sql.Identifier(k)) for k in values
            ),
        )
        self.query(statement, (*values.values(), record_id))

    # -- the records of the directory ------------------------------------------------------

    def client(self, name: str = "Client", active: bool = True, **values: Any) -> int:
        return self.insert(
            "accounting_clientprofile", afm=f"{next(_serial):09d}", eponimia=name,
            eidos_ipoxreou="individual", is_active=active, **values,
        )

    def company(self, name: str = "Company AE", **values: Any) -> int:
        return self.insert("crm_company", full_name=name, token=_token(), **values)

    def contact(self, first: str = "Maria", last: str = "Ioannou", **values: Any) -> int:
        values.setdefault("company_id", self.company())
        return self.insert(
            "crm_contact", first_name=first, last_name=last, token=_token(), **values
        )

    def lead(self, first: str = "Nikos", last: str = "Georgiou", **values: Any) -> int:
        return self.insert("crm_lead", first_name=first, last_name=last, token=_token(),
                           **values)

    def deal(self, name: str = "Deal", **values: Any) -> int:
        values.setdefault("active", True)
        return self.insert("crm_deal", name=name, ticket=_token(), **values)

    def user(self, username: str = "staff", **values: Any) -> int:
        values.setdefault("is_active", True)
        return self.insert("auth_user", username=username, **values)


def _token() -> str:
    return f"t{next(_serial):010d}"[:11]
