"""One scenario drives both sides of the simulated box: the CallMonitor port and the
TR-064 call list (issue 16 point 5).

The call book is pure and tested with plain lines and times. The joined simulator runs
on a ``MemoryReactorClock`` (its clients are ``StringTransport``s, the delays exact and
instant), its fake TR-064 box listening for real on 127.0.0.1 port 0 with the Clock as
its clock, so that dpvoip's own ``Tr064Client`` reads the list over the real protocol
(TLS, Digest, the list URL). The command runs in a subprocess on loopback, and its
printed ``[[fritzbox]]`` lines are what the client is built from.
"""

from __future__ import annotations

import datetime as dt
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path
from typing import Any
from unittest import mock
from zoneinfo import ZoneInfo

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase, TestCase

from dpvoip import cli
from dpvoip.config import Secret
from dpvoip.fritzbox.calllist import (
    ACTIVE_INCOMING,
    ACTIVE_OUTGOING,
    BLOCKED,
    INCOMING,
    MISSED,
    OUTGOING,
    ListedCall,
)
from dpvoip.protocols.tr064 import Tr064Client, Tr064Error
from dpvoip.testing.callbook import CallBook, LineSplitter, device_name
from dpvoip.testing.fritzbox import (
    DEMO_PASSWORD,
    STOP_GRACE,
    Alone,
    FritzSimulator,
    ListAs,
    ListReset,
    ListSide,
    Quiet,
    ScriptError,
    Tr064Failure,
    config_lines,
    office_box,
    parse_script,
)
from dpvoip.testing.tr064 import FakeTr064Box
from test.test_fritz_sim import FakeClient

REPO = Path(__file__).resolve().parents[1]
ATHENS = ZoneInfo("Europe/Athens")
# 17 June 2025 07:28:29 UTC: 10:28:29 in Athens.
T0 = dt.datetime(2025, 6, 17, 7, 28, 29, tzinfo=dt.UTC).timestamp()
DAY = "17.06.25"
USER, PASSWORD = "office", "Sim-Passw0rd-42"


def at(clock: str) -> dt.datetime:
    """A naive box-local time of 17 June 2025 (``HH:MM``)."""
    hour, minute = clock.split(":")
    return dt.datetime(2025, 6, 17, int(hour), int(minute))


# --- the call book (pure) --------------------------------------------------------------


class CallBookTests(SynchronousTestCase):
    def book(self) -> CallBook:
        return CallBook(ATHENS)

    def play(self, book: CallBook, lines: list[tuple[float, str]]) -> list[tuple[bool, ListedCall]]:
        """Feed ``(seconds after T0, line)``; the entries made, as (final, entry)."""
        made = []
        for offset, line in lines:
            made += [(listing.final, listing.entry) for listing in book.feed(line, T0 + offset)]
        return made

    def test_answered_incoming(self) -> None:
        made = self.play(self.book(), [
            (0, f"{DAY} 10:28:29;RING;0;2101234567;2107654321;SIP0;"),
            (14, f"{DAY} 10:28:43;CONNECT;0;11;2101234567;"),
            (122, f"{DAY} 10:30:31;DISCONNECT;0;109;"),
        ])
        self.assertEqual(made, [
            (False, ListedCall(0, ACTIVE_INCOMING, "2101234567", "2107654321", "",
                               "Mobilteil 2", "11", at("10:28"), 0)),
            (True, ListedCall(0, INCOMING, "2101234567", "2107654321", "", "Mobilteil 2",
                              "11", at("10:28"), 109)),
        ])

    def test_answering_machine_is_type_1_on_its_port(self) -> None:
        for extension, device in (("40", "Anrufbeantworter 1"), ("44", "Anrufbeantworter 5"),
                                  ("6", "Anrufbeantworter")):
            with self.subTest(extension=extension):
                made = self.play(self.book(), [
                    (0, f"{DAY} 18:08:30;RING;0;6987654321;2107654321;SIP0;"),
                    (13, f"{DAY} 18:08:43;CONNECT;0;{extension};6987654321;"),
                    (40, f"{DAY} 18:09:10;DISCONNECT;0;27;"),
                ])
                final = made[-1][1]
                self.assertEqual((final.type, final.port, final.device, final.duration_seconds),
                                 (INCOMING, extension, device, 27))
                self.assertTrue(final.by_machine())

    def test_missed_and_blocked_by_play_time(self) -> None:
        cases = [(4.0, MISSED), (1.0, MISSED), (0.99, BLOCKED), (0.0, BLOCKED)]
        for rang, expected in cases:
            with self.subTest(rang=rang):
                made = self.play(self.book(), [
                    (0, f"{DAY} 12:25:42;RING;0;6912345678;2107654321;SIP1;"),
                    (rang, f"{DAY} 12:25:42;DISCONNECT;0;0;"),
                ])
                self.assertEqual(made, [(True, ListedCall(
                    0, expected, "6912345678", "2107654321", "", "", "", at("12:25"), 0))])

    def test_marks_overrule_the_timing(self) -> None:
        book = self.book()
        book.mark(0, "missed")          # before the RING: the next call on id 0
        made = self.play(book, [(0, f"{DAY} 12:00:00;RING;0;1;2;SIP0;"),
                                (0.2, f"{DAY} 12:00:00;DISCONNECT;0;0;")])
        self.assertEqual(made[0][1].type, MISSED)
        made = self.play(book, [(10, f"{DAY} 12:00:10;RING;0;1;2;SIP0;")])
        book.mark(0, "blocked")         # while it rings
        made = self.play(book, [(25, f"{DAY} 12:00:25;DISCONNECT;0;0;")])
        self.assertEqual(made[0][1].type, BLOCKED)
        # a mark is used once
        made = self.play(book, [(30, f"{DAY} 12:00:30;RING;0;1;2;SIP0;"),
                                (30.1, f"{DAY} 12:00:30;DISCONNECT;0;0;")])
        self.assertEqual(made[0][1].type, BLOCKED)   # by its timing
        self.assertRaises(ValueError, book.mark, 0, "answered")

    def test_a_mark_does_not_change_an_answered_call(self) -> None:
        book = self.book()
        book.mark(1, "blocked")
        made = self.play(book, [(0, f"{DAY} 12:00:00;RING;1;1;2;SIP0;"),
                                (3, f"{DAY} 12:00:03;CONNECT;1;20;1;"),
                                (9, f"{DAY} 12:00:09;DISCONNECT;1;6;")])
        self.assertEqual(made[-1][1].type, INCOMING)

    def test_outgoing_reached_and_not(self) -> None:
        made = self.play(self.book(), [
            (0, f"{DAY} 10:30:57;CALL;1;11;2107654321;2310555123#;SIP0;"),
            (3, f"{DAY} 10:31:00;DISCONNECT;1;0;"),
            (79, f"{DAY} 10:32:16;CALL;1;20;2107654321;2310555123;SIP0;"),
            (86, f"{DAY} 10:32:23;CONNECT;1;20;2310555123;"),
            (397, f"{DAY} 10:37:34;DISCONNECT;1;312;"),
        ])
        self.assertEqual(made, [
            (True, ListedCall(0, OUTGOING, "2310555123", "2107654321", "", "Mobilteil 2",
                              "11", at("10:30"), 0)),
            (False, ListedCall(0, ACTIVE_OUTGOING, "2310555123", "2107654321", "",
                               "IP-Telefon 1", "20", at("10:32"), 0)),
            (True, ListedCall(0, OUTGOING, "2310555123", "2107654321", "", "IP-Telefon 1",
                              "20", at("10:32"), 312)),
        ])

    def test_each_call_has_its_own_key_and_ids_are_reused(self) -> None:
        book = self.book()
        first = book.feed(f"{DAY} 12:00:00;RING;0;1;2;SIP0;", T0) + book.feed(
            f"{DAY} 12:00:05;CONNECT;0;10;1;", T0 + 5)
        second = book.feed(f"{DAY} 12:00:06;RING;1;3;2;SIP0;", T0 + 6)
        self.assertEqual(book.open_ids, [0, 1])
        ends = book.feed(f"{DAY} 12:00:09;DISCONNECT;0;4;", T0 + 9) + book.feed(
            f"{DAY} 12:00:10;RING;0;5;2;SIP0;", T0 + 10)
        self.assertEqual(second, [])
        self.assertEqual([listing.key for listing in first + ends], [1, 1])
        self.assertEqual(book.open_ids, [0, 1])

    def test_a_new_call_on_an_open_id_ends_the_old_one(self) -> None:
        made = self.play(self.book(), [
            (0, f"{DAY} 12:00:00;RING;0;2101234567;2107654321;SIP0;"),
            (5, f"{DAY} 12:00:05;CONNECT;0;11;2101234567;"),
            (65, f"{DAY} 12:01:05;RING;0;6912345678;2107654321;SIP0;"),   # DISCONNECT lost
        ])
        self.assertEqual(made[-1], (True, ListedCall(0, INCOMING, "2101234567", "2107654321",
                                                     "", "Mobilteil 2", "11", at("12:00"), 60)))

    def test_a_call_on_a_ringing_id_is_the_box_forwarding_it(self) -> None:
        made = self.play(self.book(), [
            (0, f"{DAY} 12:00:00;RING;0;6912345678;2107654321;SIP0;"),
            (2, f"{DAY} 12:00:02;CALL;0;4;2107654321;6900000000;SIP1;"),
            (9, f"{DAY} 12:00:09;CONNECT;0;4;6900000000;"),
            (30, f"{DAY} 12:00:30;DISCONNECT;0;21;"),
        ])
        self.assertEqual([(final, entry.type, entry.remote, entry.port)
                          for final, entry in made],
                         [(False, ACTIVE_INCOMING, "6912345678", ""),
                          (True, INCOMING, "6912345678", "")])

    def test_what_the_box_did_not_start_here_and_noise_are_ignored(self) -> None:
        book = self.book()
        for line in (f"{DAY} 12:00:00;CONNECT;3;11;1;", f"{DAY} 12:00:01;DISCONNECT;3;5;",
                     f"{DAY} 12:00:02;HANGUP;0;", f"{DAY} 12:00:03;RING;x;1;2;SIP0;",
                     f"{DAY} 12:00:04;RING;", "", "garbage", ";;;;;;"):
            self.assertEqual(book.feed(line, T0), [], line)
        self.assertEqual(book.open_ids, [])

    def test_old_firmware_and_a_bad_date(self) -> None:
        # no line field; a date that does not parse: the play time, in the box's zone
        made = self.play(self.book(), [
            (0, "31.13.25 99:00:00;RING;0;2101234567;2107654321;"),
            (3, f"{DAY} 10:28:32;DISCONNECT;0;0;extra;"),
        ])
        self.assertEqual(made, [(True, ListedCall(0, MISSED, "2101234567", "2107654321", "",
                                                  "", "", at("10:28"), 0))])

    def test_device_names(self) -> None:
        self.assertEqual([device_name(code) for code in
                          ("0", "2", "4", "5", "10", "19", "20", "40", "49", "6", "99", "x")],
                         ["FON 1", "FON 3", "ISDN", "Fax", "Mobilteil 1", "Mobilteil 10",
                          "IP-Telefon 1", "Anrufbeantworter 1", "Anrufbeantworter 10",
                          "Anrufbeantworter", "", ""])

    def test_line_splitter(self) -> None:
        splitter = LineSplitter()
        self.assertEqual(splitter.push(b"a;RING;\n"), ["a;RING;"])
        self.assertEqual(splitter.push(b"b;RI"), [])
        self.assertEqual(splitter.push(b"NG;\r\nc;\xff;\r\n\r\nd"), ["b;RING;", "c;\ufffd;"])
        self.assertEqual(splitter.push(b";\n"), ["d;"])


# --- the script's list directives -----------------------------------------------------


class DirectiveTests(SynchronousTestCase):
    def test_directives(self) -> None:
        script = parse_script(
            "0 !list-reset\n"
            "1 !list-as 2 blocked\n"
            "0 !list-as 0 missed\n"
            "0 !tr064 fail rights\n"
            "0 !tr064 ok\n"
            "0.5 !quiet 30\n"
            "0 !alone\n"
        )
        self.assertEqual([(step.delay, step.action) for step in script.steps], [
            (0.0, ListReset()), (1.0, ListAs(2, "blocked")), (0.0, ListAs(0, "missed")),
            (0.0, Tr064Failure("rights")), (0.0, Tr064Failure(None)), (0.5, Quiet(30.0)),
            (0.0, Alone()),
        ])
        self.assertEqual(script.duration, 1.5)  # a quiet spell takes no time of its own

    def test_errors_name_the_line(self) -> None:
        cases = [
            ("1 !list-reset now", "!list-reset takes no argument"),
            ("1 !alone 3", "!alone takes no argument"),
            ("1 !list-as", "!list-as needs a connection id and one of blocked, missed"),
            ("1 !list-as 0", "!list-as needs a connection id"),
            ("1 !list-as x blocked", "!list-as connection id 'x' is not a number"),
            ("1 !list-as 0 answered", "got 'answered'"),
            ("1 !list-as 0 blocked twice", "got '0 blocked twice'"),
            ("1 !tr064", "!tr064 takes 'ok' or 'fail <kind>'"),
            ("1 !tr064 fail", "!tr064 takes 'ok' or 'fail <kind>'"),
            ("1 !tr064 fail boom", "unknown failure 'boom' (known: auth, rights, locked"),
            ("1 !tr064 ok now", "!tr064 takes 'ok' or 'fail <kind>'"),
            ("1 !quiet", "!quiet needs the seconds"),
            ("1 !quiet -1", "!quiet time '-1' must be a finite number"),
            ("1 !listreset", "unknown directive '!listreset'"),
        ]
        for text, fragment in cases:
            with self.subTest(text=text):
                with self.assertRaises(ScriptError) as caught:
                    parse_script("0 a;\n" + text)
                self.assertEqual(caught.exception.line, 2)
                self.assertIn(fragment, str(caught.exception))

    def test_the_example_scenario(self) -> None:
        script = parse_script((REPO / "etc" / "scenarios" / "away-and-back.txt").read_text())
        actions = [step.action for step in script.steps]
        self.assertIn(Alone(), actions)
        alone = actions.index(Alone())
        self.assertGreater(len(actions), alone + 10)  # calls between !alone and !await


# --- the joined simulator, on a Clock ----------------------------------------------------


def joined(case: SynchronousTestCase, text: str, box: FakeTr064Box | None = None,
           **options: Any) -> tuple[MemoryReactorClock, FritzSimulator, FakeTr064Box | None]:
    """A simulator on a ``MemoryReactorClock`` with a fake box whose clock is the same
    (the box does not listen unless the test makes it)."""
    fake = MemoryReactorClock()
    fake.advance(T0)
    if box is None and options.pop("with_box", True):
        box = office_box(fake, USER, PASSWORD, tls=False)
    simulator = FritzSimulator(fake, parse_script(text), box=box, **options)
    simulator.listen()
    case.addCleanup(simulator.stop)
    return fake, simulator, box


ANSWERED = ("1 {now};RING;0;2101234567;2107654321;SIP0;\n"
            "4 {now};CONNECT;0;11;2101234567;\n"
            "20 {now};DISCONNECT;0;20;\n")


class JoinTests(SynchronousTestCase):
    def test_a_call_is_listed_5_s_after_its_disconnect(self) -> None:
        fake, simulator, box = joined(self, ANSWERED)
        assert box is not None
        FakeClient(fake)
        done = simulator.run()
        fake.pump([1, 4])
        self.assertEqual([(call.id, call.type) for call in box.calls], [(1, ACTIVE_INCOMING)])
        fake.advance(20)
        self.successResultOf(done)                  # the play is over; the list is not
        self.assertEqual(simulator.pending_entries, 1)
        fake.advance(4.99)
        self.assertEqual([(call.id, call.type) for call in box.calls], [(1, ACTIVE_INCOMING)])
        fake.advance(0.01)
        self.assertEqual(box.calls, [ListedCall(1, INCOMING, "2101234567", "2107654321", "",
                                                "Mobilteil 2", "11", at("10:28"), 20)])
        self.assertEqual((simulator.pending_entries, fake.getDelayedCalls()), (0, []))

    def test_the_delay_is_settable(self) -> None:
        fake, simulator, box = joined(self, ANSWERED, list_delay=0.5)
        assert box is not None
        FakeClient(fake)
        simulator.run()
        fake.pump([1, 4, 20, 0.49])
        self.assertEqual(box.calls[0].type, ACTIVE_INCOMING)
        fake.advance(0.01)
        self.assertEqual(box.calls[0].type, INCOMING)

    def test_calls_nobody_heard_are_listed(self) -> None:
        fake, simulator, box = joined(self, "0 !alone\n" + ANSWERED + (
            "2 {now};RING;1;6912345678;2107654321;SIP0;\n"
            "6 {now};DISCONNECT;1;0;\n"
            "0 !await\n"
            "1 {now};RING;1;2109998887;2107654321;SIP0;\n"
            "0 {now};DISCONNECT;1;0;\n"))
        assert box is not None
        first = FakeClient(fake)
        done = simulator.run()
        first.lose()                                # dpvoip stopped
        fake.pump([1, 4, 20, 2, 6])
        self.assertEqual((simulator.lines_sent, simulator.lines_dropped), (0, 5))
        second = FakeClient(fake)                   # and back
        fake.advance(1)
        self.successResultOf(done)
        self.assertEqual(second.received().count(b"\r\n"), 2)
        fake.advance(5)
        self.assertEqual([(call.id, call.type, call.remote) for call in box.calls], [
            (1, INCOMING, "2101234567"), (2, MISSED, "6912345678"), (3, BLOCKED, "2109998887")])

    def test_quiet_lines_reach_no_client_but_the_list(self) -> None:
        fake, simulator, box = joined(self, "0 !quiet 10\n" + ANSWERED)
        assert box is not None
        client = FakeClient(fake)
        simulator.run()
        fake.pump([1, 4, 20, 5])
        self.assertEqual(client.received(), b"20.06.25 10:28:54;DISCONNECT;0;20;\r\n"
                         .replace(b"20.06.25", DAY.encode()))   # after 10 s: sent again
        self.assertEqual((simulator.lines_sent, simulator.lines_dropped), (1, 2))
        self.assertEqual(box.calls[0].type, INCOMING)

    def test_list_as_makes_the_box_disagree(self) -> None:
        fake, simulator, box = joined(self, (
            "0 !list-as 1 missed\n"
            "1 {now};RING;1;6912345678;2107654321;SIP0;\n"
            "0.3 {now};DISCONNECT;1;0;\n"
            "1 {now};RING;1;2109998887;2107654321;SIP0;\n"
            "1 !list-as 1 blocked\n"
            "3 {now};DISCONNECT;1;0;\n"))
        assert box is not None
        FakeClient(fake)
        simulator.run()
        fake.pump([1, 0.3, 1, 1, 3, 5])
        self.assertEqual([call.type for call in box.calls], [MISSED, BLOCKED])

    def test_list_reset(self) -> None:
        fake, simulator, box = joined(self, (
            "1 {now};RING;1;6912345678;2107654321;SIP0;\n"
            "5 {now};DISCONNECT;1;0;\n"
            "1 {now};RING;0;2101234567;2107654321;SIP0;\n"
            "1 {now};CONNECT;0;11;2101234567;\n"
            "5 !list-reset\n"
            "1 {now};CALL;2;20;2107654321;2310555123;SIP0;\n"
            "1 {now};DISCONNECT;2;0;\n"
            "1 {now};DISCONNECT;0;9;\n"))
        assert box is not None
        FakeClient(fake)
        simulator.run()
        fake.pump([1, 5, 1, 1])
        stamp = box.timestamp
        self.assertEqual([(c.id, c.type) for c in box.calls], [(1, ACTIVE_INCOMING)])
        fake.advance(5)                    # the missed call's entry and the reset
        self.assertEqual(box.calls, [])
        self.assertNotEqual(box.timestamp, stamp)
        fake.pump([1, 1, 1, 5])
        # ids restart at 1; the call that was active across the reset is listed anew
        self.assertEqual([(c.id, c.type, c.remote) for c in box.calls],
                         [(1, OUTGOING, "2310555123"), (2, INCOMING, "2101234567")])

    def test_an_active_entry_survives_a_reset_made_on_the_box(self) -> None:
        fake, simulator, box = joined(self, ANSWERED)
        assert box is not None
        FakeClient(fake)
        simulator.run()
        fake.pump([1, 4])
        fake.advance(1)
        box.reset()
        box.call(MISSED, "1", at("10:00"))          # id 1 again, another call
        fake.pump([19, 5])
        self.assertEqual([(c.id, c.type, c.remote) for c in box.calls],
                         [(1, MISSED, "1"), (2, INCOMING, "2101234567")])

    def test_tr064_failures(self) -> None:
        fake, simulator, box = joined(self, "1 !tr064 fail locked\n1 !tr064 ok\n")
        assert box is not None
        FakeClient(fake)
        simulator.run()
        fake.advance(1)
        self.assertEqual(box.failure, "locked")
        fake.advance(1)
        self.assertIsNone(box.failure)

    def test_without_a_box_the_list_directives_do_nothing(self) -> None:
        fake, simulator, _ = joined(self, "0 !list-reset\n0 !tr064 fail auth\n"
                                          "0 !list-as 0 missed\n" + ANSWERED,
                                    with_box=False)
        client = FakeClient(fake)
        done = simulator.run()
        fake.pump([1, 4, 20])
        self.successResultOf(done)
        self.assertEqual(client.received().count(b"\r\n"), 3)
        self.assertEqual(fake.getDelayedCalls(), [])

    def test_raw_lines_are_followed_too(self) -> None:
        fake, simulator, box = joined(self, (
            "1 !raw {now};RING;0;2101234567;2107\n"
            "0.5 !raw 654321;SIP0;\\r\\n{now};DISCONNECT;0;0;\\n\n"))
        assert box is not None
        FakeClient(fake)
        simulator.run()
        fake.pump([1, 0.5, 5])
        self.assertEqual([(c.type, c.own_number) for c in box.calls], [(BLOCKED, "2107654321")])

    def test_stop_cancels_the_entries_not_listed_yet(self) -> None:
        fake, simulator, box = joined(self, ANSWERED)
        FakeClient(fake)
        simulator.run()
        fake.pump([1, 4, 20])
        self.assertEqual(simulator.pending_entries, 1)
        simulator.stop()
        fake.advance(10)
        self.assertEqual(simulator.pending_entries, 0)
        assert box is not None
        self.assertEqual([call.type for call in box.calls], [ACTIVE_INCOMING])


# --- end to end: the real client reads what the scenario left -------------------------


OFFICE = """\
# dpvoip connected: answered on DECT 11
1 {now};RING;0;2101234567;2107654321;SIP0;
8 {now};CONNECT;0;11;2101234567;
50 {now};DISCONNECT;0;50;
# dpvoip stopped
0 !alone
# missed, 8 s of ringing
20 {now};RING;1;6912345678;2107654321;SIP0;
8 {now};DISCONNECT;1;0;
# the answering machine, 30 s message
20 {now};RING;0;6987654321;2107654321;SIP0;
15 {now};CONNECT;0;40;6987654321;
30 {now};DISCONNECT;0;30;
# blocked
20 {now};RING;1;2109998887;2107654321;SIP0;
0.2 {now};DISCONNECT;1;0;
# outgoing, 65 s of talk
20 {now};CALL;2;20;2107654321;2310555123;SIP0;
5 {now};CONNECT;2;20;2310555123;
65 {now};DISCONNECT;2;65;
# dpvoip back
0 !await
5 {now};RING;1;2105556667;2107654321;SIP0;
7 {now};DISCONNECT;1;0;
"""


def stopped(fake: MemoryReactorClock, simulator: FritzSimulator,
            clients: list[FakeClient]) -> Deferred[None]:
    """Stop a simulator on a fake clock: its clients (``StringTransport``s) are aborted
    after the grace time and then told that their connection is gone."""
    done = simulator.stop()
    fake.advance(STOP_GRACE)
    for client in clients:
        client.lose()
    return done


class EndToEndTests(TestCase):
    timeout = 120

    async def office(self, tls: bool = True) -> tuple[MemoryReactorClock, FritzSimulator,
                                                      FakeTr064Box]:
        """The scenario played on a Clock; its box's TR-064 side listening for real."""
        fake = MemoryReactorClock()
        fake.advance(T0)
        box = office_box(reactor, USER, PASSWORD, tls=tls, clock=fake)
        await box.listen()
        self.addCleanup(box.stop)
        simulator = FritzSimulator(fake, parse_script(OFFICE), box=box)
        clients: list[FakeClient] = []
        simulator.listen()
        self.addCleanup(stopped, fake, simulator, clients)
        first = FakeClient(fake)
        done = simulator.run()
        fake.pump([1, 8, 50])
        first.lose()
        fake.pump([20, 8, 20, 15, 30, 20, 0.2, 20, 5, 65])
        back = FakeClient(fake)
        clients.append(back)
        fake.pump([5, 7])
        self.successResultOf(done)
        self.assertEqual(back.received().count(b"\r\n"), 2)
        self.assertEqual(first.received().count(b"\r\n"), 3)
        self.assertEqual(simulator.lines_dropped, 10)
        return fake, simulator, box

    def client(self, box: FakeTr064Box, password: str = PASSWORD) -> Tr064Client:
        assert box.port is not None
        return Tr064Client(reactor, "127.0.0.1", box.port, USER, Secret(password),
                           tls=box.tls, pinned=box.fingerprint if box.tls else None)

    async def test_the_list_holds_every_call_heard_or_not(self) -> None:
        fake, _, box = await self.office()
        listed = await self.client(box).call_list()
        self.assertEqual(listed.timestamp, box.timestamp)
        self.assertEqual(listed.skipped, 0)
        # newest first; the last DISCONNECT's entry is still 5 s away: the list has the
        # calls up to the outgoing one
        self.assertEqual([(c.id, c.type, c.remote, c.own_number, c.port, c.device,
                           c.date, c.duration_seconds) for c in listed.calls], [
            (5, OUTGOING, "2310555123", "2107654321", "20", "IP-Telefon 1", at("10:31"), 120),
            (4, BLOCKED, "2109998887", "2107654321", "", "", at("10:31"), 0),
            (3, INCOMING, "6987654321", "2107654321", "40", "Anrufbeantworter 1",
             at("10:30"), 60),
            (2, MISSED, "6912345678", "2107654321", "", "", at("10:29"), 0),
            (1, INCOMING, "2101234567", "2107654321", "11", "Mobilteil 2", at("10:28"), 60),
        ])
        fake.advance(5)
        newer = await self.client(box).call_list(since=(5, listed.timestamp))
        self.assertEqual([(c.id, c.type, c.remote) for c in newer.calls],
                         [(6, MISSED, "2105556667")])

    async def test_an_active_call_is_listed_while_it_runs(self) -> None:
        fake = MemoryReactorClock()
        fake.advance(T0)
        box = office_box(reactor, USER, PASSWORD, tls=False, clock=fake)
        await box.listen()
        self.addCleanup(box.stop)
        simulator = FritzSimulator(fake, parse_script(ANSWERED), box=box)
        clients: list[FakeClient] = []
        simulator.listen()
        self.addCleanup(stopped, fake, simulator, clients)
        clients.append(FakeClient(fake))
        simulator.run()
        fake.pump([1, 4])
        listed = await self.client(box).call_list()
        self.assertEqual([(c.id, c.type, c.active) for c in listed.calls],
                         [(1, ACTIVE_INCOMING, True)])
        fake.pump([20, 5])
        listed = await self.client(box).call_list()
        self.assertEqual([(c.id, c.type, c.active) for c in listed.calls],
                         [(1, INCOMING, False)])

    async def test_a_reset_and_a_failure_scripted(self) -> None:
        fake = MemoryReactorClock()
        fake.advance(T0)
        box = office_box(reactor, USER, PASSWORD, tls=False, clock=fake)
        await box.listen()
        self.addCleanup(box.stop)
        simulator = FritzSimulator(fake, parse_script(
            ANSWERED + "6 !list-reset\n0 !tr064 fail rights\n1 !tr064 ok\n"), box=box)
        clients: list[FakeClient] = []
        simulator.listen()
        self.addCleanup(stopped, fake, simulator, clients)
        clients.append(FakeClient(fake))
        simulator.run()
        fake.pump([1, 4, 20, 5])
        before = await self.client(box).call_list()
        self.assertEqual(len(before.calls), 1)
        fake.advance(1)
        with self.assertRaises(Tr064Error) as caught:
            await self.client(box).call_list()
        self.assertEqual(caught.exception.kind, "rights")
        fake.advance(1)
        after = await self.client(box).call_list(since=(1, before.timestamp))
        self.assertEqual(after.calls, ())
        self.assertNotEqual(after.timestamp, before.timestamp)


# --- the command ---------------------------------------------------------------------


class ArgumentTests(SynchronousTestCase):
    def parsed(self, *args: str) -> dict[str, Any]:
        with mock.patch("dpvoip.testing.fritzbox.serve", return_value=0) as serve:
            self.assertEqual(cli.main(["fritz-sim", "s.txt", *args]), 0)
        [(positional, named)] = [(c.args, c.kwargs) for c in serve.call_args_list]
        self.assertEqual(positional, ("s.txt", 1012, "127.0.0.1", "Europe/Athens"))
        return dict(named)

    def test_without_tr064(self) -> None:
        self.assertEqual(self.parsed(), {"loop": False, "tr064": None})

    def test_defaults(self) -> None:
        self.assertEqual(self.parsed("--tr064-port", "0")["tr064"],
                         ListSide(0, "dpvoip", DEMO_PASSWORD, tls=True, delay=5.0))

    def test_everything_given(self) -> None:
        self.assertEqual(self.parsed("--tr064-port", "49000", "--tr064-user", "u",
                                     "--tr064-password", "p w", "--no-tls",
                                     "--list-delay", "0.5")["tr064"],
                         ListSide(49000, "u", "p w", tls=False, delay=0.5))

    def test_refused(self) -> None:
        cases = [
            (["--no-tls"], "need --tr064-port"),
            (["--tr064-user", "u"], "need --tr064-port"),
            (["--list-delay", "1"], "need --tr064-port"),
            (["--tr064-port", "70000"], "70000 is not a port number"),
            (["--tr064-port", "x"], "'x' is not a port number"),
            (["--tr064-port", "0", "--list-delay", "-1"], "not between 0 and 3600"),
            (["--tr064-port", "0", "--list-delay", "soon"], "not a number of seconds"),
        ]
        for args, fragment in cases:
            with self.subTest(args=args):
                with mock.patch("sys.stderr") as stderr, \
                        mock.patch("dpvoip.testing.fritzbox.serve") as serve, \
                        self.assertRaises(SystemExit) as caught:
                    cli.main(["fritz-sim", "s.txt", *args])
                self.assertEqual(caught.exception.code, 2)
                written = "".join(str(c.args[0]) for c in stderr.write.call_args_list)
                self.assertIn(fragment, written)
                serve.assert_not_called()

    def test_the_password_stays_out_of_messages(self) -> None:
        side = ListSide(0, "u", "Very-Secret-1")
        self.assertNotIn("Very-Secret-1", repr(side) + str(side))
        lines = "\n".join(config_lines("127.0.0.1", 1012, side, 49443, "ab" * 32))
        self.assertNotIn("Very-Secret-1", lines)
        self.assertIn("# tr064_password = the --tr064-password given (not shown)", lines)
        demo = tomllib.loads("\n".join(config_lines(
            "127.0.0.1", 1012, ListSide(0), 49000, None)))["fritzbox"][0]
        self.assertEqual(demo, {"host": "127.0.0.1", "port": 1012, "tr064_user": "dpvoip",
                                "tr064_password": DEMO_PASSWORD, "tr064_tls": True,
                                "tr064_port": 49000})


class CommandTests(TestCase):
    timeout = 120

    def start(self, text: str, *args: str) -> tuple[subprocess.Popen[str], list[str]]:
        folder = Path(tempfile.mkdtemp(prefix="dpvoip-fritz-sim-tr064-"))
        self.addCleanup(shutil.rmtree, folder, ignore_errors=True)
        (folder / "script.txt").write_text(text)
        process = subprocess.Popen(
            [sys.executable, "-m", "dpvoip.cli", "fritz-sim", str(folder / "script.txt"),
             "--port", "0", "--tr064-port", "0", *args],
            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.addCleanup(self.reap, process)
        assert process.stdout is not None
        lines: list[str] = []
        while not lines or not lines[-1].startswith("tr064_certificate"):  # the last
            line = process.stdout.readline()
            if not line:
                self.fail(f"the command ended: {lines}, {process.communicate()}")
            lines.append(line.rstrip("\n"))
        return process, lines

    def reap(self, process: subprocess.Popen[str]) -> None:
        if process.poll() is None:
            process.kill()
        process.communicate(timeout=10)

    async def test_serves_the_port_and_the_list(self) -> None:
        process, lines = self.start(
            "0 !list-as 0 missed\n"
            "0 {now};RING;0;6912345678;2107654321;SIP0;\n"
            "0.05 {now};DISCONNECT;0;0;\n"
            "0.05 {now};CALL;1;20;2107654321;2310555123;SIP0;\n"
            "0.05 {now};CONNECT;1;20;2310555123;\n"
            "0.05 {now};DISCONNECT;1;61;\n", "--tr064-user", "office",
            "--list-delay", "0.05")
        found = re.fullmatch(r"fritz-sim: serving \S+ on 127\.0\.0\.1:(\d+) \(point dpvoip's "
                             r"\[\[fritzbox\]\] host/port here\)", lines[0])
        assert found is not None, lines
        shown = re.fullmatch(r"fritz-sim: TR-064 on 127\.0\.0\.1:(\d+) over TLS, certificate "
                             r"SHA-256 ([0-9a-f]{64}); a call is listed 0\.05 s after its "
                             r"DISCONNECT", lines[1])
        assert shown is not None, lines
        self.assertEqual(lines[2], "fritz-sim: dpvoip's configuration for this box:")
        config = tomllib.loads("\n".join(lines[3:]))["fritzbox"][0]
        self.assertEqual(config, {
            "host": "127.0.0.1", "port": int(found[1]), "tr064_user": "office",
            "tr064_password": DEMO_PASSWORD, "tr064_tls": True,
            "tr064_port": int(shown[1]), "tr064_certificate": shown[2]})
        with socket.create_connection(("127.0.0.1", config["port"]), timeout=30) as port:
            received = b""
            while received.count(b"\r\n") < 5:
                chunk = port.recv(4096)
                self.assertTrue(chunk, received)
                received += chunk
        assert process.stdout is not None
        for line in process.stdout:                 # the box says when it lists a call
            if line.startswith("fritz-sim: call list: entry 2 type 3 "):
                break
        client = Tr064Client(reactor, config["host"], config["tr064_port"],
                             config["tr064_user"], Secret(config["tr064_password"]),
                             tls=config["tr064_tls"], pinned=config["tr064_certificate"])
        calls = (await client.call_list()).calls
        self.assertEqual([(c.type, c.remote, c.duration_seconds) for c in calls],
                         [(OUTGOING, "2310555123", 120), (MISSED, "6912345678", 0)])
        self.assertIsNone(process.poll())          # still serving the list
        process.send_signal(signal.SIGTERM)
        self.assertEqual(process.wait(timeout=30), 0)

