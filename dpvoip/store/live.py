"""``dpvoip.live_event``: every change of a call and of a box, written (and announced with
NOTIFY) in the transaction that made it; read back for the browsers that missed some;
pruned by age. And the one connection that LISTENs for the announcements.

The rows are written by the call statements (``store.calls``, ``store.call_list``) with
the fragments below, one CTE more in each, and for the boxes by a trigger on
``dpvoip.box_status`` (migration 12) when a box's connection changes: nothing is announced
that did not commit, and every dpvoip attached to the database hears it. The
NOTIFY payload carries the event's id; readers take the event itself from the table
(``id > last settled``), so a reader that was away (a PostgreSQL restart) catches up from
the same place it reads live.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from typing import Any

from twisted.internet.defer import CancelledError, Deferred, fail
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from txpostgres import reconnection, retrying

from dpvoip.core.errors import summary
from dpvoip.crm.schema import quote_ident
from dpvoip.live.events import LiveEvent, Viewer, digits, legs
from dpvoip.store.database import Store
from dpvoip.store.pool import PooledConnection, backoff_delays

log = Logger(namespace="dpvoip.live")

#: The channel the changes are announced on (the call statements' ``NOTIFY_CHANNEL``).
CHANNEL = "dpvoip_calls"

#: A timestamptz SQL expression as the wire writes times: ISO 8601, UTC, to the second.
UTC_SQL = "to_char(({}) AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"')"

_INSERT = "INSERT INTO dpvoip.live_event (kind, call_id, legs, data)"


def given_call_event(source: str, legs_param: str, data_param: str) -> str:
    """A CTE body: a ``call`` event whose data (and raw legs) the caller built, once per
    row of CTE ``source`` (which has ``call_id``). Returns id."""
    return (f"{_INSERT} SELECT 'call', s.call_id, {legs_param}::text[], {data_param}::jsonb"
            f" FROM {source} s RETURNING id")


def _client(crm: str, call_id: str, client_id: str) -> str:
    """The caller as the call's first event named them (the directory match at write
    time), else the call row's CRM client."""
    return (
        "coalesce((SELECT nullif(e.data->'client', 'null'::jsonb) FROM dpvoip.live_event e"
        f" WHERE e.call_id = {call_id} ORDER BY e.id LIMIT 1),"
        " (SELECT jsonb_build_object('id', p.id, 'name', p.eponimia)"
        f" FROM {crm}.accounting_clientprofile p WHERE p.id = {client_id}))"
    )


def row_call_event(crm: str, source: str, changes_param: str) -> str:
    """A CTE body: a ``call`` event for each row of CTE ``source`` (call_id, client_id),
    its data read from the call's detail row as it was before this statement, with
    ``changes_param`` (a JSON object: state, outcome, extension, at ...) on top. Returns
    id."""
    return (
        f"{_INSERT} SELECT 'call', d.call_id,"
        " array_remove(ARRAY[d.own_number, d.line, d.extension::text], NULL),"
        " jsonb_build_object('call_id', d.call_id, 'state', 'ringing', 'direction',"
        " d.direction, 'number', coalesce(d.remote_number, ''), 'client',"
        f" {_client(crm, 'd.call_id', 's.client_id')}, 'extension', d.extension,"
        " 'outcome', NULL, 'status', 'active', 'duration', NULL,"
        f" 'at', {UTC_SQL.format('now()')}, 'box', CASE WHEN d.source = 'zadarma'"
        f" THEN 'zadarma' ELSE d.box END) || {changes_param}::jsonb"
        f" FROM {source} s JOIN dpvoip.call_detail d ON d.call_id = s.call_id RETURNING id"
    )


def ticket_event(crm: str, source: str, action: str, count: str) -> str:
    """A CTE body: the ``call`` event of an ended missed call (``changes`` parameter) and
    its ticket's event, in that order, for each row of CTE ``source`` (call_id, client_id,
    ticket). ``action`` and ``count`` are SQL expressions. Returns id, kind, call_id,
    data, in the order inserted."""
    client = _client(crm, "d.call_id", "s.client_id")
    return (
        f"{_INSERT} SELECT kind, call_id, legs, data FROM (SELECT 0 AS n, 'call' AS kind,"
        " d.call_id, array_remove(ARRAY[d.own_number, d.line, d.extension::text], NULL)"
        " AS legs, jsonb_build_object('call_id', d.call_id, 'state', 'ringing',"
        " 'direction', d.direction, 'number', coalesce(d.remote_number, ''), 'client',"
        f" {client}, 'extension', d.extension, 'outcome', NULL, 'status', 'active',"
        f" 'duration', NULL, 'at', {UTC_SQL.format('now()')}, 'box', CASE WHEN d.source ="
        " 'zadarma' THEN 'zadarma' ELSE d.box END) || %(changes)s::jsonb AS data"
        f" FROM {source} s JOIN dpvoip.call_detail d ON d.call_id = s.call_id"
        " UNION ALL SELECT 1, 'ticket', d.call_id,"
        " array_remove(ARRAY[d.own_number, d.line, d.extension::text], NULL),"
        " jsonb_build_object('ticket_id', s.ticket, 'call_id', d.call_id, 'number',"
        f" coalesce(d.remote_number, ''), 'client', {client}, 'count', {count},"
        f" 'action', {action})"
        f" FROM {source} s JOIN dpvoip.call_detail d ON d.call_id = s.call_id) AS x"
        " ORDER BY n RETURNING id, kind, call_id, data"
    )


def announce(channel: str, payload: str, source: str = "live") -> str:
    """A CTE body: NOTIFY of each event of CTE ``source`` (id): ``payload`` (a JSON
    object, SQL) with the event's id added; far below NOTIFY's 8000 bytes."""
    return (f"SELECT pg_notify({channel}, ({payload}::jsonb"
            f" || jsonb_build_object('id', l.id))::text) FROM {source} l")


_SINCE = ("SELECT id, kind, data, legs FROM dpvoip.live_event WHERE id > %s"
          " AND NOT id = ANY(%s::bigint[]) ORDER BY id LIMIT %s")
EVENT_WINDOW = ("SELECT (SELECT min(id) FROM dpvoip.live_event),"
           " (SELECT CASE WHEN is_called THEN last_value ELSE 0 END"
           " FROM dpvoip.live_event_id_seq)")


class LiveEvents:
    """Reads of ``dpvoip.live_event`` and of the CRM users who watch it."""

    def __init__(self, store: Store, crm_schema: str) -> None:
        self._store = store
        self._crm = quote_ident(crm_schema)

    async def since(self, after: int, limit: int = 1000,
                    skip: Sequence[int] = ()) -> list[LiveEvent]:
        """The events with an id above ``after`` (but those in ``skip``), oldest first,
        at most ``limit``."""
        rows = await self._store.read(_SINCE, (after, list(skip), limit))
        return [_event(row) for row in rows]

    async def window(self) -> tuple[int | None, int]:
        """(the oldest id kept, the newest id ever issued): what a browser's Last-Event-ID
        is compared with."""
        rows = await self._store.read(EVENT_WINDOW)
        oldest, newest = rows[0]
        return (None if oldest is None else int(oldest)), int(newest)

    async def prune(self, keep_minutes: float) -> int:
        """Forget the events older than ``keep_minutes``; how many went."""
        rows = await self._store.write_one(
            "WITH gone AS (DELETE FROM dpvoip.live_event WHERE at < now() - %s"
            " * interval '1 minute' RETURNING 1) SELECT count(*) FROM gone",
            (keep_minutes,))
        return int(rows[0][0])

    async def viewer(self, user_id: int) -> Viewer:
        """The CRM user as the stream filters for them: staff or not, and the numbers of
        their active connections (as digits)."""
        rows = await self._store.read(
            f"SELECT u.is_staff AND u.is_active, coalesce((SELECT array_agg(c.number)"
            f" FROM {self._crm}.voip_connection c WHERE c.owner_id = u.id AND c.active),"
            f" '{{}}'), (SELECT p.pbx_number FROM {self._crm}.common_userprofile p"
            f" WHERE p.user_id = u.id) FROM {self._crm}.auth_user u WHERE u.id = %s",
            (user_id,))
        if not rows:
            return Viewer(user_id, False)
        staff, numbers, extension = rows[0]
        own = {digits(n) for n in [*numbers, extension]} - {""}
        return Viewer(user_id, bool(staff), frozenset(own))


def _event(row: Sequence[Any]) -> LiveEvent:
    ident, kind, data, raw_legs = row
    return LiveEvent(int(ident), str(kind), data, tuple(legs(*(raw_legs or ()))))


class _ListenDetector(reconnection.DeadConnectionDetector):  # type: ignore[misc]
    """Reconnects the LISTEN connection forever (capped back-off); each recovery is
    reported, so that LISTEN is issued again and the missed events are read."""

    def __init__(self, reactor: IReactorTime, recovered: Callable[[], None]) -> None:
        super().__init__(reconnectionIterator=lambda: backoff_delays(0.5, 5.0),
                         reactor=reactor)
        self._recovered = recovered
        self._retrying: Deferred[Any] | None = None
        self.closed = False

    def startReconnecting(self, f: Failure) -> None:
        if self.closed:
            return
        log.warn("live events: LISTEN connection lost ({error}); reconnecting",
                 error=summary(f.value or ""))
        call = retrying.RetryingCall(self.reconnect)
        call.reactor = self.reactor
        self._retrying = call.start(self.reconnectionIterator())
        self._retrying.addCallback(lambda _: self.connectionRecovered())
        self._retrying.addErrback(lambda f: f.trap(CancelledError))

    def reconnect(self) -> Deferred[Any]:
        if self.closed:
            return fail(CancelledError())
        return super().reconnect()  # type: ignore[no-any-return]

    def connectionRecovered(self) -> None:
        self._retrying = None
        super().connectionRecovered()
        self._recovered()

    def stop(self) -> None:
        self.closed = True
        if self._retrying is not None:
            retrying_call, self._retrying = self._retrying, None
            retrying_call.cancel()


class _ListeningConnection(PooledConnection):
    """The LISTEN connection. psycopg2 moves an announcement into ``notifies`` only when
    it polls; one that arrives in the same read as the answer to a query on this
    connection (the feed reads the table on it) is parsed after that poll and would wait,
    the socket quiet, for the connection's next traffic: the next announcement, minutes
    later in a quiet office. So each finished query polls once more."""

    def cursorFinished(self, cursor: Any) -> None:  # txpostgres calls it by this name
        super().cursorFinished(cursor)
        pollable = self.pollable()
        if pollable is None or pollable.closed:
            return
        with contextlib.suppress(Exception):  # a dying connection: its loss is seen anyway
            pollable.poll()
        self.checkForNotifies()


class ListenConnection:
    """A connection of its own (not the pool's: a pooled one would lose its LISTEN to
    the next borrower's work) that LISTENs on ``CHANNEL``. ``on_notify`` hears every
    announcement; ``on_listening`` each time LISTEN is in place, at the first connect
    and after every reconnect: the moment to read what was missed meanwhile."""

    def __init__(self, reactor: Any, dsn: str, connect_timeout: float = 5.0) -> None:
        self._dsn = dsn
        self._on_notify: Callable[[str], None] = lambda payload: None
        self._on_listening: Callable[[], None] = lambda: None
        self._connection = _ListeningConnection(reactor=reactor)
        self._connection.connect_timeout = connect_timeout
        self._detector = _ListenDetector(reactor, self._listen)
        self._connection.detector = self._detector
        self._connection.addNotifyObserver(lambda notify: self._on_notify(notify.payload))
        self.listening = False

    def watch(self, on_notify: Callable[[str], None], on_listening: Callable[[], None]
              ) -> None:
        """Who hears the announcements, and each time LISTEN is in place."""
        self._on_notify = on_notify
        self._on_listening = on_listening

    def start(self) -> Deferred[None]:
        """Connect and LISTEN; fires after the first attempt whatever its outcome (a
        PostgreSQL not there yet is waited for by the reconnection loop)."""
        attempt: Deferred[Any] = self._connection.connect(self._dsn)
        attempt.addCallback(lambda _: self._listen())
        attempt.addErrback(self._detector.checkForDeadConnection)
        attempt.addErrback(lambda _: None)
        return attempt

    def _listen(self) -> None:
        self.listening = False
        issued: Deferred[Any] = self._connection.runOperation("LISTEN " + CHANNEL)

        def listening(_: object) -> None:
            self.listening = True
            log.info("live events: listening on {channel}", channel=CHANNEL)
            self._on_listening()

        def failed(failure: Failure) -> None:
            # The connection died under the LISTEN: the detector reconnects it (and comes
            # back here); anything else is worth a line.
            if not self._detector.deathChecker(failure):
                log.warn("live events: LISTEN failed ({error})", error=summary(failure.value or ""))
            self._connection.notice_loss(failure)

        issued.addCallbacks(listening, failed)

    async def since(self, after: int, limit: int, skip: Sequence[int]) -> list[LiveEvent]:
        """As ``LiveEvents.since``, on this connection: it is up exactly when events are
        announced, whatever the pool's state."""
        rows = await self._connection.runQuery(_SINCE, (after, list(skip), limit))
        return [_event(row) for row in rows]

    async def newest(self) -> int:
        """The newest event id ever issued (0: none yet)."""
        rows = await self._connection.runQuery(EVENT_WINDOW)
        return int(rows[0][1])

    def stop(self) -> None:
        self.listening = False
        self._detector.stop()
        with contextlib.suppress(Exception):  # a dead connection may refuse to close
            self._connection.close()
