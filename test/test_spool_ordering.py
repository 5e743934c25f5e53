"""What a new event must wait behind during a replay (``spool.ordering``), as plain data."""

from __future__ import annotations

from datetime import UTC, datetime

from twisted.trial.unittest import SynchronousTestCase

from dpvoip.core.happenings import Answered, Ended, Started, Unmatched
from dpvoip.core.outcomes import Outcome
from dpvoip.spool.ordering import happening_keys, number_key, zadarma_keys

AT = datetime(2026, 1, 5, 10, 0, tzinfo=UTC)


class OrderingKeysTests(SynchronousTestCase):
    def test_one_number_however_it_is_written(self) -> None:
        self.assertEqual({number_key(n) for n in ("2101234567", "+30 210 123 4567",
                                                  "00302101234567", "302101234567")},
                         {"n:101234567"})
        self.assertNotEqual(number_key("2101234567"), number_key("2101234568"))
        self.assertEqual(number_key(""), "n:", "withheld callers wait for each other")

    def test_a_start_holds_its_call_and_its_number(self) -> None:
        start = Started("c1", "office", 0, "incoming", "06912345678", "7654321", "SIP0",
                        None, AT)
        self.assertEqual(happening_keys(start, {}), ("c:c1", "n:912345678"))

    def test_an_end_needs_the_number_of_its_start_for_its_ticket(self) -> None:
        end = Ended("c1", Outcome.MISSED, 0, AT, None)
        self.assertEqual(happening_keys(end, {"c1": "06912345678"}),
                         ("c:c1", "n:912345678"))
        self.assertIsNone(happening_keys(end, {}), "a start never seen: cannot be told")

    def test_an_answer_holds_only_its_call(self) -> None:
        self.assertEqual(happening_keys(Answered("c1", 11, AT), {}), ("c:c1",))

    def test_a_call_found_in_the_database_cannot_be_told(self) -> None:
        self.assertIsNone(happening_keys(
            Unmatched("office", 3, AT, AT.replace(tzinfo=None), "DISCONNECT"), {}))

    def test_a_zadarma_event_holds_its_call_the_caller_and_the_destination(self) -> None:
        self.assertEqual(zadarma_keys("in_1", {"caller_id": "+306912345678",
                                               "called_did": "302107654321"}, False),
                         ("zd:in_1", "n:912345678"))
        self.assertEqual(zadarma_keys("out_1", {"internal": "100",
                                                "destination": "2101234567"}, True),
                         ("zd:out_1", "n:101234567"))

    def test_the_extension_that_answered_an_incoming_call_holds_nothing_back(self) -> None:
        """NOTIFY_ANSWER names the office's extension (or number) as its destination,
        which every answered call shares."""
        answer = {"event": "NOTIFY_ANSWER", "caller_id": "+306912345678",
                  "destination": "100", "call_start": "2026-01-15 10:00:00"}
        self.assertEqual(zadarma_keys("in_1", answer, False), ("zd:in_1", "n:912345678"))


    def test_an_outgoing_calls_office_number_holds_nothing_back(self) -> None:
        """NOTIFY_OUT_START/END name the office's CallerID as ``caller_id``: as a key,
        every outgoing call arriving during a replay waited behind all the spooled ones."""
        out = {"event": "NOTIFY_OUT_START", "internal": "100", "caller_id": "302107654321",
               "destination": "2101234567", "call_start": "2026-01-15 10:00:00"}
        self.assertEqual(zadarma_keys("out_1", out, True), ("zd:out_1", "n:101234567"))
        self.assertEqual(zadarma_keys("out_1", {**out, "event": "NOTIFY_OUT_END"}, True),
                         ("zd:out_1", "n:101234567"))

    def test_a_callbacks_legs_hold_both_numbers(self) -> None:
        """A callback's legs are NOTIFY_START/END whose signed string holds caller_id."""
        leg = {"event": "NOTIFY_START", "caller_id": "+306912345678",
               "destination": "2101234567", "calltype": "callback_leg2"}
        self.assertEqual(zadarma_keys("in_1", leg, True),
                         ("zd:in_1", "n:912345678", "n:101234567"))


class ReplayLanesTests(SynchronousTestCase):
    def test_the_replay_leaves_half_the_pool_to_the_calls_that_pass_it(self) -> None:
        from dpvoip.spool.durable import replay_lanes

        self.assertEqual([replay_lanes(n) for n in (1, 2, 3, 4, 6, 8, 64)],
                         [1, 1, 1, 2, 3, 3, 3])
