"""The durable entry point and its replay loop, on a Clock with an in-memory spool and a
fake ingest: what is committed, what is spooled (and why), what a replay does, and when
the loop runs and stops."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any, cast

import psycopg2
from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from txpostgres.reconnection import ConnectionDead

from dpvoip.calls.ingest import Origin, Submission
from dpvoip.core.happenings import Answered, Happening
from dpvoip.core.numbers import Dialling
from dpvoip.deferreds import OneShotObserver
from dpvoip.spool.durable import DurableIngest, DurableService, NotRecorded, unavailable
from dpvoip.spool.journal import SpoolFull, SpoolState
from dpvoip.store.database import is_database_error, is_unavailable
from dpvoip.store.migrations import SchemaReport

ORIGIN = Origin("office", Dialling("GR"))


def answered(n: int) -> Answered:
    return Answered(f"call-{n}", 11, datetime(2026, 1, 5, 10, n, tzinfo=UTC))


class MemorySpool:
    """The AsyncSpool's face, in memory and synchronous; ``room`` records at most."""

    def __init__(self, room: int = 100) -> None:
        self.records: list[tuple[int, bytes]] = []
        self.next_seq = 1
        self.room = room
        self.started = self.stopped = self.owned = False

    def start(self) -> Deferred[None]:
        self.started = True
        return defer.succeed(None)

    def append(self, payload: bytes) -> Deferred[int]:
        if len(self.records) >= self.room:
            return defer.fail(SpoolFull("full"))
        seq, self.next_seq = self.next_seq, self.next_seq + 1
        self.records.append((seq, payload))
        return defer.succeed(seq)

    def pending(self, limit: int | None = None) -> Deferred[list[tuple[int, bytes]]]:
        return defer.succeed(list(self.records)[:limit])

    def sync_mark(self) -> Deferred[None]:
        return defer.succeed(None)

    def replayed(self, up_to: int, ahead: Sequence[int] = ()) -> Deferred[None]:
        self.records = [(s, p) for s, p in self.records if s > up_to and s not in ahead]
        return defer.succeed(None)

    def state(self) -> SpoolState:
        return SpoolState(len(self.records), 0, 1000, False, 0, 0, 0)

    def stop(self) -> Deferred[None]:
        self.stopped = True
        return defer.succeed(None)

    def stopped_by_owner(self) -> None:
        self.owned = True


class FakeIngest:
    """Records what reaches the database; ``answer`` decides each submission's fate:
    None commits, an exception fails, ``HOLD`` never answers."""

    HOLD = object()

    def __init__(self) -> None:
        self.committed: list[Happening] = []
        self.received: list[datetime | None] = []  # when each committed event arrived
        self.answer: Any = None
        self.held: list[Deferred[None]] = []

    def submit(self, happening: Happening, origin: Origin,
               received: datetime | None = None) -> Deferred[None]:
        if self.answer is self.HOLD:
            held: Deferred[None] = Deferred()
            self.held.append(held)
            return held
        if isinstance(self.answer, BaseException):
            return defer.fail(self.answer)
        self.committed.append(happening)
        self.received.append(received)
        return defer.succeed(None)

    def apply_together(self, submissions: Sequence[Submission],
                       then: Any = None) -> Deferred[None]:
        """A group of the replay: all committed, or none."""
        if self.answer is self.HOLD:
            held: Deferred[None] = Deferred()
            self.held.append(held)
            return held
        if isinstance(self.answer, BaseException):
            return defer.fail(self.answer)
        for item in submissions:
            self.committed.append(item.happening)
            self.received.append(item.received)
        return defer.succeed(None)


def make_durable(clock: Clock, spool: MemorySpool, ingest: FakeIngest,
                 prepared: bool = True) -> DurableIngest:
    schema: OneShotObserver[SchemaReport] = OneShotObserver()
    if prepared:
        schema.fire(SchemaReport("attached", 9, (), (), False))
    return DurableIngest(cast(Any, ingest), cast(Any, spool), cast(Any, None), schema, clock,
                         {"office": ORIGIN}, no_zadarma, "GR", deadline=2.0)


def no_zadarma(_provider: str | None) -> Any:
    """The Zadarma context: no Zadarma event is replayed here."""
    return None


def test_unavailable_is_a_dead_or_absent_database_or_a_missed_deadline() -> None:
    from twisted.internet.error import ConnectionDone, ConnectionLost

    for error in (ConnectionDead(), psycopg2.OperationalError("server closed"),
                  psycopg2.InterfaceError("connection already closed"),
                  ConnectionDone(), ConnectionLost()):  # a socket closed under a query
        assert is_unavailable(error) and unavailable(error) and is_database_error(error)
    assert unavailable(defer.TimeoutError()) and not is_unavailable(defer.TimeoutError())
    refused = psycopg2.IntegrityError("duplicate key")
    assert is_database_error(refused) and not is_unavailable(refused)
    assert not unavailable(refused)
    for other in (ValueError("bad"), RuntimeError()):
        assert not unavailable(other) and not is_database_error(other)


class DurableIngestTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.spool = MemorySpool()
        self.ingest = FakeIngest()
        self.durable = make_durable(self.clock, self.spool, self.ingest)

    def test_committed_when_the_database_answers(self) -> None:
        self.successResultOf(self.durable.submit(answered(1), ORIGIN))
        self.assertEqual(self.ingest.committed, [answered(1)])
        self.assertEqual((self.durable.counters.direct, self.spool.records), (1, []))
        self.assertFalse(self.durable.spooling)

    def test_spooled_when_the_database_is_gone_then_everything_newer_too(self) -> None:
        self.ingest.answer = ConnectionDead()
        self.successResultOf(self.durable.submit(answered(1), ORIGIN))
        self.ingest.answer = None
        self.successResultOf(self.durable.submit(answered(2), ORIGIN))
        self.assertEqual(self.ingest.committed, [], "in order: behind the spooled one")
        self.assertEqual(len(self.spool.records), 2)
        self.assertTrue(self.durable.spooling)
        self.assertTrue(self.successResultOf(self.durable.replay()))
        # Two calls: each call's events in order (different calls may commit side by side).
        self.assertCountEqual(self.ingest.committed, [answered(1), answered(2)])
        self.assertEqual((self.spool.records, self.durable.spooling), ([], False))
        self.assertEqual(self.durable.counters.replayed, 2)

    def test_spooled_when_the_commit_misses_the_deadline(self) -> None:
        self.ingest.answer = FakeIngest.HOLD
        done = self.durable.submit(answered(1), ORIGIN)
        self.assertNoResult(done)
        self.clock.advance(2.0)
        self.successResultOf(done)
        self.assertEqual(len(self.spool.records), 1)
        self.assertEqual(self.durable.counters.spooled, 1)

    def test_a_wrong_event_fails_and_is_not_spooled(self) -> None:
        self.ingest.answer = psycopg2.IntegrityError("violates a constraint")
        self.failureResultOf(self.durable.submit(answered(1), ORIGIN), psycopg2.IntegrityError)
        self.assertEqual((self.spool.records, self.durable.spooling), ([], False))

    def test_a_full_spool_refuses(self) -> None:
        self.spool.room = 0
        self.ingest.answer = ConnectionDead()
        self.failureResultOf(self.durable.submit(answered(1), ORIGIN), NotRecorded)
        self.assertEqual(self.durable.counters.refused, 1)

    def test_before_the_schema_is_prepared_events_are_spooled(self) -> None:
        durable = make_durable(self.clock, self.spool, self.ingest, prepared=False)
        self.successResultOf(durable.submit(answered(1), ORIGIN))
        self.assertEqual((self.ingest.committed, len(self.spool.records)), ([], 1))
        self.assertFalse(self.successResultOf(durable.replay()), "nothing to replay into")

    def test_a_replay_pauses_when_the_database_goes_and_skips_a_wrong_record(self) -> None:
        self.ingest.answer = ConnectionDead()
        for n in (1, 2):
            self.durable.submit(answered(n), ORIGIN)
        self.assertFalse(self.successResultOf(self.durable.replay()))
        self.assertEqual(len(self.spool.records), 2, "kept for the next replay")
        self.ingest.answer = ValueError("this record, every time")
        self.assertTrue(self.successResultOf(self.durable.replay()))
        self.assertEqual(self.durable.counters.unreplayable, 2)
        self.assertEqual(self.spool.records, [])

    def test_a_replayed_event_is_written_as_at_its_arrival_not_at_its_replay(self) -> None:
        self.clock.advance(1_800_000_000)
        self.successResultOf(self.durable.submit(answered(1), ORIGIN))
        self.ingest.answer = ConnectionDead()
        self.clock.advance(10)
        self.successResultOf(self.durable.submit(answered(2), ORIGIN))  # spooled
        self.clock.advance(3600)  # an hour's outage
        self.ingest.answer = None
        self.assertTrue(self.successResultOf(self.durable.replay()))
        self.assertEqual(self.ingest.received, [
            datetime.fromtimestamp(1_800_000_000, UTC),
            datetime.fromtimestamp(1_800_000_010, UTC),
        ])

    def test_one_replay_at_a_time_and_idle_waits_for_it(self) -> None:
        self.ingest.answer = ConnectionDead()
        self.durable.submit(answered(1), ORIGIN)
        self.ingest.answer = FakeIngest.HOLD
        first, second = self.durable.replay(), self.durable.replay()
        idle = self.durable.idle()
        self.assertEqual(len(self.ingest.held), 1, "the second caller joined the first")
        self.assertNoResult(idle)
        self.ingest.answer = None
        self.ingest.held[0].callback(None)
        self.assertEqual((self.successResultOf(first), self.successResultOf(second)),
                         (True, True))
        self.assertIsNone(self.successResultOf(idle))
        self.assertIsNone(self.successResultOf(self.durable.idle()))


class DurableServiceTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.spool = MemorySpool()
        self.ingest = FakeIngest()
        self.durable = make_durable(self.clock, self.spool, self.ingest)
        self.prepared: Deferred[None] = Deferred()
        self.service = DurableService(self.durable, cast(Any, self.spool), self.clock,
                                      lambda: self.prepared, interval=1.0)

    def test_the_service_owns_its_spool_and_stops_it_after_the_replay(self) -> None:
        """Not the spool's own shutdown trigger, which would close it alongside the
        services' stop, before the replay's last mark (a real-process SIGTERM test:
        test_fault_sigterm_replay)."""
        self.service.startService()
        self.assertTrue(self.spool.owned)
        self.successResultOf(self.service.stopService())
        self.assertTrue(self.spool.stopped)

    def spool_one(self, n: int) -> None:
        answer, self.ingest.answer = self.ingest.answer, ConnectionDead()
        self.durable.submit(answered(n), ORIGIN)
        self.ingest.answer = answer

    def test_the_last_runs_events_are_replayed_at_once_when_the_schema_is_prepared(
            self) -> None:
        self.spool_one(1)
        replayed = self.service.when_replayed()
        self.service.startService()
        self.assertTrue(self.spool.started)
        self.assertNoResult(replayed)
        self.clock.advance(10)
        self.assertNoResult(replayed)  # nothing before the schema is prepared
        self.prepared.callback(None)
        self.successResultOf(replayed)
        self.assertEqual(self.ingest.committed, [answered(1)])
        self.successResultOf(self.service.when_replayed())  # asked after: at once
        self.successResultOf(self.service.stopService())

    def test_while_events_are_spooled_the_loop_replays_every_interval(self) -> None:
        self.service.startService()
        self.prepared.callback(None)
        self.ingest.answer = ConnectionDead()
        self.spool_one(1)
        self.clock.advance(1.0)
        self.assertEqual(len(self.spool.records), 1, "the database is still away")
        self.ingest.answer = None
        self.clock.advance(0.5)
        self.assertEqual(self.ingest.committed, [])
        self.clock.advance(0.5)
        self.assertEqual(self.ingest.committed, [answered(1)])
        self.assertFalse(self.durable.spooling)
        self.successResultOf(self.service.stopService())

    def test_a_failed_replay_is_tried_again_at_the_next_tick(self) -> None:
        self.spool_one(1)
        self.spool.pending = lambda limit=None: defer.fail(  # type: ignore[method-assign]
            OSError("disk"))
        self.service.startService()
        self.prepared.callback(None)
        replayed = self.service.when_replayed()
        self.assertNoResult(replayed)
        del self.spool.pending
        self.clock.advance(1.0)
        self.successResultOf(replayed)
        self.successResultOf(self.service.stopService())

    def test_stopping_ends_the_loop_waits_for_the_replay_under_way_then_closes_the_spool(
            self) -> None:
        self.spool_one(1)
        self.ingest.answer = FakeIngest.HOLD
        self.service.startService()
        self.prepared.callback(None)
        stopped = self.service.stopService()
        self.assertNoResult(stopped)
        self.assertFalse(self.spool.stopped)
        self.ingest.held[0].callback(None)
        self.successResultOf(stopped)
        self.assertTrue(self.spool.stopped)
        self.assertEqual(self.clock.getDelayedCalls(), [], "no tick left")

    def test_stopped_before_the_schema_was_prepared_no_loop_starts(self) -> None:
        self.service.startService()
        self.successResultOf(self.service.stopService())
        self.prepared.callback(None)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertTrue(self.spool.stopped)
