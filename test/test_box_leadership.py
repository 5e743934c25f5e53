"""Who reads a Fritz!Box (issue 19): the lease state machine with plain data, the box held,
resumed and dropped by its lead, ``BoxLeadership`` on a ``Clock`` with a fake lease
connection, and the instance's name."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase

from dpvoip.config import (
    Config,
    ConfigError,
    FritzBoxSettings,
    InstanceSettings,
    from_toml,
    instance_name,
    parse,
)
from dpvoip.fritzbox.box import FritzBox
from dpvoip.fritzbox.leadership import (
    Drop,
    Hold,
    Lead,
    Leadership,
    LeaseRules,
    Prior,
    Resume,
    Role,
)
from dpvoip.fritzbox.service import BoxLeadership, BoxStatusReporter, LedBox
from dpvoip.protocols.callmonitor import CallMonitorProtocol
from dpvoip.store.leases import Tried, application_name, box_key, instance_of

RULES = LeaseRules(lease_seconds=4.0, heartbeat_seconds=1.0)


def machine(*boxes: str) -> Leadership:
    return Leadership("athens-1", boxes or ("office",), RULES)


class StateMachineTests(SynchronousTestCase):
    """Facts in, actions out: no clock, no socket."""

    def test_the_first_leader_begins_at_once(self) -> None:
        lead = machine()
        self.assertEqual(lead.to_try(), ["office"])
        actions = lead.answered(10.0, 10.1, {"office": Prior.NOBODY}, {})
        self.assertEqual(actions, [Lead("office", 0.0)])
        self.assertTrue(lead.may_read("office", 10.2))
        self.assertEqual(lead.to_try(), [], "a lock held is not asked for again")

    def test_a_restart_of_this_instance_begins_at_once(self) -> None:
        actions = machine().answered(0.0, 0.1, {"office": Prior.THIS_INSTANCE}, {})
        self.assertEqual(actions, [Lead("office", 0.0)])

    def test_taking_over_from_another_waits_until_its_lease_has_run_out(self) -> None:
        lead = machine()
        actions = lead.answered(50.0, 50.2, {"office": Prior.OTHER}, {})
        self.assertEqual(actions, [Lead("office", RULES.lease_seconds)])
        self.assertEqual(lead.lease["office"].takeovers, 1)

    def test_a_standby_stays_standby_and_knows_who_leads(self) -> None:
        lead = machine()
        self.assertEqual(lead.answered(1.0, 1.1, {}, {"office": "rhodes-2"}), [])
        self.assertEqual(lead.lease["office"].role, Role.STANDBY)
        self.assertEqual(lead.lease["office"].leader, "rhodes-2")
        self.assertFalse(lead.may_read("office", 1.2))
        self.assertEqual(lead.to_try(), ["office"], "it asks again at the next heartbeat")

    def test_the_lease_runs_out_lease_seconds_after_the_last_answered_heartbeat_was_sent(
            self) -> None:
        lead = machine()
        lead.answered(100.0, 100.5, {"office": Prior.NOBODY}, {})
        lead.answered(101.0, 102.9, {}, {})  # sent at 101, answered late
        self.assertTrue(lead.may_read("office", 104.99))
        self.assertFalse(lead.may_read("office", 105.0), "a frozen leader reads nothing")
        self.assertEqual(lead.tick(105.0), [Hold("office", "no heartbeat answered in time")])
        self.assertEqual(lead.lease["office"].role, Role.LOST)
        self.assertEqual(lead.tick(106.0), [], "held once")

    def test_a_late_heartbeat_on_the_same_session_resumes(self) -> None:
        lead = machine()
        lead.answered(0.0, 0.1, {"office": Prior.NOBODY}, {})
        lead.tick(4.0)
        actions = lead.answered(5.0, 5.1, {}, {})  # the session (and its lock) lived
        self.assertEqual(actions, [Resume("office", "the lease is confirmed again")])
        self.assertTrue(lead.may_read("office", 5.2))

    def test_an_answer_older_than_the_lease_trusts_nothing(self) -> None:
        lead = machine()
        actions = lead.answered(0.0, 4.5, {"office": Prior.NOBODY}, {})
        self.assertEqual(actions, [Lead("office", 0.0), Hold("office",
                                                             "no heartbeat answered in time")])
        self.assertFalse(lead.may_read("office", 4.5))

    def test_a_lost_connection_holds_every_box_it_led(self) -> None:
        lead = machine("office", "annex", "depot")
        lead.answered(0.0, 0.1, {"office": Prior.NOBODY, "annex": Prior.NOBODY},
                      {"depot": "rhodes-2"})
        actions = lead.failed(1.0, "terminated")
        self.assertEqual(actions, [Hold("office", "terminated"), Hold("annex", "terminated")])
        self.assertFalse(lead.may_read("office", 1.0))
        self.assertEqual(sorted(lead.to_try()), ["annex", "depot", "office"])

    def test_the_lock_again_with_the_same_term_resumes_the_held_lines(self) -> None:
        lead = machine()
        lead.answered(0.0, 0.1, {"office": Prior.NOBODY}, {})
        lead.failed(1.0, "restart")
        actions = lead.answered(2.0, 2.1, {"office": Prior.SAME_TERM}, {})
        self.assertEqual(actions, [Resume("office", "the lock is this instance's again;"
                                                    " nobody led in between")])

    def test_the_lock_again_after_another_led_starts_afresh(self) -> None:
        lead = machine()
        lead.answered(0.0, 0.1, {"office": Prior.NOBODY}, {})
        lead.failed(1.0, "cut")
        actions = lead.answered(9.0, 9.1, {"office": Prior.OTHER}, {})
        self.assertEqual(actions, [Drop("office", "another instance led it meanwhile"),
                                   Lead("office", RULES.lease_seconds)])

    def test_refused_after_a_loss_drops_the_box(self) -> None:
        lead = machine()
        lead.answered(0.0, 0.1, {"office": Prior.NOBODY}, {})
        lead.failed(1.0, "terminated")
        actions = lead.answered(2.0, 2.1, {}, {"office": "rhodes-2"})
        self.assertEqual(actions, [Drop("office", "rhodes-2 leads it now")])
        self.assertEqual(lead.lease["office"].role, Role.STANDBY)

    def test_an_unreachable_database_reads_on_into_the_spool(self) -> None:
        lead = machine("office", "depot")
        lead.answered(0.0, 0.1, {"office": Prior.NOBODY}, {"depot": "rhodes-2"})
        lead.failed(1.0, "server closed the connection")
        actions = lead.cannot_connect(1.1)
        self.assertEqual(actions, [Resume("office", "the database is unreachable: reading"
                                                    " on into the spool")])
        self.assertTrue(lead.may_read("office", 500.0), "no heartbeat can come meanwhile")
        self.assertFalse(lead.may_read("depot", 500.0), "a standby stays standby")
        self.assertEqual(lead.tick(500.0), [])
        # reachable again: the lock is asked for; another took it meanwhile -> dropped
        actions = lead.answered(600.0, 600.1, {}, {"office": "rhodes-2"})
        self.assertEqual(actions, [Drop("office", "rhodes-2 leads it now")])

    def test_after_an_outage_the_same_term_reads_on_without_a_break(self) -> None:
        lead = machine()
        lead.answered(0.0, 0.1, {"office": Prior.NOBODY}, {})
        lead.failed(1.0, "server closed the connection")
        lead.cannot_connect(1.1)
        self.assertEqual(lead.answered(60.0, 60.1, {"office": Prior.SAME_TERM}, {}), [])
        self.assertTrue(lead.may_read("office", 60.2))
        self.assertFalse(lead.may_read("office", 64.0), "heartbeats count again")

    def test_a_session_lost_after_an_outage_holds_again(self) -> None:
        lead = machine()
        lead.answered(0.0, 0.1, {"office": Prior.NOBODY}, {})
        lead.failed(1.0, "gone")
        lead.cannot_connect(1.1)
        # connected again, but the first heartbeat failed: the server is there
        self.assertEqual(lead.failed(30.0, "heartbeat failed"),
                         [Hold("office", "heartbeat failed")])
        self.assertFalse(lead.may_read("office", 30.0))

    def test_stopping_drops_what_it_leads(self) -> None:
        lead = machine("office", "depot")
        lead.answered(0.0, 0.1, {"office": Prior.NOBODY}, {"depot": None})
        self.assertEqual(lead.stopping(), [Drop("office", "dpvoip is stopping")])

    def test_the_heartbeat_must_be_quicker_than_the_lease(self) -> None:
        with self.assertRaises(ValueError):
            LeaseRules(lease_seconds=1.0, heartbeat_seconds=1.0)


class Ingest:
    def __init__(self) -> None:
        self.happenings: list[Any] = []

    def submit(self, happening: Any, origin: Any) -> defer.Deferred[None]:
        self.happenings.append(happening)
        return defer.succeed(None)

    async def close_open_calls(self, *args: Any) -> int:
        return 0


def box_on_the_wire(clock: Clock) -> tuple[FritzBox, Ingest, CallMonitorProtocol,
                                           StringTransport]:
    ingest = Ingest()
    box = FritzBox(replace(FritzBoxSettings(), clock_tolerance_seconds=0), ingest, clock,
                   frozenset())
    protocol = CallMonitorProtocol(box, clock)
    transport = StringTransport()
    protocol.makeConnection(transport)
    return box, ingest, protocol, transport


RING = b"01.07.26 10:00:00;RING;0;6912345678;2107654321;SIP0;\r\n"
CONNECT = b"01.07.26 10:00:05;CONNECT;0;11;6912345678;\r\n"
END = b"01.07.26 10:00:35;DISCONNECT;0;30;\r\n"


class HeldBoxTests(SynchronousTestCase):
    """The gate on every line: a box whose lead is not sure records nothing."""

    def test_a_line_read_with_the_gate_shut_waits_and_the_rest_stay_unread(self) -> None:
        clock = Clock()
        clock.advance(1_782_900_000)
        box, ingest, protocol, transport = box_on_the_wire(clock)
        open_gate = [True]
        box.gate = lambda: open_gate[0]
        protocol.dataReceived(RING)
        self.assertEqual(len(ingest.happenings), 1)
        open_gate[0] = False  # say, the process was frozen: the lease ran out
        protocol.dataReceived(CONNECT + END)
        self.assertEqual(len(ingest.happenings), 1, "nothing recorded")
        self.assertEqual(transport.producerState, "paused", "the socket is not read")
        self.assertEqual([text for text, _ in box.held], [CONNECT.decode().strip()])
        open_gate[0] = True
        box.resume()
        self.assertEqual([type(h).__name__ for h in ingest.happenings],
                         ["Started", "Answered", "Ended"], "every line, in order, once")
        self.assertEqual(transport.producerState, "producing")

    def test_dropped_the_held_lines_are_forgotten_and_the_connection_aborted(self) -> None:
        clock = Clock()
        box, ingest, protocol, transport = box_on_the_wire(clock)
        box.gate = lambda: False
        protocol.dataReceived(RING)
        box.drop()
        self.assertEqual(box.held, [])
        self.assertEqual(ingest.happenings, [])
        self.assertTrue(transport.disconnecting)

    def test_a_connection_made_without_the_lead_is_aborted_unread(self) -> None:
        clock = Clock()
        ingest = Ingest()
        box = FritzBox(FritzBoxSettings(), ingest, clock, frozenset())
        box.gate = lambda: False
        protocol = CallMonitorProtocol(box, clock)
        transport = StringTransport()
        protocol.makeConnection(transport)
        self.assertTrue(transport.disconnecting)
        self.assertIsNone(box.connection)
        self.assertEqual(box.status.connections, 0)


class FakeLease:
    """The lease connection's contract, answered by the test."""

    def __init__(self, instance: str = "athens-1") -> None:
        self.instance = instance
        self.connected = False
        self.answers: list[defer.Deferred[Tried]] = []
        self.asked: list[list[str]] = []
        self.connects: list[defer.Deferred[None]] = []
        self.closed = 0
        self.on_lost: Any = None
        self.terms: dict[str, str] = {}

    def connect(self) -> defer.Deferred[None]:
        attempt: defer.Deferred[None] = defer.Deferred()
        self.connects.append(attempt)

        def up(_: object) -> None:
            self.connected = True

        return attempt.addCallback(up)

    def heartbeat(self, boxes: Sequence[str]) -> defer.Deferred[Tried]:
        self.asked.append(list(boxes))
        answer: defer.Deferred[Tried] = defer.Deferred()
        self.answers.append(answer)
        return answer

    def last_term(self, box: str) -> str | None:
        return self.terms.get(box)

    def close(self) -> None:
        self.closed += 1
        self.connected = False


class Reader:
    def __init__(self) -> None:
        self.running: int | bool = False
        self.starts = 0
        self.stops = 0

    def startService(self) -> None:
        self.running = True
        self.starts += 1

    def stopService(self) -> None:
        self.running = False
        self.stops += 1


class LeadershipServiceTests(SynchronousTestCase):
    """``BoxLeadership`` on a ``Clock``: the machine's actions carried out."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.box, self.ingest, self.protocol, self.transport = box_on_the_wire(self.clock)
        self.monitor, self.calls = Reader(), Reader()
        self.lease = FakeLease()
        self.led = LedBox(self.box, self.monitor, self.clock, self.calls)
        self.service = BoxLeadership([self.led], self.lease,  # type: ignore[arg-type]
                                     self.clock, lambda: defer.succeed(None), RULES)
        self.service.startService()
        self.lease.connects[0].callback(None)

    def tearDown(self) -> None:
        self.service.stopService()

    def test_one_instance_leads_at_once_and_reads(self) -> None:
        self.assertEqual(self.lease.asked, [["office"]])
        self.lease.terms["office"] = "athens-1 t1"
        self.lease.answers[0].callback(Tried({"office": None}, {}))
        self.clock.advance(0)
        self.assertEqual((self.monitor.starts, self.calls.starts), (1, 1))
        self.assertTrue(self.service.leads("office"))
        self.assertEqual(self.service.describe("office")["leader"], True)
        self.protocol.dataReceived(RING)
        self.assertEqual(len(self.ingest.happenings), 1)
        self.clock.advance(1.0)
        self.assertEqual(self.lease.asked[-1], [], "a leader's heartbeat asks for nothing")

    def test_a_standby_asks_every_heartbeat_and_takes_over_after_the_old_lease(self) -> None:
        self.lease.answers[0].callback(Tried({}, {"office": "rhodes-2"}))
        self.assertEqual(self.service.describe("office")["led_by"], "rhodes-2")
        for second in range(1, 4):
            self.clock.advance(1.0)
            self.assertEqual(len(self.lease.asked), second + 1)
            self.lease.answers[-1].callback(Tried({}, {"office": "rhodes-2"}))
        self.assertEqual(self.monitor.starts, 0, "no connection to a box another reads")
        self.clock.advance(1.0)
        self.lease.answers[-1].callback(Tried({"office": "rhodes-2 t9"}, {}))
        self.assertTrue(self.service.leads("office"))
        self.clock.advance(RULES.lease_seconds - 0.1)
        self.assertEqual(self.monitor.starts, 0, "rhodes-2 may still trust its lease")
        self.clock.advance(0.1)
        self.assertEqual(self.monitor.starts, 1)
        self.assertEqual(self.service.describe("office")["takeovers"], 1)

    def test_a_frozen_leader_wakes_reads_nothing_and_becomes_standby(self) -> None:
        self.lease.answers[0].callback(Tried({"office": None}, {}))
        self.clock.advance(0)
        self.protocol.dataReceived(RING)
        self.lease.answers[-1].addErrback(lambda _: None)
        # Frozen for 30 s: no timer ran; the first thing it does is read a waiting line.
        self.clock.rightNow += 30.0
        self.protocol.dataReceived(END)
        self.assertEqual(len(self.ingest.happenings), 1, "the buffered line is not read")
        self.assertEqual(self.calls.running, False, "the call list stops too")
        # The server ended its session meanwhile; another instance leads now.
        self.lease.on_lost("terminating connection due to idle-session timeout")
        self.clock.advance(1.0)
        self.lease.connects[-1].callback(None)
        self.lease.answers[-1].callback(Tried({}, {"office": "rhodes-2"}))
        self.clock.advance(0)
        self.assertTrue(self.transport.disconnecting, "the box's connection dropped")
        self.assertEqual(self.monitor.stops, 1)
        self.assertEqual(self.service.describe("office")["role"], "standby")
        self.assertEqual(len(self.ingest.happenings), 1, "nothing recorded twice")

    def test_two_database_restarts_in_a_row_never_drop_the_box(self) -> None:
        self.lease.terms["office"] = "athens-1 t1"
        self.lease.answers[0].callback(Tried({"office": None}, {}))
        self.clock.advance(0)
        for restart, (before, written) in enumerate([("t1", "t2"), ("t2", "t3")]):
            self.lease.on_lost("server closed the connection unexpectedly")
            self.clock.advance(1.0)
            self.lease.connects[-1].errback(OSError("refused"))  # the server is away
            self.assertTrue(self.service.may_read("office"), "read into the spool")
            self.clock.advance(5.0)
            self.lease.connects[-1].callback(None)
            self.lease.terms["office"] = f"athens-1 {written}"
            self.lease.answers[-1].callback(Tried({"office": f"athens-1 {before}"}, {}))
            self.clock.advance(0)
            self.assertTrue(self.service.may_read("office"), f"restart {restart + 1}")
        self.assertEqual(self.monitor.stops, 0)
        self.assertFalse(self.transport.disconnecting)

    def test_a_lead_held_while_it_settles_still_begins(self) -> None:
        self.lease.terms["office"] = "athens-1 t1"
        self.lease.answers[0].callback(Tried({"office": "rhodes-2 t0"}, {}))
        self.clock.advance(1.0)  # settling: rhodes-2's lease may still run
        self.lease.answers[-1].errback(OSError("terminated"))  # this heartbeat failed
        self.assertEqual(self.service.describe("office")["role"], "lost")
        self.clock.advance(1.0)
        self.lease.connects[-1].callback(None)
        self.lease.terms["office"] = "athens-1 t2"
        self.lease.answers[-1].callback(Tried({"office": "athens-1 t1"}, {}))
        self.assertEqual(self.monitor.starts, 0, "still settling")
        for _ in range(2):  # heartbeats answered, until the settling is over (at 4 s)
            self.clock.advance(1.0)
            self.lease.answers[-1].callback(Tried({}, {}))
        self.assertEqual(self.monitor.starts, 1)

    def test_the_status_reporter_writes_only_the_boxes_this_instance_leads(self) -> None:
        written: list[Any] = []

        class Store:
            def write(self, work: Any) -> defer.Deferred[None]:
                written.append(work)
                return defer.succeed(None)

        reporter = BoxStatusReporter([self.box], Store(), self.clock,  # type: ignore[arg-type]
                                     leads=self.service.leads)
        reporter.report()
        self.assertEqual(written, [], "a standby does not say 'not connected'")
        self.lease.answers[0].callback(Tried({"office": None}, {}))
        reporter.report()
        self.assertEqual(len(written), 1)

    def test_stopping_drops_the_box_before_the_lock_is_released(self) -> None:
        self.lease.answers[0].callback(Tried({"office": None}, {}))
        self.clock.advance(0)
        order: list[str] = []
        self.monitor.stopService = lambda: order.append("box")  # type: ignore[method-assign]
        self.lease.close = lambda: order.append("lock")  # type: ignore[method-assign]
        stopping = self.service.stopService()
        self.clock.advance(0)
        self.successResultOf(stopping)
        self.assertEqual(order, ["box", "lock"])


class NamesTests(SynchronousTestCase):
    def test_the_lock_key_is_stable_and_an_oid(self) -> None:
        self.assertEqual(box_key("office"), box_key("office"))
        self.assertNotEqual(box_key("office"), box_key("annex"))
        # pinned: a key that changed between versions would let an old and a new
        # instance lead one box at once during a rolling update
        self.assertEqual(box_key("office"), 1556346920)
        self.assertTrue(0 <= box_key("x" * 300) < 2**31)

    def test_the_session_name_fits_postgresql_and_reads_back(self) -> None:
        self.assertEqual(instance_of(application_name("athens-1")), "athens-1")
        long = application_name("h" * 40 + ":/var/lib/dpvoip/state")
        self.assertLessEqual(len(long.encode()), 63)
        self.assertIsNone(instance_of("dpvoip"))

    def test_the_instance_name_defaults_to_host_and_state_folder(self) -> None:
        import socket

        config = Config()
        self.assertEqual(instance_name(config, Path("/srv")),
                         f"{socket.gethostname()}:/srv/var")
        named = replace(config, instance=InstanceSettings(name="athens-1"))
        self.assertEqual(instance_name(named, Path("/srv")), "athens-1")

    def test_a_bad_instance_name_is_refused_with_the_key(self) -> None:
        for bad in ("x" * 49, " athens", "a\tb"):
            with self.assertRaises(ConfigError) as raised:
                from_toml(parse(f'[instance]\nname = "{bad}"\n', "f"), "f")
            self.assertIn("[instance] name", str(raised.exception))


class CheckLinesTests(SynchronousTestCase):
    """``dpvoip check``: which instance leads each box, from the locks it read."""

    def test_each_box_says_who_leads_it_and_each_instance_what_it_leads(self) -> None:
        from dpvoip.check import box_lines, instances_line
        from dpvoip.store.leases import Holders

        holders = Holders({box_key("office"): "athens-1"}, ("athens-1", "rhodes-2"))
        office = replace(FritzBoxSettings(), name="office")
        annex = replace(FritzBoxSettings(), name="annex")
        lines = box_lines([office, annex], {}, holders)
        self.assertTrue(lines[0].endswith("; led by athens-1"), lines[0])
        self.assertTrue(lines[1].endswith("; led by no instance (no dpvoip reads it now)"),
                        lines[1])
        self.assertEqual(instances_line(holders, ["office", "annex"]),
                         "instances: athens-1 (leads office); rhodes-2 (standby)")


class VisibilityTests(SynchronousTestCase):
    """``/readyz`` and ``/metrics`` read the lead from ``BoxLeadership`` at each request."""

    def test_the_lead_in_readyz_and_metrics(self) -> None:
        from dpvoip.metrics import DaemonMetrics, Sources
        from dpvoip.readiness import ReadinessReport
        from test.test_service import FakeDirectory, FakeDurable, FakeSpool, KeepsCounters

        clock = Clock()
        box, *_ = box_on_the_wire(clock)
        lease = FakeLease("rhodes-2")
        service = BoxLeadership([LedBox(box, Reader(), clock)], lease,  # type: ignore[arg-type]
                                clock, lambda: defer.succeed(None), RULES)
        service.startService()
        self.addCleanup(service.stopService)
        lease.connects[0].callback(None)
        lease.answers[0].callback(Tried({}, {"office": "athens-1"}))

        class Database:
            def state(self) -> defer.Deferred[Any]:
                class State:
                    reachable, live_connections = True, 1
                return defer.succeed(State())

        from dpvoip.deferreds import OneShotObserver

        ready = ReadinessReport(Database(), OneShotObserver(), True, False,
                                FakeDirectory(), FakeSpool(), FakeDurable(), [box], leases=service)
        checks = self.successResultOf(ready()).checks
        self.assertEqual({k: checks["fritzbox"][0][k] for k in ("leader", "role", "led_by")},
                         {"leader": False, "role": "standby", "led_by": "athens-1"})
        self.assertEqual(checks["instance"], "rhodes-2")

        page = DaemonMetrics(Sources(
            spool=FakeSpool(), durable=FakeDurable(), ingest=KeepsCounters(_Ingested()),
            webhook=KeepsCounters(_Webhook()), boxes=[box], directory=FakeDirectory(),
            leases=service))
        self.assertIn('dpvoip_box_leader{box="office"} 0.0', page.exposition().decode())
        clock.advance(1.0)
        lease.answers[-1].callback(Tried({"office": "athens-1 t1"}, {}))
        shown = page.exposition().decode()
        self.assertIn('dpvoip_box_leader{box="office"} 1.0', shown)
        self.assertIn('dpvoip_box_takeovers_total{box="office"} 1.0', shown)


@dataclass
class _Webhook:
    refused: dict[int, int] = field(default_factory=dict)


@dataclass
class _Ingested:
    calls: int = 0
