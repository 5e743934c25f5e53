"""``dpvoip.box_status``: each Fritz!Box's state as the daemon last reported it.

The daemon writes it every few seconds (``fritzbox.service.BoxStatusReporter``), so that
``dpvoip check``, another process, can tell whether each box is connected and whether the
daemon is running at all (how old the last report is).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol

from twisted.internet.defer import Deferred

from dpvoip.store.database import Store


class ReportedBox(Protocol):
    """What is reported of a box (``fritzbox.box.BoxStatus`` has it)."""

    name: str
    host: str
    port: int
    connected: bool
    since: datetime | None
    last_line_at: datetime | None
    reconnects: int
    lines: int
    bad_lines: int


def report_boxes(store: Store, boxes: Sequence[tuple[ReportedBox, int]]) -> Deferred[None]:
    """Upsert each (box status, open calls) in one transaction, stamped with the database's
    ``now()``."""

    async def write(cursor: Any) -> None:
        for s, open_calls in boxes:
            await cursor.execute(
                "INSERT INTO dpvoip.box_status (box, host, port, connected, since,"
                " last_line_at, reconnects, lines, bad_lines, open_calls, reported_at)"
                " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, now())"
                " ON CONFLICT (box) DO UPDATE SET host = EXCLUDED.host, port ="
                " EXCLUDED.port, connected = EXCLUDED.connected, since = EXCLUDED.since,"
                " last_line_at = EXCLUDED.last_line_at, reconnects = EXCLUDED.reconnects,"
                " lines = EXCLUDED.lines, bad_lines = EXCLUDED.bad_lines,"
                " open_calls = EXCLUDED.open_calls, reported_at = now()",
                (s.name, s.host, s.port, s.connected, s.since, s.last_line_at,
                 s.reconnects, s.lines, s.bad_lines, open_calls),
            )

    return store.write(write)


@dataclass(frozen=True)
class BoxReport:
    """A box's last reported state, and how many seconds ago it was reported."""

    connected: bool
    since: datetime | None
    last_line_at: datetime | None
    reconnects: int
    bad_lines: int
    age_seconds: float


async def reported_boxes(store: Store) -> dict[str, BoxReport]:
    """Every box's last report, by box name."""
    rows = await store.read(
        "SELECT box, connected, since, last_line_at, reconnects, bad_lines,"
        " extract(epoch FROM now() - reported_at) FROM dpvoip.box_status")
    return {row[0]: BoxReport(row[1], row[2], row[3], row[4], row[5], float(row[6]))
            for row in rows}
