"""The ingest entry point made durable: committed to PostgreSQL, or spooled to disk first.

Every event goes to the ingest. When PostgreSQL is unreachable, or does not commit within
``deadline`` seconds, the event is appended to the spool and fsynced; only then is it
acknowledged (a webhook gets its 200). From the first spooled event on, newer events are
spooled too: the events of a call therefore reach the database in the order they
happened. Once the replay commits again (the database is back), only the events that
depend on something still in the spool wait behind it: those of a call in the spool, and
those of a number with a call in the spool (``spool.ordering``); every other event goes
straight to the database, with its answer (the caller's name) as usual. So a replay drains
while the office's new calls keep arriving, instead of spooling them all behind it; and it
runs on what they leave: while more than ``LIVE_FIRST_ABOVE`` of them are on their way,
it begins no new transaction. The
keys of what this process spooled are counted in memory (up to ``MAX_HELD_RECORDS``
records; beyond that, and for the records of the last run until the spool was empty once,
every event waits, as before). Replay goes through the same ingest, which is replay-safe
(the Zadarma journal and the call ids make a second delivery a no-op). An event that timed
out may still commit later: its replay then changes nothing. An event that would find the
database too far behind to commit it within the deadline (``spool.admission``) is spooled
at once rather than queued; a timeout (slow, not gone) does not stop the passing.

The replay reads the spool in chunks and applies them in groups: up to ``group`` records
in one transaction (``Ingest.apply_together``: one commit, one WAL flush, for many
events), on up to ``lanes`` connections at once. Every event of one call goes to the lane
its first event took, and a lane applies its records in the spool's order, so each call's
events reach the database in order while lanes commit side by side; a new call's lane is
chosen by its number, so that one number's ticket lock is only ever taken in one lane. A
group that fails for a reason of its own (a record this version cannot apply, two
transactions crossing) is applied again one record per transaction, and only a bad record
is skipped. A record of an event whose call this process never saw start (``Unmatched``:
it looks for the call in the database) waits until everything before it is committed.
The mark is written after each chunk, up to the last record before which everything is
through, with the records through beyond it (a lane's group that committed while another
lane's failed). ``stop_replay`` (at SIGTERM) lets the groups in flight finish, writes the mark
and ends the replay, so that stopping does not wait for the whole spool and the next
start does not apply again what was applied.

A disk that refuses (full, over quota, failing) refuses the event like a full spool:
``NotRecorded`` (a webhook's 503), never an error per request; the spool's state raises
the alarm until a write succeeds again. Warnings of a flood are rate-limited
(``core.log_budget``); the counters count every one.
"""

from __future__ import annotations

import functools
import itertools
import zlib
from collections import Counter
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TypeVar

from twisted.application.internet import TimerService
from twisted.application.service import Service
from twisted.internet.defer import Deferred, TimeoutError, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure

from dpvoip.calls.ingest import (
    Ingest,
    Origin,
    Submission,
    ZadarmaContext,
    ZadarmaOutcome,
    ZadarmaSubmission,
)
from dpvoip.core.errors import summary
from dpvoip.core.happenings import Ended, Happening, Started, Unmatched
from dpvoip.core.log_budget import LogBudget, more_like_this
from dpvoip.core.numbers import Dialling
from dpvoip.core.outcomes import Reason
from dpvoip.deferreds import OneShotObserver, race, shield, within
from dpvoip.spool.admission import Admission
from dpvoip.spool.journal import AsyncSpool, SpoolFull, disk_error
from dpvoip.spool.ordering import Keys, happening_keys, zadarma_keys
from dpvoip.spool.records import fritz_record, read_received, read_record, zadarma_record
from dpvoip.store.database import Store, is_conflict, is_unavailable
from dpvoip.store.migrations import SchemaReport
from dpvoip.zadarma.events import ZadarmaEvent, parse_event

log = Logger()
T = TypeVar("T")

#: Records read from the spool at a time (one mark written per chunk); transactions in
#: flight at once during a replay (each on its own connection); records per transaction.
REPLAY_CHUNK = 512
REPLAY_LANES = 3
REPLAY_GROUP = 32
#: Calls whose lane the replay remembers (then it forgets them all and starts again).
MAX_REMEMBERED_CALLS = 100_000
#: Spooled records whose keys are kept in memory (a few hundred bytes each); a longer
#: outage spools every event until the spool is empty, as if none were counted.
MAX_HELD_RECORDS = 50_000
#: Numbers of calls started and not yet ended, for the keys of their ends.
MAX_OPEN_NUMBERS = 20_000
#: Events on their way straight to the database beyond which the replay waits before its
#: next transaction: the live calls first, the backlog on what they leave (a replay
#: taking its share regardless made them miss the deadline under load, and spooled them).
LIVE_FIRST_ABOVE = 16


def replay_lanes(pool_size: int) -> int:
    """Transactions a replay keeps in flight: at most half the pool's connections, so that
    the new calls that go past the replay (straight to the database) find connections
    free; a replay holding three of four left them one, their commits missed the
    deadline, and they were spooled behind it after all."""
    return max(1, min(REPLAY_LANES, pool_size // 2))


@dataclass(frozen=True)
class Replayed:
    seq: int
    payload: bytes
    item: Submission | ZadarmaSubmission


def unavailable(error: BaseException) -> bool:
    """Whether ``error`` means "the database is not there now" (or did not commit within
    the deadline), not "this event is wrong": the event is spooled, the replay pauses."""
    return isinstance(error, TimeoutError) or is_unavailable(error)


class NotRecorded(Exception):
    """Neither committed nor spooled (the spool is full): the event is not acknowledged."""


@dataclass
class DurableCounters:
    direct: int = 0
    spooled: int = 0
    spooled_behind: int = 0  # of those, spooled while the replay flowed: behind their call
    ahead: int = 0  # of the direct ones, those that went past a replay in progress
    backed_up: int = 0  # spooled at once: the database was too far behind to commit in time
    timed_out: int = 0  # sent straight, not committed within the deadline: spooled
    replayed: int = 0
    replay_transactions: int = 0  # the replay's transactions (records in groups)
    unreplayable: int = 0
    refused: int = 0  # spool full: not acknowledged (webhooks get 503; Zadarma retries)
    disk_refused: int = 0  # of those, refused because the disk failed (full, EIO)
    mark_failures: int = 0  # replay marks the disk refused (the replay went on)


class DurableIngest:
    def __init__(self, ingest: Ingest, spool: AsyncSpool, store: Store,
                 schema: OneShotObserver[SchemaReport], clock: Any,
                 origins: Mapping[str, Origin],
                 zadarma: Callable[[str | None], ZadarmaContext],
                 region: str, deadline: float = 2.0, lanes: int = REPLAY_LANES,
                 group: int = REPLAY_GROUP, chunk: int = REPLAY_CHUNK,
                 budget: LogBudget | None = None, connections: int = 4) -> None:
        self._ingest = ingest
        self._spool = spool
        self._store = store
        self._schema = schema
        self._clock = clock
        self._origins = origins
        self._zadarma = zadarma
        self._region = region
        self._deadline = deadline
        self._spooling = False
        self._appends = itertools.count()
        self._appended = 0
        self._replaying: OneShotObserver[bool] | None = None
        self._lanes = max(1, lanes)
        self._group_size = max(1, group)
        self._call_lanes: dict[str, int] = {}
        self._begun_up_to = 0  # the highest seq of a group begun in this chunk
        self._tail: OneShotObserver[None] | None = None  # the replay's last records
        self._chunk = max(1, chunk)
        self._stopping = False
        self._budget = budget or LogBudget()
        self.counters = DurableCounters()
        # What the spool holds back: key -> records spooled and not yet applied; each
        # record's keys by its seq (None: appended, seq not known yet).
        self._held: Counter[str] = Counter()
        self._held_by_seq: dict[int, tuple[str, ...]] = {}
        # Records whose keys are not counted may be in the spool (the last run's, or
        # beyond MAX_HELD_RECORDS): everything waits until the spool was empty once.
        self._blind = True
        self._flowing = False  # the replay under way has committed: the database is back
        self._numbers: dict[str, str] = {}  # call id -> number, of calls started
        self._direct_in_flight = 0
        self._admission = Admission(deadline, connections)
        self._live_quiet: list[Deferred[None]] = []  # the replay's lanes waiting for it

    @property
    def spooling(self) -> bool:
        return self._spooling

    @property
    def spool(self) -> AsyncSpool:
        return self._spool

    # -- the entry points ------------------------------------------------------------------

    def submit(self, happening: Happening, origin: Origin) -> Deferred[None]:
        received = self._now()  # kept with the event: a replay writes the same rows
        return shield(Deferred.fromCoroutine(self._durably(
            lambda: self._ingest.submit(happening, origin, received),
            lambda: fritz_record(happening, origin.name, received), None,
            self._keys_of(happening))))

    def _keys_of(self, happening: Happening) -> Keys:
        keys = happening_keys(happening, self._numbers)
        if isinstance(happening, Started):
            if len(self._numbers) >= MAX_OPEN_NUMBERS:
                del self._numbers[next(iter(self._numbers))]  # the oldest: its end waits
            self._numbers[happening.call_id] = happening.remote
        elif isinstance(happening, Ended):
            self._numbers.pop(happening.call_id, None)
        return keys

    def submit_zadarma(self, event: ZadarmaEvent, form: Mapping[str, str],
                       context: ZadarmaContext) -> Deferred[ZadarmaOutcome]:
        # Spooled, the answer has no caller name: the directory is in the database.
        # Shielded: a client hanging up (Klein cancels its handler) must not stop the
        # event half-way between a failed commit and the spool.
        received = self._now()
        return shield(Deferred.fromCoroutine(self._durably(
            lambda: self._ingest.submit_zadarma(event, form, context, received),
            lambda: zadarma_record(dict(form), received, context.provider),
            ZadarmaOutcome(duplicate=False),
            zadarma_keys(event.pbx_call_id, form, event.outgoing))))

    def _now(self) -> datetime:
        return datetime.fromtimestamp(self._clock.seconds(), UTC)

    async def close_open_calls(self, box: str, reason: Reason, at: datetime,
                               started_before: datetime | None = None,
                               keep: Collection[str] = ()) -> int:
        """At a box's start, after the replay: straight to the database."""
        return await self._ingest.close_open_calls(box, reason, at, started_before, keep)

    async def _durably(self, work: Callable[[], Deferred[T]], record: Callable[[], bytes],
                       spooled_result: T, keys: Keys) -> T:
        tail = self._tail
        if self._spooling and tail is not None and not self._may_pass(keys):
            # The replay is on its last records: wait for it (a transaction or two) and go
            # straight to the database after them, rather than behind them into the spool,
            # which a replay chasing its own tail would never empty under steady load.
            await race(self._clock, tail.when_fired(), self._deadline, None)
        passing = self._spooling and self._may_pass(keys)
        if (self._spooling and not passing) or not self._schema.fired:
            if self._flowing:
                self.counters.spooled_behind += 1
            return await self._to_spool(record, spooled_result, "spool not empty", keys)
        ahead = self._direct_in_flight
        if not self._admission.admits(ahead):
            self.counters.backed_up += 1
            self._warn("backed up", "the database is behind (an event would wait about "
                       "{wait} s for it): events are spooled at once and replayed when "
                       "it catches up", wait=f"{self._admission.expected_latency(ahead):.1f}")
            return await self._to_spool(record, spooled_result, "database behind", keys,
                                        quietly=True)
        sent = self._clock.seconds()
        attempt = work()
        self._direct_in_flight += 1
        try:
            result = await within(self._clock, attempt, self._deadline)
        except Exception as error:
            self._direct_landed()
            if not unavailable(error):
                raise
            if isinstance(error, TimeoutError):
                # Slow, not gone: the estimate learns it (the next events are spooled at
                # once rather than wait), and the events of other calls may still pass.
                self._admission.landed(self._clock.seconds() - sent, ahead)
                self.counters.timed_out += 1
            else:
                self._flowing = False
            return await self._to_spool(record, spooled_result, type(error).__name__, keys)
        self._direct_landed()
        self._admission.landed(self._clock.seconds() - sent, ahead)
        self.counters.direct += 1
        if passing:
            self.counters.ahead += 1
        return result

    def _direct_landed(self) -> None:
        self._direct_in_flight -= 1
        if self._direct_in_flight <= LIVE_FIRST_ABOVE:
            self._wake_lanes()

    def _wake_lanes(self) -> None:
        waiting, self._live_quiet = self._live_quiet, []
        for lane in waiting:
            lane.callback(None)

    def _live_first(self) -> Deferred[None]:
        """Fires when the replay may begin its next transaction: at once, unless more
        than ``LIVE_FIRST_ABOVE`` events are on their way straight to the database."""
        if self._direct_in_flight <= LIVE_FIRST_ABOVE or self._stopping:
            return succeed(None)
        waiting: Deferred[None] = Deferred()
        self._live_quiet.append(waiting)
        return waiting

    def _may_pass(self, keys: Keys) -> bool:
        """Whether an event may go past the spool: the replay commits (the database is
        back), every spooled record's keys are counted, and none of this event's keys is
        held back by a record still in the spool."""
        return (self._flowing and not self._blind and keys is not None
                and not any(self._held.get(key) for key in keys))

    def _hold(self, keys: Keys) -> tuple[str, ...] | None:
        """Count ``keys`` as held back before the record is appended (an event of the same
        call arriving during the append must already wait behind it)."""
        if keys is None or self._blind:
            self._blind = True  # a record that holds back everything: all wait
            return None
        self._held.update(keys)
        return keys

    def _release(self, keys: tuple[str, ...] | None) -> None:
        if keys is None:
            return
        self._held.subtract(keys)
        for key in keys:
            if self._held[key] <= 0:
                del self._held[key]

    def _settled(self, seq: int) -> None:
        """The record ``seq`` is through (applied, or skipped): what it held back is free."""
        self._release(self._held_by_seq.pop(seq, None))

    def _forget_held(self) -> None:
        """Too many to count, or the spool is empty: start counting afresh."""
        self._held.clear()
        self._held_by_seq.clear()

    async def _to_spool(self, record: Callable[[], bytes], result: T, reason: str,
                        keys: Keys, quietly: bool = False) -> T:
        if not self._spooling and not quietly:
            log.warn("database unavailable ({reason}): events are spooled to disk until it "
                     "is back", reason=reason)
        self._spooling = True
        self._appended = next(self._appends)
        held = self._hold(keys)
        try:
            seq = await self._spool.append(record())
        except SpoolFull:
            self._release(held)
            self.counters.refused += 1
            self._warn("spool full", "the spool is full: an event could not be recorded "
                       "(not acknowledged); free space or raise [spool] max_mb")
            raise NotRecorded("the database is unavailable and the spool is full") from None
        except OSError as error:
            self._release(held)
            if not disk_error(error):
                raise
            self.counters.refused += 1
            self.counters.disk_refused += 1
            self._warn("spool disk", "the spool's disk refused an event ({error}): not "
                       "recorded, not acknowledged; free space on the spool's filesystem",
                       error=summary(error))
            raise NotRecorded("the database is unavailable and the spool's disk refuses "
                              "writes") from None
        except BaseException:
            self._release(held)
            raise
        if held is not None and not self._blind:
            self._held_by_seq[seq] = held
            if len(self._held_by_seq) > MAX_HELD_RECORDS:
                self._blind = True  # too many to count: all wait until the spool is empty
                self._forget_held()
        self.counters.spooled += 1
        return result

    def _warn(self, kind: str, text: str, **fields: Any) -> None:
        """A critical line, at most a few of a kind per minute (the counters count all)."""
        write, held = self._budget.allow(kind, self._clock.seconds())
        if write:
            log.critical(text + "{more}", more=more_like_this(held, self._budget.window),
                         **fields)

    # -- replay ----------------------------------------------------------------------------

    def idle(self) -> Deferred[None]:
        """Fires when no replay is running."""
        running = self._replaying
        if running is None:
            return succeed(None)
        return running.when_fired().addBoth(lambda _: None)

    def replay(self) -> Deferred[bool]:
        """Replay the spool into the database, in order; fires True once it is empty (then
        new events go straight to the database again), False if the database failed. One
        replay at a time: who asks while one runs gets its result."""
        running = self._replaying
        if running is None:
            running = self._replaying = OneShotObserver()
            Deferred.fromCoroutine(self._replay()).addBoth(
                functools.partial(self._replay_ended, running))
        return running.when_fired()

    def _replay_ended(self, run: OneShotObserver[bool], result: bool | Failure) -> None:
        if self._replaying is run:
            self._replaying = None
        self._flowing = False
        tail, self._tail = self._tail, None
        if tail is not None:
            tail.fire(None)
        run.fire(result)

    def stop_replay(self) -> None:
        """Let the records in flight finish, mark them, and replay nothing more (at stop)."""
        self._stopping = True
        self._wake_lanes()

    async def _replay(self) -> bool:
        if not self._schema.fired:
            return False
        while True:
            if self._stopping:
                return False
            seen = self._appended
            pending = await self._spool.pending(self._chunk)
            if not pending:
                if seen == self._appended:
                    if self._spooling:
                        log.info("spool replayed: events go straight to the database again")
                    self._spooling = False
                    self._blind = False  # whatever is spooled from now on is counted
                    self._forget_held()
                    return True
                continue  # an event was spooled while we looked: read again
            self._spooling = True
            if len(pending) <= self._group_size * self._lanes and self._tail is None:
                self._tail = OneShotObserver()  # new events wait for these few
            done, ahead, paused = await self._replay_chunk(pending)
            if done or ahead:
                await self._mark(done, ahead)
            if paused is not None:
                log.info("replay paused: the database is unavailable ({error})",
                         error=type(paused).__name__)
                return False

    async def _replay_chunk(self, records: list[tuple[int, bytes]]
                            ) -> tuple[int, list[int], BaseException | None]:
        """Apply ``records`` in groups of up to ``group``, one transaction each, on up to
        ``lanes`` connections at once; (the last seq before which every record is through,
        the seqs through beyond it, the outage that paused it or None). Records beyond the
        first one not through are through when another lane's group committed while this
        one's failed: the mark keeps them, so that no start applies them again."""
        settled: dict[int, bool] = {}  # seq -> through (applied or skipped as unreplayable)
        paused: list[BaseException] = []
        self._begun_up_to = 0
        if len(self._call_lanes) >= MAX_REMEMBERED_CALLS:
            # Between chunks everything before is committed: any lane will do for the rest.
            self._call_lanes.clear()
        lanes: list[list[Replayed]] = [[] for _ in range(self._lanes)]

        async def run_lanes() -> None:
            running = [Deferred.fromCoroutine(self._lane(lane, settled, paused))
                       for lane in lanes if lane]
            for lane_done in running:
                await lane_done
            for lane in lanes:
                lane.clear()

        for seq, payload in records:
            if self._stopping or paused:
                break
            try:
                barrier, item = self._prepared(payload)
            except Exception as error:
                self._skip(seq, payload, error)
                settled[seq] = True
                self._settled(seq)
                continue
            if item is None:  # nothing to apply (a Zadarma notice without a call)
                self.counters.replayed += 1
                settled[seq] = True
                self._settled(seq)
                continue
            if barrier:  # it looks in the database for what came before it: alone, after
                await run_lanes()
                if paused or self._stopping:
                    break
                await self._group([Replayed(seq, payload, item)], settled, paused)
                continue
            lanes[self._lane_of(item)].append(Replayed(seq, payload, item))
        await run_lanes()
        done = 0
        for seq, _ in records:
            if not settled.get(seq):
                break
            done = seq
        ahead = [seq for seq, _ in records if seq > done and settled.get(seq)]
        return done, ahead, (paused[0] if paused else None)

    def _lane_of(self, item: Submission | ZadarmaSubmission) -> int:
        """The lane of ``item``: every event of one call in the lane its first event took,
        so that one call's events commit in order; a new call's lane chosen by its number,
        so that the missed-call ticket locks of one number are taken in one lane only
        (two lanes crossing over two numbers' locks would deadlock)."""
        if isinstance(item, ZadarmaSubmission):
            call, number = f"zd:{item.event.pbx_call_id}", item.form.get("caller_id", "")
        else:
            happening = item.happening
            call = (f"{happening.box}:{happening.conn_id}" if isinstance(happening, Unmatched)
                    else happening.call_id)
            number = happening.remote if isinstance(happening, Started) else call
        lane = self._call_lanes.get(call)
        if lane is None:
            digits = "".join(c for c in number if c.isdigit())[-9:] or number
            lane = zlib.crc32(digits.encode()) % self._lanes
            self._call_lanes[call] = lane
        return lane

    async def _lane(self, items: list[Replayed], settled: dict[int, bool],
                    paused: list[BaseException]) -> None:
        """A lane's records in groups, in order. Once stopping, only the records before
        the last one any lane has begun: so that every record up to it is through and
        marked, and none after it applied (the next start replays exactly the rest)."""
        position = 0
        while position < len(items) and not paused:
            await self._live_first()
            group = items[position:position + self._group_size]
            if self._stopping:
                group = [one for one in group if one.seq < self._begun_up_to]
                if not group:
                    return
            position += len(group)
            await self._group(group, settled, paused)

    async def _group(self, items: list[Replayed], settled: dict[int, bool],
                     paused: list[BaseException]) -> None:
        """One transaction for ``items``; if it fails for a reason of its own (a record
        this version cannot apply, two groups' locks crossing), each record again in a
        transaction of its own, so that only a bad record is skipped."""
        self._begun_up_to = max(self._begun_up_to, items[-1].seq)
        try:
            await within(self._clock, self._ingest.apply_together([i.item for i in items]),
                         self._deadline * 5)
        except Exception as error:
            if unavailable(error) and not is_conflict(error):
                self._flowing = False
                paused.append(error)
                return
            if len(items) == 1:
                self._skip(items[0].seq, items[0].payload, error)
                settled[items[0].seq] = True
                self._settled(items[0].seq)
                return
            for one in items:
                if paused:
                    return
                await self._group([one], settled, paused)
            return
        self.counters.replayed += len(items)
        self.counters.replay_transactions += 1
        self._flowing = True
        for one in items:
            settled[one.seq] = True
            self._settled(one.seq)

    def _skip(self, seq: int, payload: bytes, error: BaseException) -> None:
        self.counters.unreplayable += 1
        log.error("spool record {seq} could not be applied and is skipped"
                  " ({error}): {payload}", seq=seq,
                  error=f"{type(error).__name__}: {error}"[:300],
                  payload=payload[:500].decode("utf-8", "replace"))

    async def _mark(self, done: int, ahead: list[int]) -> None:
        try:
            await self._spool.replayed(done, ahead)
        except OSError as error:
            if not disk_error(error):
                raise
            # The spool keeps the mark in memory and writes it again later: the replay
            # goes on without applying these records again.
            self.counters.mark_failures += 1
            self._warn("spool mark", "the spool's disk refused the replay mark ({error}); "
                       "the replay goes on and the mark is written once there is space",
                       error=summary(error))

    def _prepared(self, payload: bytes
                  ) -> tuple[bool, Submission | ZadarmaSubmission | None]:
        """(whether it must wait for everything before it, what to apply: None for a
        record that applies nothing). Raises for a record this version cannot read
        (skipped by the caller)."""
        source, what, name = read_record(payload)  # a box's name, or a provider's
        # As at its arrival (a record from before dpvoip kept it: as now, as it did then).
        received = read_received(payload) or self._now()
        if source == "zadarma":
            event = parse_event(what)
            if not isinstance(event, ZadarmaEvent):
                return False, None
            return False, ZadarmaSubmission(event, what, self._zadarma(name), received)
        origin = self._origins.get(name) or Origin(name, Dialling(self._region))
        return isinstance(what, Unmatched), Submission(what, origin, received)


class DurableService(Service):
    """Opens the spool at start, replays it once the database schema is prepared (before
    the boxes connect), and again every ``interval`` seconds while events are spooled.

    The periodic replay is Twisted's ``TimerService``, started once the schema is prepared
    (its first tick at once) rather than at this service's start: there is nothing to
    replay into before that."""

    name = "spool"

    def __init__(self, durable: DurableIngest, spool: AsyncSpool, clock: Any,
                 prepared: Callable[[], Deferred[None]], interval: float = 1.0) -> None:
        self._durable = durable
        self._spool = spool
        self._prepared = prepared
        self._replayer = TimerService(interval, self._tick)
        self._replayer.clock = clock
        self._replayed = OneShotObserver[None]()
        self._alarmed = False

    def when_replayed(self) -> Deferred[None]:
        """Fires once what the last run spooled is in the database."""
        return self._replayed.when_fired()

    def startService(self) -> Deferred[None]:
        super().startService()
        opened = self._spool.start()
        self._spool.stopped_by_owner()  # closed by _stop, after the replay's last mark

        def begin(_: object) -> None:
            state = self._spool.state()
            if state.recovered_torn_bytes:
                log.warn("spool: cut {n} bytes of a record torn by a crash",
                         n=state.recovered_torn_bytes)
            if state.pending:
                log.info("spool: {n} events of the last run to replay", n=state.pending)
            self._prepared().addCallback(lambda _: self._start_replaying())

        return opened.addCallback(begin)

    def _start_replaying(self) -> None:
        if self.running and not self._replayer.running:
            self._replayer.startService()

    def _tick(self) -> None:
        """One tick of the replay loop: never waits (a replay under way is joined, not
        started twice), so the loop keeps its beat and stops at once."""
        self._watch_alarm()
        if self._spool.state().mark_behind and self._durable.idle().called:
            self._spool.sync_mark().addErrback(lambda _: None)  # next tick tries again
        if self._replayed.fired and not self._durable.spooling:
            return
        self._durable.replay().addBoth(self._replay_settled)

    def _replay_settled(self, result: bool | Failure) -> None:
        if isinstance(result, Failure):
            log.warn("spool replay failed, will retry: {error}",
                     error=summary(result.value))
        elif result:
            self._replayed.fire(None)

    def _watch_alarm(self) -> None:
        state = self._spool.state()
        if state.alarm and not self._alarmed:
            if state.disk_error:
                log.critical("the spool's disk refuses writes ({error}): events are refused "
                             "while the database is unavailable; free space on the spool's "
                             "filesystem", error=state.disk_error)
            else:
                log.critical("spool nearly full: {used} of {limit} bytes; the database has "
                             "been unavailable for long", used=state.bytes, limit=state.limit)
        elif self._alarmed and not state.alarm:
            log.info("spool alarm over: below its alarm level, and its disk takes writes")
        self._alarmed = state.alarm

    def stopService(self) -> Deferred[None]:
        super().stopService()
        return Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
        if self._replayer.running:
            await self._replayer.stopService()
        # A replay under way lets its records in flight finish and marks them; the rest
        # waits for the next start (stopping never waits for the whole spool).
        self._durable.stop_replay()
        await self._durable.idle()
        await self._spool.stop()
