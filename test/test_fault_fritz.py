"""Fault test: the Fritz!Box connection dropped 1,000 times, the CPU idle during back-off.

The daemon as wired by ``dpvoip.service.build`` (its real ``FritzBoxService`` with the
back-off from the configuration: 0.05 s initial, 1 s cap), a real PostgreSQL, and fake
boxes on 127.0.0.1 that speak the CallMonitor line format and misbehave connection after
connection, in rotation: accept and close at once (FIN), accept and reset (RST), send a
RING and close (the call is open when the connection dies), send a whole incoming call
and close, send a RING and reset, send a whole outgoing call and reset; and, in the
middle, a phase where the port is closed, so that every attempt is refused and the
back-off grows to its cap. The port is held by the test throughout (``HeldPort``): closed,
it refuses connections, but no other process can take it before it listens again.

One box, dropped 1,000 times in a row: after every accepted connection the
``ClientService`` starts its back-off again from the initial delay (less a jitter of up to
a quarter: the policy takes its jitter off the delay, so the cap is never exceeded).

What the test asserts: every drop (the daemon's "Scheduling retry" log event, one per
lost connection or failed attempt) is followed by exactly one new attempt, and never
before its scheduled delay has passed; the fake counts connections = accepted drops + 1
(a last, good session whose call goes through); no scheduled delay exceeds the cap, and
the refused phase lasts (event-driven, not for a fixed time) until attempts far past the
point where the back-off would exceed the cap uncapped, whose delays stay at the cap;
every call the fakes sent is in ``accounting_voipcall`` exactly once, the ones cut by a
drop closed as interrupted, none left active.

Nothing here is timed against the wall clock: how late an attempt may come and how little
CPU the back-off uses are properties of the retry policy and its one timer, shown with a
``Clock`` in ``test_fritzbox`` (``ConnectionFaultTests``); a busy machine only makes this
test slower. About 90 s on an idle machine; the trial timeout is a hang detector.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, cast
from zoneinfo import ZoneInfo

from twisted.internet import defer, reactor
from twisted.internet.interfaces import IListeningPort, ISystemHandle, ITCPTransport
from twisted.internet.protocol import Protocol, ServerFactory, connectionDone
from twisted.internet.task import deferLater
from twisted.logger import ILogObserver, LogEvent, globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase
from zope.interface import provider

from dpvoip.config import (
    DirectorySettings,
)
from dpvoip.fritzbox.service import FritzBoxService
from dpvoip.service import Daemon, build
from dpvoip.testing.fritzbox import box_time
from test.support.daemon import scratch
from test.support.ports import HeldPort
from test.support.postgres import postgres, query
from test.support.wiring import in_process, loopback_box
from test.test_database import eventually

BOXES = 1
DROPS_PER_BOX = 1000
FIRST_LEG = 450  # accepted drops before the port closes
INITIAL, CAP = 0.05, 1.0  # the configuration's reconnect_initial/max_seconds
JITTER = 0.0  # dpvoip's policy takes its jitter off the delay: nothing is added
#: The policy takes up to a quarter off a delay as jitter: a capped delay is at least this.
CAPPED_AT_LEAST = 0.75 * CAP
#: The attempt whose delay, uncapped, would be 3.2 s: far more than the cap.
UNCAPPED_ABOVE_LIMIT = 7
#: The port stays closed until the daemon has scheduled this refused attempt.
REFUSED_UNTIL_ATTEMPT = UNCAPPED_ABOVE_LIMIT + 2
#: How much earlier than its scheduled delay an attempt may appear: the test's clock
#: (monotonic) and the reactor's (the wall clock) may disagree by a few microseconds.
CLOCKS_DIFFER = 0.005
RESET_AFTER = 0.1  # s between sending lines and resetting
ZONE = "Europe/Athens"
OWN = "2107654321"
INTERRUPTED = "interrupted: monitor connection lost"
ANSWERED = "answered on extension 11, talk {}"

#: One order of events for the whole test (log events and the fakes' accepts).
_sequence = itertools.count()


@dataclass(frozen=True)
class Expected:
    direction: str
    status: str
    duration: int | None  # the CRM's (end - start); None: when the link was lost
    notes: str


@dataclass
class Retry:
    """A "Scheduling retry" event of the daemon's ``ClientService`` for one box."""

    order: int
    at: float
    attempt: int
    delay: float
    listening: bool


@dataclass
class Accept:
    order: int
    at: float


@dataclass
class Reopened:
    """The fake box listens again after its refused phase."""

    order: int
    at: float


class _Side(Protocol):
    """One connection from the daemon, as the fake box sees it."""

    def __init__(self, box: FakeBox) -> None:
        self.box = box
        self.lost: defer.Deferred[None] = defer.Deferred()

    def connectionMade(self) -> None:
        self.box.accepted(self)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.box.sides.discard(self)
        self.lost.callback(None)


@dataclass(eq=False)
class FakeBox(ServerFactory):
    """A CallMonitor port that misbehaves on every connection until the daemon has seen
    ``DROPS_PER_BOX`` drops of it; then a good session with one last call, left open."""

    index: int
    drops_so_far: Callable[[], int]
    held: HeldPort = field(default_factory=HeldPort)
    t0: float = 0.0  # the box's clock at its first call: set once the daemon is built
    listening: IListeningPort | None = None
    accepts: list[Accept] = field(default_factory=list)
    sides: set[_Side] = field(default_factory=set)
    calls: dict[str, Expected] = field(default_factory=dict)  # E.164 number -> outcome
    reopened: Reopened | None = None
    orphans: int = 0
    after_final: int = 0
    final: _Side | None = None
    refusing: defer.Deferred[None] = field(default_factory=defer.Deferred)
    refused_enough: defer.Deferred[None] = field(default_factory=defer.Deferred)
    settled: defer.Deferred[None] = field(default_factory=defer.Deferred)
    noisy = False

    @property
    def name(self) -> str:
        return f"box{self.index}"

    @property
    def port(self) -> int:
        return self.held.port

    def listen(self) -> None:
        """On the held port: the first time, and again after the refused phase."""
        self.listening = self.held.listen(reactor, self)
        if self.accepts:
            self.reopened = Reopened(next(_sequence), time.monotonic())

    def refuse(self) -> defer.Deferred[None]:
        listening, self.listening = self.listening, None
        assert listening is not None
        stopped: defer.Deferred[None] | None = listening.stopListening()
        return stopped if stopped is not None else defer.succeed(None)

    async def stop(self) -> None:
        if self.listening is not None:
            await self.refuse()
        for side in list(self.sides):
            cast(ITCPTransport, side.transport).abortConnection()
            await side.lost

    # -- connections ---------------------------------------------------------------------

    def buildProtocol(self, addr: Any) -> _Side:
        return _Side(self)

    def accepted(self, side: _Side) -> None:
        self.accepts.append(Accept(next(_sequence), time.monotonic()))
        self.sides.add(side)
        transport = cast(ITCPTransport, side.transport)
        if self.final is not None:
            self.after_final += 1
            return
        if self.drops_so_far() >= DROPS_PER_BOX:
            self.final = side
            transport.write(self._call("incoming"))
            self.settled.callback(None)
            return
        if len(self.accepts) == FIRST_LEG:
            self.refuse().chainDeferred(self.refusing)
        kind = (len(self.accepts) - 1) % 6
        if kind == 0:  # accept, then FIN
            transport.loseConnection()
        elif kind == 1:  # accept, then RST
            transport.abortConnection()
        elif kind == 2:  # a call rings, then FIN: it is open when the connection dies
            transport.write(self._call("orphan"))
            transport.loseConnection()
        elif kind == 3:  # a whole incoming call, then FIN
            transport.write(self._call("incoming"))
            transport.loseConnection()
        elif kind == 4:  # a call rings, then RST
            self._send_now(transport, self._call("orphan"))
            reactor.callLater(RESET_AFTER, transport.abortConnection)
        else:  # a whole outgoing call, then RST
            self._send_now(transport, self._call("outgoing"))
            reactor.callLater(RESET_AFTER, transport.abortConnection)

    @staticmethod
    def _send_now(transport: ITCPTransport, data: bytes) -> None:
        """Into the socket at once, not at the reactor's next write: an abort drops what
        the transport has not written yet, and on a busy machine the reset may be due
        before that write. Sent now, the lines reach the daemon before the reset does."""
        handle = cast(socket.socket, cast(ISystemHandle, transport).getHandle())
        assert handle.send(data) == len(data), "a few lines fit in an empty socket buffer"

    def _call(self, kind: str) -> bytes:
        """A call of a number of its own, at a second of its own (unique call ids)."""
        n = len(self.calls)
        at, conn = self.t0 + n, n % 4
        number = f"69{self.index:02d}{n:06d}"

        def t(shift: int) -> str:
            return box_time(at + shift, ZoneInfo(ZONE))

        if kind == "outgoing":
            lines = [f"{t(0)};CALL;{conn};11;{OWN};{number};SIP0;",
                     f"{t(3)};CONNECT;{conn};11;{number};",
                     f"{t(45)};DISCONNECT;{conn};42;"]
            expected = Expected("outgoing", "completed", 45, ANSWERED.format("0:42"))
        else:
            lines = [f"{t(0)};RING;{conn};{number};{OWN};SIP0;"]
            expected = Expected("incoming", "failed", None, INTERRUPTED)
            if kind == "incoming":
                lines += [f"{t(1)};CONNECT;{conn};11;{number};",
                          f"{t(30)};DISCONNECT;{conn};29;"]
                expected = Expected("incoming", "completed", 30, ANSWERED.format("0:29"))
            else:
                self.orphans += 1
        self.calls[f"+30{number}"] = expected
        return "".join(line + "\r\n" for line in lines).encode()


class FritzBoxDropsTest(TestCase):
    timeout = 900  # a hang detector: about 90 s idle, several times that on a busy machine

    def setUp(self) -> None:
        self.dsn = postgres().new_database(crm="2025-12")
        self.retries: dict[int, list[Retry]] = {}
        self.fakes: dict[int, FakeBox] = {}

        @provider(ILogObserver)
        def observe(event: LogEvent) -> None:
            if not str(event.get("log_format", "")).startswith("Scheduling retry"):
                return
            service = event.get("log_source")  # ClientService logs as itself
            if not isinstance(service, FritzBoxService):
                return
            fake = self.fakes.get(service.box.settings.port)
            if fake is None:
                return
            retry = Retry(next(_sequence), time.monotonic(), int(event["attempt"]),
                          float(event["delay"]), fake.listening is not None)
            self.retries[fake.port].append(retry)
            if (not retry.listening and retry.attempt >= REFUSED_UNTIL_ATTEMPT
                    and not fake.refused_enough.called):
                # not from inside the log observer: on the reactor's next turn
                reactor.callLater(0, fake.refused_enough.callback, None)

        globalLogPublisher.addObserver(observe)
        self.addCleanup(globalLogPublisher.removeObserver, observe)

    async def _start(self) -> Daemon:
        for index in range(BOXES):
            fake = FakeBox(index, lambda: 0)
            self.addCleanup(fake.held.close)
            fake.listen()
            fake.drops_so_far = self._drops_of(fake.port)
            self.fakes[fake.port] = fake
            self.retries[fake.port] = []
            self.addCleanup(self._stop_fake, fake)
        config = in_process(
            self.dsn, pool_size=4, directory=DirectorySettings(own_numbers=(OWN,)),
            # The fakes' clocks run one second per call, ahead of the real one by up to
            # many minutes: their dates believed (no arrival-time rule).
            boxes=[loopback_box(fake.name, fake.port, timezone=ZONE,
                                reconnect_initial_seconds=INITIAL, reconnect_max_seconds=CAP,
                                clock_tolerance_seconds=0)
                   for fake in self.fakes.values()])
        daemon = build(config, reactor, scratch(self))
        # The box's calls start after the daemon was born (by the box's clock, to the
        # second): an older call still open when the daemon has prepared the database
        # would be closed as one left by the last run ("interrupted: dpvoip restarted"),
        # and on a busy machine that preparation may end after the first calls came.
        for fake in self.fakes.values():
            fake.t0 = math.ceil(time.time()) + 1
        daemon.service.startService()
        self.addCleanup(daemon.service.stopService)  # runs before the fakes stop
        await daemon.service.started
        return daemon

    def _drops_of(self, port: int) -> Callable[[], int]:
        return lambda: len(self.retries[port])

    def _stop_fake(self, fake: FakeBox) -> defer.Deferred[None]:
        return defer.Deferred.fromCoroutine(fake.stop())

    async def _thousand_drops(self) -> None:
        began = time.monotonic()
        daemon = await self._start()
        fakes = list(self.fakes.values())

        # First leg: accepted connections dropped, one after the other, on every box.
        await defer.gatherResults([fake.refusing for fake in fakes])
        first_leg = time.monotonic() - began
        # Every port closed: every box refused, waiting, the back-off growing to its cap,
        # until the daemon has scheduled attempts well past where it would exceed it.
        await defer.gatherResults([fake.refused_enough for fake in fakes])
        refused_phase = time.monotonic() - began - first_leg
        for fake in fakes:
            fake.listen()
        # Second leg: drops again until DROPS_PER_BOX, then a good session with one call.
        await defer.gatherResults([fake.settled for fake in fakes])
        drops_done = time.monotonic() - began

        sent = {number: (fake.name, expected)
                for fake in fakes for number, expected in fake.calls.items()}
        sql = ("SELECT v.call_id, d.box, v.direction, v.phone_number, v.status,"
               " v.duration_seconds, v.notes,"
               " trunc(extract(epoch from v.ended_at - v.started_at))::integer"
               " FROM accounting_voipcall v"
               " LEFT JOIN dpvoip.call_detail d ON d.call_id = v.call_id")
        rows: list[tuple[Any, ...]] = []

        def settled() -> bool:
            rows[:] = query(self.dsn, sql)
            return len(rows) >= len(sent) and all(row[4] != "active" for row in rows)

        with contextlib.suppress(AssertionError):  # the assertions below say what is amiss
            await eventually(settled, 120)
        await deferLater(reactor, 0.5, lambda: None)  # nothing more arrives late
        rows[:] = query(self.dsn, sql)

        # -- the connections -----------------------------------------------------------
        waits: list[float] = []
        refused_waits: list[float] = []
        delays: list[float] = []
        capped_delays: list[float] = []
        refused_total = 0
        handshake_resets = 0
        for fake in fakes:
            box = next(b for b in daemon.boxes if b.settings.name == fake.name)
            retries = self.retries[fake.port]
            self.assertEqual(len(retries), DROPS_PER_BOX, f"{fake.name}: drops")
            assert fake.reopened is not None
            events: list[Retry | Accept | Reopened] = sorted(
                [*retries, *fake.accepts, fake.reopened], key=lambda e: e.order)
            # A retry follows an accepted connection (lost) or none (refused); every
            # retry is followed by exactly one attempt: a refusal or an accepted one.
            accepted_since = 0
            refused = 0
            since_reopened: list[Retry | Accept] | None = None
            for event, following in itertools.zip_longest(events, events[1:]):
                if isinstance(event, Reopened):
                    since_reopened = []
                    continue
                if since_reopened is not None:
                    since_reopened.append(event)
                if isinstance(following, Reopened):
                    following = next(e for e in events if e.order > following.order)
                if isinstance(event, Accept):
                    accepted_since += 1
                    self.assertLessEqual(accepted_since, 1, f"{fake.name}: two accepts")
                    continue
                if accepted_since == 0:
                    refused += 1
                    # Refused while the port was closed, or the one attempt that was in
                    # flight when it reopened: reported as the first thing after.
                    self.assertTrue(not event.listening or since_reopened == [event],
                                    f"{fake.name}: an attempt failed while listening")
                accepted_since = 0
                assert following is not None, f"{fake.name}: gave up after a drop"
                wait = following.at - event.at
                waits.append(wait)
                delays.append(event.delay)
                if not event.listening:
                    refused_waits.append(wait)
                    if event.attempt >= UNCAPPED_ABOVE_LIMIT:
                        capped_delays.append(event.delay)
                self.assertGreaterEqual(wait, event.delay - CLOCKS_DIFFER,
                                        f"{fake.name}: an attempt before its delay")
            self.assertIsInstance(events[-1], Accept)
            self.assertGreaterEqual(refused, 3, f"{fake.name}: refused attempts")
            self.assertEqual(len(fake.accepts), DROPS_PER_BOX - refused + 1,
                             f"{fake.name}: connections = accepted drops + 1")
            self.assertEqual(fake.after_final, 0)
            self.assertTrue(box.status.connected)
            # A reset can reach the daemon before its connect completes: it sees a
            # failed attempt, not a connection (still a drop, still retried).
            handshake_resets += len(fake.accepts) - box.status.connections
            self.assertEqual(box.status.reconnects, box.status.connections - 1)
            self.assertEqual(box.status.orphans_closed, fake.orphans, fake.name)
            self.assertEqual(box.tracker.open_calls, 0)
            refused_total += refused
        attempts = [r.attempt for rs in self.retries.values() for r in rs]
        self.assertLessEqual(max(delays), CAP + JITTER, "back-off above its cap")
        # Far past where it would exceed the cap, the back-off stays at the cap (less the
        # jitter): it neither grows past it nor starts again from the initial delay.
        self.assertGreaterEqual(len(capped_delays), REFUSED_UNTIL_ATTEMPT
                                - UNCAPPED_ABOVE_LIMIT + 1)
        self.assertGreaterEqual(min(capped_delays), CAPPED_AT_LEAST, "capped, not reset")

        # -- the calls -------------------------------------------------------------------
        by_number: dict[str, list[tuple[Any, ...]]] = {}
        for row in rows:
            by_number.setdefault(row[3], []).append(row)
        lost = sorted(set(sent) - set(by_number))
        doubled = sorted(n for n, found in by_number.items() if len(found) > 1)
        unexpected = sorted(set(by_number) - set(sent))
        wrong = [(row, sent[number]) for number, found in by_number.items()
                 if number in sent for row in found
                 if (row[1], row[2], row[5], row[6]) != (
                     sent[number][0], sent[number][1].direction,
                     row[7] if sent[number][1].duration is None else sent[number][1].duration,
                     sent[number][1].notes)
                 or row[4] != sent[number][1].status or row[5] != row[7]]
        left_open = [row for row in rows if row[4] == "active"]
        same_id = len(rows) - len({row[0] for row in rows})
        orphans = sum(fake.orphans for fake in fakes)
        interrupted = sum(1 for row in rows if row[6] == INTERRUPTED)
        total = time.monotonic() - began
        print(f"\nFritz!Box dropped: boxes {BOXES}, drops {sum(map(len, self.retries.values()))}"
              f" (refused {refused_total}, accepted then closed/reset"
              f" {BOXES * DROPS_PER_BOX - refused_total}, of which reset before the daemon"
              f" saw the connection {handshake_resets}), connections at the fakes"
              f" {sum(len(f.accepts) for f in fakes)}, highest attempt {max(attempts)},"
              f" max scheduled delay {max(delays):.3f} s, max wait {max(waits):.3f} s"
              f" (refused phase {max(refused_waits):.3f} s), mean wait"
              f" {sum(waits) / len(waits):.3f} s; calls sent {len(sent)} (cut by a"
              f" drop {orphans}), stored {len(rows)}, interrupted {interrupted}, lost"
              f" {len(lost)}, duplicated {len(doubled) + same_id}, wrong {len(wrong)}, left"
              f" open {len(left_open)}; first leg {first_leg:.1f} s, refused phase"
              f" {refused_phase:.1f} s, all drops {drops_done:.1f} s, total {total:.1f} s")
        self.assertEqual(lost, [])
        self.assertEqual(doubled, [])
        self.assertEqual(same_id, 0)
        self.assertEqual(unexpected, [])
        self.assertEqual(wrong, [])
        self.assertEqual(left_open, [])
        self.assertEqual(interrupted, orphans)
        self.assertGreater(orphans, 0)

    def test_a_thousand_drops_reconnect_every_time_and_record_every_call_once(
        self,
    ) -> defer.Deferred[None]:
        return defer.Deferred.fromCoroutine(self._thousand_drops())
