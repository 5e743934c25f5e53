"""Zadarma's webhook journal pruned: its events and signed strings' owners older than
the time it is kept (``zadarma.retention``), a batch at a time, each batch a statement
of its own. A first pass over years of events must neither hold the tables nor make one
transaction of millions of rows while webhooks keep arriving."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

from dpvoip.store.database import Store

#: Rows deleted per statement.
PRUNE_BATCH = 5000

# The oldest rows found through the BRIN indexes on the arrival (migration 15).
PRUNE_EVENTS = (
    "WITH old AS (SELECT id FROM dpvoip.zadarma_event WHERE received_at < now() - %s"
    " LIMIT %s), gone AS (DELETE FROM dpvoip.zadarma_event e USING old WHERE e.id = old.id"
    " RETURNING 1) SELECT count(*) FROM gone"
)
PRUNE_BINDINGS = (
    "WITH old AS (SELECT signed_sha256, pbx_call_id FROM dpvoip.zadarma_binding"
    " WHERE bound_at < now() - %s LIMIT %s), gone AS (DELETE FROM dpvoip.zadarma_binding b"
    " USING old WHERE (b.signed_sha256, b.pbx_call_id) = (old.signed_sha256,"
    " old.pbx_call_id) RETURNING 1) SELECT count(*) FROM gone"
)


@dataclass(frozen=True)
class Pruned:
    """What one pass deleted."""

    events: int
    bindings: int


class ZadarmaJournal:
    def __init__(self, store: Store, batch: int = PRUNE_BATCH) -> None:
        self._store = store
        self._batch = batch

    async def prune(self, keep: timedelta) -> Pruned:
        """Delete the events that arrived, and the bindings made, more than ``keep`` ago
        (by the database's clock, which dated the bindings)."""
        events = await self._batches(PRUNE_EVENTS, keep)
        return Pruned(events, await self._batches(PRUNE_BINDINGS, keep))

    async def _batches(self, statement: str, keep: timedelta) -> int:
        total = 0
        while True:
            rows = await self._store.write_one(statement, (keep, self._batch))
            gone = int(rows[0][0])
            total += gone
            if gone < self._batch:
                return total
