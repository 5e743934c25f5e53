"""The Fritz!Box connection: framing, bad lines, the newline keepalive, TCP keepalive on
a real socket, and connection faults with a Clock (refused, reset, peer close, back-off
cap, never giving up, orphans closed on reconnect)."""

from __future__ import annotations

import functools
import socket
from dataclasses import replace
from datetime import datetime
from typing import Any

from twisted.internet import defer, error, protocol, reactor
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IProtocol, IProtocolFactory
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase

from dpvoip.calls.ingest import Origin
from dpvoip.config import FritzBoxSettings
from dpvoip.core.happenings import Ended, Happening, Started
from dpvoip.core.outcomes import Detail, Outcome, Reason
from dpvoip.fritzbox.box import FritzBox
from dpvoip.fritzbox.service import BoxStatusReporter, FritzBoxService
from dpvoip.protocols.callmonitor import MAX_LINE, CallMonitorProtocol
from dpvoip.reconnecting import (
    KEEPALIVE_COUNT,
    KEEPALIVE_IDLE,
    KEEPALIVE_INTERVAL,
    keepalive,
    retry_policy,
)

RING = b"17.06.20 10:28:29;RING;0;07191952123;69123;SIP0;"
DISCONNECT = b"17.06.20 10:28:40;DISCONNECT;0;0;"


class FakeIngest:
    """Records what the box hands to the ingest entry point."""

    def __init__(self) -> None:
        self.happenings: list[Happening] = []
        self.closed_at_start: list[tuple[str, Reason]] = []
        self.started_before: list[datetime | None] = []

    def submit(self, happening: Happening, origin: Origin) -> Deferred[None]:
        self.happenings.append(happening)
        return defer.succeed(None)

    async def close_open_calls(self, box: str, reason: Reason, at: datetime,
                               started_before: datetime | None = None) -> int:
        self.closed_at_start.append((box, reason))
        self.started_before.append(started_before)
        return 0


def make_box(clock: Clock, **settings: Any) -> tuple[FritzBox, FakeIngest]:
    ingest = FakeIngest()
    box = FritzBox(replace(FritzBoxSettings(), **settings), ingest, clock, frozenset())
    return box, ingest


def connect(box: FritzBox, clock: Clock, newline_every: float = 0.0
            ) -> tuple[CallMonitorProtocol, StringTransport]:
    wire = CallMonitorProtocol(box, clock, newline_every)
    transport = StringTransport()
    wire.makeConnection(transport)
    return wire, transport


class FramingTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1_592_378_909)  # 2020-06-17 07:28:29 UTC, the box's 10:28:29
        self.box, self.ingest = make_box(self.clock)
        self.wire, self.transport = connect(self.box, self.clock)

    def started(self) -> list[Started]:
        return [h for h in self.ingest.happenings if isinstance(h, Started)]

    def test_crlf_lf_split_and_joined_segments_all_arrive_whole(self) -> None:
        for chunk in [RING[:10], RING[10:33], RING[33:] + b"\r", b"\n" + DISCONNECT + b"\n",
                      RING.replace(b";0;", b";1;", 1) + b"\r\n" + b"\r\n" + b"\n"]:
            self.wire.dataReceived(chunk)
        kinds = [type(h).__name__ for h in self.ingest.happenings]
        self.assertEqual(kinds, ["Started", "Ended", "Started"])
        self.assertEqual(self.box.status.bad_lines, 0)
        self.assertEqual(self.box.status.lines, 5)  # empty lines are counted, not events

    def test_a_call_of_one_segment_is_complete(self) -> None:
        # The replaced script lost every call whose RING and DISCONNECT shared a segment.
        self.wire.dataReceived(RING + b"\r\n" + DISCONNECT + b"\r\n")
        [end] = [h for h in self.ingest.happenings if isinstance(h, Ended)]
        self.assertEqual(end.outcome, Outcome.MISSED)

    def test_bad_lines_are_counted_and_skipped(self) -> None:
        self.wire.dataReceived(b"garbage\r\n17.06.20 10:28:29;RING;x;1;2;\r\n\xff\xfe;;\r\n")
        self.wire.dataReceived(RING + b"\r\n")
        self.assertEqual(self.box.status.bad_lines, 3)
        self.assertEqual(len(self.started()), 1)
        self.assertFalse(self.transport.disconnecting)

    def test_invalid_utf8_is_replaced_line_by_line(self) -> None:
        self.wire.dataReceived(RING.replace(b"SIP0", b"SIP\xe9") + b"\r\n")
        [started] = self.started()
        self.assertEqual(started.line, "SIP\ufffd")

    def test_an_over_long_line_drops_the_connection(self) -> None:
        self.wire.dataReceived(b"x" * (MAX_LINE + 10))
        self.assertTrue(self.transport.disconnecting)
        self.assertEqual(self.box.status.long_lines, 1)

    def test_the_optional_newline_keepalive(self) -> None:
        box, _ = make_box(self.clock)
        wire, transport = connect(box, self.clock, newline_every=120)
        self.clock.advance(119)
        self.assertEqual(transport.value(), b"")
        self.clock.advance(1)
        self.assertEqual(transport.value(), b"\n")
        wire.connectionLost(Failure(error.ConnectionDone()))
        self.clock.advance(600)
        self.assertEqual(transport.value(), b"\n", "no keepalive after the connection is gone")


class FakeEndpoint:
    """An endpoint whose connection attempts the test answers: refuse, or accept."""

    def __init__(self) -> None:
        self.attempts: list[tuple[Deferred[IProtocol], IProtocolFactory]] = []

    def connect(self, factory: IProtocolFactory) -> Deferred[IProtocol]:
        attempt: Deferred[IProtocol] = Deferred()
        self.attempts.append((attempt, factory))
        return attempt

    def refuse(self) -> None:
        attempt, _ = self.attempts[-1]
        attempt.errback(error.ConnectionRefusedError())

    def accept(self) -> tuple[Any, StringTransport]:
        """The protocol as ClientService wraps it (its proxy sees connectionLost too)."""
        attempt, factory = self.attempts[-1]
        wire: Any = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 1012))
        transport = StringTransport()
        wire.makeConnection(transport)
        attempt.callback(wire)
        return wire, transport


class ConnectionFaultTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.box, self.ingest = make_box(self.clock, name="office")
        self.endpoint = FakeEndpoint()
        self.service = FritzBoxService(
            self.box, self.clock, lambda: defer.succeed(None), endpoint=self.endpoint,
            retry=retry_policy(initial=1.0, cap=60.0),
        )
        self.service.startService()

    def tearDown(self) -> None:
        self.service.stopService()

    def test_calls_left_by_the_last_run_are_closed_those_of_this_run_are_not(self) -> None:
        self.assertEqual(self.ingest.closed_at_start, [("office", Reason.RESTARTED)])
        self.assertEqual(self.ingest.started_before, [self.box.born])
        self.assertEqual(len(self.endpoint.attempts), 1)

    def test_the_box_is_connected_before_the_database_is_there(self) -> None:
        # calls during a database outage at start are spooled, not missed
        box, ingest = make_box(self.clock, name="annex")
        endpoint = FakeEndpoint()
        prepared: defer.Deferred[None] = defer.Deferred()
        service = FritzBoxService(box, self.clock, lambda: prepared, endpoint=endpoint,
                                  retry=retry_policy(initial=1.0, cap=60.0))
        service.startService()
        self.addCleanup(service.stopService)
        self.assertEqual(len(endpoint.attempts), 1)
        self.assertEqual(ingest.closed_at_start, [], "closing waits for the database")
        prepared.callback(None)
        self.assertEqual(ingest.closed_at_start, [("annex", Reason.RESTARTED)])

    def test_refused_a_thousand_times_backs_off_to_the_cap_and_never_gives_up(self) -> None:
        delays = []
        for _ in range(1000):
            self.endpoint.refuse()
            pending = self.clock.getDelayedCalls()
            self.assertEqual(len(pending), 1, "one timer while waiting: no busy loop")
            delay = pending[0].getTime() - self.clock.seconds()
            delays.append(delay)
            self.clock.advance(delay)
        self.assertEqual(len(self.endpoint.attempts), 1001)
        self.assertLess(delays[0], 3)
        self.assertTrue(all(d <= 60 for d in delays), "the cap is the cap, jitter included")
        self.assertGreater(min(delays[20:]), 44, "capped, not reset (jitter: a quarter)")
        # An hour off, then the box is back.
        self.endpoint.accept()
        self.assertTrue(self.box.status.connected)

    def test_a_peer_close_or_reset_reconnects_and_closes_open_calls_as_orphans(self) -> None:
        wire, _ = self.endpoint.accept()
        wire.dataReceived(RING + b"\r\n")
        self.assertEqual(self.box.tracker.open_calls, 1)
        for reason in (error.ConnectionDone(), error.ConnectionLost()):
            wire.connectionLost(Failure(reason))
            self.assertFalse(self.box.status.connected)
            self.clock.advance(61)
            wire, _ = self.endpoint.accept()
            self.assertTrue(self.box.status.connected)
        orphans = [h for h in self.ingest.happenings if isinstance(h, Ended)]
        self.assertEqual([(o.outcome, o.detail) for o in orphans],
                         [(Outcome.INTERRUPTED, Detail(Reason.LINK_LOST))])
        self.assertEqual(self.box.status.reconnects, 2)
        self.assertEqual(self.box.tracker.open_calls, 0)

    def test_status_reports_since_when_and_the_last_line(self) -> None:
        self.clock.advance(1000)
        wire, _ = self.endpoint.accept()
        self.clock.advance(5)
        wire.dataReceived(RING + b"\r\n")
        state = self.box.status.as_json(self.box.tracker.open_calls)
        self.assertEqual(state["connected"], True)
        self.assertEqual(state["since"], "1970-01-01T00:16:40+00:00")
        self.assertEqual(state["last_line"], "1970-01-01T00:16:45+00:00")
        self.assertEqual((state["lines"], state["open_calls"], state["reconnects"]), (1, 1, 0))


class Side(protocol.Protocol):
    """One end of a connection: ``made`` and ``closed`` fire as it comes and goes (the
    test ends when both ends are closed, not after a guess of how long a close takes)."""

    def __init__(self) -> None:
        self.made: Deferred[None] = Deferred()
        self.closed: Deferred[None] = Deferred()

    def connectionMade(self) -> None:
        self.made.callback(None)

    def connectionLost(self, reason: Any = protocol.connectionDone) -> None:
        self.closed.callback(None)


class OneConnection(protocol.ServerFactory, protocol.ClientFactory):
    """Builds its one ``Side`` (listening or connecting)."""

    def __init__(self) -> None:
        self.side = Side()

    def buildProtocol(self, addr: Any) -> Side:
        return self.side


class TcpKeepaliveTests(TestCase):
    @defer.inlineCallbacks
    def test_every_connection_gets_short_keepalive_timers(self) -> Any:
        server, connecting = OneConnection(), OneConnection()
        port = reactor.listenTCP(0, server, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        address: Any = port.getHost()
        reactor.connectTCP("127.0.0.1", address.port, connecting)
        yield defer.gatherResults([server.side.made, connecting.side.made])
        client: Any = connecting.side
        keepalive(client)
        handle = client.transport.getHandle()
        self.assertEqual(handle.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE), 1)
        self.assertEqual(handle.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE),
                         KEEPALIVE_IDLE)
        self.assertEqual(handle.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL),
                         KEEPALIVE_INTERVAL)
        self.assertEqual(handle.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT),
                         KEEPALIVE_COUNT)
        # A dead peer is noticed within idle + interval x count.
        self.assertLessEqual(KEEPALIVE_IDLE + KEEPALIVE_INTERVAL * KEEPALIVE_COUNT, 90)
        client.transport.loseConnection()
        yield defer.gatherResults([client.closed, server.side.closed])


def test_the_retry_policy_starts_at_the_initial_delay_doubles_and_never_passes_the_cap() -> None:
    for fraction, factor in ((0.0, 0.75), (0.999999, 1.0)):
        delay = retry_policy(initial=1.0, cap=60.0, random=functools.partial(float, fraction))
        waits = [delay(attempt) for attempt in range(1, 12)]
        expected = [min(2.0 ** n, 60.0) * factor for n in range(11)]
        assert [round(w, 3) for w in waits] == [round(e, 3) for e in expected]
    assert max(retry_policy(0.05, 1.0)(n) for n in range(1, 2000)) <= 1.0


class RecordingStore:
    """The store's ``write`` as the status reporter uses it: each transaction runs on a
    cursor that records its statements; ``hold`` keeps the next ones from finishing."""

    def __init__(self) -> None:
        self.rows: list[tuple[Any, ...]] = []
        self.writes = 0
        self.hold = False
        self.fail = False
        self.held: list[Deferred[None]] = []

    def write(self, interaction: Any) -> Deferred[None]:
        self.writes += 1
        store = self

        class Cursor:
            async def execute(self, sql: str, params: tuple[Any, ...]) -> None:
                assert sql.startswith("INSERT INTO dpvoip.box_status")
                store.rows.append(params)

        if self.fail:
            return defer.fail(ConnectionError("database gone"))
        done = Deferred.fromCoroutine(interaction(Cursor()))
        if self.hold:
            held: Deferred[None] = Deferred()
            self.held.append(held)
            return done.addCallback(lambda _: held)
        return done


class BoxStatusReporterTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1000)
        self.box, _ = make_box(self.clock, name="office", host="10.0.0.1")
        self.store = RecordingStore()
        self.reporter = BoxStatusReporter([self.box], self.store,  # type: ignore[arg-type]
                                          self.clock, every=5.0)

    def test_reports_at_start_then_every_interval(self) -> None:
        self.reporter.startService()
        self.addCleanup(self.reporter.stopService)
        self.assertEqual(self.store.writes, 1)
        wire, _ = connect(self.box, self.clock)
        wire.dataReceived(RING + b"\r\n")
        self.clock.advance(4.9)
        self.assertEqual(self.store.writes, 1)
        self.clock.advance(0.1)
        self.assertEqual(self.store.writes, 2)
        (name, host, port, connected, since, last_line, *counts, open_calls,
         call_list) = self.store.rows[-1]
        self.assertEqual((name, host, port, connected), ("office", "10.0.0.1", 1012, True))
        self.assertEqual((since, last_line), (self.box.status.since, self.box.status.last_line_at))
        self.assertEqual((counts, open_calls), ([0, 1, 0], 1))  # reconnects, lines, bad lines
        self.assertIsNone(call_list, "no TR-064 on this box")

    def test_a_slow_write_skips_ticks_instead_of_piling_up_and_stop_does_not_wait(
            self) -> None:
        self.store.hold = True
        self.reporter.startService()
        self.clock.advance(20)
        self.assertEqual(self.store.writes, 1)
        self.successResultOf(self.reporter.stopService())
        self.store.held[0].callback(None)
        self.clock.advance(20)
        self.assertEqual(self.store.writes, 1)

    def test_a_failed_write_is_quiet_and_tried_again_at_the_next_tick(self) -> None:
        self.store.fail = True
        self.reporter.startService()
        self.addCleanup(self.reporter.stopService)
        self.store.fail = False
        self.clock.advance(5)
        self.assertEqual((self.store.writes, len(self.store.rows)), (2, 1))

    def test_the_box_tells_when_what_it_handed_to_the_ingest_is_recorded(self) -> None:
        ingest = FakeIngest()
        held: list[Deferred[None]] = []

        def submit(happening: Happening, origin: Origin) -> Deferred[None]:
            held.append(Deferred())
            return held[-1]

        ingest.submit = submit  # type: ignore[method-assign]
        box = FritzBox(replace(FritzBoxSettings(), name="annex"), ingest, self.clock,
                       frozenset())
        self.successResultOf(box.settled())
        wire, _ = connect(box, self.clock)
        wire.dataReceived(RING + b"\r\n" + DISCONNECT + b"\r\n")
        settled = box.settled()
        self.assertEqual(len(held), 2)
        held[0].callback(None)
        self.assertNoResult(settled)
        held[1].errback(ConnectionError("database gone"))
        self.successResultOf(settled)
        self.assertEqual(len(self.flushLoggedErrors(ConnectionError)), 1)

