"""The one door through which every call event enters the database.

A happening (a call started, was answered, forwarded, ended) becomes one transaction on
the CRM's tables and dpvoip's own: the call row, its log lines, the directory match, and
for a missed call the ticket, all committed together or not at all. This module only
orchestrates: the decisions are the pure rules of ``dpvoip.core`` (``call_log``,
``tickets``, ``sales``), the statements are ``dpvoip.store.calls``; every statement is
written so that replaying the same happening changes nothing.

Events of one call are applied in order (one chain per call); different calls run
concurrently. Two missed calls of one number that end at once are serialised on the
number by a transaction-scoped advisory lock, so they make one ticket.

The wall clock comes from the ``clock`` given (the reactor, or a test's ``Clock``): it
dates a Zadarma call that has no start time, the end of a ticketed Zadarma call, and the
sales side's "today" of a Zadarma call (a PBX's call is dated by its own end).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta, tzinfo
from typing import Any, TypeVar
from zoneinfo import ZoneInfo

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from dpvoip.calls.grouping import IN_FLIGHT, CommitGroups
from dpvoip.config import TicketSettings, ZadarmaSettings
from dpvoip.core.call_log import (
    LogLine,
    answered_line,
    caller_name,
    ended_line,
    ended_notes,
    finished_text,
    forwarded_line,
    remote,
    started_lines,
    started_notes,
    ticket_text,
)
from dpvoip.core.happenings import Answered, Ended, Forwarded, Happening, Started, Unmatched
from dpvoip.core.matching import Match
from dpvoip.core.numbers import Dialling, normalise
from dpvoip.core.outcomes import Detail, Outcome, Reason
from dpvoip.core.sales import EndTouch, end_touch, sales_touch
from dpvoip.core.texts import Texts
from dpvoip.core.tickets import (
    MissedCall,
    TicketFacts,
    TicketPlan,
    TicketUpdate,
    candidate_users,
    gets_ticket,
    may_get_ticket,
    plan_ticket,
    window,
)
from dpvoip.crm.schema import CrmCapabilities
from dpvoip.deferreds import OneShotObserver
from dpvoip.fritzbox.tracker import BoxRules, decide
from dpvoip.store.calls import (
    CallStatements,
    FinishingCall,
    JournalEntry,
    JournalItem,
    Step,
    TicketQuery,
    ZadarmaRow,
)
from dpvoip.store.database import Batch, Store
from dpvoip.store.directory import DirectoryIndex
from dpvoip.store.migrations import SchemaReport
from dpvoip.zadarma.calls import ZadarmaCall, describe, summarise
from dpvoip.zadarma.events import BadEvent, ZadarmaEvent, parse_event
from dpvoip.zadarma.events import call_id as zadarma_call_id
from dpvoip.zadarma.guard import (
    CallbackRequest,
    GuardRules,
    Verdict,
    admit,
    as_plain,
    bound,
    customer_numbers,
    form_size,
    freshness,
    signed_key,
    user_phones,
    verify_callback,
)

log = Logger(namespace="dpvoip.ingest")
T = TypeVar("T")

#: How far back a CONNECT/DISCONNECT of an unknown id may find the call it belongs to.
RECOVERY_WINDOW = timedelta(hours=12)
#: The CRM's optional columns until the schema has been checked: none.
_NO_OPTIONAL_COLUMNS = CrmCapabilities()
#: Seconds between two warnings about suspicious Zadarma events of one kind (the ones in
#: between are counted, and their number said in the next warning).
SUSPICIOUS_LOG_INTERVAL = 10.0


@dataclass(frozen=True)
class Origin:
    """Where happenings come from: a box's name, its dialling context and its rules.

    ``sales_side``: a finished call of a matched contact or lead writes the CRM's sales
    side (``was_in_touch``, a line on the active deal: behaviour.md section 6), as a
    Zadarma call does. A PBX's origin asks for it (a PBX is a Zadarma an office runs
    itself); a Fritz!Box's does not, as the spec has it (section 6 names Zadarma's calls):
    default off.

    ``late_ends``: an end may finish a call closed as interrupted meanwhile. A PBX's call
    closed when its link went (or its list of channels could not be read) is found again
    in the list at a later login and followed to its real end, which then stands. A
    Fritz!Box's late ends come through its own recovery instead (``_unmatched``, the call
    list): default off."""

    name: str
    where: Dialling
    rules: BoxRules | None = None
    source: str = "fritzbox"
    sales_side: bool = False
    late_ends: bool = False


@dataclass(frozen=True)
class ZadarmaContext:
    """How to read a Zadarma account's events: its numbers' country, its clock's zone."""

    where: Dialling
    zone: tzinfo
    tickets: bool = False
    redirect_to_owner: bool = False
    guard: GuardRules = GuardRules()  # what a captured signature may still do
    #: The provider whose webhook the events came to: a spooled event records it, so that
    #: the replay reads it with that provider's context (None: the main one's).
    provider: str | None = None


def guard_rules(settings: ZadarmaSettings) -> GuardRules:
    """The guard's bounds from ``[zadarma]``."""
    return GuardRules(
        max_age=timedelta(hours=settings.max_event_age_hours),
        max_ahead=timedelta(minutes=settings.max_event_ahead_minutes),
        journal_events=settings.journal_max_events,
        journal_bytes=settings.journal_max_kib * 1024,
    )


@dataclass(frozen=True)
class ZadarmaOutcome:
    duplicate: bool
    match: Match | None = None
    owner_extension: str = ""  # the pbx_number of the CRM user who owns the caller
    #: Why the event was refused (``dpvoip.zadarma.guard.Reason``), '' when it was not. A
    #: refused event is answered 200 like any other: Zadarma retries what is not
    #: answered 200, and a retry of a refused event is refused again.
    refused: str = ""


@dataclass(frozen=True)
class Submission:
    """A happening for ``Ingest.apply_together``; ``recovering``: an end that may finish
    again a call closed as interrupted (its own late end, or the box's call list)."""

    happening: Happening
    origin: Origin
    received: datetime
    recovering: bool = False


@dataclass(frozen=True)
class ZadarmaSubmission:
    """A Zadarma event for ``Ingest.apply_together``."""

    event: ZadarmaEvent
    form: Mapping[str, str]
    context: ZadarmaContext
    received: datetime


@dataclass(frozen=True)
class _Admitted:
    """A Zadarma event past the checks made before the database is asked."""

    item: JournalItem
    context: ZadarmaContext
    alone: ZadarmaCall | None  # the call as this event alone shows it
    guessed: str | None  # its caller, normalised


@dataclass(frozen=True)
class _Plain:
    """A happening that is one statement and needs nothing read before it (its caller
    looked up already, no ticket possible): the statement (``tell``: to be sent with
    others, ``Batch.run_told``), and what follows once it is known whether it took
    effect (the counters, the log line)."""

    step: Callable[[bool], Step]
    conclude: Callable[[bool], None]


@dataclass(frozen=True)
class _End:
    """The end of a call that may get a ticket (``Ingest._missed_ends``); ``recovering``:
    it may finish again a call closed as interrupted."""

    ended: Ended
    origin: Origin
    received: datetime
    recovering: bool


@dataclass(frozen=True)
class _ZadarmaMissed:
    """A Zadarma call whose end gets a ticket (``Ingest._zadarma_tickets``): its row,
    its end, the call as the ticket rules read it, and its end's log line."""

    row: ZadarmaRow
    ended: Ended
    call: MissedCall
    client: int | None
    where: Dialling
    line: LogLine


@dataclass
class IngestCounters:
    calls_started: int = 0
    calls_ended: int = 0
    ticket_writes: int = 0  # tickets created or updated
    replays_ignored: int = 0
    orphans: int = 0
    failures: int = 0
    # Zadarma events refused by the guard (dpvoip.zadarma.guard.Reason), and the callbacks
    # no click-to-call request of dpvoip's explains (recorded without the rewrite).
    zadarma_stale: int = 0
    zadarma_ahead: int = 0
    zadarma_bound_elsewhere: int = 0
    zadarma_inconsistent: int = 0
    zadarma_second_end: int = 0
    zadarma_journal_full: int = 0
    zadarma_callback_unverified: int = 0

    def add(self, other: IngestCounters) -> None:
        """Count ``other``'s too (a transaction's, once it has committed)."""
        for name, value in vars(other).items():
            setattr(self, name, getattr(self, name) + value)


class Ingest:
    def __init__(
        self,
        store: Store,
        directory: DirectoryIndex,
        texts: Texts,
        tickets: TicketSettings,
        office_zone: ZoneInfo,
        schema: OneShotObserver[SchemaReport],
        clock: IReactorTime,
        crm_schema: str = "public",
        groups_in_flight: int = IN_FLIGHT,
    ) -> None:
        self._store = store
        self._schema = schema
        self._directory = directory
        self._texts = texts
        self._tickets = tickets
        self._zone = office_zone
        self._clock = clock
        self._statements = CallStatements(store, directory, crm_schema, self._capabilities)
        self._query = (tickets, TicketQuery(window(tickets), candidate_users(tickets)))
        self._chains: dict[str, Deferred[None]] = {}
        self._warned: dict[str, tuple[float, int]] = {}  # reason: (last warning, since)
        self.counters = IngestCounters()
        # Zadarma's events share transactions (group commit); one signed string per group.
        self.zadarma_groups: CommitGroups[_Admitted, ZadarmaOutcome] = CommitGroups(
            self._zadarma_groups, lambda admitted: admitted.item.signed,
            in_flight=groups_in_flight)

    # -- the entry point -------------------------------------------------------------------

    def submit(self, happening: Happening, origin: Origin,
               received: datetime | None = None) -> Deferred[None]:
        """Apply ``happening``, which arrived at ``received`` (UTC; default: now, from the
        clock); fires when it is committed (or fails, after logging it). The rows are
        written as at ``received``: a replay from the spool writes the same rows."""
        at = received or self._now()
        return self._in_order(_chain_key(happening),
                              lambda: self._apply(happening, origin, at))

    def submit_zadarma(self, event: ZadarmaEvent, form: Mapping[str, str],
                       context: ZadarmaContext,
                       received: datetime | None = None) -> Deferred[ZadarmaOutcome]:
        """Record a Zadarma webhook event that arrived at ``received`` (journal, call row,
        logs, CRM, ticket); fires with what the answer needs once it is committed."""
        at = received or self._now()
        return self._in_order(f"zd:{event.pbx_call_id}",
                              lambda: self._zadarma_grouped(event, form, context, at))

    def _zadarma_grouped(self, event: ZadarmaEvent, form: Mapping[str, str],
                         context: ZadarmaContext, received: datetime
                         ) -> Deferred[ZadarmaOutcome]:
        admitted = self._admitted(event, form, context, received)
        if isinstance(admitted, ZadarmaOutcome):
            return succeed(admitted)
        return self.zadarma_groups.join(admitted)

    def apply_together(self, submissions: Sequence[Submission | ZadarmaSubmission],
                       then: Callable[[Batch], Awaitable[None]] | None = None
                       ) -> Deferred[None]:
        """Apply ``submissions`` in order in ONE transaction, under the same rules as one
        by one, then ``then(batch)`` in it (a reconciliation's state), then commit: one
        commit (one WAL flush) for many events, which is what lets the spool's replay
        outrun new arrivals. Any error writes nothing and is raised (the caller may apply
        them one by one to find the bad one). A Zadarma event the guard refuses is undone
        alone (its journal entry taken back), as it would be on its own.

        The log lines of a group that fails are not taken back; its counters count only
        once it has committed."""
        keys = sorted({_submission_key(s) for s in submissions})
        return self._in_order(keys, lambda: self._together(submissions, then))

    async def _together(self, submissions: Sequence[Submission | ZadarmaSubmission],
                        then: Callable[[Batch], Awaitable[None]] | None) -> None:
        tally = IngestCounters()

        async def steps(batch: Batch) -> None:
            batch.hold()
            # The group's callers looked up at once: one round trip, not one per call.
            known = await self._directory.lookup_all(
                (_started_number(item.happening, item.origin) for item in submissions
                 if isinstance(item, Submission)), batch)
            # Zadarma events go together in runs (two round trips for a run: see
            # ``next_run``), each judged against what the ones before it wrote; so do the
            # plain happenings in a row (one round trip for them, in order). A missed
            # call's end (its ticket's facts read before its ticket is written) waits for
            # the plain happenings that follow it, which no ticket's facts depend on, so
            # that one message takes them all; a later event of its call, or one that
            # looks in the database, is applied after it as it came. The ends held back
            # then go together too (``_missed_ends``: two round trips for them all).
            waiting: list[_Admitted] = []
            plain: list[_Plain] = []
            ends: list[_End] = []

            async def flush(last: bool = False) -> None:
                rest = waiting[:]
                waiting.clear()
                while rest:
                    run, rest = next_run(rest)
                    await self._zadarma(batch, run, tally)
                ready = plain[:]
                plain.clear()
                held_back = ends[:]
                ends.clear()
                try:
                    took = await batch.run_told([step.step(True) for step in ready],
                                                last and not held_back)
                    for step, told in zip(ready, took, strict=True):
                        step.conclude(told != "")
                    if held_back:
                        await self._missed_ends(batch, held_back, last)
                except Exception:
                    self.counters.failures += 1
                    raise

            for item in submissions:
                if isinstance(item, ZadarmaSubmission):
                    if plain or ends:  # a Zadarma call's ticket may be an end's number's
                        await flush()
                    admitted = self._admitted(item.event, item.form, item.context,
                                              item.received, tally)
                    if isinstance(admitted, ZadarmaOutcome):
                        continue
                    waiting.append(admitted)
                    continue
                if waiting:
                    await flush()
                happening = item.happening
                if not any(end.ended.call_id == _chain_key(happening) for end in ends):
                    step = self._plain(item, known)
                    if step is not None:
                        plain.append(step)
                        continue
                    if isinstance(happening, Ended):  # one that may get a ticket
                        ends.append(_End(happening, item.origin, item.received,
                                         item.recovering or item.origin.late_ends))
                        continue
                await flush()
                await self._apply(happening, item.origin, item.received, batch,
                                  item.recovering, known)
            last = bool(plain or ends) and not waiting and then is None
            if last:
                batch.hold(False)  # the COMMIT rides along with the group's last run
            await flush(last)
            if then is not None:
                await then(batch)

        await self._store.batch(steps)
        self.counters.add(tally)

    def _in_order(self, keys: str | Sequence[str], work: Callable[[], Awaitable[T]]
                  ) -> Deferred[T]:
        """Run ``work`` after everything submitted before under any of ``keys`` (one
        call's events in order); different keys run concurrently."""
        keys = [keys] if isinstance(keys, str) else keys
        previous = [p for p in (self._chains.get(key) for key in keys) if p is not None]
        done: Deferred[None] = Deferred()  # fires, never fails, when this one is through
        for key in keys:
            self._chains[key] = done

        async def run() -> T:
            for earlier in previous:
                await earlier
            try:
                return await work()
            finally:
                for key in keys:
                    if self._chains.get(key) is done:
                        del self._chains[key]
                done.callback(None)

        return Deferred.fromCoroutine(run())

    async def _apply(self, happening: Happening, origin: Origin, received: datetime,
                     batch: Batch | None = None, recovering: bool = False,
                     known: Mapping[str, Match | None] | None = None) -> None:
        """One happening: a transaction of its own, or a step of ``batch`` (``known``:
        the callers it looked up already)."""
        try:
            if isinstance(happening, Started):
                await self._started(happening, origin, received, batch, known)
            elif isinstance(happening, Answered):
                await self._answered(happening, received, batch)
            elif isinstance(happening, Forwarded):
                await self._forwarded(happening, received, batch)
            elif isinstance(happening, Ended):
                await self._ended(happening, origin, received,
                                  recovering or origin.late_ends, batch)
            else:
                await self._unmatched(happening, origin, received, batch)
        except Exception:
            self.counters.failures += 1
            raise

    # -- what the rules are given ----------------------------------------------------------

    def _capabilities(self) -> CrmCapabilities:
        prepared = self._schema.peek()
        return prepared.crm if prepared is not None else _NO_OPTIONAL_COLUMNS

    def _now(self) -> datetime:
        return datetime.fromtimestamp(self._clock.seconds(), UTC)

    def _ticket_query(self) -> TicketQuery:
        """What the ticket facts are read for, under the current settings."""
        settings, query = self._query
        if settings is not self._tickets:
            query = TicketQuery(window(self._tickets), candidate_users(self._tickets))
            self._query = (self._tickets, query)
        return query

    # -- happenings --------------------------------------------------------------------------

    def _plain(self, item: Submission, known: Mapping[str, Match | None]) -> _Plain | None:
        """``item`` as a plain step of a replayed group, or None when it needs a read
        first (its caller not looked up, a possible ticket, a call looked for)."""
        happening, origin, received = item.happening, item.origin, item.received
        if isinstance(happening, Started):
            number = _started_number(happening, origin)
            if number is None or self._directory.never_matches(number):
                return self._start_plain(happening, origin, received, number, None)
            if number in known:
                return self._start_plain(happening, origin, received, number, known[number])
            return None
        if isinstance(happening, Answered):
            return self._answer_plain(happening, received)
        if isinstance(happening, Forwarded):
            return self._forward_plain(happening, received)
        if isinstance(happening, Ended) and not may_get_ticket(happening.outcome):
            return self._end_plain(happening, origin, received,
                                   item.recovering or origin.late_ends)
        return None

    async def _started(self, started: Started, origin: Origin, received: datetime,
                       batch: Batch | None = None,
                       known: Mapping[str, Match | None] | None = None) -> None:
        number = _started_number(started, origin)
        if number is not None and known is not None and number in known:
            match = known[number]
        else:
            match = await self._directory.lookup(number, within=batch) if number else None
        await self._write(batch, self._start_plain(started, origin, received, number, match))

    async def _write(self, batch: Batch | None, plain: _Plain) -> None:
        plain.conclude(await self._statements.write(batch, plain.step(False)))

    def _start_plain(self, started: Started, origin: Origin, received: datetime,
                     number: str | None, match: Match | None) -> _Plain:
        party = remote(started.remote, number, self._texts, started.hairpin)
        lines = started_lines(started.direction, party.shown, match, self._texts)
        notes = started_notes(started.hairpin, self._texts)

        def conclude(new: bool) -> None:
            if new:
                self.counters.calls_started += 1
                log.info("call {call_id}: {direction} {number} ({name})",
                         call_id=started.call_id, direction=started.direction,
                         number=party.shown, name=caller_name(match, self._texts))
            else:
                self.counters.replays_ignored += 1  # the call is there already

        return _Plain(lambda tell: self._statements.start_step(
            started, origin.source, number, party.column, match, lines, received, notes,
            tell), conclude)

    async def _answered(self, answered: Answered, received: datetime,
                        batch: Batch | None = None) -> None:
        await self._write(batch, self._answer_plain(answered, received))

    def _answer_plain(self, answered: Answered, received: datetime) -> _Plain:
        line = answered_line(answered.extension, answered.transfer, self._texts)

        def conclude(changed: bool) -> None:
            if not changed:
                self.counters.replays_ignored += 1

        return _Plain(lambda tell: self._statements.answer_step(answered, line, received,
                                                                tell), conclude)

    async def _forwarded(self, forwarded: Forwarded, received: datetime,
                         batch: Batch | None = None) -> None:
        await self._write(batch, self._forward_plain(forwarded, received))

    def _forward_plain(self, forwarded: Forwarded, received: datetime) -> _Plain:
        line = forwarded_line(forwarded.to_number, self._texts)
        return _Plain(lambda tell: self._statements.forward_step(forwarded, line, received,
                                                                 tell), lambda _: None)

    def _end_plain(self, ended: Ended, origin: Origin, received: datetime,
                   recovering: bool) -> _Plain:
        """The end of a call that cannot get a ticket (answered, or not a missed call)."""
        notes, line, touch = self._end_texts(ended, origin)
        return _Plain(lambda tell: self._statements.finish_step(
            ended, line, notes, received, recovering, touch, tell),
            lambda done: self._concluded(ended, notes, "", done))

    def _concluded(self, ended: Ended, notes: str, ticket: str, done: bool) -> None:
        """The counters and the log line of a call's end (``ticket``: what became of its
        ticket); not ``done``: it had ended already."""
        if done:
            self.counters.calls_ended += 1
            _log_end(ended, notes, ticket)
        else:
            self.counters.replays_ignored += 1

    async def _ended(self, ended: Ended, origin: Origin, received: datetime,
                     recovering: bool = False, batch: Batch | None = None) -> None:
        if not may_get_ticket(ended.outcome):
            await self._write(batch, self._end_plain(ended, origin, received, recovering))
            return
        end = _End(ended, origin, received, recovering)
        if batch is None:
            await self._store.batch(lambda batch: self._missed_ends(batch, [end], True))
        else:
            await self._missed_ends(batch, [end], True)

    async def _missed_ends(self, batch: Batch, ends: Sequence[_End], last: bool) -> None:
        """Ends of calls that may get a ticket, in order: their numbers' locks and their
        ticket facts in one round trip, then their tickets (or their plain ends) in one
        message; ``last``: the COMMIT rides along with it.

        Two ends of one number cannot share a round: the second's facts must see the
        first's ticket (joined, counted). So a round stops before the first end whose
        number it holds already, and the rest read their facts again in the next round,
        in the order the calls ended; one by one, there is a round per end."""
        pending = list(ends)
        while pending:
            found = await self._statements.finishing_missed(
                batch, [(end.ended, end.recovering) for end in pending],
                self._ticket_query())
            taken = first_round(f.call.number if f is not None else None for f in found)
            steps: list[Step] = []
            concluded: list[Callable[[str], None] | Ended] = []  # an end finalised already
            for end, finishing in zip(pending[:taken], found[:taken], strict=True):
                if finishing is None:
                    concluded.append(end.ended)
                    continue
                step, conclude = self._missed_end(end, finishing)
                steps.append(step)
                concluded.append(conclude)
            pending = pending[taken:]
            told = iter(await batch.run_told(steps, last and not pending))
            for then in concluded:
                if isinstance(then, Ended):
                    self._concluded(then, "", "", False)
                else:
                    then(next(told))

    def _missed_end(self, end: _End, finishing: FinishingCall
                    ) -> tuple[Step, Callable[[str], None]]:
        """A missed call's end, its facts read: the statement the rules choose (its ticket,
        or its end alone: an outgoing call, a withheld number), and what follows once it
        has told its outcome (the counters, the log line)."""
        ended = end.ended
        notes, line, touch = self._end_texts(ended, end.origin)
        if not gets_ticket(finishing.direction, ended.outcome, finishing.call.withheld,
                           self._tickets):
            return (self._statements.finish_step(ended, line, notes, end.received,
                                                 end.recovering, touch, tell=True),
                    lambda told: self._concluded(ended, notes, "", True))
        plan = self._plan(ended, end.origin.where, finishing.call, finishing.facts)

        def conclude(told: str) -> None:
            self.counters.ticket_writes += 1
            self._concluded(ended, notes, self._ticket_done(
                plan, finishing.facts, self._statements.ticket_of(plan, told)), True)

        return (self._statements.ticket_step(plan, finishing.row, finishing.client, ended,
                                             line, notes, end.received, touch), conclude)

    def _end_texts(self, ended: Ended, origin: Origin
                   ) -> tuple[str, LogLine, EndTouch | None]:
        """A call's end as its row, its log line and the CRM's sales side say it."""
        notes = ended_notes(ended, self._texts)
        return notes, ended_line(notes, self._texts), self._end_touch(ended, origin)

    def _end_touch(self, ended: Ended, origin: Origin) -> EndTouch | None:
        """The CRM's sales side of the call's end, for an origin that asks for it: dated
        by the call's end (when it happened: a replay writes the same line) in the
        office's zone, as a Zadarma call's is; written with the end, once per call."""
        if not origin.sales_side:
            return None
        return end_touch(ended.outcome, ended.duration, ended.at, self._zone, self._texts)

    def _plan(self, ended: Ended, where: Dialling, call: MissedCall, facts: TicketFacts
              ) -> TicketPlan:
        """What the rules make of a missed call's ticket."""
        if call.extension is None:
            call = replace(call, extension=ended.extension)
        return plan_ticket(call, facts, self._tickets, self._texts, self._zone, where)

    @staticmethod
    def _ticket_done(plan: TicketPlan, facts: TicketFacts, ticket: int | None) -> str:
        """What became of the call's ticket, for its log line (``ticket_text``)."""
        if isinstance(plan, TicketUpdate):
            # the count plan_ticket puts in the title: this call and the earlier ones
            return ticket_text(plan.ticket, 1 + facts.earlier_missed, joined=True)
        return ticket_text(ticket)

    # -- Zadarma -----------------------------------------------------------------------------

    def _admitted(self, event: ZadarmaEvent, form: Mapping[str, str],
                  context: ZadarmaContext, received: datetime,
                  tally: IngestCounters | None = None) -> _Admitted | ZadarmaOutcome:
        """The checks made before the database is asked (``dpvoip.zadarma.guard``): the
        event to journal, or the answer to one refused already (stale, or from the
        future)."""
        verdict = freshness(event.call_start, context.zone, received, context.guard)
        if not verdict.accepted:
            return self._refuse(event, verdict, tally or self.counters)
        signed = signed_key(form)
        if signed is None:  # not a kind parse_event returns; never silently unbound
            raise ValueError(f"no signed string for {event.kind}")
        # The caller as this event alone shows it: looked up in the same round trip as the
        # journal. Nearly always the call's own number; when the whole journal says
        # otherwise (a callback's legs), it is looked up again.
        alone = summarise([event])
        guessed = normalise(alone.remote, context.where) if alone else None
        guess = None if self._directory.never_matches(guessed) else guessed
        ending = guessed if event.final and not event.outgoing else None
        return _Admitted(JournalItem(event, form, zadarma_call_id(event.pbx_call_id), guess,
                                     received, signed, ending), context, alone, guessed)

    async def _zadarma_groups(self, group: Sequence[_Admitted]) -> list[ZadarmaOutcome]:
        """A group of Zadarma events (``dpvoip.calls.grouping``) in one transaction; the
        counters count them once it has committed."""
        tally = IngestCounters()
        outcomes = await self._store.batch(lambda batch: self._zadarma(batch, group, tally))
        self.counters.add(tally)
        return outcomes

    async def _zadarma(self, batch: Batch, group: Sequence[_Admitted],
                       tally: IngestCounters) -> list[ZadarmaOutcome]:
        """Journal the events, then compute each call again from all of its events and
        write what changed: serialised per call (and per signed string) across instances
        by advisory locks. A repeated event stops at the journal and changes nothing; a
        refused one has its journal entry taken back. The usual event's writes ride along
        with the others' in the group's last statement, with the COMMIT: two round trips
        for the whole group."""
        entries = await self._statements.journal(batch, [admitted.item for admitted in group])
        later: list[tuple[str, dict[str, Any]]] = []  # sent together with the COMMIT
        missed: list[_ZadarmaMissed] = []  # their calls and tickets written together
        outcomes = [await self._judged(batch, admitted, entry, later, missed, tally)
                    for admitted, entry in zip(group, entries, strict=True)]
        await self._zadarma_tickets(batch, missed, tally, last=not later)
        await batch.run_planned_together(later, last=True)
        return outcomes

    async def _judged(self, batch: Batch, admitted: _Admitted, entry: JournalEntry,
                      later: list[tuple[str, dict[str, Any]]],
                      missed: list[_ZadarmaMissed], tally: IngestCounters
                      ) -> ZadarmaOutcome:
        """One journalled event judged against its call's journal, and its call written."""
        item, context = admitted.item, admitted.context
        event = item.event
        if not entry.fresh:
            tally.replays_ignored += 1
            return ZadarmaOutcome(duplicate=True)
        # The journal in arrival order: this event is the last (the call's lock
        # serialises its writers, so every earlier entry was committed before it).
        events = [event] if len(entry.forms) == 1 else journalled(entry.forms)
        before = events[:-1]
        verdict = bound(event, entry.bound_elsewhere)
        if verdict.accepted:
            verdict = admit(event, form_size(item.form), before,
                            sum(form_size(f) for f in entry.forms[:-1]), context.guard)
        if not verdict.accepted:
            later.append(self._statements.unjournal(item, entry))
            return self._refuse(event, verdict, tally)
        alone = admitted.alone
        call = alone if len(events) == 1 else summarise(events)
        if call is None:
            return ZadarmaOutcome(duplicate=False)  # a recording notice, kept for later
        trusted = True
        if call.callback:
            call, trusted = await self._callback(batch, events, call, context, entry, tally)
            if call is None:
                return ZadarmaOutcome(duplicate=False)
        number = (admitted.guessed if alone is not None and call.remote == alone.remote
                  else normalise(call.remote, context.where))
        if number == item.guess:
            match = self._directory.match_of(number, entry.found)
        else:
            match = await self._directory.lookup(number, within=batch) if number else None
        return await self._zadarma_call(batch, item.identity, call, entry, context, number,
                                        match, item.received, later, missed, tally, trusted)

    async def _callback(self, batch: Batch, events: list[ZadarmaEvent], call: ZadarmaCall,
                        context: ZadarmaContext, entry: JournalEntry,
                        tally: IngestCounters) -> tuple[ZadarmaCall | None, bool]:
        """A callback's legs, checked against the click-to-call requests dpvoip made
        (the phone rung, the number dialled, within the minutes before the call's first
        event arrived): the call as a callback, the customer taken from the request when
        only the user's leg has come (True); or, without such a request, the call as its
        events say without the rewrite, which gets no CRM writes (False)."""
        found = await self._statements.callback_requests(
            batch, user_phones(events), customer_numbers(events, context.where),
            entry.first_received)
        request = verify_callback(events, [CallbackRequest(*row) for row in found],
                                  context.where)
        if request is not None:
            if not call.remote:
                call = replace(call, remote=request.number_dialled)
            return call, True
        tally.zadarma_callback_unverified += 1
        self._warn("callback_unverified", events[-1].pbx_call_id,
                   "callback legs that no click-to-call request of dpvoip explains:"
                   " recorded as their events say, without the callback's rewrite and"
                   " without CRM writes")
        return summarise(as_plain(events)), False

    async def _zadarma_tickets(self, batch: Batch, missed: Sequence[_ZadarmaMissed],
                               tally: IngestCounters, last: bool) -> None:
        """The missed calls of a run that get a ticket, in order: their call statements
        and their ticket facts in one round trip, then their tickets in one message;
        ``last``: the COMMIT rides along with it.

        Two calls of one number cannot share a round: the second's facts must see the
        first's ticket (joined, counted), and its own row must not be counted among the
        first's missed calls. So a round stops before the first call whose number it
        holds already; the rest follow in the next, in order."""
        pending = list(missed)
        while pending:
            count = first_round(call.row.number for call in pending)
            taken, pending = pending[:count], pending[count:]
            found = await self._statements.zadarma_missed(
                batch, [call.row for call in taken], self._ticket_query())
            plans = [self._plan(call.ended, call.where, call.call, facts)
                     for call, (_, facts) in zip(taken, found, strict=True)]
            told = await batch.run_told(
                [self._statements.ticket_step(plan, row_id, call.client, call.ended,
                                              call.line, call.row.notes, call.row.received)
                 for call, plan, (row_id, _) in zip(taken, plans, found, strict=True)],
                last and not pending)
            for call, plan, (_, facts), outcome in zip(taken, plans, found, told,
                                                       strict=True):
                tally.ticket_writes += 1
                tally.calls_ended += 1
                _log_end(call.ended, call.row.notes, self._ticket_done(
                    plan, facts, self._statements.ticket_of(plan, outcome)))

    def _refuse(self, event: ZadarmaEvent, verdict: Verdict, tally: IngestCounters
                ) -> ZadarmaOutcome:
        """Count (and, not too often, log) an event the guard refused."""
        if verdict.repeat or verdict.reason is None:
            tally.replays_ignored += 1
            return ZadarmaOutcome(duplicate=True)
        name = f"zadarma_{verdict.reason.value}"
        setattr(tally, name, getattr(tally, name) + 1)
        self._warn(verdict.reason.value, event.pbx_call_id,
                   f"{event.kind} refused: {verdict.detail}")
        return ZadarmaOutcome(duplicate=False, refused=verdict.reason.value)

    def _warn(self, reason: str, pbx_call_id: str, text: str) -> None:
        """A suspicious Zadarma event, logged at most once per ``SUSPICIOUS_LOG_INTERVAL``
        per reason; the ones in between are counted and said in the next line."""
        now = self._clock.seconds()
        last, since = self._warned.get(reason, (float("-inf"), 0))
        if now - last < SUSPICIOUS_LOG_INTERVAL:
            self._warned[reason] = (last, since + 1)
            return
        self._warned[reason] = (now, 0)
        log.warn("suspicious Zadarma event of call {pbx!r} ({reason}): {text}{more}",
                 pbx=pbx_call_id[:60], reason=reason, text=text,
                 more=f" ({since} more of this kind since the last warning)" if since else "")

    async def _zadarma_call(self, batch: Batch, identity: str, call: ZadarmaCall,
                            entry: JournalEntry, context: ZadarmaContext,
                            number: str | None, match: Match | None,
                            received: datetime, later: list[tuple[str, dict[str, Any]]],
                            missed: list[_ZadarmaMissed], tally: IngestCounters,
                            trusted: bool = True) -> ZadarmaOutcome:
        """The call row, its detail, its log lines, the live event and the CRM's sales
        side in one statement; it goes with the group's COMMIT (``later``), or with the
        other missed calls' that get a ticket (``missed``): the usual event costs two
        round trips in all, the journal's and this one, for a whole group; reading the
        owner's extension (a start redirected to its contact's owner) one more.

        Times are Zadarma's own, never when an event was delivered or replayed: the start
        is ``call_start`` (else when the call's first event arrived), the end the start
        plus the talk time (Zadarma's events do not tell the ringing time: a delivery's
        arrival would, but Zadarma retries late deliveries); every write is dated by
        this event's arrival.

        ``trusted``: the call passed every check of the guard (a callback, a request dpvoip
        made); only such a call writes the CRM's sales side and a ticket."""
        previous, existed = entry.previous, entry.existed
        party = remote(call.remote, number, self._texts)
        phone, withheld = party.column, party.withheld
        person = match.person if match else None
        started = (call.started.replace(tzinfo=context.zone).astimezone(UTC)
                   if call.started else entry.first_received)
        ended_at = (started + timedelta(seconds=call.duration)
                    if call.outcome is not None else None)
        extension = int(call.extension) if call.extension.isdigit() else None
        # The outcome, when this event is the one that finishes the call.
        finished = call.outcome if previous is None else None
        ticket = (finished is not None and context.tickets and trusted
                  and gets_ticket(call.direction, finished, withheld, self._tickets))
        notes = describe(call, self._texts)
        end_line = ended_line(notes, self._texts) if finished is not None else None
        # (line, only when the row is new): whether the row is new is known in SQL.
        lines = [(line, True) for line in started_lines(call.direction, party.shown, match,
                                                         self._texts)]
        if end_line is not None and not ticket:
            lines.append((end_line, False))
        owner_wanted = (context.redirect_to_owner and person is not None
                        and person.owner_id is not None)
        row = ZadarmaRow(
            identity=identity, call=call, phone=phone, number=number, match=match,
            started=started, ended=ended_at, received=received, extension=extension,
            notes=notes, lines=lines,
            ending=finished is not None and not ticket,
            touch=sales_touch(call.direction, finished, call.duration,
                              person.name if person else None, received, self._zone,
                              self._texts) if trusted else None,
        )
        if ticket and finished is not None and end_line is not None:
            client = match.client if match else None
            missed.append(_ZadarmaMissed(
                row, Ended(identity, finished, call.duration, ended_at or received, extension),
                MissedCall(phone, number, started, call.own_number, extension, withheld),
                client.id if client else None, context.where, end_line))
        else:
            later.append(self._statements.zadarma_statement(row))
        if not existed:  # under the call's lock: the row this statement inserts
            tally.calls_started += 1
        if finished is not None and not ticket:
            tally.calls_ended += 1
        owner_extension = ""
        if owner_wanted and person is not None and person.owner_id is not None:
            owner_extension = await self._statements.owner_extension(batch, person.owner_id)
        return ZadarmaOutcome(duplicate=False, match=match, owner_extension=owner_extension)

    # -- events of calls this process never saw start ----------------------------------------

    async def _unmatched(self, event: Unmatched, origin: Origin, received: datetime,
                         batch: Batch | None = None) -> None:
        candidate = await self._statements.latest_of_connection(
            event.box, event.conn_id, event.at - RECOVERY_WINDOW,
            event.at + timedelta(minutes=1), batch)
        if candidate is None or candidate[4] not in (None, Outcome.INTERRUPTED.value):
            self.counters.orphans += 1
            log.warn("{kind} for connection {conn} of box {box} matches no open call: ignored",
                     kind=event.kind, conn=event.conn_id, box=event.box)
            return
        call_id, direction, started_at, extension, _, answered = candidate
        if event.kind == "CONNECT":
            assert event.extension is not None
            await self._answered(Answered(call_id, event.extension, event.at), received, batch)
            return
        rules = origin.rules or BoxRules(origin.name, self._zone)
        zone = rules.zone
        started_local = started_at.astimezone(zone).replace(tzinfo=None)
        outcome = decide(direction, started_local, event.local_at, event.duration,
                         extension if answered else None, rules)
        ended = Ended(call_id, outcome, event.duration, event.at, extension,
                      Detail(Reason.RECOVERED))
        await self._ended(ended, origin, received, recovering=True, batch=batch)

    async def close_open_calls(self, box: str, reason: Reason, at: datetime,
                               started_before: datetime | None = None,
                               keep: Collection[str] = ()) -> int:
        """Close every call of ``box`` still active (left by a lost connection or a crash);
        with ``started_before``, only those that started before it (the last run's); never
        the calls in ``keep`` (the source still has them: followed on)."""
        calls = [call for call in await self._statements.active_calls(box, started_before)
                 if call[0] not in keep]
        origin = Origin(box, Dialling())
        received = self._now()
        for call_id, extension in calls:
            await self._ended(
                Ended(call_id, Outcome.INTERRUPTED, 0, at, extension, Detail(reason)),
                origin, received,
            )
        return len(calls)


def journalled(forms: Iterable[Mapping[str, str]]) -> list[ZadarmaEvent]:
    """The events of a call's journal. A form an older version journalled and this one
    refuses (its checks grew: issue 14) is left out rather than failing every later event
    of the call."""
    events = []
    for form in forms:
        try:
            parsed = parse_event(form)
        except BadEvent:
            continue
        if isinstance(parsed, ZadarmaEvent):
            events.append(parsed)
    return events


def _started_number(happening: Happening, origin: Origin) -> str | None:
    """A started call's caller or callee as the directory knows numbers (None for a
    hairpin, an internal call, and for any other happening)."""
    if not isinstance(happening, Started) or happening.hairpin:
        return None
    return normalise(happening.remote, origin.where)


def next_run(waiting: Sequence[_Admitted]) -> tuple[list[_Admitted], list[_Admitted]]:
    """The Zadarma events of ``waiting`` (in order) that go into one journal statement,
    and the rest, in order, for the next runs.

    Two events of one call, or of one signed string, never share a run: each is judged
    against what the one before it committed to the journal. So the second waits for the
    next run, and with it every later event of its call, its signed string or its caller,
    so that those keep their order (a caller's missed calls group into its ticket in the
    order they ended). The others need not wait: a replayed spool alternates one call's
    start with another's end, and a run that ended at each repeat held three events."""
    run: list[_Admitted] = []
    rest: list[_Admitted] = []
    in_run: set[tuple[str, object]] = set()
    held: set[tuple[str, object]] = set()
    for admitted in waiting:
        apart = {("call", admitted.item.event.pbx_call_id), ("signed", admitted.item.signed)}
        keys = apart | ({("caller", admitted.guessed)} if admitted.guessed else set())
        if apart & in_run or keys & held:
            rest.append(admitted)
            held |= keys
        else:
            run.append(admitted)
            in_run |= apart
    return run, rest


def first_round(numbers: Iterable[str | None]) -> int:
    """How many of the missed calls whose callers' ``numbers`` these are (None: withheld,
    or finalised already) share a round of tickets: up to the first number the round
    holds already, whose call must see the earlier one's ticket."""
    seen: set[str] = set()
    count = 0
    for number in numbers:
        if number is not None:
            if number in seen:
                break
            seen.add(number)
        count += 1
    return count


def _log_end(ended: Ended, notes: str, ticket: str) -> None:
    """A call's end in the log (``ticket``: what became of its ticket)."""
    log.info("call {call_id}: {finished}", call_id=ended.call_id,
             finished=finished_text(ended.outcome.status, notes, ticket),
             status=ended.outcome.status, notes=notes, ticket=ticket)


def _submission_key(item: Submission | ZadarmaSubmission) -> str:
    if isinstance(item, ZadarmaSubmission):
        return f"zd:{item.event.pbx_call_id}"
    return _chain_key(item.happening)


def _chain_key(happening: Happening) -> str:
    if isinstance(happening, Unmatched):
        return f"{happening.box}:{happening.conn_id}"
    return happening.call_id
