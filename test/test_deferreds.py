"""The shared Deferred tools and the error summary, driven by a ``Clock``: who is told
what and when, what a deadline cancels and what it leaves alone."""

from __future__ import annotations

from twisted.internet.defer import CancelledError, Deferred, TimeoutError, fail, succeed
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from dpvoip.core.errors import summary
from dpvoip.deferreds import EmptyableSet, OneShotObserver, race, shield, within


class Boom(Exception):
    pass


class Work:
    """A Deferred standing for work under way, which records whether it was cancelled."""

    def __init__(self, cancelled_with: Exception | None = None) -> None:
        self.cancelled = 0
        self._cancelled_with = cancelled_with
        self.deferred: Deferred[str] = Deferred(self._cancel)

    def _cancel(self, deferred: Deferred[str]) -> None:
        self.cancelled += 1
        if self._cancelled_with is not None:
            deferred.errback(self._cancelled_with)


class OneShotObserverTests(SynchronousTestCase):
    def test_who_asks_before_hears_when_it_fires_and_not_earlier(self) -> None:
        observer: OneShotObserver[str] = OneShotObserver()
        first, second = observer.when_fired(), observer.when_fired()
        self.assertNoResult(first)
        self.assertFalse(observer.fired)
        self.assertIsNone(observer.peek())
        observer.fire("ready")
        self.assertEqual((self.successResultOf(first), self.successResultOf(second)),
                         ("ready", "ready"))
        self.assertTrue(observer.fired)

    def test_who_asks_after_hears_at_once(self) -> None:
        observer: OneShotObserver[str] = OneShotObserver()
        observer.fire("ready")
        self.assertEqual(self.successResultOf(observer.when_fired()), "ready")
        self.assertEqual(observer.peek(), "ready")

    def test_a_failure_reaches_everyone_and_peek_gives_none(self) -> None:
        observer: OneShotObserver[str] = OneShotObserver()
        before = observer.when_fired()
        observer.fire(Failure(Boom("schema missing")))
        self.failureResultOf(before, Boom)
        self.failureResultOf(observer.when_fired(), Boom)
        self.assertTrue(observer.fired)
        self.assertIsNone(observer.peek())

    def test_a_second_fire_is_ignored(self) -> None:
        observer: OneShotObserver[str] = OneShotObserver()
        observer.fire("first")
        observer.fire("second")
        observer.fire(Failure(Boom()))
        self.assertEqual(self.successResultOf(observer.when_fired()), "first")
        self.assertEqual(observer.peek(), "first")

    def test_an_asker_who_gave_up_is_skipped(self) -> None:
        observer: OneShotObserver[str] = OneShotObserver()
        gave_up, waits = observer.when_fired(), observer.when_fired()
        gave_up.cancel()
        self.failureResultOf(gave_up, CancelledError)
        observer.fire("ready")  # no AlreadyCalledError for the cancelled one
        self.assertEqual(self.successResultOf(waits), "ready")


class EmptyableSetTests(SynchronousTestCase):
    def test_empty_fires_at_once(self) -> None:
        things: EmptyableSet[str] = EmptyableSet()
        self.assertIsNone(self.successResultOf(things.when_empty()))

    def test_fires_when_the_last_item_goes_and_not_before(self) -> None:
        things: EmptyableSet[str] = EmptyableSet()
        things.add("a")
        things.add("b")
        things.add("b")
        self.assertEqual(len(things), 2)
        empty = things.when_empty()
        things.discard("a")
        things.discard("unknown")  # not there: nothing happens
        self.assertNoResult(empty)
        self.assertIn("b", things)
        things.discard("b")
        self.assertIsNone(self.successResultOf(empty))
        self.assertEqual(len(things), 0)
        self.assertNotIn("b", things)

    def test_it_fires_each_time_it_becomes_empty(self) -> None:
        things: EmptyableSet[str] = EmptyableSet()
        things.add("a")
        first = things.when_empty()
        things.discard("a")
        things.add("c")
        second = things.when_empty()
        self.assertNoResult(second)
        things.discard("c")
        self.successResultOf(first)
        self.successResultOf(second)

    def test_iterating_is_a_snapshot_so_items_can_go_meanwhile(self) -> None:
        things: EmptyableSet[str] = EmptyableSet()
        for name in ("a", "b", "c"):
            things.add(name)
        empty = things.when_empty()
        seen = []
        for name in things:
            seen.append(name)
            things.discard(name)
        self.assertEqual(sorted(seen), ["a", "b", "c"])
        self.successResultOf(empty)

    def test_a_waiter_who_gave_up_is_skipped(self) -> None:
        things: EmptyableSet[str] = EmptyableSet()
        things.add("a")
        gave_up, waits = things.when_empty(), things.when_empty()
        gave_up.cancel()
        things.discard("a")
        self.failureResultOf(gave_up, CancelledError)
        self.successResultOf(waits)


class ShieldTests(SynchronousTestCase):
    def test_the_result_and_a_failure_come_through(self) -> None:
        inner: Deferred[str] = Deferred()
        outer = shield(inner)
        self.assertNoResult(outer)
        inner.callback("committed")
        self.assertEqual(self.successResultOf(outer), "committed")
        self.failureResultOf(shield(fail(Boom())), Boom)

    def test_cancelling_the_shield_does_not_cancel_the_inner_work(self) -> None:
        work = Work()
        outer = shield(work.deferred)
        outer.cancel()
        self.failureResultOf(outer, CancelledError)
        self.assertEqual(work.cancelled, 0)
        self.assertFalse(work.deferred.called)
        work.deferred.callback("committed anyway")  # no AlreadyCalledError on outer
        self.assertIsNone(self.successResultOf(work.deferred))  # consumed by the shield


class WithinTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()

    def test_a_result_in_time_comes_through_and_the_timer_goes(self) -> None:
        work = Work()
        result = within(self.clock, work.deferred, 5)
        self.clock.advance(4.9)
        self.assertNoResult(result)
        work.deferred.callback("done")
        self.assertEqual(self.successResultOf(result), "done")
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_a_failure_in_time_comes_through(self) -> None:
        work = Work()
        result = within(self.clock, work.deferred, 5)
        work.deferred.errback(Boom("refused"))
        self.assertEqual(str(self.failureResultOf(result, Boom).value), "refused")
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_work_already_done_gives_its_result_at_once(self) -> None:
        self.assertEqual(self.successResultOf(within(self.clock, succeed("done"), 5)), "done")
        self.failureResultOf(within(self.clock, fail(Boom()), 5), Boom)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_at_the_deadline_timeout_and_the_work_is_left_to_finish(self) -> None:
        work = Work()
        result = within(self.clock, work.deferred, 5)
        self.clock.advance(4.999)
        self.assertNoResult(result)
        self.clock.advance(0.001)
        failure = self.failureResultOf(result, TimeoutError)
        self.assertEqual(str(failure.value), "nothing within 5 s")
        self.assertEqual(work.cancelled, 0)
        work.deferred.callback("late")  # ignored, and no AlreadyCalledError

    def test_cancelling_the_result_leaves_the_work_alone_by_default(self) -> None:
        work = Work()
        result = within(self.clock, work.deferred, 5)
        result.cancel()
        self.failureResultOf(result, CancelledError)
        self.assertEqual(work.cancelled, 0)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        work.deferred.callback("late")

    def test_cancel_work_cancels_it_at_the_deadline_and_says_timeout(self) -> None:
        # whatever the cancelled work fails with (an HTTP client wraps the cancellation)
        work = Work(cancelled_with=Boom("response never received"))
        result = within(self.clock, work.deferred, 5, cancel_work=True)
        self.clock.advance(5)
        self.failureResultOf(result, TimeoutError)
        self.assertEqual(work.cancelled, 1)

    def test_cancel_work_cancels_it_with_the_result(self) -> None:
        work = Work(cancelled_with=Boom("aborted"))
        result = within(self.clock, work.deferred, 5, cancel_work=True)
        result.cancel()
        self.assertEqual(work.cancelled, 1)
        self.failureResultOf(result, Boom)  # what the work ended with
        self.assertEqual(self.clock.getDelayedCalls(), [])


class RaceTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()

    def test_the_result_in_time(self) -> None:
        work: Deferred[bool] = Deferred()
        result = race(self.clock, work, 1, False)
        work.callback(True)
        self.assertIs(self.successResultOf(result), True)

    def test_the_fallback_after_the_deadline(self) -> None:
        work: Deferred[bool] = Deferred()
        result = race(self.clock, work, 1, False)
        self.clock.advance(0.5)
        self.assertNoResult(result)
        self.clock.advance(0.5)
        self.assertIs(self.successResultOf(result), False)
        self.assertFalse(work.called)  # left to finish

    def test_the_fallback_on_failure(self) -> None:
        self.assertEqual(self.successResultOf(race(self.clock, fail(Boom()), 1, "no")), "no")


class SummaryTests(SynchronousTestCase):
    def test_the_first_non_blank_line_stripped(self) -> None:
        error = Exception("\n  could not connect to server: Connection refused  \n\tIs the "
                          "server running on host \"db\"?\n")
        self.assertEqual(summary(error), "could not connect to server: Connection refused")

    def test_an_error_without_a_message_is_named_by_its_type(self) -> None:
        self.assertEqual(summary(Boom()), "Boom")
        self.assertEqual(summary(Boom("  \n ")), "Boom")

    def test_a_text_gives_its_first_line_or_nothing(self) -> None:
        self.assertEqual(summary("first\nsecond"), "first")
        self.assertEqual(summary(" \n"), "")
