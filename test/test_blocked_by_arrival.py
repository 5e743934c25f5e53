"""Blocked or missed without TR-064 (issue 16): the box's whole-second times refined by
the lines' arrival times, so that the box's second boundary decides nothing.

Through the I/O edge (a ``CallMonitorProtocol`` feeding a ``FritzBox``, time driven by a
``Clock`` that stands for both dpvoip's clock and the box's) and with plain data (the
tracker fed events that carry, or do not carry, their arrival)."""

from __future__ import annotations

import json
import math
from dataclasses import fields, replace
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from dpvoip.core.happenings import Answered, Ended, Forwarded, Happening, Started, Unmatched
from dpvoip.core.outcomes import Outcome, Reason
from dpvoip.fritzbox.parser import Event, Ring, parse
from dpvoip.fritzbox.tracker import BoxRules, CallTracker, decide, rang_for
from dpvoip.spool.records import fritz_record, read_record
from test.test_fritzbox import FakeIngest, connect, make_box

ATHENS = ZoneInfo("Europe/Athens")
#: 2024-02-01 10:00:00 in Athens (08:00:00 UTC), a whole second.
BASE = 1_706_774_400
RING = "{at};RING;0;2101234567;2107654321;SIP0;"
HANG_UP = "{at};DISCONNECT;0;0;"


def box_time(seconds: float) -> str:
    """The box's stamp of an event at ``seconds`` (epoch): its local time, cut down to the
    second, as a Fritz!Box writes it."""
    return datetime.fromtimestamp(seconds, ATHENS).strftime("%d.%m.%y %H:%M:%S")


class Office:
    """A box whose clock runs with ``clock`` and the daemon's edge listening to it."""

    def __init__(self, phase: float = 0.0, threshold: float = 2.0) -> None:
        self.clock = Clock()
        self.clock.advance(BASE + phase)
        self.box, self.ingest = make_box(self.clock, timezone="Europe/Athens",
                                         blocked_threshold_seconds=threshold)
        self.wire, _ = connect(self.box, self.clock)

    def send(self, *lines: str) -> None:
        """``lines`` in one TCP segment, now."""
        self.wire.dataReceived(b"".join(line.encode() + b"\r\n" for line in lines))

    def event(self, line: str, at: float | None = None) -> str:
        """``line`` stamped by the box's clock (now, or at ``at``)."""
        return line.format(at=box_time(self.clock.seconds() if at is None else at))

    def ended(self) -> list[Ended]:
        return [h for h in self.ingest.happenings if isinstance(h, Ended)]

    def outcome(self) -> Outcome:
        [end] = self.ended()
        return end.outcome


def rang(seconds: float, phase: float = 0.0, threshold: float = 2.0,
         late_by: float = 0.0) -> Outcome:
    """A caller who rang for ``seconds`` and hung up; the box's clock was ``phase`` into
    its second at the RING; the DISCONNECT line arrived ``late_by`` seconds late."""
    office = Office(phase, threshold)
    office.send(office.event(RING))
    office.clock.advance(seconds)
    hung_up = office.clock.seconds()
    office.clock.advance(late_by)
    office.send(office.event(HANG_UP, at=hung_up))
    return office.outcome()


class ByArrivalTests(SynchronousTestCase):
    """The lines' arrivals, taken at the edge, with the box's times."""

    def test_two_and_a_half_seconds_of_ringing_is_missed_whatever_the_phase(self) -> None:
        for phase in (0.0, 0.3, 0.6, 0.9):
            office = Office(phase)
            office.send(office.event(RING))
            office.clock.advance(2.5)
            office.send(office.event(HANG_UP))
            self.assertEqual(office.outcome(), Outcome.MISSED, phase)
            # The box's own span is 2 s for the first two phases, 3 s for the others: by
            # it alone (a replay) the first two would be blocked.
            span = math.floor(phase + 2.5) - math.floor(phase)
            self.assertEqual(span, 2 if phase < 0.5 else 3)
            [end] = office.ended()
            self.assertEqual(end.at - timedelta(seconds=span),
                             datetime.fromtimestamp(BASE, UTC))

    def test_the_same_call_replayed_without_arrivals_is_decided_by_the_box_span(self) -> None:
        outcomes = []
        for phase in (0.0, 0.3, 0.6, 0.9):
            start, end = BASE + phase, BASE + phase + 2.5
            tracker = CallTracker(BoxRules("office", ATHENS))
            happened = tracker.feed(parse(RING.format(at=box_time(start))))
            happened += tracker.feed(parse(HANG_UP.format(at=box_time(end))))
            outcomes += [h.outcome for h in happened if isinstance(h, Ended)]
        self.assertEqual(outcomes, [Outcome.BLOCKED, Outcome.BLOCKED,
                                    Outcome.MISSED, Outcome.MISSED])

    def test_a_same_second_pair_in_one_segment_is_blocked(self) -> None:
        for phase in (0.0, 0.5, 0.99):
            office = Office(phase)
            office.send(office.event(RING), office.event(HANG_UP))
            self.assertEqual(office.outcome(), Outcome.BLOCKED, phase)
            [started] = [h for h in office.ingest.happenings if isinstance(h, Started)]
            self.assertEqual(started.remote, "2101234567")

    def test_a_same_second_pair_arriving_apart_is_blocked(self) -> None:
        office = Office(0.1)
        office.send(office.event(RING))
        office.clock.advance(0.8)  # still the box's second (0.1 + 0.8)
        office.send(office.event(HANG_UP))
        self.assertEqual(office.outcome(), Outcome.BLOCKED)
        # The DISCONNECT line held back by the network: the box says the same second.
        self.assertEqual(rang(0.5, phase=0.2, late_by=4.0), Outcome.BLOCKED)

    def test_a_same_second_pair_is_blocked_whatever_the_threshold(self) -> None:
        for threshold in (0.0, 0.3, 0.5, 2.0, 30.0):
            self.assertEqual(rang(0.8, phase=0.1, threshold=threshold), Outcome.BLOCKED,
                             threshold)

    def test_a_burst_after_a_stall_trusts_the_box(self) -> None:
        # The box said RING at :00 and DISCONNECT at :03; the network held both back and
        # delivered them in one segment: an arrival gap of 0.
        office = Office(0.4)
        start = office.clock.seconds()
        office.clock.advance(20)
        office.send(office.event(RING, at=start), office.event(HANG_UP, at=start + 3))
        self.assertEqual(office.outcome(), Outcome.MISSED)
        # The same with a span of 2 s: as the box's times alone say (blocked).
        office = Office(0.4)
        start = office.clock.seconds()
        office.clock.advance(20)
        office.send(office.event(RING, at=start), office.event(HANG_UP, at=start + 2))
        self.assertEqual(office.outcome(), Outcome.BLOCKED)

    def test_a_ring_held_back_arrives_with_its_hangup_and_the_box_still_decides(self) -> None:
        # The RING line stalled; the DISCONNECT, 4 s later by the box, came right after it.
        office = Office(0.7)
        start = office.clock.seconds()
        office.clock.advance(4.2)
        office.send(office.event(RING, at=start))
        office.clock.advance(0.05)
        office.send(office.event(HANG_UP))
        self.assertEqual(office.outcome(), Outcome.MISSED)

    def test_exactly_how_the_threshold_applies(self) -> None:
        # A ring of at most the threshold is blocked, longer is missed; measured by the
        # arrival gap wherever the box's span allows it.
        cases = [
            (1.9, 0.0, 2.0, Outcome.BLOCKED),
            (2.0, 0.0, 2.0, Outcome.BLOCKED),  # exactly the threshold: blocked
            (2.0, 0.5, 2.0, Outcome.BLOCKED),
            (2.01, 0.0, 2.0, Outcome.MISSED),  # the box says 2 s: alone, blocked
            (2.1, 0.95, 2.0, Outcome.MISSED),
            (1.2, 0.9, 2.0, Outcome.BLOCKED),  # the box says 2 s
            (3.4, 0.0, 3.5, Outcome.BLOCKED),
            (3.6, 0.0, 3.5, Outcome.MISSED),
            (0.4, 0.8, 0.5, Outcome.BLOCKED),  # the box says 1 s, above the threshold
            (0.6, 0.8, 0.5, Outcome.MISSED),
            (30.0, 0.3, 2.0, Outcome.MISSED),
        ]
        for seconds, phase, threshold, expected in cases:
            self.assertEqual(rang(seconds, phase, threshold), expected,
                             (seconds, phase, threshold))

    def test_a_late_disconnect_the_box_contradicts_is_measured_by_the_box(self) -> None:
        # Rang 1.5 s; the DISCONNECT line came 3 s late: an arrival gap of 4.5 s against
        # the box's span of 1 or 2 s. The box wins: blocked.
        for phase in (0.0, 0.7):
            self.assertEqual(rang(1.5, phase, late_by=3.0), Outcome.BLOCKED, phase)

    def test_arrivals_are_taken_when_the_line_completes(self) -> None:
        office = Office(0.0)
        ring = office.event(RING).encode() + b"\r\n"
        office.wire.dataReceived(ring[:20])
        office.clock.advance(0.7)
        office.wire.dataReceived(ring[20:])  # the RING arrived at 0.7
        office.clock.advance(2.0)
        office.send(office.event(HANG_UP))  # at 2.7, the box's :02: by the line, 2.0 s
        self.assertEqual(office.outcome(), Outcome.BLOCKED)

    def test_a_clock_step_does_not_fake_a_ring_time(self) -> None:
        # dpvoip's clock jumped an hour between the lines (the reactor's time is the
        # wall clock): the gap is no measure, the box's span decides.
        office = Office(0.2, threshold=2.0)
        office.box.settings = replace(office.box.settings, clock_tolerance_seconds=0)
        office.send(office.event(RING))
        ring_at = office.clock.seconds()
        office.clock.advance(3600)
        office.send(office.event(HANG_UP, at=ring_at + 1.5))
        self.assertEqual(office.outcome(), Outcome.BLOCKED)

    def test_a_box_clock_far_off_dates_by_arrival_and_still_decides(self) -> None:
        # The box's clock an hour late (just rebooted): its lines are dated by their
        # arrival (issue 14), which the ring time then is.
        for seconds, expected in [(0.5, Outcome.BLOCKED), (1.9, Outcome.BLOCKED),
                                  (2.5, Outcome.MISSED)]:
            office = Office(0.7)
            office.send(office.event(RING, at=office.clock.seconds() - 3600))
            office.clock.advance(seconds)
            office.send(office.event(HANG_UP, at=office.clock.seconds() - 3600))
            self.assertEqual(office.outcome(), expected, seconds)
            self.assertEqual(office.box.status.dates_replaced, 2)


def events(*steps: tuple[str, float | None]) -> list[Event]:
    """Parsed lines, each with its arrival (None: unknown)."""
    return [replace(parse(line), arrived=arrived) for line, arrived in steps]


def fed(steps: list[Event], tracker: CallTracker | None = None) -> list[Happening]:
    tracker = tracker or CallTracker(BoxRules("office", ATHENS))
    happened: list[Happening] = []
    for event in steps:
        happened += tracker.feed(event)
    return happened


def without_arrivals(steps: list[Event]) -> list[Event]:
    return [replace(event, arrived=None) for event in steps]


class PlainDataTests(SynchronousTestCase):
    """The tracker with events that carry their arrival, or not."""

    def test_rang_for_believes_the_gap_only_within_a_second_of_the_box_span(self) -> None:
        self.assertEqual(rang_for(2, 2.5), 2.5)
        self.assertEqual(rang_for(3, 2.5), 2.5)
        self.assertEqual(rang_for(2, 1.01), 1.01)
        self.assertEqual(rang_for(2, 1.0), 2)  # a second away: not what the box allows
        self.assertEqual(rang_for(3, 0.0), 3)  # a burst
        self.assertEqual(rang_for(1, 3600.5), 1)  # a clock step
        self.assertEqual(rang_for(2, -0.5), 2)  # a clock step back
        self.assertEqual(rang_for(2, None), 2)  # no arrivals: the box's span, as before

    def test_decide_without_arrivals_is_the_box_rule_as_before(self) -> None:
        rules = BoxRules("office", ATHENS)
        start = datetime(2024, 2, 1, 10, 0, 0)
        for span, expected in [(0, Outcome.BLOCKED), (1, Outcome.BLOCKED),
                               (2, Outcome.BLOCKED), (3, Outcome.MISSED)]:
            end = start + timedelta(seconds=span)
            self.assertEqual(decide("incoming", start, end, 0, None, rules), expected)
            self.assertEqual(decide("incoming", start, end, 0, None, rules,
                                    arrival_gap=None), expected)
        end = start + timedelta(seconds=2)
        self.assertEqual(decide("incoming", start, end, 0, None, rules, arrival_gap=2.5),
                         Outcome.MISSED)

    def test_one_arrival_missing_is_no_arrival(self) -> None:
        lines = ("01.02.24 10:00:00;RING;0;2101234567;7654321;SIP0;",
                 "01.02.24 10:00:02;DISCONNECT;0;0;")
        for ring_at, end_at in [(None, 102.5), (100.0, None)]:
            [end] = [h for h in fed(events((lines[0], ring_at), (lines[1], end_at)))
                     if isinstance(h, Ended)]
            self.assertEqual(end.outcome, Outcome.BLOCKED, (ring_at, end_at))
        [end] = [h for h in fed(events((lines[0], 100.0), (lines[1], 102.5)))
                 if isinstance(h, Ended)]
        self.assertEqual(end.outcome, Outcome.MISSED)

    def test_nothing_else_changes_with_arrivals(self) -> None:
        """Answered, voicemail, fax, forwarded, outgoing (even a short one), hairpin,
        id reuse, unmatched events and calls closed at a reconnect come out the same
        with arrival times as without, to the last field."""
        own = {"654321", "654322"}
        calls = [
            ("01.02.24 10:00:00;RING;0;2101234567;2107654321;SIP0;", 0.0),
            ("01.02.24 10:00:01;CONNECT;0;11;2101234567;", 1.1),
            ("01.02.24 10:00:31;DISCONNECT;0;30;", 31.1),
            ("01.02.24 10:01:00;RING;1;6912345678;2107654321;SIP0;", 60.5),
            ("01.02.24 10:01:01;CONNECT;1;40;6912345678;", 61.5),  # voicemail
            ("01.02.24 10:01:21;DISCONNECT;1;20;", 81.5),
            ("01.02.24 10:02:00;RING;2;2101234567;2107654321;SIP0;", 120.2),
            ("01.02.24 10:02:01;CONNECT;2;5;2101234567;", 121.2),  # fax
            ("01.02.24 10:02:11;DISCONNECT;2;10;", 131.2),
            ("01.02.24 10:03:00;CALL;3;11;2107654321;2310555123;SIP0;", 180.9),
            ("01.02.24 10:03:00;DISCONNECT;3;0;", 181.0),  # not reached, at once
            ("01.02.24 10:04:00;RING;4;2101234567;2107654321;SIP0;", 240.0),
            ("01.02.24 10:04:01;CALL;4;0;2107654321;6977777777;SIP0;", 241.0),
            ("01.02.24 10:04:02;CONNECT;4;0;6977777777;", 242.0),
            ("01.02.24 10:04:40;DISCONNECT;4;38;", 280.0),  # forwarded and answered
            ("01.02.24 10:05:00;RING;5;2101234567;2107654321;SIP0;", 300.3),
            ("01.02.24 10:05:10;RING;5;2109999999;2107654321;SIP0;", 310.3),  # id reused
            ("01.02.24 10:05:15;DISCONNECT;5;0;", 315.3),
            ("01.02.24 10:06:00;CALL;6;11;2107654321;2107654322;SIP0;", 360.0),  # hairpin
            ("01.02.24 10:06:00;RING;7;2107654321;2107654322;SIP0;", 360.1),
            ("01.02.24 10:06:03;CONNECT;7;12;2107654321;", 363.0),
            ("01.02.24 10:06:03;CONNECT;6;12;2107654322;", 363.0),
            ("01.02.24 10:06:30;DISCONNECT;7;27;", 390.0),
            ("01.02.24 10:06:30;DISCONNECT;6;27;", 390.0),
            ("01.02.24 10:07:00;CONNECT;8;11;2101234567;", 420.0),  # never saw it start
            ("01.02.24 10:07:05;DISCONNECT;9;0;", 425.0),
            ("01.02.24 10:08:00;RING;0;2101234567;2107654321;SIP0;", 480.0),  # left open
        ]

        def tracker() -> CallTracker:
            return CallTracker(BoxRules("office", ATHENS,
                                        is_own_number=lambda n: n[-6:] in own))

        with_arrivals, plain = tracker(), tracker()
        timed = events(*calls)
        lost_link = datetime(2024, 2, 1, 8, 9, tzinfo=UTC)
        got = fed(timed, with_arrivals) + with_arrivals.close_all(Reason.LINK_LOST, lost_link)
        expected = fed(without_arrivals(timed), plain) + plain.close_all(Reason.LINK_LOST,
                                                                         lost_link)
        self.assertEqual(got, expected)
        kinds = {type(h) for h in got}
        self.assertEqual(kinds, {Started, Answered, Forwarded, Ended, Unmatched})
        self.assertEqual([e.outcome for e in got if isinstance(e, Ended)], [
            Outcome.ANSWERED, Outcome.VOICEMAIL, Outcome.FAX, Outcome.NOT_REACHED,
            Outcome.ANSWERED, Outcome.INTERRUPTED, Outcome.MISSED, Outcome.ANSWERED,
            Outcome.INTERRUPTED])

    def test_a_redialling_blocked_caller_keeps_its_ids(self) -> None:
        lines = [step for n in range(3) for step in (
            ("01.02.24 10:00:00;RING;0;2101234567;7654321;SIP0;", 0.1 + n / 10),
            ("01.02.24 10:00:00;DISCONNECT;0;0;", 0.15 + n / 10))]
        happened = [h for h in fed(events(*lines)) if isinstance(h, Ended)]
        self.assertEqual([(e.call_id, e.outcome) for e in happened], [
            ("fb-office-20240201100000-0", Outcome.BLOCKED),
            ("fb-office-20240201100000-0-2", Outcome.BLOCKED),
            ("fb-office-20240201100000-0-3", Outcome.BLOCKED)])


class SpoolTests(SynchronousTestCase):
    """The arrival decides the outcome and goes no further: no happening holds it, so a
    spool record is what it was, and an older record reads as before."""

    def test_no_happening_carries_an_arrival(self) -> None:
        for kind in (Started, Answered, Forwarded, Ended, Unmatched):
            self.assertNotIn("arrived", {spec.name for spec in fields(kind)}, kind)

    def test_a_call_decided_by_arrival_spools_as_any_call(self) -> None:
        office = Office(0.3)
        office.send(office.event(RING))
        office.clock.advance(2.5)
        office.send(office.event(HANG_UP))
        received = datetime.fromtimestamp(office.clock.seconds(), UTC)
        for happening in office.ingest.happenings:
            record = fritz_record(happening, "office", received)
            self.assertNotIn(b"arrived", record)
            self.assertEqual(read_record(record), ("fritzbox", happening, "office"))
        end = office.ended()[0]
        data = json.loads(fritz_record(end, "office", received))
        self.assertEqual(set(data), {"source", "box", "kind", "fields", "received"})
        self.assertEqual(data["fields"]["outcome"], "missed")

    def test_events_without_an_arrival_still_parse_and_compare_as_before(self) -> None:
        line = "01.02.24 10:00:00;RING;0;2101234567;7654321;SIP0;"
        self.assertEqual(parse(line), Ring(datetime(2024, 2, 1, 10), 0, "2101234567",
                                           "7654321", "SIP0"))
        self.assertIsNone(parse(line).arrived)


class EdgeTests(SynchronousTestCase):
    def test_the_box_stamps_each_event_with_its_arrival(self) -> None:
        clock = Clock()
        clock.advance(BASE + 0.25)
        box, ingest = make_box(clock, timezone="Europe/Athens")
        seen: list[Event] = []
        feed = box.tracker.feed

        def spy(event: Event) -> list[Happening]:
            seen.append(event)
            return feed(event)

        box.tracker.feed = spy  # type: ignore[method-assign]
        box.line_received(RING.format(at=box_time(BASE)))
        clock.advance(1.5)
        box.line_received(HANG_UP.format(at=box_time(BASE + 1.75)))
        self.assertEqual([e.arrived for e in seen], [BASE + 0.25, BASE + 1.75])
        self.assertIsInstance(ingest, FakeIngest)
        self.assertEqual(box.status.last_line_at,
                         datetime.fromtimestamp(BASE + 1.75, UTC))
