"""How to open ``psql`` on the database dpvoip uses: the program, its arguments and its
environment (``dpvoip psql``).

The embedded server: its socket folder, with the ``psql`` of the binaries it runs (the
``pgserver`` wheel carries one; a machine without the system's client has no other). An
attached database: the configured URL given to psql through libpq's environment
variables, so that its password never appears on a command line (``ps`` shows those to
every user). The caller's own ``PG*`` variables are dropped: they would quietly point
psql somewhere else than dpvoip.
"""

from __future__ import annotations

import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import psycopg2
from psycopg2.extensions import parse_dsn

from dpvoip.config import Config
from dpvoip.store.dsn import scrub
from dpvoip.store.embedded import (
    DATABASE,
    SUPERUSER,
    EmbeddedError,
    EmbeddedPostgres,
    candidate_bindirs,
)

#: libpq's connection keywords and the environment variables that carry them.
ENVIRONMENT = {
    "host": "PGHOST", "hostaddr": "PGHOSTADDR", "port": "PGPORT", "dbname": "PGDATABASE",
    "user": "PGUSER", "password": "PGPASSWORD", "passfile": "PGPASSFILE",
    "service": "PGSERVICE", "options": "PGOPTIONS", "application_name": "PGAPPNAME",
    "sslmode": "PGSSLMODE", "requiressl": "PGREQUIRESSL", "sslcert": "PGSSLCERT",
    "sslkey": "PGSSLKEY", "sslrootcert": "PGSSLROOTCERT", "sslcrl": "PGSSLCRL",
    "sslcrldir": "PGSSLCRLDIR", "sslsni": "PGSSLSNI", "sslcompression": "PGSSLCOMPRESSION",
    "requirepeer": "PGREQUIREPEER", "ssl_min_protocol_version": "PGSSLMINPROTOCOLVERSION",
    "ssl_max_protocol_version": "PGSSLMAXPROTOCOLVERSION", "gssencmode": "PGGSSENCMODE",
    "krbsrvname": "PGKRBSRVNAME", "gsslib": "PGGSSLIB", "connect_timeout": "PGCONNECT_TIMEOUT",
    "client_encoding": "PGCLIENTENCODING", "target_session_attrs": "PGTARGETSESSIONATTRS",
    "load_balance_hosts": "PGLOADBALANCEHOSTS", "channel_binding": "PGCHANNELBINDING",
}
#: Keywords with no variable that only tune the connection: psql does without them.
TUNING = frozenset({"keepalives", "keepalives_idle", "keepalives_interval",
                    "keepalives_count", "tcp_user_timeout", "fallback_application_name"})


class PsqlError(Exception):
    """psql cannot be opened on dpvoip's database; the message says why (no secret)."""


@dataclass(frozen=True)
class Invocation:
    """The program to run, its whole argv (program first) and its whole environment."""

    program: str
    argv: list[str]
    env: dict[str, str]


def psql_invocation(config: Config, base: Path, arguments: Sequence[str],
                    environ: Mapping[str, str],
                    cluster: EmbeddedPostgres | None = None) -> Invocation:
    """psql on the database ``config`` names, ``arguments`` passed on as they are."""
    own = {k: v for k, v in environ.items() if not k.startswith("PG")}
    if config.embedded:
        cluster = cluster or EmbeddedPostgres(config.state_path(base) / "pg")
        return _embedded(cluster, arguments, own)
    keywords = url_environment(config.database.url.reveal())
    program = _which_psql(None)
    return Invocation(program, [program, *arguments], {**own, **keywords})


def _embedded(cluster: EmbeddedPostgres, arguments: Sequence[str],
              own: dict[str, str]) -> Invocation:
    if not cluster.initialised():
        raise PsqlError(f"no embedded database in {cluster.folder} yet: start dpvoip first "
                        "(make start), which makes it")
    try:
        bindir = cluster.bindir
    except EmbeddedError as error:
        raise PsqlError(str(error)) from None
    if not cluster.running():
        raise PsqlError(f"the embedded PostgreSQL in {cluster.folder} is not running: "
                        "start dpvoip first (make start)")
    program = _which_psql(bindir)
    env = {**own, "PGHOST": str(cluster.socket_dir), "PGPORT": str(cluster.port()),
           "PGDATABASE": DATABASE, "PGUSER": SUPERUSER}
    return Invocation(program, [program, *arguments], env)


def url_environment(url: str) -> dict[str, str]:
    """libpq's variables for ``url`` (a URL or key=value string); a ``PsqlError`` naming
    what cannot be passed, never a value."""
    try:
        keywords = parse_dsn(url)
    except psycopg2.Error as error:
        raise PsqlError("[database] url (DATABASE_URL) cannot be read: "
                        + scrub(str(error).strip(), url)) from None
    unknown = sorted(k for k in keywords if k not in ENVIRONMENT and k not in TUNING)
    if unknown:
        raise PsqlError("[database] url (DATABASE_URL) has settings psql cannot be given "
                        f"without the command line: {', '.join(unknown)}")
    return {ENVIRONMENT[k]: v for k, v in keywords.items() if k in ENVIRONMENT}


def _which_psql(bindir: Path | None) -> str:
    """The embedded server's own psql first, else the one on the PATH, else any
    installed PostgreSQL's (the ``pgserver`` wheel's on a machine with no client)."""
    if bindir is not None and (bindir / "psql").exists():
        return str(bindir / "psql")
    found = shutil.which("psql")
    if found:
        return found
    for folder in candidate_bindirs():
        if (folder / "psql").exists():
            return str(folder / "psql")
    raise PsqlError("no psql found: install the PostgreSQL client (the postgresql-client "
                    "package) or the pgserver wheel")
