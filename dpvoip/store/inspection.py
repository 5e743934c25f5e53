"""What ``dpvoip check`` reads: the database as it is, and what the running daemon wrote
about itself, in one read-only transaction.

The check is another process than the daemon, often run with another environment (an
administrator's shell, not the service's). So it shows the daemon's own account where
there is one: each box as the daemon reports it (``dpvoip.box_status``: the address it
really connects to, its state, how old the report is), the phone directory as the daemon
built it (its watermarks and entries). ``SET TRANSACTION READ ONLY`` makes "only looks" a
promise PostgreSQL keeps.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from dpvoip.crm.schema import REQUIRED
from dpvoip.store.boxes import BoxReport
from dpvoip.store.database import Store
from dpvoip.store.leases import Holders, box_key, read_holders
from dpvoip.store.migrations import read_catalogue, schema_version
from dpvoip.store.privileges import Lacking, missing_privileges


@dataclass(frozen=True)
class DaemonBox:
    """A box as the daemon last reported it: the address it uses and its state."""

    name: str
    host: str
    port: int
    report: BoxReport


@dataclass(frozen=True)
class DirectoryBuilt:
    """The phone directory as the daemon keeps it: entries per source, and per source
    the region it was built for and how far it has been refreshed."""

    sizes: dict[str, int]
    watermarks: dict[str, tuple[str, datetime]]


@dataclass(frozen=True)
class Observed:
    present: dict[str, set[str]]  # the CRM's tables and columns this user can see
    existing: frozenset[str]  # the CRM's tables that exist, seen or not
    schema_version: int
    lacking: Lacking | None = None  # attached mode only
    directory: DirectoryBuilt | None = None  # once dpvoip's schema has it
    boxes: dict[str, DaemonBox] = field(default_factory=dict)
    leases: Holders | None = None  # who holds each box's lock, every instance's lease


def leader_of(leases: Holders | None, box: str) -> str | None:
    """The instance that holds ``box``'s lock now (None: no instance does)."""
    return None if leases is None else leases.leaders.get(box_key(box))


async def observe(store: Store, crm_schema: str, attached: bool) -> Observed:
    """Everything ``dpvoip check`` shows from the database, read-only."""

    async def look(cursor: Any) -> Observed:
        await cursor.execute("SET TRANSACTION READ ONLY")
        present = await read_catalogue(cursor, crm_schema)
        await cursor.execute(
            "SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
            " WHERE n.nspname = %s AND c.relname = ANY(%s)", (crm_schema, [*REQUIRED]))
        existing = frozenset(str(row[0]) for row in cursor.fetchall())
        version = await schema_version(cursor)
        lacking = await missing_privileges(cursor, crm_schema) if attached else None
        directory = await _directory(cursor) if version >= 3 else None
        boxes = await _boxes(cursor, version) if version >= 5 else {}
        leases = await read_holders(cursor)
        return Observed(present, existing, version, lacking, directory, boxes, leases)

    return await store.write(look)


async def _directory(cursor: Any) -> DirectoryBuilt:
    await cursor.execute("SELECT source, count(*) FROM dpvoip.directory_entry GROUP BY source")
    sizes = {str(source): int(count) for source, count in cursor.fetchall()}
    await cursor.execute("SELECT source, region, updated_to FROM dpvoip.directory_watermark")
    marks = {str(source): (str(region), updated) for source, region, updated in cursor.fetchall()}
    return DirectoryBuilt(sizes, marks)


async def _boxes(cursor: Any, version: int) -> dict[str, DaemonBox]:
    listed = version >= 11
    await cursor.execute(
        "SELECT b.box, b.host, b.port, b.connected, b.since, b.last_line_at, b.reconnects,"
        " b.bad_lines, extract(epoch FROM now() - b.reported_at), "
        + ("b.call_list, s.certificate_sha256 FROM dpvoip.box_status b"
           " LEFT JOIN dpvoip.call_list_state s USING (box)" if listed
           else "NULL, NULL FROM dpvoip.box_status b")
        + " ORDER BY b.box")
    return {
        row[0]: DaemonBox(row[0], row[1], int(row[2]), BoxReport(
            row[3], row[4], row[5], row[6], row[7], float(row[8]), row[9], row[10]))
        for row in cursor.fetchall()
    }
