"""The database edge: shielded writes, a readiness probe, and draining at shutdown.

A write, once started, is never rolled back because the HTTP client that caused it went
away: Klein cancels a handler's Deferred on disconnect, and that cancellation would reach
the transaction. ``Store.write`` hands out a shield instead and keeps the real Deferred
for itself, so shutdown can wait for it.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import deferLater
from twisted.logger import Logger

from dpvoip.deferreds import EmptyableSet, race, shield
from dpvoip.store.pool import (
    HealingPool,
    ensure_prepared,
    numbered,
    positional,
    roll_back,
    run_prepared,
    statement_name,
)

T = TypeVar("T")
log = Logger()
#: The session setting that carries a statement's value past its COMMIT (``Batch.run``).
CARRIED = "dpvoip.carried"


def carry(value: str) -> str:
    """SQL setting ``value`` (a text expression) as the value ``Batch.run`` reads back
    after the COMMIT; the expression is also the column's value, for a run that does not
    commit (a step of a larger transaction reads it as a row). NULL is carried as ''
    (a setting cannot be NULL): the reader takes '' for none. Set at session level (a
    transaction's own setting would end with it), and set by every run of the statement,
    so no value is ever left over from an earlier transaction."""
    return f"set_config('{CARRIED}', coalesce(({value})::text, ''), false)"


#: The transaction's setting in which statements sent together tell whether each took
#: effect (``told``, ``Batch.run_told``).
TOLD = "dpvoip.told"


def told(rows: str) -> str:
    """A statement's last part that, instead of returning ``rows`` (a SELECT of a row id
    and a second column that must be computed for each row: it reads the statement's
    NOTIFY), appends to ``TOLD`` the id of its row ('' when there is none: the statement
    took no effect) and a comma, and returns the setting: statements sent together in one
    message (``Batch.run_told``) tell their outcomes in its one answer. The id is read
    only where the second column is not NULL, so that the NOTIFY is computed as before
    (a part that read the ids alone let the planner drop it)."""
    return (f"SELECT set_config('{TOLD}', coalesce(current_setting('{TOLD}', true), '')"
            f" || CASE WHEN max(r.n) IS NULL THEN '' ELSE max(r.id)::text END || ',', true)"
            f" FROM ({rows}) AS r(id, n)")


#: A named parameter of an EXECUTE text (``_execute_text``).
_PARAMETER = re.compile(r"%\((\w+)\)s")


class Batch:
    """One transaction on one connection, its BEGIN and COMMIT riding along with the first
    and last statements (psycopg2 sends several statements in one message): a hot-path
    transaction of three statements costs three round trips, not five."""

    def __init__(self, cursor: Any, connection: Any) -> None:
        self._cursor = cursor
        self._connection = connection
        self._begun = False
        self._done = False
        self._held = False

    def hold(self, held: bool = True) -> None:
        """From now on a step's last statement does not commit: several steps (the replay's
        events, a call list's calls) share this one transaction, committed by its owner
        (``hold(False)``: its next last statement commits again)."""
        self._held = held

    @property
    def held(self) -> bool:
        return self._held

    async def run_prepared(self, name: str, statement: str, params: tuple[Any, ...]
                           ) -> list[tuple[Any, ...]]:
        """A hot read inside this transaction, planned once per connection (see
        ``HealingPool.run_prepared``; the same per-connection record is used)."""
        return await run_prepared(self._connection, name, statement, params, self.run,
                                  self.run)

    async def run_planned(self, statement: str, params: Mapping[str, Any], prefix: str = "",
                          last: bool = False, carried: bool = False
                          ) -> list[tuple[Any, ...]]:
        """A hot statement with ``%(name)s`` parameters, planned once per connection: the
        server parses and plans it once, and each run sends a short EXECUTE instead of the
        whole text. ``prefix`` (a statement with the same parameters, planned once too)
        rides along in front, in a snapshot of its own (a lock taken before the statement
        reads); ``last``: the COMMIT rides along behind (and no rows come back, unless
        ``carried``: see ``run``)."""
        text = await self._execute_text(statement)
        if prefix:
            text = f"{await self._execute_text(prefix)}; {text}"
        return await self.run(text, params, last, carried)

    async def run_planned_together(self, statements: Sequence[tuple[str, Mapping[str, Any]]],
                                   last: bool = False) -> list[tuple[Any, ...]]:
        """Several hot statements (each planned once per connection, as ``run_planned``)
        sent in ONE message: a group of events costs one round trip here, not one each.
        The rows are the last statement's (none with ``last``: the COMMIT rides along
        behind)."""
        if not statements:
            await self._commit_if(last)
            return []
        texts: list[str] = []
        merged: dict[str, Any] = {}
        for n, (statement, params) in enumerate(statements):
            text = await self._execute_text(statement)
            # Each statement's parameters renamed apart: one message, one namespace.
            texts.append(_PARAMETER.sub(rf"%(\1_{n})s", text))
            merged.update({f"{name}_{n}": value for name, value in params.items()})
        return await self.run("; ".join(texts), merged, last)

    async def run_told(self, steps: Sequence[tuple[str, tuple[Any, ...]]],
                       last: bool = False) -> list[str]:
        """Several statements ending in ``told`` (``%s`` parameters, each planned once per
        connection) sent in ONE message, in order: what each told, the id of the row it
        wrote ('' when it took no effect). A replayed group's plain events cost one round
        trip for a run of them, not one each, and so do the tickets of its missed calls.
        ``last``: the COMMIT rides along (the outcomes carried past it, see ``run``)."""
        if not steps:
            await self._commit_if(last)
            return []
        texts = [f"SELECT set_config('{TOLD}', '', true)"]
        merged: list[Any] = []
        for statement, params in steps:
            text = numbered(statement)
            name = statement_name(text)
            await ensure_prepared(self._connection, name, text, self.run)
            texts.append(f"EXECUTE {name} ({', '.join(['%s'] * len(params))})")
            merged.extend(params)
        if last:
            texts.append("SELECT " + carry(f"current_setting('{TOLD}', true)"))
        answer: str = (await self.run("; ".join(texts), tuple(merged), last=last,
                                      carried=last))[0][0]
        outcomes = answer.split(",")[:-1]
        if len(outcomes) != len(steps):
            raise RuntimeError(f"{len(steps)} statements told {len(outcomes)} outcomes")
        return outcomes

    async def _execute_text(self, statement: str) -> str:
        """The EXECUTE of ``statement`` (PREPAREd on this connection first if need be)."""
        text, names = positional(statement)
        name = statement_name(text)
        await ensure_prepared(self._connection, name, text, self.run)
        arguments = ", ".join(f"%({n})s" for n in names)
        return f"EXECUTE {name} ({arguments})" if names else f"EXECUTE {name}"

    async def run(self, sql: str, params: Any = None, last: bool = False,
                  carried: bool = False) -> list[tuple[Any, ...]]:
        """``sql`` in the transaction; ``last``: the COMMIT rides along behind, and no rows
        come back (a message's answer is its last statement's). Unless ``carried``: the
        statement's one value is set as ``CARRIED`` (``carry``), which outlives the COMMIT
        and is read back in the same message: ``[(value,)]``, a row that costs no round
        trip of its own (a new ticket's id, made by its INSERT, for the log)."""
        if self._held:
            last = False
        text = sql
        if not self._begun:
            text = "BEGIN; " + text
        if last:
            text += "; COMMIT"
            if carried:
                text += f"; SELECT current_setting('{CARRIED}', true)"
        self._begun = True
        await self._cursor.execute(text, params)
        self._done = last
        if (last and not carried) or self._cursor.description is None:
            return []
        rows: list[tuple[Any, ...]] = self._cursor.fetchall()
        return rows

    async def _commit_if(self, last: bool) -> None:
        """A message with nothing to send that should have carried the COMMIT: the
        COMMIT alone, unless the batch is held (its owner commits it, as ``run`` does)."""
        if last and not self._held:
            await self.finish()

    async def finish(self) -> None:
        if self._begun and not self._done:
            self._done = True
            await self._cursor.execute("COMMIT")

    async def abort(self) -> None:
        """Roll back what was begun; quietly when the connection went away with the
        transaction (see ``roll_back``)."""
        if self._begun and not self._done:
            self._done = True
            if self._connection is not None:
                await roll_back(self._connection, self._cursor)
                return
            with contextlib.suppress(Exception):  # a lost connection took the transaction
                await self._cursor.execute("ROLLBACK")


@dataclass(frozen=True)
class DatabaseState:
    reachable: bool
    live_connections: int


class Store:
    """Runs transactions on the pool; the only way the rest of dpvoip touches PostgreSQL."""

    def __init__(self, pool: HealingPool, clock: IReactorTime) -> None:
        self.pool = pool
        self._clock = clock
        self._in_flight: EmptyableSet[Deferred[Any]] = EmptyableSet()

    def write(self, interaction: Callable[[Any], Awaitable[T]]) -> Deferred[T]:
        """Run ``interaction`` in a transaction that commits even if the caller gives up."""
        return self._track(self.pool.run_interaction(interaction))

    def _track(self, inner: Deferred[T]) -> Deferred[T]:
        self._in_flight.add(inner)
        outer = shield(inner)
        # After the caller has its result: a write it starts at once (the spool replaying
        # the next record) is in flight before this one leaves, so a drain waits for it.
        inner.addBoth(lambda _: self._in_flight.discard(inner))
        return outer

    def write_one(self, sql: Any, params: Any = None) -> Deferred[list[tuple[Any, ...]]]:
        """One statement, atomic on its own (no BEGIN/COMMIT round trips), shielded."""

        async def run(connection: Any) -> list[tuple[Any, ...]]:
            return await _rows(connection.cursor(), sql, params)

        return self._track(self.pool.with_connection(lambda c: Deferred.fromCoroutine(run(c))))

    def write_prepared(self, name: str, statement: str, params: tuple[Any, ...]
                       ) -> Deferred[list[tuple[Any, ...]]]:
        """A hot statement (``$1, $2 ...``), atomic on its own and planned once per
        connection: a long statement sent whole is parsed and planned at every run, which
        costs the server more than running it."""

        async def run(connection: Any) -> list[tuple[Any, ...]]:
            cursor = connection.cursor()
            return await run_prepared(connection, name, statement, params,
                                      connection.runOperation,
                                      lambda sql, arguments: _rows(cursor, sql, arguments))

        return self._track(self.pool.with_connection(lambda c: Deferred.fromCoroutine(run(c))))

    def batch(self, steps: Callable[[Batch], Awaitable[T]]) -> Deferred[T]:
        """A transaction in as few round trips as possible (see ``Batch``), shielded."""

        async def run(connection: Any) -> T:
            batch = Batch(connection.cursor(), connection)
            try:
                result = await steps(batch)
                await batch.finish()
            except BaseException:
                await batch.abort()
                raise
            return result

        return self._track(self.pool.with_connection(lambda c: Deferred.fromCoroutine(run(c))))

    def read(self, sql: Any, params: Any = None) -> Deferred[list[tuple[Any, ...]]]:
        return self.pool.run_query(sql, params)

    def operation(self, sql: Any, params: Any = None) -> Deferred[None]:
        """A statement without result rows, outside any transaction (ANALYZE, VACUUM)."""
        return self.pool.run_operation(sql, params)

    def read_prepared(
        self, name: str, statement: str, params: tuple[Any, ...]
    ) -> Deferred[list[tuple[Any, ...]]]:
        """A hot read planned once per connection (see ``HealingPool.run_prepared``)."""
        return self.pool.run_prepared(name, statement, params)

    def pause(self, seconds: float) -> Deferred[None]:
        """Let other work reach the database between the steps of a long background job."""
        return deferLater(self._clock, seconds, lambda: None)

    def state(self, timeout: float = 1.0) -> Deferred[DatabaseState]:
        """Whether a query reaches PostgreSQL within ``timeout`` seconds now."""
        probe = self.pool.run_query("SELECT 1")
        reached = race(self._clock, probe.addCallback(lambda _: True), timeout, False)
        return reached.addCallback(
            lambda ok: DatabaseState(bool(ok), self.pool.live)
        )

    @property
    def writes_in_flight(self) -> int:
        return len(self._in_flight)

    def drain(self, timeout: float) -> Deferred[None]:
        """Wait (at most ``timeout`` seconds) for the writes under way to finish."""
        empty = self._in_flight.when_empty()
        waited = race(self._clock, empty.addCallback(lambda _: True), timeout, False)

        def report(finished: bool) -> None:
            if not finished:
                log.warn("shutdown: {n} database writes still running after {t}s",
                         n=len(self._in_flight), t=timeout)

        return waited.addCallback(report)


async def _rows(cursor: Any, sql: Any, params: Any) -> list[tuple[Any, ...]]:
    """``sql`` run on ``cursor``: its rows, or none for a statement that gives none."""
    await cursor.execute(sql, params)
    rows: list[tuple[Any, ...]] = cursor.fetchall() if cursor.description else []
    return rows


# -- what a failure means (for those outside the store, who may not know the drivers) -----


def is_unavailable(error: BaseException) -> bool:
    """Whether ``error`` means "PostgreSQL is not there now" (the connection is dead or
    could not be made) rather than "this statement is wrong": the work may be kept and
    tried again later (the spool does)."""
    from psycopg2 import InterfaceError, OperationalError
    from twisted.internet.error import ConnectionDone, ConnectionLost
    from txpostgres.reconnection import ConnectionDead

    # A connection closed under a query (ConnectionDone, ConnectionLost: txpostgres fails
    # the query with the socket's reason) is a connection gone, as ConnectionDead is.
    return isinstance(error, ConnectionDead | OperationalError | InterfaceError
                      | ConnectionDone | ConnectionLost)


def is_conflict(error: BaseException) -> bool:
    """Whether ``error`` is PostgreSQL undoing a transaction that crossed another (a
    deadlock, a serialisation failure): the work is right and may be tried again at once,
    on its own. (psycopg2 files these under OperationalError, as it files a lost server.)"""
    from psycopg2.extensions import TransactionRollbackError

    return isinstance(error, TransactionRollbackError)


def is_database_error(error: BaseException) -> bool:
    """Whether ``error`` came from the database at all: unavailable, or any error the
    driver reports (a refused statement, a broken constraint)."""
    from psycopg2 import Error

    return is_unavailable(error) or isinstance(error, Error)
