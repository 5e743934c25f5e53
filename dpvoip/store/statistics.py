"""Keeping PostgreSQL's plans of dpvoip's hot statements true to the tables' sizes.

Each pool connection plans a hot statement once (``PREPARE``) and keeps that plan until
PostgreSQL's statistics of a table it reads change. A plan made while a table was nearly
empty (a new installation, dpvoip's own tables, a test or a bench) scans the whole table,
and keeps scanning it as it grows: measured, the database's time per recorded call grew
from 1.9 to 7.9 ms over 9,000 calls until autovacuum's next ANALYZE (which waits a minute
between rounds, and for 10% of a table to change). So dpvoip analyzes the tables it
writes itself, as soon as they have grown by a good share since their last analysis: a
handful of quick ANALYZEs while a table is young (each replans the statements that read
it), then almost never. A table dpvoip's role does not own (the CRM's, on an attached
database whose owner is another role) is left to autovacuum: its ANALYZE needs the owner.
"""

from __future__ import annotations

from psycopg2 import sql

from dpvoip.store.database import Store

#: Writes since the last analysis that make a table's statistics stale: at least
#: ``FLOOR`` of them, and at least ``SHARE`` of the rows it had.
FLOOR = 200
SHARE = 0.2

#: dpvoip's own tables that grow with the calls, and the CRM's (in its schema).
OWN_TABLES = ("call_detail", "live_event", "zadarma_event", "zadarma_binding",
              "callback_request")
CRM_TABLES = ("accounting_voipcall", "accounting_voipcalllog", "accounting_ticket")


def stale(live_rows: int, changed: int, analyzed: bool,
          floor: int = FLOOR, share: float = SHARE) -> bool:
    """Whether a table with ``live_rows`` rows and ``changed`` writes since its last
    analysis (``analyzed``: it has had one) should be analyzed again."""
    if not analyzed:
        return changed >= floor or live_rows >= floor
    return changed >= floor and changed >= share * max(0, live_rows - changed)


class PlannerStatistics:
    """Reads the tables' write counts and analyzes the stale ones this role owns."""

    def __init__(self, store: Store, crm_schema: str = "public") -> None:
        self._store = store
        self._tables = ([f"dpvoip.{name}" for name in OWN_TABLES]
                        + [f"{crm_schema}.{name}" for name in CRM_TABLES])
        self.analyzed = 0  # ANALYZEs run since start

    async def refresh(self) -> list[str]:
        """ANALYZE every stale table this role may analyze; the ones analyzed."""
        rows = await self._store.read(
            "SELECT s.schemaname, s.relname, s.n_live_tup, s.n_mod_since_analyze,"
            " (s.last_analyze IS NOT NULL OR s.last_autoanalyze IS NOT NULL)"
            " FROM pg_stat_user_tables AS s JOIN pg_class AS c ON c.oid = s.relid"
            " WHERE s.relid IN (SELECT to_regclass(t) FROM unnest(%s::text[]) AS t)"
            " AND pg_has_role(current_user, c.relowner, 'USAGE')",
            (list(self._tables),))
        done: list[str] = []
        for schema, name, live, changed, analyzed in rows:
            if stale(int(live), int(changed), bool(analyzed)):
                await self._store.operation(
                    sql.SQL("ANALYZE {}").format(sql.Identifier(schema, name)))
                self.analyzed += 1
                done.append(f"{schema}.{name}")
        return done
