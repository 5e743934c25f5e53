"""libpq connection strings with the settings every dpvoip connection needs.

TCP keepalives notice a dead PostgreSQL host in seconds instead of hours, and the
statement timeout keeps one stuck query from holding a pool connection forever.
"""

from __future__ import annotations

from psycopg2.extensions import make_dsn, parse_dsn

from dpvoip.config import DatabaseSettings

_HIDDEN = ("password", "sslpassword")


def connection_dsn(base: str, settings: DatabaseSettings, application: str = "dpvoip") -> str:
    """``base`` (a URL or key=value string) with keepalives, timeouts and our name added."""
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
