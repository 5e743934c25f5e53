"""The phone directory's index in ``dpvoip.directory_entry``, and the lookup against it.

Built once (then kept: a restart only catches up), refreshed from the CRM tables' update
timestamps every few seconds, swept of deleted records every minute. A lookup is one
round trip: the index finds candidates by number, the same query joins each one's live
row by primary key, and a hit counts only if the live column still holds the number
(its text unchanged since it was indexed, or parsed again to the same number).
No CRM table is ever scanned per call, and memory does not grow with the directory: rows
are read a page at a time.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from psycopg2 import sql
from twisted.internet.defer import Deferred
from twisted.logger import Logger

from dpvoip.core.matching import (
    SOURCE_BY_NAME,
    SOURCES,
    Candidate,
    Match,
    Source,
    choose,
    confirmed,
    entries,
)
from dpvoip.core.numbers import Dialling, normalise
from dpvoip.crm.schema import quote_ident
from dpvoip.store.database import Batch, Store

log = Logger(namespace="dpvoip.directory")

#: Rows normalised before the reactor gets a turn during a build or refresh: a few tens
#: of ms of phone number parsing, never the 0.4-0.8 s of a whole page of 5,000 (issue 21:
#: the reactor held for at most 50 ms at a time). The page itself is 1,000 rows by
#: default: reading one and writing its entries are steps the reactor cannot split.
NORMALISED_PER_TURN = 100
#: Rows a refresh remembers as indexed at their update time, so that the next refreshes
#: (which re-read the margin) skip them: the contacts and leads dpvoip itself touched
#: (``was_in_touch`` bumps their update time) were re-read and re-parsed every pass for a
#: minute, a share of a busy office's CPU. Past this many, rows are simply read again.
REMEMBERED_ROWS = 20_000


@dataclass
class IndexState:
    """What /readyz and ``dpvoip check`` tell about the directory."""

    built: bool = False
    entries: int = 0
    last_refresh: datetime | None = None
    last_build_seconds: float | None = None
    refreshed_rows: int = 0
    errors: int = 0
    sources: dict[str, int] = field(default_factory=dict)


class DirectoryIndex:
    def __init__(
        self,
        store: Store,
        crm_schema: str,
        where: Dialling,
        own_numbers: Sequence[str] = (),
        page_size: int = 1000,
        sweep_pause: float = 0.02,
        margin_seconds: float = 60.0,
    ) -> None:
        self._store = store
        self._schema = crm_schema
        self.where = where
        self.own_numbers = frozenset(n for n in (normalise(o, where) for o in own_numbers) if n)
        self._page = page_size
        self._sweep_pause = sweep_pause
        self._margin = margin_seconds
        self.state = IndexState()
        #: (written, deleted) counters of each table as last acted on
        self._seen: dict[str, tuple[int | None, int | None]] = {}
        #: source -> record id -> its update time when a refresh last indexed it (by
        #: source: a (source, id) pair per row made them 3.1 MiB at their bound, under a
        #: heavy load, against 2.1)
        self._indexed: dict[str, dict[int, datetime]] = {}
        self._lookup_sql = _lookup_sql(crm_schema)

    # -- reading the CRM -------------------------------------------------------------------

    def _table(self, source: Source) -> sql.Composed:
        return sql.SQL("{}.{}").format(sql.Identifier(self._schema), sql.Identifier(source.table))

    def _select(self, source: Source, condition: sql.Composable) -> sql.Composed:
        return sql.SQL("SELECT id, {updated}, {phones} FROM {table} WHERE {condition}"
                       " ORDER BY id LIMIT %(limit)s").format(
            updated=sql.Identifier(source.updated),
            phones=sql.SQL(", ").join(sql.Identifier(p) for p in source.phones),
            table=self._table(source),
            condition=condition,
        )

    async def _index_rows(self, source: Source, condition: sql.Composable,
                          params: dict[str, Any], fresh: bool = False) -> int:
        """Re-index every row of ``source`` matching ``condition``, a page at a time; how
        many were re-indexed. After a build (not ``fresh``), a row a refresh already
        indexed at its current update time is skipped (``REMEMBERED_ROWS``).

        Pipelined: while this process normalises one page, PostgreSQL reads the next and
        writes the previous one, so the two cores work at once. At most one page is held
        in memory besides the one being read.
        """
        query = self._select(source, sql.SQL("({}) AND id > %(after)s").format(condition))

        def page(after: int) -> Deferred[list[tuple[Any, ...]]]:
            return self._store.read(query, {**params, "after": after, "limit": self._page})

        rows = await page(-1)
        seen = 0
        writing: Deferred[None] | None = None
        while rows:
            following = page(rows[-1][0]) if len(rows) == self._page else None
            if not fresh:
                rows = self._not_indexed_yet(source, rows)
            seen += len(rows)
            found: list[tuple[str, int, str, str, str]] = []
            for start in range(0, len(rows), NORMALISED_PER_TURN):
                if start:
                    await self._store.pause(0)  # the reactor's turn: webhooks wait on it
                for row in rows[start:start + NORMALISED_PER_TURN]:
                    found.extend(entries(source, row[0], row[2:], self.where))
            if writing is not None:
                await writing
            ids = [] if fresh else [r[0] for r in rows]
            writing = Deferred.fromCoroutine(self._replace(source, ids, found))
            if not fresh:
                writing.addCallback(self._remember_indexed, source, rows)
            rows = await following if following is not None else []
        if writing is not None:
            await writing
        return seen

    def _not_indexed_yet(self, source: Source, rows: list[tuple[Any, ...]]
                         ) -> list[tuple[Any, ...]]:
        """``rows`` less those a refresh indexed at their current update time."""
        indexed = self._indexed.get(source.name, {})
        return [row for row in rows if indexed.get(row[0]) != row[1]]

    def _remember_indexed(self, _: None, source: Source, rows: list[tuple[Any, ...]]) -> None:
        """``rows`` are indexed as of their update time (their page is written)."""
        room = REMEMBERED_ROWS - sum(len(known) for known in self._indexed.values())
        indexed = self._indexed.setdefault(source.name, {})
        for row in rows[:max(0, room)]:
            indexed[row[0]] = row[1]

    def _forget_indexed_before(self, oldest: datetime) -> None:
        """Rows updated before ``oldest`` are never re-read: no need to remember them."""
        self._indexed = {name: {record: updated for record, updated in rows.items()
                                if updated >= oldest}
                         for name, rows in self._indexed.items()}

    async def _replace(
        self, source: Source, ids: list[int], found: list[tuple[str, int, str, str, str]]
    ) -> None:

        async def write(cursor: Any) -> None:
            if ids:
                # A join, not "= ANY(array)": on a table without statistics yet the planner
                # would test every row against the whole array.
                await cursor.execute(
                    "DELETE FROM dpvoip.directory_entry e USING unnest(%s::bigint[]) AS r(id)"
                    " WHERE e.source = %s AND e.record_id = r.id",
                    (ids, source.name),
                )
            if found:
                # Another instance may be building or refreshing the same records at the
                # same moment (two started together): the last writer's number stands,
                # rather than a unique violation failing this pass.
                await cursor.execute(
                    "INSERT INTO dpvoip.directory_entry (source, record_id, field, number, raw)"
                    " SELECT * FROM unnest(%s::text[], %s::bigint[], %s::text[], %s::text[],"
                    " %s::text[]) ON CONFLICT (source, record_id, field) DO UPDATE"
                    " SET number = EXCLUDED.number, raw = EXCLUDED.raw",
                    tuple(list(column) for column in zip(*found, strict=True)),
                )

        await self._store.write(write)

    # -- build, refresh, sweep -------------------------------------------------------------

    async def needs_build(self) -> bool:
        rows = await self._store.read(
            "SELECT source, region FROM dpvoip.directory_watermark"
        )
        known = {source: region for source, region in rows}
        return any(known.get(s.name) != self.where.region for s in SOURCES)

    async def build(self) -> int:
        """Index every record of every source (used once, and when the region changes)."""
        started = await self._now()
        count = 0
        for source in SOURCES:
            await self._forget(source)
            count += await self._index_rows(source, sql.SQL("true"), {}, fresh=True)
            await self._set_watermark(source, started)
        # Vacuumed at once (not by autovacuum in the middle of the first calls): its
        # visibility map lets lookups answer from the index alone.
        await self._store.operation("VACUUM (ANALYZE) dpvoip.directory_entry")
        self.state.built = True
        await self._count()
        return count

    async def refresh(self, sweep: bool = False, force: bool = False) -> int:
        """Re-index records updated since the last refresh (less the margin); sweep deletes.

        A table PostgreSQL's statistics show no write to since the last pass is skipped
        (its watermark stays, so nothing is missed when it is read again): at a million
        records each skipped scan spares a core a tenth of a second. Statistics can lag a
        few seconds and can be switched off, so ``force`` (every few minutes) reads all."""
        started = await self._now()
        marks = dict(await self._store.read(
            "SELECT source, updated_to FROM dpvoip.directory_watermark"
        ))
        activity = await self._activity()
        if marks:
            self._forget_indexed_before(min(marks.values()) - timedelta(seconds=self._margin))
        changed = 0
        for source in SOURCES:
            written, deleted = activity.get(source.table, (None, None))
            seen_written, seen_deleted = self._seen.get(source.table, (None, None))
            if force or written is None or written != seen_written:
                changed += await self._reindex_since(source, marks.get(source.name), started)
            if sweep and (force or deleted is None or deleted != seen_deleted):
                await self._sweep(source)
                seen_deleted = deleted
            self._seen[source.table] = (written, seen_deleted)
        self.state.built = True
        self.state.last_refresh = started
        self.state.refreshed_rows = changed
        if sweep:
            await self._count()
        return changed

    async def _activity(self) -> dict[str, tuple[int, int]]:
        """(rows inserted + updated, rows deleted) of each source table, as counted by
        PostgreSQL's statistics; tables it has no row for are simply absent."""
        rows = await self._store.read(
            "SELECT relname, n_tup_ins + n_tup_upd, n_tup_del FROM pg_stat_user_tables"
            " WHERE schemaname = %s AND relname = ANY(%s)",
            (self._schema, [source.table for source in SOURCES]),
        )
        return {name: (int(written), int(deleted)) for name, written, deleted in rows}

    async def _reindex_since(self, source: Source, since: datetime | None,
                             started: datetime) -> int:
        condition = sql.SQL("{} >= %(since)s - make_interval(secs => %(margin)s)").format(
            sql.Identifier(source.updated)
        )
        changed = await self._index_rows(
            source, condition, {"since": since or started, "margin": self._margin}
        )
        await self._set_watermark(source, started)
        return changed

    async def _forget(self, source: Source) -> None:
        """Empty the index of ``source`` before a full build (lookups miss it meanwhile)."""
        self._indexed.pop(source.name, None)

        async def write(cursor: Any) -> None:
            await cursor.execute(
                "DELETE FROM dpvoip.directory_entry WHERE source = %s", (source.name,)
            )

        await self._store.write(write)

    async def _sweep(self, source: Source) -> None:
        """Forget the entries of deleted records, ``page_size`` records per statement with a
        short pause between: at a million entries one anti-join over them all would keep a
        core of PostgreSQL busy for most of a second, and every call waiting meanwhile."""
        step = sql.SQL(
            "WITH chunk AS (SELECT DISTINCT record_id FROM dpvoip.directory_entry"
            " WHERE source = %(source)s AND record_id > %(after)s ORDER BY record_id"
            " LIMIT %(limit)s),"
            " gone AS (DELETE FROM dpvoip.directory_entry e WHERE e.source = %(source)s"
            " AND e.record_id IN (SELECT c.record_id FROM chunk c WHERE NOT EXISTS"
            " (SELECT 1 FROM {table} r WHERE r.id = c.record_id)) RETURNING 1)"
            " SELECT (SELECT max(record_id) FROM chunk), (SELECT count(*) FROM gone)"
        ).format(table=self._table(source))
        after = -1
        while True:
            [(last, _)] = await self._store.write_one(
                step, {"source": source.name, "after": after, "limit": self._page})
            if last is None:
                return
            after = last
            await self._store.pause(self._sweep_pause)

    async def _set_watermark(self, source: Source, moment: datetime) -> None:
        async def write(cursor: Any) -> None:
            await cursor.execute(
                "INSERT INTO dpvoip.directory_watermark (source, updated_to, region)"
                " VALUES (%s, %s, %s) ON CONFLICT (source) DO UPDATE"
                " SET updated_to = EXCLUDED.updated_to, region = EXCLUDED.region",
                (source.name, moment, self.where.region),
            )

        await self._store.write(write)

    async def _now(self) -> datetime:
        rows = await self._store.read("SELECT now()")
        moment: datetime = rows[0][0]
        return moment

    async def _count(self) -> None:
        self.state.sources = await directory_sizes(self._store)
        self.state.entries = sum(self.state.sources.values())

    # -- lookup ----------------------------------------------------------------------------

    def never_matches(self, number: str | None) -> bool:
        return number is None or number in self.own_numbers

    async def lookup(self, number: str | None, within: Batch | None = None) -> Match | None:
        """Who ``number`` (E.164, already normalised) belongs to; None when nobody or never.

        ``within``: run the lookup on that transaction's own connection. A transaction must
        never wait for a second pool connection: with as many such transactions as the pool
        has connections, all would wait for ever.
        """
        if number is None or self.never_matches(number):
            return None
        if within is not None:
            rows = await within.run_prepared("dpvoip_directory_lookup", self._lookup_sql,
                                             (number,))
        else:
            rows = await self._store.read_prepared("dpvoip_directory_lookup",
                                                   self._lookup_sql, (number,))
        return self._match(number, rows)

    async def lookup_all(self, numbers: Iterable[str | None], within: Batch
                         ) -> dict[str, Match | None]:
        """Who each of ``numbers`` belongs to, in one round trip of ``within``'s
        transaction (a replayed group's callers, read before its events are applied: one
        round trip for the group, not one per call); the numbers that never match are
        left out (``lookup`` answers them without the database)."""
        wanted = sorted({n for n in numbers if n is not None and not self.never_matches(n)})
        if not wanted:
            return {}
        rows = await within.run_prepared(
            "dpvoip_directory_lookup_all",
            f"SELECT w.number, {self.lookup_of('w.number')}"
            " FROM unnest($1::text[]) AS w(number)", (wanted,))
        return {number: self.match_of(number, found) for number, found in rows}

    def lookup_of(self, number: str) -> str:
        """The lookup as one JSON value (an array of rows, or NULL), to ride along in
        another statement that already runs at that moment: one round trip fewer. The
        number is the SQL text expression ``number`` (a column of the statement's rows:
        one lookup per row); read it with ``match_of``."""
        return (
            "(SELECT json_agg(json_build_array(l.s, l.i, l.n, l.e, l.a, extract(epoch FROM"
            " l.u), l.o, l.d, l.dn, l.f, l.r, l.x)) FROM ("
            + self._lookup_sql.replace("$1", f"({number})::text")
            + ") AS l(s, i, n, e, a, u, o, d, dn, f, r, x))"
        )

    def match_of(self, number: str | None, rows: list[list[Any]] | None) -> Match | None:
        """The match a ``lookup_of`` value gives for ``number``."""
        if number is None or self.never_matches(number):
            return None
        return self._match(number, [
            (*row[:5], datetime.fromtimestamp(float(row[5]), UTC), *row[6:])
            for row in rows or ()
        ])

    def _match(self, number: str, rows: Iterable[Sequence[Any]]) -> Match | None:
        candidates = []
        for (source, record_id, name, email, active, updated, owner_id, deal_id, deal_name,
             _column, raw, indexed) in rows:
            if not confirmed(number, raw, self.where, indexed):
                continue  # edited since it was indexed: the live row says otherwise
            candidates.append(Candidate(source, record_id, name or "", email, bool(active),
                                        updated, owner_id, deal_id, deal_name))
        match = choose(number, candidates)
        if match is not None and match.ambiguous:
            chosen = match.client or match.person
            log.info(
                "number {number} belongs to {n} CRM records; chose {kind} {id}",
                number=number, n=match.candidates,
                kind="client" if match.client else (match.person.kind if match.person else "-"),
                id=chosen.id if chosen else "-",
            )
        return match


def _texts(alias: str, source: Source) -> str:
    """Two columns: the live value of the column an index entry came from, and the entry's
    text of it when indexed."""
    whens = " ".join(f"WHEN '{p}' THEN {alias}.{quote_ident(p)}" for p in source.phones)
    return f"CASE h.field {whens} END, h.raw"


def _lookup_sql(schema: str) -> str:
    """One statement for the whole lookup: candidates by number, live rows by key, deals."""

    def table(name: str) -> str:
        return f"{quote_ident(schema)}.{quote_ident(name)}"

    person = ("concat_ws(' ', nullif(p.first_name, ''), nullif(p.middle_name, ''),"
              " nullif(p.last_name, ''))")

    def deal(key: str) -> str:
        return (f"LEFT JOIN LATERAL (SELECT d.id, d.name FROM {table('crm_deal')} d"
                f" WHERE d.{key} = p.id AND d.active ORDER BY d.update_date DESC, d.id DESC"
                " LIMIT 1) deal ON true")

    parts = [
        "SELECT 'client', c.id, c.eponimia, c.email, c.is_active, c.updated_at,"
        " NULL::integer, NULL::integer, NULL::text, h.field,"
        f" {_texts('c', SOURCE_BY_NAME['client'])}"
        f" FROM hit h JOIN {table('accounting_clientprofile')} c ON c.id = h.record_id"
        " WHERE h.source = 'client'",
        f"SELECT 'contact', p.id, {person}, p.email, true, p.update_date, p.owner_id,"
        f" deal.id, deal.name, h.field, {_texts('p', SOURCE_BY_NAME['contact'])}"
        f" FROM hit h JOIN {table('crm_contact')} p ON p.id = h.record_id"
        f" {deal('contact_id')} WHERE h.source = 'contact'",
        f"SELECT 'lead', p.id, coalesce(nullif({person}, ''), p.company_name), p.email, true,"
        " p.update_date, p.owner_id, deal.id, deal.name, h.field,"
        f" {_texts('p', SOURCE_BY_NAME['lead'])}"
        f" FROM hit h JOIN {table('crm_lead')} p ON p.id = h.record_id"
        f" {deal('lead_id')} WHERE h.source = 'lead'",
        "SELECT 'company', c.id, c.full_name, c.email, true, c.update_date, c.owner_id,"
        f" NULL::integer, NULL::text, h.field, {_texts('c', SOURCE_BY_NAME['company'])}"
        f" FROM hit h JOIN {table('crm_company')} c ON c.id = h.record_id"
        " WHERE h.source = 'company'",
    ]
    return ("WITH hit AS (SELECT source, record_id, field, raw FROM dpvoip.directory_entry"
            " WHERE number = $1) " + " UNION ALL ".join(parts))


async def directory_sizes(store: Store) -> dict[str, int]:
    """How many numbers the phone directory holds, per source (clients, contacts, ...):
    the daemon's index keeps its count with it, ``dpvoip check`` (another process) asks."""
    rows = await store.read(
        "SELECT source, count(*) FROM dpvoip.directory_entry GROUP BY source")
    return {str(source): int(count) for source, count in rows}
