"""``dpvoip zadarma-call``: scripted calls sent as Zadarma's signed webhooks.

The script and its plan are plain data (tested without a network); the caller's pace is
driven by a ``Clock``; and the shipped demo script, played into a daemon as wired on a real
PostgreSQL, leaves the calls in the CRM's tables. A daemon that keeps Zadarma's default
allow-list refuses the local sender, and its log line names the setting that lets it in.
"""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast
from zoneinfo import ZoneInfo

import treq
from treq.testing import StubTreq
from twisted.internet import defer, reactor
from twisted.internet.task import Clock, deferLater
from twisted.logger import ILogObserver, LogEvent, formatEvent, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.client import HTTPConnectionPool
from twisted.web.resource import Resource
from twisted.web.server import Request

from dpvoip.config import Secret, SpoolSettings, ZadarmaSettings
from dpvoip.service import Daemon, build
from dpvoip.testing.zadarma_caller import (
    Delivery,
    ScriptError,
    ZadarmaCaller,
    parse_script,
    plan,
    signed,
)
from dpvoip.zadarma.events import parse_event
from dpvoip.zadarma.signing import verify_webhook
from test.support.crm import Crm
from test.support.crm_rules import crm_findings
from test.support.daemon import PATIENCE, scratch
from test.support.postgres import postgres
from test.support.wiring import in_process
from test.test_database import eventually

SCENARIOS = Path(__file__).resolve().parent.parent / "etc" / "scenarios"
DEMO = SCENARIOS / "zadarma-demo.txt"
ATHENS = ZoneInfo("Europe/Athens")
SECRET = "demo-secret"


def ids(*values: str) -> Any:
    """A source of pbx_call_id digits that gives ``values`` in turn."""
    it = iter(values)
    return lambda: next(it)


class ScriptTests(SynchronousTestCase):
    def test_the_spec_vector_is_what_the_sender_signs(self) -> None:
        # zadarma.md 1.2: NOTIFY_START of +442012345678 to 442000000000 at 10:00:00.
        script = parse_script("0 a NOTIFY_START caller_id=+442012345678 "
                              "called_did=442000000000")
        start = datetime(2024, 1, 1, 10, 0, tzinfo=UTC).timestamp()
        (webhook,) = plan(script, start, UTC, ids("c" * 40))
        self.assertEqual(webhook.form, {
            "event": "NOTIFY_START", "call_start": "2024-01-01 10:00:00",
            "pbx_call_id": "in_" + "c" * 40, "caller_id": "+442012345678",
            "called_did": "442000000000"})
        body, headers = signed(webhook, "testsecret")
        self.assertEqual(headers["Signature"],
                         ["OWE3YzE0ZDRjZWE1YWRlMGQ4YjM0NDQ2MTFjODJjMjNlZjA0ODcwZg=="])
        self.assertEqual(headers["Content-Type"], ["application/x-www-form-urlencoded"])
        self.assertIn(b"caller_id=%2B442012345678", body)

    def test_a_call_shares_its_id_and_start_and_carries_what_each_event_has(self) -> None:
        script = parse_script(
            "2 a NOTIFY_START caller_id=6912345678 called_did=302107654321\n"
            "1 a NOTIFY_INTERNAL internal=100 calltype=normal\n"
            "6 a NOTIFY_ANSWER destination=302107654321\n"
            '25 a NOTIFY_END duration=25 disposition="no answer"\n'
            "3 a NOTIFY_RECORD call_id_with_rec=1.2\n"
            "1 b NOTIFY_OUT_START internal=101 destination=2310555123\n")
        start = datetime(2026, 7, 1, 9, 0, tzinfo=UTC).timestamp()
        hooks = plan(script, start, ATHENS, ids("1" * 40, "2" * 40))
        start_, internal, answer, end, record, out = (h.form for h in hooks)
        self.assertEqual(start_["call_start"], "2026-07-01 12:00:02")  # Athens, summer
        self.assertEqual({h.form["pbx_call_id"] for h in hooks[:5]}, {"in_" + "1" * 40})
        self.assertEqual(out["pbx_call_id"], "out_" + "2" * 40)
        self.assertEqual(out["call_start"], "2026-07-01 12:00:38")
        self.assertTrue(all(h.form.get("call_start") in (None, "2026-07-01 12:00:02")
                            for h in hooks[:5]))
        self.assertEqual(internal["called_did"], "302107654321")
        # NOTIFY_ANSWER has a destination, not the called number; NOTIFY_END the reverse.
        self.assertNotIn("called_did", answer)
        self.assertEqual((answer["internal"], answer["calltype"]), ("100", "normal"))
        self.assertNotIn("destination", end)
        self.assertEqual((end["internal"], end["disposition"]), ("100", "no answer"))
        self.assertEqual(record, {"event": "NOTIFY_RECORD", "pbx_call_id": "in_" + "1" * 40,
                                  "call_id_with_rec": "1.2"})
        self.assertEqual([h.delay for h in hooks], [2, 1, 6, 25, 3, 1])
        self.assertEqual(hooks[-1].at - start, script.duration)

    def test_bad_lines_are_refused_naming_the_line(self) -> None:
        for text, problem in [
            ("", "no events"),
            ("# only a comment\n", "no events"),
            ("1 a NOTIFY_START caller_id=1\nx a NOTIFY_END", "line 2: 'x' is not a delay"),
            ("-1 a NOTIFY_START", "line 1: delay -1 is not between"),
            ("nan a NOTIFY_START", "line 1: delay nan"),
            ("1 a NOTIFY_STRAT", "line 1: 'NOTIFY_STRAT' is not an event"),
            ("1 a", "line 1: expected"),
            ("1 a/b NOTIFY_START", "is not a call name"),
            ("1 a NOTIFY_START call_start=2024-01-01", "call_start is filled in"),
            ("1 a NOTIFY_START pbx_call_id=in_x", "pbx_call_id is filled in"),
            ("1 a NOTIFY_START caller_id", "'caller_id' is not field=value"),
            ("1 a NOTIFY_START caller_id=1 caller_id=2", "caller_id is given twice"),
            ('1 a NOTIFY_END disposition="no answer', "line 1: cannot read it"),
            ("1 a NOTIFY_START caller_id=" + "1" * 201, "longer than 200"),
        ]:
            with self.assertRaises(ScriptError, msg=text) as raised:
                parse_script(text)
            self.assertIn(problem, str(raised.exception))

    def test_every_shipped_zadarma_script_is_taken_by_dpvoips_own_checks(self) -> None:
        shipped = sorted(SCENARIOS.glob("zadarma-*.txt"))
        self.assertIn(DEMO, shipped)
        for path in shipped:
            hooks = plan(parse_script(path.read_text()), 1_780_000_000.0, ATHENS)
            for hook in hooks:
                _, headers = signed(hook, SECRET)
                self.assertTrue(verify_webhook(SECRET, hook.form, headers["Signature"][0]),
                                (path.name, hook.form))
                parse_event(hook.form)  # raises BadEvent for a form dpvoip cannot read
            self.assertLess(parse_script(path.read_text()).duration, 600,
                            "call_start must stay within dpvoip's freshness window")


class Webhooks(Resource):
    """A stand-in for /voip/zd/ that records what arrives and answers ``code``."""

    isLeaf = True

    def __init__(self, code: int = 200) -> None:
        super().__init__()
        self.code = code
        self.received: list[dict[bytes, list[bytes]]] = []

    def render_POST(self, request: Request) -> bytes:
        self.received.append(dict(request.args))
        request.setResponseCode(self.code)
        return b""


class PaceTests(SynchronousTestCase):
    script = parse_script("2 a NOTIFY_START caller_id=1 called_did=2\n"
                          "10 a NOTIFY_END duration=0 disposition=cancel\n")

    def play(self, site: Webhooks) -> tuple[Clock, list[Delivery], defer.Deferred[Any]]:
        clock = Clock()
        shown: list[Delivery] = []
        caller = ZadarmaCaller("http://dpvoip.test/voip/zd/", SECRET, StubTreq(site),
                               lambda s: deferLater(clock, s), report=shown.append)
        done = defer.Deferred.fromCoroutine(caller.play(plan(self.script, 0.0, UTC)))
        return clock, shown, done

    def test_each_event_waits_for_its_delay(self) -> None:
        site = Webhooks()
        clock, shown, done = self.play(site)
        clock.advance(1.9)
        self.assertEqual(site.received, [])
        clock.advance(0.1)
        self.assertEqual([r[b"event"] for r in site.received], [[b"NOTIFY_START"]])
        clock.advance(9.9)
        self.assertEqual(len(site.received), 1)
        clock.advance(0.1)
        self.assertEqual([d.status for d in self.successResultOf(done)], [200, 200])
        self.assertEqual([d.webhook.event for d in shown], ["NOTIFY_START", "NOTIFY_END"])

    def test_a_refused_sender_stops_at_the_first_refusal(self) -> None:
        site = Webhooks(403)
        clock, _, done = self.play(site)
        clock.advance(2)
        self.assertEqual([d.status for d in self.successResultOf(done)], [403])
        self.assertEqual(len(site.received), 1)


class DaemonCase(TestCase):
    """A daemon as wired, on a real PostgreSQL, taking webhooks from ``allowed``."""

    timeout = 2 * PATIENCE
    allowed: tuple[str, ...] = ("185.45.152.40/30", "127.0.0.1/32")

    def setUp(self) -> Any:
        self.dsn = postgres().new_database(crm="2026-08")
        self.crm = Crm(self.dsn)
        self.http = HTTPConnectionPool(reactor, persistent=False)
        self.addCleanup(self.http.closeCachedConnections)
        zadarma = replace(ZadarmaSettings(), secret=Secret(SECRET), timezone="Europe/Athens",
                          allowed_networks=self.allowed, create_tickets=True)
        config = in_process(self.dsn, zadarma=zadarma,
                            spool=replace(SpoolSettings(), deadline_seconds=60.0))
        self.daemon: Daemon = build(config, reactor, scratch(self))
        self.client = self.crm.client("Papadopoulos AE", kinito_tilefono="691 234 5678")

        async def start() -> None:
            self.daemon.service.startService()
            self.addCleanup(self.daemon.service.stopService)
            await self.daemon.service.started
            await eventually(lambda: self.daemon.directory.state.built, PATIENCE)

        return defer.Deferred.fromCoroutine(start())

    def tearDown(self) -> None:
        self.assertEqual(crm_findings(self.dsn), [])

    async def play(self) -> list[Delivery]:
        port = self.daemon.web.port.getHost().port  # type: ignore[union-attr]
        script = parse_script(DEMO.read_text())
        # Sent at once, dated as if the calls had just happened: what --at-once does.
        start = reactor.seconds() - script.duration - 1
        caller = ZadarmaCaller(f"http://127.0.0.1:{port}/voip/zd/", SECRET, treq,
                               lambda s: defer.succeed(None), pool=self.http)
        return await caller.play(plan(script, start, ATHENS))

    def calls(self) -> list[tuple[Any, ...]]:
        return self.crm.query(
            "SELECT direction, phone_number, status, duration_seconds, client_id,"
            " ticket_created, ticket_id FROM accounting_voipcall ORDER BY started_at")



class DemoIntoDaemonTests(DaemonCase):
    """The demo script played into a daemon that lets the local sender in."""

    @defer.inlineCallbacks
    def test_the_demo_calls_are_recorded_matched_and_ticketed(self) -> Any:
        deliveries = yield defer.Deferred.fromCoroutine(self.play())
        self.assertEqual([d.status for d in deliveries], [200] * 12)
        first = deliveries[0]
        self.assertEqual(first.webhook.event, "NOTIFY_START")
        self.assertIn("Papadopoulos AE", first.body.decode())  # the phones show the name
        calls = self.calls()
        self.assertEqual([c[:5] for c in calls], [
            ("incoming", "+306912345678", "completed", 25, self.client),
            ("incoming", "+306987654321", "missed", 0, None),
            ("incoming", "+306987654321", "missed", 0, None),
            ("outgoing", "+302310555123", "completed", 22, None),
        ])
        tickets = self.crm.query("SELECT id FROM accounting_ticket")
        self.assertEqual(len(tickets), 1)  # the second missed call joined the first's
        self.assertEqual([c[5] for c in calls], [False, True, True, False])
        self.assertEqual({c[6] for c in calls[1:3]}, {str(tickets[0][0])})


class DefaultAllowListTests(DaemonCase):
    """Zadarma's own addresses only: the local sender is refused, and told why."""

    allowed = ("185.45.152.40/30",)

    @defer.inlineCallbacks
    def test_a_local_sender_is_refused_and_the_log_names_the_setting(self) -> Any:
        events: list[LogEvent] = []
        observe = cast(ILogObserver, events.append)
        globalLogPublisher.addObserver(observe)
        self.addCleanup(globalLogPublisher.removeObserver, observe)
        deliveries = yield defer.Deferred.fromCoroutine(self.play())
        self.assertEqual([d.status for d in deliveries], [403])
        self.assertEqual(self.calls(), [])
        lines = [formatEvent(event) for event in events]
        refusal = [line for line in lines if "refused: not a Zadarma address" in line]
        self.assertEqual(len(refusal), 1, lines)
        self.assertIn("127.0.0.1", refusal[0])
        self.assertIn("DPVOIP_ZADARMA_ALLOWED_NETWORKS", refusal[0])
        self.assertIn("[zadarma] allowed_networks", refusal[0])
