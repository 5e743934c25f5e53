"""Log lines a person can act on: what a newcomer reads when a box cannot be reached, when
a call ends and when something failed.

Every test here captures the log events themselves (an observer on the global publisher)
and reads them as the text log renders them (``dpvoip.logs.text_line``). Time is a
``Clock`` wherever it matters; the network tests listen on 127.0.0.1, port 0.

* a box that cannot be reached: the reason (name not found, refused, timed out,
  unreachable) with its address, the first failure at once, repeated ones summarised at
  most once a minute with their count, one line when it connects again;
* no ``Starting factory`` / ``Stopping factory`` lines (the box's client, the TR-064 and
  Zadarma HTTP pools), no Twisted ``Scheduling retry`` line;
* floats as people read them, whoever logs them;
* a finished call's line says what became of its ticket and never doubles a word;
* never an empty reason after "failed".
"""

from __future__ import annotations

import errno
import json
import re
from dataclasses import replace
from typing import Any, cast

from treq.client import HTTPClient
from twisted.internet import defer, error, reactor, task
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import HostnameEndpoint, TCP4ServerEndpoint
from twisted.internet.interfaces import IListeningPort, IProtocol, IProtocolFactory
from twisted.internet.protocol import Protocol, ServerFactory, connectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import ILogObserver, LogLevel, globalLogPublisher
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

from dpvoip.config import FritzBoxSettings, Secret
from dpvoip.core.call_log import finished_text, ticket_text
from dpvoip.core.errors import summary
from dpvoip.core.log_budget import Outage, for_people, seconds_text
from dpvoip.fritzbox.box import FritzBox
from dpvoip.fritzbox.service import FritzBoxService, why_not_connected
from dpvoip.logs import ACCESS_FORMAT, json_line, text_line
from dpvoip.protocols.tr064 import Tr064Client, Tr064Error
from dpvoip.reconnecting import retry_policy
from dpvoip.spool.durable import NotRecorded
from dpvoip.zadarma.account import http_pool_and_agent
from test import test_ingest
from test.test_fritzbox import FakeIngest

#: More than three decimals: a float as Python's repr writes it, not as a person would.
LONG_FLOAT = re.compile(r"\d\.\d{4,}")


class LogCapture:
    """Every log event published while a test runs, and the lines the text log makes."""

    def __init__(self, case: SynchronousTestCase) -> None:
        self.events: list[dict[str, Any]] = []
        observer = cast(ILogObserver, self.events.append)
        globalLogPublisher.addObserver(observer)
        case.addCleanup(globalLogPublisher.removeObserver, observer)

    def lines(self, containing: str = "", level: LogLevel = LogLevel.info) -> list[str]:
        """The rendered messages (time and system left out) that contain ``containing``,
        of ``level`` and above (info: what the daemon's log shows by default)."""
        rendered = []
        for event in self.events:
            if event.get("log_level", LogLevel.info) < level:
                continue
            line = text_line(event)
            if line is None:
                continue
            message = line.split("] ", 1)[1].rstrip("\n")
            if containing in message:
                rendered.append(message)
        return rendered

    def clear(self) -> None:
        del self.events[:]


def no_jitter() -> float:
    return 0.2  # retry_policy: a delay of initial * 2**n * 0.8


class FailingEndpoint:
    """An endpoint whose attempts the test fails with a chosen error, or accepts."""

    def __init__(self) -> None:
        self.attempts: list[tuple[Deferred[IProtocol], IProtocolFactory]] = []

    def connect(self, factory: IProtocolFactory) -> Deferred[IProtocol]:
        attempt: Deferred[IProtocol] = Deferred()
        self.attempts.append((attempt, factory))
        return attempt

    def fail(self, reason: BaseException) -> None:
        self.attempts[-1][0].errback(reason)

    def accept(self) -> Any:
        attempt, factory = self.attempts[-1]
        wire: Any = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 1012))
        wire.makeConnection(StringTransport())
        attempt.callback(wire)
        return wire


class BoxConnectionLines(SynchronousTestCase):
    """Why a box connection failed, with its address, at a calm rate (a Clock)."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.logs = LogCapture(self)
        settings = replace(FritzBoxSettings(), name="office", host="fritz.box", port=1012)
        self.box = FritzBox(settings, FakeIngest(), self.clock, frozenset())
        self.endpoint = FailingEndpoint()
        self.service = FritzBoxService(self.box, self.clock, lambda: defer.succeed(None),
                                       endpoint=self.endpoint,
                                       retry=retry_policy(random=no_jitter))
        self.service.startService()
        self.addCleanup(self.service.stopService)

    def fail_and_wait(self, reason: BaseException) -> float:
        """Fail the pending attempt, then let the clock run to the next one."""
        self.endpoint.fail(reason)
        [retry] = self.clock.getDelayedCalls()
        delay = retry.getTime() - self.clock.seconds()
        self.clock.advance(delay)
        return delay

    def test_a_name_that_does_not_resolve_is_said_at_once_with_the_address(self) -> None:
        self.endpoint.fail(error.DNSLookupError("no results for hostname lookup: fritz.box"))
        self.assertEqual(self.logs.lines("box office"), [
            "box office: cannot connect to fritz.box:1012: the name fritz.box is not found "
            "(DNS): check the host, or give the box's IP address; retrying in 0.8 s"])
        [event] = [e for e in self.logs.events if e.get("kind")]
        self.assertEqual(event["log_level"], LogLevel.warn)
        self.assertEqual((event["host"], event["port"], event["kind"]),
                         ("fritz.box", 1012, "name not found"))

    def test_each_reason_is_named(self) -> None:
        reasons: list[tuple[BaseException, str]] = [
            (error.ConnectionRefusedError(), "connection refused: nothing listens on port "
                                             "1012 there (the CallMonitor is off?"),
            (error.TimeoutError(), "no answer (timed out)"),
            (error.TCPTimedOutError(), "no answer (timed out)"),
            (error.NoRouteError(), "network unreachable: no route to fritz.box"),
            (error.ConnectError(errno.EHOSTUNREACH, "No route to host"),
             "network unreachable: no route to fritz.box"),
            (error.UnknownHostError(), "the name fritz.box is not found (DNS)"),
        ]
        for reason, said in reasons:
            self.logs.clear()
            self.fail_and_wait(reason)
            [line] = self.logs.lines("cannot connect")
            self.assertIn(f"cannot connect to fritz.box:1012: {said}", line)
            self.assertRegex(line, r"; retrying in \d+(\.\d)? s$")
            # connected, then lost: the next reason starts a new outage
            self.endpoint.accept().connectionLost(Failure(error.ConnectionDone()))
            [retry] = self.clock.getDelayedCalls()
            self.clock.advance(retry.getTime() - self.clock.seconds())

    def test_an_error_without_text_is_named_by_its_type(self) -> None:
        class Odd(Exception):
            pass

        self.endpoint.fail(Odd())
        [line] = self.logs.lines("cannot connect")
        self.assertIn("cannot connect to fritz.box:1012: Odd;", line)

    def test_an_hour_of_refusals_is_a_line_a_minute_at_most_then_one_when_back(
            self) -> None:
        started = self.clock.seconds()
        failures = 0
        while self.clock.seconds() - started < 3600:
            self.fail_and_wait(error.ConnectionRefusedError())
            failures += 1
        lines = self.logs.lines("connect to fritz.box:1012")
        self.assertGreater(failures, 60, "capped at a minute: about one a minute")
        self.assertEqual(lines[0].split(":")[1], " cannot connect to fritz.box")
        self.assertLessEqual(len(lines), 60 + 1, "at most one line a minute")
        # between lines, at least a minute of the clock: one line per window
        times = [e["log_time"] for e in self.logs.events if e.get("kind") == "refused"]
        self.assertEqual(len(times), len(lines))
        # A summary line says how many attempts failed since the line before.
        summaries = [line for line in lines if line.startswith("box office: still")]
        self.assertTrue(summaries)
        counted = [int(m.group(1)) for m in
                   (re.search(r"\((\d+) failed attempts in the last", s) for s in summaries)
                   if m]
        self.assertEqual(len(counted), len(summaries))
        self.assertEqual(1 + sum(counted), failures, "every failure counted in a line")
        for line in lines:
            self.assertNotRegex(line, LONG_FLOAT)
        self.assertFalse(self.logs.lines("Scheduling retry"), "not Twisted's own line")
        twisted_lines = self.logs.lines("Scheduling retry", LogLevel.debug)
        self.assertEqual(len(twisted_lines), failures, "only at the debug level")
        # Back: one line, with how long it was out.
        self.logs.clear()
        self.endpoint.accept()
        self.assertEqual(self.logs.lines("box office"), [
            f"box office: connected to fritz.box:1012 after {failures} failed attempts in "
            f"{seconds_text(self.clock.seconds() - started)} (the last: refused)"])

    def test_early_retries_of_one_kind_are_held_back_within_the_minute(self) -> None:
        for _ in range(5):  # 0.8 + 1.6 + 3.2 + 6.4 + 12.8 s: all within the first minute
            self.fail_and_wait(error.ConnectionRefusedError())
        self.assertEqual(len(self.logs.lines("connect to fritz.box")), 1)

    def test_another_kind_of_failure_is_said_at_once(self) -> None:
        self.fail_and_wait(error.ConnectionRefusedError())
        self.fail_and_wait(error.ConnectionRefusedError())
        self.fail_and_wait(error.DNSLookupError("no results"))
        lines = self.logs.lines("connect to fritz.box")
        self.assertEqual(len(lines), 2)
        self.assertIn("connection refused", lines[0])
        self.assertIn("not found (DNS)", lines[1])

    def test_after_a_reconnect_the_next_failure_is_said_at_once(self) -> None:
        self.fail_and_wait(error.ConnectionRefusedError())
        wire = self.endpoint.accept()
        self.assertEqual(self.logs.lines("connected to"), [
            "box office: connected to fritz.box:1012 after 1 failed attempts in 0.8 s "
            "(the last: refused)"])
        wire.connectionLost(Failure(error.ConnectionLost()))
        [retry] = self.clock.getDelayedCalls()
        self.clock.advance(retry.getTime() - self.clock.seconds())
        self.logs.clear()
        self.fail_and_wait(error.ConnectionRefusedError())
        self.assertEqual(len(self.logs.lines("cannot connect to fritz.box:1012")), 1)
        self.endpoint.accept()
        self.assertEqual(len(self.logs.lines("connected to fritz.box:1012 again after 1")),
                         1)

    def test_a_first_connection_is_one_plain_line(self) -> None:
        self.endpoint.accept()
        self.assertEqual(self.logs.lines("box office"),
                         ["box office: connected to fritz.box:1012"])

    def test_an_ipv6_address_is_written_in_brackets(self) -> None:
        box = FritzBox(replace(FritzBoxSettings(), name="v6", host="fd00::1", port=1012),
                       FakeIngest(), self.clock, frozenset())
        self.assertEqual(box.address, "[fd00::1]:1012")

    def test_stopping_while_connecting_says_nothing(self) -> None:
        self.logs.clear()
        self.service.stopService()
        self.assertEqual(self.logs.lines("connect"), [])


def why(failure: BaseException) -> str:
    return why_not_connected(failure, "fritz.box", 1012)[0]


def test_the_kinds_of_connection_failure() -> None:
    assert why(error.DNSLookupError()) == "name not found"
    assert why(error.ConnectionRefusedError()) == "refused"
    assert why(error.TimeoutError()) == "timed out"
    assert why(error.ConnectError(errno.ENETUNREACH, "")) == "unreachable"
    assert why(error.ConnectError(errno.EHOSTUNREACH, "")) == "unreachable"
    assert why(error.ConnectError(errno.EACCES, "")) == "ConnectError"
    assert why_not_connected(None, "h", 1) == ("failed", "no reason given")


class Tracked(Protocol):
    """The test's end of a connection: says when it is gone (after the client's end has
    closed its socket, so after any line the client writes then)."""

    def __init__(self, lost: Deferred[None]) -> None:
        self._lost = lost

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if not self._lost.called:
            self._lost.callback(None)


class QuietServer(ServerFactory):
    noisy = False  # the test's own listener: not what is under test

    def __init__(self) -> None:
        self.lost: Deferred[None] = Deferred()

    def buildProtocol(self, addr: Any) -> Tracked:
        return Tracked(self.lost)


class Answer(Resource):
    isLeaf = True

    def render(self, request: Request) -> bytes:
        request.setResponseCode(500)
        return b"no"


class TrackedWrapper(ProtocolWrapper):
    def connectionLost(self, reason: Failure = connectionDone) -> None:
        super().connectionLost(reason)
        lost = cast(TrackedSite, self.factory).lost
        if not lost.called:
            lost.callback(None)


class TrackedSite(WrappingFactory):
    """A web site answering 500 to everything, saying when its connection is gone."""

    noisy = False
    protocol = TrackedWrapper

    def __init__(self) -> None:
        site = Site(Answer())
        site.noisy = False
        super().__init__(site)
        self.lost: Deferred[None] = Deferred()


class NoFactoryNoise(TestCase):
    """Real connections on loopback: the box's client, the TR-064 client and the Zadarma
    pool write no "Starting factory" / "Stopping factory" lines. Each test waits until
    the server's end of the connection is gone, which is after the client's end closed
    (and wrote its "Stopping factory" line, where one is written)."""

    def setUp(self) -> None:
        self.logs = LogCapture(self)

    async def _listen(self, factory: IProtocolFactory) -> int:
        port: IListeningPort = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1"
                                                        ).listen(factory)
        self.addCleanup(port.stopListening)
        address: Any = port.getHost()
        return int(address.port)

    def web(self) -> tuple[TrackedSite, Deferred[int]]:
        site = TrackedSite()
        return site, Deferred.fromCoroutine(self._listen(site))

    def assert_quiet(self) -> None:
        self.assertEqual(self.logs.lines("factory"), [])

    @defer.inlineCallbacks
    def test_the_box_client(self) -> Any:
        server = QuietServer()
        number = yield Deferred.fromCoroutine(self._listen(server))
        box = FritzBox(replace(FritzBoxSettings(), name="office", host="127.0.0.1",
                               port=number), FakeIngest(), reactor, frozenset())
        service = FritzBoxService(box, reactor, lambda: defer.succeed(None),
                                  endpoint=HostnameEndpoint(reactor, "127.0.0.1", number))
        service.startService()
        yield service.whenConnected()
        yield task.deferLater(reactor, 0, lambda: None)  # not stopped inside whenConnected
        yield service.stopService()
        yield server.lost
        self.assertEqual(self.logs.lines("box office: connected to"),
                         [f"box office: connected to 127.0.0.1:{number}"])
        self.assert_quiet()

    @defer.inlineCallbacks
    def test_the_tr064_client(self) -> Any:
        site, listening = self.web()
        number = yield listening
        client = Tr064Client(reactor, "127.0.0.1", number, "dpvoip", Secret("pw"), tls=False,
                             timeout=30)
        failure = yield self.assertFailure(Deferred.fromCoroutine(client.call_list()),
                                           Tr064Error)
        self.assertIn("HTTP 500", str(failure))
        yield site.lost
        self.assert_quiet()

    @defer.inlineCallbacks
    def test_the_zadarma_pool(self) -> Any:
        site, listening = self.web()
        number = yield listening
        pool, agent = http_pool_and_agent(reactor, "", 30)
        response = yield HTTPClient(agent).get(f"http://127.0.0.1:{number}/")
        self.assertEqual(response.code, 500)
        self.assertEqual((yield response.content()), b"no")
        yield pool.closeCachedConnections()
        yield site.lost
        self.assert_quiet()


class FloatsForPeople(SynchronousTestCase):
    def test_a_float_any_module_logs_is_rounded_in_the_text_line(self) -> None:
        event = {"log_format": "Scheduling retry 2 in {delay} seconds",
                 "delay": 1.657497767815027, "log_level": LogLevel.info, "log_time": 0.0,
                 "log_namespace": "twisted"}
        line = text_line(event)
        assert line is not None
        self.assertTrue(line.endswith("Scheduling retry 2 in 1.7 seconds\n"), line)

    def test_the_json_line_rounds_its_message_and_keeps_the_exact_field(self) -> None:
        event = {"log_format": "waited {t}s", "t": 0.8127479001925022,
                 "log_level": LogLevel.info, "log_time": 0.0, "log_namespace": "x"}
        record = json.loads(json_line(event))
        self.assertEqual(record["message"], "waited 0.81s")
        self.assertEqual(record["t"], 0.8127479001925022)

    def test_a_format_spec_still_applies(self) -> None:
        event = {"log_format": "{ms:.1f}ms", "ms": 12.3456, "log_time": 0.0}
        line = text_line(event)
        assert line is not None
        self.assertIn("] 12.3ms", line)

    def test_rounding(self) -> None:
        self.assertEqual(for_people(0.8127479001925022), 0.81)
        self.assertEqual(for_people(13.757602521944378), 13.8)
        self.assertEqual(for_people(153.75760252), 154)
        self.assertEqual(for_people(60.0), 60.0)
        self.assertEqual(for_people(-0.0333333), -0.033)
        self.assertTrue(for_people(float("nan")) != for_people(float("nan")))
        self.assertEqual([seconds_text(s) for s in (0.8127, 1.0, 9.96, 30.5161, 119.4, 150,
                                                    3600, 9000)],
                         ["0.8 s", "1 s", "10 s", "31 s", "119 s", "2 min", "60 min",
                          "2.5 h"])


def test_an_outage_tells_each_kind_once_a_window() -> None:
    outage = Outage(window=60.0)
    said = [outage.failed("refused", t) for t in (0.0, 1.0, 3.0, 59.0, 61.0, 62.0)]
    assert [s is not None for s in said] == [True, False, False, False, True, False]
    assert said[0] is not None and said[0].first
    assert said[4] is not None and (said[4].unsaid, said[4].span) == (4, 61.0)
    dns = outage.failed("name not found", 63.0)
    assert dns is not None and dns.first
    over = outage.ended(100.0)
    assert over is not None and (over.attempts, over.lasted, over.kind) == (
        7, 100.0, "name not found")
    assert outage.ended(101.0) is None
    again = outage.failed("refused", 102.0)
    assert again is not None and again.first


class FinishedCallLines(SynchronousTestCase):
    def test_no_word_twice(self) -> None:
        self.assertEqual(finished_text("missed", "missed"), "missed")
        self.assertEqual(finished_text("failed", "failed"), "failed")
        self.assertEqual(finished_text("missed", "missed (busy)"), "missed (busy)")
        self.assertEqual(finished_text("completed", "answered on extension 11, talk 0:20"),
                         "completed, answered on extension 11, talk 0:20")
        self.assertEqual(finished_text("failed", "interrupted: monitor connection lost"),
                         "failed, interrupted: monitor connection lost")
        self.assertEqual(finished_text("missed", ""), "missed")

    def test_the_ticket(self) -> None:
        self.assertEqual(ticket_text(12), "ticket 12 created")
        self.assertEqual(ticket_text(12, 3, joined=True), "added to ticket 12 (3x)")
        self.assertEqual(finished_text("missed", "missed", ticket_text(12, 3, joined=True)),
                         "missed; added to ticket 12 (3x)")


class FinishedCallsInTheDatabase(test_ingest.IngestTestCase):
    """The ingest's own line of a finished call, with a real PostgreSQL."""

    def setUp(self) -> Any:
        self.captured = LogCapture(self)
        return super().setUp()

    @defer.inlineCallbacks
    def test_missed_calls_say_their_ticket_and_no_word_twice(self) -> Any:
        yield self.lines(*self.missed(0, "6912345678", "09:00:00", "09:00:30"))
        yield self.lines(*self.missed(1, "6912345678", "09:10:00", "09:10:30"))
        yield self.lines(*self.missed(0, "6912345678", "09:20:00", "09:20:30"))
        [ticket] = self.tickets_rows()
        lines = [line.split(": ", 1)[1] for line in self.captured.lines("call fb-office")
                 if "incoming" not in line]
        self.assertEqual(lines[1:], [f"missed; added to ticket {ticket[0]} (2x)",
                                     f"missed; added to ticket {ticket[0]} (3x)"])
        self.assertEqual(lines[0], f"missed; ticket {ticket[0]} created")
        for line in self.captured.lines("call fb-office"):
            self.assertNotIn("missed, missed", line)

    @defer.inlineCallbacks
    def test_each_new_ticket_is_named_by_its_own_id(self) -> Any:
        # The id is carried past the COMMIT in the connection's session: each line must
        # name the ticket its own statement made, never one an earlier call left there.
        for n, caller in enumerate(("6912345671", "6912345672", "6912345673")):
            yield self.lines(*self.missed(n, caller, f"09:0{n}:00", f"09:0{n}:30"))
        tickets = sorted(row[0] for row in self.tickets_rows())
        self.assertEqual(len(tickets), 3)
        lines = [line.split(": ", 1)[1] for line in self.captured.lines("call fb-office")
                 if "incoming" not in line]
        self.assertEqual(lines, [f"missed; ticket {ticket} created" for ticket in tickets])

    @defer.inlineCallbacks
    def test_an_answered_call_keeps_its_status_and_notes(self) -> Any:
        yield self.lines(f"{test_ingest.today('10:00:00')};RING;0;2101234567;7654321;SIP0;",
                         f"{test_ingest.today('10:00:05')};CONNECT;0;11;2101234567;",
                         f"{test_ingest.today('10:01:10')};DISCONNECT;0;65;")
        [line] = [m for m in self.captured.lines("call fb-office") if "incoming" not in m]
        self.assertTrue(line.endswith(": completed, answered on extension 11, talk 1:05"),
                        line)


class ZadarmaTicketLines(test_ingest.ZadarmaTestCase):
    """A Zadarma call that ends missed says what became of its ticket in one line."""

    def setUp(self) -> Any:
        self.captured = LogCapture(self)
        return super().setUp()

    @defer.inlineCallbacks
    def test_a_missed_zadarma_call_and_a_second_one(self) -> Any:
        context = replace(self.context, tickets=True)
        yield self.send(test_ingest.zadarma_call("+306912345678", "in_" + "1" * 40,
                                                 answered=False), context)
        yield self.send(test_ingest.zadarma_call("+306912345678", "in_" + "2" * 40,
                                                 answered=False,
                                                 start="2026-01-15 10:05:00"), context)
        [ticket] = self.tickets_rows()
        lines = self.captured.lines("call zd-")
        self.assertEqual(len(lines), 2, lines)
        self.assertEqual(lines[0].split(": ", 1)[1],
                         f"missed (no answer); ticket {ticket[0]} created")
        self.assertEqual(lines[1].split(": ", 1)[1],
                         f"missed (no answer); added to ticket {ticket[0]} (2x)")
        self.assertEqual(self.captured.lines("ticket written"), [])


class NeverAnEmptyReason(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.captured = LogCapture(self)

    def test_a_happening_not_recorded_for_an_error_without_text(self) -> None:
        class Refuses(FakeIngest):
            def submit(self, happening: Any, origin: Any) -> Deferred[None]:
                return defer.fail(NotRecorded())

        box = FritzBox(replace(FritzBoxSettings(), name="office", clock_tolerance_seconds=0),
                       Refuses(), self.clock, frozenset())
        box.line_received("17.06.20 10:28:29;RING;0;07191952123;69123;SIP0;")
        [line] = self.captured.lines("not recorded")
        self.assertEqual(line, "box office: a call's start was not recorded (NotRecorded)")

    def test_a_connection_lost_for_an_error_without_text(self) -> None:
        class Gone(Exception):
            pass

        box = FritzBox(replace(FritzBoxSettings(), name="office", host="10.0.0.1"),
                       FakeIngest(), self.clock, frozenset())
        box.connection_lost(Failure(Gone()))
        self.assertEqual(self.captured.lines("box office"),
                         ["box office: connection to 10.0.0.1:1012 lost (Gone)"])

    def test_summary(self) -> None:
        self.assertEqual(summary(NotRecorded()), "NotRecorded")
        self.assertEqual(summary(None), "no reason given")


class AccessLines(SynchronousTestCase):
    """The access line is rendered without Twisted's formatter (issue 21): the same text,
    escaped the same, in both forms."""

    def event(self, **fields: Any) -> dict[str, Any]:
        values = {"client": "127.0.0.1", "method": "POST", "path": "/voip/zd/",
                  "status": 200, "sent": 2, "elapsed_ms": 2.345678, **fields}
        return {"log_format": ACCESS_FORMAT, "log_level": LogLevel.info, "log_time": 0.0,
                "log_namespace": "dpvoip.web.access", **values}

    def test_the_text_line(self) -> None:
        line = text_line(self.event())
        assert line is not None
        self.assertTrue(line.endswith("[dpvoip.web.access#info] 127.0.0.1 POST /voip/zd/"
                                      " 200 2B 2.3ms\n"), line)
        slow = text_line(self.event(elapsed_ms=1234.56))
        assert slow is not None
        self.assertTrue(slow.endswith(" 200 2B 1234.6ms\n"), slow)

    def test_a_path_cannot_forge_a_line(self) -> None:
        line = text_line(self.event(path="/a\n2026-01-01 [x] forged\x1b[2J"))
        assert line is not None
        self.assertEqual(line.count("\n"), 1)
        self.assertIn("/a\\n2026-01-01 [x] forged\\x1b[2J 200", line)

    def test_the_json_line_keeps_the_fields(self) -> None:
        record = json.loads(json_line(self.event()))
        self.assertEqual(record["message"], "127.0.0.1 POST /voip/zd/ 200 2B 2.3ms")
        self.assertEqual((record["path"], record["status"], record["elapsed_ms"]),
                         ("/voip/zd/", 200, 2.345678))

    def test_an_access_event_missing_a_field_is_still_told(self) -> None:
        event = self.event()
        del event["sent"]
        line = text_line(event)
        assert line is not None
        self.assertIn("Unable to format event", line)

    def test_each_line_carries_its_own_second(self) -> None:
        """The time's text is made once a second: each line still shows its own."""
        from twisted.logger import formatTime

        for when in (0.5, -0.5, 1_765_000_000.0, 1_765_000_000.99, 1_765_000_001.01,
                     1_765_000_000.5):
            line = text_line({**self.event(), "log_time": when})
            assert line is not None
            self.assertTrue(line.startswith(formatTime(when) + " ["), (when, line))
