"""End to end: the Fritz!Box simulator speaks the CallMonitor protocol over loopback TCP to
the daemon as the composition root wires it, into a real PostgreSQL with the CRM's
tables. Scenarios of fritzbox.md sections 4, 5 and 8, framing, and connection faults.

The simulator listens on a port the test holds from start to end (``HeldPort``): when a
script makes the box refuse connections for a while, no other process can take the port
before the box listens on it again. Waits are generous bounds on what must happen; only a
hang should fail a test, not a busy machine.
"""

from __future__ import annotations

import socket
from typing import Any

from twisted.internet import defer, reactor
from twisted.trial.unittest import TestCase

from dpvoip.config import (
    DirectorySettings,
)
from dpvoip.service import Daemon, build
from dpvoip.testing.fritzbox import FritzSimulator, parse_script
from test.support.crm import Crm
from test.support.crm_rules import crm_findings
from test.support.daemon import PATIENCE, scratch
from test.support.ports import HeldPort, HeldPortReactor
from test.support.postgres import postgres
from test.support.wiring import in_process, loopback_box
from test.test_database import eventually


class EndToEndTestCase(TestCase):
    timeout = 2 * PATIENCE
    crm_version = "2025-12"

    def setUp(self) -> None:
        self.dsn = postgres().new_database(crm=self.crm_version)
        self.crm = Crm(self.dsn)

    def tearDown(self) -> None:
        # Every row the scenario wrote is what the CRM's own code would keep there.
        self.assertEqual(crm_findings(self.dsn), [])

    async def _start(self, script: str, **box: Any) -> tuple[Daemon, FritzSimulator]:
        held = HeldPort()
        self.addCleanup(held.close)  # after the simulator has stopped
        simulator = FritzSimulator(HeldPortReactor(reactor, held), parse_script(script))
        port = await simulator.listen(0)
        self.addCleanup(simulator.stop)
        config = in_process(
            self.dsn, pool_size=4, directory=DirectorySettings(own_numbers=("2107654321",)),
            boxes=[loopback_box("office", port, reconnect_initial_seconds=0.2,
                                reconnect_max_seconds=1.0, **box)])
        daemon = build(config, reactor, scratch(self))
        daemon.service.startService()
        self.addCleanup(daemon.service.stopService)
        await daemon.service.started
        await eventually(lambda: daemon.directory.state.built, PATIENCE)
        self.played = simulator.run()
        return daemon, simulator

    def start(self, script: str, **box: Any) -> defer.Deferred[tuple[Daemon, FritzSimulator]]:
        return defer.Deferred.fromCoroutine(self._start(script, **box))

    def wait_for(self, sql: str, expected: Any,
                 seconds: float = PATIENCE) -> defer.Deferred[None]:
        last: list[Any] = []

        def check() -> bool:
            last[:] = self.crm.query(sql)
            return bool(last == expected)

        async def wait() -> None:
            try:
                await eventually(check, seconds)
            except AssertionError:
                raise AssertionError(f"{sql}\n  got {last}\n  expected {expected}") from None

        return defer.Deferred.fromCoroutine(wait())

    calls_sql = ("SELECT direction, phone_number, status, duration_seconds, notes, ticket_created"
                 " FROM accounting_voipcall ORDER BY started_at, id")


class SampleTests(EndToEndTestCase):
    @defer.inlineCallbacks
    def test_the_captures_of_section_8(self) -> Any:
        yield self.start(
            "0 17.06.20 10:28:29;RING;0;07191952123;69123;SIP0;\n"
            "0 17.06.20 10:28:43;CONNECT;0;11;07191952123;\n"
            "0 17.06.20 10:30:31;DISCONNECT;0;109;\n"
            "0 16.06.20 12:25:42;RING;1;01755290123;732123;SIP1;\n"
            "0 16.06.20 12:25:46;DISCONNECT;1;0;\n"
            "0 17.06.20 10:30:57;CALL;1;11;69123;952123;SIP0;\n"
            "0 17.06.20 10:31:00;DISCONNECT;1;0;\n"
            "0 17.06.20 10:32:16;CALL;1;11;69123;952123;SIP0;\n"
            "0 17.06.20 10:32:23;CONNECT;1;11;952123;\n"
            "0 17.06.20 10:37:34;DISCONNECT;1;312;\n"
            "0 28.08.10 10:22:07;RING;2;;123;ISDN;\n"
            "0 28.08.10 10:24:37;CONNECT;2;4;;\n"
            "0 28.08.10 10:25:37;DISCONNECT;2;60;\n"
            "0 13.09.25 18:08:20;RING;0;01781234567;123;SIP0;\n"
            "0 13.09.25 18:08:43;CONNECT;0;40;01781234567;\n"
            "0 13.09.25 18:09:13;DISCONNECT;0;30;\n",
            country="DE", timezone="Europe/Berlin", area_code="7191",
            clock_tolerance_seconds=0,  # captures of years ago: their dates believed
        )
        yield self.wait_for(self.calls_sql, [
            ("incoming", "withheld", "completed", 210, "answered on extension 4, talk 1:00",
             False),
            ("incoming", "+491755290123", "missed", 4, "missed", True),
            ("incoming", "+497191952123", "completed", 122,
             "answered on extension 11, talk 1:49", False),
            ("outgoing", "+497191952123", "failed", 3, "not reached", False),
            ("outgoing", "+497191952123", "completed", 318,
             "answered on extension 11, talk 5:12", False),
            ("incoming", "+491781234567", "missed", 53,
             "voicemail (answering machine 1), message 0:30", True),
        ])
        tickets = self.crm.query("SELECT title FROM accounting_ticket ORDER BY title")
        self.assertEqual(tickets, [("MISSED CALL - +491755290123",),
                                   ("MISSED CALL - +491781234567",)])
        # The outgoing number dialled without area code is local to the box (07191).
        self.assertEqual(self.crm.query("SELECT DISTINCT remote_number FROM dpvoip.call_detail"
                                        " WHERE direction = 'outgoing'"), [("+497191952123",)])


class TicketTests(EndToEndTestCase):
    @defer.inlineCallbacks
    def test_missed_calls_make_and_group_tickets_and_match_the_client(self) -> Any:
        client = self.crm.client("Papadopoulos AE", kinito_tilefono="691 234 5678")
        yield self.start(
            "0 {now};RING;0;6912345678;2107654321;SIP0;\n"
            "0 {now+6};DISCONNECT;0;0;\n"
            "0 {now+20};RING;1;6912345678;2107654321;SIP0;\n"
            "0 {now+27};DISCONNECT;1;0;\n"
            "0 {now+30};RING;0;2109998887;2107654321;SIP0;\n"
            "0 {now+30};DISCONNECT;0;0;\n"
        )
        yield self.wait_for(
            "SELECT phone_number, status, notes, client_id, ticket_created"
            " FROM accounting_voipcall ORDER BY started_at",
            [("+306912345678", "missed", "missed", client, True),
             ("+306912345678", "missed", "missed", client, True),
             ("+302109998887", "failed", "blocked by call barring", None, False)])
        tickets = self.crm.query("SELECT title, priority, client_id FROM accounting_ticket")
        self.assertEqual(tickets, [("MISSED CALLS (2x) - +306912345678 - Papadopoulos AE",
                                    "high", client)])

    @defer.inlineCallbacks
    def test_two_missed_calls_of_one_number_ending_in_one_segment_make_one_ticket(
        self,
    ) -> Any:
        yield self.start(
            "0 {now};RING;0;2101234567;2107654321;SIP0;\n"
            "0 {now};RING;1;2101234567;2107654321;SIP1;\n"
            "0.2 !raw {now+9};DISCONNECT;0;0;\\r\\n{now+9};DISCONNECT;1;0;\\r\\n\n"
        )
        yield self.wait_for("SELECT count(*), bool_and(ticket_created) FROM accounting_voipcall"
                            " WHERE status = 'missed'", [(2, True)])
        self.assertEqual(self.crm.query("SELECT title FROM accounting_ticket"),
                         [("MISSED CALLS (2x) - +302101234567",)])


class FramingTests(EndToEndTestCase):
    @defer.inlineCallbacks
    def test_lf_only_split_joined_and_bad_lines(self) -> Any:
        daemon, _ = yield self.start(
            "0 !raw {now};RING;0;2101111111;2107654321;SIP0;\\n{now+3};DISC\n"
            "0.1 !raw ONNECT;0;0;\\n\\n\n"
            "0.1 !raw garbage;;;\\r\\n{now+4};RING;1;2102222222;2107654321;SIP0;\\r\\n"
            "{now+4};DISCONNECT;1;0;\\r\\n\n"
            "0.1 !raw \\xff\\xfe;bad;\\r\\n\n"
        )
        yield self.wait_for("SELECT phone_number, status FROM accounting_voipcall"
                            " ORDER BY phone_number",
                            [("+302101111111", "missed"), ("+302102222222", "failed")])
        [box] = daemon.boxes
        yield defer.Deferred.fromCoroutine(eventually(lambda: box.status.bad_lines == 2,
                                                      PATIENCE))
        yield self.played
        self.assertEqual(box.status.bad_lines, 2)


class FaultTests(EndToEndTestCase):
    @defer.inlineCallbacks
    def test_a_reboot_in_the_middle_of_a_call(self) -> Any:
        # The first line 0.05 s after the connection, not in the same turn: the simulator
        # then sends it from a timer, and the reactor writes it before any later timer
        # (the reset) can run. Sent from the connection's own turn, it would be written a
        # turn later, and a busy machine's stall could let the reset, which drops what is
        # not written yet, come first.
        daemon, simulator = yield self.start(
            "0.05 {now};RING;0;2101111111;2107654321;SIP0;\n"
            "0 {now+1};CONNECT;0;11;2101111111;\n"
            "0.3 !reset\n"
            "0 !refuse 0.5\n"
            "0 !await\n"
            "0.2 {now};RING;0;2102222222;2107654321;SIP0;\n"
            "0 {now+5};DISCONNECT;0;0;\n"
            "0.3 !close\n"
            "0 !await\n"
            "0.2 {now};CALL;1;11;2107654321;2103333333;SIP0;\n"
            "0 {now+4};DISCONNECT;1;0;\n"
        )
        # The interrupted call ends when the link was lost (the daemon's clock, not the
        # box's whole seconds): its duration is whatever the CRM's own rule makes of that,
        # which tearDown checks; here it is left out.
        yield self.wait_for(self.calls_sql.replace(
            "duration_seconds", "CASE WHEN notes LIKE 'interrupted%%' THEN NULL"
            " ELSE duration_seconds END"), [
            ("incoming", "+302101111111", "failed", None, "interrupted: monitor connection lost",
             False),
            ("incoming", "+302102222222", "missed", 5, "missed", True),
            ("outgoing", "+302103333333", "failed", 4, "not reached", False),
        ])
        yield self.played
        [box] = daemon.boxes
        self.assertGreaterEqual(box.status.reconnects, 2)
        self.assertTrue(box.status.connected)
        # The daemon's own connection to the box has the short keepalive timers.
        assert box.connection is not None and box.connection.transport is not None
        handle: Any = box.connection.transport.getHandle()
        self.assertEqual(handle.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE), 1)
        self.assertEqual(handle.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE), 60)
        self.assertEqual(simulator.lines_dropped, 0)

    @defer.inlineCallbacks
    def test_calls_open_at_a_restart_are_closed_and_a_late_disconnect_recovers_one(
        self,
    ) -> Any:
        # The last run recorded a RING; then it died. The box still has the call open.
        first, simulator = yield self.start("0 {now-20};RING;3;2104444444;2107654321;SIP0;\n")
        yield self.wait_for("SELECT status FROM accounting_voipcall", [("active",)])
        yield first.service.stopService()
        yield simulator.stop()
        # The next run closes it at start, then hears its DISCONNECT and recovers it.
        yield self.start("0.5 {now};DISCONNECT;3;0;\n")
        yield self.wait_for("SELECT status, notes, ticket_created FROM accounting_voipcall",
                            [("missed", "missed: recovered after a reconnect", True)])

    @defer.inlineCallbacks
    def test_readiness_shows_the_box(self) -> Any:
        import json

        import treq
        from twisted.web.client import HTTPConnectionPool

        daemon, _ = yield self.start("0 {now};RING;0;2101111111;2107654321;SIP0;\n")
        yield self.wait_for("SELECT count(*) FROM accounting_voipcall", [(1,)])
        port = daemon.web.port.getHost().port
        pool = HTTPConnectionPool(reactor, persistent=False)
        response = yield treq.get(f"http://127.0.0.1:{port}/readyz", pool=pool)
        body = json.loads((yield response.content()))
        [box] = body["fritzbox"]
        self.assertEqual((box["name"], box["connected"], box["open_calls"], box["lines"]),
                         ("office", True, 1, 1))
        self.assertIsNotNone(box["since"])
        self.assertIsNotNone(box["last_line"])
        yield pool.closeCachedConnections()


class CheckTests(EndToEndTestCase):
    @defer.inlineCallbacks
    def test_dpvoip_check_shows_each_box(self) -> Any:
        import tempfile
        from pathlib import Path

        from dpvoip.fritzbox.service import BoxStatusReporter
        from test.support.daemon import BIN, clean_environment

        daemon, simulator = yield self.start("0 {now};RING;0;2101111111;2107654321;SIP0;\n")
        yield self.wait_for("SELECT count(*) FROM accounting_voipcall", [(1,)])
        yield BoxStatusReporter(daemon.boxes, daemon.store, reactor).report()
        config = Path(tempfile.mkdtemp()) / "dpvoip.toml"
        config.write_text(f'[[fritzbox]]\nname = "office"\nhost = "127.0.0.1"\n'
                          f'port = {simulator.port}\n'
                          '[[fritzbox]]\nname = "annex"\nhost = "10.0.0.2"\n')
        done = yield defer.Deferred.fromCoroutine(_run_in_thread(
            [str(BIN / "dpvoip"), "check", "--config", str(config)],
            clean_environment(DATABASE_URL=self.dsn)))
        self.assertEqual(done.returncode, 0, done.stdout + done.stderr)
        def line(prefix: str) -> str:
            [found] = [str(x) for x in done.stdout.splitlines() if x.startswith(prefix)]
            return found

        office = line(f"Fritz!Box office (127.0.0.1:{simulator.port}): ")
        self.assertIn("): connected since", office)
        self.assertIn("0 reconnects", office)
        self.assertNotIn("last line none", office)
        self.assertIn("no state reported yet", line("Fritz!Box annex (10.0.0.2:1012): "))


async def _run_in_thread(argv: list[str], env: dict[str, str]) -> Any:
    import subprocess

    from twisted.internet import threads

    return await threads.deferToThread(
        subprocess.run, argv, capture_output=True, text=True, env=env, timeout=PATIENCE,
        check=False)
