"""Near saturation: an event the database could not commit within the deadline is spooled
at once (not queued to time out and be written twice), and a slow database does not stop
the other calls from passing a replay that commits.

The rule (``spool.admission``) with plain numbers; the entry point (``DurableIngest``)
with a Clock, a real spool on disk and an ingest whose commits the test releases.
"""

from __future__ import annotations

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from dpvoip.spool.admission import Admission
from dpvoip.spool.journal import Spool
from test.support.daemon import scratch
from test.test_spool_hardening import ORIGIN, DiskSpool, Ingest, answered, make, started


class AdmissionRuleTests(SynchronousTestCase):
    def test_everything_goes_straight_before_anything_landed(self) -> None:
        admission = Admission(deadline=2.0, connections=4)
        self.assertTrue(admission.admits(1000))

    def test_a_free_connection_always_admits(self) -> None:
        """So that the estimate is renewed after a slow spell (else one slow landing would
        spool everything for ever)."""
        admission = Admission(deadline=2.0, connections=4)
        admission.landed(10.0, ahead=0)  # a very slow one
        self.assertTrue(admission.admits(3))
        self.assertFalse(admission.admits(4))

    def test_the_wait_behind_the_events_in_flight_decides(self) -> None:
        admission = Admission(deadline=2.0, connections=4)
        admission.landed(0.010, ahead=0)  # 10 ms on a connection
        # 399 ahead: (400 - 4) / 4 = 99 turns of 10 ms, plus its own = 1.0 s: still in.
        self.assertAlmostEqual(admission.expected_latency(399), 1.0)
        self.assertTrue(admission.admits(399))
        self.assertFalse(admission.admits(420), "1.05 s: over half the deadline")

    def test_a_landing_that_waited_is_not_taken_for_a_slow_database(self) -> None:
        """An event that waited behind 40 others took long, but each had its turn: the
        time on a connection is the latency divided among the turns it waited."""
        admission = Admission(deadline=2.0, connections=4)
        admission.landed(0.37, ahead=40)  # (41 - 4) / 4 = 9.25 turns waited, plus its own
        self.assertAlmostEqual(admission.service_seconds, 0.036, places=3)

    def test_the_estimate_follows_the_database(self) -> None:
        admission = Admission(deadline=2.0, connections=4, weight=0.5)
        admission.landed(0.010, ahead=0)
        admission.landed(0.030, ahead=0)
        self.assertAlmostEqual(admission.service_seconds, 0.020)
        for _ in range(20):
            admission.landed(0.002, ahead=0)
        self.assertAlmostEqual(admission.service_seconds, 0.002, places=4)


class BackedUpDatabaseTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.spool = Spool(scratch(self) / "spool")
        self.spool.open()
        self.addCleanup(self.spool.close)
        self.ingest = Ingest()
        self.durable = make(self.clock, DiskSpool(self.spool), self.ingest, lanes=1, group=4)
        self.assertTrue(self.successResultOf(self.durable.replay()), "started empty")

    def test_an_event_the_database_cannot_take_in_time_is_spooled_at_once(self) -> None:
        """It is acknowledged at once from the spool, and the database never gets it
        twice (a queued attempt would be written after its timeout, and replayed too)."""
        self.ingest.hold = True
        slow = [self.durable.submit(started(f"c{n}", f"21000000{n:02d}"), ORIGIN)
                for n in range(4)]  # one per connection
        self.clock.advance(1.5)
        self.ingest.release()  # each took 1.5 s on its connection
        for landed in slow:
            self.successResultOf(landed)
        busy = [self.durable.submit(started(f"d{n}", f"21000001{n:02d}"), ORIGIN)
                for n in range(4)]  # the connections are taken again ...
        self.assertEqual(len(self.ingest.held), 4)
        late = self.durable.submit(started("late", "2100000299"), ORIGIN)
        self.successResultOf(late)  # ... so this one would wait 3 s: spooled now
        self.assertEqual(len(self.ingest.held), 4, "not sent to the database")
        self.assertEqual(self.spool.state().appended_total, 1)
        self.assertEqual(self.durable.counters.backed_up, 1)
        self.ingest.release()
        for landed in busy:
            self.successResultOf(landed)

    def test_at_ordinary_speed_nothing_is_spooled(self) -> None:
        self.ingest.hold = True
        flying = [self.durable.submit(started(f"c{n}", f"2100000{n:03d}"), ORIGIN)
                  for n in range(50)]
        self.clock.advance(0.01)
        self.ingest.release()
        for landed in flying:
            self.successResultOf(landed)
        self.ingest.hold = False
        later = [self.durable.submit(started(f"d{n}", f"2100001{n:03d}"), ORIGIN)
                 for n in range(50)]
        for landed in later:
            self.successResultOf(landed)
        self.assertEqual((self.durable.counters.direct, self.durable.counters.backed_up),
                         (100, 0))
        self.assertEqual(self.spool.state().appended_total, 0)

    def test_a_timeout_does_not_stop_other_calls_passing_the_replay(self) -> None:
        """A slow commit is spooled (behind its call); the replay still commits, so the
        next call of another number goes straight to the database, beside it."""
        self.ingest.down = True
        for n in range(12):
            self.successResultOf(self.durable.submit(answered(n), ORIGIN))
        self.ingest.down = False
        self.ingest.hold = True
        replay = self.durable.replay()
        self.ingest.release(1)  # the replay's first group commits: it flows
        slow = self.durable.submit(started("slow", "2109999900"), ORIGIN)
        self.clock.advance(2.0)  # not committed within the deadline
        self.successResultOf(slow)
        self.assertEqual(self.durable.counters.timed_out, 1)
        self.assertEqual(self.spool.state().appended_total, 12 + 1)
        after = self.durable.submit(started("next", "2109999911"), ORIGIN)
        self.assertIn([started("next", "2109999911")], [g for g, _ in self.ingest.held],
                      "straight to the database, past the replay")
        self.ingest.hold = False
        self.ingest.release()
        self.assertTrue(self.successResultOf(replay))
        self.successResultOf(after)
        self.assertEqual(self.durable.counters.ahead, 1)
