"""``dpvoip.box_status``: each Fritz!Box's state as the daemon last reported it.

The daemon writes it every few seconds (``fritzbox.service.BoxStatusReporter``), so that
``dpvoip check``, another process, can tell whether each box is connected and whether the
daemon is running at all (how old the last report is).
"""

from __future__ import annotations

import json
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

    def as_json(self, open_calls: int) -> dict[str, Any]: ...


def report_boxes(store: Store, boxes: Sequence[tuple[ReportedBox, int]]) -> Deferred[None]:
    """Upsert each (box status, open calls) in one transaction, stamped with the database's
    ``now()``."""

    async def write(cursor: Any) -> None:
        for s, open_calls in boxes:
            await cursor.execute(
                "INSERT INTO dpvoip.box_status (box, host, port, connected, since,"
                " last_line_at, reconnects, lines, bad_lines, open_calls, call_list,"
                " reported_at) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, now())"
                " ON CONFLICT (box) DO UPDATE SET host = EXCLUDED.host, port ="
                " EXCLUDED.port, connected = EXCLUDED.connected, since = EXCLUDED.since,"
                " last_line_at = EXCLUDED.last_line_at, reconnects = EXCLUDED.reconnects,"
                " lines = EXCLUDED.lines, bad_lines = EXCLUDED.bad_lines,"
                " open_calls = EXCLUDED.open_calls, call_list = EXCLUDED.call_list,"
                " reported_at = now()",
                (s.name, s.host, s.port, s.connected, s.since, s.last_line_at,
                 s.reconnects, s.lines, s.bad_lines, open_calls,
                 _json(s.as_json(open_calls).get("call_list"))),
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
    call_list: dict[str, Any] | None = None  # the call list's status (TR-064 boxes)
    pinned: str | None = None  # the TLS fingerprint pinned for its TR-064


async def reported_boxes(store: Store, schema_version: int = 11) -> dict[str, BoxReport]:
    """Every box's last report, by box name, with its pinned TR-064 certificate (from
    schema version 11 on: an older schema, not migrated yet, is read as it is)."""
    listed = schema_version >= 11
    rows = await store.read(
        "SELECT b.box, b.connected, b.since, b.last_line_at, b.reconnects, b.bad_lines,"
        " extract(epoch FROM now() - b.reported_at), "
        + ("b.call_list, s.certificate_sha256 FROM dpvoip.box_status b"
           " LEFT JOIN dpvoip.call_list_state s USING (box)" if listed
           else "NULL, NULL FROM dpvoip.box_status b"))
    return {row[0]: BoxReport(row[1], row[2], row[3], row[4], row[5], float(row[6]),
                              row[7], row[8])
            for row in rows}


def _json(value: Any) -> str | None:
    return None if value is None else json.dumps(value)
