"""The reconciliation rule of fritzbox.md section 7, as plain data: links, finishes,
blocked <-> missed corrections, recovered calls, the state, resets, first runs and active
entries (issue 16 points 2 and 3)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

from twisted.trial.unittest import SynchronousTestCase

from dpvoip.core.numbers import Dialling
from dpvoip.core.outcomes import Outcome, Reason
from dpvoip.fritzbox.listed import (
    ACTIVE_INCOMING,
    ACTIVE_OUTGOING,
    BLOCKED,
    INCOMING,
    MISSED,
    OUTGOING,
    CallList,
    ListedCall,
)
from dpvoip.fritzbox.reconcile import (
    NO_CONNECTION,
    ListRules,
    ListState,
    Recorded,
    list_call_id,
    outcome_of,
    plan,
    time_range,
    was_reset,
)

ATHENS = ZoneInfo("Europe/Athens")
RULES = ListRules("office", ATHENS, Dialling("GR", "21"))
MOBILE = "06912345678"
E164 = "+306912345678"


def entry(id: int, type: int, hhmm: str, remote: str = MOBILE, port: str = "10",
          duration: int = 0, day: int = 2) -> ListedCall:
    hour, minute = map(int, hhmm.split(":"))
    return ListedCall(id, type, remote, "2107654321", "", "", port,
                      datetime(2026, 3, day, hour, minute), duration)


def utc(hhmmss: str, day: int = 2) -> datetime:
    hour, minute, second = map(int, hhmmss.split(":"))
    return datetime(2026, 3, day, hour, minute, second, tzinfo=ATHENS).astimezone(UTC)


def recorded(call_id: str, started: str, outcome: str | None = "missed",
             status: str | None = None, direction: str = "incoming",
             number: str | None = E164, raw: str = MOBILE, rang: int = 10,
             list_id: int | None = None) -> Recorded:
    at = utc(started)
    status = status or {None: "active", "missed": "missed", "voicemail": "missed",
                        "answered": "completed"}.get(outcome, "failed")
    return Recorded(call_id, direction, raw, number, at,
                    None if outcome is None else at + timedelta(seconds=rang), status,
                    outcome, list_id)


def listing(*calls: ListedCall, timestamp: int = 1000) -> CallList:
    return CallList(timestamp, tuple(sorted(calls, key=lambda c: -c.id)))


STATE = ListState(100, 900)


class OutcomeTests(SynchronousTestCase):
    def test_each_type_says_its_outcome(self) -> None:
        self.assertEqual(outcome_of(entry(1, INCOMING, "09:00", port="10"), RULES),
                         Outcome.ANSWERED)
        self.assertEqual(outcome_of(entry(1, INCOMING, "09:00", port="40"), RULES),
                         Outcome.VOICEMAIL)
        self.assertEqual(outcome_of(entry(1, INCOMING, "09:00", port="6"), RULES),
                         Outcome.VOICEMAIL)
        self.assertEqual(outcome_of(entry(1, MISSED, "09:00"), RULES), Outcome.MISSED)
        self.assertEqual(outcome_of(entry(1, OUTGOING, "09:00", duration=60), RULES),
                         Outcome.ANSWERED)
        self.assertEqual(outcome_of(entry(1, OUTGOING, "09:00"), RULES), Outcome.NOT_REACHED)
        self.assertEqual(outcome_of(entry(1, BLOCKED, "09:00"), RULES), Outcome.BLOCKED)
        self.assertIsNone(outcome_of(entry(1, 7, "09:00"), RULES))


class RecoveryTests(SynchronousTestCase):
    def test_calls_the_monitor_never_saw_are_recovered_once_each(self) -> None:
        listed = listing(entry(101, MISSED, "09:00"), entry(102, INCOMING, "09:05", port="40",
                                                              duration=60),
                         entry(103, OUTGOING, "09:10", remote="2101234567", duration=120),
                         entry(104, BLOCKED, "09:15", remote=""))
        result = plan(STATE, listed, [], RULES)
        self.assertEqual([r.entry_id for r in result.recoveries], [101, 102, 103, 104])
        missed, voicemail, outgoing, blocked = result.recoveries
        self.assertEqual(missed.started.call_id, list_call_id("office", entry(101, MISSED,
                                                                              "09:00")))
        self.assertEqual(missed.started.call_id, "fb-office-list-2603020900-101")
        self.assertEqual(missed.started.at, utc("09:00:00"))
        self.assertEqual(missed.started.conn_id, NO_CONNECTION)
        self.assertEqual((missed.ended.outcome, missed.ended.detail.reason
                          if missed.ended.detail else None),
                         (Outcome.MISSED, Reason.CALL_LIST))
        self.assertEqual((voicemail.ended.outcome, voicemail.ended.extension,
                          voicemail.ended.duration, voicemail.ended.at),
                         (Outcome.VOICEMAIL, 40, 60, utc("09:06:00")))
        self.assertEqual((outgoing.started.direction, outgoing.started.remote,
                          outgoing.ended.outcome), ("outgoing", "2101234567", Outcome.ANSWERED))
        self.assertEqual(blocked.ended.outcome, Outcome.BLOCKED)
        self.assertEqual(result.state, ListState(104, 1000))
        self.assertEqual(result.links, ())

    def test_entries_up_to_the_stored_id_are_left_alone(self) -> None:
        listed = listing(entry(99, MISSED, "08:00"), entry(100, MISSED, "08:30"),
                         entry(101, MISSED, "09:00"))
        result = plan(STATE, listed, [], RULES)
        self.assertEqual([r.entry_id for r in result.recoveries], [101])

    def test_unknown_types_are_skipped_and_counted(self) -> None:
        result = plan(STATE, listing(entry(101, 7, "09:00"), entry(102, MISSED, "09:01")), [],
                      RULES)
        self.assertEqual((result.skipped, len(result.recoveries), result.state.last_id),
                         (1, 1, 102))


class LinkTests(SynchronousTestCase):
    def test_a_recorded_call_is_linked_not_inserted(self) -> None:
        calls = [recorded("fb-a", "09:00:40", "missed")]
        result = plan(STATE, listing(entry(101, MISSED, "09:00")), calls, RULES)
        self.assertEqual(result.links, (("fb-a", 101),))
        self.assertEqual((result.recoveries, result.finishes, result.corrections), ((), (), ()))

    def test_the_window_is_date_minus_60_to_date_plus_120_seconds(self) -> None:
        for start, linked in (("08:59:00", True), ("08:58:59", False), ("09:01:59", True),
                              ("09:02:00", False)):
            result = plan(STATE, listing(entry(101, MISSED, "09:00")),
                          [recorded("fb-a", start)], RULES)
            self.assertEqual(bool(result.links), linked, start)
            self.assertEqual(bool(result.recoveries), not linked, start)

    def test_direction_and_number_must_agree(self) -> None:
        calls = [recorded("fb-out", "09:00:10", "answered", direction="outgoing"),
                 recorded("fb-other", "09:00:10", number="+302101111111", raw="2101111111")]
        result = plan(STATE, listing(entry(101, MISSED, "09:00")), calls, RULES)
        self.assertEqual(result.links, ())
        self.assertEqual(len(result.recoveries), 1)

    def test_the_numbers_are_compared_normalised(self) -> None:
        calls = [recorded("fb-a", "09:00:10", number=E164, raw="6912345678")]
        result = plan(STATE, listing(entry(101, MISSED, "09:00", remote="00306912345678")),
                      calls, RULES)
        self.assertEqual(result.links, (("fb-a", 101),))

    def test_a_withheld_number_matches_a_withheld_one(self) -> None:
        calls = [recorded("fb-w", "09:00:10", number=None, raw="")]
        result = plan(STATE, listing(entry(101, MISSED, "09:00", remote="")), calls, RULES)
        self.assertEqual(result.links, (("fb-w", 101),))
        result = plan(STATE, listing(entry(101, MISSED, "09:00")), calls, RULES)
        self.assertEqual(result.links, ())

    def test_one_entry_one_call_the_nearest_start_first(self) -> None:
        # A blocked caller redialling: three rings within a minute, three entries.
        calls = [recorded("fb-3", "09:00:30", "blocked", rang=0),
                 recorded("fb-1", "09:00:02", "blocked", rang=0),
                 recorded("fb-2", "09:00:15", "blocked", rang=0)]
        listed = listing(entry(101, BLOCKED, "09:00"), entry(102, BLOCKED, "09:00"),
                         entry(103, BLOCKED, "09:00"), entry(104, BLOCKED, "09:00"))
        result = plan(STATE, listed, calls, RULES)
        self.assertEqual(result.links, (("fb-1", 101), ("fb-2", 102), ("fb-3", 103)))
        self.assertEqual([r.entry_id for r in result.recoveries], [104])

    def test_a_call_linked_to_another_entry_is_not_taken_again(self) -> None:
        calls = [recorded("fb-a", "09:00:10", list_id=90)]
        result = plan(STATE, listing(entry(101, MISSED, "09:00")), calls, RULES)
        self.assertEqual(result.links, ())
        self.assertEqual(len(result.recoveries), 1)

    def test_a_call_linked_to_this_entry_changes_nothing(self) -> None:
        calls = [recorded("fb-a", "09:00:10", list_id=101)]
        result = plan(ListState(100, 900), listing(entry(101, MISSED, "09:00")), calls, RULES)
        self.assertEqual((result.links, result.recoveries, result.already), ((), (), 1))
        self.assertFalse(result.writes)


class FinishTests(SynchronousTestCase):
    def test_a_call_left_open_is_finished_with_the_lists_outcome(self) -> None:
        calls = [recorded("fb-open", "09:00:20", None)]
        result = plan(STATE, listing(entry(101, INCOMING, "09:00", port="11", duration=180)),
                      calls, RULES)
        [finish] = result.finishes
        self.assertEqual(result.links, (("fb-open", 101),))
        self.assertEqual((finish.ended.call_id, finish.ended.outcome, finish.ended.duration,
                          finish.ended.extension, finish.ended.at),
                         ("fb-open", Outcome.ANSWERED, 180, 11, utc("09:03:20")))
        self.assertEqual(finish.ended.detail.reason if finish.ended.detail else None,
                         Reason.CALL_LIST)

    def test_an_interrupted_call_is_finished_too(self) -> None:
        calls = [recorded("fb-int", "09:00:20", "interrupted")]
        result = plan(STATE, listing(entry(101, INCOMING, "09:00", port="40", duration=60)),
                      calls, RULES)
        [finish] = result.finishes
        self.assertEqual(finish.ended.outcome, Outcome.VOICEMAIL)


class CorrectionTests(SynchronousTestCase):
    def test_a_short_missed_call_the_box_blocked_becomes_blocked(self) -> None:
        calls = [recorded("fb-a", "09:00:20", "missed", rang=2)]
        result = plan(STATE, listing(entry(101, BLOCKED, "09:00")), calls, RULES)
        [correction] = result.corrections
        self.assertEqual((correction.call_id, correction.was, correction.becomes),
                         ("fb-a", Outcome.MISSED, Outcome.BLOCKED))

    def test_a_long_ring_is_not_turned_into_blocked(self) -> None:
        calls = [recorded("fb-a", "09:00:20", "missed", rang=20)]
        result = plan(STATE, listing(entry(101, BLOCKED, "09:00")), calls, RULES)
        self.assertEqual(result.corrections, ())
        self.assertEqual(result.links, (("fb-a", 101),))

    def test_a_blocked_call_the_box_says_was_missed_becomes_missed(self) -> None:
        calls = [recorded("fb-a", "09:00:20", "blocked", rang=1)]
        result = plan(STATE, listing(entry(101, MISSED, "09:00")), calls, RULES)
        [correction] = result.corrections
        self.assertEqual((correction.was, correction.becomes),
                         (Outcome.BLOCKED, Outcome.MISSED))

    def test_agreeing_outcomes_are_not_corrected(self) -> None:
        for outcome, type in (("missed", MISSED), ("blocked", BLOCKED),
                              ("answered", INCOMING)):
            result = plan(STATE, listing(entry(101, type, "09:00")),
                          [recorded("fb-a", "09:00:20", outcome, rang=1)], RULES)
            self.assertEqual(result.corrections, (), outcome)


class StateTests(SynchronousTestCase):
    def test_active_entries_are_never_passed(self) -> None:
        listed = listing(entry(101, MISSED, "09:00"), entry(102, ACTIVE_INCOMING, "09:01"),
                         entry(103, MISSED, "09:02"), entry(104, ACTIVE_OUTGOING, "09:03"))
        result = plan(STATE, listed, [], RULES)
        self.assertEqual([r.entry_id for r in result.recoveries], [101])
        self.assertEqual((result.state.last_id, result.held_back), (101, 3))
        # Once the call is over, the next run takes it and what followed.
        listed = listing(entry(102, INCOMING, "09:01", duration=60),
                         entry(103, MISSED, "09:02"), entry(104, OUTGOING, "09:03"))
        result = plan(result.state, listed, [], RULES)
        self.assertEqual([r.entry_id for r in result.recoveries], [102, 103, 104])
        self.assertEqual(result.state.last_id, 104)

    def test_nothing_new_keeps_the_id_and_takes_the_timestamp(self) -> None:
        result = plan(STATE, listing(timestamp=1234), [], RULES)
        self.assertEqual(result.state, ListState(100, 1234))
        self.assertFalse(result.writes)

    def test_a_reset_is_a_newest_id_below_the_stored_one(self) -> None:
        self.assertTrue(was_reset(STATE, listing(entry(3, MISSED, "09:00"))))
        self.assertFalse(was_reset(STATE, listing(entry(101, MISSED, "09:00"))))
        self.assertFalse(was_reset(STATE, listing()))
        self.assertFalse(was_reset(None, listing(entry(3, MISSED, "09:00"))))

    def test_a_reset_list_that_grew_past_the_stored_id_is_a_reset_too(self) -> None:
        grown = [entry(n, MISSED, "09:00") for n in range(1, 103)]
        self.assertTrue(was_reset(STATE, listing(*grown, timestamp=2000)))
        # The same list under the stored timestamp: the box sent what was asked for.
        self.assertFalse(was_reset(STATE, listing(*grown[100:], timestamp=900)))
        self.assertFalse(was_reset(STATE, listing(*grown[100:], timestamp=2000)))

    def test_a_reset_list_is_matched_by_time_alone(self) -> None:
        # The old list's entries 100 and 101 were linked; the new list starts at 1.
        calls = [recorded("fb-a", "09:00:20", "missed", list_id=100),
                 recorded("fb-office-list-2603020905-101", "09:05:00", "missed", list_id=101)]
        listed = listing(entry(1, MISSED, "09:00"), entry(2, MISSED, "09:05"),
                         entry(3, MISSED, "09:10"))
        result = plan(ListState(101, 900), listed, calls, RULES, reset=True)
        self.assertTrue(result.reset)
        self.assertEqual(result.links, (("fb-a", 1), ("fb-office-list-2603020905-101", 2)))
        self.assertEqual([r.started.call_id for r in result.recoveries],
                         ["fb-office-list-2603020910-3"])
        self.assertEqual(result.state, ListState(3, 1000))


    def test_after_a_reset_an_unmatched_entry_the_old_list_had_is_not_recovered(self) -> None:
        calls = [recorded("fb-a", "09:00:20", "missed", list_id=100)]
        listed = listing(entry(1, MISSED, "08:00"), entry(2, MISSED, "09:00"),
                         entry(3, MISSED, "11:00"))
        result = plan(ListState(101, 900), listed, calls, RULES, reset=True,
                      reset_since=utc("10:00:00"))
        self.assertEqual(result.links, (("fb-a", 2),))
        self.assertEqual([r.entry_id for r in result.recoveries], [3])
        self.assertEqual((result.too_old, result.state), (1, ListState(3, 1000)))


class BaselineTests(SynchronousTestCase):
    def test_a_first_run_recovers_nothing_older_than_itself(self) -> None:
        listed = listing(entry(1, MISSED, "08:00", day=1), entry(2, MISSED, "09:00"),
                         entry(3, MISSED, "10:00"), entry(4, INCOMING, "10:05", duration=60))
        calls = [recorded("fb-seen", "10:05:10", None)]
        result = plan(None, listed, calls, RULES, baseline_since=utc("09:30:00"))
        self.assertTrue(result.baseline)
        self.assertEqual(result.too_old, 2)
        self.assertEqual([r.entry_id for r in result.recoveries], [3])
        self.assertEqual(result.links, (("fb-seen", 4),))
        self.assertEqual([f.ended.call_id for f in result.finishes], ["fb-seen"])
        self.assertEqual(result.state, ListState(4, 1000))

    def test_a_first_run_stops_at_an_active_entry_too(self) -> None:
        listed = listing(entry(1, MISSED, "08:00"), entry(2, ACTIVE_INCOMING, "09:00"))
        result = plan(None, listed, [], RULES, baseline_since=utc("09:30:00"))
        self.assertEqual(result.state, ListState(1, 1000))
        self.assertEqual(result.recoveries, ())


class RangeTests(SynchronousTestCase):
    def test_the_recorded_calls_read_cover_every_window(self) -> None:
        found = time_range([entry(1, MISSED, "09:00"), entry(2, MISSED, "10:00")], ATHENS)
        self.assertEqual(found, (utc("08:59:00"), utc("10:02:00")))
        self.assertIsNone(time_range([], ATHENS))
