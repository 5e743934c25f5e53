"""The lease connection: one PostgreSQL session per instance holding its boxes' locks.

Which instance reads a Fritz!Box is decided by a session-level advisory lock,
``pg_try_advisory_lock(NAMESPACE, box_key(name))``, taken on a connection of its own
(never the pool's: a pooled session is lent to other work, and its locks would go with
it). PostgreSQL releases the locks when the session ends, however it ends: a clean stop,
a killed process, a terminated backend, a server restart. The decisions are
``fritzbox.leadership``'s; this module only speaks to the server.

A frozen leader's session must end on its own, or no standby could ever take over: the
session sets ``idle_session_timeout`` (PostgreSQL 14 and later: a session idle that long
is ended by the server; the leader's heartbeats keep it busy every second) and short TCP
keepalives (a host that is gone stops answering them). ``application_name`` names the
instance, so that ``pg_stat_activity`` (and ``dpvoip check``) show who holds each lock.

When an instance takes a lock it writes the box's term (a fresh token with its name) in
``dpvoip.instance_fact``, and learns whose term was there: a leader that lost its session
and takes the lock again knows whether anyone led in between.
"""

from __future__ import annotations

import contextlib
import hashlib
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import psycopg2
from psycopg2.extensions import make_dsn, parse_dsn
from twisted.logger import Logger
from twisted.python.failure import Failure

from dpvoip.core.errors import summary
from dpvoip.store.pool import PooledConnection

log = Logger(namespace="dpvoip.leases")

#: The first key of every dpvoip box lock ("dpvp"): the two-key form never meets the
#: single-key locks of the migrations or of the missed-call tickets.
NAMESPACE = 0x64707670
#: Milliseconds a lease session may stay idle before the server ends it.
IDLE_SESSION_TIMEOUT_MS = 5000
#: TCP keepalives the server uses on the lease session: a gone host is noticed in ~5 s.
SERVER_KEEPALIVES = {"tcp_keepalives_idle": 2, "tcp_keepalives_interval": 1,
                     "tcp_keepalives_count": 3}
#: How a lease session names itself (``application_name``), before the instance's name.
PREFIX = "dpvoip lease "
#: PostgreSQL keeps at most this many bytes of ``application_name``.
NAME_BYTES = 63
_TERM_KEY = "fritzbox leader: "


def box_key(name: str) -> int:
    """The box's lock key: stable across versions and hosts (not Python's ``hash``),
    in 0..2**31-1 so that it reads the same as an ``oid`` in ``pg_locks``."""
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:4], "big") & 0x7FFFFFFF


def application_name(instance: str) -> str:
    """``dpvoip lease <instance>``, cut to what PostgreSQL keeps (on a character)."""
    name = PREFIX + instance
    while len(name.encode()) > NAME_BYTES:
        name = name[:-1]
    return name


def instance_of(application: str | None) -> str | None:
    """The instance's name in a lease session's ``application_name`` (None: not one)."""
    if not application or not application.startswith(PREFIX):
        return None
    return application[len(PREFIX):]


def lease_dsn(dsn: str, instance: str) -> str:
    """The pool's connection string with the lease session's own name and keepalives
    (the server's side of them: ``-c`` options, next to the statement timeout)."""
    options = parse_dsn(dsn).get("options", "")
    extra = " ".join(f"-c {key}={value}" for key, value in SERVER_KEEPALIVES.items())
    return make_dsn(dsn, application_name=application_name(instance),
                    options=f"{options} {extra}".strip())


@dataclass(frozen=True)
class Tried:
    """What one heartbeat learnt: locks got (with the term that was there before) and
    locks refused (with the holder's instance name, when it is a dpvoip lease)."""

    granted: dict[str, str | None]
    refused: dict[str, str | None]


class _LeaseSession(PooledConnection):
    """A lease session: its loss (the server hung up, a statement failed on a dropped
    socket) is reported once, to the lease connection, instead of healed here."""

    def __init__(self, reactor: Any, lost: Callable[[Failure], None]) -> None:
        super().__init__(reactor=reactor)
        self._lost = lost

    def start_over(self, reason: Failure) -> None:
        lost, self._lost = self._lost, lambda _: None
        lost(reason)


class LeaseConnection:
    """One session at a time; ``connect`` again after a loss (the caller's back-off)."""

    def __init__(self, reactor: Any, dsn: str, instance: str,
                 connect_timeout: float = 5.0) -> None:
        self._reactor = reactor
        self._dsn = lease_dsn(dsn, instance)
        self.instance = instance
        self._connect_timeout = connect_timeout
        self._session: _LeaseSession | None = None
        self._terms: dict[str, str] = {}  # box -> the term this instance last wrote
        self.on_lost: Callable[[str], None] = lambda why: None
        self.idle_timeout = True  # False: the server has no idle_session_timeout

    @property
    def connected(self) -> bool:
        return self._session is not None and not self._session.gone

    async def connect(self) -> None:
        """A new session (the old one closed first); raises when it cannot be made."""
        self.close()
        session = _LeaseSession(self._reactor, self._session_lost)
        session.connect_timeout = self._connect_timeout
        self._session = session
        try:
            await session.connect(self._dsn)
            await self._settings(session)
        except Exception:
            self._session = None
            with contextlib.suppress(Exception):
                session.close()
            raise

    async def _settings(self, session: _LeaseSession) -> None:
        try:
            await session.runOperation("SET idle_session_timeout = %s",
                                       (IDLE_SESSION_TIMEOUT_MS,))
        except psycopg2.errors.UndefinedObject:
            # PostgreSQL 13 or older: a frozen leader's session then ends only when its
            # host stops answering keepalives; a merely stopped process keeps it.
            if self.idle_timeout:
                log.warn("this PostgreSQL has no idle_session_timeout (before 14): a "
                         "frozen leader keeps its boxes until its host stops answering")
            self.idle_timeout = False

    def _session_lost(self, reason: Failure) -> None:
        self._session = None
        self.on_lost(summary(reason.value or "the connection was lost"))

    def _live(self) -> _LeaseSession:
        session = self._session
        if session is None or session.gone:
            raise psycopg2.OperationalError("the lease connection is not connected")
        return session

    async def heartbeat(self, boxes: Sequence[str]) -> Tried:
        """One round: ask for the lock of each of ``boxes`` (those not held); for each
        got, write this instance's new term and read the one it replaced; for each
        refused, who holds it. With no box to ask for, ``SELECT 1``: the session is
        alive and busy (``idle_session_timeout`` counts from its last statement)."""
        session = self._live()
        try:
            if not boxes:
                await session.runQuery("SELECT 1")
                return Tried({}, {})
            keys = {box_key(name): name for name in boxes}
            rows = await session.runQuery(
                "SELECT k, pg_try_advisory_lock(%s, k) FROM unnest(%s::int[]) AS k",
                (NAMESPACE, list(keys)))
            got = [keys[int(k)] for k, ok in rows if ok]
            granted = {name: await self._term(session, name) for name in got}
            refused_keys = [int(k) for k, ok in rows if not ok]
            holders = await self._holders(session, refused_keys) if refused_keys else {}
            return Tried(granted, {keys[k]: holders.get(k) for k in refused_keys})
        except Exception as error:
            session.notice_loss(Failure(error))
            raise

    async def _term(self, session: _LeaseSession, box: str) -> str | None:
        term = f"{self.instance} {secrets.token_hex(8)}"
        rows = await session.runQuery(
            "WITH prior AS (SELECT value FROM dpvoip.instance_fact WHERE key = %s)"
            " INSERT INTO dpvoip.instance_fact (key, value) VALUES (%s, %s)"
            " ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value, updated_at = now()"
            " RETURNING (SELECT value FROM prior)", (_TERM_KEY + box, _TERM_KEY + box, term))
        self._terms[box], prior = term, rows[0][0]
        return prior if prior is None else str(prior)

    def last_term(self, box: str) -> str | None:
        """The term this process wrote when it last took ``box``'s lock."""
        return self._terms.get(box)

    async def _holders(self, session: _LeaseSession, keys: Sequence[int]
                       ) -> dict[int, str | None]:
        rows = await session.runQuery(_HOLDERS + " AND l.objid = ANY(%s::oid[])",
                                      (NAMESPACE, list(keys)))
        return {int(key): instance_of(name) for key, name in rows}

    def close(self) -> None:
        """End the session: PostgreSQL releases every lock it held."""
        session, self._session = self._session, None
        if session is not None:
            session.start_over = lambda reason: None  # type: ignore[method-assign]
            with contextlib.suppress(Exception):  # a dead connection may refuse to close
                session.close()


#: Every dpvoip box lock held in this database, with the holder's session name.
_HOLDERS = (
    "SELECT l.objid::bigint, a.application_name FROM pg_locks l"
    " JOIN pg_stat_activity a ON a.pid = l.pid"
    " WHERE l.locktype = 'advisory' AND l.objsubid = 2 AND l.granted"
    " AND l.classid = %s::oid"
    " AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())")


@dataclass(frozen=True)
class Holders:
    """Who holds each box lock (by key), and every lease session seen (instances)."""

    leaders: dict[int, str]  # key -> instance name
    instances: tuple[str, ...]


async def read_holders(cursor: Any) -> Holders:
    """Every box lock's holder and every dpvoip lease session, in one look (for
    ``dpvoip check``: works from any session, also a read-only transaction)."""
    await cursor.execute(_HOLDERS, (NAMESPACE,))
    leaders = {int(key): instance_of(name) or str(name) for key, name in cursor.fetchall()}
    await cursor.execute(
        "SELECT application_name FROM pg_stat_activity WHERE application_name LIKE %s"
        " AND datname = current_database() ORDER BY backend_start", (PREFIX + "%",))
    instances = tuple(name for (raw,) in cursor.fetchall()
                      if (name := instance_of(raw)) is not None)
    return Holders(leaders, instances)
