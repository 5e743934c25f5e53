"""libpq connection strings with the settings every dpvoip connection needs.

TCP keepalives notice a dead PostgreSQL host in seconds instead of hours, and the
statement timeout keeps one stuck query from holding a pool connection forever.
"""

from __future__ import annotations

import re

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
    a ``ConfigError`` saying what libpq cannot read in it, never its password."""
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
        options=f"-c statement_timeout={timeout_ms}",
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
