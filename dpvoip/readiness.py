"""What ``/readyz`` reports: whether dpvoip can record calls now, and why not.

Ready means: PostgreSQL answers, the schema is prepared, and the spool is not nearly full
and its disk takes writes (a full disk is an alarm: ``disk_error`` says what it refused).
The rest (the directory, the spool's figures, each Fritz!Box) is there for the
administrator. Everything is read at the moment of the request from the objects that own
it, handed in by the composition root: no figure is copied or kept here.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict
from datetime import datetime
from typing import Any, Protocol

from twisted.internet.defer import Deferred

from dpvoip.deferreds import OneShotObserver
from dpvoip.store.migrations import SchemaReport
from dpvoip.web.app import Readiness


class DatabaseState(Protocol):
    @property
    def reachable(self) -> bool: ...
    @property
    def live_connections(self) -> int: ...


class Database(Protocol):
    def state(self) -> Deferred[Any]: ...  # fires with a DatabaseState


class DirectoryState(Protocol):
    built: bool
    entries: int
    last_refresh: datetime | None
    errors: int


class Directory(Protocol):
    @property
    def state(self) -> DirectoryState: ...


class SpoolState(Protocol):
    @property
    def pending(self) -> int: ...
    @property
    def bytes(self) -> int: ...
    @property
    def limit(self) -> int: ...
    @property
    def alarm(self) -> bool: ...  # nearly full, or its disk refuses writes
    @property
    def disk_error(self) -> str: ...
    @property
    def disk_errors(self) -> int: ...
    @property
    def mark_behind(self) -> bool: ...


class Spool(Protocol):
    def state(self) -> SpoolState: ...


class Durable(Protocol):
    @property
    def spooling(self) -> bool: ...
    @property
    def counters(self) -> Any: ...  # a dataclass of counters


class Box(Protocol):
    @property
    def status(self) -> Any: ...  # BoxStatus: as_json(open_calls)
    @property
    def tracker(self) -> Any: ...  # CallTracker: open_calls


class Reporting(Protocol):
    """A provider as /readyz reads it (``providers.Provider``): said, never failed."""

    @property
    def name(self) -> str: ...
    @property
    def kind(self) -> str: ...
    @property
    def health(self) -> Callable[[], Any]: ...  # -> ProviderHealth: details, warnings


class Leases(Protocol):
    """Who reads each box (``fritzbox.service.BoxLeadership``)."""

    def describe(self, box: str) -> dict[str, Any]: ...  # leader, role, led_by, instance


class ReadinessReport:
    """The readiness probe the web app calls for ``/readyz``.

    A standby (another instance leads every box) is as ready as a leader: it takes
    webhooks and click-to-call, and takes a box over when its leader goes."""

    def __init__(self, database: Database, schema: OneShotObserver[SchemaReport],
                 standalone: bool, embedded: bool, directory: Directory, spool: Spool,
                 durable: Durable, boxes: Sequence[Box],
                 providers: Sequence[Reporting] = (), leases: Leases | None = None
                 ) -> None:
        self._providers = providers
        self._database = database
        self._schema = schema
        self._standalone = standalone
        self._embedded = embedded
        self._directory = directory
        self._spool = spool
        self._durable = durable
        self._boxes = boxes
        self._leases = leases

    def __call__(self) -> Deferred[Readiness]:
        return Deferred.fromCoroutine(self.report())

    async def report(self) -> Readiness:
        state: DatabaseState = await self._database.state()
        prepared = self._schema.peek()
        database = {
            "reachable": state.reachable,
            "live_connections": state.live_connections,
            "mode": prepared.mode if prepared else (
                "standalone" if self._standalone else "attached"),
            "schema_version": prepared.schema_version if prepared else None,
            "embedded": self._embedded,
        }
        listing = self._directory.state
        directory = {
            "built": listing.built,
            "entries": listing.entries,
            "last_refresh": listing.last_refresh.isoformat() if listing.last_refresh else None,
            "errors": listing.errors,
        }
        spooled = self._spool.state()
        spool = {"pending": spooled.pending, "bytes": spooled.bytes, "limit": spooled.limit,
                 "alarm": spooled.alarm, "disk_error": spooled.disk_error or None,
                 "disk_errors": spooled.disk_errors, "mark_behind": spooled.mark_behind,
                 "spooling": self._durable.spooling,
                 **asdict(self._durable.counters)}
        boxes = [self._box(b) for b in self._boxes]
        # Said, not failed: a box's call list that cannot be read costs recovery, while
        # the box's CallMonitor and everything else go on.
        warnings = [f"box {box['name']}: its call list cannot be read ({calls['kind']}):"
                    f" {calls['advice']}"
                    for box in boxes if (calls := box.get("call_list"))
                    and calls["state"] == "failing"]
        health = [(p, p.health()) for p in self._providers]
        warnings += [f"provider {p.name}: {line}" for p, h in health for line in h.warnings]
        checks: dict[str, Any] = {
            "database": database, "directory": directory, "spool": spool, "fritzbox": boxes,
            "warnings": warnings,
            "providers": [{"name": p.name, "kind": p.kind, **h.details} for p, h in health]}
        if self._leases is not None and self._boxes:
            checks["instance"] = self._leases.describe(boxes[0]["name"])["instance"]
        return Readiness(
            state.reachable and prepared is not None and not spooled.alarm, checks)

    def _box(self, box: Box) -> dict[str, Any]:
        """The box as this instance sees it, with its lead: ``leader`` (this instance
        reads it), ``role`` (leading, standby, lost: not sure of its lead) and
        ``led_by`` (the instance that holds its lock, as last seen)."""
        shown: dict[str, Any] = box.status.as_json(box.tracker.open_calls)
        if self._leases is not None:
            lead = self._leases.describe(shown["name"])
            shown.update(leader=lead["leader"], role=lead["role"], led_by=lead["led_by"])
        return shown
