"""Reading a box's call list and applying what it says (issue 16 points 2-4): the I/O side
of ``dpvoip.fritzbox.reconcile``.

``Reconciler.run`` is one pass: the stored state, the list since then (or by days after a
reset, or at the first run), the box's recorded calls in the list's time range, the plan,
then ONE transaction of the ingest (``Ingest.apply_together``): the recovered calls and
the finished ones under the normal rules (matching, log lines, missed-call tickets,
grouping), then the links, the corrections and the new state. The state moves with the
calls or not at all, so a crash between two passes loses nothing and a second pass
changes nothing. A pass is one transaction, whatever the number of entries: the list
holds at most a few hundred, and one commit keeps "the state moves with the calls"
trivially true.

``ReconcileService`` runs passes: once the database is prepared, ~10 s after every
(re)connect of the box (the list shows a call about 5 s after its DISCONNECT), and
every ``reconcile_every_seconds`` while connected; never two at once. A failure is
logged once per kind with what to do (never a password), kept as the status that
``/readyz``, ``/metrics`` and ``dpvoip check`` show (a warning, not a failure), and
retried with back-off. None of it touches the CallMonitor path: the box's connection and
its lines go on whatever the list does.
"""

from __future__ import annotations

import random
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol
from zoneinfo import ZoneInfo

from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

from dpvoip.calls.ingest import Origin, Submission
from dpvoip.config import FritzBoxSettings
from dpvoip.core.call_log import LogLine
from dpvoip.core.errors import summary
from dpvoip.core.happenings import Ended
from dpvoip.core.outcomes import Detail, Outcome, Reason, notes
from dpvoip.core.texts import Texts
from dpvoip.fritzbox.listed import CallList
from dpvoip.fritzbox.reconcile import (
    Correction,
    ListRules,
    ListState,
    Plan,
    plan,
    processing,
    time_range,
    was_reset,
)
from dpvoip.store.call_list import BlockedCorrection, CallListStatements
from dpvoip.store.database import Batch, is_database_error

log = Logger(namespace="dpvoip.fritzbox.reconcile")

#: Seconds after a (re)connect before the list is read: a call shows in it ~5 s after
#: its DISCONNECT.
AFTER_CONNECT = 10.0
#: After a reset, unmatched entries dated before the old list's last read, less this
#: (the list's minute resolution, the ~5 s before a call shows), are not recovered.
RESET_MARGIN = timedelta(minutes=5)


class CallListError(Exception):
    """A failure to read the list, as the TR-064 client reports it (its ``Tr064Error``
    has the same two attributes): ``kind`` (auth, rights, locked, tls, timeout,
    unreachable, bad_answer) and ``advice``, what the office should do. Neither holds a
    password."""

    def __init__(self, kind: str, advice: str, message: str = "") -> None:
        super().__init__(message or f"{kind}: {advice}")
        self.kind = kind
        self.advice = advice


class CallListClient(Protocol):
    """The TR-064 client as the reconciler uses it."""

    def call_list(self, days: int | None = None, max_entries: int | None = None,
                  since: tuple[int, int] | None = None) -> Awaitable[CallList]: ...


class TogetherIngest(Protocol):
    """The part of ``Ingest`` a pass needs."""

    def apply_together(self, submissions: Sequence[Submission],
                       then: Callable[[Batch], Awaitable[None]] | None = None
                       ) -> Deferred[None]: ...


@dataclass(frozen=True)
class ReconcileReport:
    """What one pass did."""

    box: str
    linked: int = 0  # entries newly linked to a call the monitor recorded
    finished: int = 0  # recorded calls left open or interrupted, finished from the list
    corrected: int = 0  # blocked <-> missed
    inserted: int = 0  # calls the monitor never saw, recovered
    skipped: int = 0  # entries of an unknown type
    held_back: int = 0  # active entries and those after them (the next pass)
    already: int = 0  # entries linked by an earlier pass
    too_old: int = 0  # entries older than the first pass, left alone
    reset: bool = False
    baseline: bool = False
    tickets_removed: int = 0  # untouched tickets of calls the box had blocked
    state: ListState | None = None


def rules_of(settings: FritzBoxSettings, origin: Origin) -> ListRules:
    """The list's rules from the box's settings (the same zone, numbers and answering
    machines as its CallMonitor path)."""
    return ListRules(settings.name, ZoneInfo(settings.timezone), origin.where,
                     frozenset(settings.answering_machine_extensions),
                     settings.blocked_threshold_seconds)


class Reconciler:
    """One box's list applied to its calls (see the module's text)."""

    def __init__(self, settings: FritzBoxSettings, origin: Origin, client: CallListClient,
                 store: CallListStatements, ingest: TogetherIngest, clock: IReactorTime,
                 texts: Texts) -> None:
        self.settings = settings
        self._origin = origin
        self._rules = rules_of(settings, origin)
        self._client = client
        self._store = store
        self._ingest = ingest
        self._clock = clock
        self._texts = texts
        # The first pass ever (no state stored) recovers nothing dated before this run.
        self.since = self._now()

    def _now(self) -> datetime:
        return datetime.fromtimestamp(self._clock.seconds(), UTC)

    @property
    def certificate(self) -> str | None:
        """The TLS fingerprint the box presented last (its client's ``seen``), if any."""
        seen = getattr(self._client, "seen", None)
        return seen if isinstance(seen, str) else None

    async def run(self) -> ReconcileReport:
        box = self.settings.name
        state = await self._store.state(box)
        if state is None:
            listed = await self._client.call_list(days=self.settings.call_list_days)
        else:
            listed = await self._client.call_list(since=(state.last_id, state.timestamp))
        reset = was_reset(state, listed)
        reset_since = None
        if reset:
            last_read = await self._store.last_read(box)
            reset_since = last_read - RESET_MARGIN if last_read is not None else None
            log.warn("box {box}: its call list was reset (its ids start again below "
                     "{last}): read again by days and matched by time", box=box,
                     last=state.last_id if state else 0)
            listed = await self._client.call_list(days=self.settings.call_list_days)
        entries, _, _ = processing(state, listed, reset)
        found = time_range(entries, self._rules.zone)
        recorded = await self._store.recorded(box, *found) if found else []
        decided = plan(state, listed, recorded, self._rules, reset=reset,
                       baseline_since=self.since, reset_since=reset_since)
        if decided.writes or decided.state != state or reset:
            removed = await self._apply(decided)
        else:
            removed = 0
        report = ReconcileReport(
            box, linked=len(decided.links), finished=len(decided.finishes),
            corrected=len(decided.corrections), inserted=len(decided.recoveries),
            skipped=decided.skipped, held_back=decided.held_back, already=decided.already,
            too_old=decided.too_old, reset=reset,
            baseline=decided.baseline, tickets_removed=removed, state=decided.state)
        if decided.writes:
            log.info("box {box}: call list: {inserted} recovered, {linked} linked, "
                     "{finished} finished, {corrected} corrected", box=box,
                     inserted=report.inserted, linked=report.linked,
                     finished=report.finished, corrected=report.corrected)
        return report

    async def _apply(self, decided: Plan) -> int:
        """The plan in one transaction of the ingest; the untouched tickets removed."""
        received = self._now()
        to_missed = [c for c in decided.corrections if c.becomes is Outcome.MISSED]
        to_blocked = [c for c in decided.corrections if c.becomes is Outcome.BLOCKED]
        timed: list[tuple[datetime, int, Submission]] = []
        for recovery in decided.recoveries:
            at = recovery.started.at
            timed.append((at, len(timed), Submission(recovery.started, self._origin, received)))
            timed.append((at, len(timed), Submission(recovery.ended, self._origin, received)))
        for finish in decided.finishes:
            timed.append((finish.ended.at, len(timed),
                          Submission(finish.ended, self._origin, received, recovering=True)))
        for correction in to_missed:
            ended = Ended(correction.call_id, Outcome.MISSED, 0, correction.at, None,
                          Detail(Reason.CALL_LIST))
            timed.append((correction.at, len(timed),
                          Submission(ended, self._origin, received, recovering=True)))
        submissions = [submission for _, _, submission in sorted(timed, key=lambda t: t[:2])]
        links = [*decided.links, *((r.started.call_id, r.entry_id) for r in decided.recoveries)]
        removed = 0
        box = self.settings.name

        async def then(batch: Batch) -> None:
            nonlocal removed
            if decided.reset:
                await self._store.forget_links(batch, box)
            await self._store.link(batch, box, links)
            for correction in to_blocked:
                done = await self._store.correct_to_blocked(
                    batch, self._blocked(correction, received), received)
                removed += done == "deleted"
            await self._store.write_state(batch, box, decided.state, received)

        await self._ingest.apply_together(submissions, then)
        return removed

    def _blocked(self, correction: Correction, received: datetime) -> BlockedCorrection:
        texts, zone = self._texts, self._rules.zone
        text = notes(Outcome.BLOCKED, texts, detail=Detail(Reason.CALL_LIST))
        return BlockedCorrection(
            correction.call_id, text, LogLine("status_changed", texts("corrected", notes=text)),
            texts("ticket_note_blocked", time=f"{received.astimezone(zone):%d/%m %H:%M}",
                  date=f"{correction.at.astimezone(zone):%d/%m %H:%M}"),
            0)


# -- the service -----------------------------------------------------------------------------


@dataclass
class ReconcileStatus:
    """What ``/readyz`` (a warning), ``/metrics`` and ``dpvoip check`` show of a box's
    list."""

    box: str
    state: str = "idle"  # idle (no pass yet), ok, failing
    kind: str = ""  # the failure's kind while failing
    advice: str = ""
    last_success: datetime | None = None
    last_attempt: datetime | None = None
    runs: int = 0
    failures: int = 0
    failures_by_kind: dict[str, int] = field(default_factory=dict)
    inserted: int = 0  # totals since start
    linked: int = 0
    finished: int = 0
    corrected: int = 0
    skipped: int = 0
    last: ReconcileReport | None = None
    certificate: str | None = None  # the TLS fingerprint the box presented last

    @property
    def ok(self) -> bool:
        return self.state != "failing"

    def as_json(self) -> dict[str, Any]:
        return {
            "state": self.state, "kind": self.kind or None, "advice": self.advice or None,
            "last_success": self.last_success.isoformat() if self.last_success else None,
            "last_attempt": self.last_attempt.isoformat() if self.last_attempt else None,
            "runs": self.runs, "failures": self.failures,
            "failures_by_kind": dict(self.failures_by_kind), "inserted": self.inserted,
            "linked": self.linked, "finished": self.finished, "corrected": self.corrected,
            "skipped": self.skipped, "certificate": self.certificate,
        }


def backoff(initial: float = 30.0, cap: float = 600.0,
            jitter: Callable[[], float] = random.random) -> Callable[[int], float]:
    """Seconds before retry ``attempt`` (1, 2, ...): ``initial`` doubled each time, at most
    ``cap``, a quarter of it taken off at random so that boxes do not retry in step."""

    def delay(attempt: int) -> float:
        base = min(initial * 2.0 ** (min(max(attempt, 1), 32) - 1), cap)
        return base * (0.75 + 0.25 * jitter())

    return delay


def _kind(error: BaseException) -> tuple[str, str]:
    """A failure's kind and advice: the client's own, else the database's, else ours."""
    kind, advice = getattr(error, "kind", None), getattr(error, "advice", None)
    if isinstance(kind, str) and isinstance(advice, str):
        return kind, advice
    if is_database_error(error):
        return "database", "PostgreSQL refused or is away: the list is read again when it is back"
    return "internal", f"unexpected error ({type(error).__name__}): please report it"


class Passes(Protocol):
    """What the service runs (a ``Reconciler``)."""

    @property
    def settings(self) -> FritzBoxSettings: ...

    def run(self) -> Awaitable[ReconcileReport]: ...


class ReconcileService(Service):
    """Runs a box's reconciliation passes (see the module's text)."""

    def __init__(self, reconciler: Passes, clock: IReactorTime,
                 prepared: Callable[[], Deferred[None]], every: float | None = None,
                 retry: Callable[[int], float] | None = None,
                 after_connect: float = AFTER_CONNECT) -> None:
        box = reconciler.settings.name
        self.name = f"call list {box}"
        self.reconciler = reconciler
        self.clock = clock
        self._prepared = prepared
        self._every = every if every is not None else reconciler.settings.reconcile_every_seconds
        self._retry = retry or backoff(cap=self._every)
        self._after_connect = after_connect
        self.status = ReconcileStatus(box)
        self.connected = False
        self._ready = False
        self._timer: IDelayedCall | None = None
        self._running: Deferred[None] | None = None
        self._again = False
        self._attempt = 0
        self._logged_kind = ""

    # -- what starts a pass ----------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        preparing = self._prepared()

        def ready(_: object) -> None:
            self._ready = True
            if self.running:
                self._schedule(0)

        preparing.addCallback(ready)
        preparing.addErrback(lambda f: log.failure("box {box}: call list not started", f,
                                                   box=self.status.box))

    def stopService(self) -> None:
        super().stopService()
        self._cancel()

    def box_connected(self) -> None:
        """The box's CallMonitor connection is (again) up: read the list shortly."""
        self.connected = True
        if self.running and self._ready:
            self._schedule(self._after_connect)

    def box_disconnected(self) -> None:
        """The connection is down: the periodic pass waits for the next connect (a pass
        after a failure is still retried)."""
        self.connected = False

    def run_now(self) -> None:
        """A pass as soon as possible (after the one under way, if any)."""
        if self.running and self._ready:
            self._schedule(0)

    # -- passes ------------------------------------------------------------------------------

    def _cancel(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def _schedule(self, delay: float) -> None:
        self._cancel()
        self._timer = self.clock.callLater(delay, self._fire)

    def _fire(self) -> None:
        self._timer = None
        if self._running is not None:
            self._again = True  # never two at once: one more when this one is through
            return
        running = self._running = Deferred.fromCoroutine(self._pass())

        def through(_: object) -> None:
            self._running = None

        running.addBoth(through)

    @property
    def busy(self) -> bool:
        return self._running is not None

    async def _pass(self) -> None:
        status = self.status
        status.last_attempt = datetime.fromtimestamp(self.clock.seconds(), UTC)
        try:
            report = await self.reconciler.run()
        except Exception as error:  # every failure is kept, logged once per kind, retried
            self._failed(error)
            return
        finally:
            status.certificate = getattr(self.reconciler, "certificate", None)
        self._succeeded(report)

    def _failed(self, error: BaseException) -> None:
        status = self.status
        kind, advice = _kind(error)
        status.state, status.kind, status.advice = "failing", kind, advice
        status.failures += 1
        status.failures_by_kind[kind] = status.failures_by_kind.get(kind, 0) + 1
        self._attempt += 1
        if kind != self._logged_kind:
            self._logged_kind = kind
            log.warn("box {box}: cannot read its call list ({kind}): {advice}; "
                     "retried with back-off{detail}", box=status.box, kind=kind,
                     advice=advice,
                     detail="" if kind not in ("internal", "database")
                     else f" ({summary(error)})")
        if self.running:
            self._again = False
            self._schedule(self._retry(self._attempt))

    def _succeeded(self, report: ReconcileReport) -> None:
        status = self.status
        if status.state == "failing":
            log.info("box {box}: its call list is read again", box=status.box)
        status.state, status.kind, status.advice = "ok", "", ""
        status.last_success = datetime.fromtimestamp(self.clock.seconds(), UTC)
        status.runs += 1
        status.inserted += report.inserted
        status.linked += report.linked
        status.finished += report.finished
        status.corrected += report.corrected
        status.skipped += report.skipped
        status.last = report
        self._attempt = 0
        self._logged_kind = ""
        if not self.running:
            return
        if self._again:
            self._again = False
            self._schedule(0)
        elif self.connected:
            self._schedule(self._every)
