"""The privileges dpvoip needs in the CRM's database (attached mode), and which it lacks.

Attached to the CRM, dpvoip connects as a user the CRM's administrator made for it. A
grant left out showed up late and in disguise: the CRM's tables the user may not read are
hidden from ``information_schema`` (so "table missing"), and a database it may not create
a schema in made the schema's preparation fail again at every reconnection (an endless
not-ready). ``missing_privileges`` asks PostgreSQL (``has_*_privilege``) for each one and
names what is missing, which privilege on which object; the daemon checks at start
(``PrivilegeCheck``) and ``dpvoip check`` shows it.

``NEEDS`` is the list, as data, read from the statements in ``dpvoip/store/``;
``test_privileges`` fails when a statement writes a table the list does not grant, and
``etc/grants.sql`` (the README's snippet) grants exactly this list.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.logger import Logger

from dpvoip.core.errors import summary
from dpvoip.crm.schema import quote_ident

log = Logger(namespace="dpvoip")

#: Where the grants are written out, for the messages.
GRANTS = "etc/grants.sql, also in the README"


@dataclass(frozen=True)
class Need:
    """One privilege on one object: ``kind`` is "table" (a CRM table), "sequence" (the
    identity sequence of a CRM table's ``id``), "schema" (the CRM's) or "database"."""

    kind: str
    privilege: str
    table: str = ""
    why: str = ""


def _table(name: str, *privileges: str) -> tuple[Need, ...]:
    return tuple(Need("table", privilege, name) for privilege in privileges)


#: What dpvoip does in the CRM's database, as privileges. Reads: the directory, the
#: matching, the logins and click-to-call; writes: calls, their log lines and tickets, and
#: a contact's, lead's or deal's touch.
NEEDS: tuple[Need, ...] = (
    Need("database", "CREATE", why="for schema dpvoip"),
    Need("schema", "USAGE"),
    *_table("accounting_voipcall", "SELECT", "INSERT", "UPDATE"),
    Need("sequence", "USAGE", "accounting_voipcall",
         why="the old monitor's endpoints reserve call ids"),
    *_table("accounting_voipcalllog", "SELECT", "INSERT", "UPDATE"),
    *_table("accounting_ticket", "SELECT", "INSERT", "UPDATE", "DELETE"),
    *_table("accounting_clientprofile", "SELECT"),
    *_table("crm_contact", "SELECT", "UPDATE"),
    *_table("crm_lead", "SELECT", "UPDATE"),
    *_table("crm_deal", "SELECT", "UPDATE"),
    *_table("crm_company", "SELECT"),
    *_table("voip_connection", "SELECT"),
    *_table("common_userprofile", "SELECT"),
    *_table("auth_user", "SELECT"),
    *_table("django_session", "SELECT"),
)

#: What dpvoip does in its own schema when it is there (made by dpvoip, it owns it).
OWN_TABLE_PRIVILEGES = ("SELECT", "INSERT", "UPDATE", "DELETE")


@dataclass(frozen=True)
class Lacking:
    """Privileges the connected user lacks, one readable item per object."""

    user: str
    database: str
    items: tuple[str, ...]

    def __bool__(self) -> bool:
        return bool(self.items)

    def line(self) -> str:
        return (f"the database user {self.user!r} lacks privileges dpvoip needs: "
                + "; ".join(self.items) + f" (the grants: {GRANTS})")


class MissingPrivileges(Exception):
    """Attached to a database where the user lacks what dpvoip needs (the line says what)."""

    def __init__(self, lacking: Lacking) -> None:
        self.lacking = lacking
        super().__init__(lacking.line())


_CHECK = (
    "WITH need(kind, privilege, object, shown, why) AS ("
    " SELECT * FROM unnest(%(kinds)s::text[], %(privileges)s::text[], %(objects)s::text[],"
    " %(shown)s::text[], %(whys)s::text[]))"
    " SELECT kind, privilege, CASE kind WHEN 'sequence' THEN"
    " CASE WHEN to_regclass(object) IS NOT NULL THEN pg_get_serial_sequence(object, 'id') END"
    " ELSE shown END, why, CASE kind"
    " WHEN 'database' THEN has_database_privilege(current_database(), privilege)"
    " WHEN 'schema' THEN has_schema_privilege("
    "  (SELECT oid FROM pg_namespace WHERE nspname = object), privilege)"
    " WHEN 'table' THEN has_table_privilege(to_regclass(object), privilege)"
    " WHEN 'sequence' THEN CASE WHEN to_regclass(object) IS NOT NULL THEN"
    "  has_sequence_privilege(to_regclass(pg_get_serial_sequence(object, 'id')), privilege)"
    "  END"
    " END FROM need"
    " UNION ALL SELECT 'schema', p.privilege, 'dpvoip', '', has_schema_privilege(n.oid,"
    " p.privilege) FROM pg_namespace n, unnest(ARRAY['USAGE', 'CREATE']) AS p(privilege)"
    " WHERE n.nspname = 'dpvoip'"
    " UNION ALL SELECT 'table', p.privilege, format('dpvoip.%%I', c.relname), '',"
    " has_table_privilege(c.oid, p.privilege) FROM pg_class c"
    " JOIN pg_namespace n ON n.oid = c.relnamespace, unnest(%(own)s::text[]) AS p(privilege)"
    " WHERE n.nspname = 'dpvoip' AND c.relkind = 'r'"
)


def _object(need: Need, crm_schema: str) -> str:
    if need.kind == "schema":
        return crm_schema
    if need.kind == "database":
        return ""
    return f"{quote_ident(crm_schema)}.{quote_ident(need.table)}"


def _shown(need: Need, crm_schema: str) -> str:
    return f"{crm_schema}.{need.table}" if need.table else crm_schema


async def missing_privileges(cursor: Any, crm_schema: str,
                             needs: Sequence[Need] = NEEDS) -> Lacking:
    """Which of ``needs`` (and of dpvoip's own schema, when it exists) the connected user
    lacks; an object that does not exist is not counted (the schema check names it)."""
    await cursor.execute("SELECT current_user, current_database()")
    user, database = cursor.fetchone()
    await cursor.execute(_CHECK, {
        "kinds": [n.kind for n in needs], "privileges": [n.privilege for n in needs],
        "objects": [_object(n, crm_schema) for n in needs],
        "shown": [_shown(n, crm_schema) for n in needs], "whys": [n.why for n in needs],
        "own": list(OWN_TABLE_PRIVILEGES)})
    lacking: dict[tuple[str, str, str], list[str]] = {}
    for kind, privilege, name, why, granted in cursor.fetchall():
        if granted is False:
            lacking.setdefault((kind, str(name or ""), why), []).append(privilege)
    return Lacking(str(user), str(database), tuple(
        _item(kind, privileges, name, why, crm_schema, str(database))
        for (kind, name, why), privileges in lacking.items()))


def _item(kind: str, privileges: list[str], name: str, why: str, crm_schema: str,
          database: str) -> str:
    """"needs SELECT, UPDATE on public.crm_contact", "needs CREATE on database crm for
    schema dpvoip": what to grant, in the words of a GRANT statement."""
    granted = ", ".join(privileges)
    if kind == "database":
        where = f"database {database}"
    elif kind == "schema":
        where = f"schema {name}"
    elif kind == "sequence":
        where = f"sequence {name}"
    else:
        where = name
    if kind == "database":
        return f"needs {granted} on {where} {why}".rstrip()
    return f"needs {granted} on {where}" + (f" ({why})" if why else "")


class PrivilegeCheck(Service):
    """At start (attached mode), before the schema is prepared: the privileges dpvoip
    needs, checked on a connection of its own, and the daemon stopped (exit status 1)
    with one line naming what is missing.

    Why stop, not wait not-ready: a missing grant does not heal by waiting, and an
    administrator reads the reason where the start failed (the terminal, the journal),
    as for a CRM table that is missing. When PostgreSQL cannot be reached at start, the
    reason is logged once (wrong password, no such database, ...) and the check runs on
    the daemon's pool when it connects.
    """

    name = "database privileges"

    def __init__(self, reactor: Any, dsn: str, crm_schema: str, connect_timeout: float,
                 store: Any, subscribe: Callable[[Callable[[], None]], None],
                 fatal: Callable[[str], None]) -> None:
        self._reactor = reactor
        self._dsn = dsn
        self._schema = crm_schema
        self._timeout = connect_timeout
        self._store = store
        self._fatal = fatal
        self._pending = False
        self._checking = False
        # Subscribed before the database service: on a reconnection this check is sent
        # before the schema's preparation, which would fail on a missing grant less clearly.
        subscribe(self._reconnected)

    def startService(self) -> Deferred[None]:
        super().startService()
        return Deferred.fromCoroutine(self._at_start())

    async def _at_start(self) -> None:
        from dpvoip.store.dsn import ConnectProblem, reach

        reached = await reach(self._reactor, self._dsn, self._timeout)
        if isinstance(reached, ConnectProblem):
            log.warn("database: {problem}", problem=reached.line())
            self._pending = True
            return
        try:
            lacking = await reached.run_transaction(
                lambda cursor: missing_privileges(cursor, self._schema))
        finally:
            reached.close()
        self._judge(lacking)

    def _judge(self, lacking: Lacking) -> None:
        if lacking:
            self._fatal(lacking.line())
            raise MissingPrivileges(lacking)

    def _reconnected(self) -> None:
        if self._pending and self.running and not self._checking:
            self._reactor.callLater(0, lambda: Deferred.fromCoroutine(self._check_on_pool()))

    async def _check_on_pool(self) -> None:
        if not self._pending or self._checking or self._store.pool.live == 0:
            return
        self._checking = True
        try:
            lacking = await self._store.write(
                lambda cursor: missing_privileges(cursor, self._schema))
        except Exception as error:  # the database went away again: at its next return
            log.info("privileges not checked yet: {error}", error=summary(error))
            return
        finally:
            self._checking = False
        self._pending = False
        if lacking:
            self._fatal(lacking.line())
