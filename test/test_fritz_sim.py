"""The Fritz!Box CallMonitor simulator: its script language, its timing and what a real
TCP client sees (CRLF lines in order and on time, lost events, clean closes, resets,
refused connections, exact raw bytes, ignored keepalives).

Parsing is pure. Timing tests drive the simulator with ``MemoryReactorClock`` and
``StringTransport``s, so delays are exact and instant (the port the simulator holds is a
real one, which the fake reactor never listens on). Live tests use the real reactor on
127.0.0.1 port 0 with delays of a few hundredths of a second, and clean up every port and
connection.
"""

from __future__ import annotations

import itertools
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from zoneinfo import ZoneInfo

from twisted.internet import reactor
from twisted.internet.address import IPv4Address
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.error import (
    CannotListenError,
    ConnectionDone,
    ConnectionLost,
    ConnectionRefusedError,
)
from twisted.internet.protocol import Protocol, connectionDone
from twisted.internet.task import deferLater
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase

from dpvoip.testing.fritzbox import (
    Await,
    Close,
    FritzSimulator,
    Raw,
    Refuse,
    Reset,
    Script,
    ScriptError,
    Send,
    Step,
    box_time,
    expand,
    parse_script,
    payload,
)

REPO = Path(__file__).resolve().parents[1]
ATHENS = ZoneInfo("Europe/Athens")
# 17 June 2025 07:28:29 UTC: 10:28:29 in Athens (summer time, UTC+3).
T0 = datetime(2025, 6, 17, 7, 28, 29, tzinfo=UTC).timestamp()
RING = "{now};RING;0;2101234567;2107654321;SIP0;"


# --- the script language ------------------------------------------------------------------


class ParseTests(SynchronousTestCase):
    def test_lines_comments_and_blank_lines(self) -> None:
        script = parse_script(
            "# a comment\n"
            "\n"
            "   # an indented comment\n"
            "0.5 {now};RING;0;0301234567;69123;SIP0;\n"
            "  2\t{now};DISCONNECT;0;0;   \r\n"
            "0 17.06.20 10:28:43;CALL;1;11;69xxx;952xxx#;SIP0;\n"
        )
        self.assertEqual(script.steps, (
            Step(0.5, Send("{now};RING;0;0301234567;69123;SIP0;"), 4),
            Step(2.0, Send("{now};DISCONNECT;0;0;"), 5),
            Step(0.0, Send("17.06.20 10:28:43;CALL;1;11;69xxx;952xxx#;SIP0;"), 6),
        ))

    def test_empty_script(self) -> None:
        self.assertEqual(parse_script("").steps, ())
        self.assertEqual(parse_script("# nothing\n\n").steps, ())

    def test_directives(self) -> None:
        script = parse_script(
            "1 !close\n"
            "2 !reset\n"
            "0 !refuse 0.3\n"
            "0.25 !await\n"
            "0 !raw abc\n"
            "0 !close   \n"
        )
        self.assertEqual([(s.delay, s.action) for s in script.steps], [
            (1.0, Close()), (2.0, Reset()), (0.0, Refuse(0.3)), (0.25, Await()),
            (0.0, Raw(b"abc")), (0.0, Close()),
        ])

    def test_raw_escapes_and_exact_text(self) -> None:
        def raw(text: str) -> bytes:
            action = parse_script(f"0 !raw {text}").steps[0].action
            assert isinstance(action, Raw)
            return action.data

        self.assertEqual(raw(r"a;b;\r\nc;\n"), b"a;b;\r\nc;\n")
        self.assertEqual(raw(r"back\\slash \\r"), b"back\\slash \\r")
        self.assertEqual(raw(r"tab\there"), b"tab\there")
        self.assertEqual(raw(r"\xff\x00\x7E"), b"\xff\x00\x7e")
        self.assertEqual(raw("trailing  "), b"trailing  ")
        self.assertEqual(raw("  leading"), b"  leading")
        self.assertEqual(raw("Αθήνα"), "Αθήνα".encode())
        self.assertEqual(raw(r"\r\n"), b"\r\n")

    def test_duration(self) -> None:
        script = parse_script("1.5 x;\n0 !refuse 2\n0.5 !await\n")
        self.assertEqual(script.duration, 4.0)

    def test_errors_name_the_line(self) -> None:
        cases = [
            ("{now};RING;0;1;2;SIP0;", 1, "not a number of seconds"),
            ("# c\n\n17.06.20 10:28:29;RING;0;1;2;SIP0;", 3, "'17.06.20' is not a number"),
            ("0.5;RING;0;1;2;SIP0;", 1, "not a number of seconds"),
            ("1 x;\n-1 x;", 2, "'-1' must be a finite number of seconds >= 0"),
            ("nan x;", 1, "finite"),
            ("inf x;", 1, "finite"),
            ("0.5", 1, "nothing after the delay '0.5'"),
            ("0.5   \t", 1, "nothing after the delay"),
            ("1 !bogus", 1, "unknown directive '!bogus'"),
            ("1 !", 1, "unknown directive '!'"),
            ("1 !close now", 1, "!close takes no argument, got 'now'"),
            ("1 !reset 2", 1, "!reset takes no argument"),
            ("1 !await x", 1, "!await takes no argument"),
            ("1 !refuse", 1, "!refuse needs the seconds"),
            ("1 !refuse soon", 1, "!refuse time 'soon' is not a number of seconds"),
            ("1 !refuse -3", 1, "!refuse time '-3' must be a finite"),
            ("1 !raw", 1, "!raw needs the text to send"),
            ("1 !raw ", 1, "!raw needs the text to send"),
            ("1 !raw a\\qb", 1, "unknown escape '\\\\q'"),
            ("1 !raw a\\", 1, "unknown escape '\\\\'"),
            ("1 !raw \\xZZ", 1, "unknown escape '\\\\x'"),
            ("1 {now+};RING;", 1, "bad placeholder '{now+}'"),
            ("1 {now+1.5};RING;", 1, "bad placeholder '{now+1.5}'"),
            ("1 {now;RING;", 1, "bad placeholder '{now;RING;'"),
            ("1 {nowish};RING;", 1, "bad placeholder '{nowish}'"),
            ("1 !raw {now*2}", 1, "bad placeholder '{now*2}'"),
        ]
        for text, line, fragment in cases:
            with self.subTest(text=text):
                with self.assertRaises(ScriptError) as caught:
                    parse_script(text)
                self.assertEqual(caught.exception.line, line)
                self.assertTrue(str(caught.exception).startswith(f"line {line}: "),
                                str(caught.exception))
                self.assertIn(fragment, str(caught.exception))

    def test_error_is_a_value_error(self) -> None:
        self.assertRaises(ValueError, parse_script, "x")


class NowTests(SynchronousTestCase):
    def test_box_time_is_local_wall_clock(self) -> None:
        self.assertEqual(box_time(T0, ATHENS), "17.06.25 10:28:29")
        winter = datetime(2025, 1, 5, 23, 59, 59, tzinfo=UTC).timestamp()
        self.assertEqual(box_time(winter, ATHENS), "06.01.25 01:59:59")
        self.assertEqual(box_time(T0, ZoneInfo("Europe/Berlin")), "17.06.25 09:28:29")
        self.assertEqual(box_time(T0 + 0.999, ATHENS), "17.06.25 10:28:29")  # truncated

    def test_placeholders(self) -> None:
        self.assertEqual(expand(b"{now};RING;{now+90};{now-30};{now+0};", T0, ATHENS),
                         b"17.06.25 10:28:29;RING;17.06.25 10:29:59;17.06.25 10:27:59;"
                         b"17.06.25 10:28:29;")
        self.assertEqual(expand(b"no placeholder {x} {NOW}", T0, ATHENS),
                         b"no placeholder {x} {NOW}")

    def test_shift_across_daylight_saving(self) -> None:
        # 30 March 2025, 03:00 in Athens becomes 04:00: a shift counts real seconds.
        before = datetime(2025, 3, 30, 0, 59, 0, tzinfo=UTC).timestamp()
        self.assertEqual(expand(b"{now};{now+120}", before, ATHENS),
                         b"30.03.25 02:59:00;30.03.25 04:01:00")

    def test_payload(self) -> None:
        self.assertEqual(payload(Send(RING), T0, ATHENS),
                         b"17.06.25 10:28:29;RING;0;2101234567;2107654321;SIP0;\r\n")
        self.assertEqual(payload(Raw(b"{now};x\n"), T0, ATHENS), b"17.06.25 10:28:29;x\n")


class ScenarioTests(SynchronousTestCase):
    def test_scenario_files_parse(self) -> None:
        files = sorted((REPO / "etc" / "scenarios").glob("*.txt"))
        self.assertIn("demo.txt", [f.name for f in files])
        for path in files:
            with self.subTest(path=path.name):
                self.assertTrue(parse_script(path.read_text()).steps)

    def test_demo_tells_the_story(self) -> None:
        script = parse_script((REPO / "etc" / "scenarios" / "demo.txt").read_text())
        self.assertTrue(100 <= script.duration <= 150, script.duration)
        lines = []
        for step in script.steps:
            assert isinstance(step.action, Send)
            text = payload(step.action, T0, ATHENS).decode()
            self.assertTrue(text.endswith(";\r\n"), text)
            fields = text[:-2].split(";")
            datetime.strptime(fields[0], "%d.%m.%y %H:%M:%S")
            lines.append((step.delay, fields[1:-1]))
        events = [fields[0] for _, fields in lines]
        self.assertEqual(set(events), {"RING", "CALL", "CONNECT", "DISCONNECT"})
        rings = [fields[2] for _, fields in lines if fields[0] == "RING"]
        self.assertEqual(len(rings) - len(set(rings)), 1)  # one number calls twice
        calls = [fields for _, fields in lines if fields[0] == "CALL"]
        self.assertEqual(calls, [["CALL", "2", "20", "2107654321", "2310555123", "SIP0"]])
        connects = [fields[2] for _, fields in lines if fields[0] == "CONNECT"]
        self.assertIn("40", connects)
        # the blocked call: a DISCONNECT;0 sent with no delay after its RING
        self.assertTrue(any(
            prev[1][0] == "RING" and here == (0.0, ["DISCONNECT", prev[1][1], "0"])
            for prev, here in itertools.pairwise(lines)))


# --- timing, with a fake reactor -------------------------------------------------------


class FakeClient:
    """A client connection made directly on the simulator's factory, over a StringTransport."""

    def __init__(self, fake: MemoryReactorClock, index: int = -1) -> None:
        factory = fake.adoptedPorts[index][2]
        protocol = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
        assert protocol is not None
        self.protocol = protocol
        self.transport = StringTransport()
        self.protocol.makeConnection(self.transport)

    def received(self) -> bytes:
        return bytes(self.transport.value())

    def lose(self) -> None:
        self.protocol.connectionLost(Failure(ConnectionDone()))


def fake_simulator(case: SynchronousTestCase, text: str
                   ) -> tuple[MemoryReactorClock, FritzSimulator]:
    """A simulator on a ``MemoryReactorClock``, listening (on a real port it holds: the
    reactor is given the listening socket and does nothing with it) until the test
    ends."""
    fake = MemoryReactorClock()
    fake.advance(T0)
    simulator = FritzSimulator(fake, parse_script(text))
    simulator.listen()
    case.addCleanup(simulator.stop)
    return fake, simulator


def taken(port: int, host: str = "127.0.0.1") -> bool:
    """Whether another program could not bind ``port`` now (as ``listenTCP`` would)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as other:
        other.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            other.bind((host, port))
        except OSError:
            return True
    return False


class TimingTests(SynchronousTestCase):
    def test_listen(self) -> None:
        fake, simulator = fake_simulator(self, "")
        [(_, family, _)] = fake.adoptedPorts
        self.assertEqual(family, socket.AF_INET)
        self.assertTrue(simulator.listening)
        assert simulator.port is not None
        self.assertTrue(taken(simulator.port))
        self.failureResultOf(simulator.listen(1013), RuntimeError)

    def test_listen_fires_with_the_port(self) -> None:
        fake = MemoryReactorClock()
        simulator = FritzSimulator(fake, Script(()), host="::1")
        port = self.successResultOf(simulator.listen())
        self.addCleanup(simulator.stop)
        self.assertEqual(port, simulator.port)
        self.assertTrue(taken(port, "::1"))
        self.assertEqual(fake.adoptedPorts[0][1], socket.AF_INET6)

    def test_a_port_taken_cannot_be_listened_on(self) -> None:
        with socket.socket() as other:
            other.bind(("127.0.0.1", 0))
            other.listen()
            simulator = FritzSimulator(MemoryReactorClock(), Script(()))
            self.failureResultOf(simulator.listen(other.getsockname()[1]), CannotListenError)
        self.assertFalse(simulator.listening)

    def test_waits_for_a_client_then_keeps_the_delays(self) -> None:
        fake, simulator = fake_simulator(self,
            f"0.5 {RING}\n"
            "1 {now};DISCONNECT;0;0;\n"
        )
        done = simulator.run()
        fake.advance(60)  # nobody connected: nothing is due yet (implicit !await)
        self.assertEqual((simulator.lines_sent, simulator.lines_dropped), (0, 0))
        client = FakeClient(fake)
        self.assertEqual((simulator.connections, simulator.connected), (1, 1))
        fake.advance(0.49)
        self.assertEqual(client.received(), b"")
        fake.advance(0.01)
        self.assertEqual(client.received(),
                         b"17.06.25 10:29:29;RING;0;2101234567;2107654321;SIP0;\r\n")
        self.assertNoResult(done)
        fake.advance(0.99)
        self.assertEqual(simulator.lines_sent, 1)
        fake.advance(0.01)
        self.assertEqual(client.received().split(b"\r\n")[1], b"17.06.25 10:29:30;DISCONNECT;0;0;")
        self.assertEqual((simulator.lines_sent, simulator.lines_dropped), (2, 0))
        self.assertIsNone(self.successResultOf(done))
        self.assertEqual(fake.getDelayedCalls(), [])

    def test_zero_delays_send_at_once_in_order(self) -> None:
        fake, simulator = fake_simulator(self, "0 a;\n0 b;\n0 !raw c")
        client = FakeClient(fake)
        self.successResultOf(simulator.run())
        self.assertEqual(client.received(), b"a;\r\nb;\r\nc")

    def test_every_client_gets_every_line(self) -> None:
        fake, simulator = fake_simulator(self, "1 a;\n")
        first, second = FakeClient(fake), FakeClient(fake)
        done = simulator.run()
        fake.advance(1)
        self.successResultOf(done)
        self.assertEqual((first.received(), second.received()), (b"a;\r\n", b"a;\r\n"))
        self.assertEqual((simulator.lines_sent, simulator.connections), (1, 2))

    def test_lines_without_clients_are_dropped(self) -> None:
        fake, simulator = fake_simulator(self, "1 a;\n0 !close\n1 b;\n1 c;\n0 !await\n1 d;\n")
        first = FakeClient(fake)
        done = simulator.run()
        fake.advance(1)
        self.assertTrue(first.transport.disconnecting)
        self.assertFalse(first.transport.disconnected)  # a clean close, not an abort
        self.assertEqual(simulator.connected, 0)
        first.lose()
        fake.pump([1, 1])  # one step at a time: Clock runs chained calls from the end time
        self.assertEqual((simulator.lines_sent, simulator.lines_dropped), (1, 2))
        self.assertNoResult(done)
        second = FakeClient(fake)
        fake.advance(1)
        self.successResultOf(done)
        self.assertEqual((first.received(), second.received()), (b"a;\r\n", b"d;\r\n"))
        self.assertEqual((simulator.lines_sent, simulator.lines_dropped), (2, 2))
        self.assertEqual(simulator.connections, 2)

    def test_reset_aborts(self) -> None:
        fake, simulator = fake_simulator(self, "1 !reset\n")
        client = FakeClient(fake)
        done = simulator.run()
        fake.advance(1)
        self.successResultOf(done)
        self.assertTrue(client.transport.disconnected)  # StringTransport's abort mark
        self.assertEqual(simulator.connected, 0)

    def test_reset_waits_for_the_lines_before_it_to_be_written(self) -> None:
        fake, simulator = fake_simulator(self, "0 a;\n0 b;\n0 !reset\n")
        client = FakeClient(fake)
        done = simulator.run()
        self.assertEqual(client.received(), b"a;\r\nb;\r\n")
        self.assertFalse(client.transport.disconnected)  # not yet: not known written
        self.assertNoResult(done)
        assert client.transport.producer is not None
        client.transport.producer.resumeProducing()  # the transport: all written
        self.successResultOf(done)
        self.assertTrue(client.transport.disconnected)
        self.assertEqual(simulator.connected, 0)

    def test_refuse_stops_listening_then_listens_on_the_same_port(self) -> None:
        fake, simulator = fake_simulator(self, "1 !refuse 5\n0 !await\n0 a;\n")
        client = FakeClient(fake)
        done = simulator.run()
        fake.advance(1)
        self.assertTrue(client.transport.disconnecting)
        self.assertFalse(simulator.listening)
        client.lose()
        fake.advance(4.9)
        self.assertEqual(len(fake.adoptedPorts), 1)
        assert simulator.port is not None
        self.assertTrue(taken(simulator.port), "the port is held while refusing")
        fake.advance(0.1)
        self.assertTrue(simulator.listening)
        self.assertEqual(len(fake.adoptedPorts), 2)
        self.assertNoResult(done)
        again = FakeClient(fake)
        self.successResultOf(done)
        self.assertEqual(again.received(), b"a;\r\n")

    def test_keepalives_are_read_and_ignored(self) -> None:
        fake, simulator = fake_simulator(self, "1 a;\n")
        client = FakeClient(fake)
        done = simulator.run()
        client.protocol.dataReceived(b"\n")
        client.protocol.dataReceived(b"\n\n")
        fake.advance(1)
        self.successResultOf(done)
        self.assertEqual(client.received(), b"a;\r\n")
        self.assertEqual(simulator.bytes_received, 3)

    def test_stop_ends_the_play_and_closes(self) -> None:
        fake, simulator = fake_simulator(self, "10 a;\n")
        client = FakeClient(fake)
        done = simulator.run()
        stopped = simulator.stop()
        self.assertIsNone(self.successResultOf(done))
        self.assertFalse(simulator.listening)
        self.assertTrue(client.transport.disconnecting)
        self.assertNoResult(stopped)
        client.lose()
        self.successResultOf(stopped)
        self.assertEqual(fake.getDelayedCalls(), [])
        self.assertEqual(simulator.lines_sent + simulator.lines_dropped, 0)

    def test_stop_while_awaiting_a_client(self) -> None:
        _, simulator = fake_simulator(self, "1 a;\n")
        done = simulator.run()
        self.successResultOf(simulator.stop())
        self.assertIsNone(self.successResultOf(done))

    def test_stop_aborts_clients_that_do_not_go(self) -> None:
        fake, simulator = fake_simulator(self, "")
        client = FakeClient(fake)
        stopped = simulator.stop()
        fake.advance(1.9)
        self.assertFalse(client.transport.disconnected)
        fake.advance(0.1)
        self.assertTrue(client.transport.disconnected)
        client.lose()
        self.successResultOf(stopped)

    def test_stop_during_a_refusal_does_not_listen_again(self) -> None:
        fake, simulator = fake_simulator(self, "0 !refuse 5\n1 a;\n")
        client = FakeClient(fake)
        done = simulator.run()
        client.lose()
        self.successResultOf(simulator.stop())
        self.successResultOf(done)
        fake.advance(10)
        self.assertFalse(simulator.listening)
        self.assertEqual(len(fake.adoptedPorts), 1)
        assert simulator.port is not None
        self.assertFalse(taken(simulator.port), "stopped: the port is given back")

    def test_cancelling_run_stops_the_play_only(self) -> None:
        fake, simulator = fake_simulator(self, "1 a;\n")
        client = FakeClient(fake)
        done = simulator.run()
        done.cancel()
        self.failureResultOf(done, CancelledError)
        fake.advance(5)
        self.assertEqual(client.received(), b"")
        self.assertTrue(simulator.listening)
        self.assertEqual(fake.getDelayedCalls(), [])
        simulator.run()  # it can be played again
        fake.advance(1)
        self.assertEqual(client.received(), b"a;\r\n")

    def test_cancelling_run_during_a_refusal_listens_again(self) -> None:
        fake, simulator = fake_simulator(self, "0 !refuse 5\n")
        client = FakeClient(fake)
        done = simulator.run()
        client.lose()
        self.assertFalse(simulator.listening)
        done.cancel()
        self.failureResultOf(done, CancelledError)
        self.assertTrue(simulator.listening)
        self.assertEqual(fake.getDelayedCalls(), [])

    def test_run_misuse(self) -> None:
        simulator = FritzSimulator(MemoryReactorClock(), Script(()))
        self.assertRaises(RuntimeError, simulator.run)
        simulator.listen()
        self.addCleanup(simulator.stop)
        simulator.run()
        self.assertRaises(RuntimeError, simulator.run)

    def test_unknown_time_zone(self) -> None:
        self.assertRaises(KeyError, FritzSimulator, MemoryReactorClock(), Script(()),
                          "Europe/Atlantis")


# --- live, over TCP on loopback -------------------------------------------------------------


class Client(Protocol):
    """Collects what the box sends, with arrival times; records how the connection ended."""

    def __init__(self) -> None:
        self.chunks: list[tuple[float, bytes]] = []
        self.lost: Deferred[None] = Deferred()
        self.reason: Failure | None = None

    def dataReceived(self, data: bytes) -> None:
        self.chunks.append((reactor.seconds(), data))

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.reason = reason
        self.lost.callback(None)

    async def ended(self) -> Failure:
        """How the connection ended, once it has."""
        await self.lost
        assert self.reason is not None
        return self.reason

    @property
    def data(self) -> bytes:
        return b"".join(chunk for _, chunk in self.chunks)

    def line_times(self) -> list[tuple[float, bytes]]:
        """Each CRLF-terminated line with the time its last byte arrived."""
        lines, buffer = [], b""
        for at, chunk in self.chunks:
            buffer += chunk
            while b"\r\n" in buffer:
                line, buffer = buffer.split(b"\r\n", 1)
                lines.append((at, line))
        return lines


async def until(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    """Poll ``condition`` on the real reactor; fail after ``timeout`` seconds."""
    deadline = reactor.seconds() + timeout
    while not condition():
        if reactor.seconds() > deadline:
            raise AssertionError("condition not met in time")
        await deferLater(reactor, 0.01)


class LiveTests(TestCase):
    timeout = 20

    async def start(self, text: str) -> tuple[FritzSimulator, int]:
        simulator = FritzSimulator(reactor, parse_script(text))
        port = await simulator.listen(0)
        self.addCleanup(simulator.stop)
        return simulator, port

    async def connect(self, port: int) -> Client:
        client = Client()
        await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port, timeout=5), client)

        def close() -> Deferred[None] | None:
            if client.reason is not None:
                return None
            assert client.transport is not None
            client.transport.loseConnection()
            return client.lost

        self.addCleanup(close)
        return client

    async def test_lines_arrive_in_order_with_crlf_and_delays(self) -> None:
        simulator, port = await self.start(
            f"0.05 {RING}\n"
            "0.05 {now};CONNECT;0;11;2101234567;\n"
            "0.1 {now};DISCONNECT;0;0;\n"
            "0 !close\n"
        )
        done = simulator.run()
        client = await self.connect(port)
        started = reactor.seconds()
        reason = await client.ended()
        await done
        self.assertTrue(reason.check(ConnectionDone))
        lines = client.line_times()
        self.assertEqual(client.data.count(b"\r\n"), 3)
        self.assertTrue(client.data.endswith(b";\r\n"))
        self.assertEqual([line.split(b";")[1] for _, line in lines],
                         [b"RING", b"CONNECT", b"DISCONNECT"])
        times = [started] + [at for at, _ in lines]
        gaps = [later - earlier for earlier, later in itertools.pairwise(times)]
        self.assertGreaterEqual(gaps[1], 0.04)
        self.assertGreaterEqual(gaps[2], 0.09)  # (a busy machine only makes gaps longer)
        stamp = datetime.strptime(lines[0][1].split(b";")[0].decode(), "%d.%m.%y %H:%M:%S")
        now = datetime.now(ATHENS).replace(tzinfo=None)
        self.assertLess(abs((now - stamp).total_seconds()), 60)
        self.assertEqual((simulator.lines_sent, simulator.lines_dropped), (3, 0))
        self.assertEqual((simulator.connections, simulator.connected), (1, 0))

    async def test_lines_while_nobody_is_connected_are_lost(self) -> None:
        simulator, port = await self.start(
            "0.02 first;\n"
            "0 !close\n"
            "0.05 lost one;\n"
            "0.05 lost two;\n"
            "0 !await\n"
            "0 last;\n"
            "0 !close\n"
        )
        done = simulator.run()
        first = await self.connect(port)
        await first.ended()
        await until(lambda: simulator.lines_dropped == 2)
        second = await self.connect(port)
        await second.ended()
        await done
        self.assertEqual((first.data, second.data), (b"first;\r\n", b"last;\r\n"))
        self.assertEqual((simulator.lines_sent, simulator.lines_dropped), (2, 2))
        self.assertEqual(simulator.connections, 2)

    async def test_close_is_clean(self) -> None:
        simulator, port = await self.start("0.02 a;\n0.02 !close\n")
        done = simulator.run()
        client = await self.connect(port)
        reason = await client.ended()
        await done
        self.assertTrue(reason.check(ConnectionDone), reason)
        self.assertEqual(client.data, b"a;\r\n")
        await until(lambda: simulator.connected == 0)

    async def reset_by(self, script: str) -> bytes:
        """What a client read before the script's ``!reset`` aborted its connection."""
        simulator, port = await self.start(script)
        done = simulator.run()
        client = await self.connect(port)
        reason = await client.ended()
        await done
        self.assertTrue(reason.check(ConnectionLost), reason)
        self.assertFalse(reason.check(ConnectionDone), reason)
        return client.data

    async def test_reset_aborts(self) -> None:
        self.assertEqual(await self.reset_by("0.02 a;\n0.1 !reset\n"), b"a;\r\n")

    async def test_refuse_then_listen_again(self) -> None:
        simulator, port = await self.start(
            "0.02 !refuse 0.3\n"
            "0 !await\n"
            "0 back;\n"
            "0 !close\n"
        )
        done = simulator.run()
        first = await self.connect(port)
        self.assertTrue((await first.ended()).check(ConnectionDone))
        await until(lambda: not simulator.listening)
        await deferLater(reactor, 0.02)  # the listening socket closes one turn later
        with self.assertRaises(ConnectionRefusedError):
            await self.connect(port)
        self.assertTrue(taken(port), "refusing, the box still holds its port")
        attempts = 1
        while True:
            attempts += 1
            try:
                second = await self.connect(port)
                break
            except ConnectionRefusedError:  # (for ever: the test's timeout ends it)
                await deferLater(reactor, 0.05)
        await second.ended()
        await done
        self.assertGreater(attempts, 2)  # refused for a while, not just once
        self.assertEqual(second.data, b"back;\r\n")
        self.assertEqual(simulator.connections, 2)
        self.assertTrue(simulator.listening)

    async def test_reset_right_after_lines_delivers_them_first(self) -> None:
        self.assertEqual(await self.reset_by("0 a;\n0 b;\n0 !reset\n"), b"a;\r\nb;\r\n")

    async def test_raw_delivers_exact_bytes(self) -> None:
        simulator, port = await self.start(
            "0.02 !raw lf;only;\\n\n"
            "0.05 !raw half a \n"
            "0.05 !raw line;\\r\\n\n"
            "0.05 !raw one;\\r\\ntwo;\\r\\n\\r\\n\n"
            "0.05 !raw \\xff\\\\;\n"
            "0.05 !raw {now};RING;\\n\n"
            "0.02 !close\n"
        )
        done = simulator.run()
        client = await self.connect(port)
        await client.ended()
        await done
        self.assertTrue(re.fullmatch(
            rb"lf;only;\nhalf a line;\r\none;\r\ntwo;\r\n\r\n\xff\\;"
            rb"\d\d\.\d\d\.\d\d \d\d:\d\d:\d\d;RING;\n", client.data), client.data)
        self.assertEqual(simulator.lines_sent, 6)

    async def test_keepalives_from_the_client_are_fine(self) -> None:
        simulator, port = await self.start("0.1 a;\n0.1 b;\n0 !close\n")
        done = simulator.run()
        client = await self.connect(port)
        assert client.transport is not None
        for _ in range(5):
            client.transport.write(b"\n")
            await deferLater(reactor, 0.02)
        reason = await client.ended()
        await done
        self.assertTrue(reason.check(ConnectionDone))
        self.assertEqual(client.data, b"a;\r\nb;\r\n")
        self.assertEqual(simulator.bytes_received, 5)

    async def test_stop_closes_clients_and_the_port(self) -> None:
        simulator, port = await self.start("10 never;\n")
        done = simulator.run()
        client = await self.connect(port)
        await until(lambda: simulator.connected == 1)
        await simulator.stop()
        await done
        self.assertTrue((await client.ended()).check(ConnectionDone))
        with self.assertRaises(ConnectionRefusedError):
            await self.connect(port)


# --- the command ---------------------------------------------------------------------


class CommandTests(SynchronousTestCase):
    def sim(self, *args: str) -> tuple[subprocess.Popen[str], int]:
        process = subprocess.Popen(
            [sys.executable, "-m", "dpvoip.cli", "fritz-sim", *args],
            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.addCleanup(self.reap, process)
        assert process.stdout is not None
        first = process.stdout.readline()
        found = re.fullmatch(r"fritz-sim: serving (\S+) on 127\.0\.0\.1:(\d+) "
                             r"\(point dpvoip's \[\[fritzbox\]\] host/port here\)\n", first)
        if found is None:
            process.kill()
            self.fail(f"unexpected first line {first!r}; output: {process.communicate()}")
        return process, int(found[2])

    def reap(self, process: subprocess.Popen[str]) -> None:
        if process.poll() is None:
            process.kill()
        process.communicate(timeout=10)

    def receive_all(self, port: int) -> bytes:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as connection:
            data = b""
            while chunk := connection.recv(4096):
                data += chunk
            return data

    def script(self, text: str) -> str:
        folder = Path(tempfile.mkdtemp(prefix="dpvoip-fritz-sim-"))
        self.addCleanup(shutil.rmtree, folder, ignore_errors=True)
        path = folder / "script.txt"
        path.write_text(text)
        return str(path)

    def test_plays_and_exits_0(self) -> None:
        process, port = self.sim(self.script(f"0.05 {RING}\n0.05 b;\n"), "--port", "0")
        data = self.receive_all(port)
        self.assertEqual(process.wait(timeout=10), 0)
        self.assertTrue(re.fullmatch(rb"\d\d\.\d\d\.\d\d \d\d:\d\d:\d\d;RING;0;2101234567;"
                                     rb"2107654321;SIP0;\r\nb;\r\n", data), data)

    def test_loop_until_sigterm(self) -> None:
        process, port = self.sim(self.script("0.05 a;\n0 !close\n"), "--port", "0", "--loop")
        for _ in range(2):
            self.assertEqual(self.receive_all(port), b"a;\r\n")
        process.send_signal(signal.SIGTERM)
        self.assertEqual(process.wait(timeout=10), 0)

    def test_bad_script(self) -> None:
        result = subprocess.run(
            [sys.executable, "-m", "dpvoip.cli", "fritz-sim", self.script("1 ok;\nbad\n")],
            cwd=REPO, capture_output=True, text=True, timeout=30, check=False)
        self.assertEqual(result.returncode, 2)
        self.assertIn("script.txt: line 2: delay 'bad' is not a number of seconds",
                      result.stderr)

    def test_port_taken(self) -> None:
        # The port stays taken (listening) for the whole run; were it free, the simulator
        # would wait for a client for ever, and the timeout (a hang detector: a cold start
        # on a loaded machine can take many seconds) would fail the test.
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            result = subprocess.run(
                [sys.executable, "-m", "dpvoip.cli", "fritz-sim", self.script("1 a;\n"),
                 "--port", str(taken.getsockname()[1])],
                cwd=REPO, capture_output=True, text=True, timeout=120, check=False)
        self.assertEqual(result.returncode, 1, result.stderr)
        self.assertIn("cannot listen on 127.0.0.1:", result.stderr)
