"""The live events as plain data: the wire's fields, who sees what, Last-Event-ID, the
reload rule and the reader's watermark (commits out of id order)."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta, timezone

from twisted.trial.unittest import SynchronousTestCase

from dpvoip.core.matching import Client, Match, Person
from dpvoip.core.outcomes import Outcome
from dpvoip.live.events import (
    LiveEvent,
    Viewer,
    Watermark,
    call_data,
    client_of,
    last_event_id,
    legs,
    may_see,
    may_watch,
    must_reload,
    page_resume_id,
    reload_frame,
)

AT = datetime(2026, 3, 2, 10, 0, 5, 123456, tzinfo=timezone(timedelta(hours=2)))


def call(legs_: tuple[str, ...] = ("2107654321", "100")) -> LiveEvent:
    return LiveEvent(7, "call", {"call_id": "c"}, legs_)


class DataTests(SynchronousTestCase):
    def test_a_ringing_call_has_every_field_of_the_wire_format(self) -> None:
        match = Match("+306912345678", Client(5, "Papadopoulos AE", ""), None, None, None, 1)
        data = call_data(call_id="fb-1", state="ringing", direction="incoming",
                         number="+306912345678", client=client_of(match), extension=None,
                         box="office", at=AT)
        self.assertEqual(data, {
            "call_id": "fb-1", "state": "ringing", "direction": "incoming",
            "number": "+306912345678", "client": {"id": 5, "name": "Papadopoulos AE"},
            "extension": None, "outcome": None, "status": "active", "duration": None,
            "at": "2026-03-02T08:00:05Z", "box": "office"})

    def test_an_ended_call_carries_outcome_status_and_duration_a_withheld_number_is_empty(
            self) -> None:
        data = call_data(call_id="z", state="ended", direction="incoming", number=None,
                         client=None, extension=100, box="zadarma", at=AT.astimezone(UTC),
                         outcome=Outcome.MISSED, duration=0)
        self.assertEqual((data["number"], data["outcome"], data["status"], data["duration"]),
                         ("", "missed", "missed", 0))

    def test_a_person_without_a_client_is_named_without_an_id(self) -> None:
        lead = Match("+306912345678", None, Person("lead", 9, "Maria K.", None), None, None, 1)
        self.assertEqual(client_of(lead), {"id": None, "name": "Maria K."})
        self.assertIsNone(client_of(None))

    def test_the_frame_is_id_event_one_line_of_json_and_a_blank_line(self) -> None:
        event = LiveEvent(42, "ticket", {"note": "two\nlines", "name": "Παπαδόπουλος"})
        frame = event.frame().decode()
        self.assertTrue(frame.startswith("id: 42\nevent: ticket\ndata: "))
        self.assertTrue(frame.endswith("\n\n"))
        self.assertEqual(frame.count("\n"), 4)  # the newline in the data is escaped
        self.assertEqual(json.loads(frame.split("data: ")[1]),
                         {"note": "two\nlines", "name": "Παπαδόπουλος"})
        self.assertEqual(reload_frame(), b"event: reload\ndata: {}\n\n")

    def test_legs_are_the_digits_of_the_office_side_once_each(self) -> None:
        self.assertEqual(legs("210 765-4321", "SIP0", 11, None, "", "2107654321"),
                         ["2107654321", "0", "11"])


class VisibilityTests(SynchronousTestCase):
    staff = Viewer(1, True)
    anna = Viewer(2, False, frozenset({"100"}))
    desk = Viewer(3, False, frozenset({"302107654321"}))

    def test_staff_see_everything_under_every_policy(self) -> None:
        for policy in ("staff", "everyone-own-calls", "everyone"):
            self.assertTrue(may_watch(self.staff, policy))
            self.assertTrue(may_see(self.staff, call(()), policy))

    def test_a_user_who_is_not_staff_sees_only_calls_on_their_own_numbers(self) -> None:
        policy = "everyone-own-calls"
        self.assertTrue(may_see(self.anna, call(), policy))  # extension 100
        self.assertTrue(may_see(self.desk, call(), policy))  # same last nine digits
        self.assertFalse(may_see(self.anna, call(("2107654321", "101")), policy))
        self.assertFalse(may_see(Viewer(4, False), call(), policy))
        box = LiveEvent(8, "box", {"box": "office", "connected": False})
        self.assertTrue(may_see(Viewer(4, False), box, policy))

    def test_staff_policy_refuses_others_everyone_shows_them_all(self) -> None:
        self.assertFalse(may_watch(self.anna, "staff"))
        self.assertFalse(may_see(self.anna, call(), "staff"))
        self.assertTrue(may_see(Viewer(4, False), call(("999",)), "everyone"))


class LastEventIdTests(SynchronousTestCase):
    def test_the_header_else_the_query_parameter(self) -> None:
        self.assertEqual(last_event_id(b"12", b"5"), 12)
        self.assertEqual(last_event_id(None, b"5"), 5)
        self.assertIsNone(last_event_id(None, None))
        self.assertIsNone(last_event_id(b" ", None))

    def test_anything_but_a_non_negative_integer_is_refused(self) -> None:
        for bad in (b"-1", b"1e3", b"abc", b"9" * 30):
            with self.assertRaises(ValueError):
                last_event_id(bad, None)

    def test_reload_when_the_window_starts_after_the_last_id_seen(self) -> None:
        self.assertFalse(must_reload(10, 5, 20))
        self.assertFalse(must_reload(10, 11, 20))  # 11 is the next: nothing missed
        self.assertTrue(must_reload(10, 12, 20))  # 11 was pruned (or rolled back)
        self.assertFalse(must_reload(20, None, 20))  # all pruned, nothing new since
        self.assertTrue(must_reload(19, None, 20))  # 20 came and went
        self.assertTrue(must_reload(25, 5, 20))  # never issued here: another database


    def test_a_page_resumes_after_the_settled_id_when_the_stream_could(self) -> None:
        self.assertEqual(page_resume_id(15, 5, 20), 15)
        self.assertEqual(page_resume_id(20, None, 20), 20, "all pruned, nothing new since")
        self.assertIsNone(page_resume_id(None, 5, 20), "the feed has settled nothing yet")
        self.assertIsNone(page_resume_id(3, 5, 20), "pruned since: the page would reload")
        self.assertIsNone(page_resume_id(25, 5, 20), "not this database's")


class WatermarkTests(SynchronousTestCase):
    def test_ids_delivered_in_a_row_move_the_mark(self) -> None:
        mark = Watermark(low=10)
        mark.delivered([11, 12, 13], now=0)
        self.assertEqual((mark.low, mark.seen), (13, {}))

    def test_a_late_commit_below_a_delivered_id_is_still_looked_for(self) -> None:
        mark = Watermark(low=10, grace=30)
        mark.delivered([12], now=0)  # 11 is in a transaction still open
        self.assertEqual(mark.low, 10)
        self.assertEqual(mark.fresh([11, 12, 13]), [11, 13])
        mark.delivered([11], now=1)
        self.assertEqual((mark.low, mark.seen), (12, {}))

    def test_a_gap_is_given_up_after_the_grace(self) -> None:
        mark = Watermark(low=10, grace=30)
        mark.delivered([12, 13], now=0)  # 11 was rolled back: it never comes
        mark.settle(now=29)
        self.assertEqual(mark.low, 10)
        mark.settle(now=30)
        self.assertEqual((mark.low, mark.seen), (13, {}))

    def test_memory_is_bounded(self) -> None:
        mark = Watermark(low=0, limit=100)
        mark.delivered(range(2, 1000, 2), now=0)  # every other id missing
        self.assertLessEqual(len(mark.seen), 100)

    def test_a_new_reader_starts_at_the_newest_id(self) -> None:
        mark = Watermark()
        mark.start_at(500)
        self.assertEqual(mark.fresh([499, 500, 501]), [501])
