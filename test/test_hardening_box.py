"""Issue 14, the box's side: a line with a NUL is a bad line and the box goes on (point 1);
open calls are bounded, warnings of a flood are rate-limited, a box date far from ours or
a DISCONNECT dated before its RING is dated by its arrival (point 6). On a ``Clock``."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any, cast
from zoneinfo import ZoneInfo

from twisted.internet.task import Clock
from twisted.logger import ILogObserver, LogLevel, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from dpvoip.core.happenings import Answered, Ended, Started
from dpvoip.core.log_budget import LogBudget, more_like_this
from dpvoip.core.outcomes import Outcome, Reason
from dpvoip.fritzbox.parser import BadLine, Disconnect, Ring, parse
from dpvoip.fritzbox.tracker import BoxRules, CallTracker
from test.test_fritzbox import connect, make_box

ATHENS = ZoneInfo("Europe/Athens")
#: The Clock's start: 2020-06-17 07:28:29 UTC, the box's 10:28:29 (Athens, summer).
NOW = 1_592_378_909


def box_line(at: float, rest: str) -> bytes:
    """A CallMonitor line dated ``at`` (epoch seconds) by an Athens box's clock."""
    local = datetime.fromtimestamp(at, ATHENS)
    return f"{local:%d.%m.%y %H:%M:%S};{rest}\r\n".encode()


class Captured:
    """The log events written while it is installed (the warnings' count and text)."""

    def __init__(self, case: SynchronousTestCase) -> None:
        self.events: list[dict[str, Any]] = []
        observer = cast(ILogObserver, self.events.append)
        globalLogPublisher.addObserver(observer)
        case.addCleanup(globalLogPublisher.removeObserver, observer)

    def warnings(self, namespace: str = "dpvoip.fritzbox") -> list[dict[str, Any]]:
        return [e for e in self.events if e.get("log_namespace") == namespace
                and e["log_level"] >= LogLevel.warn]


class NulLineTests(SynchronousTestCase):
    """Point 1: before, a RING holding a NUL reached the database and failed there (the
    whole call lost, a traceback); now it is a bad line, counted and warned, and the
    lines around it are recorded."""

    def test_a_line_with_a_nul_is_refused_by_the_parser(self) -> None:
        for line in ("17.06.20 10:28:29;RING;0;0719\x001952;69123;SIP0;",
                     "17.06.20 10:28:29;RING;0;07191952;69123;SIP\x000;",
                     "17.06.20 10:28:43;CONNECT;0;11;0719\x00;",
                     "17.06.20 10:28:29;CALL;1;11;69\x00123;952123;SIP0;",
                     "17.06.20 10:28:29;RING;0;07191952;69123;SIP0;\x00"):
            with self.assertRaises(BadLine) as refused:
                parse(line)
            self.assertIn("control character", str(refused.exception))
        self.assertIsInstance(parse("17.06.20 10:28:29;RING;0;07191952;69123;SIP0;"), Ring)

    def test_the_box_counts_it_warns_and_records_the_rest_of_the_call(self) -> None:
        clock = Clock()
        clock.advance(NOW)
        box, ingest = make_box(clock)
        wire, transport = connect(box, clock)
        logged = Captured(self)
        wire.dataReceived(box_line(NOW, "RING;0;07191952123;69123;SIP0;")
                          + box_line(NOW + 5, "CONNECT;0;11;0719\x001952123;")
                          + box_line(NOW + 9, "DISCONNECT;0;4;")
                          + box_line(NOW + 20, "RING;1;0719\x00;69123;SIP0;")
                          + box_line(NOW + 30, "RING;2;0697111222;69123;SIP0;"))
        self.assertEqual(box.status.bad_lines, 2)
        self.assertFalse(transport.disconnecting)
        [first, second] = [h for h in ingest.happenings if isinstance(h, Started)]
        self.assertEqual((first.conn_id, second.conn_id), (0, 2))
        [end] = [h for h in ingest.happenings if isinstance(h, Ended)]
        self.assertEqual((end.call_id, end.outcome), (first.call_id, Outcome.ANSWERED))
        self.assertFalse(any("\x00" in repr(h) for h in ingest.happenings))
        bad = [e for e in logged.warnings() if "bad line" in e["log_format"]]
        self.assertEqual(len(bad), 2)


class LogBudgetTests(SynchronousTestCase):
    def test_a_few_lines_a_window_then_a_count_of_those_held_back(self) -> None:
        budget = LogBudget(per_window=3, window=60.0)
        allowed = [budget.allow("bad line", 1000.0 + i * 0.001) for i in range(1000)]
        self.assertEqual([a for a in allowed if a[0]], [(True, 0)] * 3)
        self.assertEqual(budget.pending("bad line"), 997)
        self.assertEqual(budget.allow("other", 1001.0), (True, 0), "kinds apart")
        self.assertEqual(budget.allow("bad line", 1060.0), (True, 997))
        self.assertEqual(budget.pending("bad line"), 0)
        self.assertEqual(budget.allow("bad line", 1061.0), (True, 0))
        self.assertEqual(more_like_this(997), " (997 more like this in the last minute)")
        self.assertEqual(more_like_this(0), "")

    def test_a_clock_set_back_starts_a_new_window(self) -> None:
        budget = LogBudget(per_window=1, window=60.0)
        self.assertTrue(budget.allow("k", 100.0)[0])
        self.assertFalse(budget.allow("k", 101.0)[0])
        self.assertEqual(budget.allow("k", 50.0), (True, 1))

    def test_a_flood_of_bad_lines_writes_a_bounded_log(self) -> None:
        """10,000 bad lines in a minute of the box: at most 10 warnings, all counted;
        the next minute's first warning says how many were held back."""
        clock = Clock()
        clock.advance(NOW)
        box, _ = make_box(clock)
        wire, _ = connect(box, clock)
        logged = Captured(self)
        for n in range(10_000):
            wire.dataReceived(b"garbage %d\r\n" % n)
            if n % 200 == 0:
                clock.advance(1.0)
        self.assertEqual(box.status.bad_lines, 10_000)
        self.assertLessEqual(len(logged.warnings()), 10)
        clock.advance(60.0)
        wire.dataReceived(b"garbage again\r\n")
        last = logged.warnings()[-1]
        self.assertEqual(last["more"], " (9990 more like this in the last minute)")


class BoundedTrackerTests(SynchronousTestCase):
    """Point 6: 3,000 RINGs a second with fresh ids, for a while, keep at most
    ``max_open`` calls (and as many remembered ids); the oldest are closed as
    interrupted and counted."""

    def test_fresh_ids_without_end_stay_within_the_bound(self) -> None:
        tracker = CallTracker(BoxRules("office", ATHENS, max_open=64))
        start = datetime(2026, 1, 15, 10, 0, 0)
        ended: list[Ended] = []
        started = 0
        for n in range(30_000):  # ten seconds at 3,000 RINGs/s
            at = start + timedelta(seconds=n // 3000)
            for happening in tracker.feed(Ring(at, n, f"69{n:08d}", "2107654321", "SIP0")):
                if isinstance(happening, Ended):
                    ended.append(happening)
                elif isinstance(happening, Started):
                    started += 1
            self.assertLessEqual(tracker.open_calls, 64)
        self.assertEqual(started, 30_000)
        self.assertEqual(tracker.evicted, 30_000 - 64)
        self.assertEqual(len(ended), 30_000 - 64)
        self.assertTrue(all(e.outcome is Outcome.INTERRUPTED
                            and e.detail is not None and e.detail.reason is Reason.ID_REUSED
                            for e in ended))
        self.assertLessEqual(tracker.remembered_ids, 128)
        # The newest calls are still followed: their end is theirs.
        [end] = tracker.feed(Disconnect(start + timedelta(seconds=20), 29_999, 0))
        assert isinstance(end, Ended)
        self.assertEqual(end.outcome, Outcome.MISSED)

    def test_the_box_counts_and_warns_within_its_budget(self) -> None:
        clock = Clock()
        clock.advance(NOW)
        box, ingest = make_box(clock, max_open_calls=8)
        wire, _ = connect(box, clock)
        logged = Captured(self)
        wire.dataReceived(b"".join(box_line(NOW, f"RING;{n};0697{n:06d};69123;SIP0;")
                                   for n in range(1000)))
        self.assertEqual(box.tracker.open_calls, 8)
        self.assertEqual(box.status.calls_evicted, 992)
        self.assertEqual(sum(isinstance(h, Ended) for h in ingest.happenings), 992)
        self.assertLessEqual(len(logged.warnings()), 10)
        self.assertEqual(box.status.as_json(8)["calls_evicted"], 992)


class BoxDateRuleTests(SynchronousTestCase):
    """Point 6: the written rule for box dates (fritzbox/box.py, docs/decisions.md)."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(NOW)
        self.box, self.ingest = make_box(self.clock, clock_tolerance_seconds=600)
        self.wire, _ = connect(self.box, self.clock)

    def test_a_date_within_the_tolerance_is_the_box_s(self) -> None:
        self.wire.dataReceived(box_line(NOW - 540, "RING;0;0697111222;69123;SIP0;"))
        [started] = self.ingest.happenings
        assert isinstance(started, Started)
        self.assertEqual(started.at.timestamp(), NOW - 540)
        self.assertEqual(self.box.status.dates_replaced, 0)

    def test_a_date_far_from_ours_is_replaced_by_the_arrival(self) -> None:
        logged = Captured(self)
        self.wire.dataReceived(box_line(NOW - 86_400 * 400, "RING;0;0697111222;69123;SIP0;"))
        self.clock.advance(30)
        self.wire.dataReceived(box_line(NOW + 3 * 3600, "DISCONNECT;0;0;"))
        started, ended = self.ingest.happenings
        assert isinstance(started, Started) and isinstance(ended, Ended)
        self.assertEqual(started.at.timestamp(), NOW)
        self.assertEqual(ended.at.timestamp(), NOW + 30)
        self.assertEqual(ended.outcome, Outcome.MISSED, "rang for 30 s by arrival")
        self.assertEqual(self.box.status.dates_replaced, 2)
        self.assertEqual(len([e for e in logged.warnings() if "clock" in e["log_format"]]), 2)

    def test_a_disconnect_dated_before_its_ring_is_dated_by_its_arrival(self) -> None:
        self.wire.dataReceived(box_line(NOW, "RING;0;0697111222;69123;SIP0;"))
        self.clock.advance(20)
        self.wire.dataReceived(box_line(NOW + 5, "CONNECT;0;11;0697111222;"))
        self.clock.advance(40)
        self.wire.dataReceived(box_line(NOW - 300, "DISCONNECT;0;35;"))
        started, answered, ended = self.ingest.happenings
        assert isinstance(started, Started) and isinstance(answered, Answered)
        assert isinstance(ended, Ended)
        self.assertEqual(answered.at.timestamp(), NOW + 5, "after the RING: the box's")
        self.assertEqual(ended.at.timestamp(), NOW + 60, "before the RING: arrival")
        self.assertEqual(self.box.status.dates_replaced, 1)

    def test_never_before_the_call_s_start(self) -> None:
        # The RING is dated 9 minutes ahead of us (within the tolerance); its DISCONNECT
        # before it and before our clock reaches it: dated as the call's start.
        self.wire.dataReceived(box_line(NOW + 540, "RING;0;0697111222;69123;SIP0;"))
        self.clock.advance(10)
        self.wire.dataReceived(box_line(NOW, "DISCONNECT;0;0;"))
        started, ended = self.ingest.happenings
        assert isinstance(started, Started) and isinstance(ended, Ended)
        self.assertEqual(ended.at, started.at)
