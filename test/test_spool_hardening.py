"""Issue 14, the spool's side. Point 4: a full disk (ENOSPC, EDQUOT, EIO from the spool's
own file layer, ``Spool.files``: no privilege, no global patch) refuses the event with
``NotRecorded``, leaves no empty segment files, raises the alarm, lets the replay go on
without its mark and without applying a record twice, and is over once space is freed.
Point 5: the replay keeps several records in flight, waits before a record that looks
in the database for what came before it, and stops at SIGTERM with its progress marked."""

from __future__ import annotations

import errno
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.logger import ILogObserver, LogLevel, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from dpvoip.calls.ingest import Origin
from dpvoip.core.happenings import Answered, Happening, Unmatched
from dpvoip.core.numbers import Dialling
from dpvoip.deferreds import OneShotObserver
from dpvoip.spool.durable import DurableIngest, DurableService, NotRecorded
from dpvoip.spool.journal import FileOps, Spool, SpoolState
from dpvoip.spool.records import fritz_record
from dpvoip.store.migrations import SchemaReport
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

    def replayed(self, up_to: int) -> Deferred[None]:
        return self._run(lambda: self.spool.replayed(up_to))

    def sync_mark(self) -> Deferred[None]:
        return self._run(self.spool.sync_mark)

    def state(self) -> SpoolState:
        return self.spool.state()

    def start(self) -> Deferred[None]:
        return defer.succeed(None)

    def stop(self) -> Deferred[None]:
        return self._run(self.spool.close)


class Ingest:
    """Commits, fails as an absent database, or holds every submission."""

    def __init__(self) -> None:
        self.down = False
        self.hold = False
        self.applied: list[Happening] = []
        self.held: list[tuple[Happening, Deferred[None]]] = []

    def submit(self, happening: Happening, origin: Origin,
               received: datetime | None = None) -> Deferred[None]:
        if self.down:
            from txpostgres.reconnection import ConnectionDead
            return defer.fail(ConnectionDead())
        if self.hold:
            held: Deferred[None] = Deferred()
            self.held.append((happening, held))
            held.addCallback(lambda _: self.applied.append(happening))
            return held
        self.applied.append(happening)
        return defer.succeed(None)

    def release(self, count: int | None = None) -> None:
        batch, self.held = self.held[:count], self.held[count:] if count else []
        for _, held in batch:
            held.callback(None)


def answered(n: int, call: int | None = None) -> Answered:
    return Answered(f"call-{n if call is None else call}", 11,
                    datetime(2026, 1, 5, 10, 0, n % 60, tzinfo=UTC))


def make(clock: Clock, spool: Any, ingest: Ingest, window: int = 8,
         chunk: int = 64) -> DurableIngest:
    schema: OneShotObserver[SchemaReport] = OneShotObserver()
    schema.fire(SchemaReport("attached", 9, (), (), False))
    return DurableIngest(cast(Any, ingest), spool, cast(Any, None), schema, clock,
                         {"office": ORIGIN}, lambda: cast(Any, None), "GR", deadline=2.0,
                         window=window, chunk=chunk)


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

    def spool_records(self, happenings: list[Happening]) -> None:
        self.spool.append_many([fritz_record(h, "office") for h in happenings])

    def test_several_records_in_flight_within_the_window(self) -> None:
        self.spool_records([answered(n) for n in range(100)])
        durable = make(self.clock, self.disk, self.ingest, window=8, chunk=64)
        self.ingest.hold = True
        replay = durable.replay()
        self.assertEqual(len(self.ingest.held), 8, "eight at once, not one")
        most = 8
        while self.ingest.held:
            self.ingest.release(3)
            most = max(most, len(self.ingest.held))
        self.assertEqual(most, 8)
        self.assertTrue(self.successResultOf(replay))
        self.assertEqual([h for h in self.ingest.applied], [answered(n) for n in range(100)])
        self.assertEqual(self.spool.pending(), [])

    def test_a_record_that_looks_for_its_call_waits_for_those_before_it(self) -> None:
        orphan = Unmatched("office", 3, datetime(2026, 1, 5, 10, 5, tzinfo=UTC),
                           datetime(2026, 1, 5, 12, 5), "DISCONNECT", duration=0)
        self.spool_records([answered(1), answered(2), orphan, answered(4)])
        durable = make(self.clock, self.disk, self.ingest)
        self.ingest.hold = True
        replay = durable.replay()
        self.assertEqual([h for h, _ in self.ingest.held], [answered(1), answered(2)])
        self.ingest.release(1)
        self.assertEqual(len(self.ingest.held), 1, "the orphan still waits")
        self.ingest.release(1)
        self.assertEqual([h for h, _ in self.ingest.held], [orphan, answered(4)])
        self.ingest.release()
        self.assertTrue(self.successResultOf(replay))

    def test_stopping_during_a_replay_marks_what_was_applied_and_no_more(self) -> None:
        """SIGTERM: the service's stop lets the records in flight finish, marks them, and
        leaves the rest for the next start, which does not apply the first ones again."""
        self.spool_records([answered(n) for n in range(500)])
        durable = make(self.clock, self.disk, self.ingest, window=8, chunk=64)
        prepared: Deferred[None] = Deferred()
        service = DurableService(durable, cast(Any, self.disk), self.clock,
                                 lambda: prepared)
        service.startService()
        self.ingest.hold = True
        prepared.callback(None)
        for _ in range(10):
            self.ingest.release(4)
        self.assertEqual(len(self.ingest.held), 8)
        stopped = service.stopService()
        self.assertNoResult(stopped)
        self.ingest.release()  # the ones in flight finish; no new ones start
        self.successResultOf(stopped)
        self.assertEqual(self.ingest.applied, [answered(n) for n in range(48)])
        again = Spool(self.spool.folder)
        again.open()
        self.addCleanup(again.close)
        rest = again.pending()
        self.assertEqual(len(rest), 500 - 48, "the next start replays only the rest")
        self.assertEqual(rest[0][0], 49)
