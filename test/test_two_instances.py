"""Two dpvoip instances on one PostgreSQL (issue 19, point 1): webhooks and click-to-call
may land on either, and the database alone keeps them consistent.

Each test builds two daemons in this process, as the composition root builds them
(``dpvoip.service.build``), each with its own state folder (its spool) and its own web
listener on a loopback port the system picks, both attached to one test database. In
front of them, as the reverse proxy of a deployment, a port forwarder on loopback sends
each new connection to the next instance in turn (``RoundRobin``; the HTTP client opens a
connection per request, so the requests alternate); a test that must choose the instance
posts to its own address instead.

What is proven: the same signed Zadarma event delivered to both instances is one call
and one ticket; a call whose events arrive at different instances is one call, as one
instance records it; missed calls of one number arriving at once on both group into one
ticket; a user clicking on both instances gets exactly ``per_user_per_minute`` dials a
minute, one after the other or all at once. The webhook tests run on both shipped CRM
versions, as the Zadarma tests do where the rows differ.

And point 4: a staff user's browser holding ``GET /voip/events`` on the instance that
recorded nothing (the standby of the one Fritz!Box both are configured with) gets every
``call`` and ``ticket`` event of a Zadarma call posted to the other instance and of a box
call that instance read, with the same ids and data as that instance's own stream: they
reach it through PostgreSQL's NOTIFY alone.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import replace
from datetime import datetime
from typing import Any
from urllib.parse import urlencode
from zoneinfo import ZoneInfo

import treq
from twisted.internet import defer, reactor
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IListeningPort
from twisted.internet.protocol import ClientFactory, connectionDone
from twisted.protocols.portforward import ProxyFactory, ProxyServer
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase
from twisted.web.client import HTTPConnectionPool

from dpvoip.config import (
    ClickToCallSettings,
    CrmSettings,
    DirectorySettings,
    Secret,
    SpoolSettings,
    ZadarmaSettings,
)
from dpvoip.deferreds import EmptyableSet
from dpvoip.service import Daemon, build
from dpvoip.store.tokens import create_token
from dpvoip.testing.fritzbox import FritzSimulator, parse_script
from dpvoip.testing.zadarma import ZadarmaFake
from dpvoip.zadarma.signing import webhook_signature
from test.support.crm import Crm
from test.support.crm_rules import crm_findings
from test.support.daemon import PATIENCE, scratch
from test.support.postgres import postgres
from test.support.waiting import until
from test.support.wiring import LOOPBACK, in_process, loopback_box, running
from test.test_crm_logins import access_claims, forge_jwt
from test.test_database import eventually
from test.test_live_stream import RawClient
from test.test_zadarma_webhook import SECRET, START, WIDE_HOURS, ZADARMA, incoming

CALLER = "6912345678"
CRM_SECRET_KEY = "crm-secret-key-for-tests-0123456789abcdef"
API_KEY, API_SECRET = "testkey", "testsecret"


# -- the reverse proxy of the test: a port forwarder taking turns -----------------------------


class _Forwarded(ProxyServer):
    """One client connection, forwarded to the instance whose turn it is."""

    noisy = False
    factory: RoundRobin

    def connectionMade(self) -> None:
        self.transport.pauseProducing()  # nothing read before the far side is there
        client = self.clientProtocolFactory()
        client.setServer(self)
        client.noisy = False
        self.factory.open.add(self)
        reactor.connectTCP(LOOPBACK, self.factory.next_port(), client)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        super().connectionLost(reason)
        self.factory.open.discard(self)


class RoundRobin(ProxyFactory):
    """Each new connection to the next of ``ports`` (on loopback), counted per port."""

    protocol = _Forwarded
    noisy = False

    def __init__(self, ports: list[int]) -> None:
        super().__init__(LOOPBACK, ports[0])
        self.ports = ports
        self.sent: Counter[int] = Counter()
        self.open: EmptyableSet[_Forwarded] = EmptyableSet()
        self._turn = 0

    def next_port(self) -> int:
        port = self.ports[self._turn % len(self.ports)]
        self._turn += 1
        self.sent[port] += 1
        return port


# -- two instances, one database ----------------------------------------------------------------


class TwoInstances(TestCase):
    """Two daemons on one fresh database, each with its own state folder and listener,
    and the round-robin forwarder in front of both."""

    timeout = 3 * PATIENCE  # a hang detector: two daemons and a database on a busy machine
    crm_version = "2026-08"
    pool_size = 4
    zadarma = replace(ZadarmaSettings(), secret=Secret(SECRET), timezone="Europe/Athens",
                      max_event_age_hours=WIDE_HOURS, create_tickets=True)
    click = ClickToCallSettings()

    def setUp(self) -> Any:
        self.dsn = postgres().new_database(crm=self.crm_version)
        self.crm = Crm(self.dsn)
        self.http = HTTPConnectionPool(reactor, persistent=False)  # a connection a request
        self.addCleanup(self.http.closeCachedConnections)
        return defer.Deferred.fromCoroutine(self._start())

    def settings(self) -> dict[str, Any]:
        """The sections both instances share (a subclass adds its own)."""
        return {"zadarma": self.zadarma, "click_to_call": self.click,
                "spool": replace(SpoolSettings(), deadline_seconds=60.0)}

    async def _start(self) -> None:
        config = in_process(self.dsn, pool_size=self.pool_size, **self.settings())
        self.daemons: list[Daemon] = [build(config, reactor, scratch(self)) for _ in range(2)]
        # started together: both prepare the schema at once (it is migrated once)
        self.ports = list(await defer.gatherResults([
            defer.Deferred.fromCoroutine(running(self, daemon)) for daemon in self.daemons]))
        self.assertNotEqual(self.daemons[0].durable, self.daemons[1].durable)
        self.forwarder = RoundRobin(self.ports)
        listening = await serverFromString(reactor, f"tcp:0:interface={LOOPBACK}").listen(
            self.forwarder)
        self.addCleanup(self._stop_forwarder, listening)
        self.proxy = listening.getHost().port

    async def _stop_forwarder(self, listening: IListeningPort) -> None:
        await defer.maybeDeferred(listening.stopListening)
        await self.forwarder.open.when_empty()  # every forwarded connection closed

    def tearDown(self) -> None:
        # Every row either instance wrote is one the CRM's own code would keep.
        self.assertEqual(crm_findings(self.dsn), [])

    def url(self, port: int, path: str) -> str:
        return f"http://{LOOPBACK}:{port}{path}"

    # -- Zadarma's webhooks ----------------------------------------------------------------

    async def _post_event(self, port: int, form: dict[str, str]) -> int:
        signature = webhook_signature(SECRET, form)
        assert signature is not None, form
        headers: dict[bytes | str, list[bytes | str]] = {
            "Content-Type": ["application/x-www-form-urlencoded"],
            "X-Forwarded-For": [ZADARMA], "Signature": [signature]}
        response = await treq.post(self.url(port, "/voip/zd/"),
                                   data=urlencode(form).encode(), headers=headers,
                                   pool=self.http)
        await response.content()
        return int(response.code)

    def post_event(self, port: int, form: dict[str, str]) -> defer.Deferred[int]:
        return defer.Deferred.fromCoroutine(self._post_event(port, form))

    async def _send_call(self, port: int, events: list[dict[str, str]]) -> list[int]:
        """A call's events in their order, each answered before the next is sent."""
        return [await self._post_event(port, form) for form in events]

    def send_call(self, port: int, events: list[dict[str, str]]) -> defer.Deferred[list[int]]:
        return defer.Deferred.fromCoroutine(self._send_call(port, events))

    def calls(self) -> list[tuple[Any, ...]]:
        return self.crm.query(
            "SELECT call_id, direction, phone_number, status, duration_seconds, notes,"
            " client_id, ticket_created FROM accounting_voipcall ORDER BY id")

    def tickets(self) -> list[tuple[Any, ...]]:
        return self.crm.query("SELECT id, title FROM accounting_ticket ORDER BY id")

    def log_actions(self) -> list[str]:
        return [row[0] for row in self.crm.query(
            "SELECT action FROM accounting_voipcalllog ORDER BY id")]


class WebhookTests(TwoInstances):
    @defer.inlineCallbacks
    def test_the_same_event_delivered_to_both_is_one_call_and_one_ticket(self) -> Any:
        # Zadarma retries, or a proxy resends after a timeout: every event reaches both
        # instances at the same moment
        for form in incoming(CALLER, answered=False):
            codes = yield defer.gatherResults(
                [self.post_event(port, form) for port in self.ports])
            self.assertEqual(codes, [200, 200])
        [call] = self.calls()
        self.assertEqual(call[1:], ("incoming", "+306912345678", "missed", 0,
                                    "missed (no answer)", None, True))
        self.assertEqual(self.tickets(), [(self.tickets()[0][0],
                                           "MISSED CALL - +306912345678")])
        self.assertEqual(Counter(self.log_actions()),
                         {"started": 1, "ended": 1, "ticket_created": 1})
        self.assertEqual(self.crm.query("SELECT count(*) FROM dpvoip.call_detail"), [(1,)])

    @defer.inlineCallbacks
    def test_a_call_whose_events_arrive_at_different_instances_is_one_call(self) -> Any:
        client = self.crm.client("Papadopoulos AE", kinito_tilefono="691 234 5678")
        for daemon in self.daemons:  # each instance's index is the one shared table
            yield defer.Deferred.fromCoroutine(daemon.directory.build())
        events = incoming(CALLER)  # START, INTERNAL, ANSWER, END: answered on 100
        codes = yield self.send_call(self.proxy, events)
        self.assertEqual(codes, [200] * 4)
        self.assertEqual(sorted(self.forwarder.sent.values()), [2, 2])  # 2 each, in turn
        self.assertEqual(self.calls(), [(
            f"zd-{events[0]['pbx_call_id']}", "incoming", "+306912345678", "completed", 95,
            "answered, talk 1:35", client, False)])
        self.assertEqual(self.log_actions(), ["started", "client_matched", "ended"])
        self.assertEqual(
            self.crm.query("SELECT extension, outcome, disposition FROM dpvoip.call_detail"),
            [(100, "answered", "answered")])

    @defer.inlineCallbacks
    def test_missed_calls_of_one_number_at_once_on_both_make_one_ticket(self) -> Any:
        calls = [incoming(CALLER, answered=False, pbx=f"in_{n:040d}",
                          start=START.replace("10:00:00", f"10:0{n}:00")) for n in range(5)]
        answers = yield defer.gatherResults(
            [self.send_call(self.proxy, events) for events in calls])
        self.assertEqual(answers, [[200, 200, 200]] * 5)
        self.assertEqual(sorted(self.forwarder.sent.values()), [7, 8])  # spread over both
        [(ticket, title)] = self.tickets()
        self.assertEqual(title, "MISSED CALLS (5x) - +306912345678")
        self.assertEqual(self.crm.query(
            "SELECT count(*), count(DISTINCT ticket_id), min(ticket_id::text)"
            " FROM accounting_voipcall WHERE ticket_created"), [(5, 1, str(ticket))])
        self.assertEqual(len(self.calls()), 5)


class WebhookTests2025(WebhookTests):
    crm_version = "2025-12"


# -- click-to-call: one user's limit, whichever instance takes the click --------------------


class ClickToCallTests(TwoInstances):
    """Anna (JWT) clicks on both instances; the fake Zadarma API on loopback counts what
    was really dialled. Her limit: 3 a minute."""

    crm_version = "2025-12"
    click = replace(ClickToCallSettings(), per_user_per_minute=3)

    def setUp(self) -> Any:
        self.fake = ZadarmaFake(API_KEY, API_SECRET, reactor)
        self.addCleanup(self.fake.close)
        return super().setUp()

    async def _start(self) -> None:
        listening = await self.fake.listen(reactor, f"tcp:0:interface={LOOPBACK}")
        self.api_url = f"http://{LOOPBACK}:{listening.getHost().port}"  # type: ignore[attr-defined]
        await super()._start()
        self.anna = self.crm.user("anna", first_name="Anna")
        self.connection = self.crm.insert(
            "voip_connection", type="pbx", active=True, number="100", callerid="Anna desk",
            provider="Zadarma", owner_id=self.anna)

    def settings(self) -> dict[str, Any]:
        return {**super().settings(),
                "crm": replace(CrmSettings(), secret_key=Secret(CRM_SECRET_KEY)),
                "zadarma": replace(self.zadarma, key=Secret(API_KEY),
                                   secret=Secret(API_SECRET), api_url=self.api_url,
                                   api_timeout=60.0)}

    def jwt(self) -> str:
        return forge_jwt(access_claims(user_id=str(self.anna), exp=int(time.time()) + 600),
                         CRM_SECRET_KEY)

    async def _click(self, port: int) -> tuple[int, str]:
        headers: dict[bytes | str, list[bytes | str]] = {
            "Content-Type": ["application/json"], "Accept": ["application/json"],
            "Authorization": [f"Bearer {self.jwt()}"]}
        body = f'{{"connection": {self.connection}, "number": "{CALLER}"}}'.encode()
        response = await treq.post(self.url(port, "/voip/get-callback/"), data=body,
                                   headers=headers, pool=self.http)
        await response.content()
        retry = response.headers.getRawHeaders(b"retry-after", [b""])[0].decode()
        return int(response.code), retry

    def click_on(self, port: int) -> defer.Deferred[tuple[int, str]]:
        return defer.Deferred.fromCoroutine(self._click(port))

    async def _alternately(self, clicks: int) -> list[tuple[int, str]]:
        return [await self._click(self.ports[n % 2]) for n in range(clicks)]

    def dialled(self) -> int:
        return sum(1 for r in self.fake.requests if r.path == "/v1/request/callback/")

    def a_minute_passes(self) -> None:
        """What a minute does to the shared count: every counted click a minute older
        (the instances' clocks are the real one; no test waits for it)."""
        self.crm.query("UPDATE dpvoip.callback_request SET counted_at = counted_at"
                       " - interval '60 seconds' WHERE counted_at IS NOT NULL RETURNING 1")

    @defer.inlineCallbacks
    def test_clicking_on_both_alternately_dials_three_a_minute(self) -> Any:
        answers = yield defer.Deferred.fromCoroutine(self._alternately(8))
        self.assertEqual([code for code, _ in answers], [200] * 3 + [429] * 5)
        self.assertEqual(self.dialled(), 3)
        # the fourth click, on the instance that had taken one, waits for the first
        # click's minute, counted on the other instance
        self.assertTrue(all(1 <= int(retry) <= 60 for _, retry in answers[3:]), answers)
        self.a_minute_passes()
        answers = yield defer.Deferred.fromCoroutine(self._alternately(8))
        self.assertEqual([code for code, _ in answers], [200] * 3 + [429] * 5)
        self.assertEqual(self.dialled(), 6)
        self.assertEqual(self.crm.query(
            "SELECT result, count(*), count(counted_at) FROM dpvoip.callback_request"
            " GROUP BY result ORDER BY result"), [("dialled", 6, 6), ("refused", 10, 0)])

    @defer.inlineCallbacks
    def test_clicks_at_once_on_both_dial_three(self) -> Any:
        answers = yield defer.gatherResults(
            [self.click_on(self.ports[n % 2]) for n in range(8)])
        self.assertEqual(Counter(code for code, _ in answers), {200: 3, 429: 5})
        self.assertEqual(self.dialled(), 3)


# -- live events: a stream on one instance, the call recorded by the other -------------------


OFFICE = "2107654321"


class LiveEventsTests(TwoInstances):
    """Both instances are configured with one Fritz!Box (the simulator on loopback): one
    leads it and records; the other, the standby, records nothing. A staff user (a
    dpvoip token) holds an event stream on each."""

    def setUp(self) -> Any:
        self.box = FritzSimulator(reactor, parse_script(""), "Europe/Athens")
        self.addCleanup(self.box.stop)
        return super().setUp()

    async def _start(self) -> None:
        self.box_port = await self.box.listen(0)
        await super()._start()
        self.crm.user("boss", is_staff=True)
        _, self.token = await create_token(self.daemons[0].store, "public", "boss")

    def settings(self) -> dict[str, Any]:
        return {**super().settings(),
                "directory": DirectorySettings(own_numbers=(OFFICE,)),
                "boxes": [loopback_box("office", self.box_port, reconnect_initial_seconds=0.1,
                                       reconnect_max_seconds=1.0, clock_tolerance_seconds=0)]}

    async def _leads(self, port: int) -> bool:
        response = await treq.get(self.url(port, "/readyz"), pool=self.http)
        body = await response.json()
        return bool(body["fritzbox"][0]["leader"])

    async def _leader(self) -> tuple[int, int]:
        """(the leader's port, the standby's), once one leads and reads the box."""
        found: list[tuple[int, int]] = []

        async def settled() -> bool:
            leading = [port for port in self.ports if await self._leads(port)]
            if len(leading) == 1 and self.box.connected == 1:
                [standby] = [port for port in self.ports if port not in leading]
                found.append((leading[0], standby))
                return True
            return False

        await eventually(lambda: defer.Deferred.fromCoroutine(settled()), PATIENCE)
        return found[-1]

    def stream(self, port: int) -> RawClient:
        """``GET /voip/events`` as a browser holds it, signed in as the staff user."""
        client = RawClient((f"GET /voip/events HTTP/1.1\r\nHost: {LOOPBACK}\r\n"
                            f"Authorization: Bearer {self.token}\r\n\r\n").encode())
        factory = ClientFactory()
        factory.buildProtocol = lambda addr: client  # type: ignore[method-assign]
        reactor.connectTCP(LOOPBACK, port, factory)
        self.addCleanup(self._hang_up, client)
        return client

    @staticmethod
    async def _hang_up(client: RawClient) -> None:
        if client.transport is not None:
            client.transport.loseConnection()
        await client.closed

    @staticmethod
    def calls_and_tickets(client: RawClient) -> list[tuple[str | None, str, Any]]:
        return [event for event in client.events() if event[1] in ("call", "ticket")]

    @defer.inlineCallbacks
    def test_the_standby_streams_every_event_of_the_calls_the_leader_records(self) -> Any:
        leader, standby = yield defer.Deferred.fromCoroutine(self._leader())
        streams = {port: self.stream(port) for port in (leader, standby)}
        yield defer.Deferred.fromCoroutine(until(lambda: all(
            b"retry: 3000" in c.body for c in streams.values())))  # both streams open

        # a missed Zadarma call posted to the leader (a ticket), a box call it reads
        events = incoming(CALLER, answered=False,
                          start=datetime.now(ZoneInfo("Europe/Athens")).strftime(
                              "%Y-%m-%d %H:%M:%S"))
        codes = yield self.send_call(leader, events)
        self.assertEqual(codes, [200] * 3)
        self.box.script = parse_script(f"0 {{now}};RING;0;6987654321;{OFFICE};SIP0;\n"
                                       "0.2 {now};CONNECT;0;11;6987654321;\n"
                                       "0.2 {now};DISCONNECT;0;2;\n")
        yield self.box.run()

        yield defer.Deferred.fromCoroutine(until(lambda: self.crm.query(
            "SELECT count(*) FROM accounting_voipcall WHERE status <> 'active'") == [(2,)]))
        kept = self.crm.query("SELECT id, kind, call_id FROM dpvoip.live_event"
                              " WHERE kind IN ('call', 'ticket') ORDER BY id")
        yield defer.Deferred.fromCoroutine(until(lambda: all(
            len(self.calls_and_tickets(c)) >= len(kept) for c in streams.values())))

        on_leader = self.calls_and_tickets(streams[leader])
        on_standby = self.calls_and_tickets(streams[standby])
        self.assertEqual(on_standby, on_leader)  # same ids, kinds and data, in order
        self.assertEqual([(int(i or 0), kind, data.get("call_id"))
                          for i, kind, data in on_standby], kept)
        zadarma = f"zd-{events[0]['pbx_call_id']}"
        [(box,)] = self.crm.query("SELECT call_id FROM accounting_voipcall"
                                  " WHERE phone_number = '+306987654321'")
        ends = {data["call_id"]: data["status"] for _, kind, data in on_standby
                if kind == "call" and data["state"] == "ended"}
        self.assertEqual(ends, {zadarma: "missed", box: "completed"})
        self.assertEqual([data["call_id"] for _, kind, data in on_standby if kind == "ticket"],
                         [zadarma])
        self.assertEqual(self.box.connections, 1)  # the standby never read the box
