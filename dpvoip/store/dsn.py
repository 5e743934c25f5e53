"""libpq connection strings with the settings every dpvoip connection needs, and why a
connection failed.

TCP keepalives notice a dead PostgreSQL host in seconds instead of hours, and the
statement timeout keeps one stuck query from holding a pool connection forever. The hot
statements run with their generic plans (``plan_cache_mode``, see ``connection_dsn``). A failed
connection is told apart (wrong password, no such database, permission denied, not
reachable) so that ``dpvoip check`` and the daemon can say what to do, never the password.
"""

from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass
from typing import Any

import psycopg2
from psycopg2.extensions import make_dsn, parse_dsn

from dpvoip.config import ConfigError, DatabaseSettings

_HIDDEN = ("password", "sslpassword")


def problem(dsn: str) -> str | None:
    """What is wrong with ``dsn`` as libpq reads it, without its password (libpq quotes
    the part it cannot read, which may be the whole URL); None when it can be read."""
    try:
        parse_dsn(dsn)
    except psycopg2.Error as error:
        return scrub(str(error).strip(), dsn)
    return None


def scrub(message: str, dsn: str) -> str:
    """``message`` with every secret ``dsn`` may hold masked: the passwords it spells (URL
    userinfo, ``password=`` keywords and parameters), and any quoted part of it that
    holds a user's ``@`` or a password keyword (libpq quotes what it cannot read)."""
    secrets = set(re.findall(r"://[^:/@?#]*:([^@/?#]*)@", dsn))
    secrets.update(re.findall(r"(?:ssl)?password\s*=\s*('(?:[^'\\]|\\.)*'|[^\s&]*)", dsn))
    for secret in sorted((s for s in secrets if s), key=len, reverse=True):
        message = message.replace(secret, "***")
    return re.sub(r'"[^"]*(?:@|password)[^"]*"', '"(the URL, not shown)"', message)


def connection_dsn(base: str, settings: DatabaseSettings, application: str = "dpvoip") -> str:
    """``base`` (a URL or key=value string) with keepalives, timeouts and our name added;
    a ``ConfigError`` saying what libpq cannot read in it, never its password.

    The prepared (hot) statements always run their generic plan. Their values come as
    JSON documents and keys, which a plan made for them cannot use; and PostgreSQL's
    choice between the two compares the generic plan's cost with the average of the
    custom plans made so far. The first ones were made when dpvoip's tables were small:
    once the tables have grown, the generic plan looks dearer than that average, and
    the connection plans every execution again for as long as it lives (the Zadarma
    journal's statement: 0.8 ms of planning for 0.4 ms of work, measured in
    bench.replay). ``plan_cache_mode`` is PostgreSQL 12's; Django 5.2, the CRM's,
    needs 14."""
    found = problem(base)
    if found is not None:
        raise ConfigError(f"[database] url (DATABASE_URL) cannot be read: {found}")
    timeout_ms = int(settings.statement_timeout * 1000)
    return make_dsn(
        base,
        keepalives=1,
        keepalives_idle=settings.keepalives_idle,
        keepalives_interval=settings.keepalives_interval,
        keepalives_count=settings.keepalives_count,
        connect_timeout=max(1, round(settings.connect_timeout)),
        application_name=application,
        options=f"-c statement_timeout={timeout_ms} -c plan_cache_mode=force_generic_plan",
    )


def describe(dsn: str) -> str:
    """The DSN without secrets, for messages: ``user@host:port/dbname``."""
    try:
        parts = parse_dsn(dsn)
    except Exception:
        return "(unparseable database URL)"
    for key in _HIDDEN:
        parts.pop(key, None)
    host = parts.get("host", "localhost")
    port = parts.get("port", "5432")
    user = parts.get("user", "")
    where = f"{host}:{port}" if not host.startswith("/") else f"socket {host}"
    return f"{user + '@' if user else ''}{where}/{parts.get('dbname', '')}"


# -- why a connection failed -------------------------------------------------------------
#
# libpq reports a failed connection as text only (psycopg2 gives no SQLSTATE for it), so
# the kind is read from libpq's and the server's English messages. Anything not recognised
# is "other", shown as libpq says it (without the password): a wrong guess would send an
# administrator after the wrong fix.

#: (kind, what the message says) in the order they are tried.
_KINDS: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("wrong password", re.compile(
        r"password authentication failed|no password supplied|authentication failed for user",
        re.IGNORECASE)),
    ("no such user", re.compile(r'role "[^"]*" does not exist', re.IGNORECASE)),
    ("no such database", re.compile(r'database "[^"]*" does not exist', re.IGNORECASE)),
    ("permission denied", re.compile(
        r"permission denied for database|is not permitted to log in|pg_hba\.conf rejects"
        r"|no pg_hba\.conf entry", re.IGNORECASE)),
    ("not reachable", re.compile(
        r"could not connect|connection refused|socket \"[^\"]*\" failed: no such file"
        r"|could not translate"
        r" host name|name or service not known|timeout|timed out|network is unreachable"
        r"|no route to host|server closed the connection unexpectedly"
        r"|the database system is (?:starting up|shutting down)", re.IGNORECASE)),
)


@dataclass(frozen=True)
class ConnectProblem:
    """Why dpvoip could not connect, and what to do about it, in words for a person."""

    kind: str  # "wrong password", "no such user", "no such database", "permission
    # denied", "not reachable" or "other"
    where: str  # user@host:port/dbname, never the password
    detail: str  # libpq's own first line, the password masked
    advice: str

    def line(self) -> str:
        return f"{self.kind} ({self.where}): {self.detail}; {self.advice}"


def classify(message: str, dsn: str) -> ConnectProblem:
    """What a failed connection's ``message`` (libpq's text) means for ``dsn``. Pure."""
    parts = _parts(dsn)
    user = parts.get("user") or "(libpq's default user)"
    database = parts.get("dbname") or user
    where = describe(dsn)
    detail = scrub(_detail(message), dsn)
    kind = next((name for name, pattern in _KINDS if pattern.search(message)), "other")
    advice = {
        "wrong password": (
            f"the password in [database] url (DATABASE_URL) is not the one of user {user!r}:"
            " put the right one there (the CRM's own DATABASE_URL has it), or set a new one"
            f" as the database's owner: ALTER ROLE {user} PASSWORD '...'"),
        "no such user": (
            f"PostgreSQL has no user {user!r}: fix the user in DATABASE_URL, or create it"
            " (the grants for a dpvoip user: etc/grants.sql)"),
        "no such database": (
            f"there is no database {database!r} on that server: put the CRM's database name"
            " in DATABASE_URL (the one in the CRM's own DATABASE_URL)"),
        "permission denied": (
            f"user {user!r} may not connect to database {database!r}: as the database's"
            f" owner, GRANT CONNECT ON DATABASE {database} TO {user} (etc/grants.sql), and"
            " check that pg_hba.conf lets it in"),
        "not reachable": (
            "nothing answers there: is PostgreSQL running, listening on that address"
            " (listen_addresses, the port) and not blocked by a firewall? Are host and"
            " port in DATABASE_URL right?"),
        "other": "see PostgreSQL's own message above",
    }[kind]
    return ConnectProblem(kind, where, detail, advice)


def _parts(dsn: str) -> dict[str, str]:
    try:
        return dict(parse_dsn(dsn))
    except psycopg2.Error:
        return {}


def _detail(message: str) -> str:
    """libpq's message in one line: the server's words without the socket preamble."""
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    if not lines:
        return "no reason given"
    first = re.sub(r"^connection to server (?:on socket|at) .*? failed: ", "", lines[0])
    first = re.sub(r"^FATAL:\s+", "", first)
    return first


def connect_failure(error: BaseException, dsn: str) -> ConnectProblem:
    """``classify`` for an exception a connection attempt failed with."""
    return classify(str(error) or type(error).__name__, dsn)


async def reach(reactor: Any, dsn: str, timeout: float) -> Any:
    """One connection to ``dsn`` (a ``PooledConnection``, the caller closes it), or the
    ``ConnectProblem`` that kept it from being made, within ``timeout`` seconds."""
    from dpvoip.store.pool import PooledConnection

    connection = PooledConnection(reactor=reactor)
    connection.connect_timeout = timeout
    try:
        await connection.connect(dsn)
    except psycopg2.Error as error:
        # A session refused after its start (no such database, permission denied) leaves
        # the attempt's socket watched: closing stops that, whatever state it is in.
        with contextlib.suppress(Exception):
            connection.close()
        return connect_failure(error, dsn)
    return connection
