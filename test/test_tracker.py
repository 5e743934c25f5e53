"""The CallMonitor parser and the call tracker, with plain data: every field, every bad
line, and every scenario of fritzbox.md sections 4, 5 and 8."""

from __future__ import annotations

from datetime import UTC, datetime
from zoneinfo import ZoneInfo

from twisted.trial.unittest import SynchronousTestCase

from dpvoip.core.call_log import ended_notes
from dpvoip.core.happenings import Answered, Ended, Forwarded, Happening, Started, Unmatched
from dpvoip.core.outcomes import Detail, Outcome, Reason
from dpvoip.core.texts import Texts
from dpvoip.fritzbox.parser import BadLine, Call, Connect, Disconnect, Ring, parse
from dpvoip.fritzbox.tracker import BoxRules, CallTracker, call_id

ATHENS = ZoneInfo("Europe/Athens")
EN, EL = Texts("en"), Texts("el")


def notes(end: Ended, texts: Texts = EN) -> str:
    """The call's notes as the ingest writes them."""
    return ended_notes(end, texts)


class ParserTests(SynchronousTestCase):
    def test_every_field_of_every_event(self) -> None:
        self.assertEqual(
            parse("17.06.20 10:28:29;RING;0;07191952123;69123;SIP0;"),
            Ring(datetime(2020, 6, 17, 10, 28, 29), 0, "07191952123", "69123", "SIP0"),
        )
        self.assertEqual(
            parse("17.06.20 10:30:57;CALL;1;11;69123;952123;SIP0;"),
            Call(datetime(2020, 6, 17, 10, 30, 57), 1, 11, "69123", "952123", "SIP0"),
        )
        self.assertEqual(
            parse("17.06.20 10:28:43;CONNECT;0;11;07191952123;"),
            Connect(datetime(2020, 6, 17, 10, 28, 43), 0, 11, "07191952123"),
        )
        self.assertEqual(
            parse("17.06.20 10:30:31;DISCONNECT;0;109;"),
            Disconnect(datetime(2020, 6, 17, 10, 30, 31), 0, 109),
        )

    def test_withheld_caller_missing_line_field_and_extra_fields(self) -> None:
        withheld = parse("28.08.10 10:22:07;RING;0;;123;ISDN;")
        assert isinstance(withheld, Ring)
        self.assertEqual((withheld.caller, withheld.line), ("", "ISDN"))
        old_firmware = parse("28.08.06 10:22:07;RING;0;0301234567;123")
        assert isinstance(old_firmware, Ring)
        self.assertEqual(old_firmware.line, "")
        extra = parse("17.06.20 10:30:31;DISCONNECT;0;109;;future;field;")
        self.assertEqual(extra, Disconnect(datetime(2020, 6, 17, 10, 30, 31), 0, 109))
        self.assertEqual(parse("  17.06.20 10:30:31;DISCONNECT;0;0;  "),
                         Disconnect(datetime(2020, 6, 17, 10, 30, 31), 0, 0))

    def test_bad_lines_say_why(self) -> None:
        cases = {
            "": "empty line",
            "hello": "not a CallMonitor line",
            "17.06.20 10:30:31;HANGUP;0;": "unknown event 'HANGUP'",
            "17.06.20 10:30:31;RING;0;123;": "RING needs 4 fields",
            "17.06.20 10:30:31;CALL;0;11;69123;": "CALL needs 5 fields",
            "17.06.20 10:30:31;DISCONNECT;x;0;": "bad connection id 'x'",
            "17.06.20 10:30:31;DISCONNECT;0;-5;": "bad duration '-5'",
            "17.06.20 10:30:31;CONNECT;0;eleven;123;": "bad extension 'eleven'",
            "32.13.20 10:30:31;DISCONNECT;0;0;": "bad time",
            "2020-06-17 10:30:31;DISCONNECT;0;0;": "bad time",
            "17.06.20 10:30:31;DISCONNECT;\u00b2;0;": "bad connection id",
        }
        for line, reason in cases.items():
            with self.assertRaises(BadLine, msg=line) as caught:
                parse(line)
            self.assertIn(reason, str(caught.exception), line)


class Box:
    """A tracker fed with CallMonitor lines, as a box would send them."""

    def __init__(self, own: tuple[str, ...] = ("2107654321", "2107654322")) -> None:
        digits = {n[-6:] for n in own}
        self.tracker = CallTracker(BoxRules(
            "office", ATHENS, is_own_number=lambda n: n[-6:] in digits if n else False,
        ))

    def feed(self, *lines: str) -> list[Happening]:
        happened: list[Happening] = []
        for line in lines:
            happened.extend(self.tracker.feed(parse(line)))
        return happened


def ended(happenings: list[Happening]) -> list[Ended]:
    return [h for h in happenings if isinstance(h, Ended)]


class SampleTests(SynchronousTestCase):
    """The captures of fritzbox.md section 8."""

    def test_incoming_answered_on_dect(self) -> None:
        happened = Box().feed(
            "17.06.20 10:28:29;RING;0;07191952123;69123;SIP0;",
            "17.06.20 10:28:43;CONNECT;0;11;07191952123;",
            "17.06.20 10:30:31;DISCONNECT;0;109;",
        )
        identity = "fb-office-20200617102829-0"
        self.assertEqual(happened, [
            Started(identity, "office", 0, "incoming", "07191952123", "69123", "SIP0", None,
                    datetime(2020, 6, 17, 7, 28, 29, tzinfo=UTC)),
            Answered(identity, 11, datetime(2020, 6, 17, 7, 28, 43, tzinfo=UTC)),
            Ended(identity, Outcome.ANSWERED, 109, datetime(2020, 6, 17, 7, 30, 31, tzinfo=UTC),
                  11),
        ])
        end = happened[-1]
        assert isinstance(end, Ended)
        self.assertEqual(notes(end), "answered on extension 11, talk 1:49")
        self.assertEqual(notes(end, EL), "απαντήθηκε στο εσωτερικό 11, ομιλία 1:49")

    def test_incoming_missed(self) -> None:
        [end] = ended(Box().feed("16.06.20 12:25:42;RING;0;01755290123;732123;SIP1;",
                                 "16.06.20 12:25:46;DISCONNECT;0;0;"))
        self.assertEqual((end.outcome, end.duration, end.detail), (Outcome.MISSED, 0, None))
        self.assertEqual((notes(end), notes(end, EL)), ("missed", "αναπάντητη"))
        self.assertTrue(end.outcome.wants_ticket("incoming"))

    def test_outgoing_attempts_reusing_an_id_then_answered(self) -> None:
        happened = Box().feed(
            "17.06.20 10:30:57;CALL;1;11;69123;952123;SIP0;",
            "17.06.20 10:31:00;DISCONNECT;1;0;",
            "17.06.20 10:32:16;CALL;1;11;69123;952123;SIP0;",
            "17.06.20 10:32:23;CONNECT;1;11;952123;",
            "17.06.20 10:37:34;DISCONNECT;1;312;",
        )
        starts = [h for h in happened if isinstance(h, Started)]
        self.assertEqual([s.call_id for s in starts],
                         ["fb-office-20200617103057-1", "fb-office-20200617103216-1"])
        self.assertEqual({(s.direction, s.remote, s.own_number) for s in starts},
                         {("outgoing", "952123", "69123")})  # the remote is field 5
        self.assertEqual([(e.outcome, e.duration) for e in ended(happened)],
                         [(Outcome.NOT_REACHED, 0), (Outcome.ANSWERED, 312)])
        self.assertFalse(Outcome.NOT_REACHED.wants_ticket("outgoing"))

    def test_withheld_caller_answered_on_isdn(self) -> None:
        happened = Box().feed("28.08.10 10:22:07;RING;0;;123;ISDN;",
                              "28.08.10 10:24:37;CONNECT;0;4;;")
        started, answered = happened
        assert isinstance(started, Started) and isinstance(answered, Answered)
        self.assertEqual((started.remote, started.line, answered.extension), ("", "ISDN", 4))

    def test_answering_machine_takes_the_call(self) -> None:
        [end] = ended(Box().feed("13.09.25 18:08:20;RING;0;01781234567;123;SIP0;",
                                 "13.09.25 18:08:43;CONNECT;0;40;01781234567;",
                                 "13.09.25 18:09:13;DISCONNECT;0;30;"))
        self.assertEqual((end.outcome, end.extension), (Outcome.VOICEMAIL, 40))
        self.assertEqual(notes(end), "voicemail (answering machine 1), message 0:30")
        self.assertEqual(notes(end, EL), "απάντησε ο τηλεφωνητής 1, μήνυμα 0:30")
        self.assertEqual(end.outcome.status, "missed")
        self.assertTrue(end.outcome.wants_ticket("incoming"))


class OutcomeTests(SynchronousTestCase):
    """fritzbox.md section 5."""

    def outcome_of(self, *lines: str) -> Ended:
        [end] = ended(Box().feed(*lines))
        return end

    def test_blocked_is_a_ring_ended_within_the_threshold(self) -> None:
        # Events without arrival times (a replayed capture): the box's span decides alone.
        # With arrivals: test_blocked_by_arrival.
        for seconds, expected in [(0, Outcome.BLOCKED), (1, Outcome.BLOCKED),
                                  (2, Outcome.BLOCKED), (3, Outcome.MISSED)]:
            end = self.outcome_of("01.02.24 10:00:00;RING;0;2101234567;7654321;SIP0;",
                                  f"01.02.24 10:00:0{seconds};DISCONNECT;0;0;")
            self.assertEqual(end.outcome, expected, seconds)
        self.assertEqual(Outcome.BLOCKED.status, "failed")
        self.assertFalse(Outcome.BLOCKED.wants_ticket("incoming"))

    def test_a_redialling_blocked_caller_is_blocked_each_time(self) -> None:
        happened = Box().feed(*[
            line for second in (0, 5, 10) for line in (
                f"01.02.24 10:00:{second:02d};RING;0;2101234567;7654321;SIP0;",
                f"01.02.24 10:00:{second:02d};DISCONNECT;0;0;")
        ])
        self.assertEqual([e.outcome for e in ended(happened)], [Outcome.BLOCKED] * 3)
        self.assertEqual(len({e.call_id for e in ended(happened)}), 3)

    def test_redialling_within_one_second_gets_distinct_stable_ids(self) -> None:
        lines = [line for _ in range(3) for line in (
            "01.02.24 10:00:00;RING;0;2101234567;7654321;SIP0;",
            "01.02.24 10:00:00;DISCONNECT;0;0;")]
        first = [e.call_id for e in ended(Box().feed(*lines))]
        self.assertEqual(first, ["fb-office-20240201100000-0", "fb-office-20240201100000-0-2",
                                 "fb-office-20240201100000-0-3"])
        self.assertEqual([e.call_id for e in ended(Box().feed(*lines))], first)

    def test_fax(self) -> None:
        end = self.outcome_of("01.02.24 10:00:00;RING;0;2101234567;7654321;SIP0;",
                              "01.02.24 10:00:05;CONNECT;0;5;2101234567;",
                              "01.02.24 10:01:05;DISCONNECT;0;60;")
        self.assertEqual((end.outcome, end.outcome.status), (Outcome.FAX, "completed"))
        self.assertFalse(end.outcome.wants_ticket("incoming"))

    def test_answered_is_completed_with_its_talk_time(self) -> None:
        end = self.outcome_of("01.02.24 10:00:00;RING;0;2101234567;7654321;SIP0;",
                              "01.02.24 10:00:05;CONNECT;0;21;2101234567;",
                              "01.02.24 10:05:05;DISCONNECT;0;300;")
        self.assertEqual((end.outcome.status, end.duration, end.extension),
                         ("completed", 300, 21))


class ConnectionIdTests(SynchronousTestCase):
    """fritzbox.md section 4."""

    def test_parallel_calls_and_call_waiting_live_apart(self) -> None:
        happened = Box().feed(
            "01.02.24 10:00:00;RING;0;2101111111;7654321;SIP0;",
            "01.02.24 10:00:03;CONNECT;0;11;2101111111;",
            "01.02.24 10:00:10;RING;1;2102222222;7654321;SIP0;",   # call waiting
            "01.02.24 10:00:11;CALL;2;12;7654322;2103333333;SIP1;",  # someone else dials
            "01.02.24 10:00:20;DISCONNECT;1;0;",
            "01.02.24 10:00:25;CONNECT;2;12;2103333333;",
            "01.02.24 10:01:00;DISCONNECT;0;57;",
            "01.02.24 10:02:00;DISCONNECT;2;95;",
        )
        outcomes = {e.call_id: e.outcome for e in ended(happened)}
        self.assertEqual(outcomes, {
            "fb-office-20240201100000-0": Outcome.ANSWERED,
            "fb-office-20240201100010-1": Outcome.MISSED,
            "fb-office-20240201100011-2": Outcome.ANSWERED,
        })

    def test_a_ring_on_an_open_id_closes_the_old_call_as_interrupted(self) -> None:
        happened = Box().feed(
            "01.02.24 10:00:00;RING;0;2101111111;7654321;SIP0;",
            "01.02.24 10:05:00;RING;0;2102222222;7654321;SIP0;",  # the DISCONNECT was lost
        )
        first_end, second_start = happened[1:]
        assert isinstance(first_end, Ended) and isinstance(second_start, Started)
        self.assertEqual(first_end.call_id, "fb-office-20240201100000-0")
        self.assertEqual(first_end.outcome, Outcome.INTERRUPTED)
        self.assertEqual(first_end.detail, Detail(Reason.ID_REUSED))
        self.assertEqual(notes(first_end), "interrupted: DISCONNECT lost, id reused")
        self.assertEqual(second_start.remote, "2102222222")
        self.assertEqual(Outcome.INTERRUPTED.status, "failed")

    def test_a_call_on_a_ringing_id_is_the_box_forwarding_it(self) -> None:
        happened = Box().feed(
            "01.02.24 10:00:00;RING;0;2101111111;7654321;SIP0;",
            "01.02.24 10:00:04;CALL;0;0;7654321;6971234567;SIP0;",
            "01.02.24 10:00:09;CONNECT;0;0;6971234567;",
            "01.02.24 10:02:09;DISCONNECT;0;120;",
        )
        starts = [h for h in happened if isinstance(h, Started)]
        self.assertEqual(len(starts), 1, "the forwarded leg is not a new outgoing call")
        self.assertIn(Forwarded("fb-office-20240201100000-0", "6971234567",
                                datetime(2024, 2, 1, 8, 0, 4, tzinfo=UTC)), happened)
        [end] = ended(happened)
        self.assertEqual(end.outcome, Outcome.ANSWERED)
        self.assertEqual(end.detail, Detail(Reason.FORWARDED, "6971234567"))
        self.assertEqual(notes(end), "answered on extension 0: forwarded to 6971234567, talk 2:00")
        self.assertEqual(notes(end, EL),
                         "απαντήθηκε στο εσωτερικό 0: προωθήθηκε στο 6971234567, ομιλία 2:00")

    def test_a_second_connect_is_a_transfer(self) -> None:
        happened = Box().feed(
            "01.02.24 10:00:00;RING;0;2101111111;7654321;SIP0;",
            "01.02.24 10:00:03;CONNECT;0;11;2101111111;",
            "01.02.24 10:00:30;CONNECT;0;12;2101111111;",
            "01.02.24 10:01:00;DISCONNECT;0;57;",
        )
        answers = [h for h in happened if isinstance(h, Answered)]
        self.assertEqual([(a.extension, a.transfer) for a in answers], [(11, False), (12, True)])
        self.assertEqual(notes(ended(happened)[0]), "answered on extension 12, talk 0:57")

    def test_a_hairpin_call_is_one_call(self) -> None:
        happened = Box().feed(
            "01.02.24 10:00:00;CALL;0;11;2107654321;2107654322;SIP0;",
            "01.02.24 10:00:01;RING;1;2107654321;7654322;SIP1;",
            "01.02.24 10:00:04;CONNECT;1;12;2107654321;",
            "01.02.24 10:00:04;CONNECT;0;11;2107654322;",
            "01.02.24 10:01:04;DISCONNECT;1;60;",
            "01.02.24 10:01:04;DISCONNECT;0;60;",
        )
        starts = [h for h in happened if isinstance(h, Started)]
        self.assertEqual(len(starts), 1)
        self.assertTrue(starts[0].hairpin)
        [end] = ended(happened)
        self.assertEqual((end.outcome, end.duration), (Outcome.ANSWERED, 60))
        self.assertEqual(end.detail, Detail(Reason.HAIRPIN))
        self.assertEqual(notes(end),
                         "answered on extension 11: internal call to an own number, talk 1:00")

    def test_events_of_ids_never_seen_are_handed_on(self) -> None:
        happened = Box().feed("01.02.24 10:00:03;CONNECT;3;11;2101111111;",
                              "01.02.24 10:01:00;DISCONNECT;4;57;")
        self.assertEqual([(type(h), h.kind, h.conn_id) for h in happened
                          if isinstance(h, Unmatched)],
                         [(Unmatched, "CONNECT", 3), (Unmatched, "DISCONNECT", 4)])

    def test_closing_all_ends_every_open_call_as_interrupted(self) -> None:
        box = Box()
        box.feed("01.02.24 10:00:00;RING;0;2101111111;7654321;SIP0;",
                 "01.02.24 10:00:10;CALL;1;11;7654321;2102222222;SIP0;")
        at = datetime(2024, 2, 1, 8, 5, tzinfo=UTC)
        closed = box.tracker.close_all(Reason.LINK_LOST, at)
        self.assertEqual([(e.call_id, e.outcome, notes(e)) for e in ended(closed)], [
            ("fb-office-20240201100000-0", Outcome.INTERRUPTED,
             "interrupted: monitor connection lost"),
            ("fb-office-20240201100010-1", Outcome.INTERRUPTED,
             "interrupted: monitor connection lost"),
        ])
        self.assertEqual([notes(e, EL) for e in ended(closed)],
                         ["διακόπηκε: χάθηκε η σύνδεση με το τηλεφωνικό κέντρο"] * 2)
        self.assertEqual(box.tracker.open_calls, 0)
        self.assertEqual(box.tracker.close_all(Reason.LINK_LOST, at), [])


class TimeTests(SynchronousTestCase):
    def test_box_time_is_read_in_the_box_zone(self) -> None:
        box = Box()
        winter = box.tracker.utc(datetime(2024, 1, 15, 12, 0))
        summer = box.tracker.utc(datetime(2024, 7, 15, 12, 0))
        self.assertEqual(winter, datetime(2024, 1, 15, 10, 0, tzinfo=UTC))
        self.assertEqual(summer, datetime(2024, 7, 15, 9, 0, tzinfo=UTC))
        # The autumn hour that happens twice: the first one.
        self.assertEqual(box.tracker.utc(datetime(2024, 10, 27, 3, 30)),
                         datetime(2024, 10, 27, 0, 30, tzinfo=UTC))

    def test_call_ids_fit_the_crm_column(self) -> None:
        identity = call_id("a-twenty-char-name-x", datetime(2024, 12, 31, 23, 59, 59), 99)
        self.assertEqual(identity, "fb-a-twenty-char-name-x-20241231235959-99")
        self.assertLessEqual(len(identity), 50)
