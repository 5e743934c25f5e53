"""Issue 14, the spool's side. Point 4: a full disk (ENOSPC, EDQUOT, EIO from the spool's
own file layer, ``Spool.files``: no privilege, no global patch) refuses the event with
``NotRecorded``, leaves no empty segment files, raises the alarm, lets the replay go on
without its mark and without applying a record twice, and is over once space is freed.
Point 5: the replay keeps several records in flight, waits before a record that looks
in the database for what came before it, and stops at SIGTERM with its progress marked."""

from __future__ import annotations

import errno
import random
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.logger import ILogObserver, LogLevel, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from dpvoip.calls.ingest import Origin, Submission, ZadarmaContext, ZadarmaSubmission
from dpvoip.core.happenings import Answered, Ended, Happening, Started, Unmatched
from dpvoip.core.numbers import Dialling
from dpvoip.core.outcomes import Outcome
from dpvoip.deferreds import OneShotObserver
from dpvoip.spool.durable import DurableIngest, DurableService, NotRecorded
from dpvoip.spool.journal import FileOps, Spool, SpoolState
from dpvoip.spool.records import fritz_record
from dpvoip.store.migrations import SchemaReport
from dpvoip.zadarma.events import ZadarmaEvent, parse_event
from test.support.daemon import scratch

ORIGIN = Origin("office", Dialling("GR"))


class FullDisk(FileOps):
    """The real files, until ``full``: then every write (and the fsync of a file written
    to) fails as a full disk does. ``error`` picks the errno."""

    def __init__(self) -> None:
        self.full = False
        self.error = errno.ENOSPC
        self.refused = 0

    def _refuse(self) -> None:
        if self.full:
            self.refused += 1
            raise OSError(self.error, "No space left on device (injected)")

    def write(self, fd: int, data: bytes) -> int:
        self._refuse()
        return super().write(fd, data)

    def fsync(self, fd: int) -> None:
        self._refuse()
        super().fsync(fd)


def segment_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.seg"))


class FullDiskJournalTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.folder = scratch(self) / "spool"
        self.disk = FullDisk()
        self.spool = Spool(self.folder, max_bytes=1024 * 1024, files=self.disk)
        self.spool.open()
        self.addCleanup(self.spool.close)

    def test_refused_appends_leave_no_empty_segments_and_raise_the_alarm(self) -> None:
        for error in (errno.ENOSPC, errno.EDQUOT, errno.EIO):
            self.disk.full, self.disk.error = True, error
            for _ in range(100):
                with self.assertRaises(OSError):
                    self.spool.append_many([b"refused"])
            self.assertEqual(segment_files(self.folder), [], "no pile of empty files")
            state = self.spool.state()
            self.assertTrue(state.alarm)
            self.assertIn(errno.errorcode[error], state.disk_error)
        self.assertEqual(self.spool.state().disk_errors, 300)
        self.disk.full = False
        [seq] = self.spool.append_many([b"taken"])
        self.assertEqual(self.spool.pending(), [(seq, b"taken")])
        self.assertEqual((self.spool.state().disk_error, self.spool.state().alarm), ("", False))

    def test_a_full_disk_in_a_written_segment_cuts_it_back_and_loses_nothing(self) -> None:
        first = self.spool.append_many([b"one", b"two"])
        self.disk.full = True
        for _ in range(50):
            with self.assertRaises(OSError):
                self.spool.append_many([b"refused"])
        self.assertEqual(len(segment_files(self.folder)), 1)
        self.disk.full = False
        later = self.spool.append_many([b"three"])
        self.assertEqual([p for _, p in self.spool.pending()], [b"one", b"two", b"three"])
        self.spool.close()
        again = Spool(self.folder)
        again.open()
        self.addCleanup(again.close)
        self.assertEqual(again.pending(), [(first[0], b"one"), (first[1], b"two"),
                                           (later[0], b"three")])
        self.assertEqual(again.state().recovered_torn_bytes, 0)

    def test_the_replay_goes_on_without_its_mark_and_writes_it_once_there_is_room(
            self) -> None:
        seqs = self.spool.append_many([b"r%d" % n for n in range(10)])
        self.disk.full = True
        with self.assertRaises(OSError):
            self.spool.replayed(seqs[4])
        state = self.spool.state()
        self.assertTrue(state.mark_behind and state.alarm)
        self.assertEqual([s for s, _ in self.spool.pending()], seqs[5:],
                         "never the same records again in this run")
        with self.assertRaises(OSError):
            self.spool.sync_mark()
        self.disk.full = False
        self.spool.sync_mark()
        self.assertFalse(self.spool.state().mark_behind)
        self.spool.close()
        again = Spool(self.folder)
        again.open()
        self.addCleanup(again.close)
        self.assertEqual([s for s, _ in again.pending()], seqs[5:])

    def test_a_full_replay_frees_the_segments_even_without_the_mark(self) -> None:
        seqs = self.spool.append_many([b"r%d" % n for n in range(10)])
        self.disk.full = True
        with self.assertRaises(OSError):
            self.spool.replayed(seqs[-1])
        self.assertEqual(segment_files(self.folder), [], "the space is given back")
        self.assertEqual(self.spool.pending(), [])
        self.spool.close()  # tries the mark once more: still full
        again = Spool(self.folder)
        again.open()
        self.addCleanup(again.close)
        self.assertEqual(again.pending(), [], "nothing applied twice after a restart")
        [seq] = again.append_many([b"new"])
        self.assertEqual(again.pending(), [(seq, b"new")])

    def test_reading_in_chunks_goes_on_where_the_last_chunk_stopped(self) -> None:
        seqs = self.spool.append_many([b"c%d" % n for n in range(25)])
        read: list[int] = []
        while chunk := self.spool.pending(10):
            read.extend(s for s, _ in chunk)
            self.spool.replayed(chunk[-1][0])
        self.assertEqual(read, seqs)


# -- the durable entry point over a full disk -------------------------------------------------


class DiskSpool:
    """The AsyncSpool's face over a real ``Spool`` (synchronous, for a Clock)."""

    def __init__(self, spool: Spool) -> None:
        self.spool = spool

    def _run(self, call: Any) -> Deferred[Any]:
        try:
            return defer.succeed(call())
        except Exception as error:
            return defer.fail(error)

    def append(self, payload: bytes) -> Deferred[int]:
        return self._run(lambda: self.spool.append_many([payload])[0])

    def pending(self, limit: int | None = None) -> Deferred[list[tuple[int, bytes]]]:
        return self._run(lambda: self.spool.pending(limit))

    def replayed(self, up_to: int, ahead: Sequence[int] = ()) -> Deferred[None]:
        return self._run(lambda: self.spool.replayed(up_to, ahead))

    def sync_mark(self) -> Deferred[None]:
        return self._run(self.spool.sync_mark)

    def state(self) -> SpoolState:
        return self.spool.state()

    def start(self) -> Deferred[None]:
        return defer.succeed(None)

    def stop(self) -> Deferred[None]:
        return self._run(self.spool.close)

    def stopped_by_owner(self) -> None:
        """No reactor here: nothing to give up."""


#: What the fake ingest commits: a Fritz!Box happening, or a Zadarma event.
Applied = Happening | ZadarmaEvent


class Ingest:
    """Commits, fails as an absent database, or holds every submission (a replay's group
    is one submission: all of it commits, or none)."""

    def __init__(self) -> None:
        self.down = False
        self.hold = False
        self.applied: list[Applied] = []
        self.held: list[tuple[list[Applied], Deferred[None]]] = []

    def submit(self, happening: Happening, origin: Origin,
               received: datetime | None = None) -> Deferred[None]:
        return self._commit([happening])

    def submit_zadarma(self, event: ZadarmaEvent, form: Any, context: Any,
                       received: datetime | None = None) -> Deferred[None]:
        return self._commit([event])

    def apply_together(self, submissions: Sequence[Submission | ZadarmaSubmission],
                       then: Any = None) -> Deferred[None]:
        return self._commit([item.event if isinstance(item, ZadarmaSubmission)
                             else item.happening for item in submissions])

    def _commit(self, happenings: list[Applied]) -> Deferred[None]:
        if self.down:
            from txpostgres.reconnection import ConnectionDead
            return defer.fail(ConnectionDead())
        if self.hold:
            held: Deferred[None] = Deferred()
            self.held.append((happenings, held))
            held.addCallback(lambda _: self.applied.extend(happenings))
            return held
        self.applied.extend(happenings)
        return defer.succeed(None)

    def in_flight(self) -> list[Applied]:
        return [h for group, _ in self.held for h in group]

    def release(self, count: int | None = None) -> None:
        """Let the first ``count`` transactions held (all: None) commit."""
        batch, self.held = self.held[:count], self.held[count:] if count else []
        for _, held in batch:
            held.callback(None)


def answered(n: int, call: int | None = None) -> Answered:
    return Answered(f"call-{n if call is None else call}", 11,
                    datetime(2026, 1, 5, 10, 0, n % 60, tzinfo=UTC))


def make(clock: Clock, spool: Any, ingest: Ingest, lanes: int = 3, group: int = 8,
         chunk: int = 64) -> DurableIngest:
    schema: OneShotObserver[SchemaReport] = OneShotObserver()
    schema.fire(SchemaReport("attached", 9, (), (), False))
    return DurableIngest(cast(Any, ingest), spool, cast(Any, None), schema, clock,
                         {"office": ORIGIN}, lambda _provider: cast(Any, None), "GR", deadline=2.0,
                         lanes=lanes, group=group, chunk=chunk)


class FullDiskDurableTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.disk = FullDisk()
        self.spool = Spool(scratch(self) / "spool", files=self.disk)
        self.spool.open()
        self.addCleanup(self.spool.close)
        self.ingest = Ingest()
        self.durable = make(self.clock, DiskSpool(self.spool), self.ingest)
        self.logged: list[dict[str, Any]] = []
        observer = cast(ILogObserver, self.logged.append)
        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)

    def test_refused_not_raised_and_over_once_there_is_room(self) -> None:
        """Sent 1,000 while the database is down and the disk full: each refused with
        NotRecorded (the webhook's 503), a few critical lines, no traceback; then room:
        the next ones are spooled, and replayed once the database is back."""
        self.ingest.down, self.disk.full = True, True
        sent = acknowledged = refused = 0
        for n in range(1000):
            sent += 1
            failure = self.failureResultOf(self.durable.submit(answered(n), ORIGIN))
            self.assertTrue(failure.check(NotRecorded))
            refused += 1
        self.assertEqual(self.durable.counters.disk_refused, 1000)
        critical = [e for e in self.logged if e["log_level"] >= LogLevel.critical]
        self.assertLessEqual(len(critical), 10)
        self.assertFalse(any("log_failure" in e for e in self.logged), "no traceback")
        self.assertEqual(segment_files(self.spool.folder), [])
        self.disk.full = False
        for n in range(1000, 1010):
            sent += 1
            self.successResultOf(self.durable.submit(answered(n), ORIGIN))
            acknowledged += 1
        self.ingest.down = False
        self.assertTrue(self.successResultOf(self.durable.replay()))
        stored = len({h.call_id for h in self.ingest.applied if isinstance(h, Answered)})
        duplicated = len(self.ingest.applied) - stored
        lost = acknowledged - stored
        print(f"\nfull disk: sent {sent}, acknowledged {acknowledged}, refused {refused}, "
              f"stored {stored}, lost {lost}, duplicated {duplicated}")
        self.assertEqual((stored, lost, duplicated), (10, 0, 0))

    def test_the_replay_goes_on_when_the_disk_refuses_its_mark(self) -> None:
        self.ingest.down = True
        for n in range(200):
            self.successResultOf(self.durable.submit(answered(n), ORIGIN))
        self.ingest.down, self.disk.full = False, True
        self.assertTrue(self.successResultOf(self.durable.replay()))
        self.assertEqual(len(self.ingest.applied), 200, "each record once, no loop")
        self.assertEqual(self.durable.counters.replayed, 200)
        self.assertGreater(self.durable.counters.mark_failures, 0)
        for _ in range(5):  # later replays apply nothing again
            self.assertTrue(self.successResultOf(self.durable.replay()))
        self.assertEqual(len(self.ingest.applied), 200)
        self.assertFalse(self.durable.spooling)


class ReplayTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.spool = Spool(scratch(self) / "spool")
        self.spool.open()
        self.addCleanup(self.spool.close)
        self.disk = DiskSpool(self.spool)
        self.ingest = Ingest()

    def spool_records(self, happenings: Sequence[Happening]) -> None:
        self.spool.append_many([fritz_record(h, "office") for h in happenings])

    def test_groups_of_records_commit_on_several_lanes_at_once(self) -> None:
        """Not one record per transaction: groups of ``group`` records, one transaction
        each, ``lanes`` of them in flight at once."""
        self.spool_records([answered(n) for n in range(100)])
        durable = make(self.clock, self.disk, self.ingest, lanes=3, group=8, chunk=64)
        self.ingest.hold = True
        replay = durable.replay()
        self.assertEqual(len(self.ingest.held), 3, "three transactions at once, not one")
        self.assertEqual([len(group) for group, _ in self.ingest.held], [8, 8, 8])
        most = 3
        while self.ingest.held:
            self.ingest.release(1)
            most = max(most, len(self.ingest.held))
        self.assertEqual(most, 3)
        self.assertTrue(self.successResultOf(replay))
        self.assertCountEqual(self.ingest.applied, [answered(n) for n in range(100)])
        self.assertLessEqual(durable.counters.replay_transactions, 100 // 8 + 2 * 3)
        self.assertEqual(durable.counters.replayed, 100)
        self.assertEqual(self.spool.pending(), [])

    def test_one_calls_events_commit_in_order_whatever_the_lanes_do(self) -> None:
        """150 events of 30 calls; the transactions held are let through in a random order:
        every call's events still reach the database in the order they happened."""
        events = [answered(n, call=n % 30) for n in range(150)]
        self.spool_records(events)
        durable = make(self.clock, self.disk, self.ingest, lanes=3, group=4, chunk=64)
        self.ingest.hold = True
        replay = durable.replay()
        chance = random.Random(14)
        while self.ingest.held:
            _, held = self.ingest.held.pop(chance.randrange(len(self.ingest.held)))
            held.callback(None)
        self.assertTrue(self.successResultOf(replay))
        for call in range(30):
            mine = [e for e in self.ingest.applied
                    if isinstance(e, Answered) and e.call_id == f"call-{call}"]
            self.assertEqual(mine, [e for e in events if e.call_id == f"call-{call}"])

    def test_a_record_that_looks_for_its_call_waits_for_those_before_it(self) -> None:
        orphan = Unmatched("office", 3, datetime(2026, 1, 5, 10, 5, tzinfo=UTC),
                           datetime(2026, 1, 5, 12, 5), "DISCONNECT", duration=0)
        self.spool_records([answered(1), answered(2), orphan, answered(4)])
        durable = make(self.clock, self.disk, self.ingest)
        self.ingest.hold = True
        replay = durable.replay()
        self.assertCountEqual(self.ingest.in_flight(), [answered(1), answered(2)])
        self.ingest.release(1)
        self.assertNotIn(orphan, self.ingest.in_flight(), "the orphan waits for both")
        self.ingest.release()
        self.assertEqual(self.ingest.in_flight(), [orphan], "then goes alone")
        self.ingest.release()
        self.assertEqual(self.ingest.in_flight(), [answered(4)])
        self.ingest.release()
        self.assertTrue(self.successResultOf(replay))
        self.assertEqual(self.ingest.applied[2:], [orphan, answered(4)])

    def test_a_group_with_a_bad_record_is_applied_again_one_by_one(self) -> None:
        """A record this version cannot apply fails its whole group's transaction: the
        group is applied again a record at a time, and only that record is skipped."""
        self.spool_records([answered(n) for n in range(10)])
        durable = make(self.clock, self.disk, self.ingest, lanes=1, group=10)
        ingest = self.ingest

        def apply_together(submissions: Sequence[Submission], then: Any = None
                           ) -> Deferred[None]:
            if any(item.happening == answered(4) for item in submissions):
                return defer.fail(ValueError("this record, every time"))
            return ingest._commit([item.happening for item in submissions])

        self.patch(ingest, "apply_together", apply_together)
        self.assertTrue(self.successResultOf(durable.replay()))
        self.assertEqual(ingest.applied, [answered(n) for n in range(10) if n != 4])
        self.assertEqual((durable.counters.replayed, durable.counters.unreplayable), (9, 1))
        self.assertEqual(self.spool.pending(), [])

    def test_a_deadlock_between_groups_is_not_an_outage(self) -> None:
        """PostgreSQL undoing one of two crossing transactions (psycopg2 calls it an
        OperationalError, as it calls a lost server) does not pause the replay: the
        group's records are applied again one by one at once."""
        from psycopg2.extensions import TransactionRollbackError

        self.spool_records([answered(n) for n in range(6)])
        durable = make(self.clock, self.disk, self.ingest, lanes=1, group=6)
        ingest = self.ingest

        def apply_together(submissions: Sequence[Submission], then: Any = None
                           ) -> Deferred[None]:
            if len(submissions) > 1:
                return defer.fail(TransactionRollbackError("deadlock detected"))
            return ingest._commit([item.happening for item in submissions])

        self.patch(ingest, "apply_together", apply_together)
        self.assertTrue(self.successResultOf(durable.replay()))
        self.assertEqual(ingest.applied, [answered(n) for n in range(6)])
        self.assertEqual(durable.counters.unreplayable, 0)

    def test_stopping_during_a_replay_marks_what_was_applied_and_no_more(self) -> None:
        """SIGTERM: the service's stop lets the lanes finish up to the last record any of
        them began (every record before it through), marks that, and leaves the rest for
        the next start, which applies nothing a second time."""
        events = [answered(n) for n in range(500)]
        self.spool_records(events)
        durable = make(self.clock, self.disk, self.ingest, lanes=3, group=8, chunk=64)
        prepared: Deferred[None] = Deferred()
        service = DurableService(durable, cast(Any, self.disk), self.clock,
                                 lambda: prepared)
        service.startService()
        self.ingest.hold = True
        prepared.callback(None)
        for _ in range(10):
            self.ingest.release(2)
        self.assertEqual(len(self.ingest.held), 3)
        stopped = service.stopService()
        self.assertNoResult(stopped)
        while self.ingest.held:  # the lanes finish up to the line; nothing beyond it
            self.ingest.release()
        self.successResultOf(stopped)
        applied = len(self.ingest.applied)
        self.assertGreater(applied, 0)
        self.assertLess(applied, 500)
        self.assertCountEqual(self.ingest.applied, events[:applied],
                              "exactly the first records, no gap, none beyond")
        again = Spool(self.spool.folder)
        again.open()
        self.addCleanup(again.close)
        rest = again.pending()
        self.assertEqual(len(rest), 500 - applied, "the next start replays only the rest")
        self.assertEqual(rest[0][0], applied + 1)

    def test_groups_committed_beside_a_failed_one_are_not_applied_again(self) -> None:
        """The database comes back while the pool is still reconnecting: two lanes' groups
        commit, the first lane's fails (ConnectionDead) and the replay pauses. The mark
        keeps the two committed groups though they lie beyond the failed one: neither the
        next replay nor the next start applies them again."""
        from txpostgres.reconnection import ConnectionDead

        events: list[Happening] = [answered(n) for n in range(48)]
        self.spool_records(events)
        durable = make(self.clock, self.disk, self.ingest, lanes=3, group=8, chunk=64)
        self.ingest.hold = True
        replay = durable.replay()
        self.assertEqual(len(self.ingest.held), 3)
        (failed, lost), *committing = self.ingest.held
        self.ingest.held = committing
        lost.errback(ConnectionDead())
        self.ingest.release()  # their commits were already under way
        self.assertFalse(self.successResultOf(replay), "paused")
        committed = [e for e in self.ingest.applied if not isinstance(e, ZadarmaEvent)]
        self.assertEqual(len(committed), 16)
        first_failed = events.index(cast(Happening, failed[0]))
        self.assertTrue(any(events.index(event) > first_failed for event in committed),
                        "committed records lie beyond the failed one")
        again = Spool(self.spool.folder)  # what the next start would read
        self.spool.close()
        again.open()
        rest = [seq for seq, _ in again.pending()]
        again.close()
        self.assertEqual(len(rest), 48 - 16, "the next start replays only the rest")
        self.spool.open()
        self.ingest.hold = False
        self.assertTrue(self.successResultOf(durable.replay()))
        self.assertCountEqual(self.ingest.applied, events, "each record once")
        self.assertEqual(self.spool.pending(), [])


class ReplayTailTests(SynchronousTestCase):
    """Under steady load a replay must not chase its own tail: on its last records, new
    events wait for it (a transaction or two) and then go straight to the database."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.spool = Spool(scratch(self) / "spool")
        self.spool.open()
        self.addCleanup(self.spool.close)
        self.ingest = Ingest()
        self.durable = make(self.clock, DiskSpool(self.spool), self.ingest, lanes=3, group=8)
        self.ingest.down = True
        for n in range(10):  # spooled while the database was away
            self.successResultOf(self.durable.submit(answered(n), ORIGIN))
        self.ingest.down, self.ingest.hold = False, True

    def test_a_new_event_waits_for_the_last_records_then_goes_direct(self) -> None:
        replay = self.durable.replay()
        self.assertTrue(self.ingest.held, "the last records are being applied")
        arriving = self.durable.submit(answered(100), ORIGIN)
        self.assertNoResult(arriving)
        self.assertEqual(len(self.spool.pending()), 10, "not behind them in the spool")
        self.ingest.hold = False
        self.ingest.release()
        self.assertTrue(self.successResultOf(replay))
        self.successResultOf(arriving)
        self.assertEqual(self.ingest.applied[-1], answered(100), "after the spooled ones")
        self.assertEqual((self.durable.counters.spooled, self.durable.counters.direct),
                         (10, 1))
        self.assertFalse(self.durable.spooling)

    def test_it_waits_no_longer_than_the_deadline_then_is_spooled(self) -> None:
        replay = self.durable.replay()
        arriving = self.durable.submit(answered(100), ORIGIN)
        self.clock.advance(2.0)  # the spool deadline: the replay is slow today
        self.successResultOf(arriving)
        self.assertEqual(len(self.spool.pending()), 11, "spooled, behind the others")
        self.ingest.hold = False
        self.ingest.release()
        self.assertTrue(self.successResultOf(replay))
        self.assertEqual(self.ingest.applied[-1], answered(100))
        self.assertEqual(self.durable.counters.spooled, 11)

    def test_a_replay_paused_by_an_outage_spools_the_waiting_event(self) -> None:
        from txpostgres.reconnection import ConnectionDead

        replay = self.durable.replay()
        arriving = self.durable.submit(answered(100), ORIGIN)
        for _, held in self.ingest.held:
            held.errback(ConnectionDead())
        self.ingest.held = []
        self.assertFalse(self.successResultOf(replay))
        self.successResultOf(arriving)
        self.assertEqual(len(self.spool.pending()), 11)
        self.assertTrue(self.durable.spooling)


def started(call: str, number: str, second: int = 0) -> Started:
    return Started(call, "office", 1, "incoming", number, "2107654321", "SIP0", None,
                   datetime(2026, 1, 5, 10, 0, second, tzinfo=UTC))


def missed(call: str, second: int = 20) -> Ended:
    return Ended(call, Outcome.MISSED, 0, datetime(2026, 1, 5, 10, 0, second, tzinfo=UTC),
                 None)


class PassingTheSpoolTests(SynchronousTestCase):
    """Once the replay commits again, only what depends on a record still in the spool
    waits behind it (its call; a missed call of the same number); every other event goes
    straight to the database, so the replay drains while new calls keep arriving."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.spool = Spool(scratch(self) / "spool")
        self.spool.open()
        self.addCleanup(self.spool.close)
        self.ingest = Ingest()
        self.durable = make(self.clock, DiskSpool(self.spool), self.ingest, lanes=1,
                            group=4)
        self.assertTrue(self.successResultOf(self.durable.replay()), "started empty")

    def outage(self, happenings: Sequence[Happening]) -> None:
        """``happenings`` arrive while the database is away: spooled."""
        self.ingest.down = True
        for happening in happenings:
            self.successResultOf(self.durable.submit(happening, ORIGIN))
        self.ingest.down = False

    def flowing_replay(self) -> Deferred[bool]:
        """A replay whose first group has committed and whose next is in flight."""
        self.ingest.hold = True
        replay = self.durable.replay()
        self.ingest.release(1)
        self.assertTrue(self.ingest.held, "the replay has more in flight")
        return replay

    def finish(self, replay: Deferred[bool]) -> None:
        self.ingest.hold = False
        self.ingest.release()
        self.assertTrue(self.successResultOf(replay))

    def test_a_new_call_goes_past_a_replay_that_commits(self) -> None:
        self.outage([answered(n) for n in range(12)])
        replay = self.flowing_replay()
        arriving = self.durable.submit(started("new", "2109999999"), ORIGIN)
        self.assertIn([started("new", "2109999999")], [g for g, _ in self.ingest.held],
                      "straight to the database, beside the replay")
        self.assertEqual(self.spool.state().appended_total, 12, "nothing added to the spool")
        self.finish(replay)
        self.successResultOf(arriving)
        self.assertEqual((self.durable.counters.ahead, self.durable.counters.spooled), (1, 12))
        self.assertCountEqual(self.ingest.applied,
                              [answered(n) for n in range(12)] + [started("new", "2109999999")])

    def test_an_event_of_a_call_in_the_spool_waits_behind_it(self) -> None:
        self.outage([answered(n) for n in range(12)])
        replay = self.flowing_replay()
        late = answered(59, call=10)  # call-10 still has a record in the spool
        self.successResultOf(self.durable.submit(late, ORIGIN))
        self.assertEqual(self.spool.state().appended_total, 12 + 1, "spooled behind its call")
        self.finish(replay)
        self.assertLess(self.ingest.applied.index(answered(10)),
                        self.ingest.applied.index(late), "in the call's order")
        self.assertEqual(self.durable.counters.spooled_behind, 1)

    def test_a_missed_call_of_a_number_in_the_spool_waits_behind_it(self) -> None:
        """Tickets group one number's missed calls in order: a new call of a number
        still in the spool (however written) waits, and so does its end; a call of
        another number does not."""
        self.outage([answered(n) for n in range(8)]
                    + [started("old", "2101234567"), missed("old")])
        replay = self.flowing_replay()
        for happening in (started("same", "+30 210 123 4567", 30), missed("same", 40)):
            self.successResultOf(self.durable.submit(happening, ORIGIN))
        other = self.durable.submit(started("other", "2107777777"), ORIGIN)
        self.assertEqual(self.spool.state().appended_total, 10 + 2)
        self.finish(replay)
        self.successResultOf(other)
        applied = self.ingest.applied
        self.assertLess(applied.index(missed("old")), applied.index(started("same",
                        "+30 210 123 4567", 30)))
        self.assertLess(applied.index(started("same", "+30 210 123 4567", 30)),
                        applied.index(missed("same", 40)))
        self.assertEqual(self.durable.counters.ahead, 1)

    def zadarma(self, form: dict[str, str]) -> Deferred[Any]:
        event = parse_event(form)
        assert isinstance(event, ZadarmaEvent)
        return self.durable.submit_zadarma(event, form, ZadarmaContext(ORIGIN.where, UTC))

    def test_an_answer_by_the_extension_of_a_spooled_answer_goes_past_the_replay(
            self) -> None:
        """Every incoming call's NOTIFY_ANSWER names the extension that answered; a new
        call answered by the extension that answered a call still in the spool is
        independent of it and goes straight to the database, as its start did. A new
        event of the spooled call still waits behind it."""
        self.outage([answered(n) for n in range(12)])
        spooled = answer_forms("in_spooled", "+302101111111", "100")
        for form in spooled:
            self.successResultOf(self.zadarma(form))
        replay = self.flowing_replay()
        arriving = [self.zadarma(form)
                    for form in answer_forms("in_new", "+302102222222", "100")]
        late = self.zadarma({**spooled[1], "event": "NOTIFY_END", "duration": "30",
                             "disposition": "answered", "status_code": "16",
                             "is_recorded": "0", "called_did": "302107654321"})
        self.assertEqual(self.spool.state().appended_total, 12 + 2 + 1,
                         "only the spooled call's own end was spooled behind it")
        self.assertEqual([event.pbx_call_id for event in self.ingest.in_flight()
                          if isinstance(event, ZadarmaEvent)], ["in_new", "in_new"],
                         "the new call's start and answer went straight to the database")
        self.finish(replay)
        for landed in [*arriving, late]:
            self.successResultOf(landed)
        applied = [event.kind for event in self.ingest.applied
                   if isinstance(event, ZadarmaEvent) and event.pbx_call_id == "in_spooled"]
        self.assertEqual(applied, ["NOTIFY_START", "NOTIFY_ANSWER", "NOTIFY_END"])
        self.assertEqual(self.durable.counters.ahead, 2)

    def test_before_the_replay_commits_everything_is_spooled_at_once(self) -> None:
        """The database may still be away: a new call does not wait the deadline on it,
        it is spooled at once, as during the outage."""
        self.outage([answered(n) for n in range(12)])
        self.ingest.hold = True
        replay = self.durable.replay()  # its first groups not committed yet
        self.successResultOf(self.durable.submit(started("new", "2109999999"), ORIGIN))
        self.assertEqual(self.spool.state().appended_total, 13)
        self.finish(replay)
        self.assertEqual(self.durable.counters.ahead, 0)

    def test_after_a_paused_replay_new_calls_are_spooled_again(self) -> None:
        from txpostgres.reconnection import ConnectionDead

        self.outage([answered(n) for n in range(12)])
        replay = self.flowing_replay()
        for _, held in self.ingest.held:
            held.errback(ConnectionDead())
        self.ingest.held = []
        self.assertFalse(self.successResultOf(replay))
        self.ingest.hold = False
        self.successResultOf(self.durable.submit(started("new", "2109999999"), ORIGIN))
        self.assertEqual(self.spool.state().appended_total, 12 + 1)

    def test_records_of_the_last_run_hold_everything_back(self) -> None:
        """What another run spooled is not counted: until the spool was empty once, every
        new event waits behind it, as it always did."""
        durable = make(self.clock, DiskSpool(self.spool), self.ingest, lanes=1, group=4)
        self.spool.append_many([fritz_record(answered(n), "office") for n in range(12)])
        self.ingest.hold = True
        replay = durable.replay()
        self.ingest.release(1)
        self.successResultOf(durable.submit(started("new", "2109999999"), ORIGIN))
        self.assertEqual(self.spool.state().appended_total, 12 + 1)
        self.ingest.hold = False
        self.ingest.release()
        self.assertTrue(self.successResultOf(replay))
        self.assertEqual(self.ingest.applied[-1], started("new", "2109999999"))

    def test_an_end_whose_start_was_never_seen_holds_everything_back(self) -> None:
        """Its number (the ticket's) is unknown: it and everything after it wait."""
        self.outage([answered(n) for n in range(8)] + [missed("from-before")])
        replay = self.flowing_replay()
        self.successResultOf(self.durable.submit(started("new", "2109999999"), ORIGIN))
        self.assertEqual(self.spool.state().appended_total, 9 + 1)
        self.finish(replay)
        self.assertEqual(self.ingest.applied[-1], started("new", "2109999999"))

    def test_beyond_the_counted_records_everything_waits(self) -> None:
        from dpvoip.spool import durable as module

        self.patch(module, "MAX_HELD_RECORDS", 10)
        self.outage([answered(n) for n in range(12)])
        replay = self.flowing_replay()
        self.successResultOf(self.durable.submit(started("new", "2109999999"), ORIGIN))
        self.assertEqual(self.spool.state().appended_total, 12 + 1)
        self.finish(replay)
        self.assertEqual(self.durable.counters.ahead, 0)

    def test_the_replay_waits_while_the_live_calls_are_backed_up(self) -> None:
        """The live calls first: while more than ``LIVE_FIRST_ABOVE`` of them are on their
        way to the database, the replay begins no new transaction; it goes on once they
        land (or at stop)."""
        from dpvoip.spool import durable as module

        self.patch(module, "LIVE_FIRST_ABOVE", 1)
        self.outage([answered(n) for n in range(12)])
        replay = self.flowing_replay()  # its second group in flight
        live = [self.durable.submit(started(f"new{n}", f"21099999{n:02d}"), ORIGIN)
                for n in range(2)]
        self.ingest.release(1)  # the replay's group commits ...
        self.assertEqual([len(g) for g, _ in self.ingest.held], [1, 1],
                         "... and its next waits behind the two live calls")
        self.ingest.release()  # they land: the replay goes on
        self.assertEqual([len(g) for g, _ in self.ingest.held], [4])
        self.finish(replay)
        for landed in live:
            self.successResultOf(landed)
        self.assertEqual(self.durable.counters.ahead, 2)


def answer_forms(pbx_call_id: str, caller: str, extension: str) -> list[dict[str, str]]:
    """An incoming Zadarma call's NOTIFY_START and its NOTIFY_ANSWER by ``extension``."""
    common = {"pbx_call_id": pbx_call_id, "call_start": "2026-01-05 12:00:00",
              "caller_id": caller}
    return [{"event": "NOTIFY_START", **common, "called_did": "302107654321"},
            {"event": "NOTIFY_ANSWER", **common, "destination": extension}]
