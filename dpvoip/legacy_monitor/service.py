"""The old monitor's calls recorded through the same durable entry point as a box's.

``LegacyMonitor`` turns the contracts' requests into happenings for ``DurableIngest``
(committed, or spooled first: a request is answered 2xx only then) and answers with the
call's row, read back, or as it will be written while PostgreSQL is away.

A create answers with the row's id even while PostgreSQL is down: ids are reserved ahead
from the CRM table's sequence while it is up, and the spooled ``Started`` carries its id,
so that the replay inserts the row under the id the monitor was told. The calls created
while the database was away are kept in memory (id -> call) for the monitor's later
``PATCH /<id>/``; at start they are read again from the spool's pending records, so a
restart between the create and the update loses nothing. The ingest's ids and its
idempotent statements make a repeated create or update write nothing twice.
"""

from __future__ import annotations

import json
import os
from collections import OrderedDict
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime, tzinfo
from pathlib import Path
from typing import Any, Protocol, TypeVar

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from twisted.application.internet import TimerService
from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from dpvoip.calls.ingest import Origin
from dpvoip.core.happenings import Answered, Ended, Happening, Started
from dpvoip.core.numbers import Dialling, normalise
from dpvoip.deferreds import within
from dpvoip.legacy_monitor.contracts import (
    CallRow,
    Create,
    KnownCall,
    Update,
    api_key_matches,
    bearer_matches,
    dpvoip_call_id,
    expected_row,
    started,
    token_problem,
    update_happenings,
)
from dpvoip.spool.durable import NotRecorded, unavailable
from dpvoip.spool.records import BadRecord, read_record
from dpvoip.store.legacy_monitor import SOURCE, LegacyMonitorRows, recorded_calls

log = Logger(namespace="dpvoip.legacy_monitor")
T = TypeVar("T")

#: Ids reserved at a time, and the level below which more are reserved.
BLOCK, LOW = 32, 16
#: Calls remembered for the monitor's updates while the database is away.
REMEMBERED = 10_000
#: The file in the state folder the daemon writes its counters to, for ``dpvoip check``.
LEGACY_STATE = "legacy_monitor.json"


def monitor_origin(where: Dialling) -> Origin:
    """Where the old monitor's happenings come from (also what the spool's replay needs)."""
    return Origin(SOURCE, where, source=SOURCE)


class Unavailable(Exception):
    """Not recorded (no reserved id left, the spool full): 503, the monitor retries."""


class NotFound(Exception):
    """No call has that id: 404."""


class Recorder(Protocol):
    """``DurableIngest``'s entry point and whether it spools."""

    @property
    def spooling(self) -> bool: ...

    def submit(self, happening: Happening, origin: Origin) -> Deferred[None]: ...


@dataclass
class LegacyMonitorCounters:
    requests: int = 0
    created: int = 0
    duplicates: int = 0
    updated: int = 0
    refused: dict[str, int] = field(default_factory=dict)  # by reason


class LegacyMonitor:
    def __init__(self, token: str, zone: tzinfo, where: Dialling, own: frozenset[str],
                 recorder: Recorder, rows: LegacyMonitorRows, clock: IReactorTime,
                 ready: Callable[[], bool], label: str = "monitor",
                 deadline: float = 2.0) -> None:
        self._token = token
        self.zone = zone
        self._where = where
        self._own = own
        self._recorder = recorder
        self._rows = rows
        self._clock = clock
        self._ready = ready
        self._deadline = deadline
        self.label = label
        self.origin = monitor_origin(where)
        self.problem = token_problem(token)
        self.token_set = bool(token)
        self.counters = LegacyMonitorCounters()
        self._ids: list[int] = []
        self._refilling = False
        self._calls: OrderedDict[str, KnownCall] = OrderedDict()  # by dpvoip call id
        self._by_row: dict[int, str] = {}

    # -- who may ask -------------------------------------------------------------------------

    def bearer(self, header: bytes | None) -> bool:
        return bearer_matches(header, self._token)

    def api_key(self, header: bytes | None) -> bool:
        return api_key_matches(header, self._token)

    def refused(self, reason: str) -> None:
        self.counters.refused[reason] = self.counters.refused.get(reason, 0) + 1

    # -- the requests ------------------------------------------------------------------------

    async def create(self, create: Create) -> tuple[CallRow, bool]:
        """The call's row and whether it was there already (a repeated create)."""
        call_id = dpvoip_call_id(self.label, create.call_id)
        found, _ = await self._read(self._rows.by_call_id, call_id)
        if found is not None:
            self.counters.duplicates += 1
            return found[0], True
        known = self._calls.get(call_id)
        if known is not None:
            self.counters.duplicates += 1
            return expected_row(known, ()), True
        if not self._ids:
            self.refill()
            raise Unavailable("no call id is reserved while the database is away")
        row_id = self._ids.pop(0)
        number = normalise(create.phone_number, self._where)
        happening = started(create, call_id, self.label, row_id, number in self._own)
        await self._submit(happening)
        known = KnownCall(row_id, call_id, create.direction, number or create.phone_number,
                          create.started_at)
        self._remember(known)
        self.counters.created += 1
        self.refill()
        return await self._answer(known, ()), False

    async def update(self, update: Update) -> CallRow:
        found, reachable = await self._read(self._rows.by_id, update.row_id)
        remembered = self._remembered(update.row_id)
        known = found[1] if found is not None else remembered
        if known is None:
            if not reachable:
                raise Unavailable("the database is away and this call is not known here")
            raise NotFound(update.row_id)
        if remembered is not None and found is not None:  # what this process also knows
            known = replace(known, answered_at=known.answered_at or remembered.answered_at,
                            ended=known.ended or remembered.ended)
        now = datetime.fromtimestamp(self._clock.seconds(), UTC)
        happenings = update_happenings(known, update, now)
        for happening in happenings:
            await self._submit(happening)
            known = _after(known, happening)
        if happenings:
            self._remember(known)
        self.counters.updated += 1
        if not happenings and found is not None:
            return found[0]
        return await self._answer(known, happenings)

    async def _answer(self, known: KnownCall, happenings: tuple[Happening, ...]) -> CallRow:
        """The row read back once its events are committed; as it will be written while
        they are spooled."""
        if not self._recorder.spooling:
            found, _ = await self._read(self._rows.by_id, known.row_id)
            if found is not None:
                return found[0]
        return expected_row(known, happenings)

    async def _submit(self, happening: Happening) -> None:
        try:
            await self._recorder.submit(happening, self.origin)
        except NotRecorded as error:
            raise Unavailable(str(error)) from None

    async def _read(self, read: Callable[[T], Coroutine[Any, Any, Any]],
                    key: T) -> tuple[tuple[CallRow, KnownCall] | None, bool]:
        """The row from the database (it may not hold the events still spooled), and
        whether the database answered."""
        if not self._ready():
            return None, False
        try:
            result: tuple[CallRow, KnownCall] | None = await within(
                self._clock, Deferred.fromCoroutine(read(key)), self._deadline)
        except Exception as error:
            if not unavailable(error):
                raise
            return None, False
        return result, True

    # -- what is remembered ------------------------------------------------------------------

    def _remember(self, known: KnownCall) -> None:
        self._calls[known.call_id] = known
        self._calls.move_to_end(known.call_id)
        self._by_row[known.row_id] = known.call_id
        while len(self._calls) > REMEMBERED:
            _, old = self._calls.popitem(last=False)
            self._by_row.pop(old.row_id, None)

    def _remembered(self, row_id: int) -> KnownCall | None:
        call_id = self._by_row.get(row_id)
        return self._calls.get(call_id) if call_id is not None else None

    def recover(self, payloads: list[bytes]) -> int:
        """The calls of the spool's pending records (the last run's, not yet in the
        database), remembered for their updates; how many."""
        count = 0
        for payload in payloads:
            try:
                source, happening, box = read_record(payload)
            except BadRecord:
                continue
            if source != "fritzbox" or box != self.origin.name:
                continue
            if isinstance(happening, Started) and happening.row_id is not None:
                self._remember(KnownCall(happening.row_id, happening.call_id,
                                         happening.direction,
                                         normalise(happening.remote, self._where)
                                         or happening.remote, happening.at))
                count += 1
            elif isinstance(happening, Answered | Ended) and happening.call_id in self._calls:
                self._remember(_after(self._calls[happening.call_id], happening))
        return count

    # -- ids reserved ahead ------------------------------------------------------------------

    @property
    def reserved(self) -> int:
        return len(self._ids)

    def refill(self) -> None:
        """Reserve more ids when few are left and the database is there (in the
        background; a failure is logged and tried again at the next create or tick)."""
        if self._refilling or len(self._ids) >= LOW or not self._ready():
            return
        self._refilling = True

        async def run() -> None:
            try:
                self._ids.extend(await within(
                    self._clock, Deferred.fromCoroutine(self._rows.reserve(BLOCK)),
                    self._deadline))
            except Exception as error:
                log.info("could not reserve call ids for the old monitor yet: {error}",
                         error=type(error).__name__)
            finally:
                self._refilling = False

        Deferred.fromCoroutine(run())


def _after(known: KnownCall, happening: Happening) -> KnownCall:
    if isinstance(happening, Answered):
        return replace(known, answered_at=known.answered_at or happening.at)
    if isinstance(happening, Ended):
        return replace(known, ended=True)
    return known


class LegacyMonitorCollector(Collector):
    """``/metrics``: the old monitor's requests, what they did, refusals by reason."""

    def __init__(self, monitor: LegacyMonitor) -> None:
        self._monitor = monitor

    def collect(self) -> Iterator[Metric]:
        counters = self._monitor.counters
        done = CounterMetricFamily("dpvoip_legacy_monitor_requests",
                                   "The old monitor's requests, by what they did.",
                                   labels=["what"])
        for what in ("requests", "created", "duplicates", "updated"):
            done.add_metric([what], getattr(counters, what))
        yield done
        refused = CounterMetricFamily("dpvoip_legacy_monitor_refused",
                                      "The old monitor's requests refused, by reason.",
                                      labels=["reason"])
        for reason, count in sorted(counters.refused.items()):
            refused.add_metric([reason], count)
        yield refused
        yield GaugeMetricFamily("dpvoip_legacy_monitor_reserved_ids",
                                "Call ids reserved for creates while the database is away.",
                                value=self._monitor.reserved)
        yield GaugeMetricFamily("dpvoip_legacy_monitor_token_usable",
                                "0 while the token is unset or the CRM's default.",
                                value=int(self._monitor.problem is None))


class PendingRecords(Protocol):
    def pending(self) -> Deferred[list[tuple[int, bytes]]]: ...


class LegacyMonitorService(Service):
    """At start: says whether the endpoints can be used (one line), remembers the calls
    the spool still holds, reserves ids once the database is prepared; then, every
    ``interval`` seconds, keeps ids reserved and writes the counters for ``dpvoip check``
    (``state_file``) when they changed."""

    name = "legacy-monitor"

    def __init__(self, monitor: LegacyMonitor, spool: PendingRecords,
                 prepared: Callable[[], Deferred[None]], clock: IReactorTime,
                 state_file: Path, interval: float = 5.0) -> None:
        self._monitor = monitor
        self._spool = spool
        self._prepared = prepared
        self._state_file = state_file
        self._written: dict[str, Any] | None = None
        self._timer = TimerService(interval, self._tick)
        self._timer.clock = clock

    @property
    def monitor(self) -> LegacyMonitor:
        return self._monitor

    def startService(self) -> Deferred[None]:
        super().startService()
        if self._monitor.problem:
            # Unset is how most offices run (no old monitor left): said, not alarmed. The
            # CRM's default token is a mistake to fix: a warning.
            say = log.info if not self._monitor.token_set else log.warn
            say("the old monitor's endpoints (/accounting/api/fritz-webhook/, "
                "/accounting/api/voip-calls/) refuse every request: {problem}",
                problem=self._monitor.problem)
        else:
            log.info("the old monitor's endpoints accept its token")

        async def start() -> None:
            pending = await self._spool.pending()
            found = self._monitor.recover([payload for _, payload in pending])
            if found:
                log.info("{n} calls of the old monitor are still in the spool", n=found)
            self._prepared().addCallback(lambda _: self._monitor.refill())
            self._timer.startService()

        return Deferred.fromCoroutine(start())

    def _tick(self) -> None:
        self._monitor.refill()
        state = {"counters": asdict(self._monitor.counters), "token_problem":
                 self._monitor.problem, "reserved_ids": self._monitor.reserved}
        if state != self._written:
            write_state(self._state_file, state)
            self._written = state

    def stopService(self) -> Deferred[None]:
        super().stopService()
        self._tick()
        stopped = self._timer.stopService() if self._timer.running else None
        return stopped if isinstance(stopped, Deferred) else Deferred.fromCoroutine(_none())


async def _none() -> None:
    return None


def write_state(path: Path, state: dict[str, Any]) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_suffix(".tmp")
        temporary.write_text(json.dumps(state, default=str) + "\n")
        os.replace(temporary, path)
    except OSError as error:
        log.warn("could not write {path}: {error}", path=str(path), error=error)


def read_state(path: Path) -> dict[str, Any] | None:
    """What the daemon last wrote (for ``dpvoip check``); None when it never did."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


async def check_lines(token: str, state_file: Path, store: Any) -> list[str]:
    """What ``dpvoip check`` says of the old monitor's endpoints, in one line: the token,
    the daemon's last counters (requests, refusals by reason), the calls recorded."""
    problem = token_problem(token)
    parts = [f"REFUSE every request ({problem})" if problem else "token set"]
    state = read_state(state_file)
    if state is None:
        parts.append("no counters written yet")
    else:
        counters = state.get("counters", {})
        refused = counters.get("refused", {})
        shown = ", ".join(f"{k} {v}" for k, v in sorted(refused.items())) or "none"
        parts.append(f"{counters.get('requests', 0)} requests, {counters.get('created', 0)}"
                     f" created, {counters.get('updated', 0)} updated, refused: {shown}")
    count, last = await recorded_calls(store)
    parts.append(f"{count} calls recorded"
                 + (f", the last started {last:%Y-%m-%d %H:%M:%S %Z}" if last else ""))
    return ["old monitor endpoints: " + "; ".join(parts)]
