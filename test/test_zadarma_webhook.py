"""Zadarma webhooks over HTTP into the daemon as wired, into a real PostgreSQL: real event
sequences, duplicates and disorder, forged and spoofed requests, malformed bodies.
The test client signs as Zadarma does (the signing vectors are in test_zadarma_core)."""

from __future__ import annotations

import itertools
import json
from dataclasses import replace
from datetime import UTC, datetime, timedelta, timezone
from typing import Any
from urllib.parse import urlencode
from zoneinfo import ZoneInfo

import treq
from twisted.internet import defer, reactor
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.client import HTTPConnectionPool

from dpvoip.calls.ingest import ZadarmaContext
from dpvoip.config import (
    Secret,
    SpoolSettings,
    ZadarmaSettings,
)
from dpvoip.core.numbers import Dialling
from dpvoip.service import Daemon, build
from dpvoip.web.sources import networks
from dpvoip.web.zadarma import CurrentZadarmaContext, ZadarmaWebhook
from dpvoip.zadarma.account import ZadarmaAccountService
from dpvoip.zadarma.signing import webhook_signature
from test.support.crm import Crm
from test.support.crm_rules import crm_findings
from test.support.daemon import PATIENCE, scratch
from test.support.postgres import postgres
from test.support.wiring import in_process
from test.test_database import eventually
from test.test_web import SECRET as WEB_SECRET
from test.test_web import ZADARMA_PEER, Probe, Recorder, Wire, settings, signed_event

SECRET = "zd-test-secret"
ZADARMA = "185.45.152.41"
PBX = "in_" + "b" * 40
START = "2026-01-15 10:00:00"  # Athens winter time: 08:00 UTC
#: These tests' events keep their fixed date: the freshness window is opened wide (a
#: century) for them; test_zadarma_attacks tests the window at its default.
WIDE_HOURS = 24 * 365 * 100


def incoming(caller: str = "6912345678", answered: bool = True, pbx: str = PBX,
             start: str = START, did: str = "302107654321") -> list[dict[str, str]]:
    """An incoming call's events. Two calls of one caller to one number differ in their
    ``start`` (a signed string belongs to one call: test_zadarma_attacks)."""
    common = {"pbx_call_id": pbx, "call_start": start, "caller_id": caller}
    end = {"event": "NOTIFY_END", **common, "called_did": did,
           "duration": "95" if answered else "0",
           "disposition": "answered" if answered else "no answer", "status_code": "16",
           "is_recorded": "0", "calltype": "normal"}
    if answered:
        end["internal"] = "100"
    events = [
        {"event": "NOTIFY_START", **common, "called_did": did},
        {"event": "NOTIFY_INTERNAL", **common, "called_did": did, "internal": "100",
         "calltype": "normal"},
    ]
    if answered:
        events.append({"event": "NOTIFY_ANSWER", **common, "destination": "100",
                       "internal": "100", "calltype": "normal"})
    return [*events, end]


class WebhookTestCase(TestCase):
    """The daemon as wired, on a real PostgreSQL. An event's commit may take as long as it
    takes on a loaded machine (the spool's deadline at its maximum): the tests read the
    rows right after the answer, and the spool's deadline is test_fault_db's business."""

    timeout = 2 * PATIENCE  # a hang detector
    pool_size = 4
    crm_version = "2026-08"
    zadarma = replace(ZadarmaSettings(), secret=Secret(SECRET), timezone="Europe/Athens",
                      max_event_age_hours=WIDE_HOURS)

    def setUp(self) -> Any:
        self.dsn = postgres().new_database(crm=self.crm_version)
        self.crm = Crm(self.dsn)
        self.http = HTTPConnectionPool(reactor, persistent=False)
        self.addCleanup(self.http.closeCachedConnections)
        config = in_process(self.dsn, pool_size=self.pool_size, zadarma=self.zadarma,
                            spool=replace(SpoolSettings(), deadline_seconds=60.0))
        self.daemon: Daemon = build(config, reactor, scratch(self))

        async def start() -> None:
            self.daemon.service.startService()
            self.addCleanup(self.daemon.service.stopService)
            await self.daemon.service.started
            await eventually(lambda: self.daemon.directory.state.built, PATIENCE)

        return defer.Deferred.fromCoroutine(start())

    def tearDown(self) -> None:
        # Every row the test wrote is what the CRM's own code would keep there.
        self.assertEqual(crm_findings(self.dsn), [])

    @property
    def url(self) -> str:
        port = self.daemon.web.port.getHost().port  # type: ignore[union-attr]
        return f"http://127.0.0.1:{port}/voip/zd/"

    async def _post(self, form: dict[str, str], sender: str, signature: str | None,
                    content_type: str, body: bytes | None) -> tuple[int, bytes]:
        headers: dict[bytes | str, list[bytes | str]] = {
            "Content-Type": [content_type], "X-Forwarded-For": [sender]}
        if signature is not None:
            headers["Signature"] = [signature]
        data = body if body is not None else urlencode(form).encode()
        response = await treq.post(self.url, data=data, headers=headers, pool=self.http)
        return response.code, await response.content()

    def post(self, form: dict[str, str], sender: str = ZADARMA, signature: str | None = "",
             content_type: str = "application/x-www-form-urlencoded",
             body: bytes | None = None) -> defer.Deferred[tuple[int, bytes]]:
        if signature == "":
            signature = webhook_signature(SECRET, form)
        return defer.Deferred.fromCoroutine(
            self._post(form, sender, signature, content_type, body))

    async def _send_all(self, events: list[dict[str, str]]) -> list[int]:
        codes = []
        for form in events:
            code, _ = await self.post(form)
            codes.append(code)
        return codes

    def send_all(self, events: list[dict[str, str]]) -> defer.Deferred[list[int]]:
        return defer.Deferred.fromCoroutine(self._send_all(events))

    def requested(self, user_phone: str, number: str, ago: float = 5.0) -> None:
        """dpvoip's record of a click-to-call request (a callback it asked Zadarma for),
        made ``ago`` seconds before now: what a callback's legs must match."""
        self.crm.query(
            "INSERT INTO dpvoip.callback_request (requested_at, user_id, login,"
            " connection_id, from_number, number_given, number_dialled, result,"
            " http_status) VALUES (now() - make_interval(secs => %s), 1, 'anna', 1, %s,"
            " %s, %s, 'dialled', 200)", (ago, user_phone, number, number))

    def calls(self) -> list[tuple[Any, ...]]:
        return self.crm.query(
            "SELECT call_id, direction, phone_number, status, duration_seconds, notes,"
            " client_id, ticket_created, started_at::text FROM accounting_voipcall ORDER BY id")

    def logs(self) -> list[str]:
        return [r[0] for r in self.crm.query(
            "SELECT action FROM accounting_voipcalllog ORDER BY id")]


class EchoTests(WebhookTestCase):
    @defer.inlineCallbacks
    def test_the_url_check_echoes_the_token_before_any_other_check(self) -> Any:
        response = yield treq.get(self.url + "?zd_echo=a1b2c3", pool=self.http)
        self.assertEqual(response.code, 200)
        self.assertEqual((yield response.content()), b"a1b2c3")


class CallTests(WebhookTestCase):
    @defer.inlineCallbacks
    def test_an_incoming_answered_call_of_a_known_client(self) -> Any:
        client = self.crm.client("Papadopoulos AE", kinito_tilefono="691 234 5678")
        yield defer.Deferred.fromCoroutine(self.daemon.directory.build())
        events = incoming()
        code, body = yield self.post(events[0])
        self.assertEqual((code, json.loads(body)), (200, {"caller_name": "Papadopoulos AE"}))
        self.assertEqual((yield self.send_all(events[1:])), [200, 200, 200])
        self.assertEqual(self.calls(), [(
            f"zd-{PBX}", "incoming", "+306912345678", "completed", 95, "answered, talk 1:35",
            client,
            False, "2026-01-15 08:00:00+00",
        )])
        self.assertEqual(self.logs(), ["started", "client_matched", "ended"])
        detail = self.crm.query("SELECT source, pbx_call_id, extension, outcome, disposition"
                                " FROM dpvoip.call_detail")
        self.assertEqual(detail, [("zadarma", PBX, 100, "answered", "answered")])

    @defer.inlineCallbacks
    def test_an_unknown_caller_gets_an_empty_answer_and_a_missed_call_no_ticket(self) -> Any:
        events = incoming("2101234567", answered=False)
        code, body = yield self.post(events[0])
        self.assertEqual((code, json.loads(body)), (200, {}))
        yield self.send_all(events[1:])
        [call] = self.calls()
        self.assertEqual(call[3:8], ("missed", 0, "missed (no answer)", None, False))
        self.assertEqual(self.crm.query("SELECT count(*) FROM accounting_ticket"), [(0,)])

    @defer.inlineCallbacks
    def test_an_outgoing_call_and_a_callback(self) -> Any:
        outgoing = [
            {"event": "NOTIFY_OUT_START", "pbx_call_id": "out_" + "c" * 40,
             "call_start": START, "internal": "101", "destination": "302310555123",
             "caller_id": "302107654321", "calltype": "normal"},
            {"event": "NOTIFY_OUT_END", "pbx_call_id": "out_" + "c" * 40,
             "call_start": START, "internal": "101", "destination": "302310555123",
             "caller_id": "302107654321", "duration": "42", "disposition": "answered",
             "status_code": "16", "is_recorded": "0", "calltype": "normal"},
        ]
        callback = [
            {"event": "NOTIFY_OUT_START", "pbx_call_id": "out_" + "d" * 40,
             "call_start": START, "internal": "100", "destination": destination,
             "caller_id": "302107654321", "calltype": leg}
            for leg, destination in (("callback_leg1", "306971234567"),
                                     ("callback_leg2", "302101234567"))
        ] + [
            {"event": "NOTIFY_OUT_END", "pbx_call_id": "out_" + "d" * 40,
             "call_start": START, "internal": "100", "destination": destination,
             "caller_id": "302107654321", "duration": seconds, "disposition": "answered",
             "status_code": "16", "is_recorded": "0", "calltype": leg}
            for leg, destination, seconds in (("callback_leg2", "302101234567", "61"),
                                              ("callback_leg1", "306971234567", "70"))
        ]
        customer = self.crm.client("Customer AE", tilefono_oikias_1="210 123 4567")
        # the user's own mobile, rung first by leg 1, is also in the CRM: the first event
        # alone points at it, the call as a whole at the customer
        self.crm.client("Staff mobile", kinito_tilefono="697 123 4567")
        yield defer.Deferred.fromCoroutine(self.daemon.directory.build())
        self.requested("306971234567", "+302101234567")  # the callback dpvoip asked for
        yield self.send_all(outgoing + callback)
        self.assertEqual([c[1:7] for c in self.calls()], [
            ("outgoing", "+302310555123", "completed", 42, "answered, talk 0:42", None),
            ("outgoing", "+302101234567", "completed", 61, "answered, callback, talk 1:01",
             customer),
        ])

    @defer.inlineCallbacks
    def test_every_order_and_duplicates_give_the_same_call(self) -> Any:
        expected: list[tuple[Any, ...]] | None = None
        for n in range(5):
            # the same caller and start: another of the office's numbers each time (one
            # signed string, one call), a column these rows do not show
            pbx = f"in_{n:040d}"
            events = incoming(pbx=pbx, did=f"30210765432{n}")
            order = next(itertools.islice(itertools.permutations(events), 5 * n, None))
            sequence = [*order, order[0], order[2]]
            codes = yield self.send_all(sequence)
            self.assertEqual(codes, [200] * len(sequence))
            [call] = [c for c in self.calls() if c[0] == f"zd-{pbx}"]
            if expected is None:
                expected = [call[1:]]
            self.assertEqual([call[1:]], expected)
        self.assertEqual(self.logs().count("ended"), 5, "one ended line per call, ever")

    @defer.inlineCallbacks
    def test_a_recording_notice_first_is_kept_for_the_call(self) -> Any:
        record = {"event": "NOTIFY_RECORD", "pbx_call_id": PBX,
                  "call_id_with_rec": "1768464000.123456"}
        self.assertEqual((yield self.post(record))[0], 200)
        self.assertEqual(self.calls(), [])
        yield self.send_all(incoming())
        self.assertEqual(self.crm.query("SELECT recording FROM dpvoip.call_detail"),
                         [("1768464000.123456",)])

    @defer.inlineCallbacks
    def test_an_unknown_event_is_answered_and_creates_nothing(self) -> Any:
        form = {"event": "NOTIFY_SOMETHING_NEW", "pbx_call_id": PBX, "result": "{}"}
        code, _ = yield self.post(form)
        self.assertEqual(code, 200)
        self.assertEqual(self.calls(), [])


class TicketTests(WebhookTestCase):
    zadarma = replace(WebhookTestCase.zadarma, create_tickets=True)

    @defer.inlineCallbacks
    def test_missed_calls_make_tickets_when_configured(self) -> Any:
        yield self.send_all(incoming("6912345678", answered=False))
        yield self.send_all(incoming("6912345678", answered=False, pbx="in_" + "e" * 40,
                                     start="2026-01-15 10:05:00"))
        self.assertEqual(self.crm.query("SELECT title FROM accounting_ticket"),
                         [("MISSED CALLS (2x) - +306912345678",)])
        self.assertEqual([c[7] for c in self.calls()], [True, True])


class RefusalTests(WebhookTestCase):
    @defer.inlineCallbacks
    def test_forged_and_spoofed_requests_write_nothing(self) -> Any:
        form = incoming()[0]
        raw_digest = "mnwU1M6lreDYs0RGEcgsI+8Ehw8="
        edited = {**form, "caller_id": "6999999999"}
        cases = [
            (self.post(form, signature=None), 401),
            (self.post(form, signature=raw_digest), 401),
            (self.post(form, signature=webhook_signature("another-secret", form)), 401),
            (self.post(edited, signature=webhook_signature(SECRET, form)), 401),
            (self.post(form, sender="203.0.113.5"), 403),
            (self.post(form, sender=f"{ZADARMA}, 203.0.113.5"), 403),
        ]
        for request, status in cases:
            code, body = yield request
            self.assertEqual(code, status, body)
            self.assertNotIn(SECRET.encode(), body)
        self.assertEqual(self.calls(), [])
        self.assertEqual(self.crm.query("SELECT count(*) FROM dpvoip.zadarma_event"), [(0,)])

    @defer.inlineCallbacks
    def test_malformed_requests_get_a_clear_4xx_never_500(self) -> Any:
        form = incoming()[0]
        no_id = {k: v for k, v in form.items() if k != "pbx_call_id"}
        bad_start = {**form, "call_start": "15/01/2026 10:00"}
        cases = [
            (self.post(form, content_type="application/json", body=json.dumps(form).encode()),
             415),
            (self.post(no_id), 400),
            (self.post(bad_start), 400),
            (self.post(form, body=urlencode(form).encode() + b"&caller_id=1"), 400),
            (self.post(form, body=b"caller_id=%ff%fe&event=NOTIFY_START"), 400),
            (self.post({**form, "x": "y" * 70_000}), 413),
        ]
        for request, status in cases:
            code, body = yield request
            self.assertEqual(code, status, body)
            self.assertEqual(json.loads(body)["status"], status)
        self.assertEqual(self.calls(), [])


class CrmSideTests(WebhookTestCase):
    zadarma = replace(WebhookTestCase.zadarma, redirect_to_owner=True)

    @defer.inlineCallbacks
    def test_was_in_touch_and_one_workflow_line_per_call_and_the_owner_redirect(self) -> Any:
        from datetime import datetime
        from zoneinfo import ZoneInfo

        owner = self.crm.user("anna")
        self.crm.insert("common_userprofile", user_id=owner, pbx_number="104",
                        utc_timezone="", language_code="el")
        contact = self.crm.contact("Maria", "Ioannou", mobile="6912345678", owner_id=owner)
        deal = self.crm.deal("Insurance", contact_id=contact, workflow="older line")
        yield defer.Deferred.fromCoroutine(self.daemon.directory.build())
        events = incoming()
        code, body = yield self.post(events[0])
        self.assertEqual((code, json.loads(body)),
                         (200, {"caller_name": "Maria Ioannou", "redirect": "104"}))
        self.crm.query("UPDATE crm_deal SET name = 'Insurance (edited)' WHERE id = %s", (deal,))
        yield self.send_all([*events[1:], events[-1], events[0]])  # with replays
        today = datetime.now(ZoneInfo("Europe/Athens")).date()
        self.assertEqual(self.crm.query("SELECT was_in_touch FROM crm_contact"), [(today,)])
        [(name, workflow)] = self.crm.query("SELECT name, workflow FROM crm_deal")
        self.assertEqual(name, "Insurance (edited)", "only the workflow is written")
        self.assertEqual(workflow.splitlines(), [
            f"{today:%d.%m.%Y} - Incoming call from Maria Ioannou (answered, 1:35).",
            "older line",
        ])

    @defer.inlineCallbacks
    def test_a_missed_call_adds_a_line_but_no_touch(self) -> Any:
        lead = self.crm.lead("Nikos", "Georgiou", mobile="6900000001")
        self.crm.deal("Lead deal", lead_id=lead)
        yield defer.Deferred.fromCoroutine(self.daemon.directory.build())
        yield self.send_all(incoming("6900000001", answered=False))
        self.assertEqual(self.crm.query("SELECT was_in_touch FROM crm_lead"), [(None,)])
        [(workflow,)] = self.crm.query("SELECT workflow FROM crm_deal")
        self.assertIn("Incoming call from Nikos Georgiou (missed, 0:00).", workflow)


class ConcurrencyTests(WebhookTestCase):
    pool_size = 2

    @defer.inlineCallbacks
    def test_more_concurrent_events_than_pool_connections_all_complete(self) -> Any:
        # Each event's transaction looks its caller up: that must not need a second pool
        # connection, or a pool's worth of concurrent events would wait for ever.
        for n in range(12):
            self.crm.client(f"Client {n}", kinito_tilefono=f"69000000{n:02d}")
        yield defer.Deferred.fromCoroutine(self.daemon.directory.build())
        ends = [incoming(f"69000000{n:02d}", pbx=f"in_{n:040d}")[-1] for n in range(12)]
        answers = yield defer.gatherResults([self.post(form) for form in ends])
        self.assertEqual([code for code, _ in answers], [200] * 12)
        # Committed, none spooled: a pool that deadlocked would have spooled them all at
        # the deadline, however long that is.
        self.assertEqual(self.daemon.durable.counters.spooled, 0)
        self.assertEqual(len(self.calls()), 12)
        self.assertEqual({c[6] is not None for c in self.calls()}, {True})


# -- the account's zone, learned, reaches the webhook (in memory) ----------------------------

ATHENS = ZoneInfo("Europe/Athens")


class StatedZone:
    """Stands for the Zadarma API: states the account's zone as Zadarma does."""

    configured = True

    def __init__(self, stated: str) -> None:
        self.stated = stated

    async def timezone(self) -> str:
        return self.stated


class NoConnections:
    def closeCachedConnections(self) -> defer.Deferred[None]:
        return defer.succeed(None)


class LearnedZoneTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.context = CurrentZadarmaContext(ZadarmaContext(Dialling("GR"), ATHENS))
        self.recorder = Recorder()
        self.hook = ZadarmaWebhook(recorder=self.recorder, context=self.context,
                                   secret=Secret(WEB_SECRET),
                                   allowlist=networks([f"{ZADARMA_PEER}/32"]), proxies=())

    def post_event(self) -> ZadarmaContext:
        wire = Wire(settings(), Probe(), zadarma=self.hook, peer=ZADARMA_PEER)
        wire.send(signed_event())
        self.assertEqual(wire.response()[0], 200)
        return self.recorder.events[-1][1]

    def test_events_are_read_in_the_configured_zone_until_one_is_learned(self) -> None:
        self.assertEqual(self.post_event().zone, ATHENS)
        tokyo = ZoneInfo("Asia/Tokyo")
        self.context.learn_zone(tokyo)
        read = self.post_event()
        self.assertEqual((read.zone, read.where), (tokyo, Dialling("GR")))
        self.assertEqual(self.hook.context.zone, tokyo)
        self.assertEqual(self.context.current().zone, tokyo, "the spool's replay reads it too")

    def test_the_zone_the_account_service_learns_is_the_one_the_webhook_uses(self) -> None:
        clock = Clock()
        clock.advance(datetime(2026, 1, 15, 10, 0, tzinfo=UTC).timestamp())  # winter: +2
        account = ZadarmaAccountService(
            StatedZone("UTC+5"), NoConnections(), clock,  # type: ignore[arg-type]
            ATHENS, learn_zone=True, on_zone=self.context.learn_zone)
        account.startService()
        self.addCleanup(account.stopService)
        clock.advance(0)
        self.assertEqual(account.zone_stated, "UTC+5")
        self.assertEqual(self.post_event().zone, timezone(timedelta(hours=5)))


class RefusedSenderLogTests(SynchronousTestCase):
    """A flood from a sender that is not Zadarma's is a few lines a minute, each saying how
    many more were refused, not a line per request (every request is still refused)."""

    def test_refusals_are_logged_within_a_budget(self) -> None:
        from twisted.logger import ILogObserver, formatEvent, globalLogPublisher
        from zope.interface import provider

        lines: list[str] = []

        @provider(ILogObserver)
        def observer(event: dict[str, Any]) -> None:
            text = formatEvent(event)
            if "not a Zadarma address" in text:
                lines.append(text)

        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)
        clock = Clock()
        hook = ZadarmaWebhook(recorder=Recorder(), context=ZadarmaContext(Dialling("GR"),
                              ATHENS), secret=Secret(WEB_SECRET),
                              allowlist=networks([f"{ZADARMA_PEER}/32"]), proxies=(),
                              clock=clock)
        for _ in range(50):
            wire = Wire(settings(), Probe(), clock=clock, zadarma=hook, peer="203.0.113.5")
            wire.send(signed_event())
            self.assertEqual(wire.response()[0], 403)
        self.assertEqual(len(lines), 10, "ten a minute")
        clock.advance(61)
        wire = Wire(settings(), Probe(), clock=clock, zadarma=hook, peer="203.0.113.5")
        wire.send(signed_event())
        self.assertEqual(len(lines), 11)
        self.assertIn("(40 more like this in the last minute)", lines[-1])
        self.assertEqual(hook.counters.refused[403], 51)
